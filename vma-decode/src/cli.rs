//! The command line of `vma-decode` (also read by xtask to generate the man
//! pages and shell completions).

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use vma_cli::EXIT_CODES_HELP;

use crate::stdout::DEFAULT_REORDER_BUFFER;

const EXAMPLES: &str = "\
Examples:
  vma-decode list vzdump-qemu-100-2024_05_01-02_00_03.vma.zst
  vma-decode extract vm.vma.zst restored/
  zstd -dc vm.vma.zst | vma-decode extract --stdout drive-scsi0 - | dd of=/dev/vg/vm-100-disk-0 bs=1M
  vma-decode serve --socket /run/backup.sock vm.vma

";

const EXTRACT_HELP: &str = "\
Examples:
  vma-decode extract vm.vma restored/
  vma-decode extract -v -d drive-scsi0 vm.vma.zst restored/      # one disk, with progress lines
  vma-decode extract --salvage truncated.vma.gz rescued/         # exit 4 if anything is missing

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
from the archive: nothing is extracted.

Examples:
  vma-decode serve --socket /run/backup.sock vm.vma.zst --cache /var/tmp
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

/// The command line.
#[derive(Parser)]
#[command(name = "vma-decode", version = vma_cli::version(env!("CARGO_PKG_VERSION")), about = "Lists and extracts Proxmox VMA archives", after_help = format!("{EXAMPLES}{EXIT_CODES_HELP}"))]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand)]
pub enum Command {
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
        /// Print one JSON object instead (uuid, ctime, configs, devices: docs/JSON.md).
        #[arg(long)]
        json: bool,
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
        /// Print one JSON object on stdout at the end: the files written, their sizes, and the
        /// read's statistics (docs/JSON.md).
        #[arg(long, conflicts_with_all = ["verbose", "stdout", "map"])]
        json: bool,
    },
}
