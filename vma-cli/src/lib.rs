//! CLI support.
