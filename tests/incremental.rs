//! Incremental forever, full archives always (issue 13), end to end with
//! real clients: `cbw-tap serve --state-dir`, qemu-io writing ~1 % of the
//! clusters, `cbw-tap backup --incremental | vma-encode --base PREV -`.
//! The merged archive decodes byte-exactly to the disk at the second
//! instant (vma-decode and vma-verify; dissect.hypervisor too where it is
//! installed); the backup read only the changed clusters; a clean restart
//! keeps the record, `kill -9` makes the next backup full; a stream
//! applied to the wrong base is refused.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const CS: u64 = 65536;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

struct Serve {
    child: Child,
    sock: PathBuf,
    ctl: PathBuf,
    log: PathBuf,
}

impl Serve {
    fn start(dir: &Path, img: &Path, n: u32) -> Serve {
        let sock = dir.join("nbd.sock");
        let ctl = dir.join("nbd.sock.ctl");
        let log = dir.join(format!("serve{n}.log"));
        let mut arg = std::ffi::OsString::from("drive-scsi0=");
        arg.push(img.as_os_str());
        let child = Command::new(common::bin("cbw-tap"))
            .arg("serve")
            .arg("--socket")
            .arg(&sock)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg(arg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        // A restart replaces stale sockets: wait for the new server's log.
        while !fs::read_to_string(&log).unwrap().contains("export(s) on") {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "serve did not start"
            );
            thread::sleep(Duration::from_millis(10));
        }
        Serve {
            child,
            sock,
            ctl,
            log,
        }
    }

    fn stop(mut self, signal: i32) -> String {
        // SAFETY: kill(2) on our own child's pid.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, signal)
        };
        self.child.wait().unwrap();
        fs::read_to_string(&self.log).unwrap()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `cbw-tap backup ARGS | vma-encode ENCODE -o OUT -`, through a shell:
/// (backup's stderr, vma-encode's exit status and stderr).
fn backup(serve: &Serve, args: &str, encode: &str, out: &Path) -> (String, Output) {
    let dir = out.parent().unwrap();
    let berr = dir.join("backup.err");
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "'{}' backup --control '{}' {args} 2>'{}' | '{}' {encode} -o '{}' -",
            common::bin("cbw-tap").display(),
            serve.ctl.display(),
            berr.display(),
            common::bin("vma-encode").display(),
            out.display()
        ))
        .output()
        .unwrap();
    (fs::read_to_string(&berr).unwrap(), o)
}

/// (clusters emitted, bytes read from the disk) from backup's stderr.
fn counters(stderr: &str) -> (u64, u64) {
    let num = |prefix: &str| -> u64 {
        let line = stderr
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in:\n{stderr}"));
        line.split(|c: char| !c.is_ascii_digit())
            .find(|s| !s.is_empty())
            .unwrap()
            .parse()
            .unwrap()
    };
    (
        num("cbw-tap backup: clusters: "),
        num("cbw-tap backup: read from drive-scsi0: "),
    )
}

fn decoded(archive: &Path, out: &Path) -> Vec<u8> {
    let st = Command::new(common::bin("vma-decode"))
        .arg("extract")
        .arg(archive)
        .arg(out)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "vma-decode extract {}", archive.display());
    let st = Command::new(common::bin("vma-verify"))
        .arg(archive)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "vma-verify {}", archive.display());
    fs::read(out.join("disk-drive-scsi0.raw")).unwrap()
}

/// dissect.hypervisor's reader, where it is installed (.ci/run installs
/// it): the same bytes.
fn dissect_agrees(archive: &Path, out: &Path, expect: &[u8]) {
    let probe = Command::new("python3")
        .args(["-c", "import dissect.hypervisor.backup.vma"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("dissect.hypervisor not installed: skipping its check");
        return;
    }
    let o = Command::new("python3")
        .arg(common::root().join("tests/interop/dissect_extract.py"))
        .arg(archive)
        .arg(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(fs::read(out.join("drive-scsi0.raw")).unwrap() == expect);
}

#[test]
fn incremental_merged_archives_are_the_disk_and_read_only_what_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    fs::create_dir(d.join("state")).unwrap();
    let img = d.join("disk.raw");
    let clusters = 1024u64; // 64 MiB
    let mut rng = Rng(0x1234_5678_9abc_def1);
    {
        let f = fs::File::create(&img).unwrap();
        let mut buf = vec![0u8; CS as usize];
        for c in 0..clusters {
            for chunk in buf.chunks_mut(8) {
                chunk.copy_from_slice(&rng.next().to_le_bytes());
            }
            f.write_all_at(&buf, c * CS).unwrap();
        }
    }
    let serve = Serve::start(d, &img, 1);
    let full = d.join("full.vma");
    let conf = d.join("qemu-server.conf");
    fs::write(&conf, "name: vm100\nscsi0: local:100/vm-100-disk-0.raw\n").unwrap();
    let (err, o) = backup(
        &serve,
        "--incremental",
        &format!("-c 'qemu-server.conf={}'", conf.display()),
        &full,
    );
    assert!(
        o.status.success(),
        "{err}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(err.contains("no base to build on"), "{err}");
    assert_eq!(counters(&err), (clusters, clusters * CS));

    // ~1 % of the clusters written by a real client.
    let mut touched = std::collections::BTreeSet::new();
    let mut cmd = Command::new("qemu-io");
    cmd.args([
        "-f",
        "raw",
        &format!("nbd+unix:///drive-scsi0?socket={}", serve.sock.display()),
    ]);
    for i in 0..10 {
        let c = rng.next() % clusters;
        let off = c * CS + (rng.next() % (CS - 4096));
        let len = 512 + rng.next() % 3000;
        touched.extend((off / CS)..=((off + len - 1) / CS));
        cmd.arg("-c")
            .arg(format!("write -P {} {off} {len}", 0x11 + i));
    }
    let q = cmd
        .output()
        .expect("qemu-io (qemu-utils) must be installed");
    assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stderr));

    // A clean restart keeps the record.
    let log = serve.stop(libc::SIGTERM);
    assert!(!log.contains("cannot save"), "{log}");
    assert!(d.join("state/cbw-tap.state").exists());
    let serve = Serve::start(d, &img, 2);
    let second = fs::read(&img).unwrap();
    let inc = d.join("inc.vma");
    let (err, o) = backup(
        &serve,
        "--incremental -v",
        &format!("-v --base '{}'", full.display()),
        &inc,
    );
    let eerr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}{eerr}");
    // Progress counts up to what is written: the changed clusters for the
    // backup, the whole disk for the merge; 100 % once, at the end.
    let last_progress = |text: &str| -> (String, usize) {
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("progress "))
            .collect();
        let full = lines
            .iter()
            .filter(|l| l.starts_with("progress 100% "))
            .count();
        (lines.last().unwrap_or(&"").to_string(), full)
    };
    let n = touched.len() as u64;
    let (line, full_lines) = last_progress(&err);
    assert_eq!(line, format!("progress 100% {0}/{0} 0", n * CS), "{err}");
    assert_eq!(full_lines, 1, "{err}");
    let (line, full_lines) = last_progress(&eerr);
    assert!(
        line.starts_with(&format!("progress 100% {0}/{0} ", clusters * CS)),
        "{eerr}"
    );
    assert_eq!(full_lines, 1, "{eerr}");
    assert!(err.contains("incremental backup on base"), "{err}");
    // The reader read only the changed clusters (nothing wrote during the
    // backup, so no copy-before-write either).
    assert_eq!(counters(&err), (n, n * CS), "{err}");
    assert!(
        eerr.contains(&format!(
            "merged {n} clusters from the stream onto {} from",
            clusters - n
        )),
        "{eerr}"
    );
    assert!(
        decoded(&inc, &d.join("x1")) == second,
        "merged archive differs"
    );
    dissect_agrees(&inc, &d.join("dissect"), &second);

    // The next incremental, kept as a stream: refused on the wrong base.
    let q = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            &format!("nbd+unix:///drive-scsi0?socket={}", serve.sock.display()),
            "-c",
            "write -P 0x77 1000000 100",
        ])
        .output()
        .unwrap();
    assert!(q.status.success());
    let stream = d.join("inc2.stream");
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "'{}' backup --control '{}' --incremental > '{}'",
            common::bin("cbw-tap").display(),
            serve.ctl.display(),
            stream.display()
        ))
        .output()
        .unwrap();
    assert!(o.status.success());
    let third = fs::read(&img).unwrap();
    let apply = |base: &Path, out: &Path| {
        Command::new(common::bin("vma-encode"))
            .arg("--base")
            .arg(base)
            .arg("-o")
            .arg(out)
            .arg("-")
            .stdin(fs::File::open(&stream).unwrap())
            .output()
            .unwrap()
    };
    let wrong = apply(&full, &d.join("wrong.vma"));
    assert_eq!(wrong.status.code(), Some(2));
    let msg = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        msg.starts_with(&format!(
            "vma-encode: {}: the stream applies to the backup ",
            full.display()
        )) && msg.contains(", not to this archive ("),
        "{msg}"
    );
    assert!(!d.join("wrong.vma").exists());
    let no_base = Command::new(common::bin("vma-encode"))
        .arg("-o")
        .arg(d.join("nobase.vma"))
        .arg("-")
        .stdin(fs::File::open(&stream).unwrap())
        .output()
        .unwrap();
    assert_eq!(no_base.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&no_base.stderr).contains("give that backup's archive with --base")
    );
    // A compressed base goes through the decompressing input.
    let zst = d.join("inc.vma.zst");
    let z = Command::new("zstd")
        .args(["-q", "-f", "-o"])
        .arg(&zst)
        .arg(&inc)
        .status();
    let base3 = if z.is_ok_and(|s| s.success()) {
        zst
    } else {
        inc.clone()
    };
    let right = apply(&base3, &d.join("inc2.vma"));
    assert!(
        right.status.success(),
        "{}",
        String::from_utf8_lossy(&right.stderr)
    );
    assert!(decoded(&d.join("inc2.vma"), &d.join("x2")) == third);

    // kill -9: no state saved, the next incremental request is full.
    serve.stop(libc::SIGKILL);
    let serve = Serve::start(d, &img, 3);
    assert!(fs::read_to_string(&serve.log)
        .unwrap()
        .contains("no saved state (first start or unclean stop): the next backup is full"));
    let after = d.join("after-kill.vma");
    let (err, o) = backup(&serve, "--incremental", "", &after);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("no base to build on"), "{err}");
    assert_eq!(counters(&err).0, clusters);
    assert!(decoded(&after, &d.join("x3")) == third);
}

/// `cbw-tap backup ARGS -- CONSUMER…`: the backup runs its consumer
/// (stdout null) and says on stderr how it went.
fn backup_into(serve: &Serve, args: &[&str], consumer: &[&str]) -> Output {
    Command::new(common::bin("cbw-tap"))
        .arg("backup")
        .arg("--control")
        .arg(&serve.ctl)
        .args(args)
        .arg("--")
        .args(consumer)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn a_consumer_failing_after_the_stream_leaves_the_backup_not_completed() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    fs::create_dir(d.join("state")).unwrap();
    let img = d.join("disk.raw");
    let clusters = 96u64;
    let mut rng = Rng(0x0bad_cafe_1234_5679);
    let data: Vec<u8> = (0..clusters * CS / 8)
        .flat_map(|_| rng.next().to_le_bytes())
        .collect();
    fs::write(&img, &data).unwrap();
    let serve = Serve::start(d, &img, 1);
    let encode = common::bin("vma-encode");
    let encode = encode.to_str().unwrap();
    let path = |n: &str| d.join(n).to_str().unwrap().to_string();
    let write = |pattern: u8, off: u64| {
        let q = Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                &format!("nbd+unix:///drive-scsi0?socket={}", serve.sock.display()),
                "-c",
                &format!("write -P {pattern} {off} 4096"),
            ])
            .output()
            .expect("qemu-io (qemu-utils) must be installed");
        assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stderr));
    };
    let stderr = |o: &Output| String::from_utf8_lossy(&o.stderr).into_owned();

    // A full backup whose consumer succeeds: completed, a base.
    let o = backup_into(
        &serve,
        &["--incremental"],
        &[encode, "-o", &path("full.vma"), "-"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("no base to build on"));
    write(0x21, 5 * CS);

    // An incremental one whose consumer reads the whole stream, then
    // fails (here: the disk is full when the merged archive is written).
    let o = backup_into(
        &serve,
        &["--incremental"],
        &[encode, "--base", &path("full.vma"), "-o", "/dev/full", "-"],
    );
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("incremental backup on base"), "{err}");
    assert!(
        err.contains("\nvma-encode: /dev/full: write failed: No space left on device"),
        "{err}"
    );
    assert_eq!(
        err.lines().last().unwrap(),
        format!("cbw-tap backup: consumer `{encode}` failed (exit status: 3) after the stream ended: the backup is not recorded as completed (the next backup is full)"),
    );
    // The stream was finished: its one changed cluster was sent.
    assert_eq!(counters(&err).0, 1, "{err}");

    // So the next backup does not build on the failed one: full.
    write(0x22, 9 * CS);
    let o = backup_into(
        &serve,
        &["--incremental"],
        &[encode, "-o", &path("second.vma"), "-"],
    );
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("no base to build on"), "{err}");
    assert_eq!(counters(&err).0, clusters);
    // And a successful consumer made it the base of the next one.
    write(0x23, 40 * CS);
    let o = backup_into(
        &serve,
        &["--incremental", "-v"],
        &[
            encode,
            "--base",
            &path("second.vma"),
            "-o",
            &path("third.vma"),
            "-",
        ],
    );
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("incremental backup on base"), "{err}");
    assert_eq!(counters(&err).0, 1);
    assert!(err.contains(&format!("progress 100% {CS}/{CS} 0")), "{err}");
    assert!(decoded(&d.join("third.vma"), &d.join("x")) == fs::read(&img).unwrap());
}
