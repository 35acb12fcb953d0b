//! Issue 8 end to end: what `vma-encode -o` does with each kind of path,
//! broken pipes, signals, image formats taken as raw, and the usage errors
//! of vma-encode (items 2, 8, 9, 13, 14); signals during an extract.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{symlink, FileTypeExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::bin;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A 3-cluster image with some data.
fn image(dir: &Path) -> PathBuf {
    let p = dir.join("disk.raw");
    let mut data = vec![0u8; 3 * 65536];
    data[5000] = 7;
    data[70000..80000].fill(0xa5);
    fs::write(&p, data).unwrap();
    p
}

fn encode(args: &[&str]) -> Output {
    Command::new(bin("vma-encode"))
        .args([
            "--uuid",
            "00000000-0000-0000-0000-000000000008",
            "--ctime",
            "5",
        ])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

/// The archive of `image` as vma-encode writes it to a pipe.
fn reference(image: &Path) -> Vec<u8> {
    reference_with(&[image.to_str().unwrap()])
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn an_existing_archive_is_replaced_only_with_force() {
    let d = tempfile::tempdir().unwrap();
    let img = image(d.path());
    let dest = d.path().join("a.vma");
    fs::write(&dest, b"precious").unwrap();
    let out = encode(&["-o", s(&dest), s(&img)]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        format!(
            "vma-encode: {}: exists (--force replaces it)\n",
            dest.display()
        )
    );
    assert_eq!(fs::read(&dest).unwrap(), b"precious");
    let out = encode(&["--force", "-o", s(&dest), s(&img)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(fs::read(&dest).unwrap(), reference(&img));
    assert_eq!(
        fs::read_dir(d.path()).unwrap().count(),
        2,
        "a temporary file was left"
    );
}

#[test]
fn devices_and_fifos_are_written_in_place() {
    let d = tempfile::tempdir().unwrap();
    let img = image(d.path());
    // A character device: /dev/null stays /dev/null.
    let out = encode(&["-o", "/dev/null", s(&img)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(fs::metadata("/dev/null")
        .unwrap()
        .file_type()
        .is_char_device());
    // A FIFO: its reader gets the archive, the FIFO stays.
    let fifo = d.path().join("pipe");
    let st = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(st.success());
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            let mut got = Vec::new();
            fs::File::open(&fifo)
                .unwrap()
                .read_to_end(&mut got)
                .unwrap();
            got
        })
    };
    let out = encode(&["-o", s(&fifo), s(&img)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(reader.join().unwrap(), reference(&img));
    assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
    assert_eq!(fs::read_dir(d.path()).unwrap().count(), 2);
}

#[test]
fn symbolic_links_are_followed_never_replaced() {
    let d = tempfile::tempdir().unwrap();
    let img = image(d.path());
    // -o /dev/stdout: the archive on standard output, in place.
    let out = encode(&["-o", "/dev/stdout", s(&img)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(out.stdout, reference(&img));
    // ... and when standard output is a file, into that file.
    let stdout_file = d.path().join("stdout.vma");
    let out = Command::new(bin("vma-encode"))
        .args([
            "--uuid",
            "00000000-0000-0000-0000-000000000008",
            "--ctime",
            "5",
        ])
        .args(["-o", "/dev/stdout", s(&img)])
        .stdout(fs::File::create(&stdout_file).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(fs::read(&stdout_file).unwrap(), reference(&img));
    fs::remove_file(&stdout_file).unwrap();
    // A link to an existing archive: refused; with --force its target is
    // replaced and the link stays a link.
    let target = d.path().join("real.vma");
    fs::write(&target, b"old").unwrap();
    let link = d.path().join("link.vma");
    symlink(&target, &link).unwrap();
    let out = encode(&["-o", s(&link), s(&img)]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert_eq!(fs::read(&target).unwrap(), b"old");
    let out = encode(&["--force", "-o", s(&link), s(&img)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(fs::read(&target).unwrap(), reference(&img));
    // A dangling link: refused, nothing created.
    let dangling = d.path().join("dangling.vma");
    symlink(d.path().join("nowhere.vma"), &dangling).unwrap();
    let out = encode(&["--force", "-o", s(&dangling), s(&img)]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        format!(
            "vma-encode: {}: a symbolic link to nothing (refusing to create its target)\n",
            dangling.display()
        )
    );
    assert!(!d.path().join("nowhere.vma").exists());
    assert_eq!(fs::read_dir(d.path()).unwrap().count(), 4);
}

#[test]
fn dash_o_dash_is_standard_output() {
    let d = tempfile::tempdir().unwrap();
    let img = image(d.path());
    let out = Command::new(bin("vma-encode"))
        .args([
            "--uuid",
            "00000000-0000-0000-0000-000000000008",
            "--ctime",
            "5",
            "-o",
            "-",
        ])
        .arg(&img)
        .current_dir(d.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(out.stdout, reference(&img));
    assert!(!d.path().join("-").exists());
}

#[test]
fn nothing_to_archive_and_negative_times_are_usage_errors() {
    let d = tempfile::tempdir().unwrap();
    let dest = d.path().join("a.vma");
    let out = Command::new(bin("vma-encode"))
        .args(["-o", s(&dest)])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        "vma-encode: nothing to archive: give NAME=SOURCE…, '-' (a cluster stream) or -c CONFIG\n"
    );
    assert!(!dest.exists());
    let img = image(d.path());
    let out = Command::new(bin("vma-encode"))
        .args(["--ctime", "-5", "-o", s(&dest), s(&img)])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        "vma-encode: --ctime -5: before 1970; give 0 or more seconds since the epoch\n"
    );
    let out = Command::new(bin("vma-encode"))
        .args(["-o", s(&dest), s(&img)])
        .env("SOURCE_DATE_EPOCH", "-1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(!dest.exists());
}

/// Runs `cmd` with its standard output a pipe nobody reads any more: every
/// write fails with EPIPE, whenever it happens.
fn with_closed_stdout(mut cmd: Command) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    cmd.stdout(writer).stderr(Stdio::piped()).output().unwrap()
}

#[test]
fn broken_pipes_end_informational_output_quietly_and_fail_data_output() {
    let d = tempfile::tempdir().unwrap();
    let img = image(d.path());
    let archive = d.path().join("a.vma");
    fs::write(&archive, reference(&img)).unwrap();
    let conf = d.path().join("qemu-server.conf");
    fs::write(&conf, "memory: 512\n".repeat(1000)).unwrap();
    let with_conf = d.path().join("c.vma");
    let out = encode(&["-c", s(&conf), "-o", s(&with_conf), s(&img)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Informational: exit 0, nothing on stderr.
    for args in [vec!["list", s(&archive)], vec!["config", s(&with_conf)]] {
        let mut cmd = Command::new(bin("vma-decode"));
        cmd.args(&args);
        let out = with_closed_stdout(cmd);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert_eq!(text(&out.stderr), "");
    }
    // No such config: still its own error, not a pipe error.
    let mut cmd = Command::new(bin("vma-decode"));
    cmd.args(["config", s(&with_conf), "-c", "x"]);
    assert_eq!(with_closed_stdout(cmd).status.code(), Some(1));
    for flag in ["-v", "--json"] {
        let mut cmd = Command::new(bin("vma-verify"));
        cmd.args([flag, s(&archive), s(&archive)]);
        let out = with_closed_stdout(cmd);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert_eq!(text(&out.stderr), "");
    }
    // The verdict stays the exit status.
    let bad = d.path().join("bad.vma");
    let mut bytes = reference(&img);
    bytes.truncate(bytes.len() - 1);
    fs::write(&bad, &bytes).unwrap();
    let mut cmd = Command::new(bin("vma-verify"));
    cmd.args(["-v", s(&archive), s(&bad)]);
    let out = with_closed_stdout(cmd);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).starts_with(&format!("vma-verify: {}: extent 0 at byte", bad.display()))
    );
    // Help.
    let mut cmd = Command::new(bin("vma-decode"));
    cmd.arg("--help");
    assert_eq!(with_closed_stdout(cmd).status.code(), Some(0));
    // Data: an archive to a closed pipe is a failure, one line.
    let mut cmd = Command::new(bin("vma-encode"));
    cmd.arg(&img);
    let out = with_closed_stdout(cmd);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(
        text(&out.stderr),
        "vma-encode: stdout: write failed: Broken pipe (os error 32)\n"
    );
}

/// A cluster stream cut after its first record: vma-encode waits for more.
fn stream_start() -> Vec<u8> {
    use vma_format::stream::{StreamDevice, StreamWriter};
    let devs = [StreamDevice::new("drive-scsi0", 4 * 65536)];
    let mut w = StreamWriter::new(Vec::new(), 0, &devs).unwrap();
    let data = vec![3u8; 4096];
    w.write_cluster(&vma_format::Cluster {
        dev_id: 1,
        cluster_num: 2,
        mask: vma_format::BlockMask(1),
        data: &data,
    })
    .unwrap();
    let mut bytes = w.finish().unwrap();
    bytes.truncate(bytes.len() - (12 + 8 + 4));
    bytes
}

#[test]
#[allow(unsafe_code)]
fn signals_remove_the_temporary_archive() {
    for (sig, num) in [
        ("INT", libc::SIGINT),
        ("TERM", libc::SIGTERM),
        ("HUP", libc::SIGHUP),
    ] {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("a.vma");
        let mut child = Command::new(bin("vma-encode"))
            .args(["-o", s(&dest), "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&stream_start()).unwrap();
        // Wait until the temporary file exists (no timed assertion: the
        // deadline only keeps a broken build from hanging).
        let deadline = Instant::now() + Duration::from_secs(120);
        while fs::read_dir(d.path()).unwrap().count() == 0 {
            assert!(Instant::now() < deadline, "no temporary file appeared");
            std::thread::sleep(Duration::from_millis(10));
        }
        let tmp = fs::read_dir(d.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .file_name();
        assert!(tmp.to_string_lossy().starts_with(".a.vma.tmp-"), "{tmp:?}");
        // SAFETY: kill(2) on our own child's pid.
        let sent = unsafe { libc::kill(child.id() as libc::pid_t, num) };
        assert_eq!(sent, 0);
        let out = child.wait_with_output().unwrap();
        drop(stdin);
        assert_eq!(out.status.code(), Some(128 + num), "SIG{sig}");
        assert_eq!(
            text(&out.stderr),
            format!("vma-encode: interrupted by SIG{sig}: removed 1 partial output\n")
        );
        assert_eq!(
            fs::read_dir(d.path()).unwrap().count(),
            0,
            "SIG{sig}: left a file"
        );
    }
}

fn qemu_img(dir: &Path, fmt: &str) -> Option<PathBuf> {
    let p = dir.join(format!("disk.{fmt}"));
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", fmt])
        .arg(&p)
        .arg("1M")
        .status()
        .ok()?;
    assert!(st.success());
    Some(p)
}

#[test]
fn image_formats_are_refused_as_raw_sources_and_exports() {
    let d = tempfile::tempdir().unwrap();
    let Some(qcow) = qemu_img(d.path(), "qcow2") else {
        panic!("qemu-img (qemu-utils) is needed");
    };
    let hint = |p: &Path| {
        format!(
            "{0}: is a qcow2 image, not a raw disk: convert it (qemu-img convert -f qcow2 -O raw {0} DISK.raw) or attach it raw (qemu-nbd -c /dev/nbd0 -f qcow2 {0})",
            p.display()
        )
    };
    let dest = d.path().join("a.vma");
    let out = encode(&["-o", s(&dest), &format!("drive-scsi0={}", qcow.display())]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        format!(
            "vma-encode: {}; --assume-raw takes it as a raw disk\n",
            hint(&qcow)
        )
    );
    assert!(!dest.exists());
    let out = encode(&["--assume-raw", "-o", s(&dest), s(&qcow)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for fmt in ["vmdk", "vhdx", "vdi", "qed"] {
        let p = qemu_img(d.path(), fmt).unwrap();
        let out = encode(&[s(&p)]);
        assert_eq!(out.status.code(), Some(2), "{fmt}");
        assert!(
            text(&out.stderr).contains(&format!("is a {fmt} image")),
            "{fmt}"
        );
    }
    let sock = d.path().join("nbd.sock");
    let out = Command::new(bin("cbw-tap"))
        .args(["serve", "--socket", s(&sock)])
        .arg(format!("drive-scsi0={}", qcow.display()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        format!(
            "cbw-tap serve: {}; --assume-raw serves it as a raw disk\n",
            hint(&qcow)
        )
    );
    assert!(!sock.exists());
    // A guest may write such bytes to its own raw disk: --assume-raw serves
    // the image as it is, byte for byte.
    struct Stop(std::process::Child); // stopped however the checks end
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut tap = Stop(
        Command::new(bin("cbw-tap"))
            .args(["serve", "--assume-raw", "--socket", s(&sock)])
            .arg(format!("drive-scsi0={}", qcow.display()))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(tap.0.try_wait().unwrap().is_none(), "cbw-tap serve exited");
        assert!(t0.elapsed() < Duration::from_secs(30), "no socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    let served = d.path().join("served.raw");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(format!("nbd+unix:///drive-scsi0?socket={}", sock.display()))
        .arg(&served)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    // QEMU's NBD client rounds the size up to whole 512-byte sectors.
    let (got, want) = (fs::read(&served).unwrap(), fs::read(&qcow).unwrap());
    assert_eq!(got.len(), want.len().next_multiple_of(512));
    assert!(got[..want.len()] == want[..] && got[want.len()..].iter().all(|&b| b == 0));
    // SAFETY: kill(2) on our own child's pid.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(tap.0.id() as i32, libc::SIGTERM)
    };
    let status = tap.0.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
#[allow(unsafe_code)]
fn signals_remove_the_partial_images_of_an_extract() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.raw");
    // Big enough that a part of the archive leaves the extract waiting
    // for more, with its temporary image created.
    let mut data = vec![0u8; 64 * 65536];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i / 4096) as u8 | 1;
    }
    fs::write(&img, &data).unwrap();
    let conf = d.path().join("qemu-server.conf");
    fs::write(&conf, "memory: 512\n").unwrap();
    let archive = reference_with(&["-c", s(&conf), &format!("drive-scsi0={}", s(&img))]);
    for (name, sig, num) in [
        ("vma-decode", "TERM", libc::SIGTERM),
        ("vma-decode", "INT", libc::SIGINT),
        ("vma", "HUP", libc::SIGHUP),
    ] {
        let out_dir = d.path().join(format!("out-{sig}"));
        let mut cmd = if name == "vma" {
            let link = d.path().join("vma");
            if !link.exists() {
                symlink(bin("vma-decode"), &link).unwrap();
            }
            let mut c = Command::new(link);
            c.args(["extract", "-", s(&out_dir)]);
            c
        } else {
            let mut c = Command::new(bin("vma-decode"));
            c.args(["extract", "-", s(&out_dir)]);
            c
        };
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&archive[..archive.len() / 2]).unwrap();
        // Wait for the temporary image (the deadline only keeps a broken
        // build from hanging).
        let deadline = Instant::now() + Duration::from_secs(120);
        let tmp = "tmp-disk-drive-scsi0.raw";
        while !out_dir.join(tmp).exists() {
            assert!(Instant::now() < deadline, "no temporary image appeared");
            std::thread::sleep(Duration::from_millis(10));
        }
        // SAFETY: kill(2) on our own child's pid.
        let sent = unsafe { libc::kill(child.id() as libc::pid_t, num) };
        assert_eq!(sent, 0);
        let out = child.wait_with_output().unwrap();
        drop(stdin);
        assert_eq!(out.status.code(), Some(128 + num), "{name} SIG{sig}");
        assert_eq!(
            text(&out.stderr),
            format!("{name}: interrupted by SIG{sig}: removed 1 partial output\n")
        );
        let left: Vec<_> = fs::read_dir(&out_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "{name} SIG{sig}: left {left:?}");
    }
}

/// The archive vma-encode writes to a pipe for these arguments.
fn reference_with(args: &[&str]) -> Vec<u8> {
    let out = encode(args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    out.stdout
}
