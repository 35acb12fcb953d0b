//! `vma-encode --json`: what the archive made holds, one JSON object on
//! one line on stderr once the archive is complete (the archive itself may
//! be on stdout). Documented field by field in docs/JSON.md; fields are
//! only ever added, never renamed or removed.

use serde::Serialize;
use vma_format::CLUSTER_SIZE;

/// The statistics of an archive written.
#[derive(Serialize, Debug, Clone)]
pub struct EncodeStats {
    /// Where the archive went: the path of `-o`, or `stdout`.
    pub output: String,
    /// The archive's uuid, hyphenated lower-case hex.
    pub uuid: String,
    /// Its creation time, seconds since the Unix epoch.
    pub ctime: i64,
    /// Config files stored, in header order.
    pub configs: Vec<ConfigStats>,
    /// Devices, in id order.
    pub devices: Vec<DeviceStats>,
    /// Bytes of the archive written.
    pub archive_bytes: u64,
    /// Whether extents carry our data checksum (no `--no-data-checksums`).
    pub data_checksums: bool,
    /// Wall-clock seconds from the first source read to the archive in place.
    pub seconds: f64,
}

/// A config file stored.
#[derive(Serialize, Debug, Clone)]
pub struct ConfigStats {
    /// The name it is stored under.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
}

/// A device stored.
#[derive(Serialize, Debug, Clone)]
pub struct DeviceStats {
    /// Device id, 1-based.
    pub id: u8,
    /// Its name.
    pub name: String,
    /// Its size as recorded (rounded up to 512 bytes).
    pub size: u64,
    /// Clusters written (every cluster of a disk; as many as it has for vmstate).
    pub clusters: u64,
    /// Bytes of 4 KiB blocks stored.
    pub stored_bytes: u64,
    /// Bytes of zero 4 KiB blocks, not stored (whole blocks, as Proxmox counts them).
    pub zero_bytes: u64,
}

impl DeviceStats {
    /// From the writer's counters of device `id`.
    pub fn from_writer(id: u8, d: &vma_format::writer::DeviceStats) -> DeviceStats {
        DeviceStats {
            id,
            name: vma_format::names::escape(d.name.as_bytes()),
            size: d.size,
            clusters: d.clusters_written,
            stored_bytes: (d.clusters_written * CLUSTER_SIZE as u64).saturating_sub(d.zero_bytes),
            zero_bytes: d.zero_bytes,
        }
    }
}

/// A uuid as hyphenated lower-case hex.
pub fn uuid_text(u: [u8; 16]) -> String {
    uuid::Uuid::from_bytes(u).hyphenated().to_string()
}
