//! What the vma-tools binaries share: exit codes, opening inputs, error
//! lines, and the text Proxmox's `vma` prints (listings, progress, %g).
//!
//! Exit codes, the same in every tool:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | the archive (or cluster stream) is damaged or invalid |
//! | 2 | usage: bad flags or arguments, or a request the format cannot hold |
//! | 3 | I/O or environment error (cannot open, read or write; disk full) |
//! | 4 | partial result: salvage extracted what it could, something is missing |
//! | 128+N | stopped by signal N, partial outputs removed ([`signals`]) |
//!
//! A broken pipe ends informational output quietly with 0 and fails data
//! output with 3 ([`pipe`]). Images in formats such as qcow2 are refused
//! where raw disks are expected ([`image_format`]).

pub mod bar;
pub mod cfmt;
pub mod decompress;
pub mod image_format;
pub mod input;
pub mod listing;
pub mod lzop;
pub mod pipe;
pub mod progress;
pub mod signals;

use vma_format::{Error, ErrorClass};

/// Exit codes shared by every tool.
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// The archive or stream is damaged or invalid.
    pub const DAMAGED: i32 = 1;
    /// Usage error.
    pub const USAGE: i32 = 2;
    /// I/O or environment error.
    pub const IO: i32 = 3;
    /// Partial result (salvage).
    pub const PARTIAL: i32 = 4;
}

/// The git revision this build was made from (short hash), or "" outside a
/// git checkout (see build.rs).
pub const GIT_REV: &str = env!("VMA_TOOLS_GIT_REV");

/// The `--version` text of a tool of version `pkg_version`:
/// `0.1.0 (git 0123456789ab)`, or just `0.1.0` when the revision is unknown.
pub fn version(pkg_version: &'static str) -> &'static str {
    if GIT_REV.is_empty() {
        return pkg_version;
    }
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TEXT.get_or_init(|| format!("{pkg_version} (git {GIT_REV})"))
}

/// The exit-code table, for `--help` texts.
pub const EXIT_CODES_HELP: &str = "Exit codes: 0 ok, 1 archive damaged or invalid, 2 usage, \
3 I/O or environment error, 4 partial result (salvage).";

/// The exit code for an error of `vma-format`. A compressed input that
/// could not be decoded is damage (exit 1), though the reader saw it as a
/// failed read.
pub fn exit_code(err: &Error) -> i32 {
    if decompress_error(err).is_some() {
        return exit::DAMAGED;
    }
    match err.class() {
        ErrorClass::Damaged => exit::DAMAGED,
        ErrorClass::Invalid => exit::USAGE,
        ErrorClass::Io => exit::IO,
    }
}

/// The decoding failure of a compressed input behind `err`, if that is
/// what it is.
pub fn decompress_error(err: &Error) -> Option<&decompress::DecompressError> {
    err.io_error().and_then(decompress::decompress_error)
}

/// What to say about `err` after the input's name: the error with its
/// location, or for a compressed input that could not be decoded, that
/// (`zstd: compressed data is truncated (…)`): the location in the
/// decompressed bytes would only mislead.
pub fn describe(err: &Error) -> String {
    match decompress_error(err) {
        Some(d) => d.to_string(),
        None => err.to_string(),
    }
}

/// Prints `input: message` on stderr as one line and exits with `code`.
pub fn die(input: &str, message: impl std::fmt::Display, code: i32) -> ! {
    eprintln!("{input}: {message}");
    std::process::exit(code)
}

/// An error with the exit code it maps to, for binaries that collect errors
/// from several layers.
#[derive(Debug)]
pub struct Failure {
    /// Exit code.
    pub code: i32,
    /// The one-line message, naming the input.
    pub message: String,
}

impl Failure {
    /// A failure with its code and message.
    pub fn new(code: i32, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }

    /// A `vma-format` error about `input` (see [`describe`]).
    pub fn format(input: &str, err: &Error) -> Failure {
        Failure::new(exit_code(err), format!("{input}: {}", describe(err)))
    }

    /// An I/O error about `what` (a path, or a description).
    pub fn io(what: &str, err: &std::io::Error) -> Failure {
        Failure::new(exit::IO, format!("{what}: {err}"))
    }

    /// An end without a message (e.g. exit 0 when the reader of
    /// informational output has gone: see [`pipe`]).
    pub fn quiet(code: i32) -> Failure {
        Failure::new(code, "")
    }

    /// Prints the message (if any) and exits.
    pub fn exit(&self) -> ! {
        if !self.message.is_empty() {
            eprintln!("{}", self.message);
        }
        std::process::exit(self.code)
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}
