//! Verifying VMA archives: every check of the `vma-format` reader, nothing
//! written, and a report per archive.
//!
//! The checks themselves live in [`vma_format::Archive`]; this crate adds a
//! sink that only counts ([`VerifySink`]) and the report `vma-verify` prints
//! ([`ArchiveReport`]): the one-line result, the per-device summary of `-v`,
//! the JSON object of `--json`, the error line and the exit code.
//!
//! ```no_run
//! let report = vma_verify::verify_path("backup.vma");
//! if let Some(line) = report.error_line() {
//!     eprintln!("{line}");
//! }
//! std::process::exit(report.exit_code());
//! ```

pub mod cli;

use std::io::{self, Read};

use serde_json::{json, Value};
use vma_cli::cfmt::g3;
use vma_cli::exit;
use vma_cli::input::Input;
use vma_format::{
    Archive, BlockMask, Cluster, ClusterSink, DataChecksums, Error, ErrorClass, Flow, Location,
    VmaHeader, BLOCK_SIZE, CLUSTER_SIZE,
};

/// Counters of one device, kept by [`VerifySink`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceCounts {
    /// Clusters delivered (each cluster once: the reader refuses duplicates).
    pub clusters: u64,
    /// Bytes of block data stored in the archive for it: 4096 per stored block.
    pub stored_bytes: u64,
    /// Bytes of the device that the present clusters cover with zero blocks
    /// (blocks not stored), clipped at the device end (except for `vmstate`,
    /// whose size does not bound its clusters).
    pub zero_bytes: u64,
    /// Bytes of the device the present clusters cover, clipped the same way:
    /// the device size once every cluster is present.
    pub covered_bytes: u64,
}

/// A sink that writes nothing and counts clusters, stored and zero bytes per
/// device. All checking is the reader's; this only keeps the tallies the
/// reports print. Per cluster it does a few integer operations: verify runs
/// at the speed of reading and checksumming.
#[derive(Clone, Debug)]
pub struct VerifySink {
    /// Device sizes by id; `u64::MAX` for `vmstate` (unbounded), 0 for none.
    sizes: Box<[u64; 256]>,
    counts: Box<[DeviceCounts; 256]>,
    clusters: u64,
}

impl Default for VerifySink {
    fn default() -> Self {
        VerifySink {
            sizes: Box::new([0; 256]),
            counts: Box::new([DeviceCounts::default(); 256]),
            clusters: 0,
        }
    }
}

impl VerifySink {
    /// A sink for an archive with `header`'s devices.
    pub fn new(header: &VmaHeader) -> VerifySink {
        let mut sink = VerifySink::default();
        for d in header.devices() {
            sink.sizes[d.id as usize] = if d.is_vmstate() { u64::MAX } else { d.size };
        }
        sink
    }

    /// The counters of device `id` (all zero for an undeclared id).
    pub fn device(&self, id: u8) -> DeviceCounts {
        self.counts[id as usize]
    }

    /// Clusters delivered so far, over all devices.
    pub fn clusters(&self) -> u64 {
        self.clusters
    }
}

impl ClusterSink for VerifySink {
    fn begin(&mut self, header: &VmaHeader) -> io::Result<()> {
        *self = VerifySink::new(header);
        Ok(())
    }

    fn cluster(&mut self, c: &Cluster<'_>) -> io::Result<Flow> {
        let size = self.sizes[c.dev_id as usize];
        let start = c.offset();
        // Blocks inside the device, and how far the cluster reaches into it.
        let (allowed, covered) = if size == u64::MAX {
            (BlockMask::FULL, CLUSTER_SIZE as u64)
        } else {
            (
                BlockMask::in_device(c.cluster_num as u64, size),
                size.saturating_sub(start).min(CLUSTER_SIZE as u64),
            )
        };
        let zero = BlockMask(allowed.0 & !c.mask.0);
        let mut zero_bytes = zero.data_len() as u64;
        // The last block of the device may end before its 4 KiB do.
        let last = covered.div_ceil(BLOCK_SIZE as u64);
        if last > 0 && zero.has(last as usize - 1) {
            zero_bytes -= last * BLOCK_SIZE as u64 - covered;
        }
        let counts = &mut self.counts[c.dev_id as usize];
        counts.clusters += 1;
        counts.stored_bytes += c.data.len() as u64;
        counts.zero_bytes += zero_bytes;
        counts.covered_bytes += covered;
        self.clusters += 1;
        Ok(Flow::Continue)
    }
}

/// The verdict on one archive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Every check passed (exit code 0).
    Ok,
    /// The archive is damaged or invalid (exit code 1).
    Damaged,
    /// It could not be opened or read (exit code 3).
    Error,
}

impl Status {
    /// `ok`, `damaged` or `error`, as the JSON report spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Damaged => "damaged",
            Status::Error => "error",
        }
    }

    /// The exit code it maps to (see [`vma_cli::EXIT_CODES_HELP`]).
    pub fn exit_code(self) -> i32 {
        match self {
            Status::Ok => exit::OK,
            Status::Damaged => exit::DAMAGED,
            Status::Error => exit::IO,
        }
    }
}

/// One device of a report: what the header declares and what was read of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceReport {
    /// Device id (1..=255).
    pub id: u8,
    /// Name (lossy UTF-8, up to its first NUL).
    pub name: String,
    /// Size declared in the header, in bytes.
    pub size: u64,
    /// Clusters the device has (for `vmstate`: none are required).
    pub clusters_total: u64,
    /// Whether it is the `vmstate` device (RAM state).
    pub vmstate: bool,
    /// What was read of it (up to the first problem if there was one).
    pub counts: DeviceCounts,
}

impl DeviceReport {
    /// Percentage of the covered bytes that are zero blocks (not stored);
    /// 0 when nothing was covered.
    pub fn sparse_percent(&self) -> f64 {
        if self.counts.covered_bytes == 0 {
            0.0
        } else {
            100.0 * self.counts.zero_bytes as f64 / self.counts.covered_bytes as f64
        }
    }
}

/// The first (and, outside salvage, only) problem found in an archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorReport {
    /// The problem with its location, as the library prints it
    /// (`extent 17 at byte 63029760: header checksum mismatch`), without the
    /// archive name.
    pub message: String,
    /// Byte offset of the problem in the archive: the header's start (0),
    /// the damaged extent's start, or the end of input for end-of-archive
    /// checks; `None` when the archive could not be opened.
    pub offset: Option<u64>,
}

/// Everything `vma-verify` says about one archive.
#[derive(Clone, Debug)]
pub struct ArchiveReport {
    /// The archive as named on the command line (`<stdin>` for `-`).
    pub name: String,
    /// The verdict.
    pub status: Status,
    /// Archive uuid, if the header could be read.
    pub uuid: Option<[u8; 16]>,
    /// Creation time (seconds since the epoch), if the header could be read.
    pub ctime: Option<i64>,
    /// Config files as (name, size), if the header could be read.
    pub configs: Option<Vec<(String, u64)>>,
    /// Devices in id order, if the header could be read.
    pub devices: Option<Vec<DeviceReport>>,
    /// Extents read and accepted: known when the archive is sound, or when
    /// the problem lies in an extent (the extents before it).
    pub extents: Option<u64>,
    /// Clusters that passed every check (before the problem, if any).
    pub clusters: u64,
    /// Data checksum status, when the archive was read to its end.
    pub data_checksums: Option<DataChecksums>,
    /// Bytes of the archive read.
    pub bytes_read: u64,
    /// The problem, unless the archive is sound.
    pub error: Option<ErrorReport>,
}

impl ArchiveReport {
    fn failed(name: &str, status: Status, message: String, offset: Option<u64>) -> ArchiveReport {
        ArchiveReport {
            name: name.to_string(),
            status,
            uuid: None,
            ctime: None,
            configs: None,
            devices: None,
            extents: None,
            clusters: 0,
            data_checksums: None,
            bytes_read: 0,
            error: Some(ErrorReport { message, offset }),
        }
    }

    /// The exit code for this archive alone.
    pub fn exit_code(&self) -> i32 {
        self.status.exit_code()
    }

    /// The success line, `NAME: ok (N clusters, data checksums: verified)`,
    /// for a sound archive; `None` otherwise.
    pub fn ok_line(&self) -> Option<String> {
        if self.status != Status::Ok {
            return None;
        }
        let checksums = self.data_checksums.unwrap_or_default().describe();
        Some(format!(
            "{}: ok ({} clusters, data checksums: {checksums})",
            self.name, self.clusters
        ))
    }

    /// The error line, `NAME: message`, unless the archive is sound.
    pub fn error_line(&self) -> Option<String> {
        self.error
            .as_ref()
            .map(|e| format!("{}: {}", self.name, e.message))
    }

    /// The per-device lines of `-v`, one per device, indented by two spaces:
    ///
    /// ```text
    ///   dev 1 drive-scsi0: size 1061376, 17 of 17 clusters, stored 880640 bytes, zero 180736 bytes (17% sparse)
    /// ```
    ///
    /// For `vmstate` the cluster total is left out (it is not bounded by the
    /// size). Empty when the header could not be read.
    pub fn device_lines(&self) -> Vec<String> {
        let Some(devices) = &self.devices else {
            return Vec::new();
        };
        devices
            .iter()
            .map(|d| {
                let clusters = if d.vmstate {
                    format!("{} clusters", d.counts.clusters)
                } else {
                    format!("{} of {} clusters", d.counts.clusters, d.clusters_total)
                };
                format!(
                    "  dev {} {}: size {}, {clusters}, stored {} bytes, zero {} bytes ({}% sparse)",
                    d.id,
                    d.name,
                    d.size,
                    d.counts.stored_bytes,
                    d.counts.zero_bytes,
                    g3(d.sparse_percent())
                )
            })
            .collect()
    }

    /// The `--json` object (printed on one line): see the crate README or
    /// `vma-verify --help` for its fields. Unknown values are `null`.
    pub fn to_json(&self) -> Value {
        let configs = self.configs.as_ref().map(|cs| {
            cs.iter()
                .map(|(name, size)| json!({ "name": name, "size": size }))
                .collect::<Vec<_>>()
        });
        let devices = self.devices.as_ref().map(|ds| {
            ds.iter()
                .map(|d| {
                    json!({
                        "id": d.id,
                        "name": d.name,
                        "size": d.size,
                        "vmstate": d.vmstate,
                        "clusters_total": if d.vmstate { Value::Null } else { d.clusters_total.into() },
                        "clusters": d.counts.clusters,
                        "stored_bytes": d.counts.stored_bytes,
                        "zero_bytes": d.counts.zero_bytes,
                    })
                })
                .collect::<Vec<_>>()
        });
        json!({
            "archive": self.name,
            "status": self.status.as_str(),
            "uuid": self.uuid.map(|u| uuid::Uuid::from_bytes(u).hyphenated().to_string()),
            "ctime": self.ctime,
            "configs": configs,
            "devices": devices,
            "extents": self.extents,
            "clusters": self.clusters,
            "bytes_read": self.bytes_read,
            "data_checksums": self.data_checksums.map(|c| c.describe()),
            "error": self.error.as_ref().map(|e| e.message.clone()),
            "error_offset": self.error.as_ref().and_then(|e| e.offset),
        })
    }
}

/// Opens `path` (`-` for standard input) and verifies it. An archive that
/// cannot be opened is reported with [`Status::Error`].
pub fn verify_path(path: &str) -> ArchiveReport {
    verify_path_with_bar(path, None)
}

/// [`verify_path`], advancing `bar` by the bytes read (see
/// [`Input::open_with_bar`]).
pub fn verify_path_with_bar(path: &str, bar: Option<&vma_cli::bar::ProgressBar>) -> ArchiveReport {
    match Input::open_with_bar(path, bar) {
        Ok(input) => {
            let name = input.name.clone();
            verify_reader(&name, input)
        }
        Err(e) => ArchiveReport::failed(path, Status::Error, format!("cannot open: {e}"), None),
    }
}

/// Verifies the archive read from `input`, named `name` in the report. The
/// input is read to the end of the archive (or to the first problem) and
/// never seeks.
pub fn verify_reader<R: Read>(name: &str, input: R) -> ArchiveReport {
    let mut archive = match Archive::new(input) {
        Ok(archive) => archive,
        Err(e) => {
            return ArchiveReport::failed(
                name,
                status_of(&e),
                vma_cli::describe(&e),
                offset_of(&e, 0),
            );
        }
    };
    let header = archive.header().clone();
    let mut sink = VerifySink::new(&header);
    let result = archive.run(&mut sink);
    let devices = header
        .devices()
        .iter()
        .map(|d| DeviceReport {
            id: d.id,
            name: d.display_name(),
            size: d.size,
            clusters_total: d.clusters(),
            vmstate: d.is_vmstate(),
            counts: sink.device(d.id),
        })
        .collect();
    let configs = header
        .configs()
        .iter()
        .map(|c| {
            (
                // JSON escapes control characters itself; the text reports
                // never print config names.
                String::from_utf8_lossy(c.c_name()).into_owned(),
                c.data.len() as u64,
            )
        })
        .collect();
    let mut report = ArchiveReport {
        name: name.to_string(),
        status: Status::Ok,
        uuid: Some(header.uuid()),
        ctime: Some(header.ctime()),
        configs: Some(configs),
        devices: Some(devices),
        extents: None,
        clusters: sink.clusters(),
        data_checksums: None,
        bytes_read: archive.position(),
        error: None,
    };
    match result {
        Ok(summary) => {
            report.extents = Some(summary.extents);
            report.data_checksums = Some(summary.data_checksums);
            report.bytes_read = summary.bytes_read;
        }
        Err(e) => {
            report.status = status_of(&e);
            if let Some(Location::Extent { index, .. }) = e.location() {
                report.extents = Some(index);
            }
            report.error = Some(ErrorReport {
                message: vma_cli::describe(&e),
                offset: offset_of(&e, archive.position()),
            });
        }
    }
    report
}

/// Damage (and invalid input, and a compressed input that cannot be
/// decoded) is exit 1; I/O is exit 3.
fn status_of(e: &Error) -> Status {
    if vma_cli::decompress_error(e).is_some() {
        return Status::Damaged;
    }
    match e.class() {
        ErrorClass::Damaged | ErrorClass::Invalid => Status::Damaged,
        ErrorClass::Io => Status::Error,
    }
}

/// Where the problem lies: the header's start, the extent's start, or the
/// end of input (`end`).
fn offset_of(e: &Error, end: u64) -> Option<u64> {
    match e.location()? {
        Location::Header => Some(0),
        Location::Extent { offset, .. } | Location::Record { offset, .. } => Some(offset),
        Location::End => Some(end),
    }
}

#[cfg(test)]
mod tests;
