//! Copy-before-write for guest writes: before a write lands on clusters
//! the backup has not copied, their old content is captured and queued.

use std::io;
use std::sync::atomic::Ordering;
use std::time::Instant;

use nbd_server::sync::{lock, wait_timeout};
use vma_format::zero::pack_cluster_in_place;

use super::backup::ReadError;
use super::{Backup, Policy, CS};
use crate::queue::{Captured, PushError, Pushed};
use crate::states::ClusterState;

/// Why a guest write's copy failed.
enum CopyFailure {
    Timeout,
    Closed,
    /// Reading the image or writing the fleecing file failed.
    Io(String),
}

impl Backup {
    // ------------------------------------------------------------ guest writes

    /// Called by export `index` before a guest write to
    /// `offset..offset + len` (inside the export, `len > 0`), with the gate
    /// held: makes sure every cluster it touches has been captured.
    /// `Err` only under [`Policy::BreakGuestWrite`].
    pub(super) fn before_guest_write(&self, index: usize, offset: u64, len: u64) -> io::Result<()> {
        let ex = &self.exports[index];
        let first = offset / CS;
        let last = (offset + len - 1) / CS;
        let mut started: Option<Instant> = None;
        let mut mine: Vec<u64> = Vec::new();
        loop {
            if self.is_over() {
                break;
            }
            let mut st = lock(&ex.states);
            if st.all_copied(first, last) {
                break;
            }
            let mut busy = false;
            for c in first..=last {
                match st.get(c) {
                    ClusterState::NotCopied => {
                        st.set(c, ClusterState::Copying);
                        mine.push(c);
                    }
                    ClusterState::Copying => busy = true,
                    ClusterState::Copied => {}
                }
            }
            let t0 = *started.get_or_insert_with(Instant::now);
            let deadline = t0 + self.options.cbw_timeout;
            if mine.is_empty() {
                debug_assert!(busy);
                // Someone else is copying: wait for them, never re-read.
                let now = Instant::now();
                if now >= deadline || self.is_over() {
                    drop(st);
                    if self.is_over() {
                        break;
                    }
                    self.copy_failed(index, &mut mine, CopyFailure::Timeout)?;
                    break;
                }
                st.waiters += 1;
                let (mut st, _) = wait_timeout(&ex.cond, st, deadline - now);
                st.waiters -= 1;
                continue;
            }
            drop(st);
            if let Err(why) = self.copy_for_guest(index, &mut mine, deadline) {
                self.copy_failed(index, &mut mine, why)?;
                break;
            }
        }
        if let Some(t0) = started {
            self.counters.delayed(t0.elapsed());
        }
        Ok(())
    }

    /// Captures the clusters in `mine` (claimed, ascending) one by one;
    /// on failure `mine` keeps those not yet queued.
    fn copy_for_guest(
        &self,
        index: usize,
        mine: &mut Vec<u64>,
        deadline: Instant,
    ) -> Result<(), CopyFailure> {
        let ex = &self.exports[index];
        let mut done = 0;
        let mut result = Ok(());
        let mut holes = (0u64, 0u64); // (first cluster of window, hole bits)
        let mut have_window = false;
        for &c in mine.iter() {
            if !have_window || c >= holes.0 + 64 {
                let count = (ex.clusters - c).min(64);
                holes = (c, ex.hole_clusters(c, count));
                have_window = true;
            }
            let item = if holes.1 & (1 << (c - holes.0)) != 0 {
                self.counters.cbw_holes.fetch_add(1, Ordering::Relaxed);
                Captured::zero((index + 1) as u8, c as u32)
            } else {
                match self.read_cluster(index, c) {
                    Ok(item) => item,
                    Err(e) => {
                        result = Err(CopyFailure::Io(e.to_string()));
                        break;
                    }
                }
            };
            let len = item.data().len() as u64;
            match self.queue.push(item, Some(deadline), true) {
                Ok(Pushed::Memory) => {}
                Ok(Pushed::Spilled) => {
                    self.counters
                        .spilled_clusters
                        .fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .spilled_bytes
                        .fetch_add(len, Ordering::Relaxed);
                }
                Err(PushError::Timeout) => {
                    result = Err(CopyFailure::Timeout);
                    break;
                }
                Err(PushError::Closed) => {
                    result = Err(CopyFailure::Closed);
                    break;
                }
                Err(e @ PushError::Spill(_)) => {
                    result = Err(CopyFailure::Io(e.to_string()));
                    break;
                }
            }
            self.counters.cbw_clusters.fetch_add(1, Ordering::Relaxed);
            ex.set_all([c], ClusterState::Copied);
            done += 1;
        }
        mine.drain(..done);
        result
    }

    /// Reads one cluster for a guest write straight into a queue buffer
    /// (one read) and packs it there.
    fn read_cluster(&self, index: usize, c: u64) -> Result<Captured, ReadError> {
        let ex = &self.exports[index];
        let valid = ex.valid(c);
        let mut buf = self.queue.take_buffer();
        if let Err(e) = ex.backend.read_at(&mut buf[..valid], c * CS) {
            self.queue.recycle([buf]);
            return Err(ReadError {
                device: ex.name.clone(),
                offset: c * CS,
                source: e,
            });
        }
        self.counters.cbw_reads.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes_read[index].fetch_add(valid as u64, Ordering::Relaxed);
        self.counters
            .cbw_bytes
            .fetch_add(valid as u64, Ordering::Relaxed);
        let mask = pack_cluster_in_place(&mut buf, valid);
        if mask.count() == 0 {
            self.queue.recycle([buf]);
            return Ok(Captured::zero((index + 1) as u8, c as u32));
        }
        Ok(Captured::new((index + 1) as u8, c as u32, mask, buf))
    }

    /// Applies the policy after a guest write's copy failed. `Ok`: the write
    /// may go through.
    fn copy_failed(&self, index: usize, mine: &mut Vec<u64>, why: CopyFailure) -> io::Result<()> {
        let ex = &self.exports[index];
        let message = match why {
            CopyFailure::Closed => None,
            CopyFailure::Timeout => Some(format!(
                "copy-before-write on {} timed out after {} s (the consumer does not keep up)",
                ex.name,
                self.options.cbw_timeout.as_secs_f64()
            )),
            CopyFailure::Io(e) => Some(format!("copy-before-write failed: {e}")),
        };
        let Some(message) = message.filter(|_| !self.is_over()) else {
            // The backup is over: nothing left to protect.
            mine.clear();
            return Ok(());
        };
        match self.options.policy {
            Policy::BreakSnapshot => {
                self.counters
                    .snapshot_breaks
                    .fetch_add(1, Ordering::Relaxed);
                self.abort(message);
                mine.clear();
                Ok(())
            }
            Policy::BreakGuestWrite => {
                // Give the clusters back: the background reader copies them.
                ex.set_all(mine.drain(..), ClusterState::NotCopied);
                self.counters
                    .guest_writes_failed
                    .fetch_add(1, Ordering::Relaxed);
                Err(io::Error::other(message))
            }
        }
    }
}
