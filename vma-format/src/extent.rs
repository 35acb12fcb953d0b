//! Extent headers: 512 bytes that tag the clusters following them.
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | magic `VMAE` |
//! | 4..6 | reserved, 0 |
//! | 6..8 | block_count: 4 KiB blocks of data after the header |
//! | 8..24 | the archive's uuid |
//! | 24..40 | MD5 of these 512 bytes with this field zeroed |
//! | 40..512 | 59 blockinfo slots of 8 bytes: mask (2), reserved (1), dev_id (1), cluster_num (4) |
//!
//! Slots with dev_id 0 are skipped by every reader. Our writer fills the 59th
//! slot (which Proxmox's writer never uses) with a CRC-32 of the extent's
//! data: dev_id 0, mask [`DATA_CHECKSUM_MASK`], reserved byte
//! [`DATA_CHECKSUM_VERSION`], cluster_num the CRC. See docs/FORMAT.md.

use byteorder::{BigEndian, ByteOrder};
use md5::{Digest, Md5};

use crate::cluster::BlockMask;
use crate::{EXTENT_HEADER_SIZE, EXTENT_SLOTS};

/// Magic number of an extent header.
pub const EXTENT_MAGIC: [u8; 4] = *b"VMAE";
/// Mask field ("CR") of the data-checksum slot.
pub const DATA_CHECKSUM_MASK: u16 = 0x4352;
/// Reserved byte of the data-checksum slot: the version of our extension.
pub const DATA_CHECKSUM_VERSION: u8 = 1;
/// Slot index of the data checksum (the 59th slot).
pub const DATA_CHECKSUM_SLOT: usize = EXTENT_SLOTS - 1;
const OFF_RESERVED: usize = 4;
const OFF_BLOCK_COUNT: usize = 6;
const OFF_UUID: usize = 8;
const OFF_MD5: usize = 24;
const OFF_SLOTS: usize = 40;

/// One blockinfo slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockInfo {
    /// Stored blocks of the cluster.
    pub mask: BlockMask,
    /// Reserved byte (0 in Proxmox's archives).
    pub reserved: u8,
    /// Device id; 0 marks a slot that holds no cluster.
    pub dev_id: u8,
    /// Cluster number.
    pub cluster_num: u32,
}

impl BlockInfo {
    /// Decodes the big-endian 64-bit slot value.
    pub fn from_u64(v: u64) -> BlockInfo {
        BlockInfo {
            mask: BlockMask((v >> 48) as u16),
            reserved: (v >> 40) as u8,
            dev_id: (v >> 32) as u8,
            cluster_num: v as u32,
        }
    }

    /// Encodes the slot value.
    pub fn to_u64(self) -> u64 {
        ((self.mask.0 as u64) << 48)
            | ((self.reserved as u64) << 40)
            | ((self.dev_id as u64) << 32)
            | self.cluster_num as u64
    }

    /// The data-checksum slot for a CRC-32 of `crc`.
    pub fn data_checksum(crc: u32) -> BlockInfo {
        BlockInfo {
            mask: BlockMask(DATA_CHECKSUM_MASK),
            reserved: DATA_CHECKSUM_VERSION,
            dev_id: 0,
            cluster_num: crc,
        }
    }

    /// The CRC this slot carries, if it is a data-checksum slot.
    pub fn as_data_checksum(self) -> Option<u32> {
        (self.dev_id == 0
            && self.mask.0 == DATA_CHECKSUM_MASK
            && self.reserved == DATA_CHECKSUM_VERSION)
            .then_some(self.cluster_num)
    }
}

/// Why 512 bytes are not a valid extent header of an archive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExtentProblem {
    /// The first 4 bytes are not `VMAE`.
    #[error("wrong extent magic number")]
    Magic,
    /// The MD5 of the header does not match.
    #[error("header checksum mismatch")]
    Checksum,
    /// The uuid is not the archive's.
    #[error("uuid differs from the archive's")]
    Uuid,
    /// The reserved field is not 0.
    #[error("reserved field is {0}, not 0")]
    Reserved(u16),
}

/// A checked extent header.
#[derive(Clone, Debug)]
pub struct ExtentHeader {
    block_count: u16,
    slots: [BlockInfo; EXTENT_SLOTS],
}

impl ExtentHeader {
    /// Checks 512 bytes against the archive's `uuid`: magic, MD5, uuid and
    /// reserved field, in that order. Returns the problem found first.
    /// (Whether the slots make sense depends on the devices; the reader
    /// checks that.)
    pub fn parse(
        raw: &[u8; EXTENT_HEADER_SIZE],
        uuid: &[u8; 16],
    ) -> Result<ExtentHeader, ExtentProblem> {
        if raw[..4] != EXTENT_MAGIC {
            return Err(ExtentProblem::Magic);
        }
        if extent_md5(raw) != raw[OFF_MD5..OFF_MD5 + 16] {
            return Err(ExtentProblem::Checksum);
        }
        if raw[OFF_UUID..OFF_UUID + 16] != uuid[..] {
            return Err(ExtentProblem::Uuid);
        }
        let reserved = BigEndian::read_u16(&raw[OFF_RESERVED..]);
        if reserved != 0 {
            return Err(ExtentProblem::Reserved(reserved));
        }
        let mut slots = [BlockInfo::default(); EXTENT_SLOTS];
        for (i, slot) in slots.iter_mut().enumerate() {
            *slot = BlockInfo::from_u64(BigEndian::read_u64(&raw[OFF_SLOTS + 8 * i..]));
        }
        Ok(ExtentHeader {
            block_count: BigEndian::read_u16(&raw[OFF_BLOCK_COUNT..]),
            slots,
        })
    }

    /// Whether `raw` is a valid extent header of this archive (resynchronising
    /// after damage looks for these).
    pub fn is_valid(raw: &[u8; EXTENT_HEADER_SIZE], uuid: &[u8; 16]) -> bool {
        ExtentHeader::parse(raw, uuid).is_ok()
    }

    /// Blocks of data that follow the header, as the header claims.
    pub fn block_count(&self) -> u16 {
        self.block_count
    }

    /// The 59 slots.
    pub fn slots(&self) -> &[BlockInfo; EXTENT_SLOTS] {
        &self.slots
    }

    /// The CRC-32 of the data carried in the 59th slot, if any.
    pub fn data_checksum(&self) -> Option<u32> {
        self.slots[DATA_CHECKSUM_SLOT].as_data_checksum()
    }

    /// Encodes an extent header (MD5 included).
    pub fn encode(
        uuid: &[u8; 16],
        block_count: u16,
        slots: &[BlockInfo],
        out: &mut [u8; EXTENT_HEADER_SIZE],
    ) {
        assert!(slots.len() <= EXTENT_SLOTS);
        out.fill(0);
        out[..4].copy_from_slice(&EXTENT_MAGIC);
        BigEndian::write_u16(&mut out[OFF_BLOCK_COUNT..], block_count);
        out[OFF_UUID..OFF_UUID + 16].copy_from_slice(uuid);
        for (i, slot) in slots.iter().enumerate() {
            BigEndian::write_u64(&mut out[OFF_SLOTS + 8 * i..], slot.to_u64());
        }
        let md5 = extent_md5(out);
        out[OFF_MD5..OFF_MD5 + 16].copy_from_slice(&md5);
    }
}

/// Recomputes an extent header's MD5 and stores it in place: for tools that
/// patch extent headers, and for tests that build hostile ones.
pub fn update_checksum(raw: &mut [u8; EXTENT_HEADER_SIZE]) {
    let md5 = extent_md5(raw);
    raw[OFF_MD5..OFF_MD5 + 16].copy_from_slice(&md5);
}

fn extent_md5(raw: &[u8; EXTENT_HEADER_SIZE]) -> [u8; 16] {
    let mut md5 = Md5::new();
    md5.update(&raw[..OFF_MD5]);
    md5.update([0u8; 16]);
    md5.update(&raw[OFF_MD5 + 16..]);
    md5.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_layout() {
        let b = BlockInfo {
            mask: BlockMask(0xabcd),
            reserved: 0,
            dev_id: 3,
            cluster_num: 0x01020304,
        };
        assert_eq!(b.to_u64().to_be_bytes(), [0xab, 0xcd, 0, 3, 1, 2, 3, 4]);
        assert_eq!(BlockInfo::from_u64(b.to_u64()), b);
        assert_eq!(
            BlockInfo::data_checksum(9).to_u64().to_be_bytes(),
            [0x43, 0x52, 1, 0, 0, 0, 0, 9]
        );
    }

    #[test]
    fn encode_parse() {
        let uuid = [5u8; 16];
        let mut raw = [0u8; EXTENT_HEADER_SIZE];
        let slots = [BlockInfo {
            mask: BlockMask(1),
            reserved: 0,
            dev_id: 1,
            cluster_num: 2,
        }];
        ExtentHeader::encode(&uuid, 1, &slots, &mut raw);
        let h = ExtentHeader::parse(&raw, &uuid).unwrap();
        assert_eq!(h.block_count(), 1);
        assert_eq!(h.slots()[0], slots[0]);
        assert_eq!(h.data_checksum(), None);
        assert_eq!(
            ExtentHeader::parse(&raw, &[6; 16]).unwrap_err().to_string(),
            "uuid differs from the archive's"
        );
        let mut bad = raw;
        bad[100] ^= 1;
        assert_eq!(
            ExtentHeader::parse(&bad, &uuid).unwrap_err().to_string(),
            "header checksum mismatch"
        );
        bad = raw;
        bad[0] = b'X';
        assert_eq!(
            ExtentHeader::parse(&bad, &uuid).unwrap_err().to_string(),
            "wrong extent magic number"
        );
    }
}
