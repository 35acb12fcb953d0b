//! `vma-decode extract --stdout DEVNAME ARCHIVE`: one disk as a raw image
//! on standard output, in order, whatever order the archive holds its
//! clusters in (reorder buffer in memory, then a spill file in $TMPDIR);
//! a consumer that stops reading is exit 3 with one line.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::process::{Command, Output, Stdio};

use common::{bin, fixtures, sha256_file};
use vma_format::{HeaderBuilder, Writer, WriterOptions};

fn decode(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(bin("vma-decode"))
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn sha(bytes: &[u8]) -> String {
    let t = tempfile::NamedTempFile::new().unwrap();
    fs::write(t.path(), bytes).unwrap();
    sha256_file(t.path())
}

fn expected_files() -> BTreeMap<String, String> {
    let text = fs::read_to_string(fixtures().join("pve/EXPECTED.txt")).unwrap();
    let section = text
        .split("ARCHIVE multi-disk.vma")
        .nth(1)
        .unwrap()
        .split("extracted files")
        .nth(1)
        .unwrap();
    section
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("    "))
        .map(|l| {
            let p: Vec<_> = l.split_whitespace().collect();
            (p[2].to_string(), p[0].to_string())
        })
        .collect()
}

#[test]
fn every_fixture_disk_streams_byte_identical_to_its_extract() {
    let want = expected_files();
    let archive = fixtures().join("pve/multi-disk.vma");
    let tmp = tempfile::tempdir().unwrap();
    let zst = tmp.path().join("m.vma.zst");
    let z = Command::new("zstd")
        .args(["-q", "-c"])
        .arg(&archive)
        .output()
        .unwrap();
    fs::write(&zst, z.stdout).unwrap();
    for dev in ["drive-scsi0", "drive-virtio1", "drive-sata2", "drive-ide0"] {
        for a in [&archive, &zst] {
            let o = decode(&["extract", "--stdout", dev, a.to_str().unwrap()], &[]);
            assert_eq!(
                o.status.code(),
                Some(0),
                "{dev}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            assert_eq!(
                sha(&o.stdout),
                want[&format!("disk-{dev}.raw")],
                "{dev} from {}",
                a.display()
            );
        }
    }
    // From stdin.
    let mut cmd = Command::new(bin("vma-decode"));
    cmd.args(["extract", "--stdout", "drive-scsi0", "-"]);
    let o = common::output_with_stdin(cmd, &fs::read(&archive).unwrap());
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(sha(&o.stdout), want["disk-drive-scsi0.raw"]);
}

/// Two devices whose clusters come in reverse order, interleaved, with
/// zero blocks and a last partial cluster.
fn shuffled_archive() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let size_a = 40 * 65536 + 4096 * 3 + 512;
    let mut a = vec![0u8; size_a];
    for (i, b) in a.iter_mut().enumerate() {
        // Every third 4 KiB block stays zero.
        if (i / 4096) % 3 != 0 {
            *b = (i * 7 / 4096) as u8 | 1;
        }
    }
    let b: Vec<u8> = (0..10 * 65536).map(|i| (i / 65536) as u8).collect();
    let mut h = HeaderBuilder::new([5; 16], 1_700_000_000);
    h.add_device("drive-scsi0", a.len() as u64).unwrap();
    h.add_device("drive-scsi1", b.len() as u64).unwrap();
    let mut w = Writer::new(Vec::new(), &h, WriterOptions::default()).unwrap();
    let ca = a.len().div_ceil(65536);
    for n in (0..ca).rev() {
        let end = ((n + 1) * 65536).min(a.len());
        w.write_raw(1, n as u32, &a[n * 65536..end]).unwrap();
        if n < 10 {
            w.write_raw(2, (9 - n) as u32, &b[(9 - n) * 65536..(10 - n) * 65536])
                .unwrap();
        }
    }
    (w.finish().unwrap(), a, b)
}

#[test]
fn out_of_order_clusters_come_out_in_order_from_memory_and_from_the_spill_file() {
    let (bytes, a, b) = shuffled_archive();
    let tmp = tempfile::tempdir().unwrap();
    let arch = tmp.path().join("s.vma");
    fs::write(&arch, &bytes).unwrap();
    let spill_dir = tmp.path().join("spill");
    fs::create_dir(&spill_dir).unwrap();
    for buffer in [None, Some("0"), Some("200000")] {
        for (dev, want) in [("drive-scsi0", &a), ("drive-scsi1", &b)] {
            let mut args = vec!["extract", "--stdout", dev, arch.to_str().unwrap()];
            if let Some(n) = buffer {
                args.extend(["--reorder-buffer", n]);
            }
            let o = decode(&args, &[("TMPDIR", spill_dir.to_str().unwrap())]);
            assert_eq!(
                o.status.code(),
                Some(0),
                "{args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            assert!(o.stdout == *want, "{args:?}: output differs");
        }
    }
    // The spill file has no name: nothing is left in $TMPDIR.
    assert_eq!(fs::read_dir(&spill_dir).unwrap().count(), 0);

    // Where no spill file can be made, a buffer too small to hold the early
    // clusters fails (so the spill file is what a small buffer uses), and
    // the default buffer holds them all in memory.
    let nowhere = tmp.path().join("no-such-dir");
    let o = decode(
        &[
            "extract",
            "--stdout",
            "drive-scsi0",
            arch.to_str().unwrap(),
            "--reorder-buffer",
            "0",
        ],
        &[("TMPDIR", nowhere.to_str().unwrap())],
    );
    assert_eq!(o.status.code(), Some(3));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        format!(
            "vma-decode: {}: output failed: cannot create the reorder spill file in {}: No such file or directory (os error 2)\n",
            arch.display(),
            nowhere.display()
        )
    );
    let o = decode(
        &["extract", "--stdout", "drive-scsi0", arch.to_str().unwrap()],
        &[("TMPDIR", nowhere.to_str().unwrap())],
    );
    assert_eq!(o.status.code(), Some(0));
    assert!(o.stdout == a);
}

#[test]
fn a_consumer_that_stops_reading_is_exit_3_with_one_line() {
    let archive = fixtures().join("pve/multi-disk.vma");
    let mut child = Command::new(bin("vma-decode"))
        .args([
            "extract",
            "--stdout",
            "drive-virtio1",
            archive.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut first = [0u8; 1000];
    out.read_exact(&mut first).unwrap();
    // The device is 8 MiB, far more than a pipe holds: the rest meets EPIPE.
    drop(out);
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(3), "{err}");
    assert_eq!(
        err,
        "vma-decode: stdout: broken pipe: the reader of drive-virtio1's image stopped reading\n"
    );
}

#[test]
fn refusals() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = fixtures().join("pve/one-disk.vma");
    let a = archive.to_str().unwrap();
    let o = decode(&["extract", "--stdout", "drive-nope", a], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        format!("vma-decode: {a}: no device named \"drive-nope\" in the archive\n")
    );
    let out = tmp.path().join("d");
    let o = decode(
        &[
            "extract",
            "--stdout",
            "drive-scsi0",
            a,
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(!out.exists());
    // RAM state is not a disk.
    let mut h = HeaderBuilder::new([1; 16], 0);
    h.add_device("vmstate", 4096).unwrap();
    let mut w = Writer::new(Vec::new(), &h, WriterOptions::default()).unwrap();
    w.write_raw(1, 0, &[1; 4096]).unwrap();
    let v = tmp.path().join("v.vma");
    fs::write(&v, w.finish().unwrap()).unwrap();
    let o = decode(
        &["extract", "--stdout", "vmstate", v.to_str().unwrap()],
        &[],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(o.stdout.is_empty());
    // --help states the buffer.
    let o = decode(&["extract", "--help"], &[]);
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(help.contains("default 64 MiB"), "{help}");
    assert!(help.contains("[default: 67108864]"), "{help}");
}
