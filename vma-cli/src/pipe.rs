//! Broken pipes, decided once for every tool.
//!
//! Rust ignores SIGPIPE, so a write to a pipe whose reader has gone fails
//! with EPIPE. What that means depends on the output:
//!
//! * **informational output** — `list`, `config`, verify reports, progress
//!   and statistics, help: nobody is reading any more, which is not an error.
//!   The tool stops writing and ends quietly (`vma-decode list F | head -1`
//!   exits 0, every time, without a message). [`info_failure`] makes that
//!   [`Failure`] (exit 0, no message). `vma-verify` keeps its verdict as the
//!   exit status: it stops printing and still exits 1 for a damaged archive.
//! * **data output** — an archive, a cluster stream, a raw device on stdout:
//!   what was written is incomplete, a real failure. [`data_failure`] makes it
//!   exit 3 with one line naming the output.
//!
//! clap's `--help` and `--version` already ignore write errors and exit 0.

use std::io;

use crate::{exit, Failure};

/// Whether `err` says the reader of our output has gone away.
pub fn is_broken_pipe(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::BrokenPipe
}

/// The failure for an error writing informational text to standard output:
/// a broken pipe is a quiet exit 0 ([`Failure::quiet`]); any other error
/// exit 3 with `stdout: ERROR`.
pub fn info_failure(err: &io::Error) -> Failure {
    if is_broken_pipe(err) {
        Failure::quiet(exit::OK)
    } else {
        Failure::io("stdout", err)
    }
}

/// The failure for an error writing data (an archive, a stream, an image)
/// to `what`: always exit 3 with one line, a broken pipe included.
pub fn data_failure(what: &str, err: &io::Error) -> Failure {
    Failure::io(what, err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broken_pipes_end_informational_output_quietly() {
        let epipe = io::Error::from(io::ErrorKind::BrokenPipe);
        let f = info_failure(&epipe);
        assert_eq!((f.code, f.message.as_str()), (0, ""));
        let full = io::Error::from_raw_os_error(28);
        let f = info_failure(&full);
        assert_eq!(f.code, 3);
        assert!(
            f.message.starts_with("stdout: No space left on device"),
            "{}",
            f.message
        );
        let f = data_failure("<stdout>", &epipe);
        assert_eq!(f.code, 3);
        assert!(f.message.starts_with("<stdout>: "), "{}", f.message);
    }
}
