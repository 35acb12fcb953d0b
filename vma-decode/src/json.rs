//! The `--json` documents of `vma-decode list` and `vma-decode extract`,
//! documented field by field in docs/JSON.md. Fields are only ever added,
//! never renamed or removed. Names from the archive are escaped as in
//! every text output (`vma_format::names::escape`).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::Serialize;
use vma_format::names::escape;
use vma_format::{Summary, VmaHeader, BLOCK_SIZE};

/// `list --json`: the header, one object on one line.
#[derive(Serialize, Debug)]
pub struct Listing {
    /// The archive as named on the command line (`<stdin>` for `-`).
    pub archive: String,
    /// The archive's uuid, hyphenated lower-case hex.
    pub uuid: String,
    /// Creation time, seconds since the Unix epoch.
    pub ctime: i64,
    /// Creation time as local ISO-8601 (`2026-12-02T15:04:05+01:00`).
    pub ctime_iso: String,
    /// Config files in header order.
    pub configs: Vec<Config>,
    /// Devices in id order.
    pub devices: Vec<Device>,
}

/// A config file of the header.
#[derive(Serialize, Debug)]
pub struct Config {
    /// Its name.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
}

/// A device of the header.
#[derive(Serialize, Debug)]
pub struct Device {
    /// Device id, 1 to 255.
    pub id: u8,
    /// Its name.
    pub name: String,
    /// Size in bytes as recorded (for `vmstate`, not binding).
    pub size: u64,
    /// Whether this is the RAM-state device `vmstate`.
    pub vmstate: bool,
}

impl Listing {
    /// The listing of `header`, read from `archive`.
    pub fn new(archive: &str, header: &VmaHeader) -> Listing {
        Listing {
            archive: archive.to_string(),
            uuid: uuid_text(header.uuid()),
            ctime: header.ctime(),
            ctime_iso: vma_cli::listing::iso_time(header.ctime()),
            configs: header
                .configs()
                .iter()
                .map(|c| Config {
                    name: escape(c.c_name()),
                    size: c.data.len() as u64,
                })
                .collect(),
            devices: header
                .devices()
                .iter()
                .map(|d| Device {
                    id: d.id,
                    name: escape(d.c_name()),
                    size: d.size,
                    vmstate: d.is_vmstate(),
                })
                .collect(),
        }
    }
}

/// `extract --json`: what was written and what was read, one object on one
/// line, printed once the extract is complete (or, with `--salvage`,
/// partial).
#[derive(Serialize, Debug)]
pub struct Extracted {
    /// The archive as named on the command line (`<stdin>` for `-`).
    pub archive: String,
    /// The output directory as given.
    pub directory: String,
    /// True unless a salvage left clusters missing (exit 4 then).
    pub complete: bool,
    /// Every file written into the directory under its final name.
    pub files: Vec<File>,
    /// Restore-map targets written (`-r`; empty otherwise).
    pub targets: Vec<String>,
    /// Clusters missing (zero in the images), 0 when complete.
    pub missing_clusters: u64,
    /// What the read found.
    pub stats: Stats,
}

/// A file written.
#[derive(Serialize, Debug)]
pub struct File {
    /// Its path: the directory joined with its name.
    pub path: String,
    /// `disk`, `vmstate`, `config` or `salvage-report`.
    pub kind: &'static str,
    /// The device it holds (`disk`, `vmstate`), else null.
    pub device: Option<String>,
    /// Its size in bytes (a disk image: the size the header records).
    pub size: u64,
    /// Bytes it occupies on disk (holes are not allocated).
    pub allocated: u64,
}

/// Counters of the read.
#[derive(Serialize, Debug)]
pub struct Stats {
    /// Extents read.
    pub extents: u64,
    /// Clusters read.
    pub clusters: u64,
    /// Bytes of stored (non-zero) 4 KiB blocks.
    pub stored_bytes: u64,
    /// Archive bytes read (after decompression).
    pub bytes_read: u64,
    /// `verified`, `absent` (archives Proxmox wrote) or `partial`.
    pub data_checksums: &'static str,
    /// Wall-clock seconds the extract took.
    pub seconds: f64,
}

impl Extracted {
    /// The document for an extract of `header` into `dir` that wrote
    /// `files` and `targets`, having read `summary` in `seconds`.
    pub fn new(
        archive: &str,
        dir: &Path,
        header: &VmaHeader,
        report: &crate::extract::ExtractReport,
        seconds: f64,
    ) -> Extracted {
        let files = report
            .files
            .iter()
            .map(|path| {
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let meta = std::fs::symlink_metadata(path).ok();
                let device = header.devices().iter().find(|d| {
                    if d.is_vmstate() {
                        name == "vmstate.bin"
                    } else {
                        name.strip_prefix("disk-")
                            .and_then(|n| n.strip_suffix(".raw"))
                            .is_some_and(|n| n.as_bytes() == d.c_name())
                    }
                });
                let kind = match device {
                    Some(d) if d.is_vmstate() => "vmstate",
                    Some(_) => "disk",
                    None if name == crate::extract::SALVAGE_REPORT => "salvage-report",
                    None => "config",
                };
                File {
                    path: escape(path.as_os_str().as_encoded_bytes()),
                    kind,
                    device: device.map(|d| escape(d.c_name())),
                    size: meta.as_ref().map_or(0, |m| m.len()),
                    allocated: meta.as_ref().map_or(0, |m| m.blocks() * 512),
                }
            })
            .collect();
        let summary: &Summary = &report.summary;
        Extracted {
            archive: archive.to_string(),
            directory: escape(dir.as_os_str().as_encoded_bytes()),
            complete: report.is_complete(),
            files,
            targets: report
                .targets
                .iter()
                .map(|t| escape(t.as_os_str().as_encoded_bytes()))
                .collect(),
            missing_clusters: summary.missing.iter().map(|m| m.count).sum(),
            stats: Stats {
                extents: summary.extents,
                clusters: summary.clusters,
                stored_bytes: summary.data_blocks * BLOCK_SIZE as u64,
                bytes_read: summary.bytes_read,
                data_checksums: summary.data_checksums.describe(),
                seconds,
            },
        }
    }
}

/// A uuid as hyphenated lower-case hex.
pub fn uuid_text(u: [u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}
