//! Where the archive goes: standard output, or `-o ARCHIVE`.
//!
//! What `-o ARCHIVE` does depends on what ARCHIVE is:
//!
//! | ARCHIVE | what happens |
//! |---|---|
//! | `-` | standard output, as without `-o` |
//! | missing | a new regular file, made safely (below) |
//! | an existing regular file | refused, unless `--force`: then replaced, made safely |
//! | a character or block device, a FIFO | written in place: opened for writing, never created, truncated or renamed (`/dev/nst0`, `/dev/vg/backup`, a named pipe) |
//! | what standard output already is (`/dev/stdout`, `/dev/fd/1`) | standard output: its pipe, or its file written in place |
//! | a symbolic link | the rules above applied to what it points to, fully resolved: a link to an archive is refused or (`--force`) its target replaced, the link kept; a dangling link is refused |
//!
//! A terminal is refused, whichever way it is named.
//! | a directory, a socket | refused |
//!
//! A file made safely is written as a temporary file in the same directory
//! (so the final rename stays on one file system), fsynced, then renamed to
//! ARCHIVE and the directory fsynced. On any failure the temporary file is
//! removed (on drop), and on SIGINT/SIGTERM/SIGHUP too (it is registered
//! with `vma_cli::signals`), so no partial archive is ever left under
//! ARCHIVE's name or beside it. Without `--force` the rename refuses to
//! replace a file that appeared meanwhile. Plain buffered writes only: works
//! on tmpfs (no `O_DIRECT`) and on pipes.

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use tempfile::NamedTempFile;
use vma_cli::signals::{remove_on_signal, Registration};

use crate::EncodeError;

/// Largest pipe buffer to ask for: the default `pipe-max-size` an
/// unprivileged process may set. Bigger pipes mean fewer context switches
/// between us and the reader of the pipe.
const PIPE_SIZE: usize = 1 << 20;

/// An open output.
pub enum Output {
    /// Standard output (a duplicate of fd 1, written without buffering:
    /// the writer hands over whole extents).
    Stdout(File),
    /// A temporary file that becomes `dest` on [`commit`](Output::commit).
    Temp {
        /// The temporary file.
        tmp: NamedTempFile,
        /// The archive's final path.
        dest: PathBuf,
        /// Replace a file that exists at `dest` (`--force`).
        replace: bool,
        /// Removes the temporary file on a signal until it is renamed.
        _signal: Registration,
    },
    /// A device or FIFO written in place.
    InPlace {
        /// The device or FIFO, open for writing.
        file: File,
        /// Its path as given.
        shown: String,
    },
}

impl Output {
    /// Standard output. Refused: a terminal (an archive is binary).
    pub fn stdout() -> Result<Output, EncodeError> {
        let stdout = std::io::stdout();
        if std::io::IsTerminal::is_terminal(&stdout) {
            return Err(EncodeError::usage(
                "refusing to write an archive to a terminal: redirect standard output or use -o ARCHIVE",
            ));
        }
        let fd = stdout
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| EncodeError::io("stdout", &e))?;
        // Only pipes take this; failing is harmless.
        let _ = rustix::pipe::fcntl_setpipe_size(&fd, PIPE_SIZE);
        Ok(Output::Stdout(File::from(fd)))
    }

    /// `-o PATH`: see the module documentation for what each kind of PATH
    /// gets. `force` allows replacing an existing regular file.
    pub fn path(path: &Path, force: bool) -> Result<Output, EncodeError> {
        if path.as_os_str() == "-" {
            return Output::stdout();
        }
        let shown = path.display().to_string();
        let meta = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Output::file(path, force),
            Err(e) => return Err(EncodeError::io(&shown, &e)),
        };
        // The file our standard output already is (-o /dev/stdout, or
        // /dev/fd/1, while stdout is a file or pipe): written as stdout.
        if let (Ok(there), Ok(ours)) = (
            std::fs::metadata(path),
            std::fs::File::from(
                std::io::stdout()
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|e| EncodeError::io("stdout", &e))?,
            )
            .metadata(),
        ) {
            use std::os::unix::fs::MetadataExt;
            if (there.dev(), there.ino()) == (ours.dev(), ours.ino()) {
                return Output::stdout();
            }
        }
        let (target, kind) = if meta.file_type().is_symlink() {
            // stat follows every link, /proc's magic ones included
            // (/dev/stdout -> /proc/self/fd/1 -> "pipe:[…]").
            let kind = match std::fs::metadata(path) {
                Ok(m) => m.file_type(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(EncodeError::usage(format!(
                        "{shown}: a symbolic link to nothing (refusing to create its target)"
                    )))
                }
                Err(e) => return Err(EncodeError::io(&shown, &e)),
            };
            let target = if kind.is_file() {
                // Renamed over: the real path, so the link stays a link.
                std::fs::canonicalize(path).map_err(|e| EncodeError::io(&shown, &e))?
            } else {
                path.to_path_buf()
            };
            (target, kind)
        } else {
            (path.to_path_buf(), meta.file_type())
        };
        if kind.is_char_device() || kind.is_block_device() || kind.is_fifo() {
            // Never created, truncated or renamed: written where it is.
            let file = OpenOptions::new()
                .write(true)
                .open(&target)
                .map_err(|e| EncodeError::io(&shown, &e))?;
            if std::io::IsTerminal::is_terminal(&file) {
                return Err(EncodeError::usage(format!(
                    "{shown}: refusing to write an archive to a terminal"
                )));
            }
            return Ok(Output::InPlace { file, shown });
        }
        if kind.is_dir() {
            return Err(EncodeError::usage(format!("{shown}: is a directory")));
        }
        if !kind.is_file() {
            return Err(EncodeError::usage(format!(
                "{shown}: not a regular file, device or FIFO"
            )));
        }
        if !force {
            return Err(EncodeError::usage(format!(
                "{shown}: exists (--force replaces it)"
            )));
        }
        Output::file(&target, true)
    }

    /// A temporary file beside `dest`, renamed to `dest` on commit;
    /// `replace`: even if a file exists there by then.
    pub fn file(dest: &Path, replace: bool) -> Result<Output, EncodeError> {
        let shown = dest.display().to_string();
        let name = dest
            .file_name()
            .ok_or_else(|| EncodeError::usage(format!("{shown}: not a file name")))?;
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        // The directory's own error, without tempfile's temporary path.
        std::fs::metadata(dir).map_err(|e| EncodeError::io(&shown, &e))?;
        if dest.is_dir() {
            return Err(EncodeError::usage(format!("{shown}: is a directory")));
        }
        let mut prefix = std::ffi::OsString::from(".");
        prefix.push(name);
        prefix.push(".tmp-");
        let tmp = tempfile::Builder::new()
            .prefix(&prefix)
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
            .tempfile_in(dir)
            .map_err(|e| {
                EncodeError::io(
                    &format!("{shown}: cannot create a temporary file beside it"),
                    &e,
                )
            })?;
        let _signal = remove_on_signal(tmp.path());
        Ok(Output::Temp {
            tmp,
            dest: dest.to_path_buf(),
            replace,
            _signal,
        })
    }

    /// The name for messages.
    pub fn name(&self) -> String {
        match self {
            Output::Stdout(_) => "stdout".into(),
            Output::Temp { dest, .. } => dest.display().to_string(),
            Output::InPlace { shown, .. } => shown.clone(),
        }
    }

    /// The file to write to.
    pub fn file_handle(&self) -> &File {
        match self {
            Output::Stdout(f) => f,
            Output::Temp { tmp, .. } => tmp.as_file(),
            Output::InPlace { file, .. } => file,
        }
    }

    /// Makes the output final: for a file, fsync, rename to the archive
    /// name, fsync the directory; for a device, fsync (where it means
    /// anything: a FIFO or terminal has nothing to sync).
    pub fn commit(self) -> Result<(), EncodeError> {
        match self {
            Output::Stdout(_) => Ok(()),
            Output::InPlace { file, shown } => match file.sync_all() {
                Err(e) if e.raw_os_error() != Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                    Err(EncodeError::io(&format!("{shown}: fsync failed"), &e))
                }
                _ => Ok(()),
            },
            Output::Temp {
                tmp,
                dest,
                replace,
                _signal,
            } => {
                let shown = dest.display().to_string();
                tmp.as_file()
                    .sync_all()
                    .map_err(|e| EncodeError::io(&format!("{shown}: fsync failed"), &e))?;
                let renamed = if replace {
                    tmp.persist(&dest)
                } else {
                    tmp.persist_noclobber(&dest)
                };
                renamed.map_err(|e| {
                    if e.error.kind() == std::io::ErrorKind::AlreadyExists {
                        EncodeError::usage(format!(
                            "{shown}: created by someone else meanwhile (--force replaces it)"
                        ))
                    } else {
                        EncodeError::io(&format!("{shown}: rename failed"), &e.error)
                    }
                })?;
                // Renamed: no longer ours to remove on a signal.
                _signal.done();
                let dir = match dest.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p,
                    _ => Path::new("."),
                };
                if let Ok(d) = File::open(dir) {
                    let _ = d.sync_all();
                }
                Ok(())
            }
        }
    }
}

/// A writer that counts the bytes written through it (the archive's size,
/// for `--json`, wherever it goes).
pub struct Counted<W> {
    inner: W,
    bytes: u64,
}

impl<W> Counted<W> {
    /// Counts what is written to `inner`.
    pub fn new(inner: W) -> Counted<W> {
        Counted { inner, bytes: 0 }
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl<W: std::io::Write> std::io::Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        let n = self.inner.write_vectored(bufs)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
