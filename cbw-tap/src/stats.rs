//! Counters of a backup, and their report.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

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

/// What a backup did, as reported at its end; in JSON (the final status
/// of the control protocol, `cbw-tap backup --json`) with durations as
/// float seconds in fields named `…_seconds` and `bytes_read` as
/// `[{"device":…,"bytes":…}]`. Missing fields read as 0.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
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
    #[serde(with = "device_bytes")]
    pub bytes_read: Vec<(String, u64)>,
    /// Bytes the background reader read, all images together: what
    /// `--bwlimit` limits.
    pub reader_bytes_read: u64,
    /// Bytes copy-before-write read, all images together: never limited.
    pub cbw_bytes_read: u64,
    /// Time the background reader waited for `--bwlimit`.
    #[serde(rename = "reader_pace_wait_seconds", with = "seconds")]
    pub reader_pace_wait: Duration,
    /// Cluster records handed to the stream.
    pub clusters_emitted: u64,
    /// Bytes of cluster stream written (preamble, records, end or abort).
    pub bytes_emitted: u64,
    /// Guest writes that waited for a copy (their own or another's).
    pub guest_writes_delayed: u64,
    /// The longest such wait.
    #[serde(rename = "longest_delay_seconds", with = "seconds")]
    pub longest_delay: Duration,
    /// All such waits added up.
    #[serde(rename = "total_delay_seconds", with = "seconds")]
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
    #[serde(rename = "elapsed_seconds", with = "seconds")]
    pub elapsed: Duration,
}

impl Stats {
    /// As JSON (durations in seconds, as floats).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// Parses [`to_json`](Self::to_json)'s output; missing fields are 0,
    /// and so is everything if it is not such an object.
    pub fn from_json(v: &Value) -> Stats {
        Stats::deserialize(v).unwrap_or_default()
    }
}

/// Durations as float seconds; negative, non-finite or huge ones read as 0.
mod seconds {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let x = f64::deserialize(d)?;
        Ok(Duration::try_from_secs_f64(x).unwrap_or_default())
    }
}

/// `bytes_read` as a list of `{"device":NAME,"bytes":N}`.
mod device_bytes {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    struct Entry {
        #[serde(default)]
        device: String,
        #[serde(default)]
        bytes: u64,
    }

    pub fn serialize<S: Serializer>(v: &[(String, u64)], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|(device, bytes)| Entry {
            device: device.clone(),
            bytes: *bytes,
        }))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(String, u64)>, D::Error> {
        let v = Vec::<Entry>::deserialize(d)?;
        Ok(v.into_iter().map(|e| (e.device, e.bytes)).collect())
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
