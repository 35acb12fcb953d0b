//! Counters of a backup, and their report.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{json, Value};

/// Live counters, updated with relaxed atomics from every thread.
pub(crate) struct Counters {
    pub reader_clusters: AtomicU64,
    pub reader_holes: AtomicU64,
    pub cbw_clusters: AtomicU64,
    pub cbw_reads: AtomicU64,
    pub cbw_holes: AtomicU64,
    pub bytes_read: Vec<AtomicU64>,
    pub reader_bytes: AtomicU64,
    pub cbw_bytes: AtomicU64,
    pub pace_wait_ns: AtomicU64,
    pub emitted: AtomicU64,
    pub bytes_emitted: AtomicU64,
    pub writes_delayed: AtomicU64,
    pub longest_delay_ns: AtomicU64,
    pub total_delay_ns: AtomicU64,
    pub guest_writes_failed: AtomicU64,
    pub snapshot_breaks: AtomicU64,
    pub spilled_clusters: AtomicU64,
    pub spilled_bytes: AtomicU64,
}

impl Counters {
    pub fn new(exports: usize) -> Counters {
        Counters {
            reader_clusters: AtomicU64::new(0),
            reader_holes: AtomicU64::new(0),
            cbw_clusters: AtomicU64::new(0),
            cbw_reads: AtomicU64::new(0),
            cbw_holes: AtomicU64::new(0),
            bytes_read: (0..exports).map(|_| AtomicU64::new(0)).collect(),
            reader_bytes: AtomicU64::new(0),
            cbw_bytes: AtomicU64::new(0),
            pace_wait_ns: AtomicU64::new(0),
            emitted: AtomicU64::new(0),
            bytes_emitted: AtomicU64::new(0),
            writes_delayed: AtomicU64::new(0),
            longest_delay_ns: AtomicU64::new(0),
            total_delay_ns: AtomicU64::new(0),
            guest_writes_failed: AtomicU64::new(0),
            snapshot_breaks: AtomicU64::new(0),
            spilled_clusters: AtomicU64::new(0),
            spilled_bytes: AtomicU64::new(0),
        }
    }

    /// A guest write waited `d` for copies before going through.
    pub fn delayed(&self, d: Duration) {
        let ns = d.as_nanos().min(u128::from(u64::MAX)) as u64;
        self.writes_delayed.fetch_add(1, Ordering::Relaxed);
        self.total_delay_ns.fetch_add(ns, Ordering::Relaxed);
        self.longest_delay_ns.fetch_max(ns, Ordering::Relaxed);
    }

    pub fn snapshot(&self, names: Vec<String>, elapsed: Duration) -> Stats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            reader_clusters: get(&self.reader_clusters),
            reader_hole_clusters: get(&self.reader_holes),
            cbw_clusters: get(&self.cbw_clusters),
            cbw_reads: get(&self.cbw_reads),
            cbw_hole_clusters: get(&self.cbw_holes),
            bytes_read: names
                .into_iter()
                .zip(self.bytes_read.iter().map(get))
                .collect(),
            reader_bytes_read: get(&self.reader_bytes),
            cbw_bytes_read: get(&self.cbw_bytes),
            reader_pace_wait: Duration::from_nanos(get(&self.pace_wait_ns)),
            clusters_emitted: get(&self.emitted),
            bytes_emitted: get(&self.bytes_emitted),
            guest_writes_delayed: get(&self.writes_delayed),
            longest_delay: Duration::from_nanos(get(&self.longest_delay_ns)),
            total_delay: Duration::from_nanos(get(&self.total_delay_ns)),
            guest_writes_failed: get(&self.guest_writes_failed),
            snapshot_breaks: get(&self.snapshot_breaks),
            spilled_clusters: get(&self.spilled_clusters),
            spilled_bytes: get(&self.spilled_bytes),
            elapsed,
        }
    }
}

/// What a backup did, as reported at its end.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Stats {
    /// Clusters captured by the background reader (holes included).
    pub reader_clusters: u64,
    /// Of those, clusters found to be holes and captured without a read.
    pub reader_hole_clusters: u64,
    /// Clusters captured by copy-before-write, i.e. by a guest write.
    pub cbw_clusters: u64,
    /// Cluster reads made by copy-before-write: one per captured cluster
    /// that was not a hole.
    pub cbw_reads: u64,
    /// Clusters captured by copy-before-write that were holes (no read).
    pub cbw_hole_clusters: u64,
    /// Bytes read from each image (export name, bytes), in device order:
    /// by the background reader and by copy-before-write together.
    pub bytes_read: Vec<(String, u64)>,
    /// Bytes the background reader read, all images together: what
    /// `--bwlimit` limits.
    pub reader_bytes_read: u64,
    /// Bytes copy-before-write read, all images together: never limited.
    pub cbw_bytes_read: u64,
    /// Time the background reader waited for `--bwlimit`.
    pub reader_pace_wait: Duration,
    /// Cluster records handed to the stream.
    pub clusters_emitted: u64,
    /// Bytes of cluster stream written (preamble, records, end or abort).
    pub bytes_emitted: u64,
    /// Guest writes that waited for a copy (their own or another's).
    pub guest_writes_delayed: u64,
    /// The longest such wait.
    pub longest_delay: Duration,
    /// All such waits added up.
    pub total_delay: Duration,
    /// Guest writes failed with `EIO` (break-guest-write).
    pub guest_writes_failed: u64,
    /// Copy failures that aborted the backup (break-snapshot).
    pub snapshot_breaks: u64,
    /// Clusters copy-before-write put into the fleecing file.
    pub spilled_clusters: u64,
    /// Their data bytes.
    pub spilled_bytes: u64,
    /// Time from the instant to now (or to the end).
    pub elapsed: Duration,
}

impl Stats {
    /// As JSON (durations in seconds, as floats).
    pub fn to_json(&self) -> Value {
        json!({
            "reader_clusters": self.reader_clusters,
            "reader_hole_clusters": self.reader_hole_clusters,
            "cbw_clusters": self.cbw_clusters,
            "cbw_reads": self.cbw_reads,
            "cbw_hole_clusters": self.cbw_hole_clusters,
            "bytes_read": self.bytes_read.iter()
                .map(|(n, b)| json!({"device": n, "bytes": b}))
                .collect::<Vec<_>>(),
            "reader_bytes_read": self.reader_bytes_read,
            "cbw_bytes_read": self.cbw_bytes_read,
            "reader_pace_wait_seconds": self.reader_pace_wait.as_secs_f64(),
            "clusters_emitted": self.clusters_emitted,
            "bytes_emitted": self.bytes_emitted,
            "guest_writes_delayed": self.guest_writes_delayed,
            "longest_delay_seconds": self.longest_delay.as_secs_f64(),
            "total_delay_seconds": self.total_delay.as_secs_f64(),
            "guest_writes_failed": self.guest_writes_failed,
            "snapshot_breaks": self.snapshot_breaks,
            "spilled_clusters": self.spilled_clusters,
            "spilled_bytes": self.spilled_bytes,
            "elapsed_seconds": self.elapsed.as_secs_f64(),
        })
    }

    /// Parses [`to_json`](Self::to_json)'s output; missing fields are 0.
    pub fn from_json(v: &Value) -> Stats {
        let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        let d = |k: &str| {
            Duration::from_secs_f64(
                v.get(k)
                    .and_then(Value::as_f64)
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .unwrap_or(0.0),
            )
        };
        Stats {
            reader_clusters: n("reader_clusters"),
            reader_hole_clusters: n("reader_hole_clusters"),
            cbw_clusters: n("cbw_clusters"),
            cbw_reads: n("cbw_reads"),
            cbw_hole_clusters: n("cbw_hole_clusters"),
            bytes_read: v
                .get("bytes_read")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .map(|e| {
                            (
                                e.get("device")
                                    .and_then(Value::as_str)
                                    .unwrap_or("")
                                    .to_string(),
                                e.get("bytes").and_then(Value::as_u64).unwrap_or(0),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default(),
            reader_bytes_read: n("reader_bytes_read"),
            cbw_bytes_read: n("cbw_bytes_read"),
            reader_pace_wait: d("reader_pace_wait_seconds"),
            clusters_emitted: n("clusters_emitted"),
            bytes_emitted: n("bytes_emitted"),
            guest_writes_delayed: n("guest_writes_delayed"),
            longest_delay: d("longest_delay_seconds"),
            total_delay: d("total_delay_seconds"),
            guest_writes_failed: n("guest_writes_failed"),
            snapshot_breaks: n("snapshot_breaks"),
            spilled_clusters: n("spilled_clusters"),
            spilled_bytes: n("spilled_bytes"),
            elapsed: d("elapsed_seconds"),
        }
    }
}

impl fmt::Display for Stats {
    /// A few lines for humans (stderr of `cbw-tap backup`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "clusters: {} emitted; {} by the background reader ({} holes), {} by copy-before-write ({} reads, {} holes)",
            self.clusters_emitted,
            self.reader_clusters,
            self.reader_hole_clusters,
            self.cbw_clusters,
            self.cbw_reads,
            self.cbw_hole_clusters
        )?;
        for (name, bytes) in &self.bytes_read {
            writeln!(f, "read from {name}: {bytes} bytes")?;
        }
        writeln!(
            f,
            "read: {} bytes by the background reader (--bwlimit applies; it waited {:.3} s for it), {} bytes by copy-before-write (never limited)",
            self.reader_bytes_read,
            self.reader_pace_wait.as_secs_f64(),
            self.cbw_bytes_read
        )?;
        writeln!(f, "stream: {} bytes emitted", self.bytes_emitted)?;
        if self.spilled_clusters > 0 {
            writeln!(
                f,
                "fleecing: {} clusters ({} bytes) went through the fleecing file",
                self.spilled_clusters, self.spilled_bytes
            )?;
        }
        write!(
            f,
            "guest writes delayed: {}, longest delay {:.3} ms, failed: {}; time {:.3} s",
            self.guest_writes_delayed,
            self.longest_delay.as_secs_f64() * 1000.0,
            self.guest_writes_failed,
            self.elapsed.as_secs_f64()
        )
    }
}
