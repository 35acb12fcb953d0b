//! The fast paths vma-encode relies on write exactly the bytes of the plain
//! ones: `Writer::raw_buffer`/`commit_raw` against `write_raw`,
//! `write_zero_clusters` against `write_cluster` with empty masks, and the
//! bitmap's range operations against single inserts. And the sparse-aware
//! image reader gives the image back, holes and odd sizes included.

use std::io::Write;
use std::os::unix::fs::FileExt;

use proptest::prelude::*;
use vma_encode::source::{ImageSource, ImageSources};
use vma_format::{
    Archive, BlockMask, Cluster, ClusterSet, ClusterSink, Flow, HeaderBuilder, Writer,
    WriterOptions, CLUSTER_SIZE,
};

fn header(size: u64) -> HeaderBuilder {
    let mut h = HeaderBuilder::new([9; 16], 1);
    h.add_device("d", size).unwrap();
    h
}

/// Raw cluster content: block `b` is zero where bit `b` of `pattern` is
/// clear, else filled with a byte derived from the cluster and block.
fn raw_cluster(n: u32, pattern: u16) -> Vec<u8> {
    let mut raw = vec![0u8; CLUSTER_SIZE];
    for b in 0..16 {
        if pattern & (1 << b) != 0 {
            raw[b * 4096..(b + 1) * 4096].fill((n as u8).wrapping_mul(31) ^ b as u8 | 1);
        }
    }
    raw
}

proptest! {
    #[test]
    fn commit_raw_writes_what_write_raw_writes(
        size in 1u64..(130 * CLUSTER_SIZE as u64),
        patterns in proptest::collection::vec(any::<u16>(), 1..8),
        chunks in proptest::collection::vec(1usize..20, 1..10),
        checksums in any::<bool>(),
    ) {
        let clusters = size.div_ceil(CLUSTER_SIZE as u64) as u32;
        let opts = WriterOptions { data_checksums: checksums };
        let mut plain = Writer::new(Vec::new(), &header(size), opts).unwrap();
        for n in 0..clusters {
            plain.write_raw(1, n, &raw_cluster(n, patterns[n as usize % patterns.len()])).unwrap();
        }
        let mut fast = Writer::new(Vec::new(), &header(size), opts).unwrap();
        let (mut n, mut i) = (0u32, 0usize);
        while n < clusters {
            let want = chunks[i % chunks.len()].min((clusters - n) as usize);
            i += 1;
            let buf = fast.raw_buffer(want).unwrap();
            let k = buf.len() / CLUSTER_SIZE;
            prop_assert!(k >= 1 && k <= want);
            for j in 0..k {
                let c = n + j as u32;
                buf[j * CLUSTER_SIZE..(j + 1) * CLUSTER_SIZE]
                    .copy_from_slice(&raw_cluster(c, patterns[c as usize % patterns.len()]));
            }
            fast.commit_raw(1, n, k).unwrap();
            n += k as u32;
        }
        prop_assert_eq!(fast.device_stats(), plain.device_stats());
        prop_assert!(fast.finish().unwrap() == plain.finish().unwrap());
    }

    #[test]
    fn zero_runs_write_what_empty_clusters_write(
        runs in proptest::collection::vec((0u64..200, any::<bool>()), 1..12),
    ) {
        // Alternate runs of zero clusters and single data clusters.
        let total: u64 = runs.iter().map(|(len, data)| len + *data as u64).sum::<u64>().max(1);
        let size = total * CLUSTER_SIZE as u64;
        let opts = WriterOptions::default();
        let mut plain = Writer::new(Vec::new(), &header(size), opts).unwrap();
        let mut fast = Writer::new(Vec::new(), &header(size), opts).unwrap();
        let mut n = 0u32;
        let data = raw_cluster(0, 0x00f0);
        for (len, with_data) in &runs {
            for c in n..n + *len as u32 {
                plain.write_cluster(&Cluster { dev_id: 1, cluster_num: c, mask: BlockMask::EMPTY, data: &[] }).unwrap();
            }
            prop_assert_eq!(fast.write_zero_clusters(1, n, *len).unwrap(), len * CLUSTER_SIZE as u64);
            n += *len as u32;
            if *with_data {
                plain.write_raw(1, n, &data).unwrap();
                fast.write_raw(1, n, &data).unwrap();
                n += 1;
            }
        }
        if (n as u64) < total {
            plain.write_cluster(&Cluster { dev_id: 1, cluster_num: n, mask: BlockMask::EMPTY, data: &[] }).unwrap();
            fast.write_zero_clusters(1, n, 1).unwrap();
        }
        prop_assert!(fast.finish().unwrap() == plain.finish().unwrap());
    }

    #[test]
    fn cluster_set_ranges_match_single_inserts(
        clusters in 1u64..600_000,
        ops in proptest::collection::vec((any::<u64>(), 0u64..70_000), 1..20),
    ) {
        let mut ranged = ClusterSet::new(clusters);
        let mut single = ClusterSet::new(clusters);
        for (start, len) in ops {
            let start = start % clusters;
            let end = (start + len).min(clusters);
            let first = (start..end).find(|&n| single.contains(n));
            prop_assert_eq!(ranged.first_in(start..end), first);
            let mut added = 0;
            for n in start..end {
                added += single.insert(n) as u64;
            }
            prop_assert_eq!(ranged.insert_range(start..end), added);
            prop_assert_eq!(ranged.count(), single.count());
        }
        prop_assert_eq!(ranged.missing_ranges(), single.missing_ranges());
    }
}

#[test]
fn commit_raw_refuses_bad_ranges() {
    let mut w = Writer::new(
        Vec::new(),
        &header(3 * CLUSTER_SIZE as u64),
        WriterOptions::default(),
    )
    .unwrap();
    w.raw_buffer(4).unwrap();
    // Past the end: nothing written.
    assert!(w.commit_raw(1, 1, 3).is_err());
    w.raw_buffer(2).unwrap();
    w.commit_raw(1, 0, 2).unwrap();
    w.raw_buffer(2).unwrap();
    let e = w.commit_raw(1, 1, 1).unwrap_err();
    assert_eq!(e.to_string(), "cluster 1 of d written twice");
    let e = w.write_zero_clusters(1, 1, 2).unwrap_err();
    assert_eq!(e.to_string(), "cluster 1 of d written twice");
    let e = w.write_zero_clusters(1, 2, 2).unwrap_err();
    assert_eq!(e.to_string(), "cluster 3 is past the end of d (3 clusters)");
    w.write_zero_clusters(1, 2, 1).unwrap();
    w.finish().unwrap();
}

struct Image(Vec<u8>);

impl ClusterSink for Image {
    fn cluster(&mut self, c: &Cluster<'_>) -> std::io::Result<Flow> {
        let mut full = vec![0u8; CLUSTER_SIZE];
        c.expand_into(&mut full);
        let start = c.offset() as usize;
        let end = (start + CLUSTER_SIZE).min(self.0.len());
        self.0[start..end].copy_from_slice(&full[..end - start]);
        Ok(Flow::Continue)
    }
}

/// Encodes `path` as the only device and decodes it again.
fn round_trip(path: &std::path::Path) -> (u64, Vec<u8>) {
    let src = ImageSource::open("d".into(), path, false).unwrap();
    let mut h = HeaderBuilder::new([1; 16], 0);
    h.add_device(&src.name, src.size).unwrap();
    let mut w = Writer::new(Vec::new(), &h, WriterOptions::default()).unwrap();
    let size = src.size;
    let images = [src];
    let mut source = ImageSources::new(&images);
    while w.pull(&mut source).unwrap().is_some() {}
    let archive = w.finish().unwrap();
    let mut image = Image(vec![0xee; size as usize]);
    Archive::new(&archive[..]).unwrap().run(&mut image).unwrap();
    (size, image.0)
}

#[test]
fn sparse_images_read_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    // Data at the start, in the middle of a cluster, straddling clusters, at
    // the very end; holes between; a size that is not a multiple of 512.
    let size = 40 * CLUSTER_SIZE as u64 + 777;
    let path = dir.path().join("s.raw");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(size).unwrap();
    let mut want = vec![0u8; size as usize];
    for (at, len) in [
        (0u64, 5000usize),
        (3 * CLUSTER_SIZE as u64 + 12345, 100),
        (9 * CLUSTER_SIZE as u64 - 10, 20),
        (20 * CLUSTER_SIZE as u64, 3 * CLUSTER_SIZE),
        (size - 300, 300),
    ] {
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 + 1).collect();
        f.write_all_at(&data, at).unwrap();
        want[at as usize..at as usize + len].copy_from_slice(&data);
    }
    drop(f);
    let (recorded, got) = round_trip(&path);
    assert_eq!(recorded, size.div_ceil(512) * 512);
    assert!(got[..size as usize] == want[..]);
    assert!(got[size as usize..].iter().all(|&b| b == 0));

    // All holes; and an image of one byte.
    let empty = dir.path().join("e.raw");
    std::fs::File::create(&empty)
        .unwrap()
        .set_len(5 * CLUSTER_SIZE as u64)
        .unwrap();
    let (_, got) = round_trip(&empty);
    assert!(got.iter().all(|&b| b == 0));
    let one = dir.path().join("1.raw");
    std::fs::File::create(&one)
        .unwrap()
        .write_all(&[7])
        .unwrap();
    let (recorded, got) = round_trip(&one);
    assert_eq!(recorded, 512);
    assert_eq!(got[0], 7);
    assert!(got[1..].iter().all(|&b| b == 0));
}
