//! Extracting an archive: the image-file sink and the steps around it.
//!
//! Output, as Proxmox's `vma extract` names it: `DIR/disk-<devname>.raw` per
//! device (exactly the size the header records; zero blocks left as holes),
//! `DIR/vmstate.bin` for a `vmstate` device, and each config file under its
//! name. Images are written as `tmp-disk-<devname>.raw` (`tmp-vmstate.bin`)
//! and renamed only once the whole archive has been read and checked; config
//! files are written only then. On failure the temporary images are removed,
//! so a failed extract never leaves a file that looks complete. A salvage
//! extract keeps what it could recover under the final names, writes
//! `salvage-report.txt` and reports partial success.
//!
//! Differences from Proxmox, on purpose: names from the archive must be safe
//! file names (Proxmox builds paths from them unchecked); the `vmstate`
//! device is written in place (Proxmox drops its zero blocks and shifts the
//! data after them, which corrupts the state); images are fsynced before
//! they are renamed.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vma_cli::progress::ProxmoxProgress;
use vma_cli::{exit, Failure};
use vma_format::names::check_file_name;
use vma_format::reader::MissingClusters;
use vma_format::{Archive, Cluster, ClusterSink, Flow, Summary, VmaHeader, BLOCK_SIZE};

/// What to extract and how.
#[derive(Clone, Debug, Default)]
pub struct ExtractOptions {
    /// Only these devices (by name); all when `None`.
    pub devices: Option<Vec<String>>,
    /// Write into an existing non-empty directory.
    pub force: bool,
    /// Print Proxmox-style progress and closing statistics.
    pub verbose: bool,
    /// Recover what a damaged archive still holds (see [`vma_format::ReadOptions`]).
    pub salvage: bool,
}

/// What an extract produced.
#[derive(Debug)]
pub struct ExtractReport {
    /// What the reader found.
    pub summary: Summary,
    /// The files written (final names).
    pub files: Vec<PathBuf>,
}

impl ExtractReport {
    /// Whether the output is complete (anything less only happens with salvage).
    pub fn is_complete(&self) -> bool {
        self.summary.is_complete()
    }
}

/// One device's output file.
struct Target {
    file: File,
    tmp: PathBuf,
    path: PathBuf,
    size: u64,
    vmstate: bool,
    end: u64,
}

/// The sink that writes clusters into the device files.
struct ImageSink<'a> {
    targets: Vec<Option<Target>>,
    progress: Option<(ProxmoxProgress, &'a mut dyn Write)>,
}

impl ClusterSink for ImageSink<'_> {
    fn cluster(&mut self, c: &Cluster<'_>) -> io::Result<Flow> {
        if let Some((progress, out)) = &mut self.progress {
            progress.cluster(c, &mut **out)?;
        }
        let Some(t) = &mut self.targets[c.dev_id as usize] else {
            return Ok(Flow::Continue);
        };
        for (block, bytes) in c.runs() {
            let offset = c.offset() + (block * BLOCK_SIZE) as u64;
            // The reader guarantees no block of a disk starts past its end;
            // the last block may straddle it, so clip. The vmstate size does
            // not bind its clusters: clip at it only a block that straddles it.
            let len = if offset < t.size {
                (t.size - offset).min(bytes.len() as u64)
            } else {
                bytes.len() as u64
            };
            t.file
                .write_all_at(&bytes[..len as usize], offset)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", t.tmp.display())))?;
            t.end = t.end.max(offset + len);
        }
        Ok(Flow::Continue)
    }
}

/// The file name each config and device gets, after checking every name.
struct Plan {
    configs: Vec<(String, Vec<u8>)>,
    devices: Vec<(u8, String, u64, bool)>,
}

fn plan(header: &VmaHeader, input: &str, opts: &ExtractOptions) -> Result<Plan, Failure> {
    let bad = |what: String, why: String| {
        Failure::new(exit::DAMAGED, format!("{input}: header: {what}: {why}"))
    };
    let mut used = BTreeSet::new();
    if opts.salvage {
        used.insert(SALVAGE_REPORT.to_string());
    }
    let mut devices = Vec::new();
    if let Some(wanted) = &opts.devices {
        for name in wanted {
            if !header
                .devices()
                .iter()
                .any(|d| d.c_name() == name.as_bytes())
            {
                return Err(Failure::new(
                    exit::USAGE,
                    format!("{input}: no device named {name:?} in the archive"),
                ));
            }
        }
    }
    for d in header.devices() {
        let name = check_file_name(&d.name).map_err(|why| bad(format!("device {}", d.id), why))?;
        let vmstate = d.is_vmstate();
        if !vmstate
            && opts
                .devices
                .as_ref()
                .is_some_and(|w| !w.iter().any(|n| n == name))
        {
            continue;
        }
        let file = if vmstate {
            "vmstate.bin".to_string()
        } else {
            format!("disk-{name}.raw")
        };
        if !used.insert(file.clone()) || !used.insert(format!("tmp-{file}")) {
            return Err(bad(
                format!("device {}", d.id),
                format!("output file {file} would be written twice"),
            ));
        }
        devices.push((d.id, file, d.size, vmstate));
    }
    let mut configs = Vec::new();
    for c in header.configs() {
        let name =
            check_file_name(&c.name).map_err(|why| bad(format!("config {}", c.slot), why))?;
        if !used.insert(name.to_string()) {
            return Err(bad(
                format!("config {}", c.slot),
                format!("output file {name} would be written twice"),
            ));
        }
        configs.push((name.to_string(), c.data.clone()));
    }
    Ok(Plan { configs, devices })
}

/// Name of the report a salvage extract writes into the output directory.
pub const SALVAGE_REPORT: &str = "salvage-report.txt";

/// Extracts `archive` (named `input` in messages) into `dir`, writing
/// Proxmox's `DEVINFO` lines (and with `verbose` its progress lines) to `out`.
pub fn extract<R: Read>(
    mut archive: Archive<R>,
    input: &str,
    dir: &Path,
    opts: &ExtractOptions,
    out: &mut dyn Write,
) -> Result<ExtractReport, Failure> {
    let plan = plan(archive.header(), input, opts)?;
    prepare_dir(dir, opts.force)?;
    let stdout_err = |e: io::Error| Failure::io("stdout", &e);

    let mut targets: Vec<Option<Target>> = (0..256).map(|_| None).collect();
    let mut cleanup = Cleanup(Vec::new());
    for (id, file, size, vmstate) in &plan.devices {
        let path = dir.join(file);
        let tmp = dir.join(format!("tmp-{file}"));
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| Failure::io(&tmp.display().to_string(), &e))?;
        cleanup.0.push(tmp.clone());
        f.set_len(*size)
            .map_err(|e| Failure::io(&tmp.display().to_string(), &e))?;
        if !vmstate {
            writeln!(out, "DEVINFO {} {size}", tmp.display()).map_err(stdout_err)?;
        }
        targets[*id as usize] = Some(Target {
            file: f,
            tmp,
            path,
            size: *size,
            vmstate: *vmstate,
            end: 0,
        });
    }

    let progress = opts.verbose.then(|| ProxmoxProgress::new(archive.header()));
    let mut sink = ImageSink {
        targets,
        progress: progress.map(|p| (p, &mut *out)),
    };
    let summary = archive
        .run(&mut sink)
        .map_err(|e| Failure::format(input, &e))?;
    let ImageSink { targets, progress } = sink;
    if let Some((progress, out)) = progress {
        progress.finish(out).map_err(stdout_err)?;
    }

    let mut files = Vec::new();
    for t in targets.into_iter().flatten() {
        let name = t.tmp.display().to_string();
        if t.vmstate && t.end > t.size {
            t.file.set_len(t.end).map_err(|e| Failure::io(&name, &e))?;
        }
        t.file.sync_all().map_err(|e| Failure::io(&name, &e))?;
        fs::rename(&t.tmp, &t.path).map_err(|e| Failure::io(&name, &e))?;
        files.push(t.path);
    }
    cleanup.0.clear();
    for (name, data) in &plan.configs {
        let path = dir.join(name);
        fs::write(&path, data).map_err(|e| Failure::io(&path.display().to_string(), &e))?;
        files.push(path);
    }
    if opts.salvage && !summary.is_complete() {
        let path = dir.join(SALVAGE_REPORT);
        fs::write(&path, salvage_report(&summary))
            .map_err(|e| Failure::io(&path.display().to_string(), &e))?;
        files.push(path);
    }
    Ok(ExtractReport { summary, files })
}

/// Removes the temporary images unless disarmed (emptied).
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = fs::remove_file(p);
        }
    }
}

fn prepare_dir(dir: &Path, force: bool) -> Result<(), Failure> {
    let name = dir.display().to_string();
    match fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() && !force {
                return Err(Failure::new(
                    exit::USAGE,
                    format!(
                        "{name}: directory exists and is not empty (use --force to write into it)"
                    ),
                ));
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(dir).map_err(|e| Failure::io(&name, &e))
        }
        Err(e) => Err(Failure::io(&name, &e)),
    }
}

/// One line per device with missing clusters: `NAME: N of M clusters
/// missing: a-b, c, …` (at most `max_ranges` ranges, then `… (K more)`).
pub fn missing_line(m: &MissingClusters, max_ranges: usize) -> String {
    let mut ranges: Vec<String> = m
        .ranges
        .iter()
        .take(max_ranges)
        .map(|r| {
            if r.end - r.start == 1 {
                r.start.to_string()
            } else {
                format!("{}-{}", r.start, r.end - 1)
            }
        })
        .collect();
    if m.ranges.len() > max_ranges {
        ranges.push(format!("… ({} more)", m.ranges.len() - max_ranges));
    }
    format!(
        "{}: {} of {} clusters missing: {}",
        m.name,
        m.count,
        m.clusters,
        ranges.join(", ")
    )
}

/// The full salvage report: damage skipped and every missing range.
pub fn salvage_report(summary: &Summary) -> String {
    let mut s = String::from(
        "# vma-decode salvage report: clusters are 65536 bytes; missing ones are zero\n",
    );
    for m in &summary.missing {
        s.push_str(&missing_line(m, usize::MAX));
        s.push('\n');
    }
    for d in &summary.damage {
        s.push_str(&format!("damage: {d}\n"));
    }
    if summary.damage_count > summary.damage.len() as u64 {
        s.push_str(&format!(
            "damage: … {} more\n",
            summary.damage_count - summary.damage.len() as u64
        ));
    }
    s
}
