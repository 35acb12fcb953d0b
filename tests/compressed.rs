//! Compressed archives, end to end: every Proxmox fixture and the real
//! fragment, compressed as vzdump compresses them (`zstd -T0 --rsyncable`,
//! `pigz`, `lzop`), give exactly what the plain archive gives — `list`,
//! `config`, `vma-verify`, extracted bytes, and the same errors — from files
//! and from stdin. Cut and bit-flipped compressed files fail cleanly: exit
//! 1, one line naming the input and the compressor, nothing extracted.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{bin, fixtures, sha256_file};

/// The archives: the four Proxmox fixtures and the real (truncated) fragment.
fn archives(work: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = ["one-disk", "multi-disk", "full", "empty"]
        .iter()
        .map(|n| fixtures().join("pve").join(format!("{n}.vma")))
        .collect();
    let mut frag = Vec::new();
    flate2::read::GzDecoder::new(
        fs::File::open(fixtures().join("real/proxmox-fragment.vma.gz")).unwrap(),
    )
    .read_to_end(&mut frag)
    .unwrap();
    let p = work.join("fragment.vma");
    fs::write(&p, frag).unwrap();
    v.push(p);
    v
}

/// The compressors, as vzdump runs them, and their file suffixes.
const COMPRESSORS: [(&str, &[&str], &str); 3] = [
    ("zstd", &["-q", "-T0", "--rsyncable", "-c"], "zst"),
    ("pigz", &["-c"], "gz"),
    ("lzop", &["-c"], "lzo"),
];

fn compress(tool: &str, args: &[&str], src: &Path, dst: &Path) {
    let out = Command::new(tool)
        .args(args)
        .arg(src)
        .output()
        .unwrap_or_else(|e| panic!("{tool} must be installed (.ci/run installs it): {e}"));
    assert!(out.status.success(), "{tool} failed");
    fs::write(dst, out.stdout).unwrap();
}

/// Runs a tool on a file path, or with the file's bytes on stdin (`-`).
fn run(tool: &str, args: &[&str], file: &Path, stdin: bool) -> Output {
    let mut cmd = Command::new(bin(tool));
    cmd.env("TZ", "UTC");
    if stdin {
        cmd.args(args.iter().map(|a| if *a == "@" { "-" } else { a }));
        common::output_with_stdin(cmd, &fs::read(file).unwrap())
    } else {
        cmd.args(
            args.iter()
                .map(|a| if *a == "@" { file.to_str().unwrap() } else { a }),
        );
        cmd.output().unwrap()
    }
}

/// Exit code, stdout, stderr with the input's name replaced by `NAME`.
fn seen(o: &Output, name: &str) -> (Option<i32>, String, String) {
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).replace(name, "NAME"),
        String::from_utf8_lossy(&o.stderr).replace(name, "NAME"),
    )
}

fn dir_files(dir: &Path) -> BTreeMap<String, String> {
    match fs::read_dir(dir) {
        Err(_) => BTreeMap::new(),
        Ok(rd) => rd
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    sha256_file(&e.path()),
                )
            })
            .collect(),
    }
}

#[test]
fn compressed_archives_read_exactly_as_plain_ones() {
    let work = tempfile::tempdir().unwrap();
    for plain in archives(work.path()) {
        let base = plain.file_name().unwrap().to_str().unwrap().to_string();
        let mut variants = Vec::new();
        for (tool, args, ext) in COMPRESSORS {
            let c = work.path().join(format!("{base}.{ext}"));
            compress(tool, args, &plain, &c);
            variants.push(c);
        }
        let configs: Vec<String> = {
            let o = run("vma-decode", &["list", "@"], &plain, false);
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.strip_prefix("CFG: "))
                .map(|l| l.split(" name: ").nth(1).unwrap().to_string())
                .collect()
        };
        assert!(!configs.is_empty(), "{base}: every fixture has a config");

        for stdin in [false, true] {
            let name_of = |p: &Path| {
                if stdin {
                    "<stdin>".to_string()
                } else {
                    p.to_str().unwrap().to_string()
                }
            };
            let mut commands: Vec<Vec<&str>> = vec![
                vec!["vma-decode", "list", "@"],
                vec!["vma-verify", "@"],
                vec!["vma-verify", "-v", "@"],
            ];
            for c in &configs {
                commands.push(vec!["vma-decode", "config", "@", "-c", c]);
            }
            for cmd in &commands {
                let want = seen(&run(cmd[0], &cmd[1..], &plain, stdin), &name_of(&plain));
                for v in &variants {
                    let got = seen(&run(cmd[0], &cmd[1..], v, stdin), &name_of(v));
                    assert_eq!(got, want, "{cmd:?} on {} (stdin: {stdin})", v.display());
                }
            }
            // Extract: the same files with the same bytes, or the same failure.
            let out = work.path().join("want");
            let _ = fs::remove_dir_all(&out);
            let want_o = run(
                "vma-decode",
                &["extract", "@", out.to_str().unwrap()],
                &plain,
                stdin,
            );
            let want = (
                seen(&want_o, &name_of(&plain)).0,
                seen(&want_o, &name_of(&plain)).2,
                dir_files(&out),
            );
            for v in &variants {
                let got_dir = work.path().join("got");
                let _ = fs::remove_dir_all(&got_dir);
                let o = run(
                    "vma-decode",
                    &["extract", "@", got_dir.to_str().unwrap()],
                    v,
                    stdin,
                );
                let s = seen(&o, &name_of(v));
                let got = (
                    s.0,
                    s.2.replace(got_dir.to_str().unwrap(), "DIR"),
                    dir_files(&got_dir),
                );
                let want = (
                    want.0,
                    want.1.replace(out.to_str().unwrap(), "DIR"),
                    want.2.clone(),
                );
                assert_eq!(got, want, "extract {} (stdin: {stdin})", v.display());
            }
        }
    }
}

#[test]
fn cut_and_corrupt_compressed_archives_fail_cleanly() {
    let work = tempfile::tempdir().unwrap();
    let plain = fixtures().join("pve/multi-disk.vma");
    for (tool, args, ext) in COMPRESSORS {
        let c = work.path().join(format!("m.vma.{ext}"));
        compress(tool, args, &plain, &c);
        let bytes = fs::read(&c).unwrap();
        let name = if tool == "pigz" { "gzip" } else { tool };

        let cut = work.path().join(format!("cut.vma.{ext}"));
        fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
        let mut flipped = bytes.clone();
        let at = bytes.len() / 2;
        flipped[at] ^= 0x08;
        let flip = work.path().join(format!("flip.vma.{ext}"));
        fs::write(&flip, &flipped).unwrap();

        for (file, what) in [(&cut, "truncated"), (&flip, "corrupt")] {
            for stdin in [false, true] {
                let shown = if stdin {
                    "<stdin>".to_string()
                } else {
                    file.display().to_string()
                };
                let prefix = format!("vma-verify: {shown}: {name}: compressed data is {what} (");
                let o = run("vma-verify", &["@"], file, stdin);
                let err = String::from_utf8_lossy(&o.stderr).into_owned();
                assert_eq!(o.status.code(), Some(1), "verify {}: {err}", file.display());
                assert!(
                    err.starts_with(&prefix) && err.lines().count() == 1,
                    "verify {} (stdin {stdin}): {err:?} should start with {prefix:?}",
                    file.display()
                );
                assert!(o.stdout.is_empty());

                let out = work.path().join(format!("out-{ext}-{what}-{stdin}"));
                let o = run(
                    "vma-decode",
                    &["extract", "@", out.to_str().unwrap()],
                    file,
                    stdin,
                );
                let err = String::from_utf8_lossy(&o.stderr).into_owned();
                let prefix = prefix.replacen("vma-verify: ", "vma-decode: ", 1);
                assert_eq!(
                    o.status.code(),
                    Some(1),
                    "extract {}: {err}",
                    file.display()
                );
                assert!(
                    err.starts_with(&prefix) && err.lines().count() == 1,
                    "{err:?}"
                );
                assert_eq!(
                    dir_files(&out),
                    BTreeMap::new(),
                    "extract left files behind"
                );
            }
        }
    }
}
