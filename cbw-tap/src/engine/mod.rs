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
//!    [`NotCopied`](crate::states::ClusterState::NotCopied) — is installed, and the lock is
//!    released. Guest reads never touch it.
//! 3. One mutex per export around its [`ClusterStates`](crate::states::ClusterStates), with a condition
//!    variable for "a cluster stopped being `Copying`". Never held during
//!    I/O or while waiting for the queue.
//! 4. The [`CaptureQueue`](crate::queue::CaptureQueue) mutex (innermost, never held with another).
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
use std::sync::{Arc, Condvar, Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nbd_server::sync::{lock, read, wait_timeout_while, write};
use nbd_server::Backend;
use vma_format::{Cluster, CLUSTER_SIZE};

mod backend;
mod backup;
pub mod changed;
mod guest;
mod reader;
mod writer;

pub use backend::CbwBackend;
pub use backup::Backup;
pub use changed::Changes;
use vma_format::identity::BaseRef;

pub(crate) const CS: u64 = CLUSTER_SIZE as u64;

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
    /// Capture only the clusters written since the last completed backup
    /// (its base), if there is one; else (first backup, after an unclean
    /// stop or a failed backup) a full backup.
    pub incremental: bool,
    /// The archive uuid (default: a random one); with `--uuid-from` the
    /// same for every backup, the instant then tells them apart.
    pub uuid: Option<[u8; 16]>,
    /// The backup is completed only when [`Engine::confirm`] says so (the
    /// client saw its consumer succeed), not as soon as the stream is
    /// finished.
    pub confirm: bool,
    /// `--cpus`: the CPUs the background reader and the stream writer run
    /// on (`None`: any), so that guest I/O keeps the others. Copies before
    /// guest writes run in the guest's request, wherever it runs.
    pub cpus: Option<crate::cpus::CpuList>,
}

impl Default for BackupOptions {
    fn default() -> Self {
        BackupOptions {
            buffer: 64 << 20,
            cbw_timeout: Duration::from_secs(45),
            policy: Policy::BreakSnapshot,
            bwlimit: None,
            fleecing: None,
            incremental: false,
            uuid: None,
            confirm: false,
            cpus: None,
        }
    }
}

/// Where captured clusters go: the cluster stream in production
/// ([`crate::sink::StreamSink`]), memory in tests.
pub trait CaptureSink {
    /// Takes one captured cluster.
    fn cluster(&mut self, cluster: &Cluster<'_>) -> io::Result<()>;
    /// Takes several captured clusters, in order, each with the checksum
    /// of its cluster-stream record ([`crate::queue::Captured::record_crc`];
    /// the stream sink writes them with one `writev`); by default one
    /// [`cluster`](Self::cluster) each.
    fn clusters<'a>(
        &mut self,
        clusters: impl Iterator<Item = (Cluster<'a>, u32)>,
    ) -> io::Result<()> {
        for (c, _) in clusters {
            self.cluster(&c)?;
        }
        Ok(())
    }
    /// Every cluster was delivered: complete the output.
    fn finish(self) -> io::Result<()>;
    /// The backup failed for `reason`: mark the output as failed if possible.
    fn abort(self, reason: &str) -> io::Result<()>;
}

/// One served export, as the engine sees it.
pub(crate) struct Source {
    pub(crate) name: String,
    pub(crate) backend: Arc<dyn Backend>,
}

/// Why a backup did not finish: the reason it was aborted (the first one
/// given wins), as the server logs it and the client reports it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Aborted(pub String);

impl From<&str> for Aborted {
    fn from(reason: &str) -> Self {
        Aborted(reason.into())
    }
}

impl From<String> for Aborted {
    fn from(reason: String) -> Self {
        Aborted(reason)
    }
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
    changes: Changes,
}

impl Engine {
    /// An engine over `exports` (name and backend each, in device order:
    /// the first becomes device 1 of the stream).
    pub fn new(exports: Vec<(String, Arc<dyn Backend>)>) -> Arc<Engine> {
        let clusters = exports
            .iter()
            .map(|(_, b)| vma_format::clusters_for(b.size()))
            .collect();
        Arc::new(Engine {
            changes: Changes::new(clusters),
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

    /// The changed-cluster tracking (see [`changed`]).
    pub fn changes(&self) -> &Changes {
        &self.changes
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
        if let Some(cpus) = &options.cpus {
            cpus.check_available()
                .map_err(|e| BeginError::Invalid(format!("cpus: {e}")))?;
        }
        let mut busy = lock(&self.busy);
        if busy.as_ref().is_some_and(|b| b.is_over()) {
            busy = wait_timeout_while(&self.ended, busy, Duration::from_secs(10), |b| b.is_some());
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
        let now = || {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64)
        };
        // A backup is named by its archive's uuid and instant: never two
        // backups in the same second after each other.
        if let Some(base) = self.changes.base() {
            while now() <= base.time {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let uuid = options
            .uuid
            .unwrap_or_else(|| uuid::Uuid::new_v4().into_bytes());
        let incremental = options.incremental;
        // Allocate the states before the instant, so the gate is held for
        // as short a time as possible.
        let mut backup = Backup::new(&self.sources, options, fleece, uuid);
        let mut gate = write(&self.gate);
        // The instant: no guest write is in flight while we hold the gate.
        backup.time = now();
        let (changed, base) = self.changes.take();
        backup.generation = self.changes.generation();
        if let (true, Some(base)) = (incremental, base) {
            backup.make_incremental(&changed, base);
        }
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
            let mut gate = write(&self.gate);
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
    /// the calling thread, then [`end`](Self::end). Returns why it was
    /// aborted unless the sink was finished.
    ///
    /// Whatever happens the backup ends, so a later one may begin: a panic
    /// of the sink or the writer aborts it ("internal error: the stream
    /// writer panicked: …") and is not propagated; a panic of the reader
    /// aborts it too (see [`Backup::run_reader`]).
    pub fn run<S, F>(&self, backup: &Arc<Backup>, make_sink: F) -> Result<(), Aborted>
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
                return Err(Aborted(backup.abort_reason().unwrap_or_default()));
            }
        };
        let written =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match make_sink(backup) {
                Ok(sink) => backup.run_writer(sink),
                Err(e) => {
                    backup.abort(format!("writing the cluster stream failed: {e}"));
                    Err(Aborted(backup.abort_reason().unwrap_or_default()))
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
            Err(Aborted(backup.abort_reason().unwrap_or_default()))
        });
        let _ = reader.join();
        if result.is_ok() && !backup.options.confirm {
            self.confirm(backup);
        }
        result
    }

    /// Records `backup` (its stream finished) as completed: the base of the
    /// next incremental backup — unless another backup has begun since its
    /// instant (that one took the changes since; recording this base would
    /// lose them). Returns whether it was recorded.
    pub fn confirm(&self, backup: &Backup) -> bool {
        self.changes.completed(
            BaseRef {
                uuid: backup.identity().uuid,
                time: backup.time(),
            },
            backup.generation,
        )
    }

    pub(crate) fn gate(&self) -> RwLockReadGuard<'_, Option<Arc<Backup>>> {
        read(&self.gate)
    }
}
