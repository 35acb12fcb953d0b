//! Proxmox restores through our tools: `vma-decode` called as `vma` is
//! Proxmox's `vma` (list, config, verify print exactly EXPECTED.txt), and
//! `vma extract -v -r FIFO - DIR` is driven exactly as qmrestore's
//! `restore_vma_archive` drives it: a FIFO made first, the command's output
//! read line by line, the map written into the FIFO only after the `CTIME:`
//! line (once `qemu-server.conf` can be read from DIR), ending with `done`.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{bin, fixtures, sha256_file};

/// A directory with `vma` as a symlink to vma-decode.
fn vma_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(bin("vma-decode"), d.path().join("vma")).unwrap();
    d
}

fn vma(dir: &Path, args: &[&str]) -> Output {
    Command::new(dir.join("vma"))
        .env("TZ", "UTC")
        .current_dir(fixtures().join("pve"))
        .args(args)
        .output()
        .unwrap()
}

/// One command's section in EXPECTED.txt.
#[derive(Debug, Default, Clone)]
struct Run {
    code: i32,
    stdout: Vec<String>,
    stderr: Vec<String>,
}

/// EXPECTED.txt: archive → command (as after `vma `, e.g. `verify -v
/// full.vma`) → what it printed; and archive → config name → sha256.
/// Per archive: command → run, config → sha256, extracted file → sha256.
type Expected = (
    BTreeMap<String, BTreeMap<String, Run>>,
    BTreeMap<String, BTreeMap<String, String>>,
    BTreeMap<String, BTreeMap<String, String>>,
);

fn expected() -> Expected {
    let text = fs::read_to_string(fixtures().join("pve/EXPECTED.txt")).unwrap();
    let mut runs: BTreeMap<String, BTreeMap<String, Run>> = BTreeMap::new();
    let mut configs: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut files: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut archive = String::new();
    let mut command = String::new();
    let mut block = "";
    for line in text.lines() {
        if let Some(a) = line.strip_prefix("ARCHIVE ") {
            archive = a.trim().to_string();
            continue;
        }
        if archive.is_empty() {
            continue;
        }
        if let Some(cmd) = line.strip_prefix("$ ") {
            let (cmd, code) = cmd.split_once("   -> exit code ").unwrap();
            command = cmd
                .trim_start_matches("TZ=UTC ")
                .trim_start_matches("vma ")
                .to_string();
            runs.entry(archive.clone()).or_default().insert(
                command.clone(),
                Run {
                    code: code.trim().parse().unwrap(),
                    ..Run::default()
                },
            );
            block = "";
            continue;
        }
        if let Some(rest) = line.strip_prefix("    ") {
            let run = runs.get_mut(&archive).and_then(|r| r.get_mut(&command));
            match (block, run) {
                ("stdout", Some(r)) => r.stdout.push(rest.to_string()),
                ("stderr", Some(r)) => r.stderr.push(rest.to_string()),
                ("files", _) => {
                    let parts: Vec<_> = rest.split_whitespace().collect();
                    files
                        .entry(archive.clone())
                        .or_default()
                        .insert(parts[2].to_string(), parts[0].to_string());
                }
                _ => {}
            }
            if let Some(c) = rest.strip_prefix("vma config -c ") {
                let (name, tail) = c.split_once(": exit 0, stdout sha256 ").unwrap();
                configs.entry(archive.clone()).or_default().insert(
                    name.to_string(),
                    tail.split(' ').next().unwrap().to_string(),
                );
            }
            continue;
        }
        let l = line.trim();
        block = if l == "stdout:" {
            "stdout"
        } else if l == "stderr:" {
            "stderr"
        } else if l.starts_with("extracted files") {
            "files"
        } else {
            ""
        };
    }
    (runs, configs, files)
}

/// Our output lines against EXPECTED's, where `[N 'progress ...' lines
/// collapsed; first: 'A'; last: 'B']` stands for N progress lines from A to B.
/// The `duration D sec` of a progress line is a clock reading (Proxmox's own
/// varies there), so only its form is compared.
fn matches_expected(got: &[String], want: &[String]) -> Result<(), String> {
    let norm = |l: &str| -> String {
        match l.split_once("duration ") {
            Some((head, tail)) if tail.ends_with(" sec)") => {
                let n = &tail[..tail.len() - 5];
                assert!(n.chars().all(|c| c.is_ascii_digit()), "{l}");
                format!("{head}duration D sec)")
            }
            _ => l.to_string(),
        }
    };
    let mut g = got.iter();
    for w in want {
        if let Some(spec) = w.strip_prefix('[').and_then(|w| w.strip_suffix(']')) {
            let (n, rest) = spec
                .split_once(" 'progress ...' lines collapsed; first: '")
                .unwrap();
            let (first, last) = rest.split_once("'; last: '").unwrap();
            let last = last.strip_suffix('\'').unwrap();
            let n: usize = n.parse().unwrap();
            let lines: Vec<&String> = g.by_ref().take(n).collect();
            if lines.len() != n
                || !lines.iter().all(|l| l.starts_with("progress "))
                || norm(lines[0]) != norm(first)
                || norm(lines[n - 1]) != norm(last)
            {
                return Err(format!("progress lines differ: {lines:?} vs {w}"));
            }
            continue;
        }
        match g.next() {
            Some(l) if norm(l) == norm(w) => {}
            other => return Err(format!("{other:?} instead of {w:?}")),
        }
    }
    match g.next() {
        None => Ok(()),
        Some(extra) => Err(format!("extra line {extra:?}")),
    }
}

fn lines(b: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(b)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn list_config_verify_through_the_vma_name_equal_expected() {
    let d = vma_dir();
    let (runs, configs, _) = expected();
    assert_eq!(runs.len(), 4);
    let mut checked = 0;
    for (archive, commands) in &runs {
        for (cmd, want) in commands {
            if cmd.starts_with("extract ") {
                continue;
            }
            let args: Vec<&str> = cmd.split(' ').collect();
            let o = vma(d.path(), &args);
            assert_eq!(o.status.code(), Some(want.code), "{archive}: vma {cmd}");
            matches_expected(&lines(&o.stdout), &want.stdout)
                .unwrap_or_else(|e| panic!("{archive}: vma {cmd}: stdout: {e}"));
            assert_eq!(
                lines(&o.stderr),
                want.stderr,
                "{archive}: vma {cmd}: stderr"
            );
            checked += 1;
        }
        for (name, sha) in &configs[archive] {
            let o = vma(d.path(), &["config", archive, "-c", name]);
            assert_eq!(o.status.code(), Some(0));
            let t = tempfile::NamedTempFile::new().unwrap();
            fs::write(t.path(), &o.stdout).unwrap();
            assert_eq!(
                &sha256_file(t.path()),
                sha,
                "{archive}: vma config -c {name}"
            );
            // The default config is qemu-server.conf, and options may come first.
            if name == "qemu-server.conf" {
                let o2 = vma(d.path(), &["config", archive]);
                let o3 = vma(d.path(), &["config", "-c", name, archive]);
                assert!(o2.stdout == o.stdout && o3.stdout == o.stdout);
            }
        }
    }
    assert_eq!(checked, 12, "list, verify, verify -v for 4 archives");
}

#[test]
fn vma_name_exit_convention_and_usage() {
    let d = vma_dir();
    let o = vma(d.path(), &["config", "one-disk.vma", "-c", "nope.conf"]);
    assert_eq!(o.status.code(), Some(255));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "unable to find configuration data 'nope.conf'\n"
    );
    assert!(o.stdout.is_empty());
    for args in [
        &[][..],
        &["help"],
        &["list"],
        &["list", "-x", "a"],
        &["verify", "-h"],
    ] {
        let o = vma(d.path(), args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert!(
            String::from_utf8_lossy(&o.stdout)
                .starts_with("usage: vma command [command options]\n"),
            "{args:?}"
        );
    }
    // A damaged archive: one line, exit 1 (Proxmox's tool aborts there).
    let tmp = tempfile::tempdir().unwrap();
    let mut bytes = fs::read(fixtures().join("pve/full.vma")).unwrap();
    bytes[13824 + 100] ^= 1; // inside the first extent header (EXPECTED: @13824)
    let bad = tmp.path().join("bad.vma");
    fs::write(&bad, &bytes).unwrap();
    let o = vma(d.path(), &["verify", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(lines(&o.stderr).len(), 1, "{:?}", lines(&o.stderr));
    // extract without -r prints Proxmox's DEVINFO lines.
    let out = tmp.path().join("OUT");
    let o = vma(
        d.path(),
        &["extract", "one-disk.vma", out.to_str().unwrap()],
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!(
            "DEVINFO {}/tmp-disk-drive-scsi0.raw 1061376\n",
            out.display()
        )
    );
}

/// A loop device over a file, detached when dropped.
struct LoopDevice(PathBuf);

impl LoopDevice {
    fn attach(file: &Path) -> Result<LoopDevice, String> {
        if !Path::new("/dev/loop-control").exists() {
            return Err("no /dev/loop-control".into());
        }
        let o = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .map_err(|e| format!("losetup: {e}"))?;
        if !o.status.success() {
            return Err(format!(
                "losetup -f --show failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        Ok(LoopDevice(PathBuf::from(
            String::from_utf8_lossy(&o.stdout).trim(),
        )))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// What a qmrestore-style run saw.
struct Restore {
    code: Option<i32>,
    stdout: Vec<String>,
    stderr: String,
    /// qemu-server.conf as read from DIR when `CTIME:` arrived.
    config_at_ctime: Option<Vec<u8>>,
    /// DEV: lines parsed with qmrestore's regex: name → (dev_id, size).
    devinfo: BTreeMap<String, (u32, u64)>,
}

/// Runs `vma extract -v -r FIFO - TMPDIR` as `restore_vma_archive` does
/// and, on `CTIME:`, writes `map` (then `done` unless `no_done`).
fn qmrestore(vma: &Path, work: &Path, archive: &[u8], map: &[String], no_done: bool) -> Restore {
    let tmpdir = work.join("vzdumptmp4242");
    let _ = fs::remove_dir_all(&tmpdir);
    let fifo = work.join("vzdumptmp4242.fifo");
    let _ = fs::remove_file(&fifo);
    // POSIX::mkfifo($mapfifo, 0600)
    let st = Command::new("mkfifo")
        .args(["-m", "0600"])
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(st.success(), "mkfifo");

    let mut child = Command::new(vma)
        .args(["extract", "-v", "-r"])
        .arg(&fifo)
        .arg("-")
        .arg(&tmpdir)
        .env("TZ", "UTC")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = archive.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let mut err_pipe = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        s
    });
    // qmrestore's afterfork: open the FIFO for writing (it blocks until the
    // command opens it for reading) — on a thread, so that a command that
    // fails before opening it cannot hang the test.
    let fifo_w = fifo.clone();
    let opener = std::thread::spawn(move || fs::OpenOptions::new().write(true).open(fifo_w));

    let mut out = Restore {
        code: None,
        stdout: Vec::new(),
        stderr: String::new(),
        config_at_ctime: None,
        devinfo: BTreeMap::new(),
    };
    let mut opener = Some(opener);
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        // m/^DEV:\sdev_id=(\d+)\ssize:\s(\d+)\sdevname:\s(\S+)$/
        if let Some(rest) = line.strip_prefix("DEV: dev_id=") {
            let (id, rest) = rest.split_once(" size: ").unwrap();
            let (size, name) = rest.split_once(" devname: ").unwrap();
            assert!(!name.is_empty() && !name.contains(char::is_whitespace));
            out.devinfo.insert(
                name.to_string(),
                (id.parse().unwrap(), size.parse().unwrap()),
            );
        } else if line.starts_with("CTIME: ") {
            out.config_at_ctime = fs::read(tmpdir.join("qemu-server.conf")).ok();
            let mut f = opener.take().unwrap().join().unwrap().unwrap();
            // A command that gives up on a bad line closes the FIFO: later
            // writes fail (qmrestore dies of SIGPIPE there); its own exit
            // status and message are what count.
            let mut lines: Vec<String> = map.to_vec();
            if !no_done {
                lines.push("done".into());
            }
            for m in lines {
                if writeln!(f, "{m}").is_err() {
                    break;
                }
            }
            drop(f);
        }
        out.stdout.push(line);
    }
    out.code = child.wait().unwrap().code();
    feeder.join().unwrap();
    out.stderr = err_reader.join().unwrap();
    if let Some(o) = opener {
        // The command never reached CTIME: unblock the opener.
        let _r = fs::OpenOptions::new()
            .read(true)
            .custom_flags(0o4000) // O_NONBLOCK
            .open(&fifo);
        let _ = o.join();
    }
    let _ = fs::remove_file(&fifo);
    out
}

/// A file of `size` bytes, all `fill` (sparse when `fill` is 0).
fn target_file(path: &Path, size: u64, fill: u8) {
    if fill == 0 {
        let f = fs::File::create(path).unwrap();
        f.set_len(size).unwrap();
    } else {
        fs::write(path, vec![fill; size as usize]).unwrap();
    }
}

fn sha_prefix(path: &Path, len: u64) -> String {
    let mut buf = vec![0u8; len as usize];
    fs::File::open(path).unwrap().read_exact(&mut buf).unwrap();
    let t = tempfile::NamedTempFile::new().unwrap();
    fs::write(t.path(), &buf).unwrap();
    sha256_file(t.path())
}

#[test]
fn qmrestore_drives_a_map_restore_onto_files_a_loop_device_and_a_skip() {
    let d = vma_dir();
    let work = tempfile::tempdir().unwrap();
    let (runs, _, files) = expected();
    let archive = fs::read(fixtures().join("pve/multi-disk.vma")).unwrap();
    let want_sha = &files["multi-disk.vma"];

    // drive-scsi0: a file full of junk, zeros to be written (1), with the
    // throttling options qmrestore adds for a storage with a limit.
    let scsi0 = work.path().join("vm-100-disk-0.raw");
    target_file(&scsi0, 1061376, 0xee);
    // drive-virtio1: a sparse file that reads as zeros (0).
    let virtio1 = work.path().join("vm-100-disk-1.raw");
    target_file(&virtio1, 8388608, 0);
    // drive-sata2: a loop block device full of junk, zeros written (1).
    let backing = work.path().join("loop-backing.img");
    target_file(&backing, 262144, 0xdd);
    let loopdev = LoopDevice::attach(&backing);
    let sata2 = match &loopdev {
        Ok(l) => l.0.clone(),
        Err(why) => {
            println!("loop device target skipped: {why}; using a file instead");
            backing.clone()
        }
    };
    let map = vec![
        format!(
            "throttling.bps=1099511627776:throttling.group=local-lvm:format=raw:1:drive-scsi0={}",
            scsi0.display()
        ),
        format!("format=raw:0:drive-virtio1={}", virtio1.display()),
        format!("format=raw:1:drive-sata2={}", sata2.display()),
        "skip=drive-ide0".to_string(),
    ];
    let r = qmrestore(&d.path().join("vma"), work.path(), &archive, &map, false);
    assert_eq!(
        r.code,
        Some(0),
        "stderr: {}\nstdout: {:?}",
        r.stderr,
        r.stdout
    );
    assert_eq!(r.stderr, "");

    // qemu-server.conf was in DIR when CTIME: came.
    let conf = vma(d.path(), &["config", "multi-disk.vma"]).stdout;
    assert_eq!(conf.len(), 832);
    assert_eq!(r.config_at_ctime, Some(conf));
    assert_eq!(
        r.devinfo,
        BTreeMap::from([
            ("drive-scsi0".to_string(), (1, 1061376)),
            ("drive-virtio1".to_string(), (2, 8388608)),
            ("drive-sata2".to_string(), (3, 262144)),
            ("drive-ide0".to_string(), (4, 4608)),
        ])
    );
    // The printed lines are Proxmox's: the listing, then (-v) the same
    // progress and statistics lines as `vma verify -v` (a skipped device's
    // clusters are counted, as Proxmox counts them).
    let verify_v = &runs["multi-disk.vma"]["verify -v multi-disk.vma"];
    matches_expected(&r.stdout, &verify_v.stdout).unwrap();

    // Every target byte-identical to the normal extract.
    assert_eq!(sha256_file(&scsi0), want_sha["disk-drive-scsi0.raw"]);
    assert_eq!(sha256_file(&virtio1), want_sha["disk-drive-virtio1.raw"]);
    assert_eq!(sha_prefix(&sata2, 262144), want_sha["disk-drive-sata2.raw"]);
    // The sparse target stayed sparse: zero blocks were not written.
    use std::os::unix::fs::MetadataExt;
    assert!(fs::metadata(&virtio1).unwrap().blocks() * 512 < 1 << 20);
    // Nothing of the skipped device anywhere; DIR holds the configs only.
    let mut names: Vec<_> = fs::read_dir(work.path().join("vzdumptmp4242"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["pve-firewall.fw", "qemu-server.conf"]);
}

#[test]
fn compressed_input_restores_the_same() {
    let d = vma_dir();
    let work = tempfile::tempdir().unwrap();
    let z = Command::new("zstd")
        .args(["-q", "-c"])
        .arg(fixtures().join("pve/one-disk.vma"))
        .output()
        .expect("zstd");
    let t = work.path().join("t.raw");
    target_file(&t, 1061376, 0x55);
    let map = vec![format!("format=raw:1:drive-scsi0={}", t.display())];
    let r = qmrestore(&d.path().join("vma"), work.path(), &z.stdout, &map, false);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let (_, _, files) = expected();
    assert_eq!(
        sha256_file(&t),
        files["one-disk.vma"]["disk-drive-scsi0.raw"]
    );
}

#[test]
fn bad_maps_fail_before_anything_is_written() {
    let d = vma_dir();
    let work = tempfile::tempdir().unwrap();
    let archive = fs::read(fixtures().join("pve/multi-disk.vma")).unwrap();
    let t = |n: &str| work.path().join(n);
    for (n, size) in [
        ("a", 1061376u64),
        ("b", 8388608),
        ("c", 262144),
        ("e", 4608),
        ("small", 4096),
    ] {
        target_file(&t(n), size, 0x77);
    }
    let ok_rest = |skip_first: bool| {
        let mut v = vec![
            format!("1:drive-virtio1={}", t("b").display()),
            format!("1:drive-sata2={}", t("c").display()),
            format!("1:drive-ide0={}", t("e").display()),
        ];
        if !skip_first {
            v.insert(0, format!("1:drive-scsi0={}", t("a").display()));
        }
        v
    };
    let with = |first: &str| {
        let mut v = vec![first.to_string()];
        v.extend(ok_rest(true));
        v
    };
    let fifo = work.path().join("vzdumptmp4242.fifo");
    let fifo = fifo.display();
    let cases: Vec<(Vec<String>, bool, String)> = vec![
        (
            {
                let mut v = ok_rest(false);
                v.push(format!("1:drive-nope={}", t("a").display()));
                v
            },
            false,
            format!("{fifo}: no device named \"drive-nope\" in <stdin>"),
        ),
        (
            {
                let mut v = ok_rest(false);
                v.push(format!("0:drive-scsi0={}", t("a").display()));
                v
            },
            false,
            format!("{fifo}: line 5: device \"drive-scsi0\" is named twice"),
        ),
        (
            with("format=raw:drive-scsi0=/x"),
            false,
            format!(
                "{fifo}: line 1: parse error: expected 0: or 1: before DEVNAME=PATH (\"format=raw:drive-scsi0=/x\")"
            ),
        ),
        (
            ok_rest(false),
            true,
            format!("{fifo}: ended without 'done' (the writer closed it early)"),
        ),
        (
            ok_rest(true),
            false,
            format!("{fifo}: no device name mapping for drive-scsi0"),
        ),
        (
            with(&format!("1:drive-scsi0={}", t("small").display())),
            false,
            format!(
                "{}: target of drive-scsi0 holds 4096 bytes, the device needs 1061376",
                t("small").display()
            ),
        ),
        (
            with(&format!("format=qcow2:1:drive-scsi0={}", t("a").display())),
            false,
            format!(
                "{fifo}: drive-scsi0: format=qcow2 is not supported: targets are written as raw images (convert with qemu-img after restoring to a raw target)"
            ),
        ),
        (
            with(&format!("cache=fast:1:drive-scsi0={}", t("a").display())),
            false,
            format!("{fifo}: invalid cache option: fast"),
        ),
        (
            with(&format!("1:drive-scsi0={}", t("missing").display())),
            false,
            format!("{}: No such file or directory (os error 2)", t("missing").display()),
        ),
    ];
    for (map, no_done, message) in cases {
        let r = qmrestore(&d.path().join("vma"), work.path(), &archive, &map, no_done);
        assert_eq!(r.code, Some(1), "{map:?}: {}", r.stderr);
        assert_eq!(r.stderr, format!("{message}\n"), "{map:?}");
        // The listing was printed, nothing of a restore.
        assert_eq!(
            r.stdout.last().map(|l| l.starts_with("CTIME: ")),
            Some(true),
            "{:?}",
            r.stdout
        );
        for (n, size) in [
            ("a", 1061376u64),
            ("b", 8388608),
            ("c", 262144),
            ("e", 4608),
            ("small", 4096),
        ] {
            let f = fs::read(t(n)).unwrap();
            assert!(
                f.len() as u64 == size && f.iter().all(|&b| b == 0x77),
                "{n} was written to"
            );
        }
        // Nothing is left in DIR that looks restored.
        let left: Vec<_> = fs::read_dir(work.path().join("vzdumptmp4242"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}

#[test]
fn vma_decode_extract_takes_r_too() {
    // The same protocol under vma-decode's own name: map problems are exit 2.
    let work = tempfile::tempdir().unwrap();
    let archive = fs::read(fixtures().join("pve/one-disk.vma")).unwrap();
    let r = qmrestore(
        &bin("vma-decode"),
        work.path(),
        &archive,
        &["skip=drive-nope".into()],
        false,
    );
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    let t = work.path().join("t.raw");
    target_file(&t, 1061376, 0);
    let r = qmrestore(
        &bin("vma-decode"),
        work.path(),
        &archive,
        &[format!("0:drive-scsi0={}", t.display())],
        false,
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let (_, _, files) = expected();
    assert_eq!(
        sha256_file(&t),
        files["one-disk.vma"]["disk-drive-scsi0.raw"]
    );
}

#[test]
fn a_skipped_device_is_not_checked_for_duplicates() {
    use vma_format::{HeaderBuilder, Writer, WriterOptions};
    // drive-scsi0: 58 clusters (the first extent); drive-ide0: 2 clusters
    // (the second), whose extent then appears twice.
    let mut h = HeaderBuilder::new([4; 16], 0);
    h.add_config("qemu-server.conf", b"memory: 64\n".to_vec())
        .unwrap();
    h.add_device("drive-scsi0", 58 * 65536).unwrap();
    h.add_device("drive-ide0", 2 * 65536).unwrap();
    let mut w = Writer::new(
        Vec::new(),
        &h,
        WriterOptions {
            data_checksums: false,
        },
    )
    .unwrap();
    let disk: Vec<u8> = (0..58 * 65536).map(|i| (i / 4096) as u8 | 1).collect();
    for n in 0..58 {
        w.write_raw(1, n, &disk[n as usize * 65536..(n as usize + 1) * 65536])
            .unwrap();
    }
    for n in 0..2 {
        w.write_raw(2, n, &[9; 65536]).unwrap();
    }
    let mut bytes = w.finish().unwrap();
    let second = bytes.len() - (512 + 2 * 65536);
    let tail = bytes[second..].to_vec();
    bytes.extend_from_slice(&tail);

    let d = vma_dir();
    let work = tempfile::tempdir().unwrap();
    let t = work.path().join("t.raw");
    let e = work.path().join("e.raw");
    target_file(&t, 58 * 65536, 0);
    target_file(&e, 2 * 65536, 0);
    let r = qmrestore(
        &d.path().join("vma"),
        work.path(),
        &bytes,
        &[
            format!("0:drive-scsi0={}", t.display()),
            "skip=drive-ide0".into(),
        ],
        false,
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(fs::read(&t).unwrap() == disk);
    // Mapped instead of skipped, the duplicate is found.
    let r = qmrestore(
        &d.path().join("vma"),
        work.path(),
        &bytes,
        &[
            format!("0:drive-scsi0={}", t.display()),
            format!("0:drive-ide0={}", e.display()),
        ],
        false,
    );
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr
            .ends_with("cluster 0 of drive-ide0 appears twice\n"),
        "{}",
        r.stderr
    );
}
