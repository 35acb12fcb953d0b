//! `cbw-tap`: flags in, server or backup out. The work is in the library.

use std::io::{self, IsTerminal};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;

use cbw_tap::control::BackupClient;
use cbw_tap::serve::{default_control, parse_export, ServeConfig, Tap};
use cbw_tap::{BackupOptions, Policy};
use vma_cli::exit;
use vma_cli::signals::TermSignals;

/// Live point-in-time backups of disks in use: serves images over NBD with
/// copy-before-write, and streams backups of all of them taken at one
/// instant as a cluster stream for `vma-encode -`.
#[derive(Parser)]
#[command(name = "cbw-tap", version, after_help = vma_cli::EXIT_CODES_HELP)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
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
        /// Serve images that start like qcow2, VMDK, VHDX, VDI, QED or VHD
        /// as raw disks all the same (a guest may write such bytes to its
        /// own disk's first sector; without this the next serve refuses it).
        #[arg(long)]
        assume_raw: bool,
        /// Keep the changed-cluster tracking across restarts: saved to
        /// DIR/cbw-tap.state on a clean shutdown, read (and removed) at
        /// start. Without it, or after an unclean stop, the next
        /// `backup --incremental` is full.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
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
        #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = cbw_tap::size::parse_size)]
        buffer: usize,
        /// Limit the background reader to SIZE bytes per second, e.g. 200M
        /// (copy-before-write is never limited).
        #[arg(long, value_name = "SIZE", value_parser = cbw_tap::size::parse_size)]
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
        /// Only the clusters written since the last completed backup (full
        /// if there is none); `vma-encode --base LAST.vma -` completes it.
        #[arg(long)]
        incremental: bool,
        /// Archive uuid derived from NAME (the same for every backup made
        /// with it), instead of a random one; give vma-encode no --uuid.
        #[arg(long, value_name = "NAME")]
        uuid_from: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum PolicyArg {
    /// Abort the backup, let the guest write through.
    BreakSnapshot,
    /// Fail the guest write with EIO, keep the backup.
    BreakGuestWrite,
}

fn main() {
    let args = Args::parse();
    let code = match args.command {
        Cmd::Serve {
            socket,
            control,
            tcp,
            assume_raw,
            state_dir,
            exports,
        } => serve(ServeConfig {
            state_dir,
            control: control.unwrap_or_else(|| default_control(&socket)),
            socket,
            tcp,
            exports,
            assume_raw,
        }),
        Cmd::Backup {
            control,
            buffer,
            bwlimit,
            fleecing,
            cbw_timeout,
            on_cbw_error,
            pre,
            post,
            json,
            incremental,
            uuid_from,
        } => {
            if !(cbw_timeout.is_finite() && cbw_timeout > 0.0) {
                eprintln!("cbw-tap backup: --cbw-timeout must be a positive number of seconds");
                std::process::exit(exit::USAGE);
            }
            if buffer < cbw_tap::MIN_BUFFER {
                eprintln!(
                    "cbw-tap backup: --buffer must be at least {} bytes",
                    cbw_tap::MIN_BUFFER
                );
                std::process::exit(exit::USAGE);
            }
            let client = BackupClient {
                control,
                options: BackupOptions {
                    buffer,
                    cbw_timeout: Duration::from_secs_f64(cbw_timeout),
                    policy: match on_cbw_error {
                        PolicyArg::BreakSnapshot => Policy::BreakSnapshot,
                        PolicyArg::BreakGuestWrite => Policy::BreakGuestWrite,
                    },
                    bwlimit: bwlimit.map(|b| b as u64).filter(|&b| b > 0),
                    fleecing: match fleecing.map(|f| std::path::absolute(&f)) {
                        None => None,
                        Some(Ok(f)) => Some(f),
                        Some(Err(e)) => {
                            eprintln!("cbw-tap backup: --fleecing: {e}");
                            std::process::exit(exit::USAGE);
                        }
                    },
                    incremental,
                    uuid: uuid_from
                        .as_deref()
                        .map(vma_format::identity::uuid_from_name),
                },
                pre,
                post,
            };
            backup(&client, json)
        }
    };
    std::process::exit(code);
}

fn serve(cfg: ServeConfig) -> i32 {
    let signals = TermSignals::block();
    let tap = match Tap::start(&cfg) {
        Ok(t) => t,
        Err(f) => {
            eprintln!("cbw-tap serve: {f}");
            return f.code;
        }
    };
    eprintln!(
        "cbw-tap serve: {} export(s) on {} (control {})",
        cfg.exports.len(),
        cfg.socket.display(),
        cfg.control.display()
    );
    let sig = signals.wait();
    eprintln!("cbw-tap serve: signal {sig}, shutting down");
    tap.shutdown();
    exit::OK
}

fn backup(client: &BackupClient, json: bool) -> i32 {
    let stdout = io::stdout();
    if stdout.is_terminal() {
        eprintln!("cbw-tap backup: stdout is a terminal; pipe it into vma-encode -");
        return exit::USAGE;
    }
    // The server writes the stream into our stdout itself.
    let result = client.run(stdout.as_fd());
    let (code, error, stats) = match result {
        Ok(stats) => (exit::OK, None, Some(stats)),
        Err(f) => (f.failure.code, Some(f.failure.message), f.stats.map(|s| *s)),
    };
    if json {
        let v = json!({
            "ok": error.is_none(),
            "error": error,
            "stats": stats.as_ref().map(|s| s.to_json()),
        });
        eprintln!("{v}");
    } else {
        if let Some(s) = &stats {
            for line in s.to_string().lines() {
                eprintln!("cbw-tap backup: {line}");
            }
        }
        if let Some(e) = &error {
            eprintln!("cbw-tap backup: {e}");
        }
    }
    code
}
