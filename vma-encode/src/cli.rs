//! The command line of `vma-encode` ([`Args`]): its flags, help text and
//! examples, as clap parses them (and `cargo xtask gen` turns into the man
//! page and completions).

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Parser;

const AFTER_HELP: &str = "\
Examples:
  vma-encode -c qemu-server.conf=/etc/pve/qemu-server/100.conf -o vm100.vma \\
      drive-scsi0=/dev/vg/vm-100-disk-0 drive-scsi1=/var/lib/vz/images/100/vm-100-disk-1.raw
  vma-encode -c qemu-server.conf drive-scsi0=disk.raw | zstd > vm.vma.zst
  cbw-tap backup --control /run/cbw-tap/vm100.nbd.ctl | vma-encode -c qemu-server.conf - | zstd > vm.vma.zst

SOURCE is a raw image file or a block device; NAME=SOURCE names the device
(a bare SOURCE is named disk0, disk1, … by position, as Proxmox does). Sizes are
recorded rounded up to a multiple of 512 bytes, the tail read as zero. Holes are
skipped without reading (SEEK_DATA/SEEK_HOLE); zero 4 KiB blocks are not stored.
A single '-' reads a cluster stream (docs/CLUSTER-STREAM.md) on standard input:
clusters in any order, each exactly once; the archive is completed only if all
arrived.

-c NAME=PATH stores the file PATH under NAME; -c PATH stores it under its base
name (as Proxmox does; write ./a=b.conf for a path with '=' in its first
component). Proxmox's qmrestore restores a VM from the config named
qemu-server.conf: an archive with disks but without one gets a warning. Every extent carries a CRC-32 of
its data in the free 59th slot (ignored by other readers) unless
--no-data-checksums is given.

The archive goes to standard output (never a terminal; also `-o -`), or with
-o to a temporary file beside ARCHIVE that is fsynced and renamed to ARCHIVE on
success and removed on failure or on SIGINT, SIGTERM, SIGHUP (exit 128+signal).
An existing ARCHIVE is refused unless --force. A character or block device or a
FIFO (also through a symbolic link, e.g. -o /dev/stdout) is written in place.
A symbolic link to a file is followed: its target is refused or replaced.

Sources in an image format (qcow2, QED, VMDK, VHDX, VDI, VHD) are refused with
a hint (qemu-img convert, qemu-nbd); --assume-raw takes them as raw disks.

Reproducible output: --uuid and --ctime fix the only varying bytes. Without
--ctime the creation time is the stream's backup instant (with '-'), else
$SOURCE_DATE_EPOCH when set, else now.

Exit codes: 0 ok; 1 the cluster stream is damaged, aborted or incomplete;
2 usage (bad flags, a source that is not an image, a name, config or count the
format cannot hold); 3 I/O or environment (cannot open or read a source, cannot
write the archive: disk full, broken pipe); 128+N stopped by signal N (SIGINT
130, SIGTERM 143, SIGHUP 129), the temporary archive removed.";

/// The command line.
#[derive(Parser, Debug)]
#[command(
    name = "vma-encode",
    version = vma_cli::version(env!("CARGO_PKG_VERSION")),
    about = "Write a Proxmox VMA archive from raw images, block devices or a cluster stream",
    after_help = AFTER_HELP
)]
pub struct Args {
    /// Store a config file: NAME=PATH stores PATH under NAME, a bare PATH
    /// under its base name; repeatable, up to 256.
    #[arg(short = 'c', long = "config", value_name = "[NAME=]PATH")]
    pub configs: Vec<PathBuf>,
    /// Write the archive to ARCHIVE (made safely) instead of standard output
    /// ('-': standard output).
    #[arg(short = 'o', long = "output", value_name = "ARCHIVE")]
    pub output: Option<PathBuf>,
    /// Replace ARCHIVE if it exists (a regular file).
    #[arg(long)]
    pub force: bool,
    /// Take every source as a raw disk, even one that starts like a qcow2,
    /// VMDK, … image.
    #[arg(long)]
    pub assume_raw: bool,
    /// The archive's uuid (default: the stream's, else random).
    #[arg(long, value_name = "UUID", conflicts_with = "uuid_from")]
    pub uuid: Option<uuid::Uuid>,
    /// The archive's uuid derived from NAME (the same for every archive made
    /// with it, so consecutive archives share their extent headers).
    #[arg(long, value_name = "NAME")]
    pub uuid_from: Option<String>,
    /// With '-': write the clusters in (device, cluster) order (the stream
    /// is spooled first, beyond --spool-memory to a temporary file). Images
    /// are always written in that order. With --base: a base in another
    /// order is read in this one through an index of its extents if it is a
    /// plain file; a compressed or piped base must be in this order (written
    /// with --sorted). Without --sorted, a merge keeps the base's order.
    #[arg(long)]
    pub sorted: bool,
    /// With '-' and an incremental stream (`cbw-tap backup --incremental`):
    /// the archive of the backup the stream applies to (plain or zstd,
    /// gzip, lzop). The output is a complete archive: each cluster from the
    /// stream if it has it, else from BASE (checked as it passes).
    #[arg(long, value_name = "BASE")]
    pub base: Option<PathBuf>,
    /// Stream clusters kept in memory by --base and --sorted before they
    /// spill to a temporary file (in $TMPDIR), in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = crate::merge::DEFAULT_SPOOL_MEMORY)]
    pub spool_memory: usize,
    /// The archive's creation time in seconds since the epoch (0 or more).
    #[arg(long, value_name = "SECONDS", allow_hyphen_values = true)]
    pub ctime: Option<i64>,
    /// Write plain extents, without our CRC-32 of each extent's data.
    #[arg(long)]
    pub no_data_checksums: bool,
    /// Print Proxmox-style progress lines and per-image statistics on stderr.
    #[arg(short, long)]
    pub verbose: bool,
    /// Print the statistics of the archive made as one JSON object on one
    /// line on stderr, once it is complete (docs/JSON.md).
    #[arg(long)]
    pub json: bool,
    /// NAME=SOURCE or SOURCE (image file or block device), or '-' alone for a
    /// cluster stream on standard input.
    #[arg(value_name = "NAME=SOURCE|SOURCE|-")]
    pub sources: Vec<OsString>,
}
