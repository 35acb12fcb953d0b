//! What a new user types first: every tool's `--help` (and each
//! subcommand's) shows real examples, and `--version` names the git
//! revision built (just the version outside a git checkout).

mod common;

use std::process::Command;

use common::bin;

fn stdout_of(tool: &str, args: &[&str]) -> String {
    let out = Command::new(bin(tool)).args(args).output().unwrap();
    assert!(out.status.success(), "{tool} {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn every_help_shows_examples_of_the_tool() {
    for (tool, args) in [
        ("cbw-tap", &["--help"][..]),
        ("cbw-tap", &["serve", "--help"]),
        ("cbw-tap", &["backup", "--help"]),
        ("vma-encode", &["--help"]),
        ("vma-decode", &["--help"]),
        ("vma-decode", &["extract", "--help"]),
        ("vma-decode", &["serve", "--help"]),
        ("vma-verify", &["--help"]),
    ] {
        let help = stdout_of(tool, args);
        let examples: Vec<&str> = help
            .split("\n\n")
            .find(|s| s.starts_with("Examples:\n") || s.contains("\nExamples:\n"))
            .unwrap_or_else(|| panic!("{tool} {args:?} shows no examples:\n{help}"))
            .lines()
            .filter(|l| l.starts_with("  ") && !l.starts_with("      "))
            .collect();
        assert!(
            (2..=4).contains(&examples.len()),
            "{tool} {args:?}: {} examples: {examples:?}",
            examples.len()
        );
        for e in examples {
            let e = e.trim_start();
            // An example runs a real tool (ours, or a peer in a pipeline).
            assert!(
                ["cbw-tap", "vma-", "zstd", "qemu-", "nbdfuse", "nbdinfo"]
                    .iter()
                    .any(|t| e.starts_with(t)),
                "{tool}: {e}"
            );
        }
    }
}

#[test]
fn version_names_the_git_revision() {
    let rev = Command::new("git")
        .arg("-C")
        .arg(common::root())
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8(o.stdout).unwrap().trim().to_string());
    for tool in ["cbw-tap", "vma-encode", "vma-decode", "vma-verify"] {
        let v = stdout_of(tool, &["--version"]);
        let want = match &rev {
            Some(rev) => format!("{tool} 0.1.0 (git {rev})\n"),
            None => format!("{tool} 0.1.0\n"),
        };
        assert_eq!(v, want);
    }
}
