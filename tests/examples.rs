//! Every shell pipeline in examples/ runs and succeeds (with the binaries of
//! this test build); the tools among them (backup-cron.sh, restore.sh,
//! ci-verify.sh, to-qcow2.sh) are run with real arguments, their one-line
//! outputs and exit codes checked exactly.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

#[test]
fn every_example_is_tested() {
    let mut names: Vec<String> = std::fs::read_dir(common::root().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".sh"))
        .collect();
    names.sort();
    // demo.sh and serve.sh run below; live-backup.sh runs in tests/cbw.rs
    // (example_live_backup) and, from a fresh clone, in tests/fresh_clone.rs.
    let tested = [
        "backup-cron.sh",
        "ci-verify.sh",
        "demo.sh",
        "live-backup.sh",
        "restore.sh",
        "serve.sh",
        "to-qcow2.sh",
    ];
    for n in &names {
        assert!(
            tested.contains(&n.as_str()),
            "examples/{n} has no test in tests/examples.rs"
        );
    }
}

#[test]
fn demo() {
    common::run_example("demo.sh");
}

/// The backup served as a disk: converted to qcow2 from it, a file read out
/// of it through nbdfuse and qemu-nbd -c where the host allows (the example
/// says what it skipped and why).
#[test]
fn serve() {
    common::run_example("serve.sh");
}

/// Runs `examples/NAME ARGS…` with this build's binaries (`VMA_BIN`) and a
/// private TMPDIR, which must be empty again afterwards.
fn script(name: &str, args: &[&OsStr], tmpdir: &Path) -> Output {
    let bin_dir = common::bin("vma-decode").parent().unwrap().to_path_buf();
    let out = Command::new("bash")
        .arg(common::root().join("examples").join(name))
        .args(args)
        .env("VMA_BIN", &bin_dir)
        .env("TMPDIR", tmpdir)
        .output()
        .unwrap();
    let left: Vec<_> = fs::read_dir(tmpdir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "examples/{name} left in TMPDIR: {left:?}");
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A disk image of `size` bytes: pseudo-random data in some 64 KiB
/// clusters, zero blocks and holes elsewhere.
fn make_disk(path: &Path, size: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; size];
    let mut x = seed | 1;
    for (i, chunk) in data.chunks_mut(65536).enumerate() {
        if i % 3 == 0 {
            for b in chunk.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
        }
    }
    fs::write(path, &data).unwrap();
    data
}

fn s(p: &Path) -> &OsStr {
    p.as_os_str()
}

/// The archives named NAME-YYYY_MM_DD-HH_MM_SS.vma.zst in `dir`, sorted;
/// panics on anything else there.
fn archives_in(dir: &Path, name: &str) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for n in &names {
        let stamp = n
            .strip_prefix(&format!("{name}-"))
            .and_then(|r| r.strip_suffix(".vma.zst"))
            .unwrap_or_else(|| panic!("unexpected file {n} in {}", dir.display()));
        assert_eq!(stamp.len(), 19, "{n}");
        assert!(
            stamp.bytes().enumerate().all(|(i, b)| match i {
                4 | 7 | 13 | 16 => b == b'_',
                10 => b == b'-',
                _ => b.is_ascii_digit(),
            }),
            "{n}"
        );
    }
    names
}

/// backup-cron.sh against a running cbw-tap serve: three nightly runs with
/// --keep 2 (one line each, the newest two kept, each verified), a restore
/// of the newest with restore.sh (into a directory and onto an image file),
/// and failures: a missing server and an unusable destination exit 1 with
/// one line naming the step and the tool's message, leaving nothing behind
/// and removing no archive.
#[test]
fn backup_cron_and_restore() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let private = d.join("tmp");
    fs::create_dir(&private).unwrap();
    let disk = d.join("disk.raw");
    let data = make_disk(&disk, 4 << 20, 7);
    let config = d.join("100.conf");
    fs::write(
        &config,
        "#qmdump#map:scsi0:drive-scsi0:local-lvm:raw:\nscsi0: local-lvm:vm-100-disk-0,size=4M\n",
    )
    .unwrap();
    let sock = d.join("nbd.sock");
    let ctl = d.join("nbd.sock.ctl");
    /// Stopped (SIGTERM) however the test ends.
    struct Server(std::process::Child);
    impl Drop for Server {
        #[allow(unsafe_code)]
        fn drop(&mut self) {
            // SAFETY: kill(2) with a pid and a signal number touches no memory.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            let _ = self.0.wait();
        }
    }
    let _server = Server(
        Command::new(common::bin("cbw-tap"))
            .arg("serve")
            .arg("--socket")
            .arg(&sock)
            .arg(format!("drive-scsi0={}", disk.display()))
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    for _ in 0..500 {
        if ctl.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let dest = d.join("dump");
    let run = |control: &Path, dest: &Path| {
        script(
            "backup-cron.sh",
            &[
                "--control".as_ref(),
                s(control),
                "--config".as_ref(),
                s(&config),
                "--dest".as_ref(),
                s(dest),
                "--keep".as_ref(),
                "2".as_ref(),
                "--name".as_ref(),
                "vzdump-qemu-100".as_ref(),
            ],
            &private,
        )
    };
    let mut made = Vec::new();
    for kept in [1, 2, 2] {
        if !made.is_empty() {
            // Archive names have a resolution of one second.
            std::thread::sleep(Duration::from_millis(1100));
        }
        let out = run(&ctl, &dest);
        assert!(out.status.success(), "{out:?}");
        assert_eq!(text(&out.stderr), "");
        let line = text(&out.stdout);
        let names = archives_in(&dest, "vzdump-qemu-100");
        let newest = names.last().unwrap();
        let path = dest.join(newest);
        let bytes = fs::metadata(&path).unwrap().len();
        let (head, tail) = line.split_once(" bytes in ").unwrap();
        assert_eq!(head, format!("backup-cron: OK {} {bytes}", path.display()));
        let (secs, rest) = tail.split_once(' ').unwrap();
        assert!(secs.parse::<u64>().is_ok(), "{line}");
        assert_eq!(rest, format!("s, verified, kept {kept}\n"));
        made.push(newest.clone());
        assert_eq!(names.len(), kept);
    }
    assert_eq!(archives_in(&dest, "vzdump-qemu-100"), made[1..].to_vec());

    // Restore the newest into a directory, and its disk onto an image file.
    let newest = dest.join(&made[2]);
    let out_dir = d.join("restored");
    let out = script("restore.sh", &[s(&newest), s(&out_dir)], &private);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        fs::read(out_dir.join("disk-drive-scsi0.raw")).unwrap(),
        data
    );
    assert_eq!(
        fs::read(out_dir.join("qemu-server.conf")).unwrap(),
        fs::read(&config).unwrap()
    );
    assert_eq!(
        text(&out.stdout),
        format!(
            "== verify {n}\n{n}: ok (64 clusters, data checksums: verified)\n== extract into {o}\n\
             restore: {o}/disk-drive-scsi0.raw (4194304 bytes)\nrestore: {o}/qemu-server.conf ({c} bytes)\n",
            n = newest.display(),
            o = out_dir.display(),
            c = fs::metadata(&config).unwrap().len()
        )
    );
    let target = d.join("target.raw");
    fs::write(&target, vec![0xffu8; 5 << 20]).unwrap();
    let out = script(
        "restore.sh",
        &[
            s(&newest),
            "--disk".as_ref(),
            "drive-scsi0".as_ref(),
            s(&target),
        ],
        &private,
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        fs::read(&target).unwrap(),
        data,
        "the image file is replaced"
    );
    assert!(text(&out.stdout).ends_with(&format!(
        "restore: drive-scsi0 written to {}\n",
        target.display()
    )));

    // Failures: one line, exit 1, nothing left, nothing removed.
    std::thread::sleep(Duration::from_millis(1100));
    let missing = d.join("nope.ctl");
    let out = run(&missing, &dest);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(text(&out.stdout), "");
    assert_eq!(
        text(&out.stderr),
        format!(
            "backup-cron: FAILED vzdump-qemu-100: cbw-tap backup (exit 3): cbw-tap backup: {}: cannot connect: No such file or directory (os error 2)\n",
            missing.display()
        )
    );
    assert_eq!(archives_in(&dest, "vzdump-qemu-100"), made[1..].to_vec());
    // vma-encode refusing the config (too large for the format) stops the
    // backup too; the line names vma-encode, the cause.
    let good_config = fs::read(&config).unwrap();
    fs::write(&config, vec![b'#'; 70000]).unwrap();
    let out = run(&ctl, &dest);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        text(&out.stderr),
        format!(
            "backup-cron: FAILED vzdump-qemu-100: vma-encode (exit 2): vma-encode: {}: config larger than the format's 65535 bytes\n",
            config.display()
        )
    );
    assert_eq!(archives_in(&dest, "vzdump-qemu-100"), made[1..].to_vec());
    fs::write(&config, good_config).unwrap();
    let not_dir = d.join("a-file");
    fs::write(&not_dir, "").unwrap();
    let out = run(&ctl, &not_dir);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        text(&out.stderr),
        format!(
            "backup-cron: FAILED vzdump-qemu-100: --dest {}: not a directory\n",
            not_dir.display()
        )
    );
}

/// ci-verify.sh: every archive of a directory, plain and compressed, one
/// JSON summary line holding vma-verify's object per archive, exit 1 when
/// one is damaged; 0 when all are sound; 2 for a directory without archives.
#[test]
fn ci_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let private = d.join("tmp");
    fs::create_dir(&private).unwrap();
    let dir = d.join("dump");
    fs::create_dir(&dir).unwrap();
    let fixture = common::fixtures().join("pve/multi-disk.vma");
    fs::copy(&fixture, dir.join("a.vma")).unwrap();
    let sh = |cmd: &str| {
        let st = Command::new("bash")
            .args(["-c", cmd])
            .current_dir(&dir)
            .status()
            .unwrap();
        assert!(st.success(), "{cmd}");
    };
    sh("zstd -q -c a.vma > b.vma.zst && pigz -c a.vma > c.vma.gz && lzop -c a.vma > d.vma.lzo && echo notes > README");
    let out = script("ci-verify.sh", &[s(&dir)], &private);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text(&out.stderr), "");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(text(&out.stdout).lines().count(), 1);
    assert_eq!(v["directory"], dir.to_str().unwrap());
    assert_eq!(
        (v["archives"].clone(), v["ok"].clone()),
        (4.into(), 4.into())
    );
    assert_eq!(
        (v["damaged"].clone(), v["error"].clone()),
        (0.into(), 0.into())
    );
    let names: Vec<&str> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["archive"].as_str().unwrap())
        .collect();
    let want: Vec<String> = ["a.vma", "b.vma.zst", "c.vma.gz", "d.vma.lzo"]
        .iter()
        .map(|n| dir.join(n).display().to_string())
        .collect();
    assert_eq!(names, want);
    for r in v["results"].as_array().unwrap() {
        assert_eq!(r["status"], "ok");
        assert_eq!(r["clusters"], 150);
    }

    // A damaged copy: exit 1, its line on stderr, counted.
    let mut bytes = fs::read(&fixture).unwrap();
    bytes[903168 + 100] ^= 1;
    fs::write(dir.join("e.vma"), &bytes).unwrap();
    let out = script("ci-verify.sh", &[s(&dir)], &private);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let e = dir.join("e.vma");
    assert_eq!(
        text(&out.stderr),
        format!(
            "vma-verify: {}: extent 1 at byte 903168: header checksum mismatch\n",
            e.display()
        )
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["archives"].clone(), v["ok"].clone()),
        (5.into(), 4.into())
    );
    assert_eq!(v["damaged"], 1);
    assert_eq!(v["results"][4]["status"], "damaged");
    assert_eq!(v["results"][4]["error_offset"], 903168);

    let empty = d.join("empty");
    fs::create_dir(&empty).unwrap();
    let out = script("ci-verify.sh", &[s(&empty)], &private);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        format!(
            "ci-verify: {}: no archives (*.vma, *.vma.zst, *.vma.gz, *.vma.lzo)\n",
            empty.display()
        )
    );
}

/// to-qcow2.sh: the disks of a compressed backup become qcow2 images equal
/// to the source disks, read through `vma-decode serve` (no raw copy left).
#[test]
fn to_qcow2() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let private = d.join("tmp");
    fs::create_dir(&private).unwrap();
    make_disk(&d.join("a.raw"), 3 << 20, 3);
    make_disk(&d.join("b.raw"), 1 << 20, 5);
    let st = Command::new("bash")
        .args([
            "-c",
            "vma-encode drive-scsi0=a.raw drive-virtio1=b.raw 2>/dev/null | zstd -q -c > vm.vma.zst",
        ])
        .current_dir(d)
        .env(
            "PATH",
            format!(
                "{}:{}",
                common::bin("vma-encode").parent().unwrap().display(),
                std::env::var("PATH").unwrap()
            ),
        )
        .status()
        .unwrap();
    assert!(st.success());
    let out_dir = d.join("qcow2");
    let out = script(
        "to-qcow2.sh",
        &[s(&d.join("vm.vma.zst")), s(&out_dir)],
        &private,
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        text(&out.stdout),
        format!(
            "to-qcow2: {o}/drive-scsi0.qcow2 (3145728 bytes virtual)\nto-qcow2: {o}/drive-virtio1.qcow2 (1048576 bytes virtual)\n",
            o = out_dir.display()
        )
    );
    for (raw, q) in [
        ("a.raw", "drive-scsi0.qcow2"),
        ("b.raw", "drive-virtio1.qcow2"),
    ] {
        let st = Command::new("qemu-img")
            .args(["compare", "-q", "-f", "raw", "-F", "qcow2"])
            .arg(d.join(raw))
            .arg(out_dir.join(q))
            .status()
            .unwrap();
        assert!(st.success(), "{q} differs from {raw}");
    }
    let mut left: Vec<String> = fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["drive-scsi0.qcow2", "drive-virtio1.qcow2"]);
}
