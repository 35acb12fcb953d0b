//! The data checksum of an extent computed on a second thread while the
//! reader reads the extent's next piece.
//!
//! The one unsafe code of the reader: the worker hashes pieces of the
//! caller's buffer through raw pointers while the caller fills the next
//! piece (each `unsafe` below carries its SAFETY argument).
#![allow(unsafe_code)]

use std::io::{self, Read};
use std::sync::mpsc;

use super::{Archive, HASH_PIECE};

impl<R: Read> Archive<R> {
    /// Reads like [`read_full`](Self::read_full) while `worker` computes the
    /// CRC-32 of what has arrived: piece by piece, the worker hashes one piece
    /// while this thread reads the next, so the checksum costs almost no time
    /// on a machine with a second core. Returns the bytes read and, if all of
    /// `buf` arrived, its CRC.
    pub(super) fn read_hashing(
        &mut self,
        buf: &mut [u8],
        worker: &mut CrcWorker,
    ) -> (io::Result<usize>, Option<u32>) {
        const PIECE: usize = HASH_PIECE;
        let len = buf.len();
        // Every piece is derived from this one pointer, so reading into a
        // later piece never reborrows the pieces the worker is hashing.
        let base = buf.as_mut_ptr();
        let pending = PendingPieces(worker);
        let mut got = 0;
        let mut result = Ok(0);
        while got < len {
            let end = (got + PIECE).min(len);
            // SAFETY: got..end lies inside `buf` and after every piece sent.
            let piece = unsafe { std::slice::from_raw_parts_mut(base.add(got), end - got) };
            match self.read_full(piece) {
                Ok(n) => {
                    pending
                        .0
                        .hash(PiecePtr(base.wrapping_add(got).cast_const()), n);
                    got += n;
                    if got < end {
                        break;
                    }
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        let crc = pending.finish();
        match result {
            Ok(_) => (Ok(got), (got == len).then_some(crc)),
            Err(e) => (Err(e), None),
        }
    }
}

/// A second thread that computes CRC-32s of pieces of a buffer while the
/// caller reads the next piece (see [`Archive::read_hashing`]).
pub(super) struct CrcWorker {
    jobs: mpsc::Sender<CrcJob>,
    done: mpsc::Receiver<u32>,
}

enum CrcJob {
    /// Hash these bytes (a piece of the caller's buffer).
    Piece(PiecePtr, usize),
    /// Reply with the CRC of the pieces so far and start over.
    Finish,
}

/// A pointer to a piece of the caller's buffer. The caller keeps the piece
/// alive and unchanged until [`CrcWorker::finish`] has returned, which waits
/// for the worker to be done with every piece sent before it.
struct PiecePtr(*const u8);

// SAFETY: see PiecePtr: the bytes are only read, and only while the sender
// waits for them to be released.
unsafe impl Send for PiecePtr {}

impl CrcWorker {
    /// Starts the worker, if there is a second core to run it on.
    pub(super) fn start() -> Option<CrcWorker> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if cores < 2 {
            return None;
        }
        let (jobs, job_rx) = mpsc::channel::<CrcJob>();
        let (done_tx, done) = mpsc::channel();
        std::thread::Builder::new()
            .name("vma-crc".into())
            .spawn(move || {
                let mut hasher = crc32fast::Hasher::new();
                for job in job_rx {
                    match job {
                        CrcJob::Piece(ptr, len) => {
                            // SAFETY: PiecePtr's contract.
                            hasher.update(unsafe { std::slice::from_raw_parts(ptr.0, len) })
                        }
                        CrcJob::Finish => {
                            let crc =
                                std::mem::replace(&mut hasher, crc32fast::Hasher::new()).finalize();
                            if done_tx.send(crc).is_err() {
                                break;
                            }
                        }
                    }
                }
            })
            .ok()?;
        Some(CrcWorker { jobs, done })
    }

    /// Queues `len` bytes at `piece` for hashing; they must stay alive and
    /// untouched until [`finish`](Self::finish) returns.
    fn hash(&mut self, piece: PiecePtr, len: usize) {
        if len > 0 {
            self.jobs
                .send(CrcJob::Piece(piece, len))
                .expect("crc worker alive");
        }
    }

    /// Waits until every queued piece is hashed; returns their CRC-32.
    fn finish(&mut self) -> u32 {
        self.jobs.send(CrcJob::Finish).expect("crc worker alive");
        self.done.recv().expect("crc worker alive")
    }
}

/// Pieces handed to a [`CrcWorker`]: collected on every way out, an unwind
/// from a panicking `Read` included, so the buffer outlives the worker's use.
struct PendingPieces<'a>(&'a mut CrcWorker);

impl PendingPieces<'_> {
    fn finish(self) -> u32 {
        let crc = self.0.finish();
        std::mem::forget(self);
        crc
    }
}

impl Drop for PendingPieces<'_> {
    fn drop(&mut self) {
        self.0.finish();
    }
}
