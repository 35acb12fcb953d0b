//! Records the git revision being built, for every tool's `--version`:
//! `VMA_TOOLS_GIT_REV` at compile time is the short commit hash, or empty
//! outside a git checkout (a source tarball, `cargo install` from a
//! package) or without git. A packager may set `VMA_TOOLS_GIT_REV` in the
//! environment to name the revision instead.

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=VMA_TOOLS_GIT_REV");
    let rev = match std::env::var("VMA_TOOLS_GIT_REV") {
        Ok(r) => r,
        Err(_) => {
            let rev = git(&["rev-parse", "--short=12", "HEAD"]);
            if rev.is_some() {
                // Build again when HEAD moves: HEAD itself, the branch it
                // names, and packed refs.
                let mut watch = vec!["HEAD".to_string(), "packed-refs".to_string()];
                if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
                    watch.push(r);
                }
                for w in watch {
                    if let Some(p) = git(&["rev-parse", "--path-format=absolute", "--git-path", &w])
                    {
                        if Path::new(&p).exists() {
                            println!("cargo:rerun-if-changed={p}");
                        }
                    }
                }
            }
            rev.unwrap_or_default()
        }
    };
    println!("cargo:rustc-env=VMA_TOOLS_GIT_REV={rev}");
}
