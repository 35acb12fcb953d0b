//! Zero detection: which 4 KiB blocks of a cluster hold data.
//!
//! Every byte of every disk passes through here. Each block is compared
//! against a static zero block with a slice comparison, which compiles to
//! `memcmp` (vectorised, tens of GB/s) instead of a byte loop.

use crate::{BlockMask, BLOCKS_PER_CLUSTER, BLOCK_SIZE, CLUSTER_SIZE};

static ZERO_BLOCK: [u8; BLOCK_SIZE] = [0; BLOCK_SIZE];

/// Whether `bytes` (at most 4 KiB) are all zero.
#[inline]
pub fn is_zero_block(bytes: &[u8]) -> bool {
    bytes == &ZERO_BLOCK[..bytes.len()]
}

/// Whether `bytes` (any length) are all zero.
pub fn is_zero(bytes: &[u8]) -> bool {
    bytes.chunks(BLOCK_SIZE).all(is_zero_block)
}

/// Packs one cluster: copies its non-zero blocks, in order, to the start of
/// `out` and returns their mask and the number of bytes written.
///
/// `raw` is the cluster's content from its first byte (at most 64 KiB; a
/// shorter slice means the rest is zero). Only the first `valid` bytes lie
/// inside the device: later bytes are taken as zero, a block that starts at
/// or past `valid` is never stored, and the stored copy of a block that
/// straddles `valid` is zero past it — the shape Proxmox writes.
///
/// `out` must hold the stored blocks: 64 KiB always suffices.
pub fn pack_cluster(raw: &[u8], valid: usize, out: &mut [u8]) -> (BlockMask, usize) {
    let valid = valid.min(raw.len());
    pack_blocks(valid, |block, used| {
        let bytes = &raw[block];
        if is_zero_block(bytes) {
            return false;
        }
        out[used..used + bytes.len()].copy_from_slice(bytes);
        out[used + bytes.len()..used + BLOCK_SIZE].fill(0);
        true
    })
}

/// Packs one cluster in place: the raw cluster at `buf[src..src + 65536]`
/// becomes its non-zero blocks, in order, from `buf[dst..]` (`dst <= src`,
/// so moving a block down never overwrites one still to be looked at).
/// `valid` as in [`pack_cluster`]; the same mask and bytes as it, without a
/// second buffer.
pub fn pack_cluster_within(
    buf: &mut [u8],
    src: usize,
    dst: usize,
    valid: usize,
) -> (BlockMask, usize) {
    debug_assert!(dst <= src);
    pack_blocks(valid, |block, used| {
        let (start, len) = (src + block.start, block.len());
        if is_zero_block(&buf[start..start + len]) {
            return false;
        }
        if dst + used != start {
            buf.copy_within(start..start + len, dst + used);
        }
        buf[dst + used + len..dst + used + BLOCK_SIZE].fill(0);
        true
    })
}

/// The packing loop both packers share: for each block of a cluster that
/// starts before `valid` (at most 64 KiB), `keep(bytes of the block inside
/// the device, bytes stored so far)` stores it and says true, or says false
/// for a zero block. Returns the mask of the blocks kept and the bytes they
/// take (whole blocks).
#[inline(always)]
fn pack_blocks(
    valid: usize,
    mut keep: impl FnMut(std::ops::Range<usize>, usize) -> bool,
) -> (BlockMask, usize) {
    let valid = valid.min(CLUSTER_SIZE);
    let mut mask = 0u16;
    let mut used = 0;
    for i in 0..BLOCKS_PER_CLUSTER {
        let start = i * BLOCK_SIZE;
        if start >= valid {
            break;
        }
        if keep(start..(start + BLOCK_SIZE).min(valid), used) {
            mask |= 1 << i;
            used += BLOCK_SIZE;
        }
    }
    (BlockMask(mask), used)
}

/// [`pack_cluster`] in place: `buf` holds the cluster as read (its first
/// `valid` bytes lie inside the device; later bytes are ignored); its
/// non-zero blocks are moved, in order, to the start of `buf` (a block
/// already in place is not touched), a stored block that straddles `valid`
/// is zeroed past it, and the mask is returned. The stored blocks are then
/// `buf[..mask.data_len()]`. Saves the copy into a second buffer for a
/// producer that reads straight into the buffer it hands on.
pub fn pack_cluster_in_place(buf: &mut [u8], valid: usize) -> BlockMask {
    let valid = valid.min(buf.len());
    pack_cluster_within(buf, 0, 0, valid).0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_single_bytes() {
        for pos in [0, 1, 2047, 4095] {
            let mut b = [0u8; BLOCK_SIZE];
            assert!(is_zero_block(&b));
            b[pos] = 1;
            assert!(!is_zero_block(&b));
        }
        assert!(is_zero(&vec![0u8; 3 * BLOCK_SIZE + 5]));
    }

    #[test]
    fn pack_clips_at_device_end() {
        let raw = vec![0xffu8; CLUSTER_SIZE];
        let mut out = vec![0u8; CLUSTER_SIZE];
        // 4097 valid bytes: block 0 full, block 1 holds one byte then zeros.
        let (mask, used) = pack_cluster(&raw, 4097, &mut out);
        assert_eq!(mask, BlockMask(0b11));
        assert_eq!(used, 2 * BLOCK_SIZE);
        assert_eq!(out[BLOCK_SIZE], 0xff);
        assert!(is_zero(&out[BLOCK_SIZE + 1..2 * BLOCK_SIZE]));
        // Data past the device end that is non-zero is not stored.
        let mut raw = vec![0u8; CLUSTER_SIZE];
        raw[8192] = 1;
        assert_eq!(pack_cluster(&raw, 8192, &mut out), (BlockMask(0), 0));
        // Short input: the rest is zero.
        assert_eq!(
            pack_cluster(&[1u8; 10], CLUSTER_SIZE, &mut out),
            (BlockMask(1), BLOCK_SIZE)
        );
    }

    #[test]
    fn packing_in_place_matches_pack_cluster() {
        let mut raw = vec![0u8; CLUSTER_SIZE];
        raw[4096 * 3 + 7] = 1;
        raw[4096 * 5..4096 * 6].fill(2);
        raw[4096 * 9 + 100] = 3; // straddles `valid` below
        raw[4096 * 9 + 3000] = 4; // past `valid`: ignored
        for valid in [CLUSTER_SIZE, 4096 * 9 + 2000, 100] {
            let mut out = vec![0xffu8; CLUSTER_SIZE];
            let (mask, used) = pack_cluster(&raw, valid, &mut out);
            let mut buf = raw.clone();
            let m = pack_cluster_in_place(&mut buf, valid);
            assert_eq!(m, mask);
            assert_eq!(buf[..used], out[..used]);
        }
    }
}
