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
    common::run_example("demo.sh");
}
