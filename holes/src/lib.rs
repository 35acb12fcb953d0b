//! Data and holes of a sparse file, found with `SEEK_DATA` / `SEEK_HOLE`.
//!
//! The one hole finder of vma-tools: `vma-encode` skips the holes of raw
//! images without reading them, and the NBD server's file backend answers
//! block-status queries (which cbw-tap's copier also asks) from it.
//!
//! A [`HoleFinder`] remembers the span it found last and where the data after
//! a hole starts, so walking a file span by span costs one `lseek` per
//! boundary instead of two per question: asking again inside a known span
//! costs none, and the data that ends a hole is known without asking again.
//!
//! What the file system cannot tell is data: a block device, or a file
//! system without `SEEK_DATA` (`EINVAL`, `EOPNOTSUPP`), is one data span.

use std::io;
use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd};

use rustix::fs::{seek, SeekFrom};
use rustix::io::Errno;

/// What lies at a position: data or a hole, up to `end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// Whether it is data (else a hole, which reads as zeros).
    pub data: bool,
    /// Where it ends (exclusive): where the other kind, or the end, starts.
    pub end: u64,
}

/// Finds the data and the holes of one file of `len` bytes (see the crate
/// documentation). The file must not change under it: a span it found is
/// remembered, so make a new finder after writing to the file.
#[derive(Debug)]
pub struct HoleFinder<'a> {
    fd: Option<BorrowedFd<'a>>,
    len: u64,
    /// The span found last, with its start.
    known: Option<(bool, Range<u64>)>,
    /// Where data was seen to start (the end of the hole found last).
    data_at: Option<u64>,
}

impl<'a> HoleFinder<'a> {
    /// A finder over the first `len` bytes of `file`, a regular file.
    pub fn new(file: &'a impl AsFd, len: u64) -> HoleFinder<'a> {
        HoleFinder {
            fd: Some(file.as_fd()),
            len,
            known: None,
            data_at: None,
        }
    }

    /// A finder that knows no holes: `len` bytes of data (a block device).
    pub fn all_data(len: u64) -> HoleFinder<'a> {
        HoleFinder {
            fd: None,
            len,
            known: Some((true, 0..len)),
            data_at: None,
        }
    }

    /// The length it covers.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether that length is 0.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// What lies at `pos` (below [`len`](Self::len); at or past it: a hole
    /// ending there), and up to where. Errors are those of `lseek` but
    /// `ENXIO` (no data after `pos`: a hole to the end) and `EINVAL` /
    /// `EOPNOTSUPP` from `SEEK_DATA` (no hole support: data to the end).
    pub fn span_at(&mut self, pos: u64) -> io::Result<Span> {
        if pos >= self.len {
            return Ok(Span {
                data: false,
                end: pos,
            });
        }
        if let Some((data, range)) = &self.known {
            if range.contains(&pos) {
                return Ok(Span {
                    data: *data,
                    end: range.end,
                });
            }
        }
        let Some(fd) = self.fd else {
            return Ok(self.remember(true, pos..self.len));
        };
        let data = if self.data_at == Some(pos) {
            pos
        } else {
            match seek(fd, SeekFrom::Data(pos)) {
                Ok(d) => d,
                Err(Errno::NXIO) => return Ok(self.remember(false, pos..self.len)),
                Err(Errno::INVAL) | Err(Errno::OPNOTSUPP) => {
                    return Ok(self.remember(true, pos..self.len))
                }
                Err(e) => return Err(e.into()),
            }
        };
        if data > pos {
            let end = data.min(self.len);
            self.data_at = Some(data);
            return Ok(self.remember(false, pos..end));
        }
        let hole = match seek(fd, SeekFrom::Hole(pos)) {
            Ok(h) => h,
            // The file shrank since: no data here after all.
            Err(Errno::NXIO) => return Ok(self.remember(false, pos..self.len)),
            Err(e) => return Err(e.into()),
        };
        // SEEK_HOLE finds the implicit hole at the end of the file, so
        // hole > pos; guard anyway against a lying file system.
        Ok(self.remember(true, pos..hole.clamp(pos + 1, self.len)))
    }

    /// The next range of data at or after `pos`, or `None` if only holes
    /// follow (up to [`len`](Self::len)).
    pub fn next_data(&mut self, mut pos: u64) -> io::Result<Option<Range<u64>>> {
        while pos < self.len {
            let span = self.span_at(pos)?;
            if span.data {
                return Ok(Some(pos..span.end));
            }
            pos = span.end;
        }
        Ok(None)
    }

    fn remember(&mut self, data: bool, range: Range<u64>) -> Span {
        let end = range.end;
        self.known = Some((data, range));
        Span { data, end }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    const MIB: u64 = 1 << 20;

    #[test]
    fn walks_data_and_holes() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(8 * MIB).unwrap();
        f.write_at(&[1u8; 65536], 2 * MIB).unwrap();
        f.write_at(&[2u8; 65536], 5 * MIB).unwrap();
        f.sync_all().unwrap();
        let mut h = HoleFinder::new(&f, 8 * MIB);
        let mut pos = 0;
        let mut spans = Vec::new();
        while pos < h.len() {
            let s = h.span_at(pos).unwrap();
            assert!(s.end > pos);
            spans.push((pos, s));
            pos = s.end;
        }
        // Whatever the file system's granularity, the written ranges are
        // data, the start and the end holes (where holes are supported).
        let kind_at = |x: u64| {
            spans
                .iter()
                .find(|(p, s)| (*p..s.end).contains(&x))
                .unwrap()
                .1
                .data
        };
        assert!(kind_at(2 * MIB) && kind_at(5 * MIB + 65535));
        if !spans[0].1.data {
            assert!(!kind_at(0) && !kind_at(8 * MIB - 1) && !kind_at(4 * MIB));
            let d = h.next_data(0).unwrap().unwrap();
            assert!(d.contains(&(2 * MIB)) && d.start <= 2 * MIB);
            // Asking inside the span just found again costs nothing and
            // answers the same.
            assert_eq!(h.span_at(d.start + 1).unwrap().end, d.end);
            assert_eq!(h.next_data(6 * MIB).unwrap(), None);
        }
        assert_eq!(
            h.span_at(9 * MIB).unwrap(),
            Span {
                data: false,
                end: 9 * MIB
            }
        );
    }

    #[test]
    fn all_data_knows_no_holes() {
        let mut h = HoleFinder::all_data(100);
        assert_eq!(h.next_data(7).unwrap(), Some(7..100));
        assert_eq!(h.next_data(100).unwrap(), None);
    }
}
