//! Every shell pipeline in examples/ runs and succeeds (with the binaries of
//! this test build).

mod common;

use std::process::Command;

fn run_example(name: &str) {
    let bin_dir = common::bin("vma-decode").parent().unwrap().to_path_buf();
    let work = tempfile::tempdir().unwrap();
    let out = Command::new("bash")
        .arg(common::root().join("examples").join(name))
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

#[test]
fn every_example_is_tested() {
    let mut names: Vec<String> = std::fs::read_dir(common::root().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".sh"))
        .collect();
    names.sort();
    // demo.sh runs below; live-backup.sh runs in tests/cbw.rs (example_live_backup).
    let tested = ["demo.sh", "live-backup.sh"];
    for n in &names {
        assert!(
            tested.contains(&n.as_str()),
            "examples/{n} has no test in tests/examples.rs"
        );
    }
}

#[test]
fn demo() {
    run_example("demo.sh");
}
