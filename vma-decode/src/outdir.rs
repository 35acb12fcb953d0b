//! The output directory of an extract, and the files staged in it.
//!
//! Every file is created and renamed relative to one descriptor of the
//! directory, opened once (`openat`, `renameat`, `unlinkat`), so no path is
//! resolved twice and nothing that appears in the directory meanwhile can
//! redirect a write:
//!
//! * new files are created with `O_CREAT | O_EXCL | O_NOFOLLOW`: a symlink
//!   (or anything else) already there under a temporary name is an error,
//!   never followed — with `--force` too;
//! * files are written under temporary names and renamed to their final
//!   names only once every file is complete ([`Staging::place`]); a rename
//!   replaces a final name (a symlink there is replaced, not followed) only
//!   with `--force`, and never a directory;
//! * on any failure every temporary file is removed, and every final name
//!   this extract had already placed — on SIGINT, SIGTERM and SIGHUP too
//!   (each file is registered with [`vma_cli::signals`] while it is not yet
//!   kept, and the renames of [`Staging::place`] run as one critical
//!   section, so a signal never leaves some final names placed and others not).
//!
//! Temporary names are Proxmox's (`tmp-` in front of the final name) when
//! that fits in a file name (255 bytes); otherwise a short one
//! (`tmp-dev<ID>.raw`, `tmp-config<SLOT>`) that always fits, so any final
//! name that fits can be extracted.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags};
use vma_cli::signals::{self, remove_on_signal_at, Registration};
use vma_cli::{exit, Failure};

/// Longest file name (Linux's NAME_MAX).
pub const NAME_MAX: usize = 255;

/// The temporary name for `final_name`: `tmp-` in front of it if that fits
/// in [`NAME_MAX`], else `fallback` (which must be short).
pub fn temp_name(final_name: &str, fallback: impl FnOnce() -> String) -> String {
    if final_name.len() + 4 <= NAME_MAX {
        format!("tmp-{final_name}")
    } else {
        fallback()
    }
}

/// An output directory, held open.
pub struct OutputDir {
    // Shared with the signal registrations of the files staged in it.
    fd: Arc<OwnedFd>,
    path: PathBuf,
}

impl OutputDir {
    /// Opens `dir`, creating it (and its parents) if missing. An existing
    /// directory must be empty unless `force`. `-` is refused: it is not a
    /// directory but, elsewhere, standard output.
    pub fn prepare(dir: &Path, force: bool) -> Result<OutputDir, Failure> {
        let name = dir.display().to_string();
        OutputDir::check_arg(dir)?;
        let open = || {
            rustix::fs::open(
                dir,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
        };
        let fd = match open() {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => {
                std::fs::create_dir_all(dir).map_err(|e| Failure::io(&name, &e))?;
                open().map_err(|e| Failure::io(&name, &e.into()))?
            }
            Err(e) => return Err(Failure::io(&name, &e.into())),
        };
        let out = OutputDir {
            fd: Arc::new(fd),
            path: dir.to_path_buf(),
        };
        if !force && !out.is_empty().map_err(|e| Failure::io(&name, &e))? {
            return Err(Failure::new(
                exit::USAGE,
                format!("{name}: directory exists and is not empty (use --force to write into it)"),
            ));
        }
        Ok(out)
    }

    /// Refuses `-` as an output directory (a usage error): extract writes
    /// files into a directory, and `-` elsewhere means standard output.
    pub fn check_arg(dir: &Path) -> Result<(), Failure> {
        if dir.as_os_str() == "-" {
            return Err(Failure::new(
                exit::USAGE,
                "-: not an output directory (extract writes files into a directory; \
                 to write one disk to standard output use --stdout DEVNAME)",
            ));
        }
        Ok(())
    }

    /// The directory as given.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `DIR/NAME`, for messages.
    pub fn show(&self, name: &str) -> String {
        self.path.join(name).display().to_string()
    }

    fn is_empty(&self) -> io::Result<bool> {
        let dir = rustix::fs::Dir::read_from(&self.fd)?;
        for entry in dir {
            let entry = entry?;
            let n = entry.file_name().to_bytes();
            if n != b"." && n != b".." {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Creates `name`, which must not exist in any form (a symlink there is
    /// an error, not followed), for reading and writing.
    pub fn create_new(&self, name: &str) -> io::Result<File> {
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o666),
        )?;
        Ok(File::from(fd))
    }

    /// What `name` is, without following a symlink; `None` if absent.
    pub fn kind_of(&self, name: &str) -> io::Result<Option<FileType>> {
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(FileType::from_raw_mode(st.st_mode))),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Renames `from` to `to` inside the directory; `to` is replaced only
    /// if `replace`.
    pub fn rename(&self, from: &str, to: &str, replace: bool) -> io::Result<()> {
        let flags = if replace {
            RenameFlags::empty()
        } else {
            RenameFlags::NOREPLACE
        };
        rustix::fs::renameat_with(&self.fd, from, &self.fd, to, flags)?;
        Ok(())
    }

    /// Removes the file `name` (a symlink itself, not what it points to).
    pub fn remove(&self, name: &str) -> io::Result<()> {
        rustix::fs::unlinkat(&self.fd, name, AtFlags::empty())?;
        Ok(())
    }

    /// Makes the directory's entries durable.
    pub fn sync(&self) -> io::Result<()> {
        rustix::fs::fsync(&self.fd)?;
        Ok(())
    }
}

/// One file under its temporary name.
struct Staged {
    tmp: String,
    name: String,
    // Removes `tmp` on a signal.
    _signal: Registration,
}

/// A final name placed by this extract, not yet kept.
struct Placed {
    name: String,
    // Removes `name` on a signal until the extract is finished.
    _signal: Registration,
}

/// Files written under temporary names, placed under their final names
/// together. Dropped before [`finish`](Staging::finish), it removes every
/// temporary file and every final name it placed.
pub struct Staging<'d> {
    dir: &'d OutputDir,
    replace: bool,
    pending: Vec<Staged>,
    placed: Vec<Placed>,
}

impl<'d> Staging<'d> {
    /// Stages files in `dir`; final names are replaced only if `replace`
    /// (`--force`).
    pub fn new(dir: &'d OutputDir, replace: bool) -> Staging<'d> {
        Staging {
            dir,
            replace,
            pending: Vec::new(),
            placed: Vec::new(),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &'d OutputDir {
        self.dir
    }

    /// Creates `tmp` (see [`OutputDir::create_new`]) to become `name`.
    pub fn create(&mut self, tmp: &str, name: &str) -> Result<File, Failure> {
        let f = self
            .dir
            .create_new(tmp)
            .map_err(|e| Failure::io(&self.dir.show(tmp), &e))?;
        self.pending.push(Staged {
            tmp: tmp.to_string(),
            name: name.to_string(),
            _signal: remove_on_signal_at(self.dir.fd.clone(), tmp),
        });
        Ok(f)
    }

    /// Writes `data` to a new file `tmp`, fsynced, to become `name`.
    pub fn write(&mut self, tmp: &str, name: &str, data: &[u8]) -> Result<(), Failure> {
        use std::io::Write;
        let mut f = self.create(tmp, name)?;
        f.write_all(data)
            .and_then(|()| f.sync_all())
            .map_err(|e| Failure::io(&self.dir.show(tmp), &e))
    }

    /// Renames every file staged so far to its final name. First checks
    /// them all (a final name must not be a directory, nor exist at all
    /// unless replacing), so that a foreseeable problem places nothing.
    pub fn place(&mut self) -> Result<(), Failure> {
        for s in &self.pending {
            let kind = self
                .dir
                .kind_of(&s.name)
                .map_err(|e| Failure::io(&self.dir.show(&s.name), &e))?;
            let problem = match kind {
                None => None,
                Some(FileType::Directory) => Some("is a directory"),
                Some(_) if !self.replace => Some("already exists"),
                Some(_) => None,
            };
            if let Some(problem) = problem {
                return Err(Failure::new(
                    exit::IO,
                    format!("{}: {problem}", self.dir.show(&s.name)),
                ));
            }
        }
        // A signal is acted on after the renames, against the final names.
        let _critical = signals::critical();
        while !self.pending.is_empty() {
            let s = &self.pending[0];
            self.dir
                .rename(&s.tmp, &s.name, self.replace)
                .map_err(|e| Failure::io(&self.dir.show(&s.name), &e))?;
            let s = self.pending.remove(0);
            self.placed.push(Placed {
                _signal: remove_on_signal_at(self.dir.fd.clone(), s.name.as_str()),
                name: s.name,
            });
        }
        self.dir
            .sync()
            .map_err(|e| Failure::io(&self.dir.path().display().to_string(), &e))
    }

    /// Everything is in place: keep it. Returns the final names placed.
    pub fn finish(mut self) -> Vec<PathBuf> {
        let placed = std::mem::take(&mut self.placed);
        placed
            .into_iter()
            .map(|p| self.dir.path().join(p.name))
            .collect()
    }
}

impl Drop for Staging<'_> {
    fn drop(&mut self) {
        for s in &self.pending {
            let _ = self.dir.remove(&s.tmp);
        }
        for p in &self.placed {
            let _ = self.dir.remove(&p.name);
        }
    }
}
