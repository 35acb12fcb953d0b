//! What one server lets its clients take: request deadlines, the shared
//! budget for large write payloads, and the counters that show both.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::sync::{lock, wait};

/// Limits and counters shared by all connections of one server.
pub(crate) struct Limits {
    /// From the first byte of a request to its last (header and payload).
    pub request_timeout: Option<Duration>,
    budget: usize,
    used: Mutex<usize>,
    freed: Condvar,
    /// Bytes of request and reply data buffers held by connections.
    buffered: AtomicUsize,
    peak: AtomicUsize,
    pub timed_out: AtomicU64,
    pub refused: AtomicU64,
}

impl Limits {
    pub fn new(request_timeout: Option<Duration>, budget: usize) -> Limits {
        Limits {
            request_timeout,
            budget: budget.max(crate::MAX_PAYLOAD),
            used: Mutex::new(0),
            freed: Condvar::new(),
            buffered: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            timed_out: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// `n` more bytes are buffered.
    pub fn grow(&self, n: usize) {
        if n > 0 {
            let now = self.buffered.fetch_add(n, Ordering::Relaxed) + n;
            self.peak.fetch_max(now, Ordering::Relaxed);
        }
    }

    /// `n` bytes fewer are buffered.
    pub fn shrink(&self, n: usize) {
        self.buffered.fetch_sub(n, Ordering::Relaxed);
    }

    /// (now, peak) buffered bytes.
    pub fn buffered(&self) -> (usize, usize) {
        (
            self.buffered.load(Ordering::Relaxed),
            self.peak.load(Ordering::Relaxed),
        )
    }

    /// A zeroed buffer of `len` bytes (at most the budget) from the shared
    /// payload budget, waiting until that much is free.
    pub fn payload(&self, len: usize) -> Payload<'_> {
        let len = len.min(self.budget);
        let mut used = lock(&self.used);
        while *used + len > self.budget {
            used = wait(&self.freed, used);
        }
        *used += len;
        drop(used);
        self.grow(len);
        Payload {
            limits: self,
            data: vec![0; len],
        }
    }
}

/// A buffer taken from the payload budget, given back when dropped.
pub(crate) struct Payload<'a> {
    limits: &'a Limits,
    pub data: Vec<u8>,
}

impl Drop for Payload<'_> {
    fn drop(&mut self) {
        let len = self.data.len();
        self.data = Vec::new();
        self.limits.shrink(len);
        let mut used = lock(&self.limits.used);
        *used -= len;
        drop(used);
        self.limits.freed.notify_all();
    }
}
