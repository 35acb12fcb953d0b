//! The writer's unit tests: batched empty extents equal one-by-one ones.

use super::*;

/// Writes a data cluster, then `count` zero clusters from `first`, then
/// the rest, once with `write_zero_clusters` (batched) and once cluster
/// by cluster; the archives must be identical.
fn both_ways(checksums: bool, first: u32, count: u64) {
    let clusters = first as u64 + count + 3;
    let mut h = HeaderBuilder::new([3; 16], 42);
    h.add_device("drive-scsi0", clusters * CLUSTER_SIZE as u64 - 1000)
        .unwrap();
    let opts = WriterOptions {
        data_checksums: checksums,
    };
    let data = vec![0xa5u8; CLUSTER_SIZE];
    let run = |batched: bool| {
        let mut w = Writer::new(Vec::new(), &h, opts).unwrap();
        for n in 0..first {
            w.write_raw(1, n, &data[..(n as usize * 4096) % CLUSTER_SIZE])
                .unwrap();
        }
        if batched {
            w.write_zero_clusters(1, first, count).unwrap();
        } else {
            for n in first as u64..first as u64 + count {
                let empty = Cluster {
                    dev_id: 1,
                    cluster_num: n as u32,
                    mask: BlockMask::EMPTY,
                    data: &[],
                };
                w.write_cluster(&empty).unwrap();
            }
        }
        for n in first as u64 + count..clusters {
            w.write_raw(1, n as u32, &data).unwrap();
        }
        w.finish().unwrap()
    };
    let (a, b) = (run(true), run(false));
    assert_eq!(a.len(), b.len());
    assert!(
        a == b,
        "batched zero clusters differ (checksums {checksums}, first {first}, count {count})"
    );
}

#[test]
fn batched_empty_extents_match_one_by_one() {
    for checksums in [true, false] {
        both_ways(checksums, 0, 58 * 64);
        both_ways(checksums, 5, 58 * 64 + 57);
        both_ways(checksums, 57, 58 * 2048 * 2 + 3 * 58 + 11);
        both_ways(checksums, 3, 58 * 63);
    }
}
