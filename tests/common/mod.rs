//! Helpers shared by the end-to-end tests: where the binaries and the shared
//! fixtures are, and generating source images with the fixtures' generator.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `../shared/fixtures` beside the project.
pub fn fixtures() -> PathBuf {
    root().join("../shared/fixtures")
}

static BUILD: Once = Once::new();

/// Path of a workspace binary (`vma-decode`, `vma-encode`, …), built first if
/// the test run has not built it (a top-level `cargo test` builds the tests
/// of this package only).
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::current_exe()
        .expect("test executable path")
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf();
    let path = dir.join(name);
    BUILD.call_once(|| {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.current_dir(root())
            .args(["build", "--workspace", "--bins"]);
        if dir.file_name().is_some_and(|p| p == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "cargo build --workspace --bins failed");
    });
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// Runs `../shared/fixtures/make_images.py OUTDIR ARGS…` and panics on failure.
pub fn make_images(outdir: &Path, args: &[&str]) {
    let out = Command::new("python3")
        .arg(fixtures().join("make_images.py"))
        .arg(outdir)
        .args(args)
        .output()
        .expect("python3 must be installed to generate test images");
    assert!(
        out.status.success(),
        "make_images.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// sha256 of a file, as hex.
pub fn sha256_file(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Runs `cmd` with `input` on its standard input and collects its output.
/// The input is fed from a thread, since a tool may stop reading early (a
/// damaged archive, a listing that needs only the header).
pub fn output_with_stdin(mut cmd: Command, input: &[u8]) -> std::process::Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = input.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    out
}

/// Runs `examples/NAME WORKDIR` with the binaries of this test build
/// (`VMA_BIN`); panics with its output if it fails.
pub fn run_example(name: &str) {
    let bin_dir = bin("vma-decode").parent().unwrap().to_path_buf();
    let work = tempfile::tempdir().unwrap();
    let out = Command::new("bash")
        .arg(root().join("examples").join(name))
        .arg(work.path())
        .env("VMA_BIN", &bin_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "examples/{name} failed ({:?})\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One archive's section of `../shared/fixtures/pve/EXPECTED.txt`.
#[derive(Debug, Default)]
pub struct Expected {
    pub list_stdout: String,
    /// name -> (sha256, size)
    pub files: BTreeMap<String, (String, u64)>,
}

pub fn parse_expected() -> BTreeMap<String, Expected> {
    let text = std::fs::read_to_string(fixtures().join("pve/EXPECTED.txt")).unwrap();
    let mut out: BTreeMap<String, Expected> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut mode = "";
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("ARCHIVE ") {
            current = Some(name.trim().to_string());
            out.insert(name.trim().to_string(), Expected::default());
            mode = "";
            continue;
        }
        let Some(name) = &current else { continue };
        let e = out.get_mut(name).unwrap();
        if line.starts_with("$ ") {
            mode = if line.contains("vma list") {
                "list"
            } else {
                ""
            };
            continue;
        }
        if line.starts_with("  extracted files") {
            mode = "files";
            continue;
        }
        if line.starts_with("  ") && !line.starts_with("    ") {
            if line.trim() == "stdout:" && mode == "list" {
                mode = "list-stdout";
            } else if mode != "list-stdout" || line.trim() != "stdout:" {
                mode = if mode == "list-stdout" || mode == "files" {
                    ""
                } else {
                    mode
                };
            }
            continue;
        }
        if let Some(body) = line.strip_prefix("    ") {
            match mode {
                "list-stdout" => {
                    e.list_stdout.push_str(body);
                    e.list_stdout.push('\n');
                }
                "files" => {
                    let parts: Vec<_> = body.split_whitespace().collect();
                    e.files.insert(
                        parts[2].to_string(),
                        (parts[0].to_string(), parts[1].parse().unwrap()),
                    );
                }
                _ => {}
            }
        }
    }
    out
}
