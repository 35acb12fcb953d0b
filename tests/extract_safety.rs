//! Extract's file safety: outputs are created only inside the output
//! directory and never through a symlink already there (also with
//! `--force`); nothing gets a final name until every image and config is
//! complete, and a failure removes every temporary file; device names whose
//! `tmp-` name would not fit in 255 bytes still extract; `-` is not an
//! output directory.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::{Command, Output};

use common::bin;
use vma_format::{HeaderBuilder, Writer, WriterOptions};

fn archive(configs: &[(&str, &[u8])], devices: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut h = HeaderBuilder::new([3; 16], 1_700_000_000);
    for (n, d) in configs {
        h.add_config(n, d.to_vec()).unwrap();
    }
    for (n, d) in devices {
        h.add_device(n, d.len() as u64).unwrap();
    }
    let mut w = Writer::new(Vec::new(), &h, WriterOptions::default()).unwrap();
    for (i, (_, data)) in devices.iter().enumerate() {
        for (n, chunk) in data.chunks(65536).enumerate() {
            w.write_raw(i as u8 + 1, n as u32, chunk).unwrap();
        }
    }
    w.finish().unwrap()
}

fn decode(args: &[&str]) -> Output {
    Command::new(bin("vma-decode")).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every entry of `dir`: name → "link -> target", "dir" or the file's bytes.
fn entries(dir: &Path) -> BTreeMap<String, String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            let what = if t.is_symlink() {
                format!("link -> {}", fs::read_link(e.path()).unwrap().display())
            } else if t.is_dir() {
                "dir".to_string()
            } else {
                String::from_utf8_lossy(&fs::read(e.path()).unwrap()).into_owned()
            };
            (e.file_name().to_string_lossy().into_owned(), what)
        })
        .collect()
}

fn small_archive() -> Vec<u8> {
    archive(
        &[("qemu-server.conf", b"memory: 512\n")],
        &[("drive-scsi0", b"disk".repeat(1024))],
    )
}

#[test]
fn symlinks_under_temporary_names_are_never_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a.vma");
    fs::write(&a, small_archive()).unwrap();
    for link in ["tmp-disk-drive-scsi0.raw", "tmp-qemu-server.conf"] {
        let out = tmp.path().join(format!("out-{link}"));
        fs::create_dir(&out).unwrap();
        let victim = tmp.path().join(format!("victim-{link}"));
        fs::write(&victim, b"precious").unwrap();
        symlink(&victim, out.join(link)).unwrap();
        let before = entries(&out);
        let o = decode(&[
            "extract",
            "--force",
            a.to_str().unwrap(),
            out.to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(3), "{link}: {}", stderr(&o));
        assert_eq!(
            stderr(&o),
            format!(
                "vma-decode: {}: File exists (os error 17)\n",
                out.join(link).display()
            )
        );
        assert_eq!(
            fs::read(&victim).unwrap(),
            b"precious",
            "{link} was followed"
        );
        // Nothing added, nothing removed: the link is still there, no image.
        assert_eq!(entries(&out), before, "{link}");
    }
}

#[test]
fn symlinks_under_final_names_are_replaced_not_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a.vma");
    fs::write(&a, small_archive()).unwrap();
    let out = tmp.path().join("out");
    fs::create_dir(&out).unwrap();
    for (i, name) in ["disk-drive-scsi0.raw", "qemu-server.conf"]
        .iter()
        .enumerate()
    {
        let victim = tmp.path().join(format!("victim{i}"));
        fs::write(&victim, b"precious").unwrap();
        symlink(&victim, out.join(name)).unwrap();
    }
    // Without --force the directory is not empty: refused.
    let o = decode(&["extract", a.to_str().unwrap(), out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = decode(&[
        "extract",
        "--force",
        a.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    for i in 0..2 {
        assert_eq!(
            fs::read(tmp.path().join(format!("victim{i}"))).unwrap(),
            b"precious"
        );
    }
    let got = entries(&out);
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got["qemu-server.conf"], "memory: 512\n");
    assert_eq!(got["disk-drive-scsi0.raw"], "disk".repeat(1024));
}

#[test]
fn nothing_gets_a_final_name_unless_everything_is_written() {
    // The config's final name is taken by a directory: the images are
    // complete by then, but none may appear under its final name, and no
    // temporary file may stay.
    let bytes = archive(
        &[("qemu-server.conf", b"c"), ("pve-firewall.fw", b"f")],
        &[
            ("drive-scsi0", vec![1; 70000]),
            ("drive-scsi1", vec![2; 5000]),
        ],
    );
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a.vma");
    fs::write(&a, bytes).unwrap();
    let out = tmp.path().join("out");
    fs::create_dir_all(out.join("pve-firewall.fw")).unwrap();
    let o = decode(&[
        "extract",
        "--force",
        a.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert_eq!(
        stderr(&o),
        format!(
            "vma-decode: {}: is a directory\n",
            out.join("pve-firewall.fw").display()
        )
    );
    assert_eq!(
        entries(&out),
        BTreeMap::from([("pve-firewall.fw".to_string(), "dir".to_string())])
    );
}

#[test]
fn device_names_up_to_the_longest_file_name_extract() {
    let tmp = tempfile::tempdir().unwrap();
    // disk-NAME.raw fits in 255 bytes up to a 246-byte name; tmp-disk-NAME.raw
    // only up to 242.
    for len in [242usize, 243, 244, 245, 246] {
        let name = format!("d{}", "x".repeat(len - 1));
        let long_config = format!("c{}.conf", "y".repeat(249));
        let bytes = archive(&[(&long_config, b"long")], &[(&name, vec![7; 4096])]);
        let a = tmp.path().join(format!("a{len}.vma"));
        fs::write(&a, bytes).unwrap();
        let out = tmp.path().join(format!("o{len}"));
        let o = decode(&["extract", a.to_str().unwrap(), out.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(0), "{len}: {}", stderr(&o));
        let tmp_name = if len <= 242 {
            format!("tmp-disk-{name}.raw")
        } else {
            "tmp-dev1.raw".to_string()
        };
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            format!("DEVINFO {}/{tmp_name} 4096\n", out.display())
        );
        let got = entries(&out);
        assert_eq!(got.len(), 2);
        assert_eq!(got[&format!("disk-{name}.raw")], "\x07".repeat(4096));
        assert_eq!(got[&long_config], "long");
    }
    // 247 bytes: the final name itself cannot exist.
    let name = "z".repeat(247);
    let a = tmp.path().join("a247.vma");
    fs::write(&a, archive(&[], &[(&name, vec![7; 4096])])).unwrap();
    let out = tmp.path().join("o247");
    let o = decode(&["extract", a.to_str().unwrap(), out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3));
    assert_eq!(
        stderr(&o),
        format!(
            "vma-decode: {}: header: device 1: output file name \"disk-{name}.raw\" is longer than 255 bytes\n",
            a.display()
        )
    );
    assert!(!out.exists());
}

#[test]
fn dash_is_not_an_output_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a.vma");
    fs::write(&a, small_archive()).unwrap();
    let o = Command::new(bin("vma-decode"))
        .current_dir(tmp.path())
        .args(["extract", "a.vma", "-"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        stderr(&o),
        "vma-decode: -: not an output directory (extract writes files into a directory; \
         to write one disk to standard output use --stdout DEVNAME)\n"
    );
    assert!(!tmp.path().join("-").exists());
}
