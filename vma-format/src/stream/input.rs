//! [`Input`]: what the stream reader reads from, buffered only where that
//! saves system calls — a record body goes from the input straight into
//! its destination (the writer's extent buffer, for `vma-encode -`).
//!
//! A `BufReader` would read the stream through its buffer and copy every
//! body out of it. Here a body is read with one `read_vectored` into the
//! body's own place and a small read-ahead buffer behind it, which gets
//! the record's checksum and, usually, the next record's header: one
//! system call per large record, no copy. After a small record (an empty
//! cluster of a sparse disk, a few blocks) the read-ahead takes up to
//! [`AHEAD`] bytes, so runs of small records cost few calls; what it holds
//! of a following large body is copied once.

use std::io::{self, IoSliceMut, Read};

use super::RECORD_HEADER_SIZE;

/// Read-ahead buffer size: the most read beyond what was asked for.
pub(super) const AHEAD: usize = 16 * 1024;

/// Read ahead after a large body: its checksum and the next header.
pub(super) const AHEAD_AFTER_LARGE: usize = 4 + RECORD_HEADER_SIZE;

/// A body of at least this many bytes is followed by only
/// [`AHEAD_AFTER_LARGE`] bytes of read-ahead.
pub(super) const LARGE_BODY: usize = 16 * 1024;

/// `R` with a small read-ahead buffer.
pub(super) struct Input<R> {
    inner: R,
    ahead: Box<[u8]>,
    /// `ahead[start..end]` is read and not yet consumed.
    start: usize,
    end: usize,
}

impl<R: Read> Input<R> {
    pub(super) fn new(inner: R) -> Input<R> {
        Input {
            inner,
            ahead: vec![0u8; AHEAD].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// Fills `dst` (from the read-ahead first, then straight from the
    /// input) and goes on until at least `need` bytes are read ahead,
    /// reading up to `room` bytes ahead in the same calls. Returns how much
    /// of `dst` was filled: less only where the input ends (the read-ahead
    /// then holds what came after, maybe less than `need`).
    pub(super) fn fill(&mut self, dst: &mut [u8], need: usize, room: usize) -> io::Result<usize> {
        let mut filled = (self.end - self.start).min(dst.len());
        dst[..filled].copy_from_slice(&self.ahead[self.start..self.start + filled]);
        self.start += filled;
        if filled == dst.len() && self.end - self.start >= need {
            return Ok(filled);
        }
        // What is left ahead (fewer than `need` bytes) moves to the front.
        self.ahead.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        let room = room.clamp(need, self.ahead.len());
        while filled < dst.len() || self.end < need {
            let mut bufs = [
                IoSliceMut::new(&mut dst[filled..]),
                IoSliceMut::new(&mut self.ahead[self.end..room]),
            ];
            match self.inner.read_vectored(&mut bufs) {
                Ok(0) => break,
                Ok(n) => {
                    let direct = n.min(dst.len() - filled);
                    filled += direct;
                    self.end += n - direct;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(filled)
    }

    /// The input (what was read ahead is lost).
    pub(super) fn into_inner(self) -> R {
        self.inner
    }
}

/// For the preamble: reads fill the read-ahead as far as one call goes.
impl<R: Read> Read for Input<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            loop {
                match self.inner.read(&mut self.ahead) {
                    Ok(n) => {
                        self.end = n;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let n = (self.end - self.start).min(buf.len());
        buf[..n].copy_from_slice(&self.ahead[self.start..self.start + n]);
        self.start += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that returns at most `step` bytes a call and counts calls.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
        calls: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.read_vectored(&mut [IoSliceMut::new(buf)])
        }

        fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
            self.calls += 1;
            let mut total = 0;
            for buf in bufs {
                let n = buf.len().min(self.step - total).min(self.data.len());
                buf[..n].copy_from_slice(&self.data[..n]);
                self.data = &self.data[n..];
                total += n;
            }
            Ok(total)
        }
    }

    #[test]
    fn fill_reads_exactly_and_keeps_what_follows() {
        let data: Vec<u8> = (0..200u8).collect();
        for step in [1, 3, 7, 64, 1000] {
            let mut input = Input::new(Trickle {
                data: &data,
                step,
                calls: 0,
            });
            let mut a = [0u8; 10];
            assert_eq!(input.fill(&mut a, 4, 4).unwrap(), 10);
            assert_eq!(a[..], data[..10]);
            let mut b = [0u8; 4];
            assert_eq!(input.fill(&mut b, 0, 0).unwrap(), 4);
            assert_eq!(b[..], data[10..14]);
            let mut c = vec![0u8; 100];
            assert_eq!(input.fill(&mut c, 0, AHEAD).unwrap(), 100);
            assert_eq!(c[..], data[14..114]);
            let mut rest = vec![0u8; 100];
            assert_eq!(input.fill(&mut rest, 8, AHEAD).unwrap(), 86, "step {step}");
            assert_eq!(rest[..86], data[114..]);
            assert_eq!(input.fill(&mut rest, 0, 0).unwrap(), 0);
        }
    }

    #[test]
    fn a_large_body_is_read_in_one_call_with_only_what_follows_it_ahead() {
        let data = vec![7u8; 3 * LARGE_BODY];
        let mut input = Input::new(Trickle {
            data: &data,
            step: usize::MAX,
            calls: 0,
        });
        let mut body = vec![0u8; LARGE_BODY];
        assert_eq!(
            input
                .fill(&mut body, AHEAD_AFTER_LARGE, AHEAD_AFTER_LARGE)
                .unwrap(),
            LARGE_BODY
        );
        assert_eq!(input.inner.calls, 1);
        assert_eq!((input.start, input.end), (0, AHEAD_AFTER_LARGE));
    }
}
