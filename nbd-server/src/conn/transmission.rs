//! The transmission phase: the connection's thread reads each request
//! (header and write payload, within the request deadline), checks it, and
//! hands it to the connection's workers ([`super::pool`]); replies go out
//! as the requests finish ([`super::replies`]).
//!
//! Why concurrently: a client such as QEMU sends a disk's whole queue over
//! one connection. Answered one at a time, a request that waits — a guest
//! write held until copy-before-write has saved the old data, up to
//! `--cbw-timeout` — would hold up every request behind it, reads
//! included. The protocol lets replies come in any order.
//!
//! FLUSH needs no ordering of its own: a write is acknowledged only after
//! the backend's write returned, so every write the client saw acknowledged
//! before it sent FLUSH has reached the backend before FLUSH is even read.

use std::io::{self, Read, Write};
use std::thread;
use std::time::Instant;

use super::pool::Buffers;
use super::pool::{Data, Job, Pool, Work};
use super::replies::Replies;
use super::{drain, fail, is_tick, protocol_error, read_by, Connection, Failure};
use crate::backend::{Backend, ZeroFlags};
use crate::limits::Limits;
use crate::proto::*;
use crate::{MAX_PAYLOAD, READ_CHUNK};

/// The reading half of a connection in transmission.
struct RequestReader<'c, 'a, R: Read> {
    rd: &'c mut std::io::BufReader<R>,
    limits: &'a Limits,
    backend: &'a dyn Backend,
    block_status_ok: bool,
}

/// What to do with one request the reader read.
enum Next<'l> {
    /// Hand it to a worker.
    Run(Job<'l>),
    /// Refuse it (a reply with this error) and read on.
    Refuse(u64, Failure),
    /// The client ended the connection (`NBD_CMD_DISC`, or EOF between
    /// requests).
    End,
}

impl<Rd: Read, W: Write + Send> Connection<'_, Rd, W> {
    /// Serves `export` until the client disconnects; every request read is
    /// answered (or its reply lost with the connection) before this returns.
    pub(super) fn transmission(self, export: usize) -> io::Result<()> {
        let Connection {
            mut rd,
            wr,
            exports,
            structured,
            meta_export,
            limits,
            kill,
            serial,
            ..
        } = self;
        let backend: &dyn Backend = &*exports[export].backend;
        let replies = Replies::new(wr, structured, kill);
        let buffers = Buffers::new(limits);
        let pool = Pool::new();
        let work = Work {
            backend,
            replies: &replies,
            buffers: &buffers,
        };
        let mut reader = RequestReader {
            rd: &mut rd,
            limits,
            backend,
            block_status_ok: meta_export == Some(export),
        };
        let mut scratch = Vec::new();
        thread::scope(|s| {
            let result = loop {
                if replies.is_broken() {
                    break Err(io::Error::other("a reply could not be sent"));
                }
                let next = match reader.next(&buffers, &replies) {
                    Ok(n) => n,
                    Err(e) => break Err(e),
                };
                match next {
                    Next::End => break Ok(()),
                    Next::Refuse(handle, f) => replies.send_error(handle, &f),
                    Next::Run(job) if serial => work.execute(job, &mut scratch),
                    Next::Run(job) => {
                        if pool.push(job) {
                            let started = thread::Builder::new()
                                .name("nbd-worker".into())
                                .spawn_scoped(s, || pool.worker(&work));
                            if started.is_err() {
                                pool.no_worker(&work);
                            }
                        }
                    }
                }
            };
            pool.close();
            result
        })
    }
}

impl<'a, R: Read> RequestReader<'_, 'a, R> {
    /// Reads the next request (waiting as long as the client is idle) and
    /// checks it. `Err`: the connection ends (I/O error, a request cut off
    /// by its deadline, a bad magic).
    fn next<W: Write>(
        &mut self,
        buffers: &Buffers<'a>,
        replies: &Replies<'_, W>,
    ) -> io::Result<Next<'a>> {
        let mut hdr = [0u8; 28];
        // Idle between requests: no deadline, ticks are ignored (but for a
        // look at whether a reply failed). EOF right at a request boundary
        // is a (rude but) clean end.
        let first = loop {
            match self.rd.read(&mut hdr[..1]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted || is_tick(&e) => {
                    if replies.is_broken() {
                        return Err(io::Error::other("a reply could not be sent"));
                    }
                }
                Err(e) => return Err(e),
            }
        };
        if first == 0 {
            return Ok(Next::End);
        }
        // From its first byte, the whole request must arrive in time.
        let deadline = self.limits.request_timeout.map(|t| Instant::now() + t);
        read_by(self.rd, self.limits, &mut hdr[1..], deadline)?;
        let magic = u32::from_be_bytes(hdr[..4].try_into().unwrap());
        let flags = u16::from_be_bytes(hdr[4..6].try_into().unwrap());
        let cmd = u16::from_be_bytes(hdr[6..8].try_into().unwrap());
        let handle = u64::from_be_bytes(hdr[8..16].try_into().unwrap());
        let offset = u64::from_be_bytes(hdr[16..24].try_into().unwrap());
        let len = u32::from_be_bytes(hdr[24..28].try_into().unwrap());
        if magic != REQUEST_MAGIC {
            return Err(protocol_error("bad request magic"));
        }
        let backend = self.backend;
        let in_range = offset
            .checked_add(u64::from(len))
            .is_some_and(|end| end <= backend.size());
        let fua = flags & CMD_FLAG_FUA != 0;
        let len64 = u64::from(len);
        let checked = |f: Result<(), Failure>, job: Job<'a>| -> Next<'a> {
            match f {
                Ok(()) => Next::Run(job),
                Err(f) => Next::Refuse(handle, f),
            }
        };
        // Every command on a range: not empty, inside the export.
        let span = |what_zero: &'static str, what_range: &'static str, range_errno: u32| {
            if len == 0 {
                Err(fail(EINVAL, what_zero))
            } else if !in_range {
                Err(fail(range_errno, what_range))
            } else {
                Ok(())
            }
        };
        let writable = |what_zero: &'static str, what_range: &'static str, range_errno: u32| {
            if backend.read_only() {
                Err(fail(EPERM, "export is read-only"))
            } else {
                span(what_zero, what_range, range_errno)
            }
        };
        Ok(match cmd {
            CMD_DISC => Next::End,
            CMD_READ => {
                let check = if flags & !CMD_FLAG_FUA != 0 {
                    Err(fail(EINVAL, "unsupported flags for READ"))
                } else if len as usize > MAX_PAYLOAD {
                    Err(fail(
                        EINVAL,
                        "read larger than the maximum payload (32 MiB)",
                    ))
                } else {
                    span(
                        "zero-length read",
                        "read beyond the end of the export",
                        EINVAL,
                    )
                };
                let job = Job::Read {
                    handle,
                    offset,
                    len: len as usize,
                };
                checked(check, job)
            }
            CMD_WRITE => {
                if len as usize > MAX_PAYLOAD {
                    // Never buffer an oversized payload: skip it.
                    drain(self.rd, self.limits, len64, deadline)?;
                    return Ok(Next::Refuse(
                        handle,
                        fail(EINVAL, "write larger than the maximum payload (32 MiB)"),
                    ));
                }
                let len = len as usize;
                // Small payloads use a buffer of the connection; large ones
                // wait for room in the server's budget (and then get the
                // full time to arrive).
                let data = if len <= READ_CHUNK {
                    let mut b = buffers.take(len);
                    if let Err(e) = read_by(self.rd, self.limits, &mut b[..len], deadline) {
                        buffers.give(b);
                        return Err(e);
                    }
                    Data::Small(b, len)
                } else {
                    let mut p = self.limits.payload(len);
                    let deadline = self.limits.request_timeout.map(|t| Instant::now() + t);
                    read_by(self.rd, self.limits, &mut p.data, deadline)?;
                    Data::Big(p)
                };
                let check = if flags & !CMD_FLAG_FUA != 0 {
                    Err(fail(EINVAL, "unsupported flags for WRITE"))
                } else {
                    writable(
                        "zero-length write",
                        "write beyond the end of the export",
                        ENOSPC,
                    )
                };
                if let Err(f) = check {
                    if let Data::Small(b, _) = data {
                        buffers.give(b);
                    }
                    return Ok(Next::Refuse(handle, f));
                }
                Next::Run(Job::Write {
                    handle,
                    offset,
                    fua,
                    data,
                })
            }
            CMD_FLUSH => {
                let check = if flags & !CMD_FLAG_FUA != 0 {
                    Err(fail(EINVAL, "unsupported flags for FLUSH"))
                } else if offset != 0 || len != 0 {
                    Err(fail(EINVAL, "FLUSH with non-zero offset or length"))
                } else {
                    Ok(())
                };
                checked(check, Job::Flush { handle })
            }
            CMD_TRIM => {
                let check = if flags & !CMD_FLAG_FUA != 0 {
                    Err(fail(EINVAL, "unsupported flags for TRIM"))
                } else {
                    writable(
                        "zero-length trim",
                        "trim beyond the end of the export",
                        EINVAL,
                    )
                };
                let job = Job::Trim {
                    handle,
                    offset,
                    len: len64,
                    fua,
                };
                checked(check, job)
            }
            CMD_WRITE_ZEROES => {
                let check = if flags & !(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO) != 0
                {
                    Err(fail(EINVAL, "unsupported flags for WRITE_ZEROES"))
                } else {
                    writable(
                        "zero-length write-zeroes",
                        "write-zeroes beyond the end of the export",
                        ENOSPC,
                    )
                };
                let job = Job::WriteZeroes {
                    handle,
                    offset,
                    len: len64,
                    flags: ZeroFlags {
                        may_punch_hole: flags & CMD_FLAG_NO_HOLE == 0,
                        fast_only: flags & CMD_FLAG_FAST_ZERO != 0,
                    },
                    fua,
                };
                checked(check, job)
            }
            CMD_CACHE => {
                let check = if flags & !CMD_FLAG_FUA != 0 {
                    Err(fail(EINVAL, "unsupported flags for CACHE"))
                } else {
                    span(
                        "zero-length cache",
                        "cache beyond the end of the export",
                        EINVAL,
                    )
                };
                let job = Job::Cache {
                    handle,
                    offset,
                    len: len64,
                };
                checked(check, job)
            }
            CMD_BLOCK_STATUS => {
                let check = if !self.block_status_ok {
                    Err(fail(EINVAL, "no metadata context was negotiated"))
                } else if flags & !(CMD_FLAG_FUA | CMD_FLAG_REQ_ONE) != 0 {
                    Err(fail(EINVAL, "unsupported flags for BLOCK_STATUS"))
                } else {
                    span(
                        "zero-length block status",
                        "block status beyond the end of the export",
                        EINVAL,
                    )
                };
                let job = Job::BlockStatus {
                    handle,
                    offset,
                    len,
                    req_one: flags & CMD_FLAG_REQ_ONE != 0,
                };
                checked(check, job)
            }
            _ => Next::Refuse(handle, fail(EINVAL, "unknown command")),
        })
    }
}
