//! VMA format.
