//! `vma-encode`: write a Proxmox VMA archive from raw images, block devices
//! or a cluster stream.
//!
//! ```text
//! vma-encode [-c CONFIG]… [-o ARCHIVE] [options] NAME=SOURCE… | SOURCE…
//! vma-encode [-c CONFIG]… [-o ARCHIVE] [options] -
//! ```
//!
//! The binary is thin: [`Args`] are its flags, [`run`] does the work. The
//! pieces: `prepare` opens and checks everything first, [`source`] reads
//! images sparse-aware, [`merge`] applies an incremental stream to its base,
//! [`output`] writes stdout or a file made safely, [`progress`] reports on
//! stderr. The archive itself is written by [`vma_format::Writer`]; the
//! cluster stream is read by [`vma_format::stream::StreamReader`].
//!
//! Everything the command line asks for is checked before the first byte is
//! written: every source opened and sized, every config read, the header
//! encoded (254 devices, 256 configs, 65535-byte blobs, 512 KiB header).

mod cli;
pub mod indexed;
pub mod merge;
pub mod output;
mod prepare;
pub mod progress;
pub mod source;
pub mod stats;

use std::io::BufWriter;

use vma_cli::{exit, Failure};
use vma_format::{ClusterSource, HeaderBuilder, PullError, Writer, WriterOptions};

pub use cli::Args;
use output::Output;
pub use prepare::{config_warning, QEMU_SERVER_CONF};
use prepare::{prepare, source_date_epoch, Merging, Sources};
use progress::Progress;
use source::ImageSources;

/// Device sizes are recorded rounded up to a multiple of this (Proxmox's
/// block layer reports whole 512-byte sectors, and its restore needs them).
pub const SECTOR: u64 = 512;

/// Output buffer: small extents (clusters of holes) are gathered into writes
/// of this size.
const OUTPUT_BUFFER: usize = 256 * 1024;

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
