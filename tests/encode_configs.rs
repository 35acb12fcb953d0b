//! `vma-encode -c`: `NAME=PATH` stores PATH under NAME, a bare PATH under
//! its base name (as Proxmox); an archive with disks but no
//! `qemu-server.conf` gets a warning that qmrestore will not restore it.

mod common;

use std::fs;
use std::process::{Command, Output};

use common::bin;

fn encode(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(bin("vma-encode"))
        .current_dir(dir)
        .args(["--ctime", "0"])
        .args(args)
        .output()
        .unwrap()
}

fn list(archive: &[u8]) -> String {
    let mut cmd = Command::new(bin("vma-decode"));
    cmd.env("TZ", "UTC").args(["list", "-"]);
    String::from_utf8_lossy(&common::output_with_stdin(cmd, archive).stdout).into_owned()
}

const WARNING: &str = "vma-encode: warning: no config named qemu-server.conf in the archive: \
Proxmox's qmrestore will not restore it (add -c qemu-server.conf=PATH)\n";

#[test]
fn names_as_given_or_the_base_name() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    fs::create_dir(d.join("etc")).unwrap();
    fs::write(d.join("etc/100.conf"), b"memory: 2048\n").unwrap();
    fs::write(d.join("fw"), b"[OPTIONS]\n").unwrap();
    fs::write(d.join("a=b.conf"), b"eq\n").unwrap();
    fs::write(d.join("disk.raw"), vec![1u8; 8192]).unwrap();

    let o = encode(
        d,
        &[
            "-c",
            "qemu-server.conf=etc/100.conf",
            "-c",
            "qemu-server.fw=fw",
            "-c",
            "./a=b.conf",
            "drive-scsi0=disk.raw",
        ],
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "",
        "no warning with qemu-server.conf"
    );
    assert_eq!(
        list(&o.stdout),
        "CFG: size: 13 name: qemu-server.conf\nCFG: size: 10 name: qemu-server.fw\n\
         CFG: size: 3 name: a=b.conf\nDEV: dev_id=1 size: 8192 devname: drive-scsi0\n\
         CTIME: Thu Jan  1 00:00:00 1970\n"
    );

    // A bare path: its base name, as Proxmox stores it; no qemu-server.conf,
    // so the warning (once, after the archive is complete).
    let o = encode(d, &["-c", "etc/100.conf", "drive-scsi0=disk.raw"]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&o.stderr), WARNING);
    assert!(list(&o.stdout).starts_with("CFG: size: 13 name: 100.conf\n"));

    // No disks, nothing to restore: no warning.
    let o = encode(d, &["-c", "etc/100.conf"]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&o.stderr), "");

    // A name that cannot be a file name is refused; a failed encode does not warn.
    let o = encode(d, &["-c", "..=fw", "drive-scsi0=disk.raw"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with("vma-encode: fw: ") && err.lines().count() == 1,
        "{err}"
    );
    assert!(o.stdout.is_empty());
}
