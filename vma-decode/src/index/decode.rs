//! Reading a saved index back ([`ArchiveIndex::load`]'s decoding) and why
//! one is refused.

use std::io;

use vma_format::{clusters_for, BlockMask, VmaHeader, BLOCK_SIZE, EXTENT_HEADER_SIZE};

use super::{
    ArchiveIndex, ArchiveStamp, ClusterEntry, DeviceIndex, ExtentEntry, ENTRY_LEN, EXTENT_LEN,
    FIXED_LEN, MAGIC, VERSION,
};

/// Why a saved index is not used ([`Loaded::Refused`](super::Loaded::Refused)):
/// `serve` logs it and indexes the archive instead.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The file exists but cannot be opened.
    #[error("cannot open it: {0}")]
    Open(#[source] io::Error),
    /// Reading it failed.
    #[error("cannot read it: {0}")]
    Read(#[source] io::Error),
    /// It is longer than any index of this archive can be (it is not read
    /// whole).
    #[error("too large to be an index of this archive")]
    TooLarge,
    /// Its bytes are damaged or do not describe this archive.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// What is wrong with a saved index's bytes, the first problem found.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Shorter than the fixed part and checksum, or the magic is wrong.
    #[error("not an index file")]
    NotAnIndex,
    /// Its CRC-32 does not match its bytes.
    #[error("its checksum does not match (damaged)")]
    Damaged,
    /// A field runs past the end (the checksum matched: a writer's bug).
    #[error("cut short")]
    CutShort,
    /// A layout version this program does not read.
    #[error("version {found}, not {}", VERSION)]
    Version {
        /// The version it carries.
        found: u32,
    },
    /// Flags other than 0.
    #[error("unknown flags")]
    UnknownFlags,
    /// Saved for an archive with another uuid.
    #[error("stale: it was saved for another archive (uuid differs)")]
    OtherArchive,
    /// Saved for an archive of another size.
    #[error("stale: it was saved for an archive of {saved} bytes, this one has {actual}")]
    ArchiveSize {
        /// The size it records.
        saved: u64,
        /// The archive's size.
        actual: u64,
    },
    /// Saved before the archive's last modification (its time differs).
    #[error("stale: the archive was modified after it was saved")]
    Modified,
    /// Its devices (count, ids, sizes, which is `vmstate`) are not the
    /// archive header's.
    #[error("stale: its devices are not the archive's")]
    Devices,
    /// A disk whose cluster count is not that of its size (a disk's index
    /// lists every cluster; `vmstate` may have fewer).
    #[error("{device}: {indexed} clusters indexed, not {clusters}")]
    ClusterCount {
        /// The device's name.
        device: String,
        /// Clusters the index lists.
        indexed: u64,
        /// Clusters the device has.
        clusters: u64,
    },
    /// The extent and cluster tables are not as long as the counts say.
    #[error("its tables do not have the lengths it states")]
    TableLengths,
    /// An extent that overlaps the header or the extent before it, or
    /// runs past the archive's end, or has bad flags or too many clusters.
    #[error("extent at byte {offset} does not fit the archive")]
    ExtentMisfit {
        /// Where the index says it starts.
        offset: u64,
    },
    /// A cluster pointing at an extent the index does not have.
    #[error("{device} cluster {cluster}: no extent {extent}")]
    NoExtent {
        /// The device's name.
        device: String,
        /// The cluster.
        cluster: u64,
        /// The extent number it names.
        extent: u32,
    },
    /// A cluster whose blocks lie past its extent's data.
    #[error("{device} cluster {cluster}: its data lies outside its extent")]
    DataOutsideExtent {
        /// The device's name.
        device: String,
        /// The cluster.
        cluster: u64,
    },
    /// An extent with more or fewer clusters pointing at it than its
    /// header lists.
    #[error("extent at byte {offset}: {pointing} clusters point at it, it lists {listed}")]
    ExtentCount {
        /// Where it starts.
        offset: u64,
        /// Clusters of the index that point at it.
        pointing: u16,
        /// Clusters its header lists.
        listed: u16,
    },
}

/// A cursor over a saved index; reads past its end are errors.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.0.len() {
            return Err(DecodeError::CutShort);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().unwrap()))
    }
}

/// Decodes a saved index and checks it against the archive (`header`,
/// `stamp`): the first problem found is the error.
pub(super) fn decode(
    bytes: &[u8],
    header: &VmaHeader,
    stamp: &ArchiveStamp,
) -> Result<ArchiveIndex, DecodeError> {
    if bytes.len() < FIXED_LEN + 4 || bytes[..8] != MAGIC {
        return Err(DecodeError::NotAnIndex);
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(body) != u32::from_be_bytes(crc.try_into().unwrap()) {
        return Err(DecodeError::Damaged);
    }
    let mut f = Fields(&body[8..]);
    let version = f.u32()?;
    if version != VERSION {
        return Err(DecodeError::Version { found: version });
    }
    if f.u32()? != 0 {
        return Err(DecodeError::UnknownFlags);
    }
    let uuid: [u8; 16] = f.take(16)?.try_into().unwrap();
    let size = f.u64()?;
    let mtime = (f.u64()? as i64, f.u32()?);
    if uuid != stamp.uuid {
        return Err(DecodeError::OtherArchive);
    }
    if size != stamp.size {
        return Err(DecodeError::ArchiveSize {
            saved: size,
            actual: stamp.size,
        });
    }
    if mtime != stamp.mtime {
        return Err(DecodeError::Modified);
    }
    let device_count = f.u32()? as usize;
    let extent_count = f.u64()?;
    let declared = header.devices();
    if device_count != declared.len() {
        return Err(DecodeError::Devices);
    }
    let mut devices = Vec::with_capacity(device_count);
    let mut counts = Vec::with_capacity(device_count);
    for d in declared {
        let id = f.u8()?;
        let vmstate = f.u8()? != 0;
        f.take(6)?;
        let dsize = f.u64()?;
        let count = f.u64()?;
        if id != d.id || vmstate != d.is_vmstate() || dsize != d.size {
            return Err(DecodeError::Devices);
        }
        if !vmstate && count != clusters_for(d.size) {
            return Err(DecodeError::ClusterCount {
                device: d.display_name(),
                indexed: count,
                clusters: clusters_for(d.size),
            });
        }
        devices.push(DeviceIndex {
            id,
            name: d.display_name(),
            size: d.size,
            vmstate,
            clusters: Vec::new(),
        });
        counts.push(count);
    }
    // The lengths must add up before anything is allocated from them.
    let entries: u128 = counts.iter().map(|&c| c as u128).sum();
    let want = extent_count as u128 * EXTENT_LEN as u128 + entries * ENTRY_LEN as u128;
    if want != f.0.len() as u128 {
        return Err(DecodeError::TableLengths);
    }
    let mut extents = Vec::with_capacity(extent_count as usize);
    let mut next_free = header.header_size() as u64;
    for _ in 0..extent_count {
        let offset = f.u64()?;
        let crc = f.u32()?;
        let block_count = f.u16()?;
        let clusters = f.u8()? as u16;
        let flags = f.u8()?;
        let end = offset
            .saturating_add(EXTENT_HEADER_SIZE as u64 + block_count as u64 * BLOCK_SIZE as u64);
        if offset < next_free
            || end > stamp.size
            || flags > 1
            || clusters as usize > vma_format::EXTENT_SLOTS
        {
            return Err(DecodeError::ExtentMisfit { offset });
        }
        next_free = end;
        extents.push(ExtentEntry {
            offset,
            block_count,
            clusters,
            data_checksum: (flags == 1).then_some(crc),
        });
    }
    let mut listed = vec![0u16; extents.len()];
    for (dev, &count) in devices.iter_mut().zip(&counts) {
        let mut clusters = Vec::with_capacity(count as usize);
        for n in 0..count {
            let extent = f.u32()?;
            let first_block = f.u16()?;
            let mask = BlockMask(f.u16()?);
            let Some(e) = extents.get(extent as usize) else {
                return Err(DecodeError::NoExtent {
                    device: dev.name.clone(),
                    cluster: n,
                    extent,
                });
            };
            if first_block as usize + mask.count() > e.block_count as usize {
                return Err(DecodeError::DataOutsideExtent {
                    device: dev.name.clone(),
                    cluster: n,
                });
            }
            listed[extent as usize] = listed[extent as usize].saturating_add(1);
            clusters.push(ClusterEntry {
                extent,
                first_block,
                mask,
            });
        }
        dev.clusters = clusters;
    }
    for (e, &n) in extents.iter().zip(&listed) {
        if n != e.clusters {
            return Err(DecodeError::ExtentCount {
                offset: e.offset,
                pointing: n,
                listed: e.clusters,
            });
        }
    }
    Ok(ArchiveIndex {
        uuid,
        devices,
        extents,
    })
}
