//! `vma-decode`: list VMA archives, print their configs, extract them.
//! Called `vma` (a symlink or hard link), it is Proxmox's `vma` instead:
//! see `vma_decode::proxmox`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use std::sync::{mpsc, Arc, Mutex};
use vma_cli::input::Input;
use vma_cli::signals::{signal_name, TermSignals};
use vma_cli::{exit, listing, Failure, EXIT_CODES_HELP};
use vma_decode::extract::{extract, missing_line, ExtractOptions, SALVAGE_REPORT};
use vma_decode::serve::{self, ServeOptions, LOG};
use vma_decode::stdout::{extract_to_stdout, DEFAULT_REORDER_BUFFER};
use vma_format::{Archive, ReadOptions};

const EXTRACT_HELP: &str = "\
Into DIR: DIR/disk-<name>.raw per device (sparse, the size the header records), \
DIR/vmstate.bin for RAM state, and the config files, all written under tmp- names \
and renamed only when everything is complete; a failed extract leaves nothing that \
looks complete. Files are created inside DIR only (never through a symlink there).

With -r MAPFILE (as Proxmox's qmrestore runs `vma extract -v -r FIFO - DIR`): the \
configs are written into DIR, the CFG:/DEV:/CTIME: lines printed, then MAPFILE is \
read up to a line `done`: one line per device, \
`[throttling.bps=N:][throttling.group=G:][cache=C:][format=raw:]{0|1}:DEVNAME=PATH` \
(0: the target reads as zeros already, 1: write zeros) or `skip=DEVNAME`. Targets \
(files or block devices at least the device's size) are written in place. Map \
problems are exit 2, before anything is written.

With --stdout DEVNAME: that device as a raw image on standard output, in order. \
Clusters the archive holds out of order wait in a reorder buffer (--reorder-buffer, \
default 64 MiB), beyond it in an unnamed temporary file in $TMPDIR. A consumer that \
stops reading (EPIPE) is exit 3.

Archives may be compressed (zstd, gzip/pigz, lzop: detected by their magic bytes). ";

const SERVE_HELP: &str = "\
Every device of ARCHIVE becomes a read-only NBD export named after it, read straight \
from the archive: nothing is extracted. Clients:
  qemu-img convert -f raw -O qcow2 'nbd+unix:///drive-scsi0?socket=PATH' vm.qcow2
  nbdfuse DIR --unix PATH   (then DIR/nbd is the disk, for losetup/mount)
  qemu-nbd -c /dev/nbd0 'nbd+unix:///drive-scsi0?socket=PATH'   (where the host has nbd devices)
Once listening, prints one URI per export on stdout; logs on stderr. Runs until \
SIGINT, SIGTERM or SIGHUP, then removes the socket and exits 0.

A plain archive file is indexed by reading only its extent headers (with every check \
`vma-verify` makes but those of the data); --save-index keeps the index beside it as \
ARCHIVE.vmaidx, used by later runs while the archive's uuid, size and modification \
time are unchanged (a stale or damaged index is refused with a warning and the \
archive indexed again). A compressed archive, or one on a pipe (`-`), is decompressed \
once into an unnamed file in --cache DIR, which must have room for the archive's \
devices (--no-space-check: start anyway). Reads of data whose extent fails its data \
checksum (archives written by vma-encode carry one) fail with EIO and are logged; \
writes fail with EPERM. ";

#[derive(Parser)]
#[command(name = "vma-decode", version, about = "Lists and extracts Proxmox VMA archives", after_help = EXIT_CODES_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve every device read-only over NBD, straight from the archive (no extract).
    #[command(after_help = format!("{SERVE_HELP}{EXIT_CODES_HELP}"))]
    Serve {
        /// The archive (plain or compressed), or `-` for standard input.
        archive: String,
        /// NBD Unix socket to create (mode 0600).
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
        /// Also serve over TCP on this address, e.g. 127.0.0.1:10809 (no TLS, no authentication).
        #[arg(long, value_name = "ADDR:PORT")]
        tcp: Option<std::net::SocketAddr>,
        /// Directory to decompress a compressed archive (or copy one from a pipe) into.
        #[arg(long, value_name = "DIR")]
        cache: Option<PathBuf>,
        /// Save the index beside a plain archive, as ARCHIVE.vmaidx.
        #[arg(long)]
        save_index: bool,
        /// Start even if --cache DIR has less room than the archive's devices need.
        #[arg(long, requires = "cache")]
        no_space_check: bool,
    },
    /// Print the configs, devices and creation time, exactly as Proxmox's `vma list`.
    List {
        /// The archive (plain or compressed), or `-` for standard input.
        archive: String,
    },
    /// Print one config file, like `vma config`.
    Config {
        /// The archive (plain or compressed), or `-` for standard input.
        archive: String,
        /// The config's name.
        #[arg(short = 'c', long = "config", default_value = "qemu-server.conf")]
        name: String,
    },
    /// Write each device as DIR/disk-<name>.raw (sparse), vmstate as DIR/vmstate.bin, and the config files;
    /// or restore onto the targets of a map (-r); or one disk to stdout (--stdout).
    #[command(after_help = format!("{EXTRACT_HELP}{EXIT_CODES_HELP}"))]
    Extract {
        /// The archive (plain or compressed), or `-` for standard input.
        archive: String,
        /// Output directory: created if missing; refused if not empty unless --force. Not with --stdout.
        dir: Option<PathBuf>,
        /// Only these devices (comma-separated names, e.g. drive-scsi0,drive-virtio1).
        #[arg(short = 'd', long = "devices", value_delimiter = ',')]
        devices: Option<Vec<String>>,
        /// Restore onto the targets named in MAPFILE (usually a FIFO), as Proxmox's qmrestore does.
        #[arg(short = 'r', long = "map", value_name = "MAPFILE", conflicts_with_all = ["salvage", "stdout"])]
        map: Option<PathBuf>,
        /// Write device DEVNAME as a raw image to standard output, in order.
        #[arg(long, value_name = "DEVNAME", conflicts_with_all = ["devices", "verbose", "salvage", "force"])]
        stdout: Option<String>,
        /// With --stdout: bytes of out-of-order clusters kept in memory before spilling to $TMPDIR.
        #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_REORDER_BUFFER, requires = "stdout")]
        reorder_buffer: usize,
        /// Print Proxmox-style progress and statistics.
        #[arg(short = 'v', long)]
        verbose: bool,
        /// Recover what a damaged or truncated archive still holds; exit 4 if anything is missing.
        #[arg(long)]
        salvage: bool,
        /// Write into an existing non-empty directory (replacing files of the same names).
        #[arg(long)]
        force: bool,
    },
}

fn main() {
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_default();
    let called = std::path::Path::new(&argv0)
        .file_name()
        .unwrap_or_default()
        .to_owned();
    if called == "vma" {
        std::process::exit(vma_decode::proxmox::main(args.collect()));
    }
    let cli = Cli::parse();
    if let Command::Serve {
        archive,
        socket,
        tcp,
        cache,
        save_index,
        no_space_check,
    } = cli.command
    {
        let opts = ServeOptions {
            socket,
            tcp,
            cache,
            save_index,
            no_space_check,
        };
        if let Err(f) = serve(&archive, &opts) {
            f.exit();
        }
        return;
    }
    if matches!(cli.command, Command::Extract { .. }) {
        // Partial images and configs are removed on SIGINT/SIGTERM/SIGHUP.
        if let Err(e) = vma_cli::signals::install("vma-decode") {
            Failure::io("signal handling", &e).exit();
        }
    }
    if let Err(f) = run(cli) {
        f.exit();
    }
}

/// `serve`: index, listen, print the URIs, wait for a signal, stop.
fn serve(archive: &str, opts: &ServeOptions) -> Result<(), Failure> {
    // Blocked before any thread starts, so every thread inherits the mask.
    let signals = TermSignals::block();
    // While indexing (a decompressing pass may take long), a signal ends the
    // process at once: nothing is listening yet, the cache has no name, and
    // an index being saved is removed (vma_cli::signals' registry). Once
    // listening, it stops the server cleanly.
    let listening = Arc::new(Mutex::new(false));
    let (stop_tx, stop_rx) = mpsc::channel();
    {
        let listening = Arc::clone(&listening);
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || loop {
                let sig = signals.wait();
                let serving = listening.lock().unwrap_or_else(|e| e.into_inner());
                if !*serving {
                    vma_cli::signals::exit_removing_partials(LOG, sig);
                }
                let _ = stop_tx.send(sig);
            })
            .map_err(|e| Failure::io("cannot start a thread", &e))?;
    }
    let prepared = serve::prepare(archive, opts)?;
    let serving = {
        let mut state = listening.lock().unwrap_or_else(|e| e.into_inner());
        let serving = prepared.listen(opts)?;
        *state = true;
        serving
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for uri in &serving.uris {
        // A closed stdout is no reason to stop serving.
        let _ = writeln!(out, "{uri}");
    }
    let _ = out.flush();
    drop(out);
    let sig = stop_rx.recv().unwrap_or(0);
    eprintln!("{LOG}: {}: shutting down", signal_name(sig));
    serving.shutdown();
    Ok(())
}

fn open(path: &str, options: ReadOptions) -> Result<(String, Archive<Input>), Failure> {
    let input = Input::open(path).map_err(|e| Failure::io(path, &e))?;
    let name = input.name.clone();
    let archive = Archive::with_options(input, options).map_err(|e| Failure::format(&name, &e))?;
    Ok((name, archive))
}

fn run(cli: Cli) -> Result<(), Failure> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    // list, config and extract's -v lines are informational: a reader that
    // went away ends the tool quietly (vma_cli::pipe).
    let out_err = |e: std::io::Error| vma_cli::pipe::info_failure(&e);
    match cli.command {
        Command::List { archive } => {
            let (_, archive) = open(&archive, ReadOptions::default())?;
            listing::write_listing(&mut out, archive.header()).map_err(out_err)?;
        }
        Command::Config { archive, name } => {
            let (input, archive) = open(&archive, ReadOptions::default())?;
            let config = archive.header().config(name.as_bytes()).ok_or_else(|| {
                Failure::new(exit::DAMAGED, format!("{input}: no config named {name:?}"))
            })?;
            out.write_all(&config.data).map_err(out_err)?;
        }
        Command::Extract {
            archive,
            stdout: Some(devname),
            dir,
            reorder_buffer,
            ..
        } => {
            if let Some(dir) = dir {
                return Err(Failure::new(
                    exit::USAGE,
                    format!(
                        "{}: no output directory with --stdout (the image goes to standard output)",
                        dir.display()
                    ),
                ));
            }
            if std::io::stdout().is_terminal() {
                return Err(Failure::new(
                    exit::USAGE,
                    "stdout: refusing to write a disk image to a terminal (redirect or pipe it)",
                ));
            }
            let (input, archive) = open(&archive, ReadOptions::default())?;
            extract_to_stdout(archive, &input, &devname, reorder_buffer, &mut out)?;
        }
        Command::Serve { .. } => unreachable!("handled in main"),
        Command::Extract {
            archive,
            dir,
            devices,
            map,
            verbose,
            salvage,
            force,
            ..
        } => {
            let Some(dir) = dir else {
                return Err(Failure::new(
                    exit::USAGE,
                    "extract: an output directory (or --stdout DEVNAME) is required",
                ));
            };
            vma_decode::outdir::OutputDir::check_arg(&dir)?;
            let (input, archive) = open(&archive, ReadOptions { salvage })?;
            let opts = ExtractOptions {
                devices,
                force,
                verbose,
                salvage,
                map,
            };
            let report = extract(archive, &input, &dir, &opts, &mut out)?;
            out.flush().map_err(out_err)?;
            if !report.is_complete() {
                let summary = &report.summary;
                for d in summary.damage.iter().take(20) {
                    eprintln!("{input}: skipped: {d}");
                }
                if summary.damage_count > 20 {
                    eprintln!(
                        "{input}: skipped: … {} more problems",
                        summary.damage_count - 20
                    );
                }
                for m in &summary.missing {
                    eprintln!("{input}: {}", missing_line(m, 50));
                }
                eprintln!(
                    "{input}: partial extract: missing clusters are zero; full list in {}",
                    dir.join(SALVAGE_REPORT).display()
                );
                std::process::exit(exit::PARTIAL);
            }
        }
    }
    out.flush().map_err(out_err)
}
