//! The copy-before-write engine: the backup instant, the per-cluster copy
//! states, guest writes, the background reader and the stream writer.
//!
//! # Locks, in the order they may be taken
//!
//! 1. [`Engine`]'s `busy` mutex: at most one backup runs; held while a new
//!    backup is installed.
//! 2. The **gate**, `RwLock<Option<Arc<Backup>>>`: every guest WRITE, TRIM
//!    and WRITE_ZEROES holds it shared for its whole duration (copy first,
//!    then the write itself). Taking it exclusively is the **instant**: the
//!    in-flight writes finish, new ones wait (std's `RwLock` prefers
//!    writers), the new backup — every cluster of every export
//!    [`NotCopied`](ClusterState::NotCopied) — is installed, and the lock is
//!    released. Guest reads never touch it.
//! 3. One mutex per export around its [`ClusterStates`], with a condition
//!    variable for "a cluster stopped being `Copying`". Never held during
//!    I/O or while waiting for the queue.
//! 4. The [`CaptureQueue`] mutex (innermost, never held with another).
//!
//! # Who copies a cluster
//!
//! Whoever moves it from `NotCopied` to `Copying` (under the export mutex)
//! owns it until it is `Copied`; anyone else who needs it waits on the
//! condition variable and never reads it. A guest write claims the
//! not-copied clusters it touches, reads each one (one read per cluster, or
//! none if `SEEK_DATA`/`SEEK_HOLE` show it is a hole), queues it, marks it
//! copied, waits for the clusters others are copying, and only then writes.
//! The background reader claims runs of up to 4 clusters, reads each data
//! run with one read, marks them copied and queues them. A cluster is thus
//! captured before any write that the gate lets in after the instant, and
//! exactly once.
//!
//! A copy can fail: a guest write's queue push times out (`--cbw-timeout`),
//! or a read fails. With [`Policy::BreakSnapshot`] the backup is aborted
//! and the write goes through; with [`Policy::BreakGuestWrite`] the write
//! fails with `EIO`, its unqueued clusters go back to `NotCopied` (the
//! background reader copies them later) and the backup goes on. A dead
//! consumer or a read error of the background reader ends the backup
//! whatever the policy; once a backup is over, guest writes pass through.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nbd_server::{Backend, Extent, ZeroFlags};
use vma_format::{clusters_for, zero::pack_cluster, BlockMask, Cluster, ClusterBuf, CLUSTER_SIZE};

use crate::pace::{Clock, TokenBucket};
use crate::queue::{CaptureQueue, PushError, Pushed};
use crate::states::{ClusterState, ClusterStates};
use crate::stats::{Counters, Stats};

const CS: u64 = CLUSTER_SIZE as u64;

/// Clusters the background reader claims and reads at once (256 KiB): few
/// enough that a guest write waiting for one of them (the reader runs at
/// nice 10 and may be preempted while it holds them) waits briefly.
pub const READER_BATCH: u64 = 4;

/// Smallest `--buffer`: one full cluster (a cluster is always admitted into
/// an empty queue, so this is enough to make progress).
pub const MIN_BUFFER: usize = CLUSTER_SIZE;

/// What to do when copying a cluster before a guest write fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Policy {
    /// Abort the backup and let the guest write through (Proxmox's choice).
    #[default]
    BreakSnapshot,
    /// Fail the guest write with `EIO`; the backup goes on (QEMU's default).
    BreakGuestWrite,
}

impl Policy {
    /// The command-line spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::BreakSnapshot => "break-snapshot",
            Policy::BreakGuestWrite => "break-guest-write",
        }
    }

    /// Parses the command-line spelling.
    pub fn parse(s: &str) -> Option<Policy> {
        match s {
            "break-snapshot" => Some(Policy::BreakSnapshot),
            "break-guest-write" => Some(Policy::BreakGuestWrite),
            _ => None,
        }
    }
}

/// Settings of one backup.
#[derive(Clone, Debug)]
pub struct BackupOptions {
    /// Bytes of captured clusters that may wait for the consumer (at least
    /// [`MIN_BUFFER`]).
    pub buffer: usize,
    /// How long a guest write may wait for its copy (queue space, or a
    /// cluster someone else copies).
    pub cbw_timeout: Duration,
    /// What happens when that wait times out or the read fails.
    pub policy: Policy,
    /// Most bytes per second the background reader reads (`None`: as fast
    /// as the consumer takes them), so a backup leaves CPU and disk time
    /// to the guests. Only the reader's own reads count (see
    /// [`crate::pace`]): copy-before-write reads are never limited nor
    /// charged, holes are not read at all.
    pub bwlimit: Option<u64>,
    /// Fleecing: a file (created by the backup, mode 0600, removed at its
    /// end; it must not exist) where copy-before-write puts old clusters
    /// when the buffer is full, instead of making the guest wait.
    pub fleecing: Option<std::path::PathBuf>,
}

impl Default for BackupOptions {
    fn default() -> Self {
        BackupOptions {
            buffer: 64 << 20,
            cbw_timeout: Duration::from_secs(45),
            policy: Policy::BreakSnapshot,
            bwlimit: None,
            fleecing: None,
        }
    }
}

/// Where captured clusters go: the cluster stream in production
/// ([`crate::sink::StreamSink`]), memory in tests.
pub trait CaptureSink {
    /// Takes one captured cluster.
    fn cluster(&mut self, cluster: &Cluster<'_>) -> io::Result<()>;
    /// Every cluster was delivered: complete the output.
    fn finish(self) -> io::Result<()>;
    /// The backup failed for `reason`: mark the output as failed if possible.
    fn abort(self, reason: &str) -> io::Result<()>;
}

/// One served export, as the engine sees it.
struct Source {
    name: String,
    backend: Arc<dyn Backend>,
}

/// Why a backup could not start.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BeginError {
    /// Another backup is running.
    #[error("a backup is already running (started at {})", vma_cli::listing::iso_time(*.0))]
    Busy(i64),
    /// The options cannot work.
    #[error("{0}")]
    Invalid(String),
}

/// The shared state of all exports of one server: the gate and the current
/// backup. Create it with the exports, then hand out one [`CbwBackend`] per
/// export to the NBD server.
pub struct Engine {
    sources: Vec<Source>,
    gate: RwLock<Option<Arc<Backup>>>,
    busy: Mutex<Option<Arc<Backup>>>,
    ended: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Engine {
    /// An engine over `exports` (name and backend each, in device order:
    /// the first becomes device 1 of the stream).
    pub fn new(exports: Vec<(String, Arc<dyn Backend>)>) -> Arc<Engine> {
        Arc::new(Engine {
            sources: exports
                .into_iter()
                .map(|(name, backend)| Source { name, backend })
                .collect(),
            gate: RwLock::new(None),
            busy: Mutex::new(None),
            ended: Condvar::new(),
        })
    }

    /// Names of the exports, in device order.
    pub fn export_names(&self) -> impl Iterator<Item = &str> {
        self.sources.iter().map(|s| s.name.as_str())
    }

    /// The backend to serve for export `index`: the image with
    /// copy-before-write in front of its writes.
    ///
    /// # Panics
    /// If `index` is not an export's index.
    pub fn backend(self: &Arc<Self>, index: usize) -> CbwBackend {
        CbwBackend {
            engine: Arc::clone(self),
            index,
            inner: Arc::clone(&self.sources[index].backend),
        }
    }

    /// The running backup, if any (also one that is over but not yet ended).
    pub fn current(&self) -> Option<Arc<Backup>> {
        lock(&self.busy).clone()
    }

    /// Takes the backup instant and returns the new backup, whose clusters
    /// are all `NotCopied`. Nothing is copied until the caller runs
    /// [`Backup::run_reader`] (in a thread) and [`Backup::run_writer`], and
    /// calls [`end`](Self::end) after both.
    ///
    /// Refused while another backup runs; one that is over and about to end
    /// is waited for (up to 10 s).
    pub fn begin(&self, options: BackupOptions) -> Result<Arc<Backup>, BeginError> {
        if options.buffer < MIN_BUFFER {
            return Err(BeginError::Invalid(format!(
                "buffer of {} bytes is smaller than the minimum {MIN_BUFFER}",
                options.buffer
            )));
        }
        let mut busy = lock(&self.busy);
        if busy.as_ref().is_some_and(|b| b.is_over()) {
            busy = self
                .ended
                .wait_timeout_while(busy, Duration::from_secs(10), |b| b.is_some())
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if let Some(b) = busy.as_ref() {
            return Err(BeginError::Busy(b.time()));
        }
        let fleece = match &options.fleecing {
            None => None,
            Some(path) => {
                use std::os::unix::fs::OpenOptionsExt;
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|e| {
                        BeginError::Invalid(format!("fleecing file {}: {e}", path.display()))
                    })?;
                Some(file)
            }
        };
        // Allocate the states before the instant, so the gate is held for
        // as short a time as possible.
        let mut backup = Backup::new(&self.sources, options, fleece);
        let mut gate = self.gate.write().unwrap_or_else(|e| e.into_inner());
        // The instant: no guest write is in flight while we hold the gate.
        backup.time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let backup = Arc::new(backup);
        *gate = Some(Arc::clone(&backup));
        drop(gate);
        *busy = Some(Arc::clone(&backup));
        Ok(backup)
    }

    /// Tears `backup` down after its reader and writer have returned: marks
    /// it over (waking anyone still waiting on it), waits for the guest
    /// writes in flight, and frees its state. A new backup may then begin.
    pub fn end(&self, backup: &Arc<Backup>) {
        backup.set_over();
        if let Some(path) = &backup.options.fleecing {
            let _ = std::fs::remove_file(path);
        }
        {
            let mut gate = self.gate.write().unwrap_or_else(|e| e.into_inner());
            if gate.as_ref().is_some_and(|b| Arc::ptr_eq(b, backup)) {
                *gate = None;
            }
        }
        let mut busy = lock(&self.busy);
        if busy.as_ref().is_some_and(|b| Arc::ptr_eq(b, backup)) {
            *busy = None;
        }
        drop(busy);
        self.ended.notify_all();
    }

    /// Runs `backup` (just begun) to its end: the background reader in its
    /// own thread, the stream writer into the sink `make_sink` returns on
    /// the calling thread, then [`end`](Self::end). Returns `Err(reason)`
    /// unless the sink was finished.
    ///
    /// Whatever happens the backup ends, so a later one may begin: a panic
    /// of the sink or the writer aborts it ("internal error: the stream
    /// writer panicked: …") and is not propagated; a panic of the reader
    /// aborts it too (see [`Backup::run_reader`]).
    pub fn run<S, F>(&self, backup: &Arc<Backup>, make_sink: F) -> Result<(), String>
    where
        S: CaptureSink,
        F: FnOnce(&Backup) -> io::Result<S>,
    {
        /// Ends the backup however this function is left.
        struct Ender<'a>(&'a Engine, &'a Arc<Backup>);
        impl Drop for Ender<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    self.1.abort("internal error: the backup thread panicked");
                }
                self.0.end(self.1);
            }
        }
        let _ender = Ender(self, backup);
        let reader = {
            let backup = Arc::clone(backup);
            std::thread::Builder::new()
                .name("cbw-reader".into())
                .spawn(move || backup.run_reader())
        };
        let reader = match reader {
            Ok(t) => t,
            Err(e) => {
                backup.abort(format!("cannot start the background reader: {e}"));
                return Err(backup.abort_reason().unwrap_or_default());
            }
        };
        let written =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match make_sink(backup) {
                Ok(sink) => backup.run_writer(sink),
                Err(e) => {
                    backup.abort(format!("writing the cluster stream failed: {e}"));
                    Err(backup.abort_reason().unwrap_or_default())
                }
            }));
        let result = written.unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            backup.abort(format!(
                "internal error: the stream writer panicked: {what}"
            ));
            Err(backup.abort_reason().unwrap_or_default())
        });
        let _ = reader.join();
        result
    }

    fn gate(&self) -> RwLockReadGuard<'_, Option<Arc<Backup>>> {
        self.gate.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// One export of a backup.
struct ExportCopy {
    name: String,
    backend: Arc<dyn Backend>,
    size: u64,
    clusters: u64,
    states: Mutex<ClusterStates>,
    cond: Condvar,
}

impl ExportCopy {
    /// Marks `clusters` as `state` and wakes waiters if there are any.
    fn set_all(&self, clusters: impl IntoIterator<Item = u64>, state: ClusterState) {
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
    fn hole_clusters(&self, first: u64, count: u64) -> u64 {
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
    fn valid(&self, c: u64) -> usize {
        (self.size - c * CS).min(CS) as usize
    }
}

/// A running backup: the copy states of every export, the queue of captured
/// clusters, counters, and whether it is over.
pub struct Backup {
    time: i64,
    exports: Vec<ExportCopy>,
    queue: CaptureQueue,
    options: BackupOptions,
    over: AtomicBool,
    abort_reason: Mutex<Option<String>>,
    counters: Counters,
    started: Instant,
    /// The reader's `--bwlimit` sleeps wait here, so that the end of the
    /// backup wakes them.
    nap: Mutex<()>,
    nap_cond: Condvar,
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

/// Why a guest write's copy failed.
enum CopyFailure {
    Timeout,
    Closed,
    Io(String),
}

thread_local! {
    /// One cluster of raw data for the copy a guest write makes.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Backup {
    fn new(sources: &[Source], options: BackupOptions, fleece: Option<std::fs::File>) -> Backup {
        let exports: Vec<ExportCopy> = sources
            .iter()
            .map(|s| {
                let size = s.backend.size();
                let clusters = clusters_for(size);
                ExportCopy {
                    name: s.name.clone(),
                    backend: Arc::clone(&s.backend),
                    size,
                    clusters,
                    states: Mutex::new(ClusterStates::new(clusters)),
                    cond: Condvar::new(),
                }
            })
            .collect();
        Backup {
            time: 0,
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

    fn set_over(&self) {
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

    // ------------------------------------------------------------ guest writes

    /// Called by export `index` before a guest write to
    /// `offset..offset + len` (inside the export, `len > 0`), with the gate
    /// held: makes sure every cluster it touches has been captured.
    /// `Err` only under [`Policy::BreakGuestWrite`].
    fn before_guest_write(&self, index: usize, offset: u64, len: u64) -> io::Result<()> {
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
                let (mut st, _) = ex
                    .cond
                    .wait_timeout(st, deadline - now)
                    .unwrap_or_else(|e| e.into_inner());
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
                ClusterBuf {
                    dev_id: (index + 1) as u8,
                    cluster_num: c as u32,
                    mask: BlockMask::EMPTY,
                    data: Vec::new(),
                }
            } else {
                match self.read_cluster(index, c) {
                    Ok(item) => item,
                    Err(e) => {
                        result = Err(CopyFailure::Io(e));
                        break;
                    }
                }
            };
            let len = item.data.len() as u64;
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
                Err(PushError::Spill(e)) => {
                    result = Err(CopyFailure::Io(e));
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

    /// Reads and packs one cluster for a guest write: one read.
    fn read_cluster(&self, index: usize, c: u64) -> Result<ClusterBuf, String> {
        let ex = &self.exports[index];
        let valid = ex.valid(c);
        let mut data = self.queue.take_buffer();
        let packed = SCRATCH.with(|s| {
            let mut raw = s.borrow_mut();
            raw.resize(CLUSTER_SIZE, 0);
            ex.backend
                .read_at(&mut raw[..valid], c * CS)
                .map(|()| pack_cluster(&raw[..valid], valid, &mut data))
        });
        match packed {
            Ok((mask, used)) => {
                self.counters.cbw_reads.fetch_add(1, Ordering::Relaxed);
                self.counters.bytes_read[index].fetch_add(valid as u64, Ordering::Relaxed);
                self.counters
                    .cbw_bytes
                    .fetch_add(valid as u64, Ordering::Relaxed);
                data.truncate(used);
                Ok(ClusterBuf {
                    dev_id: (index + 1) as u8,
                    cluster_num: c as u32,
                    mask,
                    data,
                })
            }
            Err(e) => {
                self.queue.recycle(data);
                Err(format!("reading {} at offset {}: {e}", ex.name, c * CS))
            }
        }
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

    // -------------------------------------------------------- background reader

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
        lower_thread_priority();
        let mut pacer = self
            .options
            .bwlimit
            .filter(|&l| l > 0)
            .map(|l| TokenBucket::new(l, READER_BATCH * CS, clock.now()));
        let mut raw = vec![0u8; (READER_BATCH * CS) as usize];
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
                    let Ok(read) = self.copy_batch(index, c, end - c, claimed, &mut raw) else {
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
                        st = ex.cond.wait(st).unwrap_or_else(|e| e.into_inner());
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
                        let Ok(read) = self.copy_batch(index, k, 1, 1, &mut raw) else {
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
    /// count`: holes without reading, each data run with one read. Returns
    /// the bytes read.
    fn copy_batch(
        &self,
        index: usize,
        first: u64,
        count: u64,
        claimed: u64,
        raw: &mut [u8],
    ) -> Result<u64, ()> {
        let ex = &self.exports[index];
        let mut read = 0u64;
        let holes = ex.hole_clusters(first, count) & claimed;
        let mut items: Vec<ClusterBuf> = Vec::with_capacity(count as usize);
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
                items.push(ClusterBuf {
                    dev_id: (index + 1) as u8,
                    cluster_num: c as u32,
                    mask: BlockMask::EMPTY,
                    data: Vec::new(),
                });
                i += 1;
                continue;
            }
            // A run of claimed data clusters: one read.
            let mut j = i;
            while j < count && claimed & (1 << j) != 0 && holes & (1 << j) == 0 {
                j += 1;
            }
            let start = c * CS;
            let end = ((first + j) * CS).min(ex.size);
            let len = (end - start) as usize;
            if let Err(e) = ex.backend.read_at(&mut raw[..len], start) {
                for it in items {
                    self.queue.recycle(it.data);
                }
                self.abort(format!("reading {} at offset {start}: {e}", ex.name));
                return Err(());
            }
            self.counters.bytes_read[index].fetch_add(len as u64, Ordering::Relaxed);
            self.counters
                .reader_bytes
                .fetch_add(len as u64, Ordering::Relaxed);
            read += len as u64;
            for k in i..j {
                let cn = first + k;
                let off = ((k - i) * CS) as usize;
                let valid = ex.valid(cn);
                let mut data = self.queue.take_buffer();
                let (mask, used) = pack_cluster(&raw[off..off + valid], valid, &mut data);
                data.truncate(used);
                items.push(ClusterBuf {
                    dev_id: (index + 1) as u8,
                    cluster_num: cn as u32,
                    mask,
                    data,
                });
            }
            i = j;
        }
        // Captured: guest writes to these may go on while we queue them.
        ex.set_all(
            items.iter().map(|it| u64::from(it.cluster_num)),
            ClusterState::Copied,
        );
        for item in items {
            if self.queue.push(item, None, false).is_err() {
                return Err(());
            }
            self.counters
                .reader_clusters
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(read)
    }

    // ------------------------------------------------------------------ writer

    /// Drains the queue into `sink` until the reader has closed it, then
    /// finishes the sink — or, if the backup was aborted, aborts the sink
    /// with the reason. A sink error (the consumer is gone) aborts the
    /// backup. Returns `Err(reason)` unless the sink was finished.
    /// Like the reader, the calling thread gets nice 10 for the rest of its
    /// life (backup work yields to guest I/O).
    pub fn run_writer<S: CaptureSink>(&self, mut sink: S) -> Result<(), String> {
        lower_thread_priority();
        let mut emitted = 0u64;
        let drained = loop {
            match self.queue.pop() {
                Some(Err(e)) => break Err(e),
                Some(Ok(item)) => {
                    if let Err(e) = sink.cluster(&item.as_cluster()) {
                        break Err(format!("writing the cluster stream failed: {e}"));
                    }
                    emitted += 1;
                    self.counters.emitted.fetch_add(1, Ordering::Relaxed);
                    self.queue.recycle(item.data);
                }
                None => break Ok(()),
            }
        };
        let fail = |reason: String, sink: S| {
            self.abort(reason);
            let reason = self.abort_reason().unwrap_or_default();
            let _ = sink.abort(&reason);
            Err(reason)
        };
        if let Err(reason) = drained {
            return fail(reason, sink);
        }
        if let Some(reason) = self.abort_reason() {
            let _ = sink.abort(&reason);
            return Err(reason);
        }
        if emitted != self.total_clusters() {
            return fail(
                format!(
                    "internal error: {emitted} clusters captured, {} expected",
                    self.total_clusters()
                ),
                sink,
            );
        }
        // Finish while still "running", so a late abort (client gone) is
        // not mistaken for success.
        match sink.finish() {
            Ok(()) => Ok(()),
            Err(e) => {
                let reason = format!("finishing the cluster stream failed: {e}");
                self.abort(reason.clone());
                Err(reason)
            }
        }
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
        let _ = b
            .nap_cond
            .wait_timeout_while(guard, d, |_| !b.is_over())
            .unwrap_or_else(|e| e.into_inner());
    }
}

/// Makes the calling thread (background reader, stream writer) yield the
/// CPU to the threads serving guest I/O: nice 10 for this thread only (Linux nice
/// values are per thread). Best effort; failure changes nothing else.
fn lower_thread_priority() {
    // SAFETY: gettid and setpriority take plain integers and touch only
    // this thread's scheduling priority.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
}

/// An export served with copy-before-write: reads go straight to the image;
/// writes, trims and write-zeroes first make sure the running backup (if
/// any) has captured the clusters they touch.
pub struct CbwBackend {
    engine: Arc<Engine>,
    index: usize,
    inner: Arc<dyn Backend>,
}

impl CbwBackend {
    fn guarded(
        &self,
        offset: u64,
        len: u64,
        op: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<()> {
        let gate = self.engine.gate();
        if let Some(backup) = gate.as_ref() {
            if !backup.is_over() {
                backup.before_guest_write(self.index, offset, len)?;
            }
        }
        op()
    }
}

impl Backend for CbwBackend {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_only(&self) -> bool {
        self.inner.read_only()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.guarded(offset, buf.len() as u64, || {
            self.inner.write_at(buf, offset, fua)
        })
    }

    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.guarded(offset, len, || self.inner.trim(offset, len))
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        self.guarded(offset, len, || self.inner.write_zeroes(offset, len, flags))
    }

    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.inner.block_status(offset, len)
    }

    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.cache(offset, len)
    }

    /// All connections share this backend, the image and the gate, so a
    /// flush on one covers all: multi-conn is safe when the image's is.
    fn can_multi_conn(&self) -> bool {
        self.inner.can_multi_conn()
    }
}
