//! QEMU's own NBD client (qemu-io, qemu-img, qemu-nbd from qemu-utils)
//! against the in-process server.

mod common;

use std::fs;
use std::net::TcpListener;
use std::sync::Arc;

use common::*;
use nbd_server::{FileBackend, Server};

const MIB: usize = 1024 * 1024;

#[test]
fn qemu_io_write_read_zero_discard_flush_aio() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let size = 16 * MIB;
    let noise = pattern(MIB, 7);
    make_image(&img, size as u64, &[(8 * MIB as u64, &noise)]);
    let srv = TestServer::start(vec![("disk", file_backend(&img))]);
    let uri = srv.uri("disk");

    qemu_io(
        &uri,
        &[
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            // write -z without -u: NO_HOLE write-zeroes.
            "write -P 0x55 1M 1M",
            "write -z 1M 1M",
            "read -P 0 1M 1M",
            // -u allows unmapping: punched hole.
            "write -P 0xcd 4M 64k",
            "write -z -u 4M 64k",
            "read -P 0 4M 64k",
            "discard 8M 1M",
            "read -P 0 8M 1M",
            "write -P 0x33 12345 1000",
            "read -P 0x33 12345 1000",
            "aio_write -P 0x11 2M 512k",
            "aio_write -P 0x22 3M 512k",
            "aio_write -P 0x44 5M 1M",
            "aio_flush",
            "read -P 0x11 2M 512k",
            "read -P 0x22 3M 512k",
            "read -P 0x44 5M 1M",
            "write -f -P 0x66 6M 4k",
            "flush",
        ],
    );
    // A wrong pattern is caught (so the checks above can fail).
    let out = run("qemu-io", &["-f", "raw", &uri, "-c", "read -P 0xac 0 4k"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Pattern verification failed"), "{text}");
    assert_ne!(out.status.code(), Some(0));
    drop(srv);

    let mut expected = vec![0u8; size];
    expected[..MIB].fill(0xab);
    expected[12345..13345].fill(0x33);
    expected[2 * MIB..2 * MIB + 512 * 1024].fill(0x11);
    expected[3 * MIB..3 * MIB + 512 * 1024].fill(0x22);
    expected[5 * MIB..6 * MIB].fill(0x44);
    expected[6 * MIB..6 * MIB + 4096].fill(0x66);
    // 1M..2M and 4M.. were zeroed, 8M..9M discarded (FileBackend punches a
    // hole, so the old noise is gone).
    let actual = fs::read(&img).unwrap();
    assert_eq!(actual.len(), size);
    assert!(actual == expected, "image differs from the expected bytes");
}

#[test]
fn qemu_img_info_reports_exact_size() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("odd.raw");
    let size = 10 * MIB as u64 + 4096;
    make_image(&img, size, &[]);
    let srv = TestServer::start(vec![("odd", file_backend(&img))]);
    let out = run_ok("qemu-img", &["info", "--output=json", &srv.uri("odd")]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["virtual-size"].as_u64(), Some(size), "{out}");
    assert_eq!(v["format"].as_str(), Some("raw"));
}

/// (start, length, data, zero) of each `qemu-img map --output=json` entry.
fn qemu_map(uri: &str) -> Vec<(u64, u64, bool, bool)> {
    let out = run_ok("qemu-img", &["map", "--output=json", "-f", "raw", uri]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
                e["zero"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[test]
fn qemu_img_map_reports_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("sparse.raw");
    let m = MIB as u64;
    make_image(
        &img,
        8 * m,
        &[(m, &pattern(65536, 1)), (4 * m, &pattern(2 * MIB, 2))],
    );
    let srv = TestServer::start(vec![("sparse", file_backend(&img))]);
    assert_eq!(
        qemu_map(&srv.uri("sparse")),
        vec![
            (0, m, false, true),
            (m, 65536, true, false),
            (m + 65536, 3 * m - 65536, false, true),
            (4 * m, 2 * m, true, false),
            (6 * m, 2 * m, false, true),
        ]
    );
}

#[test]
fn qemu_img_convert_and_compare_both_directions() {
    let dir = tempfile::tempdir().unwrap();
    let m = MIB as u64;
    let src = dir.path().join("src.raw");
    let data1 = pattern(3 * MIB + 123, 3);
    let data2 = pattern(MIB, 4);
    make_image(&src, 32 * m, &[(0, &data1), (20 * m, &data2)]);

    // Export -> local file.
    let srv = TestServer::start(vec![("src", file_backend(&src))]);
    let out = dir.path().join("out.raw");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &srv.uri("src"),
            out.to_str().unwrap(),
        ],
    );
    assert!(fs::read(&out).unwrap() == fs::read(&src).unwrap());
    let cmp = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            out.to_str().unwrap(),
            &srv.uri("src"),
        ],
    );
    assert_eq!(cmp.status.code(), Some(0), "{cmp:?}");
    // Change one byte: compare must see it (exit 1 = images differ).
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&out).unwrap();
        f.write_all_at(&[!data2[100]], 20 * m + 100).unwrap();
    }
    let cmp = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            out.to_str().unwrap(),
            &srv.uri("src"),
        ],
    );
    assert_eq!(cmp.status.code(), Some(1), "{cmp:?}");
    drop(srv);

    // Local file -> export (a target full of garbage, so zeroing matters).
    let dst = dir.path().join("dst.raw");
    make_image(&dst, 32 * m, &[(0, &pattern(32 * MIB, 9))]);
    let srv = TestServer::start(vec![("dst", file_backend(&dst))]);
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            &srv.uri("dst"),
        ],
    );
    drop(srv);
    assert!(fs::read(&dst).unwrap() == fs::read(&src).unwrap());
}

#[test]
fn qemu_nbd_list_shows_exports() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.raw");
    let b = dir.path().join("b.raw");
    make_image(&a, 1 << 20, &[]);
    make_image(&b, 2 << 20, &[]);
    let srv = TestServer::start(vec![("alpha", file_backend(&a)), ("beta", ro_backend(&b))]);
    let out = run_ok("qemu-nbd", &["--list", "-k", srv.socket.to_str().unwrap()]);
    assert!(out.starts_with("exports available: 2\n"), "{out}");
    let alpha = out.find(" export: 'alpha'").expect("alpha listed");
    let beta = out.find(" export: 'beta'").expect("beta listed");
    assert!(alpha < beta);
    let alpha_part = &out[alpha..beta];
    let beta_part = &out[beta..];
    assert!(alpha_part.contains("  size:  1048576\n"), "{out}");
    assert!(
        alpha_part.contains("  flags: 0xd6d ( flush fua trim zeroes multi cache fast-zero )\n"),
        "{out}"
    );
    assert!(beta_part.contains("  size:  2097152\n"), "{out}");
    assert!(
        beta_part.contains("  flags: 0x50f ( readonly flush fua multi cache )\n"),
        "{out}"
    );
    for part in [alpha_part, beta_part] {
        assert!(
            part.contains("  min block: 1\n  opt block: 4096\n  max block: 33554432\n"),
            "{out}"
        );
        assert!(
            part.contains("  available meta contexts: 1\n   base:allocation\n"),
            "{out}"
        );
    }
}

#[test]
fn qemu_io_over_explicit_tcp_listener() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("tcp.raw");
    make_image(&img, 4 << 20, &[]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut server = Server::new();
    server
        .add_export("tcp", Arc::new(FileBackend::open(&img, false).unwrap()))
        .unwrap();
    let handle = server.serve(vec![listener.into()]).unwrap();
    let uri = format!("nbd://127.0.0.1:{port}/tcp");
    qemu_io(&uri, &["write -P 0x5a 64k 128k", "read -P 0x5a 64k 128k"]);
    handle.shutdown();
    let data = fs::read(&img).unwrap();
    assert!(data[65536..3 * 65536].iter().all(|&b| b == 0x5a));
    assert!(data[..65536]
        .iter()
        .chain(&data[3 * 65536..])
        .all(|&b| b == 0));
}
