//! docs/DEPLOY.md and contrib/systemd as written: the ExecStart lines of
//! `cbw-tap@.service` and `cbw-tap-backup@.service` (with the install
//! paths pointed at this build and /run at a temporary directory) serve a
//! disk and back it up, QEMU accepts DEPLOY.md's `-blockdev` exactly as the
//! `args:` line gives it and reads the disk through it, and the unit stops
//! cleanly on its KillSignal.

mod common;

use std::fs;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The `KEY=` line of a unit (continuation lines joined).
fn unit_value(unit: &str, key: &str) -> String {
    let joined = unit.replace("\\\n", " ");
    joined
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in the unit"))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn units_and_blockdev_line_work_as_documented() {
    let root = common::root();
    let serve_unit = fs::read_to_string(root.join("contrib/systemd/cbw-tap@.service")).unwrap();
    let backup_unit =
        fs::read_to_string(root.join("contrib/systemd/cbw-tap-backup@.service")).unwrap();
    assert_eq!(unit_value(&serve_unit, "KillSignal"), "SIGTERM");
    assert_eq!(unit_value(&serve_unit, "Restart"), "always");
    assert_eq!(unit_value(&serve_unit, "RuntimeDirectory"), "cbw-tap/%i");
    assert_eq!(unit_value(&serve_unit, "Before"), "pve-guests.service");
    assert_eq!(unit_value(&backup_unit, "Requires"), "cbw-tap@%i.service");

    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let run = d.join("run/cbw-tap/100");
    fs::create_dir_all(&run).unwrap();
    let disk = d.join("vm-100-disk-0.raw");
    let mut data = vec![0u8; 2 << 20];
    for (i, b) in data.iter_mut().enumerate().take(1 << 20) {
        *b = (i * 7 % 251) as u8;
    }
    fs::write(&disk, &data).unwrap();
    let bins = common::bin("cbw-tap").parent().unwrap().to_path_buf();
    let subst = |line: &str| -> Vec<String> {
        line.replace("%i", "100")
            .replace("/run/cbw-tap/100", run.to_str().unwrap())
            .replace("/usr/local/bin/", &format!("{}/", bins.display()))
            .replace(
                "/usr/local/lib/vma-tools/backup-cron.sh",
                root.join("examples/backup-cron.sh").to_str().unwrap(),
            )
            .replace(" $CBW_TAP_ARGS", "")
            .replace("$EXPORTS", &format!("drive-scsi0={}", disk.display()))
            .replace("${VM_CONFIG}", d.join("100.restore.conf").to_str().unwrap())
            .replace("${BACKUP_DIR}", d.join("dump").to_str().unwrap())
            .replace("${KEEP}", "7")
            .split(' ')
            .map(String::from)
            .collect()
    };
    /// Stopped with the unit's KillSignal (SIGTERM) however the test ends.
    struct Unit(Option<std::process::Child>);
    impl Unit {
        #[allow(unsafe_code)]
        fn stop(&mut self) -> std::process::ExitStatus {
            let mut child = self.0.take().unwrap();
            // SAFETY: kill(2) on our own child, not yet waited for.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            child.wait().unwrap()
        }
    }
    impl Drop for Unit {
        fn drop(&mut self) {
            if self.0.is_some() {
                self.stop();
            }
        }
    }
    let argv = subst(&unit_value(&serve_unit, "ExecStart"));
    let mut serve = Unit(Some(
        Command::new(&argv[0])
            .args(&argv[1..])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ));
    let sock = run.join("nbd.sock");
    let ctl = run.join("nbd.sock.ctl");
    for _ in 0..500 {
        if sock.exists() && ctl.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(ctl.exists(), "the unit's ExecStart does not serve");

    // DEPLOY.md's -blockdev, exactly as its `qm set --args` gives it, in
    // QEMU itself: it connects and reads the disk.
    let deploy = fs::read_to_string(root.join("docs/DEPLOY.md")).unwrap();
    let blockdev = deploy
        .lines()
        .find_map(|l| l.strip_prefix("-blockdev driver=nbd,server.type=unix,server.path=/run/cbw-tap/100/nbd.sock,export=drive-scsi0,"))
        .expect("DEPLOY.md's args line for drive-scsi0")
        .trim_end_matches(" \\");
    let blockdev = format!(
        "driver=nbd,server.type=unix,server.path={},export=drive-scsi0,{blockdev}",
        sock.display()
    );
    assert!(blockdev.contains("reconnect-delay=30"), "{blockdev}");
    let node = blockdev
        .split(',')
        .find_map(|kv| kv.strip_prefix("node-name="))
        .unwrap()
        .to_string();
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-monitor",
            "stdio",
        ])
        .arg("-blockdev")
        .arg(&blockdev)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-system-x86_64 (qemu-system-x86)");
    {
        use std::io::Write;
        let stdin = qemu.stdin.as_mut().unwrap();
        writeln!(stdin, "qemu-io {node} \"read -P 0 1M 1M\"").unwrap();
        writeln!(stdin, "qemu-io {node} \"read -v 0 16\"").unwrap();
        writeln!(stdin, "quit").unwrap();
    }
    let out = qemu.wait_with_output().unwrap();
    let shown = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    assert!(
        out.status.success(),
        "{shown}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        shown.contains("read 1048576/1048576 bytes at offset 1048576"),
        "{shown}"
    );
    assert!(
        shown.contains("00000000:  00 07 0e 15 1c 23 2a 31 38 3f 46 4d 54 5b 62 69"),
        "{shown}"
    );

    // The backup unit's ExecStart, with its environment file's settings.
    fs::write(
        d.join("100.restore.conf"),
        "#qmdump#map:scsi0:drive-scsi0:local-lvm:raw:\nscsi0: local-lvm:vm-100-disk-0,size=2M\n",
    )
    .unwrap();
    let argv = subst(&unit_value(&backup_unit, "ExecStart"));
    let out = Command::new(&argv[0])
        .args(&argv[1..])
        .env("VMA_BIN", &bins)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(
        line.starts_with(&format!(
            "backup-cron: OK {}/vzdump-qemu-100-",
            d.join("dump").display()
        )),
        "{line}"
    );
    let archive: Vec<_> = fs::read_dir(d.join("dump"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(archive.len(), 1);
    let restored = d.join("restored");
    let out = Command::new(common::bin("vma-decode"))
        .arg("extract")
        .arg(&archive[0])
        .arg(&restored)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        fs::read(restored.join("disk-drive-scsi0.raw")).unwrap(),
        data
    );

    // KillSignal: exit 0, both sockets removed.
    let status = serve.stop();
    assert!(status.success(), "{status:?}");
    assert!(!sock.exists() && !ctl.exists());
}
