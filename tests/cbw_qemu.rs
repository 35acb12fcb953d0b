//! QEMU itself as the guest's block layer: `qemu-system-x86_64 -blockdev
//! driver=nbd,server.type=unix,server.path=…,export=…` (the syntax a VM
//! uses) writes through cbw-tap during a live backup; the archive holds the
//! disk as of the backup instant and the live image holds QEMU's writes.
//! QEMU runs without a guest (`-M none`); its monitor's `qemu-io` command
//! drives the same block driver a guest's disk would. Needs
//! qemu-system-x86 (.ci/run installs it).

mod common;

use std::process::Command;

use common::{bin, sha256_file};

#[test]
fn qemu_system_writes_through_cbw_tap_during_a_backup() {
    let bins = bin("cbw-tap").parent().unwrap().to_path_buf();
    let tmp = tempfile::tempdir().unwrap();
    let script = r#"
set -euo pipefail
command -v qemu-system-x86_64 >/dev/null || { echo "qemu-system-x86_64 missing: apt-get install qemu-system-x86" >&2; exit 99; }
W=$PWD
truncate -s 4M d.raw
head -c 1M /dev/urandom | dd of=d.raw conv=notrunc status=none
cp --sparse=always d.raw instant.raw
cbw-tap serve --socket "$W/s" drive-scsi0=d.raw 2>serve.log &
srv=$!
trap 'kill $srv 2>/dev/null || true' EXIT
for _ in $(seq 500); do [ -S s ] && [ -S s.ctl ] && break; sleep 0.02; done
# A slow background reader (256 KiB/s) so QEMU's writes land on clusters
# the backup has not copied yet: copy-before-write must capture them.
( cbw-tap backup --control s.ctl --bwlimit 256K --post 'touch instant' 2>backup.log \
    | vma-encode -o a.vma - ) &
bk=$!
for _ in $(seq 500); do [ -e instant ] && break; sleep 0.01; done
printf '%s\n' \
  'qemu-io d "write -P 0xab 917504 65536"' \
  'qemu-io d "write -P 0xcd 3145728 131072"' \
  'qemu-io d "read -P 0xab 917504 65536"' \
  'quit' \
| qemu-system-x86_64 -M none -nodefaults -display none \
    -blockdev driver=nbd,node-name=d,server.type=unix,server.path="$W/s",export=drive-scsi0 \
    -monitor stdio > qemu.out 2>&1
wait $bk
tr -d '\r' < qemu.out | grep -aoE '(wrote|read) [0-9]+/[0-9]+ bytes at offset [0-9]+|Pattern verification failed|[Ee]rror[^\n]*' 
vma-decode extract a.vma out > /dev/null
grep -a 'by copy-before-write' backup.log | grep -oE '[0-9]+ by copy-before-write' || true
"#;
    let o = Command::new("bash")
        .arg("-c")
        .arg(script)
        .current_dir(tmp.path())
        .env(
            "PATH",
            format!("{}:{}", bins.display(), std::env::var("PATH").unwrap()),
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[..3],
        [
            "wrote 65536/65536 bytes at offset 917504",
            "wrote 131072/131072 bytes at offset 3145728",
            "read 65536/65536 bytes at offset 917504",
        ],
        "QEMU's view: {stdout}"
    );
    // Both writes hit clusters not yet copied (the reader crawls), so each
    // was captured by copy-before-write before it landed.
    let cbw: u64 = lines
        .get(3)
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        cbw >= 1,
        "no cluster was captured by copy-before-write: {stdout}"
    );
    // The archive holds the disk as of the instant…
    assert_eq!(
        sha256_file(&tmp.path().join("out/disk-drive-scsi0.raw")),
        sha256_file(&tmp.path().join("instant.raw"))
    );
    // …and the live image holds QEMU's writes.
    let live = std::fs::read(tmp.path().join("d.raw")).unwrap();
    assert!(live[917504..983040].iter().all(|&b| b == 0xab));
    assert!(live[3145728..3276800].iter().all(|&b| b == 0xcd));
}

/// A `cbw-tap serve` child on `dir/s` serving `drive-scsi0=dir/d.raw`.
fn serve(dir: &std::path::Path) -> std::process::Child {
    use std::process::Stdio;
    let log = dir.join("serve.log");
    let _ = std::fs::remove_file(&log);
    let mut child = Command::new(bin("cbw-tap"))
        .args(["serve", "--socket"])
        .arg(dir.join("s"))
        .arg(format!("drive-scsi0={}", dir.join("d.raw").display()))
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Serving once it says so (a killed server's socket files are still
    // there until the new one replaces them).
    let t0 = std::time::Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("export(s) on")
    {
        assert!(child.try_wait().unwrap().is_none(), "cbw-tap serve exited");
        assert!(t0.elapsed().as_secs() < 30, "cbw-tap serve did not start");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child
}

/// QEMU's monitor, driven line by line; what it prints is collected.
struct Monitor {
    qemu: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Monitor {
    fn send(&mut self, cmd: &str) {
        use std::io::Write;
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Waits until `n` more results of qemu-io commands ("wrote …",
    /// "read …", or a failure) have been printed; returns them.
    fn results(&mut self, n: usize) -> Vec<String> {
        let mut got = Vec::new();
        while got.len() < n {
            let line = self
                .lines
                .recv_timeout(std::time::Duration::from_secs(120))
                .unwrap_or_else(|_| panic!("QEMU printed no more results: {:?}", self.seen));
            self.seen.push(line.clone());
            if line.starts_with("wrote ")
                || line.starts_with("read ")
                || line.contains("failed")
                || line.contains("error")
            {
                got.push(line);
            }
        }
        got
    }
}

/// Issue 8: cbw-tap survives its own restart. A QEMU attached with
/// `reconnect-delay` keeps its disk across `kill -9` and a restart of
/// `cbw-tap serve`: every write acknowledged before the kill is in the
/// image, writes issued while the server is down complete once it is back,
/// the backup that was running fails cleanly (exit 3) and the next one is
/// exact.
#[test]
fn qemu_keeps_its_disk_across_a_kill_and_restart_of_cbw_tap() {
    use std::io::BufRead;
    use std::process::Stdio;
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let img = d.join("d.raw");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(8 << 20).unwrap();
    drop(f);
    let mut server = serve(d);
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-M", "none", "-nodefaults", "-display", "none", "-monitor", "stdio"])
        .arg("-blockdev")
        .arg(format!(
            "driver=nbd,node-name=d,server.type=unix,server.path={},export=drive-scsi0,reconnect-delay=60",
            d.join("s").display()
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-system-x86_64 (qemu-system-x86) must be installed");
    let stdin = qemu.stdin.take().unwrap();
    let stdout = qemu.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { return };
            let text = String::from_utf8_lossy(&line).replace('\r', "");
            // Strip the monitor's prompt and terminal escapes.
            let text = text.rsplit("(qemu) ").next().unwrap_or("").to_string();
            if tx.send(text.trim().to_string()).is_err() {
                return;
            }
        }
    });
    let mut mon = Monitor {
        qemu,
        stdin,
        lines: rx,
        seen: Vec::new(),
    };
    let mut expected = vec![0u8; 8 << 20];
    let mut write = |mon: &mut Monitor, pat: u8, off: usize, len: usize, fua: bool| {
        let f = if fua { "-f " } else { "" };
        mon.send(&format!("qemu-io d \"write {f}-P {pat:#04x} {off} {len}\""));
        expected[off..off + len].fill(pat);
    };
    // Acknowledged before the kill, with and without FUA, and a flush.
    for i in 0..8 {
        write(&mut mon, 0x10 + i as u8, i * 65536, 65536, i % 2 == 0);
    }
    mon.send("qemu-io d \"flush\"");
    let before = mon.results(8);
    assert!(
        before.iter().all(|l| l.starts_with("wrote 65536/65536")),
        "{before:?}"
    );

    // A backup is running (its reader crawls) when the server is killed.
    let mut backup = Command::new(bin("cbw-tap"))
        .args(["backup", "--control"])
        .arg(d.join("s.ctl"))
        .args(["--bwlimit", "64K", "--post"])
        .arg(format!("touch '{}'", d.join("instant").display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut encode = Command::new(bin("vma-encode"))
        .arg("-o")
        .arg(d.join("lost.vma"))
        .arg("-")
        .stdin(Stdio::from(backup.stdout.take().unwrap()))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !d.join("instant").exists() {
        assert!(t0.elapsed().as_secs() < 30, "no backup instant");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    server.kill().unwrap(); // SIGKILL
    server.wait().unwrap();
    let out = backup.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the cluster stream broke off"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !encode.wait().unwrap().success(),
        "vma-encode took a cut stream"
    );
    assert!(!d.join("lost.vma").exists(), "a cut archive was left");

    // Written while no server runs: QEMU holds the requests.
    for i in 8..12 {
        write(
            &mut mon,
            0x10 + i as u8,
            i * 65536 + 512,
            65536 - 1024,
            false,
        );
    }
    let mut server = serve(d);
    let during = mon.results(4);
    assert!(
        during.iter().all(|l| l.starts_with("wrote 64512/64512")),
        "{during:?}"
    );
    // QEMU reads its own writes back through the new server.
    for i in 0..12u8 {
        let (off, len) = if i < 8 {
            (usize::from(i) * 65536, 65536)
        } else {
            (usize::from(i) * 65536 + 512, 65536 - 1024)
        };
        mon.send(&format!(
            "qemu-io d \"read -P {:#04x} {off} {len}\"",
            0x10 + i
        ));
    }
    let reads = mon.results(12);
    assert!(reads.iter().all(|l| l.starts_with("read ")), "{reads:?}");
    mon.send("quit");
    let status = mon.qemu.wait().unwrap();
    assert!(status.success(), "{:?}", mon.seen);
    assert!(
        std::fs::read(&img).unwrap() == expected,
        "the image lost a write"
    );

    // The restarted server backs up as before.
    let archive = d.join("vm.vma");
    let st = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -o pipefail; '{}' backup --control '{}' | '{}' -o '{}' -",
            bin("cbw-tap").display(),
            d.join("s.ctl").display(),
            bin("vma-encode").display(),
            archive.display()
        ))
        .status()
        .unwrap();
    assert!(st.success());
    let st = Command::new(bin("vma-decode"))
        .arg("extract")
        .arg(&archive)
        .arg(d.join("out"))
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(
        sha256_file(&d.join("out/disk-drive-scsi0.raw")),
        sha256_file(&img)
    );
    server.kill().unwrap();
    server.wait().unwrap();
}
