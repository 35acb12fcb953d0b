//! Damaged archives: every kind of corruption the reader must catch gives
//! its exact message and class, never a panic or a huge allocation; salvage
//! mode skips exactly what is damaged; and random damage never turns into a
//! success with wrong data.
//!
//! Archives are written here with the library's writer, then damaged; where
//! a slot is made nonsensical the extent's MD5 is recomputed, so that the
//! reader's semantic checks (not the checksum) must catch it. Copies of
//! Proxmox's multi-disk.vma are damaged the same way.

// Missing clusters are lists of ranges: a one-range list is the value meant.
#![allow(clippy::single_range_in_vec_init)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::PathBuf;

use md5::{Digest, Md5};
use proptest::prelude::*;
use vma_format::{
    Archive, BlockInfo, BlockMask, Cluster, ClusterSink, Error, ErrorClass, Flow, HeaderBuilder,
    IndexSink, IndexedCluster, IndexedExtent, Location, ReadOptions, Seekable, SkipData, Summary,
    Writer, WriterOptions, CLUSTER_SIZE, EXTENT_HEADER_SIZE, MAX_READ_HEADER_SIZE,
};

// ---------------------------------------------------------------------------
// The archive under test and tools to damage it.

/// drive-scsi0: 130 clusters and 5000 bytes, so 131 clusters in extents of
/// 58, 58 and 15; the last cluster ends inside its second block.
const SIZE: u64 = 130 * CLUSTER_SIZE as u64 + 5000;
const CLUSTERS: u32 = 131;
const UUID: [u8; 16] = [0x11; 16];

/// Cluster `n` as handed to the writer: block b holds the byte n%200+1
/// unless (n+b) is a multiple of 3, and the last cluster has non-zero bytes
/// past the device end (which the writer must drop). A constant fill per
/// block never forms the extent magic, so resynchronisation finds only real
/// extent headers.
fn raw_cluster(n: u32) -> Vec<u8> {
    let mut raw = vec![0u8; CLUSTER_SIZE];
    for b in 0..16 {
        if !(n as usize + b).is_multiple_of(3) {
            raw[b * 4096..(b + 1) * 4096].fill((n % 200 + 1) as u8);
        }
    }
    raw
}

/// Cluster `n` as the device holds it: zero past the device end.
fn expected_cluster(n: u32) -> Vec<u8> {
    let mut c = raw_cluster(n);
    let start = n as u64 * CLUSTER_SIZE as u64;
    if start + CLUSTER_SIZE as u64 > SIZE {
        c[(SIZE - start) as usize..].fill(0);
    }
    c
}

fn build(checksums: bool) -> Vec<u8> {
    let mut h = HeaderBuilder::new(UUID, 1_600_000_000);
    h.add_config("qemu-server.conf", b"name: test\n".to_vec())
        .unwrap();
    h.add_device("drive-scsi0", SIZE).unwrap();
    test_support::write_archive(&h, checksums, (0..CLUSTERS).map(|n| (1, n, raw_cluster(n))))
}

fn header_size(bytes: &[u8]) -> usize {
    u32::from_be_bytes(bytes[56..60].try_into().unwrap()) as usize
}

/// (offset, length) of every extent, found by walking block counts.
fn extents(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut off = header_size(bytes);
    while off < bytes.len() {
        let blocks = u16::from_be_bytes([bytes[off + 6], bytes[off + 7]]) as usize;
        let len = EXTENT_HEADER_SIZE + blocks * 4096;
        out.push((off, len));
        off += len;
    }
    out
}

fn md5_with_zeroed_field(raw: &[u8], field: usize) -> [u8; 16] {
    let mut md5 = Md5::new();
    md5.update(&raw[..field]);
    md5.update([0u8; 16]);
    md5.update(&raw[field + 16..]);
    md5.finalize().into()
}

/// Recomputes the MD5 of the extent header at `off`.
fn reseal_extent(bytes: &mut [u8], off: usize) {
    let md5 = md5_with_zeroed_field(&bytes[off..off + EXTENT_HEADER_SIZE], 24);
    bytes[off + 24..off + 40].copy_from_slice(&md5);
}

/// Recomputes the MD5 of the archive header.
fn reseal_header(bytes: &mut [u8]) {
    let size = header_size(bytes);
    let md5 = md5_with_zeroed_field(&bytes[..size], 32);
    bytes[32..48].copy_from_slice(&md5);
}

fn slot(bytes: &[u8], off: usize, i: usize) -> BlockInfo {
    let at = off + 40 + 8 * i;
    BlockInfo::from_u64(u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap()))
}

/// Rewrites slot `i` of the extent at `off` and reseals it.
fn set_slot(bytes: &mut [u8], off: usize, i: usize, info: BlockInfo) {
    let at = off + 40 + 8 * i;
    bytes[at..at + 8].copy_from_slice(&info.to_u64().to_be_bytes());
    reseal_extent(bytes, off);
}

fn block_count(bytes: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([bytes[off + 6], bytes[off + 7]])
}

// ---------------------------------------------------------------------------
// Reading.

/// Every delivered cluster, expanded to 64 KiB.
#[derive(Default)]
struct Collect(BTreeMap<(u8, u32), Vec<u8>>);

impl ClusterSink for Collect {
    fn cluster(&mut self, c: &Cluster<'_>) -> std::io::Result<Flow> {
        let mut full = vec![0u8; CLUSTER_SIZE];
        c.expand_into(&mut full);
        assert!(
            self.0.insert((c.dev_id, c.cluster_num), full).is_none(),
            "cluster delivered twice"
        );
        Ok(Flow::Continue)
    }
}

fn read_with(bytes: &[u8], salvage: bool) -> Result<(Summary, Collect), Error> {
    let mut archive = Archive::with_options(bytes, ReadOptions { salvage })?;
    let mut sink = Collect::default();
    let summary = archive.run(&mut sink)?;
    Ok((summary, sink))
}

/// Where index mode says each cluster lies.
#[derive(Default)]
struct Located(Vec<(IndexedCluster, u64)>);

impl IndexSink for Located {
    fn extent(&mut self, e: &IndexedExtent<'_>) -> std::io::Result<Flow> {
        assert!(e.data_len <= e.block_count as u64 * 4096);
        for c in e.clusters {
            self.0
                .push((*c, e.data_offset() + c.first_block as u64 * 4096));
        }
        Ok(Flow::Continue)
    }
}

/// [`Archive::index`] over `bytes` as a seekable file: the clusters it
/// locates, read from where it says they are.
fn index_with(bytes: &[u8], salvage: bool) -> Result<(Summary, Collect), Error> {
    let input = Seekable::new(std::io::Cursor::new(bytes)).unwrap();
    let mut archive = Archive::with_options(input, ReadOptions { salvage })?;
    let mut sink = Located::default();
    let summary = archive.index(&mut sink)?;
    let mut got = Collect::default();
    for (c, at) in sink.0 {
        let at = at as usize;
        let data = &bytes[at..at + c.mask.count() * 4096];
        let cluster = Cluster {
            dev_id: c.dev_id,
            cluster_num: c.cluster_num,
            mask: c.mask,
            data,
        };
        got.cluster(&cluster).unwrap();
    }
    Ok((summary, got))
}

/// The error a strict read of `bytes` gives; it must be damage. Index mode
/// (every check but the data's) must find the same, or, where only the data
/// is wrong, nothing.
fn damage(bytes: &[u8]) -> Error {
    match read_with(bytes, false) {
        Ok(_) => panic!("damaged archive accepted"),
        Err(e) => {
            assert_eq!(e.class(), ErrorClass::Damaged, "{e}");
            match index_with(bytes, false) {
                Err(i) => assert_eq!(i.to_string(), e.to_string(), "index mode"),
                Ok(_) => assert_eq!(e.message(), "data checksum mismatch", "index mode passed"),
            }
            e
        }
    }
}

/// Asserts that a strict read fails with exactly `message`.
#[track_caller]
fn assert_damage(bytes: &[u8], message: &str) {
    assert_eq!(damage(bytes).to_string(), message);
}

// ---------------------------------------------------------------------------
// Allocation accounting: the bytes a test thread allocates, so that "no huge
// allocation" is measured, not assumed. Per thread, since tests run in
// parallel.

struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn note(delta: isize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call is passed on to the system allocator unchanged; the
// bookkeeping allocates nothing (const-initialised thread-locals).
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            note(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            note(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        note(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            note(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns its result with the most bytes this thread had
/// allocated at once meanwhile, beyond what it held before.
fn peak_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    let peak = PEAK.with(Cell::get);
    (out, (peak - base).max(0) as usize)
}

/// Asserts that a strict read of `bytes` fails with `message` and allocates
/// at most `limit` bytes doing so.
#[track_caller]
fn assert_damage_within(bytes: &[u8], message: &str, limit: usize) {
    let (e, peak) = peak_allocation(|| damage(bytes));
    assert_eq!(e.to_string(), message);
    assert!(peak <= limit, "{message}: {peak} bytes allocated");
}

/// What reading needs at most: one extent of 59 full clusters, a bitmap
/// page, the header; far below anything a lying field could ask for.
const READ_MEMORY: usize = 6 << 20;

#[test]
fn a_sound_read_stays_within_its_memory_bound() {
    let bytes = build(true);
    let (summary, peak) = peak_allocation(|| {
        let mut archive = Archive::new(&bytes[..]).unwrap();
        archive.run(&mut Count).unwrap()
    });
    assert_eq!(summary.clusters, CLUSTERS as u64);
    assert!(peak <= READ_MEMORY, "{peak} bytes allocated");
    // The accounting sees the extent buffer (about 2.5 MiB of data here).
    assert!(peak >= 1 << 20, "only {peak} bytes counted");
}

/// Counts nothing, keeps nothing.
struct Count;

impl ClusterSink for Count {
    fn cluster(&mut self, _: &Cluster<'_>) -> std::io::Result<Flow> {
        Ok(Flow::Continue)
    }
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures")
}

#[test]
fn the_undamaged_archive_reads_back() {
    for checksums in [true, false] {
        let bytes = build(checksums);
        let ext = extents(&bytes);
        assert_eq!(ext.len(), 3);
        let (summary, got) = read_with(&bytes, false).unwrap();
        assert_eq!(summary.extents, 3);
        assert_eq!(summary.clusters, CLUSTERS as u64);
        assert_eq!(
            summary.data_checksums.describe(),
            if checksums { "verified" } else { "absent" }
        );
        for n in 0..CLUSTERS {
            assert!(got.0[&(1, n)] == expected_cluster(n), "cluster {n}");
        }
    }
}

// ---------------------------------------------------------------------------
// The archive header.

#[test]
fn flipped_header_bytes() {
    let bytes = build(true);
    let h = header_size(&bytes);
    // ctime, the MD5 itself, blob offset, a config pointer, a device slot,
    // the blob buffer, its unused tail, the header size field.
    for pos in [30, 33, 50, 2045, 4130, 12290, h - 1, 57] {
        let mut bad = bytes.clone();
        bad[pos] ^= 0x01;
        assert_damage(&bad, "header: header checksum mismatch");
    }
    let mut bad = bytes.clone();
    bad[0] ^= 0x01;
    assert_damage(&bad, "header: not a VMA archive (wrong magic number)");
    // A version that is not 1, with a valid MD5.
    let mut bad = bytes.clone();
    bad[7] = 2;
    reseal_header(&mut bad);
    assert_damage(&bad, "header: unsupported version 2 (only 1 exists)");
}

#[test]
fn absurd_device_size_is_refused_before_anything_is_allocated() {
    let bytes = build(true);
    // Device 1's size field: device slots start at 4096, 32 bytes each.
    let at = 4096 + 32 + 8;
    for size in [(1u64 << 48) + 1, u64::MAX] {
        let mut bad = bytes.clone();
        bad[at..at + 8].copy_from_slice(&size.to_be_bytes());
        reseal_header(&mut bad);
        assert_damage_within(
            &bad,
            &format!(
                "header: device 1: size {size} is larger than 32-bit cluster numbers can address"
            ),
            READ_MEMORY,
        );
    }
}

#[test]
fn the_largest_device_costs_nothing_until_its_clusters_arrive() {
    // 2^48 bytes (2^32 clusters) is the largest device; a header declaring it
    // and no extent must be read, checked and found incomplete without a
    // bitmap of 512 MiB.
    let mut h = HeaderBuilder::new(UUID, 0);
    h.add_device("huge", 1 << 48).unwrap();
    let bytes = h.encode().unwrap();
    let (e, peak) = peak_allocation(|| damage(&bytes));
    assert!(peak <= READ_MEMORY, "{peak} bytes allocated");
    assert_eq!(e.location(), Some(Location::End));
    assert_eq!(
        e.to_string(),
        "huge: cluster 0 missing (4294967296 of 4294967296 clusters missing)"
    );
}

#[test]
fn absurd_header_size_is_refused_before_anything_is_allocated() {
    let bytes = build(true);
    for size in [u32::MAX, 12287, 0, MAX_READ_HEADER_SIZE as u32 + 1] {
        let mut bad = bytes.clone();
        bad[56..60].copy_from_slice(&size.to_be_bytes());
        assert_damage_within(
            &bad,
            &format!("header: header size {size} outside 12288..={MAX_READ_HEADER_SIZE}"),
            READ_MEMORY,
        );
    }
    // The largest size accepted, on a short input: only the bytes that
    // arrive are held, and the input is too short.
    let mut bad = bytes.clone();
    bad[56..60].copy_from_slice(&(MAX_READ_HEADER_SIZE as u32).to_be_bytes());
    assert_damage_within(
        &bad,
        &format!(
            "header: truncated: got {} of {MAX_READ_HEADER_SIZE} bytes",
            bytes.len()
        ),
        2 * bytes.len() + READ_MEMORY,
    );
}

#[test]
fn truncated_inside_the_header() {
    let bytes = build(true);
    let h = header_size(&bytes);
    assert_damage(&bytes[..5000], "header: truncated: got 5000 of 12288 bytes");
    assert_damage(
        &bytes[..h - 100],
        &format!("header: truncated: got {} of {h} bytes", h - 100),
    );
    assert_damage(&bytes[..0], "header: not a VMA archive: the input is empty");
}

// ---------------------------------------------------------------------------
// Extent headers: damage the MD5 catches.

#[test]
fn flipped_extent_header_bytes() {
    let bytes = build(true);
    let (off, _) = extents(&bytes)[0];
    let mut bad = bytes.clone();
    bad[off] ^= 0x20;
    assert_damage(
        &bad,
        &format!("extent 0 at byte {off}: wrong extent magic number"),
    );
    // The block count, the uuid, the MD5 area, a blockinfo slot's mask,
    // dev_id and cluster number, an unused slot, the checksum slot.
    for pos in [
        7,
        9,
        24,
        31,
        39,
        40,
        43,
        47,
        40 + 8 * 30 + 3,
        40 + 8 * 58 + 7,
    ] {
        let mut bad = bytes.clone();
        bad[off + pos] ^= 0x04;
        assert_damage(
            &bad,
            &format!("extent 0 at byte {off}: header checksum mismatch"),
        );
    }
    // Extent 1 of 3, for a location that is not the first.
    let (off1, _) = extents(&bytes)[1];
    let mut bad = bytes.clone();
    bad[off1 + 100] ^= 0x80;
    assert_damage(
        &bad,
        &format!("extent 1 at byte {off1}: header checksum mismatch"),
    );
}

#[test]
fn resealed_extent_header_fields() {
    let bytes = build(true);
    let (off, _) = extents(&bytes)[1];
    let mut bad = bytes.clone();
    bad[off + 8] ^= 0x01;
    reseal_extent(&mut bad, off);
    assert_damage(
        &bad,
        &format!("extent 1 at byte {off}: uuid differs from the archive's"),
    );
    let mut bad = bytes.clone();
    bad[off + 5] = 1;
    reseal_extent(&mut bad, off);
    assert_damage(
        &bad,
        &format!("extent 1 at byte {off}: reserved field is 1, not 0"),
    );
}

// ---------------------------------------------------------------------------
// Blockinfo slots with a valid MD5: the semantic checks.

#[test]
fn slot_naming_an_unknown_device() {
    let bytes = build(true);
    let (off, _) = extents(&bytes)[0];
    for dev in [2u8, 7, 255] {
        let mut bad = bytes.clone();
        let s = slot(&bad, off, 2);
        set_slot(&mut bad, off, 2, BlockInfo { dev_id: dev, ..s });
        assert_damage(
            &bad,
            &format!("extent 0 at byte {off}: slot 2: device {dev} is not declared in the header"),
        );
    }
}

#[test]
fn slot_with_a_cluster_past_the_device_end() {
    let bytes = build(true);
    let (off, _) = extents(&bytes)[0];
    for n in [CLUSTERS, CLUSTERS + 1, u32::MAX] {
        let mut bad = bytes.clone();
        let s = slot(&bad, off, 3);
        set_slot(
            &mut bad,
            off,
            3,
            BlockInfo {
                cluster_num: n,
                ..s
            },
        );
        assert_damage(
            &bad,
            &format!(
                "extent 0 at byte {off}: slot 3: cluster {n} is past the end of drive-scsi0 (131 clusters)"
            ),
        );
    }
}

#[test]
fn slot_mask_naming_blocks_past_the_device_end() {
    let bytes = build(true);
    let (off, _) = extents(&bytes)[2];
    // The last cluster (130) sits in slot 14 of the last extent; the device
    // ends 5000 bytes into it, so only blocks 0 and 1 may be stored.
    let s = slot(&bytes, off, 14);
    assert_eq!((s.cluster_num, s.mask), (130, BlockMask(0b11)));
    for (mask, shown) in [(0b111u16, "0x0007"), (0x8003, "0x8003"), (0xffff, "0xffff")] {
        let mut bad = bytes.clone();
        set_slot(
            &mut bad,
            off,
            14,
            BlockInfo {
                mask: BlockMask(mask),
                ..s
            },
        );
        assert_damage(
            &bad,
            &format!(
                "extent 2 at byte {off}: slot 14: cluster 130 of drive-scsi0 stores blocks past the device end (mask {shown})"
            ),
        );
    }
}

#[test]
fn block_count_that_does_not_match_the_masks() {
    let bytes = build(true);
    let (off, _) = extents(&bytes)[0];
    let blocks = block_count(&bytes, off);
    for claimed in [65535u16, blocks + 1, blocks - 1, 0] {
        let mut bad = bytes.clone();
        bad[off + 6..off + 8].copy_from_slice(&claimed.to_be_bytes());
        reseal_extent(&mut bad, off);
        assert_damage_within(
            &bad,
            &format!(
                "extent 0 at byte {off}: block_count {claimed} does not match the {blocks} blocks its masks name"
            ),
            READ_MEMORY,
        );
    }
}

#[test]
fn cluster_twice_inside_one_extent() {
    let bytes = build(true);
    let (off, _) = extents(&bytes)[0];
    let mut bad = bytes.clone();
    let s = slot(&bad, off, 5);
    set_slot(
        &mut bad,
        off,
        5,
        BlockInfo {
            cluster_num: 1,
            ..s
        },
    );
    assert_damage(
        &bad,
        &format!("extent 0 at byte {off}: slot 5: cluster 1 of drive-scsi0 appears twice"),
    );
}

#[test]
fn duplicated_extent() {
    let bytes = build(true);
    let (off, len) = extents(&bytes)[0];
    let mut bad = bytes[..off + len].to_vec();
    bad.extend_from_slice(&bytes[off..off + len]);
    bad.extend_from_slice(&bytes[off + len..]);
    assert_damage(
        &bad,
        &format!(
            "extent 1 at byte {}: slot 0: cluster 0 of drive-scsi0 appears twice",
            off + len
        ),
    );
}

/// An archive with a 3-cluster `vmstate` device (id 1) and a one-cluster disk.
fn build_with_vmstate() -> Vec<u8> {
    let mut h = HeaderBuilder::new(UUID, 0);
    h.add_device("vmstate", 3 * CLUSTER_SIZE as u64).unwrap();
    h.add_device("drive-scsi0", 4096).unwrap();
    let mut w = Writer::new(Vec::new(), &h, WriterOptions::default()).unwrap();
    for n in 0..3 {
        w.write_raw(1, n, &[n as u8 + 1; 100]).unwrap();
    }
    w.write_raw(2, 0, &[9; 4096]).unwrap();
    w.finish().unwrap()
}

#[test]
fn vmstate_out_of_order() {
    let bytes = build_with_vmstate();
    read_with(&bytes, false).unwrap();
    let (off, _) = extents(&bytes)[0];
    let (s0, s1) = (slot(&bytes, off, 0), slot(&bytes, off, 1));
    assert_eq!((s0.cluster_num, s1.cluster_num), (0, 1));
    // Swapped: 1 comes first.
    let mut bad = bytes.clone();
    set_slot(
        &mut bad,
        off,
        0,
        BlockInfo {
            cluster_num: 1,
            ..s0
        },
    );
    set_slot(
        &mut bad,
        off,
        1,
        BlockInfo {
            cluster_num: 0,
            ..s1
        },
    );
    assert_damage(
        &bad,
        &format!("extent 0 at byte {off}: slot 0: vmstate cluster 1 out of order (expected 0)"),
    );
    // A gap: 0, then 2.
    let mut bad = bytes.clone();
    set_slot(
        &mut bad,
        off,
        1,
        BlockInfo {
            cluster_num: 2,
            ..s1
        },
    );
    assert_damage(
        &bad,
        &format!("extent 0 at byte {off}: slot 1: vmstate cluster 2 out of order (expected 1)"),
    );
}

// ---------------------------------------------------------------------------
// Truncation and data.

#[test]
fn truncated_inside_an_extent_header() {
    let bytes = build(true);
    for (i, &(off, _)) in extents(&bytes).iter().enumerate() {
        for got in [1, 100, 511] {
            assert_damage(
                &bytes[..off + got],
                &format!("extent {i} at byte {off}: truncated: got {got} of 512 header bytes"),
            );
        }
    }
}

#[test]
fn truncated_inside_extent_data() {
    let bytes = build(true);
    for (i, &(off, len)) in extents(&bytes).iter().enumerate() {
        let need = len - EXTENT_HEADER_SIZE;
        for got in [0, 1, 5000, need - 1] {
            assert_damage(
                &bytes[..off + EXTENT_HEADER_SIZE + got],
                &format!("extent {i} at byte {off}: truncated: got {got} of {need} data bytes"),
            );
        }
    }
}

#[test]
fn truncated_at_an_extent_boundary() {
    let bytes = build(true);
    let ext = extents(&bytes);
    for (cut, first, missing) in [(ext[0].0, 0, 131), (ext[1].0, 58, 73), (ext[2].0, 116, 15)] {
        let e = damage(&bytes[..cut]);
        assert_eq!(e.location(), Some(Location::End));
        assert_eq!(
            e.to_string(),
            format!("drive-scsi0: cluster {first} missing ({missing} of 131 clusters missing)")
        );
    }
}

#[test]
fn flipped_data_byte_with_data_checksums() {
    let bytes = build(true);
    for (i, &(off, len)) in extents(&bytes).iter().enumerate() {
        for pos in [off + EXTENT_HEADER_SIZE, off + len / 2, off + len - 1] {
            let mut bad = bytes.clone();
            bad[pos] ^= 0x40;
            assert_damage(
                &bad,
                &format!("extent {i} at byte {off}: data checksum mismatch"),
            );
        }
    }
    // A checksum slot that lies about the data (MD5 resealed).
    let (off, _) = extents(&bytes)[1];
    let mut bad = bytes.clone();
    let s = slot(&bad, off, 58);
    assert!(s.as_data_checksum().is_some());
    set_slot(
        &mut bad,
        off,
        58,
        BlockInfo::data_checksum(s.cluster_num ^ 1),
    );
    assert_damage(
        &bad,
        &format!("extent 1 at byte {off}: data checksum mismatch"),
    );
}

#[test]
fn flipped_data_byte_without_data_checksums_goes_unnoticed() {
    // Why our writer adds data checksums: Proxmox's format cannot tell.
    let bytes = build(false);
    let (off, _) = extents(&bytes)[0];
    let mut bad = bytes.clone();
    bad[off + EXTENT_HEADER_SIZE] ^= 0x40;
    let (summary, got) = read_with(&bad, false).unwrap();
    assert_eq!(summary.data_checksums.describe(), "absent");
    assert_ne!(got.0[&(1, 0)], expected_cluster(0));
}

// ---------------------------------------------------------------------------
// Proxmox's own archive, damaged.

fn multi_disk() -> Vec<u8> {
    std::fs::read(fixtures().join("pve/multi-disk.vma")).unwrap()
}

#[test]
fn proxmox_archive_damaged() {
    let bytes = multi_disk();
    assert_eq!(
        extents(&bytes),
        vec![(13824, 889344), (903168, 16896), (920064, 8704)]
    );
    let mut bad = bytes.clone();
    bad[100] ^= 1;
    assert_damage(&bad, "header: header checksum mismatch");
    let mut bad = bytes.clone();
    bad[903168 + 100] ^= 1;
    assert_damage(&bad, "extent 1 at byte 903168: header checksum mismatch");
    let mut bad = bytes.clone();
    bad[903168 + 2] ^= 1;
    assert_damage(&bad, "extent 1 at byte 903168: wrong extent magic number");
    // Slot 0 of extent 0 is drive-ide0 (id 4) cluster 0, mask 0x3; its
    // device is 4608 bytes, so block 2 is past its end.
    let mut bad = bytes.clone();
    let s = slot(&bad, 13824, 0);
    assert_eq!((s.dev_id, s.cluster_num, s.mask), (4, 0, BlockMask(3)));
    set_slot(
        &mut bad,
        13824,
        0,
        BlockInfo {
            mask: BlockMask(7),
            ..s
        },
    );
    assert_damage(
        &bad,
        "extent 0 at byte 13824: slot 0: cluster 0 of drive-ide0 stores blocks past the device end (mask 0x0007)",
    );
    let mut bad = bytes.clone();
    set_slot(&mut bad, 13824, 0, BlockInfo { dev_id: 5, ..s });
    assert_damage(
        &bad,
        "extent 0 at byte 13824: slot 0: device 5 is not declared in the header",
    );
    let mut bad = bytes.clone();
    set_slot(
        &mut bad,
        13824,
        0,
        BlockInfo {
            cluster_num: 1,
            ..s
        },
    );
    assert_damage(
        &bad,
        "extent 0 at byte 13824: slot 0: cluster 1 is past the end of drive-ide0 (1 clusters)",
    );
    assert_damage(
        &bytes[..13824 + 512 + 1000],
        "extent 0 at byte 13824: truncated: got 1000 of 888832 data bytes",
    );
    assert_damage(
        &bytes[..903168 + 300],
        "extent 1 at byte 903168: truncated: got 300 of 512 header bytes",
    );
    let e = damage(&bytes[..920064]);
    assert_eq!(e.location(), Some(Location::End));
    assert_eq!(
        e.to_string(),
        "drive-virtio1: cluster 94 missing (34 of 128 clusters missing)"
    );
    // The last extent twice.
    let mut bad = bytes.clone();
    bad.extend_from_slice(&bytes[920064..]);
    assert_damage(
        &bad,
        "extent 3 at byte 928768: slot 0: cluster 94 of drive-virtio1 appears twice",
    );
}

#[test]
fn proxmox_archive_salvaged() {
    let bytes = multi_disk();
    let (_, good) = read_with(&bytes, false).unwrap();
    let mut bad = bytes.clone();
    bad[903168 + 100] ^= 1;
    let (summary, got) = read_with(&bad, true).unwrap();
    assert_eq!(summary.damage_count, 1);
    assert_eq!(
        summary.damage[0].to_string(),
        "extent 1 at byte 903168: header checksum mismatch"
    );
    assert_eq!(summary.extents, 2);
    assert_eq!(summary.clusters, 150 - 58);
    assert_eq!(summary.missing.len(), 1);
    let m = &summary.missing[0];
    assert_eq!((m.dev_id, m.name.as_str()), (2, "drive-virtio1"));
    assert_eq!(
        (m.ranges().collect::<Vec<_>>(), m.count, m.clusters),
        (vec![36..94], 58, 128)
    );
    for (key, data) in &got.0 {
        assert!(good.0[key] == *data, "{key:?}");
    }
}

// ---------------------------------------------------------------------------
// Salvage.

/// Checks that `got` holds exactly the clusters outside `lost`, correct.
fn assert_delivered_all_but(got: &Collect, lost: std::ops::Range<u32>) {
    for n in 0..CLUSTERS {
        match got.0.get(&(1, n)) {
            Some(c) => {
                assert!(!lost.contains(&n), "lost cluster {n} delivered");
                assert!(*c == expected_cluster(n), "cluster {n} wrong");
            }
            None => assert!(lost.contains(&n), "cluster {n} not delivered"),
        }
    }
}

#[test]
fn salvage_skips_a_damaged_middle_extent_and_resyncs() {
    let bytes = build(true);
    let (off, _) = extents(&bytes)[1];
    let mut bad = bytes.clone();
    bad[off + 30] ^= 1;
    let (summary, got) = read_with(&bad, true).unwrap();
    assert_eq!(summary.damage_count, 1);
    assert_eq!(
        summary.damage[0].to_string(),
        format!("extent 1 at byte {off}: header checksum mismatch")
    );
    assert_eq!(summary.extents, 2);
    assert_eq!(summary.clusters, 131 - 58);
    assert_eq!(summary.missing.len(), 1);
    assert_eq!(
        summary.missing[0].ranges().collect::<Vec<_>>(),
        vec![58..116]
    );
    assert_eq!(summary.missing[0].count, 58);
    assert!(!summary.is_complete());
    assert_delivered_all_but(&got, 58..116);
}

/// Issue 8, item 7: resynchronising over hostile garbage. Garbage full of
/// extent magic numbers, of magic + uuid (a candidate every 24 bytes, all
/// alike), of candidates whose block count cannot be right, of one bad
/// header repeated, and of candidates naming clusters no writer of this
/// archive writes (undeclared devices, past the end) costs (almost) no MD5:
/// candidates are found by the uuid with memmem and sifted by cheap checks
/// first. Candidates naming declared clusters cost one MD5 each. The
/// extents after the garbage are found all the same, byte-exact.
#[test]
fn salvage_over_hostile_garbage_hashes_almost_no_candidates() {
    let bytes = build(true);
    let (off, len) = extents(&bytes)[1];
    let mut fake = Vec::new();
    fake.extend_from_slice(b"VMAE\0\0\0\0");
    fake.extend_from_slice(&UUID);
    let mut wrong_count = [0u8; EXTENT_HEADER_SIZE];
    wrong_count[..4].copy_from_slice(b"VMAE");
    wrong_count[7] = 1; // block_count 1, but no slot names a block
    wrong_count[8..24].copy_from_slice(&UUID);
    let mut bad_md5 = wrong_count;
    bad_md5[7] = 0; // all right but its MD5: hashed once, then recognised

    // Dense: a candidate every 32 bytes (magic, 0, block count, uuid, 8
    // bytes of no device), each passing the magic, reserved, uuid and block
    // count checks. Its slots: 30 in the uuid's bytes (device 0x11, mask
    // 0x1111: 4 blocks each), 14 in the next candidates' magic (device
    // b'E', mask b"VM": 8 blocks each): 232 blocks. Neither device is
    // declared: ruled out without an MD5.
    let mut dense = Vec::new();
    for i in 0..4096u32 {
        dense.extend_from_slice(b"VMAE\0\0");
        dense.extend_from_slice(&232u16.to_be_bytes());
        dense.extend_from_slice(&UUID);
        dense.extend_from_slice(&[i as u8, 0xee, 7, 0, 1, 2, 3, (i >> 8) as u8]);
    }
    // 300 distinct headers, each passing every check but its MD5 and
    // naming the cluster `slot(i)`. Declared clusters (device 1, inside it,
    // masks fitting) cost one MD5 each; clusters no writer of this archive
    // writes (device 2 is not declared, clusters past the end, blocks past
    // the end) cost none.
    let headers = |slot: &dyn Fn(u32) -> (u8, u32, u16)| {
        let mut out = Vec::new();
        for i in 0..300u32 {
            let (dev_id, cluster_num, mask) = slot(i);
            let info = BlockInfo {
                mask: BlockMask(mask),
                reserved: 0,
                dev_id,
                cluster_num,
            };
            let mut h = bad_md5;
            h[7] = mask.count_ones() as u8; // block count
            h[24..28].copy_from_slice(&i.to_be_bytes()); // its (wrong) MD5
            h[40..48].copy_from_slice(&info.to_u64().to_be_bytes());
            out.extend_from_slice(&h);
        }
        out
    };
    let declared = headers(&|i| {
        (
            1,
            i % CLUSTERS,
            0xffff * (i % CLUSTERS != CLUSTERS - 1) as u16,
        )
    });
    let undeclared = headers(&|i| (2, i % CLUSTERS, 0));
    let past_end = headers(&|i| (1, CLUSTERS + i, 0));
    // The last cluster holds 5000 bytes: blocks 0 and 1.
    let mask_past_end = headers(&|i| (1, CLUSTERS - 1, 0b100 | i as u16));
    // The declared clusters again, each header changed in one way no writer
    // writes: ruled out without an MD5.
    let altered = |change: &dyn Fn(&mut [u8])| {
        let mut out = declared.clone();
        out.chunks_exact_mut(EXTENT_HEADER_SIZE).for_each(change);
        out
    };
    let reserved_set = altered(&|h| h[40 + 2] = 1);
    let named_twice = altered(&|h| {
        let first: [u8; 8] = h[40..48].try_into().unwrap();
        h[48..56].copy_from_slice(&first);
        h[7] *= 2; // block count: the mask counted twice
    });
    let garbage: [(&str, Vec<u8>, u64); 11] = [
        ("magic", b"VMAE".repeat(1 << 16), 0),
        ("magic+uuid", fake.repeat(1 << 13), 0),
        ("wrong block count", wrong_count.repeat(512), 0),
        ("one bad header repeated", bad_md5.repeat(512), 1),
        ("dense, undeclared devices", dense, 0),
        // The first is read as the extent due there, not a candidate.
        ("distinct, declared clusters", declared, 299),
        ("naming an undeclared device", undeclared, 0),
        ("naming a cluster past the end", past_end, 0),
        ("naming blocks past the end", mask_past_end, 0),
        ("a slot's reserved byte not 0", reserved_set, 0),
        ("a cluster named twice", named_twice, 0),
    ];
    for (what, junk, hashed) in garbage {
        // Extent 1 replaced by garbage: extents 0 and 2 survive.
        let mut bad = bytes[..off].to_vec();
        bad.extend_from_slice(&junk);
        bad.extend_from_slice(&bytes[off + len..]);
        let (summary, got) = read_with(&bad, true).unwrap();
        // `hashed` garbage candidates, then the real extent 2.
        assert_eq!(summary.candidates_hashed, hashed + 1, "{what}");
        assert_eq!(summary.damage_count, 1, "{what}");
        assert_eq!(summary.extents, 2, "{what}");
        assert_eq!(
            summary.missing[0].ranges().collect::<Vec<_>>(),
            vec![58..116],
            "{what}"
        );
        assert_delivered_all_but(&got, 58..116);
    }
}

#[test]
fn salvage_skips_an_extent_whose_data_fails_its_checksum() {
    let bytes = build(true);
    let (off, len) = extents(&bytes)[0];
    let mut bad = bytes.clone();
    bad[off + len - 10] ^= 1;
    let (summary, got) = read_with(&bad, true).unwrap();
    assert_eq!(
        summary.damage[0].to_string(),
        format!("extent 0 at byte {off}: data checksum mismatch")
    );
    assert_eq!(summary.missing[0].ranges().collect::<Vec<_>>(), vec![0..58]);
    assert_delivered_all_but(&got, 0..58);
}

#[test]
fn salvage_skips_a_bad_slot_only() {
    let bytes = build(true);
    let (off, _) = extents(&bytes)[0];
    let mut bad = bytes.clone();
    let s = slot(&bad, off, 3);
    set_slot(&mut bad, off, 3, BlockInfo { dev_id: 9, ..s });
    let (summary, got) = read_with(&bad, true).unwrap();
    assert_eq!(summary.damage_count, 1);
    assert_eq!(
        summary.damage[0].to_string(),
        format!("extent 0 at byte {off}: slot 3: device 9 is not declared in the header")
    );
    assert_eq!(summary.missing[0].ranges().collect::<Vec<_>>(), vec![3..4]);
    assert_delivered_all_but(&got, 3..4);
}

#[test]
fn salvage_of_a_truncated_archive_keeps_the_whole_clusters() {
    let bytes = build(true);
    let (off, _) = extents(&bytes)[1];
    // Clusters 58, 59 and 60 store 11, 11 and 10 blocks: a cut 25 blocks
    // into extent 1's data leaves 58 and 59 whole, 60 torn.
    let masks: Vec<usize> = (0..3).map(|i| slot(&bytes, off, i).mask.count()).collect();
    assert_eq!(masks, vec![11, 11, 10]);
    let cut = off + EXTENT_HEADER_SIZE + 25 * 4096;
    let (summary, got) = read_with(&bytes[..cut], true).unwrap();
    assert_eq!(summary.damage_count, 1);
    assert_eq!(
        summary.damage[0].to_string(),
        format!(
            "extent 1 at byte {off}: truncated: got 102400 of {} data bytes",
            block_count(&bytes, off) as usize * 4096
        )
    );
    assert_eq!(summary.extents, 1);
    assert_delivered_all_but(&got, 60..131);
    assert_eq!(
        summary.missing[0].ranges().collect::<Vec<_>>(),
        vec![60..131]
    );
    assert_eq!(summary.missing[0].count, 71);
}

#[test]
fn salvage_with_a_duplicated_extent_delivers_each_cluster_once() {
    let bytes = build(true);
    let (off, len) = extents(&bytes)[1];
    let mut bad = bytes[..off + len].to_vec();
    bad.extend_from_slice(&bytes[off..]);
    let (summary, got) = read_with(&bad, true).unwrap();
    assert_eq!(summary.damage_count, 58);
    assert!(summary.missing.is_empty());
    assert_delivered_all_but(&got, 0..0);
}

// ---------------------------------------------------------------------------
// Random damage: never a panic, never success with wrong data.

/// Raw 64 KiB clusters by (device id, cluster number).
type Content = BTreeMap<(u8, u32), Vec<u8>>;

/// A small archive with two devices and a few extents, and its content.
fn small_archive(checksums: bool) -> (Vec<u8>, Content) {
    let mut h = HeaderBuilder::new(UUID, 0);
    h.add_config("qemu-server.conf", b"x".to_vec()).unwrap();
    h.add_device("a", 70 * 65536 + 4097).unwrap();
    h.add_device("b", 5 * 65536).unwrap();
    let mut content = BTreeMap::new();
    let mut order: Vec<(u8, u32)> = (0..71).map(|n| (1, n)).collect();
    order.extend((0..5).map(|n| (2, n)));
    order.rotate_left(30);
    for &(dev, n) in &order {
        let mut raw = vec![0u8; CLUSTER_SIZE];
        // One non-zero byte in a block chosen by the cluster: little data.
        let block = (n as usize * 7 + dev as usize) % 16;
        raw[block * 4096 + (n as usize % 4096)] = (n as u8).wrapping_mul(3) | 1;
        if dev == 1 && n == 70 {
            // The device ends 4097 bytes in: keep within it.
            raw.fill(0);
            raw[4096] = 0x5a;
        }
        content.insert((dev, n), raw);
    }
    // In the rotated order, not the map's.
    let clusters = order
        .iter()
        .map(|&(dev, n)| (dev, n, content[&(dev, n)].clone()));
    (
        test_support::write_archive(&h, checksums, clusters),
        content,
    )
}

/// Whether `pos` lies in the data of an extent (not a header).
fn in_data(bytes: &[u8], pos: usize) -> bool {
    extents(bytes)
        .iter()
        .any(|&(off, len)| pos >= off + EXTENT_HEADER_SIZE && pos < off + len)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_damage_never_panics_nor_passes_with_wrong_data(
        checksums in any::<bool>(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..4),
        cut in prop::option::of(any::<prop::sample::Index>()),
        salvage in any::<bool>(),
    ) {
        let (orig, content) = small_archive(checksums);
        let mut bad = orig.clone();
        let mut data_touched = false;
        let mut positions = Vec::new();
        for (at, x) in &flips {
            let pos = at.index(bad.len());
            data_touched |= in_data(&orig, pos);
            positions.push(pos);
            bad[pos] ^= x;
        }
        // The extent a cut goes through: salvage hands over its whole
        // clusters without a data checksum to check them against (it covers
        // the entire extent), so damage there can go unnoticed.
        let mut torn_data_touched = false;
        if let Some(at) = cut {
            let end = at.index(orig.len());
            bad.truncate(end);
            if let Some(&(off, len)) = extents(&orig).iter().find(|&&(o, l)| o <= end && end < o + l) {
                torn_data_touched = positions
                    .iter()
                    .any(|&p| p >= off + EXTENT_HEADER_SIZE && p < off + len);
            }
        }
        let damaged = !flips.is_empty() || cut.is_some();
        match read_with(&bad, salvage) {
            Ok((summary, got)) => {
                // Delivered clusters are right, unless unprotected data was hit.
                if (checksums && !(salvage && torn_data_touched)) || !data_touched {
                    for (key, data) in &got.0 {
                        prop_assert!(content[key] == *data, "wrong data in {:?}", key);
                    }
                }
                if !salvage {
                    // A strict read that succeeds read everything.
                    prop_assert_eq!(got.0.len(), content.len());
                    prop_assert!(cut.is_none(), "truncated archive accepted");
                }
                if salvage && damaged && summary.is_complete() {
                    prop_assert_eq!(got.0.len(), content.len());
                }
            }
            Err(e) => {
                prop_assert!(damaged, "sound archive refused: {}", e);
                prop_assert_eq!(e.class(), ErrorClass::Damaged);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Index mode: the same checks without reading the data.

/// Summaries of a read and an index walk agree but on the data checksums,
/// which only a read checks.
fn assert_same_summary(read: &Summary, index: &Summary) {
    assert_eq!(index.extents, read.extents);
    assert_eq!(index.clusters, read.clusters);
    assert_eq!(index.data_blocks, read.data_blocks);
    assert_eq!(index.bytes_read, read.bytes_read);
    assert_eq!(index.missing, read.missing);
    assert_eq!(index.damage_count, read.damage_count);
    let messages = |s: &Summary| s.damage.iter().map(|e| e.to_string()).collect::<Vec<_>>();
    assert_eq!(messages(index), messages(read));
    assert_eq!(
        index.data_checksums.unchecked + index.data_checksums.absent,
        read.data_checksums.verified + read.data_checksums.absent
    );
    assert_eq!(index.data_checksums.verified, 0);
}

#[test]
fn index_mode_locates_every_cluster_a_read_delivers() {
    let archives = [
        ("ours", build(true)),
        ("ours without checksums", build(false)),
        ("with vmstate", build_with_vmstate()),
        ("two devices", small_archive(true).0),
        ("Proxmox's", multi_disk()),
    ];
    for (what, bytes) in archives {
        let (read, want) = read_with(&bytes, false).unwrap();
        let (index, got) = index_with(&bytes, false).unwrap();
        assert_same_summary(&read, &index);
        assert!(got.0 == want.0, "{what}: located data differs");
        let with_crc = if what == "ours" { 3 } else { 0 };
        if what.starts_with("ours") {
            assert_eq!(index.data_checksums.unchecked, with_crc, "{what}");
        }
    }
}

#[test]
fn index_mode_reads_only_the_extent_headers() {
    /// Counts the bytes read and the bytes skipped.
    struct Counted<'a> {
        inner: Seekable<std::io::Cursor<&'a [u8]>>,
        read: u64,
        skipped: u64,
    }
    impl std::io::Read for Counted<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.read += n as u64;
            Ok(n)
        }
    }
    impl SkipData for Counted<'_> {
        fn skip_data(&mut self, n: u64) -> std::io::Result<u64> {
            let n = self.inner.skip_data(n)?;
            self.skipped += n;
            Ok(n)
        }
    }
    let bytes = build(true);
    let ext = extents(&bytes);
    let mut archive = Archive::new(Counted {
        inner: Seekable::new(std::io::Cursor::new(&bytes[..])).unwrap(),
        read: 0,
        skipped: 0,
    })
    .unwrap();
    archive.index(&mut Located::default()).unwrap();
    let counted = archive.into_inner();
    let headers = header_size(&bytes) + ext.len() * EXTENT_HEADER_SIZE;
    // The header and the extent headers, plus the 0-byte read at the end.
    assert_eq!(counted.read, headers as u64);
    assert_eq!(counted.skipped, (bytes.len() - headers) as u64);
}

#[test]
fn index_mode_over_a_stream_that_reads_what_it_skips() {
    /// A pipe-like input: skipping reads the bytes (as a cache writer does).
    struct Streamed<'a>(&'a [u8]);
    impl std::io::Read for Streamed<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            // Short reads, as a pipe gives.
            let n = buf.len().min(self.0.len()).min(1000);
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }
    impl SkipData for Streamed<'_> {
        fn skip_data(&mut self, n: u64) -> std::io::Result<u64> {
            let mut buf = [0u8; 3000];
            let want = (n as usize).min(buf.len());
            std::io::Read::read(self, &mut buf[..want]).map(|k| k as u64)
        }
    }
    let bytes = build(true);
    let mut archive = Archive::new(Streamed(&bytes)).unwrap();
    let mut sink = Located::default();
    let summary = archive.index(&mut sink).unwrap();
    assert_eq!(summary.clusters, CLUSTERS as u64);
    assert_eq!(summary.bytes_read, bytes.len() as u64);
    let (_, want) = index_with(&bytes, false).unwrap();
    assert_eq!(sink.0.len(), want.0.len());
    // Cut off in the data: the same message as a seekable file gives.
    let (off, len) = extents(&bytes)[1];
    let cut = &bytes[..off + len - 7];
    let e = Archive::new(Streamed(cut))
        .unwrap()
        .index(&mut Located::default())
        .unwrap_err();
    assert_eq!(e.to_string(), damage(cut).to_string());
}

#[test]
fn index_mode_salvages_as_a_read_does() {
    let bytes = build(true);
    let (off, _) = extents(&bytes)[1];
    let mut header_hit = bytes.clone();
    header_hit[off + 30] ^= 1;
    let mut slot_hit = bytes.clone();
    let s = slot(&slot_hit, off, 3);
    set_slot(&mut slot_hit, off, 3, BlockInfo { dev_id: 9, ..s });
    let cut = bytes[..off + EXTENT_HEADER_SIZE + 25 * 4096].to_vec();
    let mut twice = bytes.clone();
    twice.extend_from_slice(&bytes[off..]);
    for bad in [header_hit, slot_hit, twice] {
        let (read, want) = read_with(&bad, true).unwrap();
        let (index, got) = index_with(&bad, true).unwrap();
        assert_same_summary(&read, &index);
        assert!(got.0 == want.0);
    }
    // Cut off inside extent 1's data: its whole clusters are located, and
    // the extent says how much of its data is there.
    struct Last(u64, usize);
    impl IndexSink for Last {
        fn extent(&mut self, e: &IndexedExtent<'_>) -> std::io::Result<Flow> {
            *self = Last(e.data_len, e.clusters.len());
            Ok(Flow::Continue)
        }
    }
    let mut last = Last(0, 0);
    let input = Seekable::new(std::io::Cursor::new(&cut[..])).unwrap();
    let summary = Archive::with_options(input, ReadOptions { salvage: true })
        .unwrap()
        .index(&mut last)
        .unwrap();
    assert_eq!((last.0, last.1), (25 * 4096, 2));
    let (read, _) = read_with(&cut, true).unwrap();
    assert_eq!(summary.missing, read.missing);
    assert_eq!(summary.clusters, read.clusters);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Damage anywhere but in extent data, and cuts anywhere: index mode
    /// finds exactly what a read finds.
    #[test]
    fn index_mode_agrees_with_a_read_on_random_damage(
        checksums in any::<bool>(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..4),
        cut in prop::option::of(any::<prop::sample::Index>()),
        salvage in any::<bool>(),
    ) {
        let (orig, _) = small_archive(checksums);
        let mut bad = orig.clone();
        for (at, x) in &flips {
            let pos = at.index(bad.len());
            if !in_data(&orig, pos) {
                bad[pos] ^= x;
            }
        }
        if let Some(at) = cut {
            bad.truncate(at.index(orig.len()));
        }
        match (read_with(&bad, salvage), index_with(&bad, salvage)) {
            (Ok((read, want)), Ok((index, got))) => {
                assert_same_summary(&read, &index);
                prop_assert!(got.0 == want.0);
            }
            (Err(r), Err(i)) => prop_assert_eq!(r.to_string(), i.to_string()),
            (r, i) => prop_assert!(false, "read {:?}, index {:?}", r.err(), i.err()),
        }
    }
}

/// A salvage report of a device missing every other cluster keeps what was
/// present, not a list of what is missing: 2^20 missing ranges (a list would
/// take 16 MiB) from an archive of 9 MB stay within the read's memory bound.
#[test]
fn salvage_of_a_device_missing_every_other_cluster_stays_within_its_memory_bound() {
    // Whole extents of odd clusters (the writer puts 58 in each), then the
    // even ones, cut off: the archive ends where the even ones begin.
    const PRESENT: u32 = 58 * 18079;
    let mut h = vma_format::HeaderBuilder::new([5; 16], 0);
    h.add_device("drive-scsi0", 2 * PRESENT as u64 * 65536)
        .unwrap();
    let mut w = vma_format::Writer::new(Vec::new(), &h, Default::default()).unwrap();
    for n in 0..PRESENT {
        w.write_zero_clusters(1, 2 * n + 1, 1).unwrap();
    }
    w.write_zero_clusters(1, 0, 1).unwrap();
    let cut = w.bytes_written() as usize;
    for n in 1..PRESENT {
        w.write_zero_clusters(1, 2 * n, 1).unwrap();
    }
    let bytes = &w.finish().unwrap()[..cut];
    assert!(bytes.len() < 10 << 20, "{} bytes", bytes.len());
    let (summary, peak) = peak_allocation(|| {
        let mut archive = Archive::with_options(bytes, ReadOptions { salvage: true }).unwrap();
        archive.run(&mut Count).unwrap()
    });
    assert!(peak <= READ_MEMORY, "{peak} bytes allocated");
    let m = &summary.missing[0];
    assert_eq!((m.count, m.clusters), (PRESENT as u64, 2 * PRESENT as u64));
    assert_eq!(m.ranges().count(), PRESENT as usize);
    assert_eq!(
        m.ranges().take(3).collect::<Vec<_>>(),
        vec![0..1, 2..3, 4..5]
    );
    let last = 2 * PRESENT as u64 - 2;
    assert_eq!(m.ranges().last(), Some(last..last + 1));
}

/// The data checksum is computed piece by piece as the data is read (128
/// KiB at a time): a changed byte in any piece — the first, either side
/// of a piece boundary, the last — fails it.
#[test]
fn a_changed_byte_anywhere_in_an_extent_fails_its_data_checksum() {
    let bytes = build(true);
    let (off, len) = extents(&bytes)[0];
    let data = off + EXTENT_HEADER_SIZE;
    let data_len = len - EXTENT_HEADER_SIZE;
    assert!(data_len > 3 * 128 * 1024, "the extent spans several pieces");
    for at in [
        0,
        128 * 1024 - 1,
        128 * 1024,
        2 * 128 * 1024 + 7,
        data_len - 1,
    ] {
        let mut bad = bytes.clone();
        bad[data + at] ^= 0x80;
        let Err(e) = read_with(&bad, false) else {
            panic!("byte {at} of the data changed, and the archive passed");
        };
        assert_eq!(
            e.to_string(),
            format!("extent 0 at byte {off}: data checksum mismatch"),
            "byte {at} of the data"
        );
    }
    // Unchanged, it passes.
    let (summary, _) = read_with(&bytes, false).unwrap();
    assert_eq!(
        summary.data_checksums.verified,
        extents(&bytes).len() as u64
    );
}
