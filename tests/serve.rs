//! `vma-decode serve` end to end, against real NBD clients: QEMU's
//! (qemu-img convert / compare / map, qemu-io) and libnbd's (nbdcopy,
//! nbdinfo), plus a raw client for exact protocol replies.
//!
//! Proxmox's archives, plain and zstd-compressed (through the cache), serve
//! every device byte-exactly (EXPECTED.txt's sha256) and report their holes;
//! writes get EPERM; an extent whose data fails its checksum makes reads of
//! it fail with EIO while everything else reads right; a saved index is
//! used, and refused when stale, damaged or forged.

mod common;
#[path = "../nbd-server/tests/common/raw.rs"]
mod raw;

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::{Arc, Mutex};

use common::{bin, fixtures, parse_expected, sha256_file};
use vma_format::{
    Archive, Flow, HeaderBuilder, IndexSink, IndexedExtent, Seekable, Writer, WriterOptions,
    CLUSTER_SIZE,
};

/// A running `vma-decode serve`.
struct Served {
    child: Option<Child>,
    socket: PathBuf,
    uris: Vec<String>,
    log: Arc<Mutex<String>>,
    /// Collects stderr into `log` until it ends.
    logger: Option<std::thread::JoinHandle<()>>,
}

/// Devices in the archive at `path` (plain).
fn device_names(path: &Path) -> Vec<String> {
    let archive = Archive::new(fs::File::open(path).unwrap()).unwrap();
    archive
        .header()
        .devices()
        .iter()
        .map(|d| d.display_name())
        .collect()
}

/// Starts `vma-decode serve --socket DIR/nbd.sock ARGS…` and waits until
/// it has printed one URI per device (`devices`), i.e. listens. Panics with
/// its log if it exits first.
fn serve(dir: &Path, args: &[&str], devices: usize) -> Served {
    serve_with_stdin(dir, args, devices, None)
}

fn serve_with_stdin(dir: &Path, args: &[&str], devices: usize, stdin: Option<PathBuf>) -> Served {
    let socket = dir.join("nbd.sock");
    let mut cmd = Command::new(bin("vma-decode"));
    cmd.arg("serve")
        .arg("--socket")
        .arg(&socket)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(path) = stdin {
        cmd.stdin(fs::File::open(path).unwrap());
    }
    let mut child = cmd.spawn().unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let mut stderr = child.stderr.take().unwrap();
    let log2 = Arc::clone(&log);
    let logger = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            log2.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let uris = read_uris(&mut out, devices);
    if uris.len() < devices {
        let status = child.wait().unwrap();
        logger.join().unwrap();
        panic!(
            "serve exited ({status}) before listening:\n{}",
            log.lock().unwrap()
        );
    }
    Served {
        child: Some(child),
        socket,
        uris,
        log,
        logger: Some(logger),
    }
}

fn read_uris(out: &mut BufReader<ChildStdout>, n: usize) -> Vec<String> {
    let mut uris = Vec::new();
    while uris.len() < n {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            break;
        }
        uris.push(line.trim_end().to_string());
    }
    uris
}

impl Served {
    fn uri(&self, device: &str) -> String {
        format!("nbd+unix:///{device}?socket={}", self.socket.display())
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// SIGTERM: it must exit 0 and remove its socket.
    fn stop(mut self) -> String {
        let mut child = self.child.take().unwrap();
        sigterm(&child);
        let status = child.wait().unwrap();
        self.logger.take().unwrap().join().unwrap();
        let log = self.log();
        assert!(status.success(), "serve exited with {status}:\n{log}");
        assert!(!self.socket.exists(), "socket left behind");
        assert!(
            log.contains("vma-decode serve: SIGTERM: shutting down"),
            "{log}"
        );
        log
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sends SIGTERM to `child`.
#[allow(unsafe_code)]
fn sigterm(child: &Child) {
    // SAFETY: kill(2) with a pid we own and a valid signal number.
    let sent = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(sent, 0, "kill: {}", std::io::Error::last_os_error());
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

#[track_caller]
fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qemu_img_to_raw(uri: &str, out: &Path) {
    let _ = fs::remove_file(out);
    ok(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", uri])
        .arg(out));
}

fn nbdcopy(uri: &str, out: &Path) {
    let _ = fs::remove_file(out);
    ok(Command::new("nbdcopy").arg(uri).arg(out));
}

fn vma_decode(args: &[&str]) -> Output {
    run(Command::new(bin("vma-decode")).args(args))
}

fn zstd(path: &Path) -> PathBuf {
    let out = PathBuf::from(format!("{}.zst", path.display()));
    let _ = fs::remove_file(&out);
    ok(Command::new("zstd")
        .args(["-q", "-T1"])
        .arg(path)
        .arg("-o")
        .arg(&out));
    out
}

/// Proxmox's fixtures, plain and compressed: every device reads back
/// through qemu-img, nbdcopy and qemu-io exactly as Proxmox's `vma extract`
/// wrote it (EXPECTED.txt), and `qemu-img compare` finds it identical to our
/// own extract.
#[test]
fn proxmox_fixtures_serve_byte_exactly() {
    let expected = parse_expected();
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    fs::create_dir(&cache).unwrap();
    for archive in ["one-disk.vma", "multi-disk.vma", "full.vma"] {
        let plain = fixtures().join("pve").join(archive);
        let copy = work.path().join(archive);
        fs::copy(&plain, &copy).unwrap();
        let compressed = zstd(&copy);
        let extracted = work.path().join(format!("{archive}.out"));
        let e = vma_decode(&[
            "extract",
            plain.to_str().unwrap(),
            extracted.to_str().unwrap(),
        ]);
        assert!(e.status.success());
        let devices = device_names(&plain);
        let want = &expected[archive].files;
        for (how, args) in [
            ("plain", vec![plain.to_str().unwrap().to_string()]),
            (
                "zstd",
                vec![
                    "--cache".into(),
                    cache.to_str().unwrap().into(),
                    compressed.to_str().unwrap().into(),
                ],
            ),
        ] {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let s = serve(work.path(), &args, devices.len());
            assert_eq!(
                s.uris,
                devices.iter().map(|d| s.uri(d)).collect::<Vec<_>>(),
                "URIs printed"
            );
            for dev in &devices {
                let file = format!("disk-{dev}.raw");
                let (sha, size) = &want[&file];
                let uri = s.uri(dev);
                let out = work.path().join("out.raw");
                qemu_img_to_raw(&uri, &out);
                assert_eq!(
                    &sha256_file(&out),
                    sha,
                    "{archive} ({how}) {dev} via qemu-img"
                );
                assert_eq!(fs::metadata(&out).unwrap().len(), *size);
                nbdcopy(&uri, &out);
                assert_eq!(
                    &sha256_file(&out),
                    sha,
                    "{archive} ({how}) {dev} via nbdcopy"
                );
                let cmp = ok(Command::new("qemu-img")
                    .args(["compare", "-f", "raw", "-F", "raw", &uri])
                    .arg(extracted.join(&file)));
                assert_eq!(cmp.trim(), "Images are identical.");
                // qemu-io: every all-zero 64 KiB cluster reads as zeros, one
                // request per cluster.
                let bytes = fs::read(extracted.join(&file)).unwrap();
                let mut cmds = Vec::new();
                for (i, c) in bytes.chunks(CLUSTER_SIZE).enumerate() {
                    if c.iter().all(|&b| b == 0) {
                        cmds.push(format!("read -q -P 0 {} {}", i * CLUSTER_SIZE, c.len()));
                    } else {
                        cmds.push(format!("read -q {} {}", i * CLUSTER_SIZE, c.len()));
                    }
                }
                let mut qio = Command::new("qemu-io");
                qio.args(["-r", "-f", "raw"]);
                for c in &cmds {
                    qio.args(["-c", c]);
                }
                let out = ok(qio.arg(&uri));
                assert!(!out.contains("fail"), "{archive} ({how}) {dev}: {out}");
            }
            let log = s.stop();
            if how == "zstd" {
                assert!(
                    log.contains("compressed (zstd): decompressing it into an unnamed file in"),
                    "{log}"
                );
            }
        }
    }
    // The cache had no name: nothing is left in its directory.
    assert_eq!(fs::read_dir(&cache).unwrap().count(), 0);
}

/// The non-zero 4 KiB blocks of `bytes`, as merged (start, length) runs.
fn data_runs(bytes: &[u8]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (i, b) in bytes.chunks(4096).enumerate() {
        if b.iter().any(|&x| x != 0) {
            let start = i as u64 * 4096;
            match runs.last_mut() {
                Some((s, l)) if *s + *l == start => *l += b.len() as u64,
                _ => runs.push((start, b.len() as u64)),
            }
        }
    }
    runs
}

/// Block status: exactly the stored blocks are data, the rest holes that
/// read as zeros, as qemu-img map and nbdinfo --map show them.
#[test]
fn qemu_img_map_shows_the_holes_of_a_sparse_fixture() {
    let work = tempfile::tempdir().unwrap();
    let archive = fixtures().join("pve/multi-disk.vma");
    let extracted = work.path().join("out");
    assert!(vma_decode(&[
        "extract",
        archive.to_str().unwrap(),
        extracted.to_str().unwrap()
    ])
    .status
    .success());
    let s = serve(work.path(), &[archive.to_str().unwrap()], 4);
    for dev in ["drive-virtio1", "drive-scsi0", "drive-sata2"] {
        let bytes = fs::read(extracted.join(format!("disk-{dev}.raw"))).unwrap();
        let want = data_runs(&bytes);
        if dev == "drive-virtio1" {
            // sparse.raw: a few data blocks in 8 MiB of holes.
            assert_eq!(
                want,
                vec![
                    (3018752, 12288),
                    (5492736, 4096),
                    (6443008, 4096),
                    (8384512, 4096)
                ]
            );
        }
        let map =
            ok(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &s.uri(dev)]));
        let mut got = Vec::new();
        let mut covered = 0u64;
        for line in map.lines() {
            let field = |name: &str| {
                let at = line.find(&format!("\"{name}\": ")).unwrap() + name.len() + 4;
                line[at..]
                    .split([',', '}'])
                    .next()
                    .unwrap()
                    .trim()
                    .to_string()
            };
            let (start, len) = (
                field("start").parse::<u64>().unwrap(),
                field("length").parse::<u64>().unwrap(),
            );
            assert_eq!(start, covered);
            covered += len;
            match (field("data").as_str(), field("zero").as_str()) {
                ("true", "false") => got.push((start, len)),
                ("false", "true") => {}
                other => panic!("{dev}: unexpected map entry {other:?}: {line}"),
            }
        }
        assert_eq!(covered, bytes.len() as u64);
        assert_eq!(got, want, "{dev}: qemu-img map");
        let map = ok(Command::new("nbdinfo").args(["--map", &s.uri(dev)]));
        let mut got = Vec::new();
        for line in map.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f[2] == "0" {
                got.push((f[0].parse().unwrap(), f[1].parse().unwrap()));
            } else {
                assert_eq!((f[2], f[3]), ("3", "hole,zero"), "{line}");
            }
        }
        assert_eq!(got, want, "{dev}: nbdinfo --map");
    }
    s.stop();
}

/// What nbdinfo sees: one read-only export per device, named after it,
/// with CAN_MULTI_CONN and base:allocation, neither trim nor zero.
#[test]
fn exports_are_read_only_multi_conn_and_named_after_the_devices() {
    let work = tempfile::tempdir().unwrap();
    let archive = fixtures().join("pve/multi-disk.vma");
    let s = serve(work.path(), &[archive.to_str().unwrap()], 4);
    let list = ok(Command::new("nbdinfo").args([
        "--list",
        "--json",
        &format!("nbd+unix://?socket={}", s.socket.display()),
    ]));
    let names: Vec<&str> = list
        .lines()
        .filter_map(|l| l.trim().strip_prefix("\"export-name\": \""))
        .map(|l| l.trim_end_matches("\","))
        .collect();
    assert_eq!(
        names,
        ["drive-scsi0", "drive-virtio1", "drive-sata2", "drive-ide0"]
    );
    let info = ok(Command::new("nbdinfo").args(["--json", &s.uri("drive-virtio1")]));
    for want in [
        "\"is_read_only\": true",
        "\"can_multi_conn\": true",
        "\"can_trim\": false",
        "\"can_zero\": false",
        "\"export-size\": 8388608",
        "\"base:allocation\"",
    ] {
        assert!(info.contains(want), "{want} not in {info}");
    }
    s.stop();
}

/// Writes, trims and write-zeroes are answered EPERM, and change nothing.
#[test]
fn writes_are_refused_with_eperm() {
    let work = tempfile::tempdir().unwrap();
    let archive = fixtures().join("pve/one-disk.vma");
    let s = serve(work.path(), &[archive.to_str().unwrap()], 1);
    let (mut c, size, flags) = raw::Raw::open(&s.socket, "drive-scsi0");
    assert_eq!(size, 1061376);
    const READ_ONLY: u16 = 1 << 1;
    const CAN_MULTI_CONN: u16 = 1 << 8;
    assert_eq!(
        flags & (READ_ONLY | CAN_MULTI_CONN),
        READ_ONLY | CAN_MULTI_CONN
    );
    let before = c.read(1, 0, 65536);
    c.request(0, raw::CMD_WRITE, 2, 0, 4096, &[0x55; 4096]);
    assert_eq!(c.status(2), raw::EPERM);
    c.request(raw::FLAG_FUA, raw::CMD_WRITE, 3, 8192, 512, &[0x55; 512]);
    assert_eq!(c.status(3), raw::EPERM);
    c.request(0, raw::CMD_TRIM, 4, 0, 65536, &[]);
    assert_eq!(c.status(4), raw::EPERM);
    c.request(0, raw::CMD_WRITE_ZEROES, 5, 0, 65536, &[]);
    assert_eq!(c.status(5), raw::EPERM);
    c.request(0, raw::CMD_FLUSH, 6, 0, 0, &[]);
    assert_eq!(c.status(6), 0);
    assert!(c.read(7, 0, 65536) == before);
    c.disc();
    // QEMU will not even open it for writing.
    let out = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write 0 512",
        &s.uri("drive-scsi0"),
    ]));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.stop();
}

/// Several clients at once, on the same and on different exports, over
/// Unix and TCP, all read the right bytes.
#[test]
fn many_clients_at_once() {
    let expected = parse_expected();
    let want = &expected["multi-disk.vma"].files;
    let work = tempfile::tempdir().unwrap();
    let archive = fixtures().join("pve/multi-disk.vma");
    let s = serve(
        work.path(),
        &["--tcp", "127.0.0.1:0", archive.to_str().unwrap()],
        8,
    );
    // Unix URIs first, then TCP ones with the port the system chose.
    assert!(s.uris[4].starts_with("nbd://127.0.0.1:"), "{:?}", s.uris);
    assert!(s.uris[4].ends_with("/drive-scsi0"), "{:?}", s.uris);
    let devices = ["drive-scsi0", "drive-virtio1", "drive-sata2", "drive-ide0"];
    let mut jobs = Vec::new();
    for round in 0..3 {
        for (i, uri) in s.uris.iter().enumerate() {
            let dev = devices[i % 4];
            let out = work.path().join(format!("{round}-{i}.raw"));
            let child = if (round + i) % 2 == 0 {
                Command::new("nbdcopy").arg(uri).arg(&out).spawn().unwrap()
            } else {
                Command::new("qemu-img")
                    .args(["convert", "-f", "raw", "-O", "raw", uri])
                    .arg(&out)
                    .spawn()
                    .unwrap()
            };
            jobs.push((child, out, dev));
        }
    }
    for (mut child, out, dev) in jobs {
        assert!(child.wait().unwrap().success());
        assert_eq!(
            sha256_file(&out),
            want[&format!("disk-{dev}.raw")].0,
            "{dev}"
        );
    }
    // nbdcopy with several connections to one export (it uses them only
    // because the server says CAN_MULTI_CONN).
    let out = work.path().join("multi.raw");
    ok(Command::new("nbdcopy")
        .args(["--connections=4", &s.uri("drive-virtio1")])
        .arg(&out));
    assert_eq!(sha256_file(&out), want["disk-drive-virtio1.raw"].0);
    s.stop();
}

/// 200 clusters of drive-scsi0, cluster n filled with byte n % 250 + 1
/// (so vma-encode stores every block): extents of 58, 58, 58 and 26.
fn pattern_archive(dir: &Path, extra: &[&str]) -> PathBuf {
    let image = dir.join("pattern.raw");
    let mut bytes = Vec::with_capacity(200 * CLUSTER_SIZE);
    for n in 0..200 {
        bytes.extend(std::iter::repeat_n((n % 250 + 1) as u8, CLUSTER_SIZE));
    }
    fs::write(&image, &bytes).unwrap();
    let archive = dir.join("pattern.vma");
    let _ = fs::remove_file(&archive);
    let out = run(Command::new(bin("vma-encode"))
        .args(extra)
        .arg("-o")
        .arg(&archive)
        .arg(format!("drive-scsi0={}", image.display())));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    archive
}

/// (header offset, data length) of each extent, as the library's index
/// walk finds them.
fn extents_of(path: &Path) -> Vec<(u64, u64)> {
    struct Collect(Vec<(u64, u64)>);
    impl IndexSink for Collect {
        fn extent(&mut self, e: &IndexedExtent<'_>) -> std::io::Result<Flow> {
            self.0.push((e.offset, e.data_len));
            Ok(Flow::Continue)
        }
    }
    let mut c = Collect(Vec::new());
    let input = Seekable::new(fs::File::open(path).unwrap()).unwrap();
    Archive::new(input).unwrap().index(&mut c).unwrap();
    c.0
}

/// `qemu-io -r -c 'read -P BYTE OFFSET LEN'` on `uri`: its output.
fn qemu_io_read(uri: &str, pattern: u8, offset: u64, len: u64) -> String {
    let out = run(Command::new("qemu-io").args([
        "-r",
        "-f",
        "raw",
        "-c",
        &format!("read -P {pattern} {offset} {len}"),
        uri,
    ]));
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A flipped bit in the data of one extent of an archive with data
/// checksums: reads touching that extent's clusters fail with EIO (every
/// time, never bad data), reads elsewhere succeed, and the log names the
/// device and clusters — from the archive and from a compressed copy.
#[test]
fn a_corrupted_extent_fails_with_eio_and_the_rest_reads() {
    let work = tempfile::tempdir().unwrap();
    let archive = pattern_archive(work.path(), &[]);
    let ext = extents_of(&archive);
    assert_eq!(ext.len(), 4);
    let (bad_at, _) = ext[1];
    let mut bytes = fs::read(&archive).unwrap();
    // Cluster 63 is the 6th of extent 1 (clusters 58..116, 16 blocks each).
    bytes[bad_at as usize + 512 + 5 * CLUSTER_SIZE + 1234] ^= 0x10;
    fs::write(&archive, &bytes).unwrap();
    let compressed = zstd(&archive);
    let cache = work.path().join("cache");
    fs::create_dir(&cache).unwrap();
    for args in [
        vec![archive.to_str().unwrap()],
        vec![
            "--cache",
            cache.to_str().unwrap(),
            compressed.to_str().unwrap(),
        ],
    ] {
        let s = serve(work.path(), &args, 1);
        let uri = s.uri("drive-scsi0");
        let c = CLUSTER_SIZE as u64;
        for (n, good) in [
            (0u64, true),
            (63, false),
            (57, true),
            (58, false),
            (115, false),
            (116, true),
            (199, true),
            (63, false),
        ] {
            let out = qemu_io_read(&uri, (n % 250 + 1) as u8, n * c + 4096, 8192);
            if good {
                assert!(out.contains("read 8192/8192 bytes"), "cluster {n}: {out}");
            } else {
                assert!(
                    out.contains("read failed: Input/output error"),
                    "cluster {n}: {out}"
                );
            }
        }
        // A read across extents 0 and 1 fails as a whole.
        let out = qemu_io_read(&uri, 58, 57 * c, 2 * c);
        assert!(out.contains("Input/output error"), "{out}");
        // The exact NBD error, with its message.
        let (mut raw, _, _) = raw::Raw::open(&s.socket, "drive-scsi0");
        raw.request(0, raw::CMD_READ, 9, 63 * c, 4096, &[]);
        let chunk = raw.chunk();
        assert_eq!((chunk.kind, chunk.handle), (raw::TYPE_ERROR, 9));
        assert_eq!(
            chunk.error(),
            (
                raw::EIO,
                format!(
                    "read failed: drive-scsi0 cluster 63 (extent 1 at byte {bad_at}): data checksum mismatch"
                )
            )
        );
        // The connection goes on: a good cluster reads.
        assert!(raw.read(10, 0, 4096) == vec![1u8; 4096]);
        raw.disc();
        // The whole disk cannot be converted: no bad data comes out.
        let out = run(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &uri])
            .arg(work.path().join("x.raw")));
        assert!(!out.status.success());
        let log = s.stop();
        let name = if args.len() == 1 {
            archive.display().to_string()
        } else {
            compressed.display().to_string()
        };
        assert!(
            log.contains(&format!(
                "vma-decode serve: {name}: extent 1 at byte {bad_at}: data checksum mismatch: reads of clusters drive-scsi0 58..116 fail with EIO\n"
            )),
            "{log}"
        );
        assert!(
            log.contains(&format!(
                "vma-decode serve: {name}: drive-scsi0 cluster 63 (extent 1 at byte {bad_at}): data checksum mismatch: answered EIO\n"
            )),
            "{log}"
        );
        assert_eq!(
            log.matches("data checksum mismatch: reads of clusters")
                .count(),
            1,
            "{log}"
        );
    }
}

/// The same flipped bit in an archive without data checksums (as all of
/// Proxmox's are) cannot be noticed: the bytes are served as stored.
#[test]
fn without_data_checksums_the_stored_bytes_are_served() {
    let work = tempfile::tempdir().unwrap();
    let archive = pattern_archive(work.path(), &["--no-data-checksums"]);
    let (bad_at, _) = extents_of(&archive)[1];
    let mut bytes = fs::read(&archive).unwrap();
    let pos = bad_at as usize + 512 + 5 * CLUSTER_SIZE + 1234;
    bytes[pos] ^= 0x10;
    fs::write(&archive, &bytes).unwrap();
    let s = serve(work.path(), &[archive.to_str().unwrap()], 1);
    let out = qemu_io_read(
        &s.uri("drive-scsi0"),
        64,
        63 * CLUSTER_SIZE as u64 + 4096,
        4096,
    );
    assert!(out.contains("read 4096/4096 bytes"), "{out}");
    let out = qemu_io_read(&s.uri("drive-scsi0"), 64, 63 * CLUSTER_SIZE as u64, 4096);
    assert!(
        out.contains("Pattern verification failed at offset 4128768, 4096 bytes"),
        "{out}"
    );
    s.stop();
}

/// Recomputes the CRC-32 at the end of a saved index.
fn reseal(index: &mut [u8]) {
    let n = index.len() - 4;
    let crc = crc32(&index[..n]);
    index[n..].copy_from_slice(&crc.to_be_bytes());
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// `--save-index` writes ARCHIVE.vmaidx; later runs use it; an index that
/// is stale (archive modified, another archive), damaged or forged is
/// refused or caught, and the archive still serves right.
#[test]
fn a_saved_index_is_used_and_a_stale_one_refused() {
    let work = tempfile::tempdir().unwrap();
    let archive = pattern_archive(work.path(), &[]);
    let a = archive.to_str().unwrap();
    let idx = PathBuf::from(format!("{a}.vmaidx"));
    let image = work.path().join("pattern.raw");
    let want = sha256_file(&image);
    let out = work.path().join("out.raw");
    let check = |s: &Served| {
        qemu_img_to_raw(&s.uri("drive-scsi0"), &out);
        assert_eq!(sha256_file(&out), want);
    };

    let s = serve(work.path(), &["--save-index", a], 1);
    check(&s);
    let log = s.stop();
    assert!(
        log.contains(&format!(
            "{a}: indexed: 4 extents, 200 clusters of 1 devices"
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!("{a}: index saved as {}\n", idx.display())),
        "{log}"
    );
    // 64 bytes, one device (24), four extents (16 each), 200 clusters (8
    // each), a CRC-32.
    let saved = fs::read(&idx).unwrap();
    assert_eq!(saved.len(), 64 + 24 + 4 * 16 + 200 * 8 + 4);
    assert_eq!(&saved[..8], b"VMAINDEX");

    let s = serve(work.path(), &[a], 1);
    check(&s);
    let log = s.stop();
    assert!(
        log.contains(&format!(
            "{a}: index read from {}: 4 extents",
            idx.display()
        )),
        "{log}"
    );
    assert!(!log.contains("refused"), "{log}");

    let refused = |why: &str, extra: &[&str]| {
        let mut args = extra.to_vec();
        args.push(a);
        let s = serve(work.path(), &args, 1);
        check(&s);
        let log = s.stop();
        assert!(
            log.contains(&format!(
                "vma-decode serve: {}: refused: {why}; indexing the archive instead\n",
                idx.display()
            )),
            "{why}: {log}"
        );
        assert!(log.contains(&format!("{a}: indexed: 4 extents")), "{log}");
    };

    // Damaged.
    let mut bad = saved.clone();
    bad[100] ^= 1;
    fs::write(&idx, &bad).unwrap();
    refused("its checksum does not match (damaged)", &[]);
    // Cut short, not an index at all.
    fs::write(&idx, &saved[..saved.len() / 2]).unwrap();
    refused("its checksum does not match (damaged)", &[]);
    fs::write(&idx, b"hello").unwrap();
    refused("not an index file", &[]);
    // Another archive's (same size, another uuid).
    let mut other = saved.clone();
    other[16] ^= 0xff;
    reseal(&mut other);
    fs::write(&idx, &other).unwrap();
    refused(
        "stale: it was saved for another archive (uuid differs)",
        &[],
    );
    // The archive modified after the index was saved (mtime differs).
    fs::write(&idx, &saved).unwrap();
    ok(Command::new("touch").args(["-d", "2001-02-03 04:05:06", a]));
    refused(
        "stale: the archive was modified after it was saved",
        &["--save-index"],
    );
    // ...and --save-index wrote a fresh one, used from now on.
    let s = serve(work.path(), &[a], 1);
    check(&s);
    assert!(s.stop().contains("index read from"));

    // Forged: the CRC is right, the structure fits, but cluster 0 and
    // cluster 58 swap extents. Caught when the extents are first used:
    // their headers are not what the index says.
    let fresh = fs::read(&idx).unwrap();
    let entries = 64 + 24 + 4 * 16;
    let mut forged = fresh.clone();
    let e0 = entries;
    let e58 = entries + 58 * 8;
    assert_eq!(&forged[e0..e0 + 4], &0u32.to_be_bytes());
    assert_eq!(&forged[e58..e58 + 4], &1u32.to_be_bytes());
    forged[e0..e0 + 4].copy_from_slice(&1u32.to_be_bytes());
    forged[e58..e58 + 4].copy_from_slice(&0u32.to_be_bytes());
    reseal(&mut forged);
    fs::write(&idx, &forged).unwrap();
    let s = serve(work.path(), &[a], 1);
    let uri = s.uri("drive-scsi0");
    let c = CLUSTER_SIZE as u64;
    assert!(qemu_io_read(&uri, 1, 0, 4096).contains("Input/output error"));
    assert!(qemu_io_read(&uri, 101, 100 * c, 4096).contains("Input/output error"));
    assert!(qemu_io_read(&uri, 151, 150 * c, 4096).contains("read 4096/4096"));
    let log = s.stop();
    assert!(log.contains("index read from"), "{log}");
    assert!(
        log.contains("drive-scsi0 cluster 0 (extent 1 at byte 3814400): the extent's header is not what the index says: answered EIO"),
        "{log}"
    );
}

/// A compressed archive or a pipe needs --cache; --save-index needs a
/// plain file; a cache directory with too little room is refused before
/// anything is written; an archive without devices has nothing to serve;
/// a damaged archive is refused with the reader's message.
#[test]
fn refusals() {
    let work = tempfile::tempdir().unwrap();
    let sock = work.path().join("s.sock");
    let sock = sock.to_str().unwrap();
    let copy = work.path().join("one-disk.vma");
    fs::copy(fixtures().join("pve/one-disk.vma"), &copy).unwrap();
    let z = zstd(&copy);
    let z = z.to_str().unwrap();
    let cache = work.path().to_str().unwrap();
    let expect = |args: &[&str], code: i32, msg: &str| {
        let mut all = vec!["serve", "--socket", sock];
        all.extend_from_slice(args);
        let out = vma_decode(&all);
        assert_eq!(
            out.status.code(),
            Some(code),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            format!("vma-decode: {msg}\n"),
            "{args:?}"
        );
        assert!(out.stdout.is_empty());
        assert!(!Path::new(sock).exists());
    };
    expect(
        &[z],
        2,
        &format!("{z}: compressed (zstd): serving it needs --cache DIR to decompress it into"),
    );
    expect(
        &["--cache", cache, "--save-index", z],
        2,
        &format!(
            "{z}: --save-index needs a plain archive file; this one is compressed (zstd) \
         (decompress it into a file and serve that to keep its index)"
        ),
    );
    let empty = fixtures().join("pve/empty.vma");
    let empty = empty.to_str().unwrap();
    expect(
        &[empty],
        2,
        &format!("{empty}: the archive holds no devices: nothing to serve"),
    );
    let bytes = fs::read(&copy).unwrap();
    fs::write(&copy, &bytes[..bytes.len() - 1000]).unwrap();
    let c = copy.to_str().unwrap();
    expect(
        &[c],
        1,
        &format!("{c}: extent 0 at byte 13824: truncated: got 879640 of 880640 data bytes"),
    );

    // A header declaring a 200 TiB disk (and nothing else), compressed.
    let mut h = HeaderBuilder::new([7; 16], 0);
    h.add_device("drive-scsi0", 200 << 40).unwrap();
    let huge = work.path().join("huge.vma");
    let encoded = h.encode().unwrap();
    let header_size = u32::from_be_bytes(encoded[56..60].try_into().unwrap()) as u64;
    fs::write(&huge, &encoded).unwrap();
    let hz = zstd(&huge);
    let hz = hz.to_str().unwrap();
    let out = vma_decode(&["serve", "--socket", sock, "--cache", cache, hz]);
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    let clusters = (200u64 << 40) / CLUSTER_SIZE as u64;
    let need = header_size + (200u64 << 40) + clusters.div_ceil(58) * 512;
    let want_prefix = format!("vma-decode: {cache}: ");
    let want_rest = format!(
        " bytes free, but {hz} may need up to {need} bytes there (its devices' size): refusing to start \
         (--no-space-check starts anyway; a full disk then stops it)\n"
    );
    assert!(
        err.starts_with(&want_prefix) && err.ends_with(&want_rest),
        "{err}"
    );
    // Told not to check, it starts the copy, which finds the archive cut short.
    let out = vma_decode(&[
        "serve",
        "--socket",
        sock,
        "--cache",
        cache,
        "--no-space-check",
        hz,
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.ends_with(&format!(
            "{hz}: drive-scsi0: cluster 0 missing (3355443200 of 3355443200 clusters missing)\n"
        )),
        "{err}"
    );
}

/// An archive on a pipe is copied into the cache, then served.
#[test]
fn an_archive_on_a_pipe_is_served_from_the_cache() {
    let expected = parse_expected();
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    fs::create_dir(&cache).unwrap();
    let archive = fixtures().join("pve/full.vma");
    let s = serve_with_stdin(
        work.path(),
        &["--cache", cache.to_str().unwrap(), "-"],
        1,
        Some(archive),
    );
    let out = work.path().join("out.raw");
    qemu_img_to_raw(&s.uri("drive-scsi0"), &out);
    assert_eq!(
        sha256_file(&out),
        expected["full.vma"].files["disk-drive-scsi0.raw"].0
    );
    let log = s.stop();
    assert!(
        log.contains(
            "<stdin>: not a file that can be read at random: copying it into an unnamed file in"
        ),
        "{log}"
    );
    assert!(
        log.contains("<stdin>: copied 2111488 bytes and indexed: "),
        "{log}"
    );
}

/// A RAM-state device whose clusters run past its recorded size reads as
/// extract writes vmstate.bin; other devices beside it as they are.
#[test]
fn vmstate_reads_as_extract_writes_it() {
    let work = tempfile::tempdir().unwrap();
    let mut h = HeaderBuilder::new([9; 16], 0);
    // 1.5 clusters recorded, 4 stored: cluster 1 straddles the size.
    h.add_device("vmstate", 98304).unwrap();
    h.add_device("drive-scsi0", 65536).unwrap();
    let mut w = Writer::new(Vec::new(), &h, WriterOptions::default()).unwrap();
    for n in 0..4u32 {
        let mut raw = vec![0u8; CLUSTER_SIZE];
        for b in 0..16 {
            if !(b + n as usize).is_multiple_of(5) {
                raw[b * 4096..(b + 1) * 4096].fill(n as u8 * 16 + b as u8 + 1);
            }
        }
        w.write_raw(1, n, &raw).unwrap();
    }
    w.write_raw(2, 0, &[0xab; 5000]).unwrap();
    let archive = work.path().join("vm.vma");
    fs::write(&archive, w.finish().unwrap()).unwrap();
    let extracted = work.path().join("out");
    let e = vma_decode(&[
        "extract",
        archive.to_str().unwrap(),
        extracted.to_str().unwrap(),
    ]);
    assert!(e.status.success(), "{}", String::from_utf8_lossy(&e.stderr));
    let s = serve(work.path(), &[archive.to_str().unwrap()], 2);
    let out = work.path().join("vmstate.out");
    nbdcopy(&s.uri("vmstate"), &out);
    let want = fs::read(extracted.join("vmstate.bin")).unwrap();
    assert!(
        want.len() > 98304 + 65536,
        "vmstate.bin: {} bytes",
        want.len()
    );
    assert!(
        fs::read(&out).unwrap() == want,
        "vmstate differs from vmstate.bin"
    );
    nbdcopy(&s.uri("drive-scsi0"), &out);
    assert_eq!(
        sha256_file(&out),
        sha256_file(&extracted.join("disk-drive-scsi0.raw"))
    );
    s.stop();
}

/// A signal while the archive is still being copied into the cache ends
/// the process at once (128 + the signal), with nothing left behind.
#[test]
fn a_signal_while_indexing_ends_it_at_once() {
    use std::io::Write;
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    fs::create_dir(&cache).unwrap();
    let socket = work.path().join("nbd.sock");
    let mut child = Command::new(bin("vma-decode"))
        .arg("serve")
        .arg("--socket")
        .arg(&socket)
        .arg("--cache")
        .arg(&cache)
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The header and part of the first extent, then the pipe stays open.
    let bytes = fs::read(fixtures().join("pve/full.vma")).unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&bytes[..100_000]).unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(
        line.contains("copying it into an unnamed file in"),
        "{line}"
    );
    sigterm(&child);
    let status = child.wait().unwrap();
    let mut rest = String::new();
    err.read_to_string(&mut rest).unwrap();
    assert_eq!(status.code(), Some(128 + 15), "{rest}");
    assert_eq!(
        rest,
        "vma-decode serve: interrupted by SIGTERM: removed 0 partial outputs\n"
    );
    assert!(!socket.exists());
    assert_eq!(fs::read_dir(&cache).unwrap().count(), 0);
    drop(stdin);
}

/// A signal while `--save-index` is writing the index (before serving)
/// removes the half-written temporary file: nothing is left beside the
/// archive. The temporary name (ARCHIVE.vmaidx.PID.tmp) is made a FIFO
/// before the tool starts, so the write blocks there until the test has
/// seen it begin (its open of the FIFO returns only once the tool has
/// opened it) and the signal comes mid-write, whatever the machine's speed.
#[test]
#[allow(unsafe_code)]
fn a_signal_while_saving_the_index_removes_it() {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::CommandExt;
    let work = tempfile::tempdir().unwrap();
    // 16384 clusters (1 GiB, all zero): a 128 KiB index, more than a pipe
    // holds, so writing it blocks while nobody reads the FIFO.
    let image = work.path().join("zero.raw");
    fs::File::create(&image).unwrap().set_len(1 << 30).unwrap();
    let archive = work.path().join("zero.vma");
    ok(Command::new(bin("vma-encode"))
        .arg("-o")
        .arg(&archive)
        .arg(format!("drive-scsi0={}", image.display())));
    fs::remove_file(&image).unwrap();
    let idx = PathBuf::from(format!("{}.vmaidx", archive.display()));
    // "<idx>.<pid>.tmp" built in the child before exec without allocating:
    // the prefix and room for the digits are prepared here.
    let prefix = format!("{}.", idx.display());
    let mut path_buf = prefix.as_bytes().to_vec();
    let digits_at = path_buf.len();
    path_buf.resize(digits_at + 32, 0);
    let socket = work.path().join("nbd.sock");
    let mut cmd = Command::new(bin("vma-decode"));
    cmd.arg("serve")
        .arg("--socket")
        .arg(&socket)
        .arg("--save-index")
        .arg(&archive)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the closure runs in the forked child before exec and only
    // calls getpid and mkfifo (async-signal-safe) on memory it owns.
    unsafe {
        cmd.pre_exec(move || {
            let mut pid = libc::getpid() as u64;
            let mut digits = [0u8; 20];
            let mut n = 0;
            loop {
                digits[n] = b'0' + (pid % 10) as u8;
                n += 1;
                pid /= 10;
                if pid == 0 {
                    break;
                }
            }
            let mut at = digits_at;
            for i in (0..n).rev() {
                path_buf[at] = digits[i];
                at += 1;
            }
            path_buf[at..at + 4].copy_from_slice(b".tmp");
            path_buf[at + 4] = 0;
            if libc::mkfifo(path_buf.as_ptr().cast(), 0o600) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let tmp = PathBuf::from(format!("{prefix}{}.tmp", child.id()));
    // Returns once the tool has opened the FIFO to write the index into it.
    let c_tmp = CString::new(tmp.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; the descriptor is closed below.
    let fd = unsafe { libc::open(c_tmp.as_ptr(), libc::O_RDONLY) };
    assert!(
        fd >= 0,
        "open {}: {}",
        tmp.display(),
        std::io::Error::last_os_error()
    );
    sigterm(&child);
    let status = child.wait().unwrap();
    // SAFETY: the descriptor opened above.
    unsafe { libc::close(fd) };
    let mut log = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert_eq!(status.code(), Some(128 + 15), "{log}");
    assert!(
        log.ends_with("vma-decode serve: interrupted by SIGTERM: removed 1 partial output\n"),
        "{log}"
    );
    assert!(!tmp.exists(), "temporary index left behind");
    assert!(!idx.exists(), "index saved");
    assert!(!socket.exists());
    let mut names: Vec<_> = fs::read_dir(work.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["zero.vma"]);
}
