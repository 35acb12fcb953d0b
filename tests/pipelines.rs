//! The tools as Unix filters through the compressors Proxmox backups travel
//! in (`.vma.zst`, `.vma.lzo`, `.vma.gz`): every stage a pipe, no temp
//! archive, restored images byte-identical.

mod common;

use std::fs;
use std::process::Command;

use common::{bin, make_images, sha256_file};

fn sh(script: &str, dir: &std::path::Path) -> std::process::Output {
    let bins = bin("vma-encode").parent().unwrap().to_path_buf();
    Command::new("bash")
        .arg("-c")
        .arg(format!("set -euo pipefail\n{script}"))
        .current_dir(dir)
        .env(
            "PATH",
            format!("{}:{}", bins.display(), std::env::var("PATH").unwrap()),
        )
        .output()
        .unwrap()
}

#[test]
fn through_zstd_lzop_and_pigz() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_images(
        dir,
        &[
            "--seed",
            "3",
            "--image",
            "a.raw:3M+4096:mixed",
            "--image",
            "b.raw:2M:sparse",
        ],
    );
    for (ext, compress, decompress) in [
        ("zst", "zstd -q -c", "zstd -q -dc"),
        ("lzo", "lzop -c", "lzop -dc"),
        ("gz", "pigz -c", "pigz -dc"),
    ] {
        let o = sh(
            &format!(
                "vma-encode -c qemu-server.conf drive-scsi0=a.raw drive-virtio1=b.raw | {compress} > vm.vma.{ext}\n\
                 {decompress} vm.vma.{ext} | vma-verify -\n\
                 rm -rf out-{ext}\n\
                 {decompress} vm.vma.{ext} | vma-decode extract - out-{ext}\n"
            ),
            dir,
        );
        assert!(
            o.status.success(),
            "{ext}: {}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&o.stdout).lines().next().unwrap(),
            "<stdin>: ok (81 clusters, data checksums: verified)"
        );
        let out = dir.join(format!("out-{ext}"));
        // a.raw is a multiple of 512 bytes, so it comes back identical.
        assert_eq!(
            sha256_file(&out.join("disk-drive-scsi0.raw")),
            sha256_file(&dir.join("a.raw"))
        );
        assert_eq!(
            sha256_file(&out.join("disk-drive-virtio1.raw")),
            sha256_file(&dir.join("b.raw"))
        );
        assert_eq!(
            fs::read(out.join("qemu-server.conf")).unwrap(),
            fs::read(dir.join("qemu-server.conf")).unwrap()
        );
    }
}

#[test]
fn a_broken_stream_in_the_middle_of_a_pipeline_fails_it() {
    // A corrupted compressed archive: the decompressor or the verifier must
    // fail, and extract must leave no image.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_images(dir, &["--seed", "4", "--image", "a.raw:1M:random"]);
    let o = sh(
        "vma-encode drive-scsi0=a.raw > vm.vma\n\
         head -c 500000 vm.vma | vma-decode extract - out || echo \"exit=$?\"",
        dir,
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.ends_with("exit=1\n"), "{stdout}");
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "vma-encode: warning: no config named qemu-server.conf in the archive: \
         Proxmox's qmrestore will not restore it (add -c qemu-server.conf=PATH)\n\
         vma-decode: <stdin>: extent 0 at byte 12800: truncated: got 486688 of 1048576 data bytes\n"
    );
    assert_eq!(fs::read_dir(dir.join("out")).unwrap().count(), 0);
}
