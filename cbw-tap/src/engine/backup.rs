//! One running backup: the copy state of every export, the queue of
//! captured clusters, its counters, and how it ends.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use nbd_server::sync::lock;
use nbd_server::{Backend, Extent};
use vma_format::clusters_for;
use vma_format::clusterset::ClusterSet;
use vma_format::identity::{BackupIdentity, BaseRef};

use super::{BackupOptions, Source, CS};
use crate::queue::CaptureQueue;
use crate::states::{ClusterState, ClusterStates};
use crate::stats::{Counters, Stats};

/// A read of an image failed while capturing.
#[derive(Debug, thiserror::Error)]
#[error("reading {device} at offset {offset}: {source}")]
pub(super) struct ReadError {
    pub(super) device: String,
    pub(super) offset: u64,
    #[source]
    pub(super) source: std::io::Error,
}

/// One export of a backup: its copy states, each cluster's owner known.
pub(super) struct ExportCopy {
    pub(super) name: String,
    pub(super) backend: Arc<dyn Backend>,
    pub(super) size: u64,
    pub(super) clusters: u64,
    pub(super) states: Mutex<ClusterStates>,
    pub(super) cond: Condvar,
}

impl ExportCopy {
    /// Marks `clusters` as `state` and wakes waiters if there are any.
    pub(super) fn set_all(&self, clusters: impl IntoIterator<Item = u64>, state: ClusterState) {
        let mut st = lock(&self.states);
        for c in clusters {
            st.set(c, state);
        }
        let wake = st.waiters > 0;
        drop(st);
        if wake {
            self.cond.notify_all();
        }
    }

    /// Which clusters of `first..first + count` read as zero without being
    /// read (holes, per the backend's block status), as a bit per cluster.
    /// Any error or doubt means "read it".
    pub(super) fn hole_clusters(&self, first: u64, count: u64) -> u64 {
        debug_assert!(count <= 64);
        let start = first * CS;
        let end = ((first + count) * CS).min(self.size);
        let Ok(extents) = self.backend.block_status(start, end - start) else {
            return 0;
        };
        let mut holes = 0u64;
        let mut pos = start;
        for Extent { len, zero, .. } in extents {
            let ext_end = pos.saturating_add(len).min(end);
            if zero {
                // Clusters wholly inside pos..ext_end (the last one may end
                // at the device end).
                let mut c = pos.div_ceil(CS);
                while c < first + count && ((c + 1) * CS).min(self.size) <= ext_end {
                    holes |= 1 << (c - first);
                    c += 1;
                }
            }
            pos = ext_end;
            if pos >= end {
                break;
            }
        }
        holes
    }

    /// Valid bytes of cluster `c` (the last one may be short).
    pub(super) fn valid(&self, c: u64) -> usize {
        (self.size - c * CS).min(CS) as usize
    }
}

/// A running backup: the copy states of every export, the queue of captured
/// clusters, counters, and whether it is over.
pub struct Backup {
    pub(super) time: i64,
    pub(super) identity: BackupIdentity,
    /// Clusters the stream carries: all, or those changed since the base.
    pub(super) expected: u64,
    /// Bytes of the devices those clusters cover (64 KiB each, less past
    /// a device's end): what progress counts up to.
    pub(super) expected_bytes: u64,
    /// The changes' generation at its instant ([`super::Engine::confirm`]).
    pub(super) generation: u64,
    pub(super) exports: Vec<ExportCopy>,
    pub(super) queue: CaptureQueue,
    pub(super) options: BackupOptions,
    pub(super) over: AtomicBool,
    pub(super) abort_reason: Mutex<Option<String>>,
    pub(super) counters: Counters,
    pub(super) started: Instant,
    /// The reader's `--bwlimit` sleeps wait here, so that the end of the
    /// backup wakes them.
    pub(super) nap: Mutex<()>,
    pub(super) nap_cond: Condvar,
}

impl std::fmt::Debug for Backup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backup")
            .field("time", &self.time)
            .field("devices", &self.devices())
            .field("over", &self.is_over())
            .field("abort_reason", &self.abort_reason())
            .finish_non_exhaustive()
    }
}

impl Backup {
    pub(super) fn new(
        sources: &[Source],
        options: BackupOptions,
        fleece: Option<std::fs::File>,
        uuid: [u8; 16],
    ) -> Backup {
        let exports: Vec<ExportCopy> = sources
            .iter()
            .map(|s| {
                let size = s.backend.size();
                let clusters = clusters_for(size);
                let states = ClusterStates::new(clusters);
                ExportCopy {
                    name: s.name.clone(),
                    backend: Arc::clone(&s.backend),
                    size,
                    clusters,
                    states: Mutex::new(states),
                    cond: Condvar::new(),
                }
            })
            .collect();
        Backup {
            time: 0,
            identity: BackupIdentity { uuid, base: None },
            expected: exports.iter().map(|e| e.clusters).sum(),
            expected_bytes: exports.iter().map(|e| e.size).sum(),
            generation: 0,
            queue: CaptureQueue::new(options.buffer, fleece),
            counters: Counters::new(exports.len()),
            exports,
            options,
            over: AtomicBool::new(false),
            abort_reason: Mutex::new(None),
            started: Instant::now(),
            nap: Mutex::new(()),
            nap_cond: Condvar::new(),
        }
    }

    /// Makes the (not yet started) backup incremental on `base`: only the
    /// clusters of `changed` (one set per export) are to be captured, the
    /// others count as copied from the start.
    pub(super) fn make_incremental(&mut self, changed: &[ClusterSet], base: BaseRef) {
        self.expected = 0;
        for (ex, set) in self.exports.iter_mut().zip(changed) {
            let st = ex.states.get_mut().unwrap_or_else(|p| p.into_inner());
            for gap in set.missing() {
                st.set_range_copied(gap);
            }
            self.expected += set.count();
        }
        self.expected_bytes = self
            .exports
            .iter()
            .zip(changed)
            .map(|(ex, set)| {
                // The last cluster covers the device only up to its end.
                let short = if ex.clusters > 0 && set.contains(ex.clusters - 1) {
                    ex.clusters * CS - ex.size
                } else {
                    0
                };
                set.count() * CS - short
            })
            .sum();
        self.identity.base = Some(base);
    }

    /// The backup instant, in seconds since the Unix epoch.
    pub fn time(&self) -> i64 {
        self.time
    }

    /// The devices of the backup: name and size of each export, in order
    /// (device ids 1, 2, …).
    pub fn devices(&self) -> Vec<(String, u64)> {
        self.exports
            .iter()
            .map(|e| (e.name.clone(), e.size))
            .collect()
    }

    /// The archive uuid and, for an incremental backup, its base.
    pub fn identity(&self) -> &BackupIdentity {
        &self.identity
    }

    /// Whether only the clusters changed since a base are captured.
    pub fn is_incremental(&self) -> bool {
        self.identity.base.is_some()
    }

    /// Clusters the stream carries (all of them for a full backup).
    pub fn expected_clusters(&self) -> u64 {
        self.expected
    }

    /// Bytes of the devices the stream's clusters cover (the devices'
    /// sizes for a full backup): the progress total.
    pub fn expected_bytes(&self) -> u64 {
        self.expected_bytes
    }

    /// The options it runs with.
    pub fn options(&self) -> &BackupOptions {
        &self.options
    }

    /// Total clusters of all exports: what a complete stream holds.
    pub fn total_clusters(&self) -> u64 {
        self.exports.iter().map(|e| e.clusters).sum()
    }

    /// Whether the backup is over: finished, or aborted. Guest writes then
    /// pass straight through.
    pub fn is_over(&self) -> bool {
        self.over.load(Ordering::Acquire)
    }

    /// Why it was aborted, if it was.
    pub fn abort_reason(&self) -> Option<String> {
        lock(&self.abort_reason).clone()
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        self.counters.snapshot(
            self.exports.iter().map(|e| e.name.clone()).collect(),
            self.started.elapsed(),
        )
    }

    /// Bytes waiting in its queue for the stream writer (a whole cluster per
    /// data cluster, plus a small overhead per cluster).
    pub fn queued_bytes(&self) -> usize {
        self.queue.bytes()
    }

    /// Counts `n` bytes of stream output (see [`Stats::bytes_emitted`]).
    pub fn count_emitted_bytes(&self, n: u64) {
        self.counters.bytes_emitted.fetch_add(n, Ordering::Relaxed);
    }

    /// Aborts the backup for `reason` (the first reason given wins) unless
    /// it is already over: everyone waiting on it wakes up, the queue is
    /// dropped, the writer writes an abort record.
    pub fn abort(&self, reason: impl Into<String>) {
        {
            let mut r = lock(&self.abort_reason);
            if self.is_over() {
                return;
            }
            r.get_or_insert_with(|| reason.into());
            self.over.store(true, Ordering::Release);
        }
        self.wake_all();
    }

    pub(super) fn set_over(&self) {
        {
            let _r = lock(&self.abort_reason);
            self.over.store(true, Ordering::Release);
        }
        self.wake_all();
    }

    fn wake_all(&self) {
        self.queue.abort();
        drop(lock(&self.nap));
        self.nap_cond.notify_all();
        for e in &self.exports {
            // Take the mutex so no waiter can miss the wake-up between its
            // check of `over` and its wait.
            drop(lock(&e.states));
            e.cond.notify_all();
        }
    }
}
