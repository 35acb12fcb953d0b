//! The index of an archive: where the data of each (device, cluster) lies,
//! for reading the archive at random (`serve`).
//!
//! Built by [`IndexBuilder`], an [`IndexSink`] of the reader's
//! [`Archive::index`](vma_format::Archive::index) (which makes every check
//! of the archive but those of the data), or loaded from a file that an
//! earlier run saved beside the archive ([`ArchiveIndex::save`],
//! `ARCHIVE.vmaidx`; the layout is in `docs/SERVE.md`). A saved index carries
//! the archive's uuid, size and modification time and is refused
//! ([`Loaded::Refused`]) when any differs, when its own CRC-32 fails, or when
//! it does not fit the archive's header. What it says about an extent is
//! compared with the extent's header the first time the extent is used
//! (`serve` does this), so even an index that passed those checks cannot
//! make anything but the archive's own data be served.
//!
//! Memory: 8 bytes per cluster and 16 per extent (a 1 TiB disk: 128 MiB).

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use vma_format::{
    BlockMask, IndexSink, IndexedExtent, VmaHeader, BLOCK_SIZE, CLUSTER_SIZE, EXTENT_HEADER_SIZE,
};

/// Suffix of a saved index: `ARCHIVE.vmaidx`.
pub const INDEX_SUFFIX: &str = ".vmaidx";

mod decode;
use decode::decode;
pub use decode::{DecodeError, Refusal};

const MAGIC: [u8; 8] = *b"VMAINDEX";
const VERSION: u32 = 1;
const FIXED_LEN: usize = 64;
const DEVICE_LEN: usize = 24;
const EXTENT_LEN: usize = 16;
const ENTRY_LEN: usize = 8;

/// Where one cluster's data lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClusterEntry {
    /// The extent that lists it (an index into [`ArchiveIndex::extents`]).
    pub extent: u32,
    /// Its first stored block, in blocks from the start of the extent's data.
    pub first_block: u16,
    /// Which of its blocks are stored.
    pub mask: BlockMask,
}

/// One extent of the archive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtentEntry {
    /// Position of its 512-byte header in the archive.
    pub offset: u64,
    /// Data blocks that follow the header.
    pub block_count: u16,
    /// Clusters it lists.
    pub clusters: u16,
    /// The CRC-32 of its data its header carries (our extension).
    pub data_checksum: Option<u32>,
}

impl ExtentEntry {
    /// Position of its first data byte.
    pub fn data_offset(&self) -> u64 {
        self.offset + EXTENT_HEADER_SIZE as u64
    }

    /// Bytes of data.
    pub fn data_len(&self) -> u64 {
        self.block_count as u64 * BLOCK_SIZE as u64
    }
}

/// The clusters of one device.
#[derive(Clone, Debug)]
pub struct DeviceIndex {
    /// Device id.
    pub id: u8,
    /// Its name (lossy UTF-8), the export name.
    pub name: String,
    /// Its size as the header records it.
    pub size: u64,
    /// Whether it is the RAM state (`vmstate`).
    pub vmstate: bool,
    /// Cluster `n` is `clusters[n]`: every cluster of a disk, the clusters
    /// from 0 the archive has of `vmstate`.
    pub(crate) clusters: Vec<ClusterEntry>,
}

impl DeviceIndex {
    /// Where cluster `n` lies; `None` past the clusters the archive holds
    /// (only for `vmstate`: they read as zeros).
    pub fn cluster(&self, n: u64) -> Option<&ClusterEntry> {
        usize::try_from(n).ok().and_then(|n| self.clusters.get(n))
    }

    /// Clusters indexed.
    pub fn cluster_count(&self) -> u64 {
        self.clusters.len() as u64
    }

    /// Bytes the device reads as, which `vma-decode extract` writes: its
    /// size, but for a `vmstate` whose clusters run past its size, up to
    /// the end of the last run of stored blocks that starts at or past it.
    pub fn export_size(&self) -> u64 {
        let mut end = self.size;
        if !self.vmstate {
            return end;
        }
        let first = self.size / CLUSTER_SIZE as u64;
        for (n, c) in self.clusters.iter().enumerate().skip(first as usize) {
            let base = n as u64 * CLUSTER_SIZE as u64;
            for (start, len) in c.mask.runs() {
                let run_start = base + (start * BLOCK_SIZE) as u64;
                if run_start >= self.size {
                    end = end.max(run_start + (len * BLOCK_SIZE) as u64);
                }
            }
        }
        end
    }
}

/// Where everything of an archive lies.
#[derive(Clone, Debug)]
pub struct ArchiveIndex {
    /// The archive's uuid.
    pub uuid: [u8; 16],
    /// Its devices, in header order.
    pub devices: Vec<DeviceIndex>,
    /// Its extents, in archive order.
    pub extents: Vec<ExtentEntry>,
}

/// Collects the index while [`Archive::index`](vma_format::Archive::index)
/// walks an archive; [`finish`](IndexBuilder::finish) then builds it.
pub struct IndexBuilder {
    uuid: [u8; 16],
    /// Position in `pending` of each device id.
    slot_of: [Option<u8>; 256],
    devices: Vec<DeviceIndex>,
    /// Per device, its clusters as found: (cluster number, entry).
    pending: Vec<Vec<(u32, ClusterEntry)>>,
    extents: Vec<ExtentEntry>,
}

impl IndexBuilder {
    /// A builder for the archive whose header is `header`.
    pub fn new(header: &VmaHeader) -> IndexBuilder {
        let mut slot_of = [None; 256];
        let mut devices = Vec::new();
        for (i, d) in header.devices().iter().enumerate() {
            slot_of[d.id as usize] = Some(i as u8);
            devices.push(DeviceIndex {
                id: d.id,
                name: d.display_name(),
                size: d.size,
                vmstate: d.is_vmstate(),
                clusters: Vec::new(),
            });
        }
        IndexBuilder {
            uuid: header.uuid(),
            slot_of,
            pending: vec![Vec::new(); devices.len()],
            devices,
            extents: Vec::new(),
        }
    }

    /// The index, once the walk has succeeded (so every cluster of every
    /// disk was found once, and `vmstate`'s clusters came in order from 0).
    pub fn finish(mut self) -> io::Result<ArchiveIndex> {
        for (dev, mut found) in self.devices.iter_mut().zip(self.pending) {
            found.sort_unstable_by_key(|&(n, _)| n);
            if found.iter().enumerate().any(|(i, &(n, _))| n as usize != i) {
                // The reader's checks rule this out for a walk that succeeded.
                return Err(io::Error::other(format!(
                    "{}: the clusters found are not 0, 1, 2, …",
                    dev.name
                )));
            }
            dev.clusters = found.into_iter().map(|(_, e)| e).collect();
        }
        Ok(ArchiveIndex {
            uuid: self.uuid,
            devices: self.devices,
            extents: self.extents,
        })
    }
}

impl IndexSink for IndexBuilder {
    fn extent(&mut self, e: &IndexedExtent<'_>) -> io::Result<vma_format::Flow> {
        let id = u32::try_from(self.extents.len())
            .ok()
            .filter(|&id| id < u32::MAX)
            .ok_or_else(|| io::Error::other("more extents than an index can hold (2^32)"))?;
        self.extents.push(ExtentEntry {
            offset: e.offset,
            block_count: e.block_count,
            clusters: e.clusters.len() as u16,
            data_checksum: e.data_checksum,
        });
        for c in e.clusters {
            let slot = self.slot_of[c.dev_id as usize].expect("the reader checked the device");
            self.pending[slot as usize].push((
                c.cluster_num,
                ClusterEntry {
                    extent: id,
                    first_block: c.first_block,
                    mask: c.mask,
                },
            ));
        }
        Ok(vma_format::Flow::Continue)
    }
}

/// What an archive file is, as far as an index saved for it cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArchiveStamp {
    /// Its uuid.
    pub uuid: [u8; 16],
    /// Its size in bytes.
    pub size: u64,
    /// Its modification time: seconds since the epoch (negative before)
    /// and nanoseconds.
    pub mtime: (i64, u32),
}

impl ArchiveStamp {
    /// The stamp of an archive file with this metadata and header.
    pub fn of(meta: &fs::Metadata, header: &VmaHeader) -> io::Result<ArchiveStamp> {
        let modified = meta.modified()?;
        let mtime = match modified.duration_since(UNIX_EPOCH) {
            Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
            Err(e) => {
                let d = e.duration();
                // Before 1970: floor division into seconds and nanoseconds.
                let (s, n) = (d.as_secs() as i64, d.subsec_nanos());
                if n == 0 {
                    (-s, 0)
                } else {
                    (-s - 1, 1_000_000_000 - n)
                }
            }
        };
        Ok(ArchiveStamp {
            uuid: header.uuid(),
            size: meta.len(),
            mtime,
        })
    }
}

/// The outcome of [`ArchiveIndex::load`].
#[derive(Debug)]
pub enum Loaded {
    /// No saved index.
    Absent,
    /// A saved index that fits the archive.
    Index(ArchiveIndex),
    /// A saved index that must not be used, and why.
    Refused(Refusal),
}

/// The path of the index saved for `archive`: `ARCHIVE.vmaidx`.
pub fn index_path(archive: &Path) -> PathBuf {
    let mut s = archive.as_os_str().to_owned();
    s.push(INDEX_SUFFIX);
    PathBuf::from(s)
}

impl ArchiveIndex {
    /// The device with export name `name`.
    pub fn device(&self, name: &str) -> Option<&DeviceIndex> {
        self.devices.iter().find(|d| d.name == name)
    }

    /// Clusters indexed, over all devices.
    pub fn cluster_count(&self) -> u64 {
        self.devices.iter().map(|d| d.cluster_count()).sum()
    }

    /// The index in its saved form (see `docs/SERVE.md`).
    pub fn encode(&self, stamp: &ArchiveStamp) -> Vec<u8> {
        let entries: usize = self.devices.iter().map(|d| d.clusters.len()).sum();
        let mut out = Vec::with_capacity(
            FIXED_LEN
                + DEVICE_LEN * self.devices.len()
                + EXTENT_LEN * self.extents.len()
                + ENTRY_LEN * entries
                + 4,
        );
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(&stamp.uuid);
        out.extend_from_slice(&stamp.size.to_be_bytes());
        out.extend_from_slice(&stamp.mtime.0.to_be_bytes());
        out.extend_from_slice(&stamp.mtime.1.to_be_bytes());
        out.extend_from_slice(&(self.devices.len() as u32).to_be_bytes());
        out.extend_from_slice(&(self.extents.len() as u64).to_be_bytes());
        debug_assert_eq!(out.len(), FIXED_LEN);
        for d in &self.devices {
            out.push(d.id);
            out.push(d.vmstate as u8);
            out.extend_from_slice(&[0; 6]);
            out.extend_from_slice(&d.size.to_be_bytes());
            out.extend_from_slice(&(d.clusters.len() as u64).to_be_bytes());
        }
        for e in &self.extents {
            out.extend_from_slice(&e.offset.to_be_bytes());
            out.extend_from_slice(&e.data_checksum.unwrap_or(0).to_be_bytes());
            out.extend_from_slice(&e.block_count.to_be_bytes());
            out.push(e.clusters as u8);
            out.push(e.data_checksum.is_some() as u8);
        }
        for d in &self.devices {
            for c in &d.clusters {
                out.extend_from_slice(&c.extent.to_be_bytes());
                out.extend_from_slice(&c.first_block.to_be_bytes());
                out.extend_from_slice(&c.mask.0.to_be_bytes());
            }
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    /// Writes the index to `path` for the archive `stamp` describes: under
    /// a temporary name in the same directory, synced, then renamed, so a
    /// reader never sees half an index; the temporary file is removed on an
    /// error, or on a signal ([`vma_cli::signals::exit_removing_partials`]).
    pub fn save(&self, path: &Path, stamp: &ArchiveStamp) -> io::Result<()> {
        let bytes = self.encode(stamp);
        let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
        tmp_name.push(format!(".{}.tmp", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        // A signal before the rename (serve is not listening yet) removes it.
        let _partial = vma_cli::signals::remove_on_signal(&tmp);
        let result = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Loads the index saved at `path` for the archive with header `header`
    /// and stamp `stamp`. A missing file is [`Loaded::Absent`]; one that
    /// cannot be read, is damaged, or was saved for another archive (uuid,
    /// size, modification time, devices) or another state of it is
    /// [`Loaded::Refused`] with the reason.
    pub fn load(path: &Path, header: &VmaHeader, stamp: &ArchiveStamp) -> Loaded {
        let mut f = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Loaded::Absent,
            Err(e) => return Loaded::Refused(Refusal::Open(e)),
        };
        // An index has fewer bytes than the extent headers it describes
        // (each 512-byte header lists at most 59 clusters: 488 bytes of
        // index), so anything longer is not an index of this archive.
        let limit = (FIXED_LEN + DEVICE_LEN * 256 + 4) as u64 + stamp.size;
        let mut bytes = Vec::new();
        if let Err(e) = (&mut f).take(limit + 1).read_to_end(&mut bytes) {
            return Loaded::Refused(Refusal::Read(e));
        }
        if bytes.len() as u64 > limit {
            return Loaded::Refused(Refusal::TooLarge);
        }
        match decode(&bytes, header, stamp) {
            Ok(index) => Loaded::Index(index),
            Err(why) => Loaded::Refused(Refusal::Decode(why)),
        }
    }
}

#[cfg(test)]
mod tests;
