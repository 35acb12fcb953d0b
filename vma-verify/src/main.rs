//! `vma-verify ARCHIVE…`: checks VMA archives; the exit status says whether
//! they are sound. The checks and the report live in the library.

use std::io::{self, Write};
use std::process::ExitCode;

use clap::Parser;
use vma_cli::exit;
use vma_verify::cli::Args;

fn main() -> ExitCode {
    let args = Args::parse();
    if args.archives.iter().filter(|a| a.as_str() == "-").count() > 1 {
        eprintln!("vma-verify: standard input (`-`) can be read only once");
        return ExitCode::from(exit::USAGE as u8);
    }
    let mut worst = exit::OK;
    let stdout = io::stdout();
    // Once the reader of the reports has gone (EPIPE), stop printing them
    // but go on verifying: the exit status is still the verdict.
    let mut reader_gone = false;
    for path in &args.archives {
        // A bar on a terminal (not with -q): archive bytes read, rate, ETA.
        let bar = (!args.quiet && vma_cli::bar::wanted(false))
            .then(|| vma_cli::bar::bytes(&vma_format::names::escape(path.as_bytes()), None));
        let report = vma_verify::verify_path_with_bar(path, bar.as_ref());
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        if reader_gone {
            if let Some(line) = report.error_line() {
                eprintln!("vma-verify: {line}");
            }
            worst = worst.max(report.exit_code());
            continue;
        }
        let mut out = stdout.lock();
        let written = if args.json {
            writeln!(out, "{}", report.to_json())
        } else if let Some(line) = report.ok_line().filter(|_| !args.quiet) {
            writeln!(out, "{line}").and_then(|()| {
                if args.verbose {
                    for l in report.device_lines() {
                        writeln!(out, "{l}")?;
                    }
                }
                Ok(())
            })
        } else {
            Ok(())
        };
        if let Err(e) = written.and_then(|()| out.flush()) {
            if !vma_cli::pipe::is_broken_pipe(&e) {
                eprintln!("vma-verify: stdout: {e}");
                return ExitCode::from(exit::IO as u8);
            }
            reader_gone = true;
        }
        if let Some(line) = report.error_line() {
            eprintln!("vma-verify: {line}");
        }
        worst = worst.max(report.exit_code());
    }
    ExitCode::from(worst as u8)
}
