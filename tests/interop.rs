//! Compatibility proven against another implementation: archives written by
//! vma-encode (data checksums included) are read by dissect.hypervisor's
//! independent VMA reader (Python, `pip install dissect.hypervisor==3.15`,
//! which .ci/run installs) and yield the source images exactly.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::{bin, fixtures, make_images, sha256_file};

fn dissect_extract(archive: &Path, out: &Path) -> String {
    let o = Command::new("python3")
        .arg(common::root().join("tests/interop/dissect_extract.py"))
        .arg(archive)
        .arg(out)
        .output()
        .expect("python3");
    assert!(
        o.status.success(),
        "dissect.hypervisor failed on {} (install it: pip install dissect.hypervisor==3.15):\n{}",
        archive.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// The source padded with zeros to `size` bytes has this sha256.
fn padded_sha(src: &Path, size: u64, tmp: &Path) -> String {
    let mut data = fs::read(src).unwrap();
    assert!(data.len() as u64 <= size);
    data.resize(size as usize, 0);
    let p = tmp.join("padded");
    fs::write(&p, &data).unwrap();
    sha256_file(&p)
}

#[test]
fn dissect_reads_proxmox_fixture_like_proxmox() {
    // The peer itself agrees with Proxmox's tool (EXPECTED.txt).
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x");
    dissect_extract(&fixtures().join("pve/multi-disk.vma"), &out);
    assert_eq!(
        sha256_file(&out.join("drive-scsi0.raw")),
        "d67e78f478af5f3118c457c8ecc0c3f026ca3bfd2ed70bcd68867d42eb64dadd"
    );
}

#[test]
fn dissect_reads_our_archives() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_images(
        &src,
        &[
            "--seed",
            "5",
            "--image",
            "small.raw:1M+12345:mixed",
            "--image",
            "sparse.raw:8M:sparse",
            "--image",
            "tiny.raw:4097:random",
            "--image",
            "near.raw:300K+1:nearzero",
            "--image",
            "pat.raw:65536*7+1:pattern",
        ],
    );
    let devices = [
        ("drive-scsi0", "small.raw"),
        ("drive-virtio1", "sparse.raw"),
        ("drive-ide0", "tiny.raw"),
        ("drive-sata1", "near.raw"),
        ("drive-scsi2", "pat.raw"),
    ];
    for checksums in [true, false] {
        let archive = tmp.path().join(format!("ours-{checksums}.vma"));
        let mut cmd = Command::new(bin("vma-encode"));
        cmd.current_dir(&src)
            .args(["-c", "qemu-server.conf", "-c", "pve-firewall.fw", "-o"])
            .arg(&archive);
        if !checksums {
            cmd.arg("--no-data-checksums");
        }
        for (name, file) in devices {
            cmd.arg(format!("{name}={file}"));
        }
        let o = cmd.output().unwrap();
        assert!(
            o.status.success(),
            "vma-encode: {}",
            String::from_utf8_lossy(&o.stderr)
        );

        let out = tmp.path().join(format!("dissect-{checksums}"));
        let listing = dissect_extract(&archive, &out);
        let mut want = String::new();
        for (i, (name, file)) in devices.iter().enumerate() {
            let len = fs::metadata(src.join(file)).unwrap().len();
            let size = len.div_ceil(512) * 512;
            want.push_str(&format!("DEV {} {name} {size}\n", i + 1));
            assert_eq!(
                sha256_file(&out.join(format!("{name}.raw"))),
                padded_sha(&src.join(file), size, tmp.path()),
                "{name} (data checksums: {checksums})"
            );
        }
        assert_eq!(listing, want);
        for cfg in ["qemu-server.conf", "pve-firewall.fw"] {
            assert_eq!(
                sha256_file(&out.join(format!("cfg-{cfg}"))),
                sha256_file(&src.join(cfg))
            );
        }
    }
}
