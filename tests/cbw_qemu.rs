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
