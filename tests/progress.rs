//! Progress: a bar (bytes, rate, ETA) when stderr is a terminal, nothing on
//! a non-terminal, Proxmox's lines with -v. The terminal is a pseudo
//! terminal made by `script` (util-linux/bsdutils).

mod common;

use std::path::Path;
use std::process::Command;

use common::bin;

/// Runs `cmd` (a shell command line) on a pseudo terminal; returns what the
/// terminal showed.
fn on_terminal(dir: &Path, cmd: &str) -> String {
    let out = Command::new("script")
        .args(["-qec", cmd, "/dev/null"])
        .current_dir(dir)
        .env("PATH", path_with_bins())
        .env("COLUMNS", "160")
        .output()
        .expect("script (bsdutils) must be installed");
    assert!(out.status.success(), "{cmd}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn path_with_bins() -> String {
    format!(
        "{}:{}",
        bin("vma-encode").parent().unwrap().display(),
        std::env::var("PATH").unwrap()
    )
}

/// A 24 MiB disk with 8 MiB of data and its archive.
fn archive(dir: &Path) {
    let script = r#"
set -e
truncate -s 24M d.raw
head -c 8M /dev/urandom | dd of=d.raw conv=notrunc status=none
printf 'name: p\n' > qemu-server.conf
vma-encode -c qemu-server.conf -o a.vma drive-scsi0=d.raw
"#;
    let out = Command::new("bash")
        .args(["-c", script])
        .current_dir(dir)
        .env("PATH", path_with_bins())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// The bar shows bytes of a total, a rate and an ETA, and is cleared
/// (`ESC [2K`) before the tool's own lines.
fn assert_bar(shown: &str, what: &str) {
    assert!(shown.contains("B/s "), "{what}: no rate:\n{shown:?}");
    assert!(shown.contains(" eta "), "{what}: no ETA:\n{shown:?}");
    assert!(
        shown.contains("\x1b[2K"),
        "{what}: the bar was not cleared:\n{shown:?}"
    );
}

#[test]
fn verify_and_extract_draw_a_bar_on_a_terminal_only() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    archive(d);
    let shown = on_terminal(d, "vma-verify a.vma");
    assert_bar(&shown, "vma-verify");
    assert!(
        shown.ends_with("a.vma: ok (384 clusters, data checksums: verified)\r\n"),
        "{shown:?}"
    );
    let shown = on_terminal(
        d,
        "vma-decode extract a.vma out1 && zstd -q -c a.vma > a.vma.zst",
    );
    assert_bar(&shown, "vma-decode extract");
    let shown = on_terminal(d, "vma-decode extract a.vma.zst out2");
    assert_bar(&shown, "vma-decode extract of a compressed archive");
    let shown = on_terminal(d, "vma-encode -o b.vma drive-scsi0=d.raw");
    assert_bar(&shown, "vma-encode");
    // Not on a terminal: nothing on stderr.
    for args in [
        &["vma-verify", "a.vma"][..],
        &["vma-decode", "extract", "a.vma", "out3"],
        &[
            "vma-encode",
            "-o",
            "c.vma",
            "-c",
            "qemu-server.conf",
            "drive-scsi0=d.raw",
        ],
    ] {
        let out = Command::new(bin(args[0]))
            .args(&args[1..])
            .current_dir(d)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stderr), "", "{args:?}");
    }
    // -v keeps Proxmox's lines, and no bar even on a terminal.
    let shown = on_terminal(d, "vma-decode extract -v a.vma out4");
    assert!(!shown.contains(" eta "), "{shown:?}");
    assert!(
        shown.contains("progress 100% (read 25165824 bytes, duration "),
        "{shown:?}"
    );
}

/// `cbw-tap backup -v` prints the lines Proxmox's `vma create -v` prints,
/// the very lines `vma-encode -v` prints for the same stream; on a
/// terminal a bar; on a non-terminal without -v, only its closing counters.
#[test]
fn cbw_tap_backup_progress() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let script = r#"
set -euo pipefail
truncate -s 12M d.raw
head -c 4M /dev/urandom | dd of=d.raw bs=1M seek=2 conv=notrunc status=none
cbw-tap serve --socket "$PWD/s" drive-scsi0=d.raw 2>serve.log &
srv=$!
trap 'kill $srv 2>/dev/null || true; wait $srv 2>/dev/null || true' EXIT
for _ in $(seq 500); do [ -S s ] && [ -S s.ctl ] && break; sleep 0.02; done
cbw-tap backup -v --control s.ctl 2>tap.err | vma-encode -v - 2>enc.err >a.vma
cbw-tap backup --control s.ctl 2>quiet.err | vma-encode - >b.vma
script -qec 'cbw-tap backup --control s.ctl | vma-encode - > c.vma' /dev/null > tty.out
"#;
    let out = Command::new("bash")
        .args(["-c", script])
        .current_dir(d)
        .env("PATH", path_with_bins())
        .env("TZ", "UTC")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let read = |n: &str| std::fs::read_to_string(d.join(n)).unwrap();
    let progress = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with("progress "))
            .map(String::from)
            .collect()
    };
    let tap = progress(&read("tap.err"));
    assert_eq!(tap, progress(&read("enc.err")));
    assert_eq!(tap.first().unwrap(), "progress 0% 65536/12582912 65536");
    assert_eq!(
        tap.last().unwrap(),
        "progress 100% 12582912/12582912 8388608"
    );
    assert_eq!(tap.len(), 101);
    assert!(progress(&read("quiet.err")).is_empty());
    assert!(read("quiet.err")
        .lines()
        .all(|l| l.starts_with("cbw-tap backup: ")));
    // The server's log line names the backup instant in local ISO-8601
    // (TZ=UTC here), the archive's ctime.
    let list = Command::new(bin("vma-decode"))
        .args(["list", "--json", "a.vma"])
        .current_dir(d)
        .env("TZ", "UTC")
        .output()
        .unwrap();
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let iso = list["ctime_iso"].as_str().unwrap();
    assert!(iso.ends_with("+00:00") && iso.len() == 25, "{iso}");
    let log = read("serve.log");
    let first = log.lines().nth(1).unwrap();
    assert!(
        first.starts_with(&format!(
            "cbw-tap serve: backup of {iso} finished: 192 clusters ("
        )),
        "{log}"
    );
    assert_eq!(
        log.lines().last().unwrap(),
        "cbw-tap serve: SIGTERM, shutting down"
    );
    let tty = read("tty.out");
    assert_bar(&tty, "cbw-tap backup");
    assert!(tty.contains("cbw-tap backup"), "{tty:?}");
}
