//! Every shell pipeline in examples/ runs and succeeds (with the binaries of
//! this test build).

mod common;

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
    let tested = ["demo.sh", "live-backup.sh", "serve.sh"];
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
