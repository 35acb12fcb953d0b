//! The README's first command on a fresh checkout: the repository is cloned
//! (`git clone` of this checkout's committed HEAD) into a temporary
//! directory and `examples/live-backup.sh` is run there as a new user runs
//! it, without VMA_BIN, with CARGO_TARGET_DIR pointing outside the clone and
//! a private TMPDIR. It must build the binaries itself (showing cargo's
//! progress), find them in that target directory, pass, and leave nothing
//! in TMPDIR.
//!
//! The build uses the profile of this test run (`VMA_PROFILE=dev` for a
//! plain `cargo test`; the README's command builds release, which differs
//! only in cargo's flags) and a target directory kept beside this test
//! run's, so later runs rebuild only what changed. Needs git, qemu-io, zstd
//! and python3.

mod common;

use std::path::PathBuf;
use std::process::Command;

#[test]
fn readme_main_job_runs_from_a_fresh_clone_with_cargo_target_dir_elsewhere() {
    let root = common::root();
    let head = Command::new("git")
        .arg("-C")
        .arg(&root)
        .args(["rev-parse", "HEAD"])
        .output()
        .expect("git must be installed");
    assert!(
        head.status.success(),
        "{} is not a git checkout: {}",
        root.display(),
        String::from_utf8_lossy(&head.stderr)
    );
    // target/<profile>/deps/<test> -> target
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let profile = if profile_dir.file_name().is_some_and(|p| p == "release") {
        "release"
    } else {
        "dev"
    };
    let target: PathBuf = profile_dir.parent().unwrap().join("fresh-clone-target");

    let tmp = tempfile::tempdir().unwrap();
    let clone = tmp.path().join("vma-tools");
    let private_tmp = tmp.path().join("tmp");
    std::fs::create_dir(&private_tmp).unwrap();
    let status = Command::new("git")
        .args(["clone", "--quiet"])
        .arg(&root)
        .arg(&clone)
        .status()
        .unwrap();
    assert!(status.success(), "git clone failed");

    let out = Command::new("bash")
        .arg("examples/live-backup.sh")
        .current_dir(&clone)
        .env_remove("VMA_BIN")
        .env("CARGO_TARGET_DIR", &target)
        .env("VMA_PROFILE", profile)
        .env("TMPDIR", &private_tmp)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "examples/live-backup.sh failed in a fresh clone ({:?})\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(
        stdout.ends_with(
            "live-backup: OK (the archive holds the disks as they were at the instant)\n"
        ),
        "{stdout}"
    );
    // Cargo's own progress is shown, not hidden by --quiet.
    assert!(
        stderr.contains("== building the vma-tools binaries") && stderr.contains("Finished `"),
        "cargo's progress was not shown:\n{stderr}"
    );
    // The binaries are where CARGO_TARGET_DIR says, not in the clone.
    let dir = if profile == "dev" { "debug" } else { "release" };
    assert!(target.join(dir).join("cbw-tap").exists());
    assert!(!clone.join("target").exists(), "built inside the clone");
    let left: Vec<_> = std::fs::read_dir(&private_tmp)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left behind in TMPDIR: {left:?}");
}
