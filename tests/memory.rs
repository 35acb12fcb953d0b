//! Memory stays bounded on hostile input (issue 8, item 1): archives and
//! cluster streams of a few hundred KB whose headers claim 2^48-byte devices
//! and name one cluster every 2^18 are refused in well under 64 MiB of RSS
//! (the old bitmap took 444 MiB, 1.77 GiB, and aborted for 12 devices).
//! Max RSS comes from `/usr/bin/time -f %M` (GNU time).

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use common::bin;

#[path = "../vma-format/examples/hostile.rs"]
#[allow(dead_code)]
mod hostile;

const LIMIT_KIB: u64 = 64 * 1024;

/// Runs `cmd` under GNU time; returns its output and max RSS in KiB.
fn with_rss(cmd: &Path, args: &[&str], stdin: Option<&Path>) -> (Output, u64) {
    let dir = tempfile::tempdir().unwrap();
    let rss_file = dir.path().join("rss");
    let mut c = Command::new("/usr/bin/time");
    c.arg("-f")
        .arg("%M")
        .arg("-o")
        .arg(&rss_file)
        .arg(cmd)
        .args(args);
    if let Some(p) = stdin {
        c.stdin(fs::File::open(p).unwrap());
    }
    let out = c.output().expect("/usr/bin/time (Debian package time)");
    let rss = fs::read_to_string(&rss_file).unwrap();
    let rss = rss.lines().last().unwrap().trim().parse().unwrap();
    (out, rss)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn sparse_claims_in_tiny_archives_are_verified_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    for devices in [1u64, 4, 12] {
        let path = dir.path().join(format!("lone{devices}.vma"));
        let mut bytes = Vec::new();
        hostile::write_archive(&mut bytes, devices, hostile::lone(devices, 18, 1 << 14)).unwrap();
        assert!(bytes.len() < 2_000_000);
        fs::write(&path, &bytes).unwrap();
        let (out, rss) = with_rss(&bin("vma-verify"), &[path.to_str().unwrap()], None);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert_eq!(
            stderr(&out),
            format!(
                "vma-verify: {}: drive-scsi0: cluster 1 missing (4294950912 of 4294967296 clusters missing)\n",
                path.display()
            )
        );
        assert!(
            rss < LIMIT_KIB,
            "{devices} devices: vma-verify took {rss} KiB"
        );
    }
}

#[test]
fn a_hostile_cluster_stream_is_encoded_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lone.stream");
    let mut bytes = Vec::new();
    hostile::write_stream(&mut bytes, 1, hostile::lone(1, 18, 1 << 14)).unwrap();
    assert!(bytes.len() < 300_000);
    fs::write(&path, &bytes).unwrap();
    let archive = dir.path().join("out.vma");
    let (out, rss) = with_rss(
        &bin("vma-encode"),
        &["-o", archive.to_str().unwrap(), "-"],
        Some(&path),
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        format!(
            "vma-encode: <stdin>: record 16384 at byte {}: truncated: the stream ends after 16384 records, without its end record\n",
            bytes.len()
        )
    );
    assert!(rss < LIMIT_KIB, "vma-encode took {rss} KiB");
    assert!(!archive.exists());
    assert_eq!(
        fs::read_dir(dir.path()).unwrap().count(),
        1,
        "temp file left"
    );
}

/// As many lone clusters as 2 MB of extent headers can name (230,000 over 254
/// devices, scrambled): the worst case per byte of input. benches/memory.sh
/// runs the same at 100 MB.
#[test]
fn the_densest_hostile_archive_is_verified_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("worst.vma");
    let mut bytes = Vec::new();
    let extents = 2_000_000 / 512;
    hostile::write_archive(&mut bytes, 254, hostile::worst(extents * 59)).unwrap();
    fs::write(&path, &bytes).unwrap();
    let (out, rss) = with_rss(&bin("vma-verify"), &[path.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        format!(
            "vma-verify: {}: drive-scsi0: cluster 1 missing (4294966388 of 4294967296 clusters missing)\n",
            path.display()
        )
    );
    assert!(rss < 16 * 1024, "vma-verify took {rss} KiB");
}
