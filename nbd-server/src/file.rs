//! [`FileBackend`]: a raw image file or block device as an export.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

use holes::HoleFinder;
use rustix::fs::{fallocate, FallocateFlags};
use std::io::IoSliceMut;

use rustix::io::{preadv, Errno};

use crate::backend::{Backend, Extent, ZeroFlags};

/// Zero bytes written when `fallocate` cannot zero a range.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// Most extents one [`FileBackend::block_status`] call reports; the client
/// asks again for the rest of its range.
const MAX_EXTENTS: usize = 1024;

/// Serves a raw image file or a block device.
///
/// - Reads and writes use `pread`/`pwrite`, so connections share the file
///   without a lock; FUA and flush use `fdatasync`.
/// - Trim punches a hole (`fallocate(PUNCH_HOLE | KEEP_SIZE)`); where the file
///   system or device cannot, trim is a successful no-op (it is only a hint).
/// - Write-zeroes punches a hole when the client allows it, else uses
///   `fallocate(ZERO_RANGE | KEEP_SIZE)`; where neither works it writes zero
///   bytes, or, for a fast-zero request, fails with `Unsupported` at once.
/// - Block status comes from `SEEK_DATA`/`SEEK_HOLE`; where those are not
///   supported (e.g. some block devices) everything is reported allocated.
///
/// The size is taken once, at construction (from the metadata of a regular
/// file, by seeking to the end of anything else) and never changes; growing
/// the file behind the server's back does not grow the export. Because the
/// page cache of one file is shared, [`can_multi_conn`](Backend::can_multi_conn)
/// is `true`.
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    size: u64,
    read_only: bool,
    regular: bool,
}

impl FileBackend {
    /// Opens `path` read-write, or read-only when `read_only` is set (the
    /// export is then read-only too).
    ///
    /// # Errors
    /// Whatever opening the file or finding its size fails with.
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        Self::from_file(file, read_only)
    }

    /// Serves an already open file. With `read_only` false the file must have
    /// been opened for writing (else writes fail with `EBADF`, sent as `EIO`).
    ///
    /// # Errors
    /// Whatever reading its metadata or seeking to its end fails with.
    pub fn from_file(mut file: File, read_only: bool) -> io::Result<Self> {
        let meta = file.metadata()?;
        let regular = meta.file_type().is_file();
        let size = if regular {
            meta.len()
        } else if meta.file_type().is_block_device() || meta.file_type().is_char_device() {
            file.seek(SeekFrom::End(0))?
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or block device",
            ));
        };
        Ok(FileBackend {
            file,
            size,
            read_only,
            regular,
        })
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn write_zero_bytes(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        while offset < end {
            let n = (end - offset).min(ZEROS.len() as u64) as usize;
            self.file.write_all_at(&ZEROS[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<(), Errno> {
        fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        )
    }
}

/// `fallocate` errors meaning "this mode is not available here".
fn unsupported(e: Errno) -> bool {
    e == Errno::OPNOTSUPP || e == Errno::NOSYS || e == Errno::INVAL || e == Errno::NODEV
}

impl Backend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// One `preadv` in the common case; a short read is finished piece by
    /// piece (and fails at the end of the file, as `read_at` does).
    fn read_vectored_at(&self, bufs: &mut [&mut [u8]], offset: u64) -> io::Result<()> {
        const MOST: usize = 16;
        if bufs.len() > MOST {
            let (head, tail) = bufs.split_at_mut(MOST);
            self.read_vectored_at(head, offset)?;
            let done: u64 = head.iter().map(|b| b.len() as u64).sum();
            return self.read_vectored_at(tail, offset + done);
        }
        let count = bufs.len();
        let mut got = loop {
            let mut slices: [IoSliceMut<'_>; MOST] =
                std::array::from_fn(|_| IoSliceMut::new(&mut []));
            for (s, b) in slices.iter_mut().zip(bufs.iter_mut()) {
                *s = IoSliceMut::new(b);
            }
            match preadv(&self.file, &mut slices[..count], offset) {
                Ok(n) => break n,
                Err(Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        };
        let mut at = offset;
        for b in bufs.iter_mut() {
            let len = b.len();
            if got < len {
                self.file.read_exact_at(&mut b[got..], at + got as u64)?;
            }
            got = got.saturating_sub(len);
            at += len as u64;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.file.write_all_at(buf, offset)?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.punch_hole(offset, len) {
            Ok(()) => Ok(()),
            Err(e) if unsupported(e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        if flags.may_punch_hole {
            match self.punch_hole(offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if unsupported(e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        match fallocate(
            &self.file,
            FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => return Ok(()),
            Err(e) if unsupported(e) => {}
            Err(e) => return Err(e.into()),
        }
        if flags.fast_only {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "fast zeroing is not supported here",
            ));
        }
        self.write_zero_bytes(offset, len)
    }

    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let end = offset.saturating_add(len).min(self.size);
        let mut extents = Vec::new();
        if !self.regular {
            extents.push(Extent::data(end.saturating_sub(offset)));
            return Ok(extents);
        }
        // One finder per call: writes may change the file between calls.
        let mut holes = HoleFinder::new(&self.file, self.size);
        let mut pos = offset;
        while pos < end && extents.len() < MAX_EXTENTS {
            let Ok(span) = holes.span_at(pos) else {
                extents.push(Extent::data(end - pos));
                break;
            };
            let span_end = span.end.min(end);
            extents.push(if span.data {
                Extent::data(span_end - pos)
            } else {
                Extent::hole(span_end - pos)
            });
            pos = span_end;
        }
        Ok(extents)
    }

    fn can_multi_conn(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn backend_with(data: &[u8], total: u64) -> (tempfile::NamedTempFile, FileBackend) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(data).unwrap();
        f.as_file().set_len(total).unwrap();
        let b = FileBackend::open(f.path(), false).unwrap();
        (f, b)
    }

    #[test]
    fn size_read_write() {
        let (_f, b) = backend_with(b"hello", 8192);
        assert_eq!(b.size(), 8192);
        let mut buf = [0u8; 5];
        b.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"hello");
        b.write_at(b"XY", 1, true).unwrap();
        b.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"hXYlo");
        // Reads past the end are short and therefore errors.
        let mut big = [0u8; 16];
        assert!(b.read_at(&mut big, 8190).is_err());
    }

    #[test]
    fn zeroes_and_trim_read_back_zero() {
        let (_f, b) = backend_with(&[0xaau8; 3 * 65536], 3 * 65536);
        for flags in [
            ZeroFlags {
                may_punch_hole: true,
                fast_only: false,
            },
            ZeroFlags {
                may_punch_hole: false,
                fast_only: false,
            },
        ] {
            b.write_at(&[0xaa; 1000], 100, false).unwrap();
            b.write_zeroes(100, 1000, flags).unwrap();
            let mut buf = vec![1u8; 1200];
            b.read_at(&mut buf, 0).unwrap();
            assert!(buf[..100].iter().all(|&x| x == 0xaa));
            assert!(buf[100..1100].iter().all(|&x| x == 0));
            assert!(buf[1100..].iter().all(|&x| x == 0xaa));
        }
        b.trim(65536, 65536).unwrap();
        assert_eq!(b.size(), 3 * 65536);
    }

    #[test]
    fn block_status_sees_holes() {
        let size = 4 * 1024 * 1024;
        let (_f, b) = backend_with(&[], size);
        b.write_at(&[1u8; 65536], 1024 * 1024, false).unwrap();
        b.flush().unwrap();
        let ext = b.block_status(0, size).unwrap();
        let total: u64 = ext.iter().map(|e| e.len).sum();
        assert_eq!(total, size);
        // Whatever granularity the file system has, the written range is
        // reported as data and the start of the file as a hole.
        assert!(ext[0].hole && ext[0].zero);
        let mut pos = 0;
        for e in &ext {
            if (pos..pos + e.len).contains(&(1024 * 1024)) {
                assert!(!e.hole);
            }
            pos += e.len;
        }
        // A range wholly inside the hole is one hole extent.
        assert_eq!(
            b.block_status(3 * 1024 * 1024, 4096).unwrap(),
            vec![Extent::hole(4096)]
        );
    }
}
