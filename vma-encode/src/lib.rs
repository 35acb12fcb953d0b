//! `vma-encode`: write a Proxmox VMA archive from raw images, block devices
//! or a cluster stream.
//!
//! ```text
//! vma-encode [-c CONFIG]… [-o ARCHIVE] [options] NAME=SOURCE… | SOURCE…
//! vma-encode [-c CONFIG]… [-o ARCHIVE] [options] -
//! ```
//!
//! The binary is thin: [`Args`] are its flags, [`run`] does the work. The
//! pieces: [`source`] reads images sparse-aware, [`output`] writes stdout or
//! a file made safely, [`progress`] reports on stderr. The archive itself is
//! written by [`vma_format::Writer`]; the cluster stream is read by
//! [`vma_format::stream::StreamReader`].
//!
//! Everything the command line asks for is checked before the first byte is
//! written: every source opened and sized, every config read, the header
//! encoded (254 devices, 256 configs, 65535-byte blobs, 512 KiB header).

pub mod indexed;
pub mod merge;
pub mod output;
pub mod progress;
pub mod source;
pub mod stats;

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{BufWriter, Read};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use clap::Parser;
use vma_cli::{exit, Failure};
use vma_format::reader::Archive;
use vma_format::stream::StreamReader;
use vma_format::{
    ClusterSource, HeaderBuilder, PullError, Writer, WriterOptions, MAX_BLOB_SIZE, MAX_CONFIGS,
    MAX_DEVICES,
};

use output::Output;
use progress::Progress;
use source::{ImageSource, ImageSources};

/// Device sizes are recorded rounded up to a multiple of this (Proxmox's
/// block layer reports whole 512-byte sectors, and its restore needs them).
pub const SECTOR: u64 = 512;

/// Output buffer: small extents (clusters of holes) are gathered into writes
/// of this size.
const OUTPUT_BUFFER: usize = 256 * 1024;

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
    #[arg(long, value_name = "BYTES", default_value_t = merge::DEFAULT_SPOOL_MEMORY)]
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

/// An error of `vma-encode`: a failure ready to print, or an error of the
/// archive writer (named after the output by [`run`]).
#[derive(Debug)]
pub enum EncodeError {
    /// A complete one-line message with its exit code.
    Failure(Failure),
    /// The writer failed: writing the output, or closing an incomplete archive.
    Output(vma_format::Error),
}

impl EncodeError {
    /// A usage error (exit 2).
    pub fn usage(message: impl Into<String>) -> EncodeError {
        EncodeError::Failure(Failure::new(exit::USAGE, message))
    }

    /// An I/O error about `what` (exit 3).
    pub fn io(what: &str, err: &std::io::Error) -> EncodeError {
        EncodeError::Failure(Failure::io(what, err))
    }

    /// An error from the archive writer.
    pub fn output(err: vma_format::Error) -> EncodeError {
        EncodeError::Output(err)
    }

    fn into_failure(self, output: &str) -> Failure {
        match self {
            EncodeError::Failure(f) => f,
            EncodeError::Output(e) => Failure::format(output, &e),
        }
    }
}

impl From<Failure> for EncodeError {
    fn from(f: Failure) -> EncodeError {
        EncodeError::Failure(f)
    }
}

/// What the sources are.
enum Sources {
    Images(Vec<ImageSource>),
    Stream(StreamReader<File>),
    /// An incremental stream and its base archive (name, archive, map of
    /// the base's device ids to the stream's).
    Merge(Box<Merging>),
}

/// An incremental stream, and the base archive it applies to.
struct Merging {
    stream: StreamReader<File>,
    base_name: String,
    base: Archive<vma_cli::input::Input>,
    /// The base's device ids to the stream's.
    map: [u8; 256],
    /// The base's path, and whether it is a plain (uncompressed) regular
    /// file, which `--sorted` can read in any order.
    base_path: PathBuf,
    plain: bool,
}

/// Runs `vma-encode` with `args`; the error carries its message (without the
/// program name) and exit code. `stderr_is_terminal` turns on the progress bar
/// (unless `-v`). Nothing is left under ARCHIVE's name on failure.
pub fn run(args: &Args, stderr_is_terminal: bool) -> Result<stats::EncodeStats, Failure> {
    let started = std::time::Instant::now();
    if args.sources.is_empty() && args.configs.is_empty() {
        return Err(Failure::new(
            exit::USAGE,
            "nothing to archive: give NAME=SOURCE…, '-' (a cluster stream) or -c CONFIG",
        ));
    }
    if let Some(t) = args.ctime.filter(|&t| t < 0) {
        return Err(Failure::new(
            exit::USAGE,
            format!("--ctime {t}: before 1970; give 0 or more seconds since the epoch"),
        ));
    }
    let ctime_env = source_date_epoch()?;
    let (sources, header, meta) = prepare(args, ctime_env)?;
    // Refuse what the format cannot hold before creating any output.
    header
        .encode()
        .map_err(|e| Failure::new(vma_cli::exit_code(&e), e.message().to_string()))?;
    let output = match &args.output {
        Some(path) => Output::path(path, args.force),
        None => Output::stdout(),
    }
    .map_err(|e| e.into_failure("<output>"))?;
    let out_name = output.name();
    let sizes: Vec<u64> = header.devices().iter().map(|d| d.1).collect();
    let mut progress = Progress::new(sizes, args.verbose, stderr_is_terminal);
    let result = encode(args, sources, &header, &output, &mut progress);
    match result {
        Ok((devices, archive_bytes)) => {
            output.commit().map_err(|e| e.into_failure(&out_name))?;
            // About the archive made: said once it exists.
            // The configs stored: given with -c, or kept from --base.
            let names: Vec<String> = meta.configs.iter().map(|c| c.name.clone()).collect();
            if let Some(warning) = config_warning(&names, header.devices()) {
                eprintln!("vma-encode: {warning}");
            }
            Ok(stats::EncodeStats {
                output: out_name,
                uuid: stats::uuid_text(meta.uuid),
                ctime: meta.ctime,
                configs: meta.configs,
                devices,
                archive_bytes,
                data_checksums: !args.no_data_checksums,
                seconds: started.elapsed().as_secs_f64(),
            })
        }
        Err(e) => {
            progress.abandon();
            // Dropping `output` removes the temporary file.
            drop(output);
            Err(e.into_failure(&out_name))
        }
    }
}

fn encode(
    args: &Args,
    sources: Sources,
    header: &HeaderBuilder,
    output: &Output,
    progress: &mut Progress,
) -> Result<(Vec<stats::DeviceStats>, u64), EncodeError> {
    let options = WriterOptions {
        data_checksums: !args.no_data_checksums,
    };
    // Extents of empty clusters are 512 bytes: gather them into big writes.
    // (Extents larger than the buffer go straight through, uncopied.)
    let out = BufWriter::with_capacity(OUTPUT_BUFFER, output::Counted::new(output.file_handle()));
    let mut writer = Writer::new(out, header, options).map_err(EncodeError::output)?;
    match sources {
        Sources::Images(images) => pull_all(&mut writer, &mut ImageSources::new(&images), progress)
            .map_err(|e| match e {
                PullError::Source(e) => e,
                PullError::Write(e) => EncodeError::output(e),
            })?,
        Sources::Stream(mut stream) if args.sorted => {
            let mut spool = merge::spool_stream(&mut stream, args.spool_memory)?;
            merge::write_sorted(&mut spool, &mut writer, progress)?;
        }
        Sources::Merge(m) => {
            let Merging {
                mut stream,
                base_name: name,
                mut base,
                map,
                base_path,
                plain,
            } = *m;
            let mut spool = merge::spool_stream(&mut stream, args.spool_memory)?;
            let stats = if args.sorted && plain {
                indexed::merge_sorted_file(
                    &name,
                    &base_path,
                    &stream,
                    &mut base,
                    map,
                    &mut spool,
                    &mut writer,
                    progress,
                )?
            } else {
                merge::merge(
                    &name,
                    args.sorted,
                    &mut base,
                    map,
                    &mut spool,
                    &mut writer,
                    progress,
                )?
            };
            if args.verbose {
                eprintln!(
                    "vma-encode: merged {} clusters from the stream onto {} from {name} ({} bytes spooled to a temporary file; {} extents of the base written on as they came)",
                    stats.from_stream, stats.from_base, stats.spilled, stats.whole_extents
                );
            }
        }
        Sources::Stream(mut stream) => {
            pull_all(&mut writer, &mut stream, progress).map_err(|e| match e {
                PullError::Source(e) => Failure::format("<stdin>", &e).into(),
                PullError::Write(e) => EncodeError::output(e),
            })?
        }
    }
    let device_stats = writer.device_stats();
    let stats: Vec<(String, u64, u64)> = device_stats
        .iter()
        .map(|d| (d.name.clone(), d.size, d.zero_bytes))
        .collect();
    let out = writer.finish().map_err(EncodeError::output)?;
    progress.finish(&stats);
    let devices = device_stats
        .iter()
        .enumerate()
        .map(|(i, d)| stats::DeviceStats::from_writer(i as u8 + 1, d))
        .collect();
    Ok((devices, out.get_ref().bytes()))
}

/// What [`prepare`] learnt that the statistics report.
struct Meta {
    uuid: [u8; 16],
    ctime: i64,
    configs: Vec<stats::ConfigStats>,
}

/// The encode loop: the writer pulls every piece of `source`.
fn pull_all<W: std::io::Write, S: ClusterSource>(
    writer: &mut Writer<W>,
    source: &mut S,
    progress: &mut Progress,
) -> Result<(), PullError<S::Error>> {
    while let Some(p) = writer.pull(source)? {
        progress.clusters(p.dev_id, p.first, p.count, p.zero_bytes);
    }
    Ok(())
}

/// Opens every source and config and declares them in a header. The
/// creation time: `--ctime`, else the stream's backup instant, else
/// `ctime_env` (SOURCE_DATE_EPOCH), else now.
fn prepare(args: &Args, ctime_env: Option<i64>) -> Result<(Sources, HeaderBuilder, Meta), Failure> {
    let stream = args.sources.len() == 1 && args.sources[0] == "-";
    if !stream && args.sources.iter().any(|s| s == "-") {
        return Err(Failure::new(
            exit::USAGE,
            "'-' (a cluster stream on standard input) must be the only source",
        ));
    }
    if args.configs.len() > MAX_CONFIGS {
        return Err(Failure::new(
            exit::USAGE,
            format!(
                "too many configs: {} given, the format holds {MAX_CONFIGS}",
                args.configs.len()
            ),
        ));
    }
    if args.sources.len() > MAX_DEVICES {
        return Err(Failure::new(
            exit::USAGE,
            format!(
                "too many devices: {} given, the format holds {MAX_DEVICES}",
                args.sources.len()
            ),
        ));
    }
    let reader = if stream {
        let stdin = std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| Failure::io("<stdin>", &e))?;
        Some(StreamReader::new(File::from(stdin)).map_err(|e| Failure::format("<stdin>", &e))?)
    } else {
        None
    };
    let ctime = args
        .ctime
        .or(reader.as_ref().map(|r| r.backup_time()))
        .or(ctime_env)
        .unwrap_or_else(now);
    if args.base.is_some() && !stream {
        return Err(Failure::new(
            exit::USAGE,
            "--base needs '-' (an incremental cluster stream on standard input)",
        ));
    }
    let mut base = None;
    if let (Some(path), Some(r)) = (&args.base, reader.as_ref()) {
        let name = path.display().to_string();
        if r.is_incremental() {
            let input = vma_cli::input::Input::open(&name).map_err(|e| Failure::io(&name, &e))?;
            let plain =
                input.compression().is_none() && std::fs::metadata(path).is_ok_and(|m| m.is_file());
            let archive = Archive::new(input).map_err(|e| Failure::format(&name, &e))?;
            let map = merge::check_base(&name, archive.header(), r)?;
            base = Some((name, archive, map, path.clone(), plain));
        } else {
            eprintln!("vma-encode: the stream is a full backup: --base {name} is not needed");
        }
    }
    if let Some(r) = reader
        .as_ref()
        .filter(|r| r.is_incremental() && base.is_none())
    {
        let base = r.identity().and_then(|i| i.base).expect("incremental");
        return Err(Failure::new(
            exit::USAGE,
            format!(
                "<stdin>: an incremental cluster stream (only the clusters changed since the backup {} of {}): give that backup's archive with --base",
                uuid::Uuid::from_bytes(base.uuid),
                base.time
            ),
        ));
    }
    // A stream that names its archive's uuid (cbw-tap's) gets it, so that
    // the next incremental backup can name this archive as its base.
    let uuid = args
        .uuid
        .map(uuid::Uuid::into_bytes)
        .or(args
            .uuid_from
            .as_deref()
            .map(vma_format::identity::uuid_from_name))
        .or(reader.as_ref().and_then(|r| r.identity()).map(|i| i.uuid))
        .unwrap_or_else(|| uuid::Uuid::new_v4().into_bytes());
    if let Some(id) = reader.as_ref().and_then(|r| r.identity()) {
        if id.uuid != uuid {
            eprintln!(
                "vma-encode: warning: the archive's uuid is not the one the stream names ({}): it cannot be the base of the next incremental backup (give --uuid-from to cbw-tap backup instead)",
                uuid::Uuid::from_bytes(id.uuid)
            );
        }
    }
    let mut builder = HeaderBuilder::new(uuid, ctime);
    let mut meta = Meta {
        uuid,
        ctime,
        configs: Vec::new(),
    };
    for arg in &args.configs {
        let (name, path) = split_config(arg.as_os_str());
        let (base, data) = read_config(&path)?;
        let name = name.unwrap_or(base);
        meta.configs.push(stats::ConfigStats {
            name: vma_format::names::escape(name.as_bytes()),
            size: data.len() as u64,
        });
        builder.add_config(&name, data).map_err(|e| {
            Failure::new(exit::USAGE, format!("{}: {}", path.display(), e.message()))
        })?;
    }
    if let (true, Some((name, archive, ..))) = (args.configs.is_empty(), &base) {
        // The merged archive keeps the base's configs unless given others.
        for c in archive.header().configs() {
            let cname = String::from_utf8(c.c_name().to_vec()).map_err(|_| {
                Failure::new(
                    exit::DAMAGED,
                    format!("{name}: config {} is not UTF-8", c.display_name()),
                )
            })?;
            meta.configs.push(stats::ConfigStats {
                name: vma_format::names::escape(cname.as_bytes()),
                size: c.data.len() as u64,
            });
            builder
                .add_config(&cname, c.data.clone())
                .map_err(|e| Failure::format(name, &e))?;
        }
    }
    if let Some(reader) = reader {
        for d in reader.devices() {
            builder
                .add_device(&d.name, d.size)
                .map_err(|e| Failure::format("<stdin>", &e))?;
        }
        if let Some((name, archive, map, base_path, plain)) = base {
            return Ok((
                Sources::Merge(Box::new(Merging {
                    stream: reader,
                    base_name: name,
                    base: archive,
                    map,
                    base_path,
                    plain,
                })),
                builder,
                meta,
            ));
        }
        return Ok((Sources::Stream(reader), builder, meta));
    }
    let mut images = Vec::with_capacity(args.sources.len());
    for (i, arg) in args.sources.iter().enumerate() {
        let (name, path) = split_source(arg, i)?;
        let image = ImageSource::open(name, &path, args.assume_raw)
            .map_err(|e| e.into_failure("<source>"))?;
        builder.add_device(&image.name, image.size).map_err(|e| {
            Failure::new(exit::USAGE, format!("{}: {}", path.display(), e.message()))
        })?;
        images.push(image);
    }
    Ok((Sources::Images(images), builder, meta))
}

/// The config qmrestore restores a VM from.
pub const QEMU_SERVER_CONF: &str = "qemu-server.conf";

/// The warning for an archive with disks but no `qemu-server.conf`, if
/// one with these configs and devices is one.
pub fn config_warning(configs: &[String], devices: &[(String, u64)]) -> Option<String> {
    let disks = devices.iter().any(|(n, _)| n != vma_format::VMSTATE_NAME);
    let has = configs.iter().any(|n| n == QEMU_SERVER_CONF);
    (disks && !has).then(|| {
        format!(
            "warning: no config named {QEMU_SERVER_CONF} in the archive: Proxmox's qmrestore \
             will not restore it (add -c {QEMU_SERVER_CONF}=PATH)"
        )
    })
}

/// `-c NAME=PATH` → (Some(NAME), PATH) when NAME is not empty and holds no
/// `/`; anything else is a PATH stored under its base name.
fn split_config(arg: &OsStr) -> (Option<String>, PathBuf) {
    let bytes = arg.as_bytes();
    if let Some(eq) = bytes.iter().position(|&b| b == b'=') {
        let name = &bytes[..eq];
        if !name.is_empty() && !name.contains(&b'/') {
            if let Ok(name) = std::str::from_utf8(name) {
                return (
                    Some(name.to_string()),
                    PathBuf::from(OsStr::from_bytes(&bytes[eq + 1..])),
                );
            }
        }
    }
    (None, PathBuf::from(arg))
}

/// `NAME=SOURCE` → (NAME, SOURCE); a bare SOURCE gets `disk{index}`. Split at
/// the first `=`, as Proxmox does.
fn split_source(arg: &OsStr, index: usize) -> Result<(String, PathBuf), Failure> {
    let bytes = arg.as_bytes();
    match bytes.iter().position(|&b| b == b'=') {
        Some(eq) => {
            let path = PathBuf::from(OsStr::from_bytes(&bytes[eq + 1..]));
            let name = std::str::from_utf8(&bytes[..eq]).map_err(|_| {
                Failure::new(
                    exit::USAGE,
                    format!("{}: device name is not UTF-8", path.display()),
                )
            })?;
            if path.as_os_str().is_empty() {
                return Err(Failure::new(
                    exit::USAGE,
                    format!("{}: no source after '='", arg.to_string_lossy()),
                ));
            }
            Ok((name.to_string(), path))
        }
        None => Ok((format!("disk{index}"), PathBuf::from(arg))),
    }
}

/// Reads a config file: its base name and content, at most 65535 bytes
/// (checked before reading it all).
fn read_config(path: &Path) -> Result<(String, Vec<u8>), Failure> {
    let shown = path.display().to_string();
    let file = File::open(path).map_err(|e| Failure::io(&shown, &e))?;
    let meta = file.metadata().map_err(|e| Failure::io(&shown, &e))?;
    if meta.is_dir() {
        return Err(Failure::new(
            exit::USAGE,
            format!("{shown}: is a directory"),
        ));
    }
    let mut data = Vec::new();
    file.take(MAX_BLOB_SIZE as u64 + 1)
        .read_to_end(&mut data)
        .map_err(|e| Failure::io(&shown, &e))?;
    if data.len() > MAX_BLOB_SIZE {
        return Err(Failure::new(
            exit::USAGE,
            format!("{shown}: config larger than the format's {MAX_BLOB_SIZE} bytes"),
        ));
    }
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Failure::new(exit::USAGE, format!("{shown}: no UTF-8 base name")))?;
    Ok((name.to_string(), data))
}

/// `$SOURCE_DATE_EPOCH`, if set (an integer, or it is a usage error).
fn source_date_epoch() -> Result<Option<i64>, Failure> {
    match std::env::var_os("SOURCE_DATE_EPOCH") {
        None => Ok(None),
        Some(v) if v.is_empty() => Ok(None),
        Some(v) => v
            .to_str()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .filter(|&t| t >= 0)
            .map(Some)
            .ok_or_else(|| {
                Failure::new(
                    exit::USAGE,
                    format!(
                        "SOURCE_DATE_EPOCH={}: not a number of seconds since the epoch (0 or more)",
                        v.to_string_lossy()
                    ),
                )
            }),
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_named_like_proxmox() {
        let split = |a: &str, i| split_source(OsStr::new(a), i).map_err(|f| f.message);
        assert_eq!(
            split("drive-scsi0=/dev/sdb", 0),
            Ok(("drive-scsi0".into(), PathBuf::from("/dev/sdb")))
        );
        assert_eq!(
            split("a.raw", 3),
            Ok(("disk3".into(), PathBuf::from("a.raw")))
        );
        // Split at the first '=', as Proxmox does.
        assert_eq!(
            split("x=a=b.raw", 0),
            Ok(("x".into(), PathBuf::from("a=b.raw")))
        );
        assert_eq!(split("x=", 0), Err("x=: no source after '='".into()));
    }

    #[test]
    fn configs_are_named_like_proxmox_or_as_told() {
        let s = |a: &str| split_config(OsStr::new(a));
        assert_eq!(
            s("qemu-server.conf=/tmp/vm100.conf"),
            (
                Some("qemu-server.conf".into()),
                PathBuf::from("/tmp/vm100.conf")
            )
        );
        assert_eq!(
            s("/etc/pve/qemu-server/100.conf"),
            (None, PathBuf::from("/etc/pve/qemu-server/100.conf"))
        );
        // A '/' before the '=' makes it a path; so does an empty name.
        assert_eq!(s("./a=b.conf"), (None, PathBuf::from("./a=b.conf")));
        assert_eq!(s("dir/a=b"), (None, PathBuf::from("dir/a=b")));
        assert_eq!(s("=x"), (None, PathBuf::from("=x")));
        assert_eq!(s("a=b=c"), (Some("a".into()), PathBuf::from("b=c")));
    }

    #[test]
    fn warns_when_qmrestore_would_find_no_config() {
        let mut configs = Vec::new();
        let mut devices = Vec::new();
        assert_eq!(
            config_warning(&configs, &devices),
            None,
            "no disks, nothing to restore"
        );
        devices.push(("vmstate".to_string(), 4096));
        assert_eq!(config_warning(&configs, &devices), None);
        devices.push(("drive-scsi0".to_string(), 4096));
        assert!(config_warning(&configs, &devices)
            .unwrap()
            .starts_with("warning: no config named qemu-server.conf"));
        configs.push("vm.conf".to_string());
        assert!(config_warning(&configs, &devices).is_some());
        configs.push("qemu-server.conf".to_string());
        assert_eq!(config_warning(&configs, &devices), None);
    }
}
