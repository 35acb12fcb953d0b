//! The command line of `vma-verify` (also read by xtask to generate the man
//! page and shell completions).

use clap::Parser;
use vma_cli::EXIT_CODES_HELP;

const EXAMPLES: &str = "\
Examples:
  vma-verify vzdump-qemu-100-2024_05_01-02_00_03.vma.zst
  zstd -dc vm.vma.zst | vma-verify -q -        # in a pipe; only the exit status
  vma-verify --json /backup/*.vma* > report.jsonl
  vma-verify -v vm.vma                         # per-device clusters, stored and zero bytes

";

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
A problem is one line on stderr: `vma-verify: NAME: LOCATION: PROBLEM`, e.g. \
`vma-verify: backup.vma: extent 17 at byte 63029760: header checksum mismatch`.

The exit code is the worst over all archives. ";

/// Checks VMA backup archives without writing anything.
#[derive(Parser, Debug)]
#[command(name = "vma-verify", version = vma_cli::version(env!("CARGO_PKG_VERSION")), after_help = format!("{EXAMPLES}{AFTER_HELP}{EXIT_CODES_HELP}"))]
pub struct Args {
    /// Archives to check; `-` reads standard input.
    #[arg(value_name = "ARCHIVE", required = true)]
    pub archives: Vec<String>,
    /// Print nothing on stdout for sound archives (problems still go to stderr).
    #[arg(short, long, conflicts_with_all = ["verbose", "json"])]
    pub quiet: bool,
    /// Also print a summary per device (clusters, stored and zero bytes, sparse %).
    #[arg(short, long, conflicts_with = "json")]
    pub verbose: bool,
    /// Print one JSON object per archive and line on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}
