//! `cargo xtask gen`: writes the man pages (`docs/man/*.1`) and the bash,
//! zsh and fish completions (`completions/`) of every tool, generated from
//! the same clap definitions the tools parse their arguments with.
//! `cargo xtask check` (and this crate's test, run by `cargo test
//! --workspace`) fails when the checked-in files differ from what the
//! definitions generate now.
//!
//! The man pages carry the crate version only (not the git revision
//! `--version` shows), so they change only when the command lines do.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;

/// The tools' command lines, with the version the man pages show.
fn commands() -> Vec<clap::Command> {
    [
        cbw_tap::cli::Args::command(),
        vma_encode::Args::command(),
        vma_decode::cli::Cli::command(),
        vma_verify::cli::Args::command(),
    ]
    .into_iter()
    .map(|c| c.version(env!("CARGO_PKG_VERSION")))
    .collect()
}

/// Every generated file: its path relative to the workspace root and its
/// content.
fn generated() -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    for cmd in commands() {
        let mut cmd = cmd;
        cmd.build();
        let name = cmd.get_name().to_string();
        files.push((
            PathBuf::from(format!("docs/man/{name}.1")),
            man_page(cmd.clone()),
        ));
        for sub in cmd.get_subcommands() {
            if sub.is_hide_set() || sub.get_name() == "help" {
                continue;
            }
            let full = format!("{name}-{}", sub.get_name());
            files.push((
                PathBuf::from(format!("docs/man/{full}.1")),
                man_page(
                    sub.clone()
                        .name(&*full.clone().leak())
                        .version(env!("CARGO_PKG_VERSION")),
                ),
            ));
        }
        for (shell, path) in [
            (Shell::Bash, format!("completions/bash/{name}")),
            (Shell::Zsh, format!("completions/zsh/_{name}")),
            (Shell::Fish, format!("completions/fish/{name}.fish")),
        ] {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut cmd, &name, &mut out);
            files.push((PathBuf::from(path), out));
        }
    }
    files
}

fn man_page(cmd: clap::Command) -> Vec<u8> {
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd)
        .render(&mut out)
        .expect("rendering into memory cannot fail");
    out
}

/// The workspace root (this crate's parent directory).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
        .to_path_buf()
}

/// The generated files that are missing or differ under `root`.
fn stale(root: &Path) -> Vec<PathBuf> {
    generated()
        .into_iter()
        .filter(|(path, content)| std::fs::read(root.join(path)).ok().as_ref() != Some(content))
        .map(|(path, _)| path)
        .collect()
}

fn main() -> ExitCode {
    let root = root();
    match std::env::args().nth(1).as_deref() {
        Some("gen") => {
            for (path, content) in generated() {
                let path = root.join(path);
                let write = std::fs::create_dir_all(path.parent().unwrap())
                    .and_then(|()| std::fs::write(&path, content));
                if let Err(e) = write {
                    eprintln!("xtask: {}: {e}", path.display());
                    return ExitCode::from(3);
                }
            }
            ExitCode::SUCCESS
        }
        Some("check") => {
            let stale = stale(&root);
            for p in &stale {
                eprintln!("xtask: {}: stale (run `cargo xtask gen`)", p.display());
            }
            if stale.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        _ => {
            eprintln!("usage: cargo xtask gen|check");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CI's staleness check: a change to any tool's flags or help without
    /// `cargo xtask gen` fails here.
    #[test]
    fn man_pages_and_completions_are_up_to_date() {
        let stale = stale(&root());
        assert!(
            stale.is_empty(),
            "stale generated files (run `cargo xtask gen` and commit them): {stale:?}"
        );
    }

    #[test]
    fn every_tool_and_subcommand_has_a_man_page_and_completions() {
        let names: Vec<String> = generated()
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect();
        for want in [
            "docs/man/cbw-tap.1",
            "docs/man/cbw-tap-serve.1",
            "docs/man/cbw-tap-backup.1",
            "docs/man/vma-encode.1",
            "docs/man/vma-decode.1",
            "docs/man/vma-decode-extract.1",
            "docs/man/vma-decode-list.1",
            "docs/man/vma-decode-config.1",
            "docs/man/vma-decode-serve.1",
            "docs/man/vma-verify.1",
            "completions/bash/vma-decode",
            "completions/zsh/_vma-encode",
            "completions/fish/cbw-tap.fish",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "{want} not generated: {names:?}"
            );
        }
        // The examples of --help reach the man pages.
        let (_, page) = generated()
            .into_iter()
            .find(|(p, _)| p.ends_with("vma-verify.1"))
            .unwrap();
        let page = String::from_utf8(page).unwrap();
        assert!(page.contains("Examples:"), "{page}");
        assert!(page.contains("vma\\-verify \\-\\-json"), "{page}");
    }
}
