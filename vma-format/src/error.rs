//! Errors: where in the input, how serious, and what is wrong.

use std::fmt;
use std::io;

/// Where in an archive (or cluster stream) a problem was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    /// The archive header (or the cluster stream's preamble).
    Header,
    /// Extent number `index` (counting from 0) starting at byte `offset`.
    Extent {
        /// Extents before it.
        index: u64,
        /// Its first byte's position in the input.
        offset: u64,
    },
    /// Record number `index` (counting from 0) of a cluster stream, at byte `offset`.
    Record {
        /// Records before it.
        index: u64,
        /// Its first byte's position in the input.
        offset: u64,
    },
    /// The checks made once the input has ended.
    End,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Header => write!(f, "header"),
            Location::Extent { index, offset } => write!(f, "extent {index} at byte {offset}"),
            Location::Record { index, offset } => write!(f, "record {index} at byte {offset}"),
            Location::End => write!(f, "end of input"),
        }
    }
}

/// How serious an error is; the tools map it to their exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// The input is damaged or not valid (exit code 1).
    Damaged,
    /// What the caller asked for cannot be done: a name too long, too many
    /// devices, a cluster past a device's end handed to the writer (exit code 2
    /// when it comes from the command line).
    Invalid,
    /// Reading or writing failed, or the environment is at fault (exit code 3).
    Io,
}

/// An error of this crate: a class, an optional location and a one-line message.
#[derive(Debug)]
pub struct Error {
    class: ErrorClass,
    location: Option<Location>,
    message: String,
    source: Option<io::Error>,
}

impl Error {
    /// The input is damaged or invalid at `location`.
    pub fn damaged(location: Option<Location>, message: impl Into<String>) -> Error {
        Error {
            class: ErrorClass::Damaged,
            location,
            message: message.into(),
            source: None,
        }
    }

    /// The caller's request cannot be carried out.
    pub fn invalid(message: impl Into<String>) -> Error {
        Error {
            class: ErrorClass::Invalid,
            location: None,
            message: message.into(),
            source: None,
        }
    }

    /// An I/O error while doing `what` (e.g. "read failed").
    pub fn io(location: Option<Location>, what: &str, err: io::Error) -> Error {
        Error {
            class: ErrorClass::Io,
            location,
            message: format!("{what}: {err}"),
            source: Some(err),
        }
    }

    /// How serious it is.
    pub fn class(&self) -> ErrorClass {
        self.class
    }

    /// Where it was found, if anywhere in particular.
    pub fn location(&self) -> Option<Location> {
        self.location
    }

    /// What is wrong, without the location.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The underlying I/O error, for [`ErrorClass::Io`].
    pub fn io_error(&self) -> Option<&io::Error> {
        self.source.as_ref()
    }

    /// The same error found at `location`.
    pub fn at(mut self, location: Location) -> Error {
        self.location = Some(location);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.location {
            Some(Location::End) | None => write!(f, "{}", self.message),
            Some(loc) => write!(f, "{loc}: {}", self.message),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}
