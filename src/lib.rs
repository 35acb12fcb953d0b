//! The `vma-tools` package owns the end-to-end tests in the top-level `tests/`
//! directory; the tools themselves live in the workspace member crates.
