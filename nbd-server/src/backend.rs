//! The [`Backend`] trait: what an export is, as far as the server cares.

use std::io;

/// One run of bytes with the same allocation status, as reported by
/// [`Backend::block_status`] for the `base:allocation` metadata context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes. Zero-length extents are ignored by the server.
    pub len: u64,
    /// The range is not allocated in the backing storage (`NBD_STATE_HOLE`);
    /// writing to it may need new space.
    pub hole: bool,
    /// The range is known to read as zeroes (`NBD_STATE_ZERO`). `false` means
    /// "unknown", never "non-zero".
    pub zero: bool,
}

impl Extent {
    /// An allocated extent whose contents are unknown (status 0); always a
    /// safe answer.
    pub fn data(len: u64) -> Self {
        Extent {
            len,
            hole: false,
            zero: false,
        }
    }

    /// An unallocated extent that reads as zeroes (`HOLE | ZERO`).
    pub fn hole(len: u64) -> Self {
        Extent {
            len,
            hole: true,
            zero: true,
        }
    }

    /// The `base:allocation` status flags of this extent.
    pub(crate) fn nbd_flags(&self) -> u32 {
        let mut flags = 0;
        if self.hole {
            flags |= crate::proto::STATE_HOLE;
        }
        if self.zero {
            flags |= crate::proto::STATE_ZERO;
        }
        flags
    }
}

/// How a [`Backend::write_zeroes`] request may be carried out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The client allows the range to be deallocated (no `NBD_CMD_FLAG_NO_HOLE`).
    /// When `false` the range must stay (or become) allocated.
    pub may_punch_hole: bool,
    /// The client asked for a fast zero (`NBD_CMD_FLAG_FAST_ZERO`): if zeroing
    /// would be no faster than writing zero bytes, the backend must fail at
    /// once, before changing anything, with an error of kind
    /// [`io::ErrorKind::Unsupported`] (or raw `ENOTSUP`/`EOPNOTSUPP`), which
    /// the server sends as `NBD_ENOTSUP`.
    pub fast_only: bool,
}

/// A block device as served by the NBD server: a fixed-size range of bytes.
///
/// The server validates every request before calling the backend: offsets
/// and lengths are within `0..size()`, lengths are non-zero, read and write
/// buffers are at most [`crate::MAX_PAYLOAD`] bytes, and writing calls
/// (`write_at`, `trim`, `write_zeroes`) are never made when
/// [`read_only`](Backend::read_only) is `true`. Trims, write-zeroes, cache and
/// block-status ranges are not limited to `MAX_PAYLOAD` (up to 4 GiB - 1).
///
/// One connection calls its backend sequentially, in request order; several
/// connections to the same export call it concurrently from different
/// threads, hence `Send + Sync`.
///
/// Errors are returned as [`io::Error`] and sent to the client as NBD error
/// codes: raw OS errors `EPERM`/`EACCES`/`EROFS` become `NBD_EPERM`,
/// `ENOSPC`/`EDQUOT`/`EFBIG` become `NBD_ENOSPC`, `EINVAL` `NBD_EINVAL`,
/// `ENOMEM` `NBD_ENOMEM`, `EOVERFLOW` `NBD_EOVERFLOW`, `ESHUTDOWN`
/// `NBD_ESHUTDOWN`, `ENOTSUP` `NBD_ENOTSUP` (only for fast zero; elsewhere
/// `NBD_EIO`); errors without an OS code map by kind (`PermissionDenied`,
/// `InvalidInput`, `OutOfMemory`, `Unsupported`); everything else is
/// `NBD_EIO`. The error's text is sent along as the human-readable message
/// when structured replies are in use. An error never ends the connection.
pub trait Backend: Send + Sync {
    /// Size of the export in bytes. Must not change while the export is served.
    fn size(&self) -> u64;

    /// `true` if the export must not be written: the server then advertises
    /// `NBD_FLAG_READ_ONLY` and answers writes, trims and write-zeroes with
    /// `NBD_EPERM` without calling the backend.
    fn read_only(&self) -> bool {
        false
    }

    /// Fill `buf` with the bytes at `offset..offset + buf.len()`. The whole
    /// buffer must be filled; a short read is an error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Fill `bufs`, one after the other, with the bytes from `offset` on
    /// (a scatter read: the bytes of one range into several buffers), all
    /// of them or an error. Default: one [`read_at`](Backend::read_at) per
    /// buffer; [`FileBackend`](crate::FileBackend) makes it one `preadv`.
    fn read_vectored_at(&self, bufs: &mut [&mut [u8]], offset: u64) -> io::Result<()> {
        let mut at = offset;
        for b in bufs.iter_mut() {
            self.read_at(b, at)?;
            at += b.len() as u64;
        }
        Ok(())
    }

    /// Write all of `buf` at `offset`. With `fua` (force unit access) the data
    /// must be on stable storage before returning.
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()>;

    /// Make every write that has completed so far durable.
    fn flush(&self) -> io::Result<()>;

    /// The client no longer needs `offset..offset + len`. May be a no-op; after
    /// it the range's contents are unspecified until rewritten. When the
    /// client asked for FUA the server calls [`flush`](Backend::flush) after.
    fn trim(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Make `offset..offset + len` read as zeroes (see [`ZeroFlags`]). When the
    /// client asked for FUA the server calls [`flush`](Backend::flush) after.
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()>;

    /// Allocation status of `offset..offset + len`, as consecutive extents
    /// starting at `offset`. The list may cover less than `len` (the client
    /// asks again for the rest) or more (the server clips it); an empty list is
    /// answered as one extent of status 0 ("allocated, contents unknown").
    /// Keep the list short: the server sends at most 65536 extents per reply.
    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>>;

    /// Hint that `offset..offset + len` will be read soon. Default: no-op.
    fn cache(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    /// `true` if several connections may be used at once with consistent
    /// results: a flush or FUA on one connection makes its effects visible
    /// and durable for all. Only then the server advertises
    /// `NBD_FLAG_CAN_MULTI_CONN`. Default `false`.
    fn can_multi_conn(&self) -> bool {
        false
    }
}

/// Maps a backend error to an NBD error value. `fast_zero` tells whether
/// `NBD_ENOTSUP` is allowed (only as the answer to a fast-zero request).
pub(crate) fn nbd_errno(err: &io::Error, fast_zero: bool) -> u32 {
    use crate::proto::*;
    let code = match err.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => EPERM,
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => ENOSPC,
        Some(libc::EINVAL) => EINVAL,
        Some(libc::ENOMEM) => ENOMEM,
        Some(libc::EOVERFLOW) => EOVERFLOW,
        Some(libc::ESHUTDOWN) => ESHUTDOWN,
        Some(libc::ENOTSUP) => ENOTSUP,
        Some(_) => EIO,
        None => match err.kind() {
            io::ErrorKind::PermissionDenied => EPERM,
            io::ErrorKind::InvalidInput => EINVAL,
            io::ErrorKind::OutOfMemory => ENOMEM,
            io::ErrorKind::Unsupported => ENOTSUP,
            _ => EIO,
        },
    };
    if code == ENOTSUP && !fast_zero {
        EIO
    } else {
        code
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::*;

    #[test]
    fn errno_mapping() {
        let os = io::Error::from_raw_os_error;
        assert_eq!(nbd_errno(&os(libc::EROFS), false), EPERM);
        assert_eq!(nbd_errno(&os(libc::EDQUOT), false), ENOSPC);
        assert_eq!(nbd_errno(&os(libc::EFBIG), false), ENOSPC);
        assert_eq!(nbd_errno(&os(libc::EINVAL), false), EINVAL);
        assert_eq!(nbd_errno(&os(libc::EBADF), false), EIO);
        assert_eq!(nbd_errno(&os(libc::EOPNOTSUPP), true), ENOTSUP);
        assert_eq!(nbd_errno(&os(libc::EOPNOTSUPP), false), EIO);
        let unsup = io::Error::new(io::ErrorKind::Unsupported, "slow");
        assert_eq!(nbd_errno(&unsup, true), ENOTSUP);
        assert_eq!(nbd_errno(&unsup, false), EIO);
        let other = io::Error::other("x");
        assert_eq!(nbd_errno(&other, true), EIO);
    }

    #[test]
    fn extent_flags() {
        assert_eq!(Extent::data(1).nbd_flags(), 0);
        assert_eq!(Extent::hole(1).nbd_flags(), STATE_HOLE | STATE_ZERO);
    }
}
