//! `vma-verify ARCHIVE…`: checks VMA archives; the exit status says whether
//! they are sound. The checks and the report live in the library.

use std::io::{self, Write};
use std::process::ExitCode;

use clap::Parser;
use vma_cli::{exit, EXIT_CODES_HELP};

const AFTER_HELP: &str = "\
Each ARCHIVE is read once, front to back (pipes work; `-` is standard input, \
at most once), and every check of the reader is made: header and extent MD5s, \
magic numbers, uuids, block counts, device ids, cluster numbers inside their \
device, no cluster twice, every cluster of every device present at the end, \
and the data checksums our vma-encode stores (Proxmox's archives have none: \
`data checksums: absent`).

Output, per archive, on stdout:
  NAME: ok (N clusters, data checksums: verified|absent|partial)
with -v, one line per device after it:
  dev ID NAME: size BYTES, N of M clusters, stored BYTES bytes, zero BYTES bytes (P% sparse)
with --json instead, one JSON object per archive and line: archive, status \
(ok|damaged|error), uuid, ctime, configs [{name,size}], devices [{id,name,size,\
vmstate,clusters_total,clusters,stored_bytes,zero_bytes}], extents, clusters, \
bytes_read, data_checksums, error (message or null), error_offset (byte or null).
A problem is one line on stderr: `NAME: LOCATION: PROBLEM`, e.g. \
`backup.vma: extent 17 at byte 63029760: header checksum mismatch`.

The exit code is the worst over all archives. ";

/// Checks VMA backup archives without writing anything.
#[derive(Parser, Debug)]
#[command(name = "vma-verify", version, after_help = format!("{AFTER_HELP}{EXIT_CODES_HELP}"))]
struct Args {
    /// Archives to check; `-` reads standard input.
    #[arg(value_name = "ARCHIVE", required = true)]
    archives: Vec<String>,
    /// Print nothing on stdout for sound archives (problems still go to stderr).
    #[arg(short, long, conflicts_with_all = ["verbose", "json"])]
    quiet: bool,
    /// Also print a summary per device (clusters, stored and zero bytes, sparse %).
    #[arg(short, long, conflicts_with = "json")]
    verbose: bool,
    /// Print one JSON object per archive and line on stdout instead of text.
    #[arg(long)]
    json: bool,
}

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
        let report = vma_verify::verify_path(path);
        if reader_gone {
            if let Some(line) = report.error_line() {
                eprintln!("{line}");
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
            eprintln!("{line}");
        }
        worst = worst.max(report.exit_code());
    }
    ExitCode::from(worst as u8)
}
