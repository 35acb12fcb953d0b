//! Export selection (several exports, default export, unknown names) and
//! read-only exports, with real clients and raw requests.

mod common;

use std::fs;
use std::sync::Arc;

use common::raw::*;
use common::*;
use nbd_server::{ExportError, FileBackend, Server};

const MIB: u64 = 1024 * 1024;

#[test]
fn several_exports_serve_their_own_files() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.raw");
    let b = dir.path().join("b.raw");
    make_image(&a, MIB, &[(0, &[0xaa; 4096])]);
    make_image(&b, 2 * MIB, &[(0, &[0xbb; 4096])]);
    let srv = TestServer::start(vec![("a", file_backend(&a)), ("b", file_backend(&b))]);
    qemu_io(
        &srv.uri("a"),
        &[
            "read -P 0xaa 0 4k",
            "read -P 0 4k 1020k",
            "write -P 0x01 8k 4k",
        ],
    );
    qemu_io(
        &srv.uri("b"),
        &[
            "read -P 0xbb 0 4k",
            "read -P 0 4k 2044k",
            "write -P 0x02 8k 4k",
        ],
    );
    assert_eq!(run_ok("nbdinfo", &["--size", &srv.uri("a")]), "1048576\n");
    assert_eq!(run_ok("nbdinfo", &["--size", &srv.uri("b")]), "2097152\n");

    // With two exports the empty name selects nothing.
    let out = run("qemu-io", &["-f", "raw", &srv.uri(""), "-c", "read 0 512"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no default export"), "{err}");
    drop(srv);

    let da = fs::read(&a).unwrap();
    let db = fs::read(&b).unwrap();
    assert!(da[..4096].iter().all(|&x| x == 0xaa) && da[8192..12288].iter().all(|&x| x == 1));
    assert!(db[..4096].iter().all(|&x| x == 0xbb) && db[8192..12288].iter().all(|&x| x == 2));
    assert_eq!(da.iter().filter(|&&x| x != 0).count(), 8192);
    assert_eq!(db.iter().filter(|&&x| x != 0).count(), 8192);
}

#[test]
fn single_export_is_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("only.raw");
    make_image(&a, MIB, &[(512, &[0x77; 512])]);
    let srv = TestServer::start(vec![("only", file_backend(&a))]);
    qemu_io(&srv.uri(""), &["read -P 0x77 512 512"]);
    assert_eq!(run_ok("nbdinfo", &["--size", &srv.uri("")]), "1048576\n");
}

#[test]
fn unknown_export_fails_cleanly_and_server_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.raw");
    make_image(&a, MIB, &[]);
    let srv = TestServer::start(vec![("a", file_backend(&a))]);

    let out = run(
        "qemu-io",
        &["-f", "raw", &srv.uri("nope"), "-c", "read 0 512"],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Requested export not available"), "{err}");
    assert!(
        err.contains("server reported: unknown export 'nope'"),
        "{err}"
    );

    let out = run("nbdinfo", &[&srv.uri("nope")]);
    assert_eq!(out.status.code(), Some(1));

    // Raw: GO and INFO get NBD_REP_ERR_UNKNOWN, and the connection stays
    // usable; EXPORT_NAME (which cannot fail politely) closes it.
    let mut raw = Raw::connect(&srv.socket);
    assert_eq!(raw.go("nope"), Err(REP_ERR_UNKNOWN));
    raw.opt(OPT_INFO, &info_payload("nope", &[]));
    let r = raw.opt_reply();
    assert_eq!((r.opt, r.kind), (OPT_INFO, REP_ERR_UNKNOWN));
    assert_eq!(raw.go("a"), Ok((MIB, 0xd6d)));
    raw.disc();

    let mut raw = Raw::connect(&srv.socket);
    raw.opt(OPT_EXPORT_NAME, b"nope");
    assert!(raw.is_closed());

    qemu_io(&srv.uri("a"), &["read -P 0 0 4k"]);
}

#[test]
fn read_only_export_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ro.raw");
    let content = pattern(MIB as usize, 21);
    make_image(&img, MIB, &[(0, &content)]);
    let srv = TestServer::start(vec![("ro", ro_backend(&img))]);
    let uri = srv.uri("ro");

    // Reading works (qemu-io -r), and qemu refuses to open it for writing.
    let out = run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            img.to_str().unwrap(),
            &uri,
        ],
    );
    assert_eq!(out, "Images are identical.\n");
    let out = run("qemu-io", &["-f", "raw", &uri, "-c", "write 0 512"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let out = run("nbdcopy", &[img.to_str().unwrap(), &uri]);
    assert_ne!(out.status.code(), Some(0), "{out:?}");

    // A client that ignores NBD_FLAG_READ_ONLY gets EPERM from the server.
    let (mut raw, size, flags) = Raw::open(&srv.socket, "ro");
    assert_eq!(size, MIB);
    assert_eq!(
        flags, 0x50f,
        "HAS_FLAGS|READ_ONLY|FLUSH|FUA|MULTI_CONN|CACHE"
    );
    raw.request(0, CMD_WRITE, 1, 0, 4096, &[0xee; 4096]);
    assert_eq!(raw.status(1), EPERM);
    raw.request(FLAG_FUA, CMD_WRITE, 2, 0, 4096, &[0xee; 4096]);
    assert_eq!(raw.status(2), EPERM);
    raw.request(0, CMD_TRIM, 3, 0, 4096, &[]);
    assert_eq!(raw.status(3), EPERM);
    raw.request(0, CMD_WRITE_ZEROES, 4, 0, 4096, &[]);
    assert_eq!(raw.status(4), EPERM);
    raw.request(0, CMD_FLUSH, 5, 0, 0, &[]);
    assert_eq!(raw.status(5), 0);
    assert_eq!(raw.read(6, 0, 4096), content[..4096]);
    raw.disc();
    drop(srv);
    assert!(fs::read(&img).unwrap() == content);
}

#[test]
fn export_names_are_validated() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.raw");
    make_image(&a, 4096, &[]);
    let b: Arc<dyn nbd_server::Backend> = Arc::new(FileBackend::open(&a, true).unwrap());
    let mut s = Server::new();
    assert!(matches!(
        s.add_export("", b.clone()),
        Err(ExportError::EmptyName)
    ));
    assert!(matches!(
        s.add_export("x\0y", b.clone()),
        Err(ExportError::ContainsNul)
    ));
    assert!(matches!(
        s.add_export("x".repeat(4097), b.clone()),
        Err(ExportError::TooLong(4097))
    ));
    assert!(s.add_export("x".repeat(4096), b.clone()).is_ok());
    assert!(s.add_export("disk", b.clone()).is_ok());
    assert!(
        matches!(s.add_export("disk", b.clone()), Err(ExportError::Duplicate(n)) if n == "disk")
    );
    assert_eq!(s.export_names().nth(1), Some("disk"));
}
