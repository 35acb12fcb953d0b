//! The command line of `cbw-tap` (also read by xtask to generate the man
//! pages and shell completions).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::serve::parse_export;

const EXAMPLES: &str = "\
Examples:
  cbw-tap serve --socket /run/cbw-tap/vm100.nbd drive-scsi0=/dev/vg/vm-100-disk-0
  cbw-tap backup --control /run/cbw-tap/vm100.nbd.ctl | vma-encode -c qemu-server.conf - | zstd > vm100.vma.zst
  cbw-tap backup --control /run/cbw-tap/vm100.nbd.ctl --bwlimit 200M --pre 'qm guest cmd 100 fsfreeze-freeze' \\
      --post 'qm guest cmd 100 fsfreeze-thaw' > vm100.stream
  qemu-io -f raw 'nbd+unix:///drive-scsi0?socket=/run/cbw-tap/vm100.nbd' -c 'read 0 64k'

";

/// Live point-in-time backups of disks in use: serves images over NBD with
/// copy-before-write, and streams backups of all of them taken at one
/// instant as a cluster stream for `vma-encode -`.
#[derive(Parser)]
#[command(name = "cbw-tap", version = vma_cli::version(env!("CARGO_PKG_VERSION")), after_help = format!("{EXAMPLES}{}", vma_cli::EXIT_CODES_HELP))]
pub struct Args {
    /// What to do.
    #[command(subcommand)]
    pub command: Cmd,
}

/// The subcommands.
#[derive(Subcommand)]
pub enum Cmd {
    /// Serve images as NBD exports until SIGINT/SIGTERM/SIGHUP.
    ///
    /// Clients: qemu-io -f raw 'nbd+unix:///NAME?socket=PATH', QEMU's
    /// -blockdev driver=nbd,server.type=unix,server.path=PATH,export=NAME,
    /// nbdinfo, nbdcopy.
    Serve {
        /// NBD Unix socket to create (mode 0600).
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
        /// Control socket for `cbw-tap backup` (mode 0600) [default: PATH.ctl].
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
        /// Also serve NBD over TCP on this address, e.g. 127.0.0.1:10809
        /// (no TLS, no authentication).
        #[arg(long, value_name = "ADDR:PORT")]
        tcp: Option<SocketAddr>,
        /// Exports: NAME=IMAGE (raw image file or block device), in device
        /// order.
        #[arg(value_name = "NAME=IMAGE", required = true, value_parser = parse_export)]
        exports: Vec<(String, PathBuf)>,
    },
    /// Back up every export of a running server, at one instant, as a
    /// cluster stream on stdout (e.g. `| vma-encode - > vm.vma`).
    ///
    /// Exits 0 only if the stream was finished cleanly; otherwise the stream
    /// ends with an abort record (if it could still be written) or is cut
    /// short, and vma-encode fails too.
    Backup {
        /// The server's control socket.
        #[arg(long, value_name = "PATH")]
        control: PathBuf,
        /// Captured clusters that may wait for the consumer, e.g. 64M.
        #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = crate::size::parse_size)]
        buffer: usize,
        /// Limit the background reader to SIZE bytes per second, e.g. 200M
        /// (copy-before-write is never limited).
        #[arg(long, value_name = "SIZE", value_parser = crate::size::parse_size)]
        bwlimit: Option<usize>,
        /// Fleecing: when the buffer is full, copy-before-write puts old
        /// clusters into FILE (created, mode 0600, removed at the end; must
        /// not exist) instead of making the guest wait.
        #[arg(long, value_name = "FILE")]
        fleecing: Option<PathBuf>,
        /// How long a guest write may wait for its copy when the buffer is
        /// full; also how long the consumer may stall.
        #[arg(long, value_name = "SECONDS", default_value_t = 45.0)]
        cbw_timeout: f64,
        /// What to do when a copy before a guest write fails or times out.
        #[arg(long, value_enum, default_value_t = PolicyArg::BreakSnapshot)]
        on_cbw_error: PolicyArg,
        /// Shell command run before the instant (e.g. freeze file systems).
        #[arg(long, value_name = "CMD")]
        pre: Option<String>,
        /// Shell command run right after the instant (e.g. thaw).
        #[arg(long, value_name = "CMD")]
        post: Option<String>,
        /// Print the final status and counters as one JSON object on stderr.
        #[arg(long)]
        json: bool,
    },
}

/// `--on-cbw-error`.
#[derive(Clone, Copy, ValueEnum)]
pub enum PolicyArg {
    /// Abort the backup, let the guest write through.
    BreakSnapshot,
    /// Fail the guest write with EIO, keep the backup.
    BreakGuestWrite,
}
