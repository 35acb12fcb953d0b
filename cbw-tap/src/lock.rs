//! The image locks QEMU takes, taken on every served image, so that QEMU,
//! qemu-img, qemu-io, qemu-nbd — and a second `cbw-tap serve` — refuse to
//! write an image behind copy-before-write's back.
//!
//! QEMU's file driver (`block/file-posix.c`) expresses block-layer
//! permissions as shared open-file-description locks (`F_OFD_SETLK`,
//! `F_RDLCK`) on single bytes of the image: byte `100 + p` while it *holds*
//! permission `p`, byte `200 + p` while it does *not share* `p` with other
//! users. Before using an image it tests (`F_OFD_GETLK` with `F_WRLCK`)
//! that no other open file description locks byte `200 + p` for each `p`
//! it wants, nor byte `100 + p` for each `p` it does not share. The
//! permission bits are consistent read (0), write (1), write unchanged (2)
//! and resize (3). The locks belong to the open file description, so they
//! go away with the file — also when the process is killed.
//!
//! `cbw-tap serve` takes what a VM's writable disk takes: it holds
//! consistent read and write, shares consistent read and write unchanged,
//! and shares neither write nor resize. So a VM or qemu-io opening the
//! image for writing fails with QEMU's `Failed to get "write" lock`, and
//! read-only users (`qemu-img info`, `qemu-img convert`) with `Failed to
//! get shared "write" lock` unless they pass `-U` (force share), exactly as
//! with an image a running VM uses.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// First lock byte of held permissions.
const PERM_BASE: i64 = 100;
/// First lock byte of permissions not shared.
const SHARED_BASE: i64 = 200;

const CONSISTENT_READ: u32 = 0;
const WRITE: u32 = 1;
const RESIZE: u32 = 3;

/// QEMU's name of permission bit `p` (as in its error messages).
fn perm_name(p: u32) -> &'static str {
    match p {
        0 => "consistent read",
        1 => "write",
        2 => "write unchanged",
        _ => "resize",
    }
}

/// Why an image cannot be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process uses the image in a way that conflicts with serving
    /// it for writing.
    #[error(
        "the image is in use: another process holds QEMU's {0} lock on it (a VM, qemu-nbd, qemu-io, qemu-img or another cbw-tap serve); stop it before serving the image"
    )]
    InUse(String),
    /// The file system or kernel cannot lock (e.g. NFS without a lock
    /// manager).
    #[error("cannot take QEMU's image locks: {0}")]
    Io(io::Error),
}

/// A one-byte lock request of `kind` (`F_RDLCK`, `F_WRLCK`) on byte `start`.
///
/// rustix's `fcntl_lock` locks whole files only; QEMU's protocol needs
/// single bytes, so the request is built and passed by hand.
#[allow(unsafe_code)]
fn flock(kind: i32, start: i64) -> libc::flock {
    // SAFETY: flock is plain data (integers only); all-zero is a valid
    // value, and it also zeroes any platform-specific padding fields.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as _;
    fl.l_whence = libc::SEEK_SET as _;
    fl.l_start = start;
    fl.l_len = 1;
    fl
}

/// `fcntl(file, cmd, fl)` for a lock command (`F_OFD_SETLK`, `F_OFD_GETLK`),
/// retried on `EINTR`; the kernel may write its answer into `fl`.
#[allow(unsafe_code)]
fn fcntl_lock(file: &File, cmd: i32, fl: &mut libc::flock) -> io::Result<()> {
    loop {
        // SAFETY: the descriptor is open for the life of `file`, and `fl`
        // points to a valid flock for the kernel to read and write.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), cmd, fl as *mut libc::flock) };
        if r != -1 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Takes a shared lock on byte `start` for this open file description.
fn lock_byte(file: &File, start: i64) -> io::Result<()> {
    fcntl_lock(file, libc::F_OFD_SETLK, &mut flock(libc::F_RDLCK, start))
}

/// Whether another open file description holds any lock on byte `start`.
fn byte_locked_by_others(file: &File, start: i64) -> io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK, start);
    fcntl_lock(file, libc::F_OFD_GETLK, &mut fl)?;
    Ok(i32::from(fl.l_type) != libc::F_UNLCK)
}

fn conflict(e: io::Error, what: String) -> LockError {
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => LockError::InUse(what),
        _ => LockError::Io(e),
    }
}

/// Locks `file` (an image about to be served read-write) the way a QEMU
/// that writes it does, then checks that nobody else conflicts — QEMU's
/// order, so two processes starting at once cannot both succeed. The
/// locks last as long as the file is open.
///
/// # Errors
/// [`LockError::InUse`] naming the first conflicting lock, as QEMU names
/// it: `"write"` when another process writes the image or does not let
/// others write it, `shared "…"` when it holds a permission we do not
/// share; [`LockError::Io`] if the kernel or file system cannot lock.
pub fn lock_for_writing(file: &File) -> Result<(), LockError> {
    let held = [CONSISTENT_READ, WRITE];
    let unshared = [WRITE, RESIZE];
    for p in held {
        lock_byte(file, PERM_BASE + i64::from(p))
            .map_err(|e| conflict(e, format!("\"{}\"", perm_name(p))))?;
    }
    for p in unshared {
        lock_byte(file, SHARED_BASE + i64::from(p))
            .map_err(|e| conflict(e, format!("shared \"{}\"", perm_name(p))))?;
    }
    for p in held {
        // Someone who does not share what we need.
        if byte_locked_by_others(file, SHARED_BASE + i64::from(p)).map_err(LockError::Io)? {
            return Err(LockError::InUse(format!("\"{}\"", perm_name(p))));
        }
    }
    for p in unshared {
        // Someone who holds what we do not share.
        if byte_locked_by_others(file, PERM_BASE + i64::from(p)).map_err(LockError::Io)? {
            return Err(LockError::InUse(format!("\"{}\"", perm_name(p))));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    #[test]
    fn a_second_open_file_description_is_refused_and_the_first_close_frees_it() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let open = || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(f.path())
                .unwrap()
        };
        let first = open();
        lock_for_writing(&first).unwrap();
        // Locking twice through the same description is fine.
        lock_for_writing(&first).unwrap();
        let second = open();
        let err = lock_for_writing(&second).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the image is in use: another process holds QEMU's \"write\" lock on it (a VM, qemu-nbd, qemu-io, qemu-img or another cbw-tap serve); stop it before serving the image"
        );
        drop(second);
        drop(first);
        lock_for_writing(&open()).unwrap();
    }
}
