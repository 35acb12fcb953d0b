//! The background reader: copies every cluster nobody copied yet, in
//! batches read straight into queue buffers (one scatter read per run of
//! data clusters) and packed there.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nbd_server::sync::{lock, wait, wait_timeout_while};
use vma_format::zero::pack_cluster_in_place;

use super::backup::ReadError;
use super::{Backup, CS, READER_BATCH};
use crate::pace::{Clock, TokenBucket};
use crate::queue::Captured;
use crate::states::ClusterState;

impl Backup {
    /// Copies every cluster nobody has copied yet, export by export in
    /// cluster order, then closes the queue. Returns early when the backup
    /// is aborted; a read error aborts it. Run it in its own thread.
    /// `--bwlimit` paces it with the real clock (see [`crate::pace`]).
    pub fn run_reader(&self) {
        let clock = NapClock {
            backup: self,
            start: Instant::now(),
        };
        self.run_reader_with_clock(&clock);
    }

    /// [`run_reader`](Self::run_reader) with `--bwlimit` measured and slept
    /// by `clock` (tests simulate time with it).
    pub fn run_reader_with_clock(&self, clock: &dyn Clock) {
        /// If the reader ends without closing the queue (a panic), the
        /// writer must not wait forever: abort.
        struct Guard<'a>(&'a Backup, bool);
        impl Drop for Guard<'_> {
            fn drop(&mut self) {
                if !self.1 {
                    self.0
                        .abort("internal error: the background reader stopped");
                }
            }
        }
        let mut guard = Guard(self, false);
        self.enter_background_thread();
        let mut pacer = self
            .options
            .bwlimit
            .filter(|&l| l > 0)
            .map(|l| TokenBucket::new(l, READER_BATCH * CS, clock.now()));
        let mut bufs: Vec<Vec<u8>> = Vec::with_capacity(READER_BATCH as usize);
        let mut items: Vec<Captured> = Vec::with_capacity(READER_BATCH as usize);
        let mut pending: Vec<(usize, u64)> = Vec::new();
        for (index, ex) in self.exports.iter().enumerate() {
            let mut c = 0;
            while c < ex.clusters {
                if self.is_over() {
                    return;
                }
                let end = (c + READER_BATCH).min(ex.clusters);
                // Wait for the budget before claiming anything: a guest
                // write must never wait for the reader's pacing.
                if let Some(p) = pacer.as_mut() {
                    let uncopied = {
                        let st = lock(&ex.states);
                        (c..end).any(|k| st.get(k) == ClusterState::NotCopied)
                    };
                    if uncopied && !self.pace(p, (end - c) * CS, clock) {
                        return;
                    }
                }
                let mut claimed = 0u64; // bit i: cluster c + i
                {
                    let mut st = lock(&ex.states);
                    for k in c..end {
                        match st.get(k) {
                            ClusterState::NotCopied => {
                                st.set(k, ClusterState::Copying);
                                claimed |= 1 << (k - c);
                            }
                            ClusterState::Copying => pending.push((index, k)),
                            ClusterState::Copied => {}
                        }
                    }
                }
                if claimed != 0 {
                    let now = pacer.as_ref().map(|_| clock.now());
                    let Ok(read) =
                        self.copy_batch(index, c, end - c, claimed, &mut bufs, &mut items)
                    else {
                        return;
                    };
                    if let (Some(p), Some(now)) = (pacer.as_mut(), now) {
                        p.take(read, now);
                    }
                }
                c = end;
            }
        }
        // Clusters a guest write was copying when we passed: wait for them;
        // one given back (break-guest-write) is ours to copy.
        for (index, k) in pending {
            let ex = &self.exports[index];
            let mut st = lock(&ex.states);
            loop {
                if self.is_over() {
                    return;
                }
                match st.get(k) {
                    ClusterState::Copied => break,
                    ClusterState::Copying => {
                        st.waiters += 1;
                        st = wait(&ex.cond, st);
                        st.waiters -= 1;
                    }
                    ClusterState::NotCopied => {
                        // Pace without holding the lock or the cluster, then
                        // look again.
                        if let Some(p) = pacer.as_mut() {
                            let now = clock.now();
                            if !p.wait_for(CS, now).is_zero() {
                                drop(st);
                                if !self.pace(p, CS, clock) {
                                    return;
                                }
                                st = lock(&ex.states);
                                continue;
                            }
                        }
                        st.set(k, ClusterState::Copying);
                        drop(st);
                        let now = pacer.as_ref().map(|_| clock.now());
                        let Ok(read) = self.copy_batch(index, k, 1, 1, &mut bufs, &mut items)
                        else {
                            return;
                        };
                        if let (Some(p), Some(now)) = (pacer.as_mut(), now) {
                            p.take(read, now);
                        }
                        break;
                    }
                }
            }
        }
        self.queue.close();
        guard.1 = true;
    }

    /// Waits until `bucket` holds `need` bytes, as long as that takes, in
    /// as few sleeps as the clock allows; `false` if the backup ended
    /// meanwhile.
    fn pace(&self, bucket: &mut TokenBucket, need: u64, clock: &dyn Clock) -> bool {
        loop {
            if self.is_over() {
                return false;
            }
            let wait = bucket.wait_for(need, clock.now());
            if wait.is_zero() {
                return true;
            }
            let t0 = clock.now();
            clock.sleep(wait);
            let slept = clock.now().saturating_sub(t0);
            self.counters.pace_wait_ns.fetch_add(
                slept.as_nanos().min(u128::from(u64::MAX)) as u64,
                Ordering::Relaxed,
            );
        }
    }

    /// Copies the claimed clusters (bits of `claimed`) of `first..first +
    /// count`: holes without reading, each data run with one read into
    /// queue buffers (`bufs`, `items`: the caller's scratch lists). Returns
    /// the bytes read.
    fn copy_batch(
        &self,
        index: usize,
        first: u64,
        count: u64,
        claimed: u64,
        bufs: &mut Vec<Vec<u8>>,
        items: &mut Vec<Captured>,
    ) -> Result<u64, ()> {
        debug_assert!(count <= READER_BATCH);
        let ex = &self.exports[index];
        let dev = (index + 1) as u8;
        let mut read = 0u64;
        let holes = ex.hole_clusters(first, count) & claimed;
        let mut i = 0;
        while i < count {
            let bit = 1u64 << i;
            if claimed & bit == 0 {
                i += 1;
                continue;
            }
            let c = first + i;
            if holes & bit != 0 {
                self.counters.reader_holes.fetch_add(1, Ordering::Relaxed);
                items.push(Captured::zero(dev, c as u32));
                i += 1;
                continue;
            }
            // A run of claimed data clusters: one read, straight into the
            // buffers that go into the queue.
            let mut j = i;
            while j < count && claimed & (1 << j) != 0 && holes & (1 << j) == 0 {
                j += 1;
            }
            let start = c * CS;
            let end = ((first + j) * CS).min(ex.size);
            let n = (j - i) as usize;
            self.queue.take_buffers(n, bufs);
            let result = {
                let mut slices: [&mut [u8]; READER_BATCH as usize] = Default::default();
                for (k, (s, b)) in slices.iter_mut().zip(bufs.iter_mut()).enumerate() {
                    *s = &mut b[..ex.valid(c + k as u64)];
                }
                ex.backend.read_vectored_at(&mut slices[..n], start)
            };
            if let Err(e) = result {
                self.queue.recycle(bufs.drain(..));
                self.queue
                    .recycle(items.drain(..).map(Captured::into_buffer));
                let e = ReadError {
                    device: ex.name.clone(),
                    offset: start,
                    source: e,
                };
                self.abort(e.to_string());
                return Err(());
            }
            let len = end - start;
            self.counters.bytes_read[index].fetch_add(len, Ordering::Relaxed);
            self.counters.reader_bytes.fetch_add(len, Ordering::Relaxed);
            read += len;
            for (k, mut buf) in bufs.drain(..).enumerate() {
                let cn = c + k as u64;
                let mask = pack_cluster_in_place(&mut buf, ex.valid(cn));
                if mask.count() == 0 {
                    self.queue.recycle([buf]);
                    items.push(Captured::zero(dev, cn as u32));
                } else {
                    items.push(Captured::new(dev, cn as u32, mask, buf));
                }
            }
            i = j;
        }
        // Captured: guest writes to these may go on while we queue them.
        ex.set_all(
            items.iter().map(|it| u64::from(it.cluster_num)),
            ClusterState::Copied,
        );
        let n = items.len() as u64;
        if self.queue.push_all(items).is_err() {
            return Err(());
        }
        self.counters
            .reader_clusters
            .fetch_add(n, Ordering::Relaxed);
        Ok(read)
    }
}

/// The real clock for the reader's pacing; its sleeps end early when the
/// backup ends.
struct NapClock<'a> {
    backup: &'a Backup,
    start: Instant,
}

impl Clock for NapClock<'_> {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    fn sleep(&self, d: Duration) {
        let b = self.backup;
        let guard = lock(&b.nap);
        // `over` is set under `abort_reason`, and `wake_all` takes `nap`
        // before notifying, so a wake-up cannot slip in between this check
        // and the wait.
        drop(wait_timeout_while(&b.nap_cond, guard, d, |_| !b.is_over()));
    }
}

/// Makes the calling thread (background reader, stream writer) yield the
/// CPU to the threads serving guest I/O: nice 10 for this thread only (Linux nice
/// values are per thread). Best effort; failure changes nothing else.
pub(super) fn lower_thread_priority() {
    let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 10);
}

impl Backup {
    /// Sets up the calling thread (background reader, stream writer) for
    /// backup work: [`lower_thread_priority`], and bound to `--cpus` if
    /// given ([`Engine::begin`](super::Engine::begin) checked that the
    /// server may use them; should one have gone offline since, the thread
    /// runs where it may).
    pub(super) fn enter_background_thread(&self) {
        lower_thread_priority();
        if let Some(cpus) = &self.options.cpus {
            let _ = cpus.bind_current_thread();
        }
    }
}

#[cfg(test)]
mod tests {
    use rustix::process::{getpriority_process, setpriority_process};
    use rustix::thread::gettid;

    #[test]
    fn only_the_calling_thread_gets_nice_10() {
        let before = getpriority_process(Some(gettid())).unwrap();
        let (start, mine, process) = std::thread::spawn(|| {
            // Start the thread below 10 where allowed (as root, or when the
            // tests run below nice 5), so that the call must change it.
            let _ = setpriority_process(Some(gettid()), 5);
            let start = getpriority_process(Some(gettid())).unwrap();
            super::lower_thread_priority();
            (
                start,
                getpriority_process(Some(gettid())).unwrap(),
                getpriority_process(None).unwrap(),
            )
        })
        .join()
        .unwrap();
        assert!(
            start < 10,
            "cannot test: the thread runs at nice {start} and may not go below"
        );
        assert_eq!(mine, 10);
        // `None` (who = 0) is the calling thread on Linux: the spawned one.
        assert_eq!(process, mine);
        // The thread that spawned it keeps its value.
        assert_eq!(getpriority_process(Some(gettid())).unwrap(), before);
    }
}
