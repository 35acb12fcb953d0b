//! Where the archive goes: standard output, or a file made safely.
//!
//! A file is written as a temporary file in the same directory (so the final
//! rename stays on one file system), fsynced, then renamed over ARCHIVE and
//! the directory fsynced. On any failure the temporary file is removed (on
//! drop), so no partial archive is ever left under ARCHIVE's name. Plain
//! buffered writes only: works on tmpfs (no `O_DIRECT`) and on pipes.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use tempfile::NamedTempFile;

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
            .map_err(|e| EncodeError::io("<stdout>", &e))?;
        // Only pipes take this; failing is harmless.
        let _ = rustix::pipe::fcntl_setpipe_size(&fd, PIPE_SIZE);
        Ok(Output::Stdout(File::from(fd)))
    }

    /// A temporary file beside `dest`.
    pub fn file(dest: &Path) -> Result<Output, EncodeError> {
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
        Ok(Output::Temp {
            tmp,
            dest: dest.to_path_buf(),
        })
    }

    /// The name for messages.
    pub fn name(&self) -> String {
        match self {
            Output::Stdout(_) => "<stdout>".into(),
            Output::Temp { dest, .. } => dest.display().to_string(),
        }
    }

    /// The file to write to.
    pub fn file_handle(&self) -> &File {
        match self {
            Output::Stdout(f) => f,
            Output::Temp { tmp, .. } => tmp.as_file(),
        }
    }

    /// Makes the output final: for a file, fsync, rename over the archive
    /// name, fsync the directory.
    pub fn commit(self) -> Result<(), EncodeError> {
        match self {
            Output::Stdout(_) => Ok(()),
            Output::Temp { tmp, dest } => {
                let shown = dest.display().to_string();
                tmp.as_file()
                    .sync_all()
                    .map_err(|e| EncodeError::io(&format!("{shown}: fsync failed"), &e))?;
                tmp.persist(&dest)
                    .map_err(|e| EncodeError::io(&format!("{shown}: rename failed"), &e.error))?;
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
