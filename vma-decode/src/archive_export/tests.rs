//! The archive export's unit tests.

use super::*;
use crate::index::IndexBuilder;
use std::io::Write;
use vma_format::{Archive, Cluster, ClusterSink, Flow, HeaderBuilder, Seekable};

const SIZE: u64 = 130 * CLUSTER_SIZE as u64 + 5000;

/// An archive of one disk whose clusters hold assorted blocks, written
/// out of order; the served archive, and the disk's bytes as the
/// streaming reader delivers them.
fn served(checksums: bool) -> (Arc<ServedArchive>, Vec<u8>, tempfile::NamedTempFile) {
    let mut h = HeaderBuilder::new([5; 16], 0);
    h.add_device("drive-scsi0", SIZE).unwrap();
    let clusters = (0..131u32).map(|i| (i * 17) % 131).map(|n| {
        let mut raw = vec![0u8; CLUSTER_SIZE];
        for b in 0..16usize {
            if !(n as usize * 3 + b).is_multiple_of(4) {
                for (i, x) in raw[b * 4096..(b + 1) * 4096].iter_mut().enumerate() {
                    *x = (n as usize * 31 + b * 7 + i) as u8 | 1;
                }
            }
        }
        (1, n, raw)
    });
    let bytes = test_support::write_archive(&h, checksums, clusters);
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&bytes).unwrap();
    struct Image(Vec<u8>);
    impl ClusterSink for Image {
        fn cluster(&mut self, c: &Cluster<'_>) -> io::Result<Flow> {
            let mut full = vec![0u8; CLUSTER_SIZE];
            c.expand_into(&mut full);
            let at = c.offset() as usize;
            let end = (at + CLUSTER_SIZE).min(self.0.len());
            self.0[at..end].copy_from_slice(&full[..end - at]);
            Ok(Flow::Continue)
        }
    }
    let mut image = Image(vec![0u8; SIZE as usize]);
    Archive::new(&bytes[..]).unwrap().run(&mut image).unwrap();
    let mut a = Archive::new(Seekable::new(std::io::Cursor::new(&bytes[..])).unwrap()).unwrap();
    let mut b = IndexBuilder::new(a.header());
    a.index(&mut b).unwrap();
    let file = File::open(f.path()).unwrap();
    (
        ServedArchive::new("test.vma", file, b.finish().unwrap(), true),
        image.0,
        f,
    )
}

#[test]
fn reads_at_any_offset_and_length_give_the_disk_bytes() {
    for checksums in [true, false] {
        let (archive, image, _f) = served(checksums);
        let dev = archive.export(0);
        assert_eq!(dev.size(), SIZE);
        assert!(dev.read_only() && dev.can_multi_conn());
        let mut ranges = vec![(0, SIZE), (0, 1), (SIZE - 1, 1), (65535, 2), (4095, 4098)];
        let mut x = 12345u64;
        for _ in 0..300 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let off = (x >> 20) % SIZE;
            let len = 1 + (x >> 3) % (300_000.min(SIZE - off));
            ranges.push((off, len));
        }
        for (off, len) in ranges {
            let mut buf = vec![0xeeu8; len as usize];
            dev.read_at(&mut buf, off).unwrap();
            assert!(
                buf[..] == image[off as usize..(off + len) as usize],
                "{off}+{len}"
            );
        }
        assert_eq!(archive.failures(), 0);
    }
}

#[test]
fn block_status_is_data_exactly_where_blocks_are_stored() {
    let (archive, image, _f) = served(true);
    let dev = archive.export(0);
    let mut short_replies = 0;
    for (off, len) in [(0, SIZE), (4096 * 3 + 100, 200_000), (SIZE - 10, 10)] {
        // As a client does: ask again from where a reply ended.
        let mut pos = off;
        while pos < off + len {
            let extents = dev.block_status(pos, off + len - pos).unwrap();
            // The cap is checked between clusters: one more cluster's
            // blocks may follow.
            assert!(!extents.is_empty());
            assert!(extents.len() <= MAX_STATUS_EXTENTS + BLOCKS_PER_CLUSTER);
            for e in &extents {
                assert!(e.len > 0);
                for p in (pos..pos + e.len).step_by(512) {
                    let block = (p / 4096 * 4096) as usize;
                    let stored = image[block..(block + 4096).min(image.len())]
                        .iter()
                        .any(|&b| b != 0);
                    assert_eq!(!e.hole, stored, "byte {p}");
                    assert_eq!(e.hole, e.zero);
                }
                pos += e.len;
            }
            // Merged: no two neighbours alike.
            assert!(extents.windows(2).all(|w| w[0].hole != w[1].hole));
            short_replies += (pos < off + len) as u32;
        }
        assert_eq!(pos, off + len);
    }
    // The whole disk alternates too often for one reply.
    assert!(short_replies > 0);
}

#[test]
fn writes_are_refused() {
    let (archive, _, _f) = served(false);
    let dev = archive.export(0);
    let eperm = Some(libc::EPERM);
    assert_eq!(
        dev.write_at(&[1], 0, false).unwrap_err().raw_os_error(),
        eperm
    );
    assert_eq!(dev.trim(0, 1).unwrap_err().raw_os_error(), eperm);
    let flags = ZeroFlags::default();
    assert_eq!(
        dev.write_zeroes(0, 1, flags).unwrap_err().raw_os_error(),
        eperm
    );
    dev.flush().unwrap();
}

#[test]
fn an_index_that_lies_is_caught_at_first_use() {
    let (good, image, f) = served(true);
    let mut index = good.index().clone();
    // Point cluster 0 at the wrong place in its extent.
    let e = index.devices[0].clusters[0].extent;
    let first = &mut index.devices[0].clusters[0];
    first.first_block += 1;
    let file = File::open(f.path()).unwrap();
    let lying = ServedArchive::new("test.vma", file, index, false);
    let dev = lying.export(0);
    let mut buf = vec![0u8; 4096];
    let err = dev.read_at(&mut buf, 0).unwrap_err();
    assert!(
        err.to_string()
            .ends_with("the extent's header is not what the index says"),
        "{err}"
    );
    assert!(dev.block_status(0, 4096).is_err());
    // Clusters of other extents still read.
    let other = (0..131u64)
        .find(|&n| good.index().devices[0].cluster(n).unwrap().extent != e)
        .unwrap();
    let at = other * CLUSTER_SIZE as u64;
    dev.read_at(&mut buf, at).unwrap();
    assert!(buf[..] == image[at as usize..at as usize + 4096]);
    assert_eq!(lying.failures(), 2, "the read and the block status");
}

/// The log line of a bad extent names its clusters from its header, in
/// runs, as a scan of the whole index would (the archive's extents hold
/// clusters out of order).
#[test]
fn a_bad_extent_is_described_by_the_clusters_its_header_lists() {
    let (archive, _, f) = served(true);
    let file = File::open(f.path()).unwrap();
    let index = archive.index();
    let mut multi_run = 0;
    for (id, e) in index.extents.iter().enumerate() {
        let mut head = [0u8; EXTENT_HEADER_SIZE];
        file.read_exact_at(&mut head, e.offset).unwrap();
        let listed = archive.header_matches(id, &head).unwrap();
        assert_eq!(listed.len(), e.clusters as usize);
        // A scan of the index: runs of clusters in this extent.
        let dev = &index.devices[0];
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for n in 0..dev.cluster_count() {
            if dev.cluster(n).unwrap().extent as usize == id {
                match runs.last_mut() {
                    Some((_, end)) if *end == n => *end = n + 1,
                    _ => runs.push((n, n + 1)),
                }
            }
        }
        multi_run += (runs.len() > 1) as u32;
        let want: Vec<String> = runs
            .iter()
            .map(|(a, b)| format!("drive-scsi0 {a}..{b}"))
            .collect();
        assert_eq!(
            archive.describe_clusters(&listed),
            format!("reads of clusters {} fail with EIO", want.join(", "))
        );
        // Another extent's header does not match this one's entry.
        let other = (id + 1) % index.extents.len();
        assert!(archive.header_matches(other, &head).is_none());
    }
    assert!(multi_run > 0, "some extent holds clusters apart");
    assert_eq!(
        archive.describe_clusters(&[]),
        "reads of its clusters fail with EIO"
    );
}
