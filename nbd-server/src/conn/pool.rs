//! The workers of one connection: requests the reader has read and
//! checked ([`Job`]s) are executed by up to [`MAX_IN_FLIGHT`] threads at
//! once, so a request that waits (a copy-before-write backend holding a
//! write until its old data is saved, a slow disk) does not hold up the
//! requests behind it.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use super::replies::Replies;
use super::{backend_failure, Failure};
use crate::backend::{Backend, ZeroFlags};
use crate::limits::{Limits, Payload};
use crate::sync::{lock, wait};
use crate::READ_CHUNK;

/// Requests of one connection in flight at most (read and not yet
/// answered); the reader waits for one to finish before it takes more.
/// QEMU keeps at most 16 requests in flight per connection.
pub const MAX_IN_FLIGHT: usize = 16;

/// A request, read and checked, for a worker.
pub(super) enum Job<'l> {
    Read {
        handle: u64,
        offset: u64,
        len: usize,
    },
    Write {
        handle: u64,
        offset: u64,
        fua: bool,
        data: Data<'l>,
    },
    Flush {
        handle: u64,
    },
    Trim {
        handle: u64,
        offset: u64,
        len: u64,
        fua: bool,
    },
    WriteZeroes {
        handle: u64,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
        fua: bool,
    },
    Cache {
        handle: u64,
        offset: u64,
        len: u64,
    },
    BlockStatus {
        handle: u64,
        offset: u64,
        len: u32,
        req_one: bool,
    },
}

/// A write's payload.
pub(super) enum Data<'l> {
    /// At most [`READ_CHUNK`] bytes: a buffer of the connection and the
    /// length used.
    Small(Vec<u8>, usize),
    /// Larger: taken from the server's payload budget.
    Big(Payload<'l>),
}

impl Data<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Data::Small(b, n) => &b[..*n],
            Data::Big(p) => &p.data,
        }
    }
}

/// Data buffers of one connection (at most [`READ_CHUNK`] each), reused,
/// counted in the server's buffered bytes until the connection ends.
pub(super) struct Buffers<'l> {
    limits: &'l Limits,
    free: Mutex<Vec<Vec<u8>>>,
    accounted: AtomicUsize,
}

impl<'l> Buffers<'l> {
    pub(super) fn new(limits: &'l Limits) -> Self {
        Buffers {
            limits,
            free: Mutex::new(Vec::new()),
            accounted: AtomicUsize::new(0),
        }
    }

    /// A buffer at least `len` bytes long (reused ones are not cleared).
    pub(super) fn take(&self, len: usize) -> Vec<u8> {
        let mut b = lock(&self.free).pop().unwrap_or_default();
        if b.len() < len {
            let before = b.capacity();
            b.resize(len, 0);
            let grown = b.capacity() - before;
            self.limits.grow(grown);
            self.accounted.fetch_add(grown, Ordering::Relaxed);
        }
        b
    }

    /// Gives `b` back for reuse.
    pub(super) fn give(&self, b: Vec<u8>) {
        lock(&self.free).push(b);
    }
}

impl Drop for Buffers<'_> {
    fn drop(&mut self) {
        self.limits.shrink(*self.accounted.get_mut());
    }
}

/// What a worker needs to execute a job.
pub(super) struct Work<'a, W: Write> {
    pub backend: &'a dyn Backend,
    pub replies: &'a Replies<'a, W>,
    pub buffers: &'a Buffers<'a>,
}

impl<W: Write> Work<'_, W> {
    /// Executes `job` and sends its reply; `scratch` is the worker's own
    /// buffer for block-status replies.
    pub(super) fn execute(&self, job: Job<'_>, scratch: &mut Vec<u8>) {
        let backend = self.backend;
        let (handle, result): (u64, Result<(), Failure>) = match job {
            Job::Read {
                handle,
                offset,
                len,
            } => {
                let mut buf = self.buffers.take(len.min(READ_CHUNK));
                let failed = self
                    .replies
                    .send_read(backend, handle, offset, len, &mut buf);
                self.buffers.give(buf);
                match failed {
                    None => return,
                    Some(f) => (handle, Err(f)),
                }
            }
            Job::Write {
                handle,
                offset,
                fua,
                data,
            } => {
                let r = backend
                    .write_at(data.bytes(), offset, fua)
                    .map_err(|e| backend_failure("write failed", e, false));
                if let Data::Small(b, _) = data {
                    self.buffers.give(b);
                }
                (handle, r)
            }
            Job::Flush { handle } => (
                handle,
                backend
                    .flush()
                    .map_err(|e| backend_failure("flush failed", e, false)),
            ),
            Job::Trim {
                handle,
                offset,
                len,
                fua,
            } => (
                handle,
                backend
                    .trim(offset, len)
                    .and_then(|()| if fua { backend.flush() } else { Ok(()) })
                    .map_err(|e| backend_failure("trim failed", e, false)),
            ),
            Job::WriteZeroes {
                handle,
                offset,
                len,
                flags,
                fua,
            } => (
                handle,
                backend
                    .write_zeroes(offset, len, flags)
                    .and_then(|()| if fua { backend.flush() } else { Ok(()) })
                    .map_err(|e| backend_failure("write-zeroes failed", e, flags.fast_only)),
            ),
            Job::Cache {
                handle,
                offset,
                len,
            } => (
                handle,
                backend
                    .cache(offset, len)
                    .map_err(|e| backend_failure("cache failed", e, false)),
            ),
            Job::BlockStatus {
                handle,
                offset,
                len,
                req_one,
            } => match backend.block_status(offset, u64::from(len)) {
                Ok(extents) => {
                    self.replies
                        .send_block_status(handle, offset, len, req_one, &extents, scratch);
                    return;
                }
                Err(e) => (
                    handle,
                    Err(backend_failure("block status failed", e, false)),
                ),
            },
        };
        match result {
            Ok(()) => self.replies.send_simple(handle, 0),
            Err(f) => self.replies.send_error(handle, &f),
        }
    }
}

struct State<'l> {
    jobs: VecDeque<Job<'l>>,
    /// Jobs queued or being executed.
    in_flight: usize,
    /// Workers waiting for a job.
    idle: usize,
    /// Workers started and not ended.
    workers: usize,
    /// No more jobs: workers end once the queue is empty.
    closed: bool,
}

/// The job queue of one connection and its workers' bookkeeping.
pub(super) struct Pool<'l> {
    state: Mutex<State<'l>>,
    /// Workers wait here for jobs.
    work: Condvar,
    /// The reader waits here for a job to finish.
    room: Condvar,
}

impl<'l> Pool<'l> {
    pub(super) fn new() -> Self {
        Pool {
            state: Mutex::new(State {
                jobs: VecDeque::new(),
                in_flight: 0,
                idle: 0,
                workers: 0,
                closed: false,
            }),
            work: Condvar::new(),
            room: Condvar::new(),
        }
    }

    /// Queues `job`, first waiting while [`MAX_IN_FLIGHT`] jobs are in
    /// flight. `true`: no worker is free, start one (then call
    /// [`worker`](Self::worker) on it, or [`no_worker`](Self::no_worker)
    /// if it cannot start).
    pub(super) fn push(&self, job: Job<'l>) -> bool {
        let mut st = lock(&self.state);
        while st.in_flight >= MAX_IN_FLIGHT {
            st = wait(&self.room, st);
        }
        st.in_flight += 1;
        st.jobs.push_back(job);
        if st.idle >= st.jobs.len() {
            drop(st);
            self.work.notify_one();
            return false;
        }
        if st.workers < MAX_IN_FLIGHT {
            st.workers += 1;
            return true;
        }
        false
    }

    /// A worker promised by [`push`](Self::push) did not start: if none is
    /// left, the caller's thread executes what is queued.
    pub(super) fn no_worker<W: Write>(&self, work: &Work<'_, W>) {
        let mut st = lock(&self.state);
        st.workers -= 1;
        if st.workers > 0 {
            return;
        }
        let mut scratch = Vec::new();
        while let Some(job) = st.jobs.pop_front() {
            drop(st);
            work.execute(job, &mut scratch);
            st = lock(&self.state);
            st.in_flight -= 1;
        }
    }

    /// A worker's life: executes jobs until the pool is closed and empty.
    pub(super) fn worker<W: Write>(&self, work: &Work<'_, W>) {
        let mut scratch = Vec::new();
        let mut st = lock(&self.state);
        loop {
            if let Some(job) = st.jobs.pop_front() {
                drop(st);
                work.execute(job, &mut scratch);
                st = lock(&self.state);
                st.in_flight -= 1;
                self.room.notify_one();
                continue;
            }
            if st.closed {
                st.workers -= 1;
                return;
            }
            st.idle += 1;
            st = wait(&self.work, st);
            st.idle -= 1;
        }
    }

    /// No more jobs: the workers finish what is queued and end.
    pub(super) fn close(&self) {
        lock(&self.state).closed = true;
        self.work.notify_all();
    }
}
