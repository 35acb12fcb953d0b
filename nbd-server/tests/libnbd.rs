//! libnbd's clients (nbdinfo, nbdcopy from libnbd-bin) against the
//! in-process server.

mod common;

use std::fs;
use std::sync::Arc;

use common::*;
use nbd_server::{bind_unix_socket, FileBackend, Server};

const MIB: u64 = 1024 * 1024;

#[test]
fn nbdinfo_list_shows_every_export_with_description() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.raw");
    let b = dir.path().join("b.raw");
    make_image(&a, MIB, &[]);
    make_image(&b, 3 * MIB, &[]);
    let socket = dir.path().join("s.sock");
    let mut server = Server::new();
    server
        .add_export_with_description(
            "alpha",
            "first disk",
            Arc::new(FileBackend::open(&a, false).unwrap()),
        )
        .unwrap();
    server
        .add_export("beta", Arc::new(FileBackend::open(&b, true).unwrap()))
        .unwrap();
    let handle = server
        .serve(vec![bind_unix_socket(&socket).unwrap().into()])
        .unwrap();
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    let out = run_ok("nbdinfo", &["--list", "--json", &uri]);
    handle.shutdown();

    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["protocol"].as_str(), Some("newstyle-fixed"), "{out}");
    assert_eq!(v["TLS"].as_bool(), Some(false));
    let exports = v["exports"].as_array().unwrap();
    assert_eq!(exports.len(), 2, "{out}");
    let e0 = &exports[0];
    assert_eq!(e0["export-name"].as_str(), Some("alpha"));
    assert_eq!(e0["description"].as_str(), Some("first disk"));
    assert_eq!(e0["export-size"].as_u64(), Some(MIB));
    assert_eq!(e0["is_read_only"].as_bool(), Some(false));
    assert_eq!(e0["can_multi_conn"].as_bool(), Some(true));
    assert_eq!(e0["can_fast_zero"].as_bool(), Some(true));
    assert_eq!(e0["block_size_minimum"].as_u64(), Some(1));
    assert_eq!(e0["block_size_preferred"].as_u64(), Some(4096));
    assert_eq!(e0["block_size_maximum"].as_u64(), Some(32 * MIB));
    assert_eq!(e0["contexts"], serde_json::json!(["base:allocation"]));
    let e1 = &exports[1];
    assert_eq!(e1["export-name"].as_str(), Some("beta"));
    assert_eq!(e1["export-size"].as_u64(), Some(3 * MIB));
    assert_eq!(e1["is_read_only"].as_bool(), Some(true));
    assert_eq!(e1["can_trim"].as_bool(), Some(false));
    assert_eq!(e1["can_zero"].as_bool(), Some(false));
}

#[test]
fn nbdinfo_map_and_size() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("m.raw");
    make_image(
        &img,
        4 * MIB,
        &[
            (MIB, &pattern(64 * 1024, 5)),
            (3 * MIB, &pattern(MIB as usize, 6)),
        ],
    );
    let srv = TestServer::start(vec![("m", file_backend(&img))]);
    let uri = srv.uri("m");
    assert_eq!(run_ok("nbdinfo", &["--size", &uri]), "4194304\n");
    let out = run_ok("nbdinfo", &["--map", &uri]);
    let rows: Vec<(u64, u64, u32, String)> = out
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 4, "{l}");
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
                f[3].to_string(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            (0, MIB, 3, "hole,zero".to_string()),
            (MIB, 65536, 0, "data".to_string()),
            (MIB + 65536, 2 * MIB - 65536, 3, "hole,zero".to_string()),
            (3 * MIB, MIB, 0, "data".to_string()),
        ],
        "{out}"
    );
}

#[test]
fn nbdcopy_both_directions() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    make_image(
        &src,
        24 * MIB,
        &[
            (0, &pattern(5 * MIB as usize + 17, 11)),
            (16 * MIB, &pattern(MIB as usize, 12)),
        ],
    );
    // Into the server: target pre-filled with garbage so holes must be zeroed.
    let dst = dir.path().join("dst.raw");
    make_image(&dst, 24 * MIB, &[(0, &pattern(24 * MIB as usize, 13))]);
    let srv = TestServer::start(vec![("dst", file_backend(&dst))]);
    run_ok("nbdcopy", &[src.to_str().unwrap(), &srv.uri("dst")]);
    drop(srv);
    assert!(
        fs::read(&dst).unwrap() == fs::read(&src).unwrap(),
        "nbdcopy into export"
    );

    // Out of the server (several connections at once: multi-conn).
    let srv = TestServer::start(vec![("src", file_backend(&src))]);
    let out = dir.path().join("out.raw");
    run_ok(
        "nbdcopy",
        &["--connections=4", &srv.uri("src"), out.to_str().unwrap()],
    );
    drop(srv);
    assert!(
        fs::read(&out).unwrap() == fs::read(&src).unwrap(),
        "nbdcopy out of export"
    );
}
