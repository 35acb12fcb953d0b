//! The cluster: the one value that flows from every source to every sink.

use crate::{BLOCKS_PER_CLUSTER, BLOCK_SIZE, CLUSTER_SIZE};

/// Which of the 16 blocks (4 KiB each) of a cluster hold data.
///
/// Bit `i` stands for block `i`, bytes `i*4096 .. (i+1)*4096` of the cluster.
/// A clear bit means the block is all zero and is not stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BlockMask(pub u16);

impl BlockMask {
    /// No block stored: an all-zero cluster.
    pub const EMPTY: BlockMask = BlockMask(0);
    /// Every block stored.
    pub const FULL: BlockMask = BlockMask(0xffff);

    /// Number of blocks stored.
    pub fn count(self) -> usize {
        self.0.count_ones() as usize
    }

    /// Whether block `i` (0..16) is stored.
    pub fn has(self, i: usize) -> bool {
        i < BLOCKS_PER_CLUSTER && self.0 & (1 << i) != 0
    }

    /// Bytes of block data that follow for this mask.
    pub fn data_len(self) -> usize {
        self.count() * BLOCK_SIZE
    }

    /// Mask of the blocks of cluster `cluster_num` that start before
    /// `device_size`: blocks at or past the end must never be stored.
    pub fn in_device(cluster_num: u64, device_size: u64) -> BlockMask {
        let start = cluster_num * CLUSTER_SIZE as u64;
        if device_size <= start {
            return BlockMask::EMPTY;
        }
        let blocks = (device_size - start).div_ceil(BLOCK_SIZE as u64);
        if blocks >= BLOCKS_PER_CLUSTER as u64 {
            BlockMask::FULL
        } else {
            BlockMask(((1u32 << blocks) - 1) as u16)
        }
    }

    /// Runs of consecutive stored blocks, as (first block, block count).
    /// Consecutive stored blocks are also consecutive in the packed data, so
    /// each run can be written with one call.
    pub fn runs(self) -> MaskRuns {
        MaskRuns {
            bits: self.0 as u32,
            pos: 0,
        }
    }
}

/// Iterator over the runs of set bits of a [`BlockMask`]; see [`BlockMask::runs`].
#[derive(Clone, Debug)]
pub struct MaskRuns {
    bits: u32,
    pos: u32,
}

impl Iterator for MaskRuns {
    type Item = (usize, usize);

    fn next(&mut self) -> Option<(usize, usize)> {
        let rest = self.bits >> self.pos;
        if rest == 0 {
            return None;
        }
        let start = self.pos + rest.trailing_zeros();
        let len = (self.bits >> start).trailing_ones();
        self.pos = start + len;
        Some((start as usize, len as usize))
    }
}

/// One cluster of one device, borrowed: what readers push and writers take.
///
/// `data` holds the stored (non-zero) blocks only, in ascending block order,
/// `mask.count() * 4096` bytes; blocks whose mask bit is clear are zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cluster<'a> {
    /// Device id (1..=255), the index of the device in the archive header.
    pub dev_id: u8,
    /// Cluster number: the cluster covers bytes `cluster_num * 65536` onwards.
    pub cluster_num: u32,
    /// Which blocks are stored.
    pub mask: BlockMask,
    /// The stored blocks, packed.
    pub data: &'a [u8],
}

impl<'a> Cluster<'a> {
    /// Byte offset of the cluster in its device.
    pub fn offset(&self) -> u64 {
        self.cluster_num as u64 * CLUSTER_SIZE as u64
    }

    /// The stored blocks as (block index, 4 KiB of data).
    pub fn blocks(&self) -> impl Iterator<Item = (usize, &'a [u8])> + 'a {
        let mask = self.mask;
        let data = self.data;
        (0..BLOCKS_PER_CLUSTER)
            .filter(move |&i| mask.has(i))
            .zip(data.chunks_exact(BLOCK_SIZE))
    }

    /// Runs of consecutive stored blocks as (first block index, packed data of
    /// the run): one contiguous slice per run, ready for one positional write.
    pub fn runs(&self) -> impl Iterator<Item = (usize, &'a [u8])> + 'a {
        let data = self.data;
        let mut used = 0;
        self.mask.runs().map(move |(start, len)| {
            let bytes = &data[used..used + len * BLOCK_SIZE];
            used += len * BLOCK_SIZE;
            (start, bytes)
        })
    }

    /// Writes the whole 64 KiB cluster, zero blocks included, into `out`
    /// (which must be 65536 bytes long).
    pub fn expand_into(&self, out: &mut [u8]) {
        assert_eq!(out.len(), CLUSTER_SIZE, "expand_into needs a 64 KiB buffer");
        out.fill(0);
        for (start, bytes) in self.runs() {
            out[start * BLOCK_SIZE..start * BLOCK_SIZE + bytes.len()].copy_from_slice(bytes);
        }
    }

    /// An owned copy.
    pub fn to_owned_buf(&self) -> ClusterBuf {
        ClusterBuf {
            dev_id: self.dev_id,
            cluster_num: self.cluster_num,
            mask: self.mask,
            data: self.data.to_vec(),
        }
    }
}

/// An owned [`Cluster`], for queues and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterBuf {
    /// See [`Cluster::dev_id`].
    pub dev_id: u8,
    /// See [`Cluster::cluster_num`].
    pub cluster_num: u32,
    /// See [`Cluster::mask`].
    pub mask: BlockMask,
    /// See [`Cluster::data`]; its length is `mask.count() * 4096`.
    pub data: Vec<u8>,
}

impl ClusterBuf {
    /// Packs raw cluster content: `raw` is the cluster's bytes from its start
    /// (at most 64 KiB; shorter means the rest is zero), `valid` how many of
    /// them lie inside the device (bytes past it are taken as zero, and blocks
    /// wholly past it are never stored).
    pub fn from_raw(dev_id: u8, cluster_num: u32, raw: &[u8], valid: usize) -> ClusterBuf {
        let mut data = vec![0u8; CLUSTER_SIZE];
        let (mask, used) = crate::zero::pack_cluster(raw, valid, &mut data);
        data.truncate(used);
        ClusterBuf {
            dev_id,
            cluster_num,
            mask,
            data,
        }
    }

    /// Borrows it as a [`Cluster`].
    pub fn as_cluster(&self) -> Cluster<'_> {
        Cluster {
            dev_id: self.dev_id,
            cluster_num: self.cluster_num,
            mask: self.mask,
            data: &self.data,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_cover_set_bits() {
        let runs: Vec<_> = BlockMask(0b1011_0000_0000_0111).runs().collect();
        assert_eq!(runs, vec![(0, 3), (12, 2), (15, 1)]);
        assert_eq!(BlockMask::FULL.runs().collect::<Vec<_>>(), vec![(0, 16)]);
        assert_eq!(BlockMask::EMPTY.runs().count(), 0);
    }

    #[test]
    fn in_device_mask() {
        assert_eq!(BlockMask::in_device(0, 4097), BlockMask(0b11));
        assert_eq!(BlockMask::in_device(0, 65536), BlockMask::FULL);
        assert_eq!(BlockMask::in_device(1, 65536), BlockMask::EMPTY);
        assert_eq!(BlockMask::in_device(16, 1061376), BlockMask(0b1111));
    }

    #[test]
    fn expand_round_trip() {
        let mut raw = vec![0u8; CLUSTER_SIZE];
        raw[5 * BLOCK_SIZE] = 7;
        raw[15 * BLOCK_SIZE + 4095] = 9;
        let c = ClusterBuf::from_raw(1, 3, &raw, CLUSTER_SIZE);
        assert_eq!(c.mask, BlockMask((1 << 5) | (1 << 15)));
        let mut out = vec![1u8; CLUSTER_SIZE];
        c.as_cluster().expand_into(&mut out);
        assert_eq!(out, raw);
    }
}
