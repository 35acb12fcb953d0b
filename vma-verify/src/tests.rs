//! vma-verify's unit tests.

use super::*;
use vma_format::{HeaderBuilder, Writer, WriterOptions};

fn archive(size: u64, fill: impl Fn(u32) -> Vec<u8>, checksums: bool) -> Vec<u8> {
    let mut h = HeaderBuilder::new([9; 16], 1_700_000_000);
    h.add_config("qemu-server.conf", b"memory: 512\n".to_vec())
        .unwrap();
    h.add_device("drive-scsi0", size).unwrap();
    let clusters = (0..vma_format::clusters_for(size) as u32).map(|n| (1, n, fill(n)));
    test_support::write_archive(&h, checksums, clusters)
}

#[test]
fn counts_stored_and_zero_bytes_clipped_at_the_device_end() {
    // 2 clusters + 4097 bytes: cluster 0 full of data, cluster 1 zero,
    // cluster 2 holds one byte in block 0 and one in block 1.
    let size = 2 * CLUSTER_SIZE as u64 + 4097;
    let bytes = archive(
        size,
        |n| match n {
            0 => vec![0xaa; CLUSTER_SIZE],
            1 => vec![],
            _ => {
                let mut c = vec![0u8; 4097];
                c[0] = 1;
                c[4096] = 2;
                c
            }
        },
        true,
    );
    let report = verify_reader("a.vma", &bytes[..]);
    assert_eq!(report.status, Status::Ok);
    assert_eq!(report.clusters, 3);
    let d = &report.devices.as_ref().unwrap()[0];
    assert_eq!(
        d.counts,
        DeviceCounts {
            clusters: 3,
            stored_bytes: (16 + 2) * 4096,
            zero_bytes: CLUSTER_SIZE as u64,
            covered_bytes: size,
        }
    );
    assert_eq!(
        report.ok_line().unwrap(),
        "a.vma: ok (3 clusters, data checksums: verified)"
    );
    assert_eq!(
        report.device_lines(),
        vec![format!(
            "  dev 1 drive-scsi0: size {size}, 3 of 3 clusters, stored 73728 bytes, zero 65536 bytes (48.5% sparse)"
        )]
    );
}

#[test]
fn a_zero_tail_block_counts_only_its_bytes_inside_the_device() {
    // 4097 bytes, all zero: 4097 zero bytes, nothing stored.
    let bytes = archive(4097, |_| vec![], false);
    let report = verify_reader("z.vma", &bytes[..]);
    let d = &report.devices.as_ref().unwrap()[0];
    assert_eq!(d.counts.zero_bytes, 4097);
    assert_eq!(d.counts.stored_bytes, 0);
    assert_eq!(d.sparse_percent(), 100.0);
    assert_eq!(
        report.ok_line().unwrap(),
        "z.vma: ok (1 clusters, data checksums: absent)"
    );
}

#[test]
fn json_of_a_sound_and_a_broken_archive() {
    let bytes = archive(CLUSTER_SIZE as u64, |_| vec![1; 10], true);
    let report = verify_reader("j.vma", &bytes[..]);
    let v = report.to_json();
    assert_eq!(v["status"], "ok");
    assert_eq!(v["uuid"], "09090909-0909-0909-0909-090909090909");
    assert_eq!(v["ctime"], 1_700_000_000);
    assert_eq!(
        v["configs"],
        json!([{"name": "qemu-server.conf", "size": 12}])
    );
    assert_eq!(v["devices"][0]["clusters"], 1);
    assert_eq!(v["devices"][0]["zero_bytes"], 15 * 4096);
    assert_eq!(v["extents"], 1);
    assert_eq!(v["data_checksums"], "verified");
    assert_eq!(v["error"], Value::Null);
    assert_eq!(v["error_offset"], Value::Null);

    let cut = &bytes[..bytes.len() - 1];
    let report = verify_reader("j.vma", cut);
    assert_eq!(report.status, Status::Damaged);
    assert_eq!(report.exit_code(), 1);
    let v = report.to_json();
    assert_eq!(v["status"], "damaged");
    assert_eq!(v["extents"], 0);
    assert_eq!(v["clusters"], 0);
    assert_eq!(v["data_checksums"], Value::Null);
    let header_size = bytes.len() - 512 - 4096;
    assert_eq!(
        v["error"],
        format!("extent 0 at byte {header_size}: truncated: got 4095 of 4096 data bytes")
    );
    assert_eq!(v["error_offset"], header_size);
    assert_eq!(
        report.error_line().unwrap(),
        format!("j.vma: extent 0 at byte {header_size}: truncated: got 4095 of 4096 data bytes")
    );
}

#[test]
fn vmstate_is_counted_without_a_bound() {
    // vmstate declares 100 bytes but holds two clusters: its size does
    // not bound it, and nothing of it is clipped.
    let mut h = HeaderBuilder::new([2; 16], 0);
    h.add_device("vmstate", 100).unwrap();
    let mut w = Writer::new(Vec::new(), &h, WriterOptions::default()).unwrap();
    w.write_raw(1, 0, &[7; 5000]).unwrap();
    w.write_raw(1, 1, &[]).unwrap();
    let bytes = w.finish().unwrap();
    let report = verify_reader("m.vma", &bytes[..]);
    assert_eq!(
        report.device_lines(),
        vec![
            "  dev 1 vmstate: size 100, 2 clusters, stored 8192 bytes, zero 122880 bytes (93.8% sparse)"
        ]
    );
    let v = report.to_json();
    assert_eq!(v["devices"][0]["vmstate"], true);
    assert_eq!(v["devices"][0]["clusters_total"], Value::Null);
    assert_eq!(v["devices"][0]["clusters"], 2);
}

#[test]
fn device_names_are_escaped_in_the_reports() {
    let mut bytes = archive(4096, |_| vec![1; 10], true);
    let at = bytes.windows(11).position(|w| w == b"drive-scsi0").unwrap();
    bytes[at..at + 11].copy_from_slice(b"d\n dev 9 \x1b]");
    let size = u32::from_be_bytes(bytes[56..60].try_into().unwrap()) as usize;
    vma_format::header::update_checksum(&mut bytes[..size]);
    let report = verify_reader("n.vma", &bytes[..]);
    assert_eq!(report.status, Status::Ok, "{:?}", report.error);
    assert_eq!(
        report.device_lines(),
        vec!["  dev 1 d\\x0a dev 9 \\x1b]: size 4096, 1 of 1 clusters, stored 4096 bytes, zero 0 bytes (0% sparse)"]
    );
    assert_eq!(
        report.to_json()["devices"][0]["name"],
        "d\\x0a dev 9 \\x1b]"
    );
}

#[test]
fn unopenable_input_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.vma");
    let report = verify_path(missing.to_str().unwrap());
    assert_eq!(report.status, Status::Error);
    assert_eq!(report.exit_code(), 3);
    assert_eq!(
        report.error_line().unwrap(),
        format!(
            "{}: cannot open: No such file or directory (os error 2)",
            missing.display()
        )
    );
    assert_eq!(report.to_json()["uuid"], Value::Null);
}
