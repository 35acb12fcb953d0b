//! `cbw-tap` end to end with real clients: qemu-io writes through the
//! server while `cbw-tap backup | vma-encode -` runs; the archive, decoded
//! by vma-decode, must be the disks at the backup instant and the live
//! disks must hold every acknowledged write. Also: killing the consumer,
//! the failure policies, refusing a second backup, malformed NBD traffic,
//! and the example script.
//!
//! `CBW_RUNS=N CBW_SEED=S` change the randomized test's run count and first
//! seed (scripts/cbw-soak.sh uses them).

mod common;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const CS: u64 = 65536;

use test_support::Rng;

/// A disk image: random data, a hole of a few clusters, a zero cluster.
fn make_image(path: &Path, size: u64, rng: &mut Rng) -> Vec<u8> {
    let mut data = rng.bytes(size as usize);
    let clusters = size.div_ceil(CS);
    let h = rng.below(clusters);
    let hole = (h * CS) as usize..(((h + 3) * CS).min(size)) as usize;
    data[hole.clone()].fill(0);
    let z = (rng.below(clusters) * CS) as usize;
    data[z..(z + CS as usize).min(size as usize)].fill(0);
    // Write it sparse: the hole stays unallocated.
    let f = fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&data[..hole.start], 0).unwrap();
    f.write_all_at(&data[hole.end..], hole.end as u64).unwrap();
    data
}

/// A running `cbw-tap serve`, killed when dropped.
struct Tap {
    child: Child,
    sock: PathBuf,
    ctl: PathBuf,
    log: PathBuf,
}

impl Tap {
    fn start(dir: &Path, exports: &[(&str, &Path)]) -> Tap {
        Tap::start_with(dir, exports, &[])
    }

    fn start_with(dir: &Path, exports: &[(&str, &Path)], extra: &[&str]) -> Tap {
        let sock = dir.join("nbd.sock");
        let ctl = dir.join("nbd.sock.ctl");
        let log = dir.join("serve.log");
        let mut cmd = Command::new(common::bin("cbw-tap"));
        cmd.arg("serve").arg("--socket").arg(&sock).args(extra);
        for (name, path) in exports {
            let mut arg = std::ffi::OsString::from(format!("{name}="));
            arg.push(path.as_os_str());
            cmd.arg(arg);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut tap = Tap {
            child,
            sock,
            ctl,
            log,
        };
        let t0 = Instant::now();
        while !(tap.sock.exists() && tap.ctl.exists()) {
            if let Some(st) = tap.child.try_wait().unwrap() {
                panic!(
                    "cbw-tap serve exited ({st}): {}",
                    fs::read_to_string(&tap.log).unwrap()
                );
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "cbw-tap serve did not start"
            );
            thread::sleep(Duration::from_millis(10));
        }
        tap
    }

    fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.sock.display())
    }

    /// Runs qemu-io with `cmds` against export `name`.
    fn qemu_io(&self, name: &str, cmds: &[String]) -> Output {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw", &self.uri(name)]);
        for c in cmds {
            cmd.arg("-c").arg(c);
        }
        cmd.output()
            .expect("qemu-io (qemu-utils) must be installed")
    }

    fn qemu_io_spawn(&self, name: &str, cmds: &[String]) -> Child {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw", &self.uri(name)]);
        for c in cmds {
            cmd.arg("-c").arg(c);
        }
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("qemu-io (qemu-utils) must be installed")
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A guest operation, as a qemu-io command and as its effect.
#[derive(Clone, Debug)]
enum Op {
    Write { off: u64, len: u64, pat: u8 },
    Zero { off: u64, len: u64 },
    Discard { off: u64, len: u64 },
}

impl Op {
    fn random(r: &mut Rng, size: u64) -> Op {
        let kind = r.below(10);
        if kind < 2 {
            // Discards aligned to 4 KiB: QEMU may drop unaligned edges.
            let off = r.below(size / 4096) * 4096;
            let len = (1 + r.below(48)) * 4096;
            let len = len.min(size - off);
            if kind == 0 {
                return Op::Discard { off, len };
            }
            return Op::Zero { off, len };
        }
        let off = r.below(size);
        let len = (1 + r.below(3 * CS)).min(size - off);
        Op::Write {
            off,
            len,
            pat: (r.below(255) + 1) as u8,
        }
    }

    fn command(&self) -> String {
        match self {
            Op::Write { off, len, pat } => format!("write -P {pat:#04x} {off} {len}"),
            Op::Zero { off, len } => format!("write -z {off} {len}"),
            Op::Discard { off, len } => format!("discard {off} {len}"),
        }
    }

    fn apply(&self, img: &mut [u8]) {
        match *self {
            Op::Write { off, len, pat } => img[off as usize..(off + len) as usize].fill(pat),
            Op::Zero { off, len } | Op::Discard { off, len } => {
                img[off as usize..(off + len) as usize].fill(0)
            }
        }
    }
}

fn assert_qemu_io_ok(out: &Output, what: &str) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("failed") && !text.contains("error"),
        "{what}: qemu-io failed ({}):\n{text}",
        out.status
    );
}

/// `cbw-tap backup … | (test's pump) | vma-encode -o ARCHIVE -`. While
/// `slow` is set the pump passes 16 KiB every 2 ms (8 MB/s), so guest
/// writes overtake the background reader.
struct Pipeline {
    backup: Child,
    encode: Child,
    pump: thread::JoinHandle<()>,
    slow: Arc<AtomicBool>,
}

/// Starts `cbw-tap backup` with `args`; its `--post` hook touches
/// `instant`, so the caller can tell when the backup instant has passed.
fn spawn_backup(tap: &Tap, args: &[&str], instant: &Path) -> Child {
    Command::new(common::bin("cbw-tap"))
        .arg("backup")
        .arg("--control")
        .arg(&tap.ctl)
        .args(args)
        .arg("--post")
        .arg(format!("touch '{}'", instant.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

impl Pipeline {
    fn start(tap: &Tap, archive: &Path, args: &[&str], instant: &Path) -> Pipeline {
        let mut backup = spawn_backup(tap, args, instant);
        let mut encode = Command::new(common::bin("vma-encode"))
            .arg("-o")
            .arg(archive)
            .arg("-")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let slow = Arc::new(AtomicBool::new(true));
        let mut from = backup.stdout.take().unwrap();
        let mut to = encode.stdin.take().unwrap();
        let slow2 = Arc::clone(&slow);
        let pump = thread::spawn(move || {
            let mut buf = vec![0u8; 16384];
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
                if slow2.load(Ordering::Relaxed) {
                    thread::sleep(Duration::from_millis(2));
                }
            }
        });
        wait_for_instant(instant, &mut backup);
        Pipeline {
            backup,
            encode,
            pump,
            slow,
        }
    }

    /// Lets the rest flow at full speed and waits: (backup status and
    /// stderr, vma-encode status and stderr).
    fn finish(self) -> ((ExitStatus, String), (ExitStatus, String)) {
        self.slow.store(false, Ordering::Relaxed);
        let b = self.backup.wait_with_output().unwrap();
        self.pump.join().unwrap();
        let e = self.encode.wait_with_output().unwrap();
        (
            (b.status, String::from_utf8_lossy(&b.stderr).into_owned()),
            (e.status, String::from_utf8_lossy(&e.stderr).into_owned()),
        )
    }
}

/// Waits for the post hook's file: the instant is taken.
fn wait_for_instant(instant: &Path, backup: &mut Child) {
    let t0 = Instant::now();
    while !instant.exists() {
        if let Some(st) = backup.try_wait().unwrap() {
            let mut err = String::new();
            backup
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("cbw-tap backup ended before the instant ({st}):\n{err}");
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "no backup instant");
        thread::sleep(Duration::from_millis(2));
    }
}

/// The counters `cbw-tap backup` prints: (emitted, by reader, by cbw,
/// cbw reads).
fn parse_counts(stderr: &str) -> (u64, u64, u64, u64) {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("cbw-tap backup: clusters: "))
        .unwrap_or_else(|| panic!("no counters in:\n{stderr}"));
    let nums: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    // emitted, reader, reader holes, cbw, cbw reads, cbw holes
    (nums[0], nums[1], nums[3], nums[4])
}

fn decode(archive: &Path, out: &Path) {
    let st = Command::new(common::bin("vma-decode"))
        .arg("extract")
        .arg(archive)
        .arg(out)
        .status()
        .unwrap();
    assert!(st.success(), "vma-decode extract failed");
}

fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a == b
}

/// Where two images first differ, for messages.
fn first_diff(a: &[u8], b: &[u8]) -> String {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => format!("first difference at byte {i} (cluster {})", i as u64 / CS),
        None => format!("lengths {} and {}", a.len(), b.len()),
    }
}

fn random_run(seed: u64) -> (u64, u64) {
    let mut rng = Rng::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let names = ["sda", "sdb", "sdc"];
    let sizes = [2 << 20, (1 << 20) + 20480 + 512, 3 << 19];
    let mut snapshot = Vec::new();
    let mut paths = Vec::new();
    for (n, &s) in names.iter().zip(&sizes) {
        let p = d.join(format!("{n}.raw"));
        snapshot.push(make_image(&p, s, &mut rng));
        paths.push(p);
    }
    let exports: Vec<(&str, &Path)> = names
        .iter()
        .zip(&paths)
        .map(|(n, p)| (*n, p.as_path()))
        .collect();
    let tap = Tap::start(d, &exports);
    let archive = d.join("vm.vma");
    let buffer = ["64K", "256K", "1M"][rng.below(3) as usize];
    let pipe = Pipeline::start(&tap, &archive, &["--buffer", buffer], &d.join("instant"));

    // One qemu-io per export, all at once, commands in order within each.
    let mut expected = snapshot.clone();
    let mut writers = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let ops: Vec<Op> = (0..12 + rng.below(12))
            .map(|_| Op::random(&mut rng, sizes[i]))
            .collect();
        for op in &ops {
            op.apply(&mut expected[i]);
        }
        let cmds: Vec<String> = ops.iter().map(Op::command).collect();
        writers.push((name, tap.qemu_io_spawn(name, &cmds)));
    }
    for (name, w) in writers {
        let out = w.wait_with_output().unwrap();
        assert_qemu_io_ok(&out, &format!("seed {seed}, export {name}"));
    }
    let ((bst, berr), (est, eerr)) = pipe.finish();
    assert!(bst.success(), "seed {seed}: backup failed ({bst}):\n{berr}");
    assert!(
        est.success(),
        "seed {seed}: vma-encode failed ({est}):\n{eerr}"
    );

    let out = d.join("restored");
    decode(&archive, &out);
    for (i, name) in names.iter().enumerate() {
        let restored = fs::read(out.join(format!("disk-{name}.raw"))).unwrap();
        assert!(
            same(&restored, &snapshot[i]),
            "seed {seed}: {name} in the archive is not the disk at the instant: {}",
            first_diff(&restored, &snapshot[i])
        );
        let live = fs::read(&paths[i]).unwrap();
        assert!(
            same(&live, &expected[i]),
            "seed {seed}: live {name} lost an acknowledged write: {}",
            first_diff(&live, &expected[i])
        );
    }
    let (emitted, reader, cbw, _) = parse_counts(&berr);
    let total: u64 = sizes.iter().map(|s| s.div_ceil(CS)).sum();
    assert_eq!(emitted, total, "seed {seed}");
    assert_eq!(reader + cbw, total, "seed {seed}");
    (cbw, total)
}

#[test]
fn live_backup_during_random_writes_is_the_instant() {
    let runs: u64 = std::env::var("CBW_RUNS").map_or(20, |v| v.parse().unwrap());
    let first: u64 = std::env::var("CBW_SEED").map_or(1, |v| v.parse().unwrap());
    let mut cbw = 0;
    let mut total = 0;
    for seed in first..first + runs {
        eprintln!("cbw randomized run: seed {seed} (rerun: CBW_SEED={seed} CBW_RUNS=1)");
        let (c, t) = random_run(seed);
        cbw += c;
        total += t;
    }
    eprintln!("{cbw} of {total} clusters captured by copy-before-write");
    assert!(cbw > 0, "guest writes never overtook the background reader");
}

/// Stalls a backup: vma-encode's output is a pipe nobody reads, so
/// everything behind it fills up. Returns (backup, vma-encode).
/// A backup whose consumer takes nothing after the instant, with its
/// buffer full: the reader has filled its share, and one guest write to c
/// (`expected[2]` gets it) has filled the reserve kept for copy-before-write.
fn stalled_backup(
    tap: &Tap,
    args: &[&str],
    instant: &Path,
    expected: &mut [Vec<u8>],
) -> (Child, Child) {
    let mut backup = spawn_backup(tap, args, instant);
    let encode = Command::new(common::bin("vma-encode"))
        .arg("-")
        .stdin(Stdio::from(backup.stdout.take().unwrap()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_instant(instant, &mut backup);
    // Let the reader fill every buffer on the way.
    thread::sleep(Duration::from_millis(500));
    // The reader stopped at its share of the buffer: a guest copy still
    // fits, at once (no wait for the consumer, so no timeout whatever the
    // policy), and then the buffer is full.
    let size = expected[2].len() as u64;
    let reserve = Op::Write {
        off: size - 8 * CS,
        len: 4096,
        pat: 0x3c,
    };
    let t0 = Instant::now();
    let out = tap.qemu_io("c", &[reserve.command()]);
    assert_qemu_io_ok(&out, "a write copied into the guest reserve");
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "a write copied into the guest reserve waited {:?}",
        t0.elapsed()
    );
    reserve.apply(&mut expected[2]);
    (backup, encode)
}

fn images(d: &Path, rng: &mut Rng, size: u64) -> (Vec<PathBuf>, Vec<Vec<u8>>) {
    let mut paths = Vec::new();
    let mut data = Vec::new();
    for n in ["a", "b", "c"] {
        let p = d.join(format!("{n}.raw"));
        data.push(make_image(&p, size, rng));
        paths.push(p);
    }
    (paths, data)
}

#[test]
fn killing_the_consumer_aborts_the_backup_and_no_guest_write_is_lost() {
    let mut rng = Rng::new(77);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size = 16 << 20;
    let (paths, mut expected) = images(d, &mut rng, size);
    let tap = Tap::start(d, &[("a", &paths[0]), ("b", &paths[1]), ("c", &paths[2])]);
    let (backup, mut encode) = stalled_backup(
        &tap,
        &["--cbw-timeout", "60", "--buffer", "256K"],
        &d.join("instant"),
        &mut expected,
    );

    // A second backup is refused while this one runs.
    let second = Command::new(common::bin("cbw-tap"))
        .args(["backup", "--control"])
        .arg(&tap.ctl)
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(3));
    let msg = String::from_utf8_lossy(&second.stderr);
    assert!(
        msg.starts_with(&format!(
            "cbw-tap backup: {}: server refused the backup: a backup is already running (started at ",
            tap.ctl.display()
        )),
        "{msg}"
    );
    assert!(second.stdout.is_empty());

    // Guest writes to the last export, which the stalled reader has not
    // reached: they wait for queue space.
    let mut writers = Vec::new();
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        let ops: Vec<Op> = (0..6)
            .map(|_| {
                let off = size - 4 * CS + rng.below(3 * CS);
                Op::Write {
                    off,
                    len: 1 + rng.below(CS),
                    pat: (1 + rng.below(255)) as u8,
                }
            })
            .collect();
        for op in &ops {
            op.apply(&mut expected[i]);
        }
        let cmds: Vec<String> = ops.iter().map(Op::command).collect();
        writers.push((name, tap.qemu_io_spawn(name, &cmds)));
    }
    thread::sleep(Duration::from_millis(500));
    assert!(
        writers[2].1.try_wait().unwrap().is_none(),
        "the write to c should be waiting for its copy"
    );
    encode.kill().unwrap(); // SIGKILL
    let _ = encode.wait();
    for (name, w) in writers {
        let out = w.wait_with_output().unwrap();
        assert_qemu_io_ok(&out, &format!("export {name} after the kill"));
    }
    // The waiting writes were let go because the consumer died, not
    // because their copy timed out (--cbw-timeout 60): the server says why
    // it aborted.
    let t0 = Instant::now();
    let reason = loop {
        let log = fs::read_to_string(&tap.log).unwrap();
        if let Some(l) = log
            .lines()
            .find(|l| l.starts_with("cbw-tap serve: backup of ") && l.contains(" aborted: "))
        {
            break l.split_once(" aborted: ").unwrap().1.to_string();
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "server log:\n{log}");
        thread::sleep(Duration::from_millis(20));
    };
    assert!(
        reason == "the backup client went away (control connection closed)"
            || reason.starts_with("writing the cluster stream failed: "),
        "aborted for another reason: {reason}"
    );
    let out = backup.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("cbw-tap backup: stdout: Broken pipe (os error 32): the consumer is gone, backup aborted"),
        "{err}"
    );
    for (i, p) in paths.iter().enumerate() {
        assert!(
            same(&fs::read(p).unwrap(), &expected[i]),
            "image {i} lost a write"
        );
    }

    // A new backup succeeds and holds the images as they are now.
    let archive = d.join("vm.vma");
    let pipe = Pipeline::start(&tap, &archive, &["--json"], &d.join("instant2"));
    let ((bst, berr), (est, eerr)) = pipe.finish();
    assert!(bst.success(), "{berr}");
    assert!(est.success(), "{eerr}");
    let json_line = berr.lines().last().unwrap();
    assert!(
        json_line.starts_with("{") && json_line.contains("\"ok\":true"),
        "{berr}"
    );
    assert!(
        json_line.contains("\"clusters_emitted\":768"),
        "{json_line}"
    );
    decode(&archive, &d.join("out"));
    for (i, n) in ["a", "b", "c"].iter().enumerate() {
        let r = fs::read(d.join("out").join(format!("disk-{n}.raw"))).unwrap();
        assert!(
            same(&r, &expected[i]),
            "{n}: {}",
            first_diff(&r, &expected[i])
        );
    }
}

#[test]
fn cbw_timeout_policies() {
    let mut rng = Rng::new(5);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size = 16 << 20;
    let (paths, mut expected) = images(d, &mut rng, size);
    let tap = Tap::start(d, &[("a", &paths[0]), ("b", &paths[1]), ("c", &paths[2])]);
    let tail = size - 2 * CS;

    // break-guest-write: the write fails with EIO after the timeout, the
    // image is unchanged.
    let (backup, mut encode) = stalled_backup(
        &tap,
        &[
            "--cbw-timeout",
            "1",
            "--buffer",
            "256K",
            "--on-cbw-error",
            "break-guest-write",
        ],
        &d.join("i1"),
        &mut expected,
    );
    let t0 = Instant::now();
    let out = tap.qemu_io("c", &[format!("write -P 0x5a {tail} 4096")]);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(t0.elapsed() >= Duration::from_secs(1));
    assert!(text.contains("write failed: Input/output error"), "{text}");
    assert!(same(&fs::read(&paths[2]).unwrap(), &expected[2]));
    encode.kill().unwrap();
    let _ = encode.wait();
    let out = backup.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3));

    // break-snapshot: the write goes through after the timeout and the
    // backup is aborted with the reason (the server logs it; the stalled
    // consumer never gets it).
    let (backup, mut encode) = stalled_backup(
        &tap,
        &["--cbw-timeout", "2", "--buffer", "256K"],
        &d.join("i2"),
        &mut expected,
    );
    let t0 = Instant::now();
    let out = tap.qemu_io("c", &[format!("write -P 0x5a {tail} 4096")]);
    assert!(t0.elapsed() >= Duration::from_secs(2));
    assert_qemu_io_ok(&out, "break-snapshot write");
    Op::Write {
        off: tail,
        len: 4096,
        pat: 0x5a,
    }
    .apply(&mut expected[2]);
    assert!(same(&fs::read(&paths[2]).unwrap(), &expected[2]));
    encode.kill().unwrap();
    let _ = encode.wait();
    let out = backup.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    let want =
        "aborted: copy-before-write on c timed out after 2 s (the consumer does not keep up)";
    let t0 = Instant::now();
    loop {
        let log = fs::read_to_string(&tap.log).unwrap();
        if log
            .lines()
            .any(|l| l.starts_with("cbw-tap serve: backup of ") && l.ends_with(want))
        {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "server log:\n{log}");
        thread::sleep(Duration::from_millis(20));
    }
    // The backup is over (the log line comes after its end): writes pass
    // straight through, and a new backup is accepted and exact.
    let out = tap.qemu_io("c", &[format!("write -P 0x5b {} 4096", tail - CS)]);
    assert_qemu_io_ok(&out, "write after the abort");
    Op::Write {
        off: tail - CS,
        len: 4096,
        pat: 0x5b,
    }
    .apply(&mut expected[2]);
    assert!(same(&fs::read(&paths[2]).unwrap(), &expected[2]));
    let archive = d.join("after.vma");
    let ((bst, berr), (est, eerr)) = Pipeline::start(&tap, &archive, &[], &d.join("i3")).finish();
    assert!(bst.success() && est.success(), "{berr}\n{eerr}");
    decode(&archive, &d.join("after"));
    let r = fs::read(d.join("after").join("disk-c.raw")).unwrap();
    assert!(same(&r, &expected[2]), "{}", first_diff(&r, &expected[2]));
}

/// Speaks raw NBD to `sock` (fixed newstyle, NBD_OPT_GO for `name`).
fn nbd_connect(sock: &Path, name: &str) -> UnixStream {
    test_support::nbd_connect(sock, name, Duration::from_secs(10))
}

fn nbd_request(cmd: u16, offset: u64, len: u32) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&cmd.to_be_bytes());
    r.extend_from_slice(&42u64.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    r
}

/// Reads a simple reply and returns its error value.
fn nbd_reply(s: &mut UnixStream) -> u32 {
    let mut r = [0u8; 16];
    s.read_exact(&mut r).unwrap();
    assert_eq!(u32::from_be_bytes(r[..4].try_into().unwrap()), 0x6744_6698);
    u32::from_be_bytes(r[4..8].try_into().unwrap())
}

/// Reads until the server closes the connection.
fn closed(s: &mut UnixStream) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    }
}

#[test]
fn fleecing_keeps_guest_writes_fast_and_the_backup_exact() {
    let mut rng = Rng::new(21);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (paths, snapshot) = images(d, &mut rng, 2 << 20);
    let tap = Tap::start(d, &[("a", &paths[0]), ("b", &paths[1]), ("c", &paths[2])]);
    let fleece = d.join("fleece.bin");
    let archive = d.join("vm.vma");
    let pipe = Pipeline::start(
        &tap,
        &archive,
        &["--buffer", "64K", "--fleecing", fleece.to_str().unwrap()],
        &d.join("instant"),
    );
    let mut expected = snapshot.clone();
    let mut writers = Vec::new();
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        let ops: Vec<Op> = (0..16).map(|_| Op::random(&mut rng, 2 << 20)).collect();
        for op in &ops {
            op.apply(&mut expected[i]);
        }
        let cmds: Vec<String> = ops.iter().map(Op::command).collect();
        writers.push((name, tap.qemu_io_spawn(name, &cmds)));
    }
    for (name, w) in writers {
        assert_qemu_io_ok(&w.wait_with_output().unwrap(), name);
    }
    let ((bst, berr), (est, eerr)) = pipe.finish();
    assert!(bst.success() && est.success(), "{berr}\n{eerr}");
    assert!(
        berr.lines()
            .any(|l| l.starts_with("cbw-tap backup: fleecing: ")),
        "nothing went through the fleecing file:\n{berr}"
    );
    assert!(!fleece.exists());
    decode(&archive, &d.join("out"));
    for (i, n) in ["a", "b", "c"].iter().enumerate() {
        let r = fs::read(d.join("out").join(format!("disk-{n}.raw"))).unwrap();
        assert!(
            same(&r, &snapshot[i]),
            "{n}: {}",
            first_diff(&r, &snapshot[i])
        );
        assert!(
            same(&fs::read(&paths[i]).unwrap(), &expected[i]),
            "{n} lost a write"
        );
    }
}

#[test]
fn malformed_nbd_traffic_leaves_the_server_running_and_images_intact() {
    let mut rng = Rng::new(9);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size = 1 << 20;
    let (paths, data) = images(d, &mut rng, size);
    let tap = Tap::start(d, &[("a", &paths[0]), ("b", &paths[1]), ("c", &paths[2])]);

    // Garbage instead of client flags.
    let mut s = UnixStream::connect(&tap.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert!(closed(&mut s));
    // An unknown option is refused, the connection stays usable.
    let mut s = UnixStream::connect(&tap.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&0x7777u32.to_be_bytes());
    opt.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&opt).unwrap();
    let mut rep = [0u8; 20];
    s.read_exact(&mut rep).unwrap();
    assert_eq!(
        u32::from_be_bytes(rep[12..16].try_into().unwrap()),
        0x8000_0001
    ); // ERR_UNSUP
    drop(s);
    // Out of range and oversized requests get errors.
    let mut s = nbd_connect(&tap.sock, "b");
    s.write_all(&nbd_request(1, size - 10, 100)).unwrap(); // WRITE past the end
    s.write_all(&[0xee; 100]).unwrap();
    assert_eq!(nbd_reply(&mut s), 28); // ENOSPC
    s.write_all(&nbd_request(0, size, 1)).unwrap(); // READ past the end
    assert_eq!(nbd_reply(&mut s), 22); // EINVAL
    s.write_all(&nbd_request(4, 0, 0)).unwrap(); // zero-length TRIM
    assert_eq!(nbd_reply(&mut s), 22);
    s.write_all(&nbd_request(0x55, 0, 512)).unwrap(); // unknown command
    assert_eq!(nbd_reply(&mut s), 22);
    // A 64 MiB write: refused, its payload skipped; then a bad magic closes.
    s.write_all(&nbd_request(1, 0, 64 << 20)).unwrap();
    let junk = vec![0xdd; 1 << 20];
    for _ in 0..64 {
        s.write_all(&junk).unwrap();
    }
    assert_eq!(nbd_reply(&mut s), 22);
    s.write_all(b"\xde\xad\xbe\xef not a request at all....")
        .unwrap();
    assert!(closed(&mut s));
    // A client vanishing in the middle of a write's payload writes nothing.
    let mut s = nbd_connect(&tap.sock, "c");
    s.write_all(&nbd_request(1, 4096, 65536)).unwrap();
    s.write_all(&[0xcc; 1000]).unwrap();
    drop(s);
    // ... and one vanishing in the middle of a request header.
    let mut s = nbd_connect(&tap.sock, "a");
    s.write_all(&nbd_request(1, 0, 512)[..10]).unwrap();
    drop(s);

    // Still serving, images untouched, and a backup of them is exact.
    let out = tap.qemu_io("a", &["read 0 4096".to_string()]);
    assert_qemu_io_ok(&out, "read after malformed traffic");
    for (i, p) in paths.iter().enumerate() {
        assert!(same(&fs::read(p).unwrap(), &data[i]), "image {i} changed");
    }
    let archive = d.join("vm.vma");
    let ((bst, berr), (est, eerr)) = Pipeline::start(&tap, &archive, &[], &d.join("i")).finish();
    assert!(bst.success() && est.success(), "{berr}\n{eerr}");
    decode(&archive, &d.join("out"));
    for (i, n) in ["a", "b", "c"].iter().enumerate() {
        let r = fs::read(d.join("out").join(format!("disk-{n}.raw"))).unwrap();
        assert!(same(&r, &data[i]), "{n}");
    }
}

#[test]
fn real_clients_and_clean_shutdown() {
    let mut rng = Rng::new(11);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = d.join("disk.raw");
    let data = make_image(&p, 3 << 20, &mut rng);
    // A free TCP port on the loopback interface.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tcp = format!("127.0.0.1:{port}");
    let mut tap = Tap::start_with(d, &[("disk", &p)], &["--tcp", &tcp]);
    // Over TCP too, only because it was asked for.
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            &format!("nbd://{tcp}/disk"),
            "-c",
            "read -v 0 16",
        ])
        .output()
        .unwrap();
    assert_qemu_io_ok(&out, "qemu-io over TCP");
    let first: String = data[..16].iter().map(|b| format!("{b:02x} ")).collect();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(first.trim_end()),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // nbdcopy reads it back exactly; qemu-img compares equal.
    let copy = d.join("copy.raw");
    let st = Command::new("nbdcopy")
        .arg(tap.uri("disk"))
        .arg(&copy)
        .status()
        .expect("nbdcopy (libnbd-bin) must be installed");
    assert!(st.success());
    assert!(same(&fs::read(&copy).unwrap(), &data));
    let st = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&p)
        .arg(tap.uri("disk"))
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stdout)
    );
    let info = Command::new("nbdinfo")
        .arg(tap.uri("disk"))
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(info.contains("can_multi_conn: true"), "{info}");
    // SIGTERM: exit 0, sockets removed.
    let st = Command::new("kill")
        .arg("-TERM")
        .arg(tap.child.id().to_string())
        .status()
        .unwrap();
    assert!(st.success());
    let st = tap.child.wait().unwrap();
    assert!(st.success(), "{st}");
    assert!(!tap.sock.exists() && !tap.ctl.exists());
}

#[test]
fn hooks_run_around_the_instant_and_a_failed_pre_hook_makes_no_backup() {
    let mut rng = Rng::new(13);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = d.join("disk.raw");
    make_image(&p, 1 << 20, &mut rng);
    let tap = Tap::start(d, &[("disk", &p)]);
    let log = d.join("hooks.log");
    let backup = |pre: &str| {
        Command::new(common::bin("cbw-tap"))
            .args(["backup", "--control"])
            .arg(&tap.ctl)
            .arg("--pre")
            .arg(pre)
            .arg("--post")
            .arg(format!("echo post $CBW_TAP_HOOK >> '{}'", log.display()))
            .stdout(Stdio::piped())
            .output()
            .unwrap()
    };
    let out = backup("echo this goes to stderr; exit 7");
    assert_eq!(out.status.code(), Some(3));
    assert!(out.stdout.is_empty(), "no stream without the instant");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err,
        "this goes to stderr\ncbw-tap backup: pre hook `echo this goes to stderr; exit 7` failed (exit status: 7)\n"
    );
    // The post hook (e.g. a thaw) ran anyway; the server is not busy.
    assert_eq!(fs::read_to_string(&log).unwrap(), "post post\n");
    let out = backup(&format!("echo pre $CBW_TAP_HOOK >> '{}'", log.display()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        fs::read_to_string(&log).unwrap(),
        "post post\npre pre\npost post\n"
    );
    // What came out is a complete cluster stream of the disk.
    let mut rd = vma_format::stream::StreamReader::new(&out.stdout[..]).unwrap();
    let mut n = 0;
    while rd.next_cluster().unwrap().is_some() {
        n += 1;
    }
    assert_eq!(n, 16);
}

#[test]
fn command_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let run = |args: &[&str]| {
        let out = Command::new(common::bin("cbw-tap"))
            .args(args)
            .stdout(Stdio::piped())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let sock = d.join("s").display().to_string();
    let img = d.join("x.raw");
    fs::write(&img, [1u8; 4096]).unwrap();
    let ximg = format!("x={}", img.display());
    let (code, err) = run(&["serve", "--socket", &sock, "../x=/dev/null"]);
    assert_eq!(code, Some(2));
    assert_eq!(
        err,
        "cbw-tap serve: export \"../x\": name \"../x\" contains '/'\n"
    );
    let (code, err) = run(&["serve", "--socket", &sock, "vmstate=/dev/null"]);
    assert_eq!(code, Some(2));
    assert_eq!(
        err,
        "cbw-tap serve: export \"vmstate\": the name is reserved for VM state\n"
    );
    let (code, err) = run(&["serve", "--socket", &sock, &ximg, &ximg.replace("x=", "y=")]);
    assert_eq!(code, Some(2));
    assert_eq!(
        err,
        format!(
            "cbw-tap serve: {}: the same image is given twice\n",
            img.display()
        )
    );
    let missing = d.join("missing.raw");
    let (code, err) = run(&[
        "serve",
        "--socket",
        &sock,
        &format!("m={}", missing.display()),
    ]);
    assert_eq!(code, Some(3));
    assert_eq!(
        err,
        format!(
            "cbw-tap serve: {}: No such file or directory (os error 2)\n",
            missing.display()
        )
    );
    let (code, err) = run(&["backup", "--control", &sock]);
    assert_eq!(code, Some(3));
    assert_eq!(
        err,
        format!("cbw-tap backup: {sock}: cannot connect: No such file or directory (os error 2)\n")
    );
    let (code, err) = run(&["backup", "--control", &sock, "--buffer", "1K"]);
    assert_eq!(code, Some(2));
    assert_eq!(
        err,
        "cbw-tap backup: --buffer must be at least 65536 bytes\n"
    );
}

#[test]
fn example_live_backup() {
    common::run_example("live-backup.sh");
}

/// Issue 8, item 10: a served image carries QEMU's image locks, so QEMU's
/// tools refuse to write it behind copy-before-write's back (with their
/// usual error), a second `cbw-tap serve` and an image qemu-nbd writes are
/// refused with one line, readers share it as with a running VM, and the
/// locks die with the server (even `kill -9`).
#[test]
fn served_images_carry_qemus_image_locks() {
    let mut rng = Rng::new(41);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = d.join("disk.raw");
    let data = make_image(&p, 1 << 20, &mut rng);
    let mut tap = Tap::start(d, &[("disk", &p)]);
    let direct = |args: &[&str]| {
        Command::new(args[0])
            .args(&args[1..])
            .arg(&p)
            .output()
            .unwrap()
    };
    let refused = |out: &Output, what: &str| {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what} was not refused: {err}");
        assert!(
            err.contains("Failed to get \"write\" lock")
                && err.contains("Is another process using the image"),
            "{what}: {err}"
        );
    };
    refused(
        &direct(&["qemu-io", "-f", "raw", "-c", "write -P 0x77 0 4096"]),
        "qemu-io write",
    );
    refused(
        &direct(&["qemu-img", "bench", "-w", "-c", "1", "-f", "raw"]),
        "qemu-img bench -w",
    );
    let out = Command::new("qemu-img")
        .args(["resize", "-f", "raw"])
        .arg(&p)
        .arg("2M")
        .output()
        .unwrap();
    refused(&out, "qemu-img resize");
    assert!(same(&fs::read(&p).unwrap(), &data), "the image was written");
    // Readers share the image, as with a running VM's disk.
    let out = direct(&["qemu-io", "-f", "raw", "-r", "-c", "read 0 4096"]);
    assert!(out.status.success(), "{out:?}");

    // A second server on the same image: one line, exit 3. Bounded by
    // timeout(1): should it serve after all, the test fails (exit 124)
    // instead of waiting for it forever.
    let second = |sock: &str| {
        Command::new("timeout")
            .arg("60")
            .arg(common::bin("cbw-tap"))
            .args(["serve", "--socket"])
            .arg(d.join(sock))
            .arg(format!("disk={}", p.display()))
            .output()
            .unwrap()
    };
    let want = format!(
        "cbw-tap serve: {}: the image is in use: another process holds QEMU's \"write\" lock on it (a VM, qemu-nbd, qemu-io, qemu-img or another cbw-tap serve); stop it before serving the image\n",
        p.display()
    );
    let out = second("two.sock");
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&out.stderr), want);
    assert!(!d.join("two.sock").exists());

    // Writes through the server still work.
    let out = tap.qemu_io("disk", &["write -P 0x5c 8192 4096".to_string()]);
    assert_qemu_io_ok(&out, "write through cbw-tap");

    // kill -9: the locks go with the process.
    tap.child.kill().unwrap();
    tap.child.wait().unwrap();
    let out = direct(&["qemu-io", "-f", "raw", "-c", "write -P 0x66 0 512"]);
    assert!(out.status.success(), "{out:?}");

    // An image qemu-nbd serves for writing is refused too.
    let qsock = d.join("qemu-nbd.sock");
    let qemu_nbd_log = d.join("qemu-nbd.log");
    let mut qemu_nbd = Command::new("qemu-nbd")
        .args(["-f", "raw", "-k"])
        .arg(&qsock)
        .arg(&p)
        .stderr(fs::File::create(&qemu_nbd_log).unwrap())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !qsock.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "qemu-nbd did not start"
        );
        thread::sleep(Duration::from_millis(10));
    }
    let out = second("three.sock");
    // The refusal means something only while qemu-nbd holds the image.
    assert!(
        qemu_nbd.try_wait().unwrap().is_none(),
        "qemu-nbd exited early: {}",
        fs::read_to_string(&qemu_nbd_log).unwrap_or_default()
    );
    qemu_nbd.kill().unwrap();
    qemu_nbd.wait().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&out.stderr), want);
}

/// Issue 8, item 11: a consumer that is alive but never reads (here: the
/// test holds the pipe and reads nothing, like `| sleep 1000`). A guest
/// write's copy times out, the server aborts the backup and gives up on
/// the connection; `cbw-tap backup` then exits 3 on its own instead of
/// staying blocked on stdout.
#[test]
fn a_stuck_consumer_cannot_hold_the_backup_client_after_the_server_aborts() {
    let mut rng = Rng::new(43);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size = 16 << 20;
    let (paths, _) = images(d, &mut rng, size);
    let tap = Tap::start(d, &[("a", &paths[0]), ("b", &paths[1]), ("c", &paths[2])]);
    let mut backup = spawn_backup(
        &tap,
        &["--cbw-timeout", "1", "--buffer", "256K"],
        &d.join("instant"),
    );
    wait_for_instant(&d.join("instant"), &mut backup);
    let stuck_stdout = backup.stdout.take().unwrap(); // never read
    let aborted = |log: &str| {
        log.lines().any(|l| {
            l.starts_with("cbw-tap serve: backup of ")
                && l.ends_with(
                    "aborted: copy-before-write on c timed out after 1 s (the consumer does not keep up)",
                )
        })
    };
    // Writes to clusters of c the stalled reader has not reached, until one
    // has to wait for room, times out and breaks the snapshot.
    // (The server logs the abort once it has given up on the consumer, a
    // few seconds later; each write gets time for that.)
    let mut n = 0;
    'writes: loop {
        assert!(n < 8, "no write waited for its copy");
        let off = size - (n + 1) * CS;
        let out = tap.qemu_io("c", &[format!("write -P 0x33 {off} 4096")]);
        assert_qemu_io_ok(&out, "guest write");
        n += 1;
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(15) {
            if aborted(&fs::read_to_string(&tap.log).unwrap()) {
                break 'writes;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
    // The client ends by itself (the deadline only keeps a broken build
    // from hanging the test run).
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = backup.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(120) {
            let _ = backup.kill();
            panic!("cbw-tap backup is still blocked on its stuck consumer");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    backup
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(3), "{err}");
    assert_eq!(
        err.lines().last().unwrap(),
        format!(
            "cbw-tap backup: {}: the server closed the connection before the end of the stream while stdout was blocked (the consumer does not read): backup aborted",
            tap.ctl.display()
        ),
        "{err}"
    );
    drop(stuck_stdout);
    // The server is free for the next backup.
    let archive = d.join("vm.vma");
    let ((bst, berr), (est, eerr)) = Pipeline::start(&tap, &archive, &[], &d.join("i2")).finish();
    assert!(bst.success() && est.success(), "{berr}\n{eerr}");
}

/// Peak resident memory of process `pid`, in KiB (VmHWM).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM in /proc/PID/status");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Issue 8, item 15, as a user sees it: 24 clients each with a 32 MiB read
/// under way that they do not read used to take 786 MiB of the server;
/// now replies go out in 256 KiB pieces.
#[test]
fn clients_holding_large_reads_do_not_blow_up_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = d.join("disk.raw");
    let f = fs::File::create(&p).unwrap();
    f.set_len(32 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&[0x61; 4096], 0).unwrap();
    let tap = Tap::start(d, &[("disk", &p)]);
    let clients: Vec<UnixStream> = (0..24)
        .map(|_| {
            let mut s = nbd_connect(&tap.sock, "disk");
            s.write_all(&nbd_request(0, 0, 32 << 20)).unwrap();
            let mut hdr = [0u8; 16];
            s.read_exact(&mut hdr).unwrap(); // the reply has started
            assert_eq!(u32::from_be_bytes(hdr[4..8].try_into().unwrap()), 0);
            s
        })
        .collect();
    let peak = peak_rss_kib(tap.child.id());
    eprintln!("cbw-tap serve with 24 × 32 MiB reads under way: peak RSS {peak} KiB");
    assert!(peak < 96 * 1024, "peak RSS {peak} KiB");
    drop(clients);
    let out = tap.qemu_io("disk", &["read -P 0x61 0 4096".to_string()]);
    assert_qemu_io_ok(&out, "read after the big readers left");
}

/// `Cpus_allowed_list` of a process or thread (`/proc/…/status`).
fn cpus_allowed(status: &Path) -> String {
    fs::read_to_string(status)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn cpus_bind_the_backup_threads_and_the_consumer_only() {
    let mut rng = Rng::new(31);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("a.raw");
    let data = make_image(&img, 4 << 20, &mut rng);
    let tap = Tap::start(d, &[("a", &img)]);
    let everywhere = cpus_allowed(Path::new("/proc/self/status"));
    // The last CPU we may use (the whole list on a 1-CPU machine).
    let cpu = everywhere.rsplit([',', '-']).next().unwrap().to_string();
    let (seen, go, archive) = (d.join("seen"), d.join("go"), d.join("vm.vma"));
    // A consumer that notes where it may run, then takes nothing until
    // told: meanwhile the server's backup threads are there to look at.
    // (It gives up after 30 s, should the test fail before it tells it.)
    let script = format!(
        "grep ^Cpus_allowed_list: /proc/$$/status > '{}'; i=0; while [ ! -e '{}' ]; do [ $i -lt 3000 ] || exit 1; i=$((i+1)); sleep 0.01; done; exec '{}' -o '{}' -",
        seen.display(),
        go.display(),
        common::bin("vma-encode").display(),
        archive.display()
    );
    let backup = Command::new(common::bin("cbw-tap"))
        .args(["backup", "--control"])
        .arg(&tap.ctl)
        .args([
            "--cpus", &cpu, "--buffer", "256K", "--", "sh", "-c", &script,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let serve = PathBuf::from(format!("/proc/{}/task", tap.child.id()));
    let threads = |name: &str| -> Vec<PathBuf> {
        fs::read_dir(&serve)
            .unwrap()
            .filter_map(|t| {
                let t = t.unwrap().path();
                let comm = fs::read_to_string(t.join("comm")).ok()?;
                (comm.trim() == name).then(|| t.join("status"))
            })
            .collect()
    };
    let t0 = Instant::now();
    while !seen.exists() || threads("cbw-reader").is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(20), "no backup threads");
        thread::sleep(Duration::from_millis(10));
    }
    // The reader and the stream writer are bound once they start.
    thread::sleep(Duration::from_millis(200));
    for name in ["cbw-reader", "cbw-backup"] {
        let found = threads(name);
        assert_eq!(found.len(), 1, "{name}");
        assert_eq!(cpus_allowed(&found[0]), cpu, "{name}");
    }
    // The threads serving guests are not.
    for name in ["nbd-accept", "cbw-control"] {
        for t in threads(name) {
            assert_eq!(cpus_allowed(&t), everywhere, "{name}");
        }
    }
    assert_eq!(
        fs::read_to_string(&seen).unwrap().split_whitespace().nth(1),
        Some(cpu.as_str())
    );
    fs::write(&go, "").unwrap();
    let out = backup.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    decode(&archive, &d.join("out"));
    assert!(same(&fs::read(d.join("out/disk-a.raw")).unwrap(), &data));

    // CPUs we may not use are refused before anything starts, by name.
    let out = Command::new(common::bin("cbw-tap"))
        .args(["backup", "--control"])
        .arg(&tap.ctl)
        .args(["--cpus", "1023"])
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "cbw-tap backup: --cpus 1023: CPU 1023 is not available (this process may use CPUs {everywhere})\n"
        )
    );
    let out = Command::new(common::bin("cbw-tap"))
        .args(["backup", "--control"])
        .arg(&tap.ctl)
        .args(["--cpus", "2-1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with(
            "error: invalid value '2-1' for '--cpus <LIST>': \"2-1\": a range must not end below its start\n"
        ),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
