//! Extracting an archive: into a directory of images, or with a restore map
//! onto target files and block devices.
//!
//! Into a directory (`extract ARCHIVE DIR`), named as Proxmox's
//! `vma extract` names it: `DIR/disk-<devname>.raw` per device (exactly the
//! size the header records; zero blocks left as holes), `DIR/vmstate.bin`
//! for a `vmstate` device, and each config file under its name. Everything
//! is written under temporary names and renamed only once the whole archive
//! has been read and checked and every image and config is complete and
//! fsynced; on any failure every temporary file is removed, so a failed
//! extract never leaves a file that looks complete. Files are created
//! relative to the directory's descriptor, never through a symlink (see
//! [`crate::outdir`]). A salvage extract keeps what it could recover under
//! the final names, writes `salvage-report.txt` and reports partial success.
//!
//! With a restore map (`extract -r MAPFILE ARCHIVE DIR`), as Proxmox's
//! `qmrestore` drives `vma extract`: the config files are written into DIR
//! (and placed under their final names: qmrestore reads `qemu-server.conf`
//! from there), the listing (`CFG:`, `DEV:`, `CTIME:` lines) is printed and
//! flushed, then the map is read from MAPFILE (a FIFO) up to its `done`
//! line ([`crate::restore_map`]). Every device selected must be mapped, to
//! a target or `skip=`; every target is opened and its size checked before
//! the first byte is written. Targets are written in place (no temporary
//! name, no truncation); `vmstate` still goes to `DIR/vmstate.bin`.
//!
//! Differences from Proxmox, on purpose: names from the archive must be safe
//! file names (Proxmox builds paths from them unchecked); the `vmstate`
//! device is written in place (Proxmox drops its zero blocks and shifts the
//! data after them, which corrupts the state); images are fsynced before
//! they are renamed; an existing empty directory is accepted (Proxmox
//! insists on creating it); `-d` names a device that must exist.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use vma_cli::progress::ProxmoxProgress;
use vma_cli::{exit, listing, Failure};
use vma_format::names::check_file_name;
use vma_format::reader::MissingClusters;
use vma_format::{Archive, Cluster, ClusterSink, Flow, Summary, VmaHeader};

use crate::outdir::{temp_name, OutputDir, Staging, NAME_MAX};
use crate::restore_map::{self, Mapping, TargetSpec};
use crate::target::{Target, Throttle};

/// What to extract and how.
#[derive(Clone, Debug, Default)]
pub struct ExtractOptions {
    /// Only these devices (by name); all when `None`.
    pub devices: Option<Vec<String>>,
    /// Write into an existing non-empty directory, replacing files of the
    /// same names.
    pub force: bool,
    /// Print Proxmox-style progress and closing statistics.
    pub verbose: bool,
    /// Recover what a damaged archive still holds (see [`vma_format::ReadOptions`]).
    pub salvage: bool,
    /// Restore onto the targets a restore map names (read from this path,
    /// usually a FIFO), as `qmrestore` drives it.
    pub map: Option<PathBuf>,
}

/// What an extract produced.
#[derive(Debug)]
pub struct ExtractReport {
    /// What the reader found.
    pub summary: Summary,
    /// The files written into the directory (final names).
    pub files: Vec<PathBuf>,
    /// The targets of a restore map that were written.
    pub targets: Vec<PathBuf>,
}

impl ExtractReport {
    /// Whether the output is complete (anything less only happens with salvage).
    pub fn is_complete(&self) -> bool {
        self.summary.is_complete()
    }
}

/// The sink that writes clusters into the device targets.
struct ImageSink<'a> {
    targets: Vec<Option<Target>>,
    progress: Option<(ProxmoxProgress, &'a mut dyn Write)>,
}

impl ClusterSink for ImageSink<'_> {
    fn cluster(&mut self, c: &Cluster<'_>) -> io::Result<Flow> {
        if let Some((progress, out)) = &mut self.progress {
            progress.cluster(c, &mut **out)?;
        }
        if let Some(t) = &mut self.targets[c.dev_id as usize] {
            t.cluster(c)?;
        }
        Ok(Flow::Continue)
    }

    /// Each device's clusters of the extent to its target at once, so runs
    /// of data across adjacent clusters are written with one `pwrite`.
    fn extent_clusters(
        &mut self,
        data: &[u8],
        clusters: &[Cluster<'_>],
    ) -> io::Result<(usize, Flow)> {
        if let Some((progress, out)) = &mut self.progress {
            for c in clusters {
                progress.cluster(c, &mut **out)?;
            }
        }
        let mut i = 0;
        while i < clusters.len() {
            let dev = clusters[i].dev_id;
            let j = i + clusters[i..].iter().take_while(|c| c.dev_id == dev).count();
            if let Some(t) = &mut self.targets[dev as usize] {
                t.clusters(data, &clusters[i..j])?;
            }
            i = j;
        }
        Ok((clusters.len(), Flow::Continue))
    }
}

/// A device to extract, with the names it gets.
struct PlannedDevice {
    id: u8,
    name: String,
    /// Final file name in the directory (`disk-NAME.raw`, `vmstate.bin`).
    file: String,
    tmp: String,
    size: u64,
    vmstate: bool,
}

/// A config file to write.
struct PlannedConfig {
    name: String,
    tmp: String,
    data: Vec<u8>,
}

/// The file name each config and device gets, after checking every name.
struct Plan {
    configs: Vec<PlannedConfig>,
    devices: Vec<PlannedDevice>,
    salvage_tmp: String,
}

fn plan(header: &VmaHeader, input: &str, opts: &ExtractOptions) -> Result<Plan, Failure> {
    let bad = |what: String, why: String| {
        Failure::new(exit::DAMAGED, format!("{input}: header: {what}: {why}"))
    };
    let too_long = |what: String, file: &str| {
        Failure::new(
            exit::IO,
            format!(
                "{input}: header: {what}: output file name {file:?} is longer than {NAME_MAX} bytes"
            ),
        )
    };
    let mut used = BTreeSet::new();
    let salvage_tmp = temp_name(SALVAGE_REPORT, String::new);
    if opts.salvage {
        used.insert(SALVAGE_REPORT.to_string());
        used.insert(salvage_tmp.clone());
    }
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
    let mut devices = Vec::new();
    for d in header.devices() {
        let what = || format!("device {}", d.id);
        let name = check_file_name(&d.name).map_err(|why| bad(what(), why.to_string()))?;
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
        if file.len() > NAME_MAX {
            return Err(too_long(what(), &file));
        }
        let tmp = temp_name(&file, || format!("tmp-dev{}.raw", d.id));
        if !used.insert(file.clone()) || !used.insert(tmp.clone()) {
            return Err(bad(
                what(),
                format!("output file {file} would be written twice"),
            ));
        }
        devices.push(PlannedDevice {
            id: d.id,
            name: name.to_string(),
            file,
            tmp,
            size: d.size,
            vmstate,
        });
    }
    let mut configs = Vec::new();
    for c in header.configs() {
        let what = || format!("config {}", c.slot);
        let name = check_file_name(&c.name).map_err(|why| bad(what(), why.to_string()))?;
        if name.len() > NAME_MAX {
            return Err(too_long(what(), name));
        }
        let tmp = temp_name(name, || format!("tmp-config{}", c.slot));
        if !used.insert(name.to_string()) || !used.insert(tmp.clone()) {
            return Err(bad(
                what(),
                format!("output file {name} would be written twice"),
            ));
        }
        configs.push(PlannedConfig {
            name: name.to_string(),
            tmp,
            data: c.data.clone(),
        });
    }
    Ok(Plan {
        configs,
        devices,
        salvage_tmp,
    })
}

/// Name of the report a salvage extract writes into the output directory.
pub const SALVAGE_REPORT: &str = "salvage-report.txt";

/// Extracts `archive` (named `input` in messages) into `dir`, writing
/// Proxmox's `DEVINFO` lines (and with `verbose` its progress lines) to
/// `out`; with [`ExtractOptions::map`], restores onto the map's targets.
pub fn extract<R: Read>(
    archive: Archive<R>,
    input: &str,
    dir: &Path,
    opts: &ExtractOptions,
    out: &mut dyn Write,
) -> Result<ExtractReport, Failure> {
    let plan = plan(archive.header(), input, opts)?;
    if let Some(map) = &opts.map {
        if opts.salvage {
            return Err(Failure::new(
                exit::USAGE,
                "--salvage cannot be combined with a restore map (-r)",
            ));
        }
        return restore(archive, input, dir, map, plan, opts, out);
    }
    let outdir = OutputDir::prepare(dir, opts.force)?;
    let mut staging = Staging::new(&outdir, opts.force);
    let stdout_err = |e: io::Error| Failure::io("stdout", &e);

    let mut targets: Vec<Option<Target>> = (0..256).map(|_| None).collect();
    for d in &plan.devices {
        let f = staging.create(&d.tmp, &d.file)?;
        let shown = outdir.show(&d.tmp);
        f.set_len(d.size).map_err(|e| Failure::io(&shown, &e))?;
        if !d.vmstate {
            // Proxmox's line, its path as Proxmox builds it: DIR/NAME.
            writeln!(out, "DEVINFO {}/{} {}", dir.display(), d.tmp, d.size).map_err(stdout_err)?;
        }
        targets[d.id as usize] = Some(Target::new(f, shown, d.size, d.vmstate));
    }
    let summary = run(archive, input, targets, opts.verbose, out, |targets| {
        for t in targets.iter_mut().flatten() {
            if t.end > t.size() {
                // vmstate only: its clusters may run past its size.
                t.file()
                    .set_len(t.end)
                    .map_err(|e| Failure::io(&t.shown, &e))?;
            }
            t.file().sync_all().map_err(|e| Failure::io(&t.shown, &e))?;
        }
        Ok(())
    })?;

    for c in &plan.configs {
        staging.write(&c.tmp, &c.name, &c.data)?;
    }
    if opts.salvage && !summary.is_complete() {
        staging.write(
            &plan.salvage_tmp,
            SALVAGE_REPORT,
            salvage_report(&summary).as_bytes(),
        )?;
    }
    staging.place()?;
    Ok(ExtractReport {
        summary,
        files: staging.finish(),
        targets: Vec::new(),
    })
}

/// Reads the archive into `targets` (with `verbose`, printing Proxmox's
/// progress lines to `out`), prints the closing statistics, and hands the
/// targets to `close` (flush, sync).
fn run<R: Read>(
    mut archive: Archive<R>,
    input: &str,
    targets: Vec<Option<Target>>,
    verbose: bool,
    out: &mut dyn Write,
    close: impl FnOnce(&mut [Option<Target>]) -> Result<(), Failure>,
) -> Result<Summary, Failure> {
    let progress = verbose.then(|| ProxmoxProgress::new(archive.header()));
    let mut sink = ImageSink {
        targets,
        progress: progress.map(|p| (p, out)),
    };
    let summary = archive
        .run(&mut sink)
        .map_err(|e| Failure::format(input, &e))?;
    let ImageSink {
        mut targets,
        progress,
    } = sink;
    for t in targets.iter_mut().flatten() {
        t.flush_zeros().map_err(|e| Failure::io(&t.shown, &e))?;
    }
    close(&mut targets)?;
    if let Some((progress, out)) = progress {
        progress
            .finish(out)
            .and_then(|()| out.flush())
            .map_err(|e| Failure::io("stdout", &e))?;
    }
    Ok(summary)
}

/// Cache modes QEMU knows (`bdrv_parse_cache_mode`).
const CACHE_MODES: [&str; 6] = [
    "none",
    "off",
    "writeback",
    "writethrough",
    "directsync",
    "unsafe",
];

/// The restore of [`extract`] with a map.
fn restore<R: Read>(
    mut archive: Archive<R>,
    input: &str,
    dir: &Path,
    map_path: &Path,
    plan: Plan,
    opts: &ExtractOptions,
    out: &mut dyn Write,
) -> Result<ExtractReport, Failure> {
    let outdir = OutputDir::prepare(dir, opts.force)?;
    let mut staging = Staging::new(&outdir, opts.force);
    for c in &plan.configs {
        staging.write(&c.tmp, &c.name, &c.data)?;
    }
    staging.place()?;
    let stdout_err = |e: io::Error| Failure::io("stdout", &e);
    listing::write_listing(out, archive.header())
        .and_then(|()| out.flush())
        .map_err(stdout_err)?;

    let shown_map = map_path.display().to_string();
    let map = restore_map::read_path(map_path).map_err(|e| {
        Failure::new(
            if e.is_io() { exit::IO } else { exit::USAGE },
            format!("{shown_map}: {e}"),
        )
    })?;
    let map_err = |m: String| Failure::new(exit::USAGE, format!("{shown_map}: {m}"));
    let header = archive.header().clone();
    for name in map.devices.keys() {
        match header
            .devices()
            .iter()
            .find(|d| d.c_name() == name.as_bytes())
        {
            None => return Err(map_err(format!("no device named {name:?} in {input}"))),
            Some(d) if d.is_vmstate() => {
                return Err(map_err(format!(
                    "{name:?} is the RAM state: it is written to {}, not mapped",
                    outdir.show("vmstate.bin")
                )))
            }
            Some(_) => {}
        }
    }

    // Check every mapping and open every target before writing anything.
    let mut targets: Vec<Option<Target>> = (0..256).map(|_| None).collect();
    let mut written = Vec::new();
    let mut groups: HashMap<String, Rc<RefCell<Throttle>>> = HashMap::new();
    let mut no_sync = Vec::new();
    for d in plan.devices.iter().filter(|d| !d.vmstate) {
        let spec = match map.devices.get(&d.name) {
            None => {
                return Err(map_err(format!("no device name mapping for {}", d.name)));
            }
            Some(Mapping::Skip) => {
                archive.unchecked_device(d.id);
                continue;
            }
            Some(Mapping::Target(spec)) => spec,
        };
        let (file, shown) = open_target(spec, d, &map_err)?;
        let throttle = (spec.throttling_bps > 0).then(|| {
            let key = match &spec.throttling_group {
                Some(g) => format!("group {g}"),
                None => format!("device {}", d.name),
            };
            let t = groups
                .entry(key)
                .or_insert_with(|| Rc::new(RefCell::new(Throttle::new(spec.throttling_bps))));
            t.borrow_mut().limit_to(spec.throttling_bps);
            t.clone()
        });
        if spec.cache.as_deref() == Some("unsafe") {
            no_sync.push(d.id);
        }
        written.push(spec.path.clone());
        targets[d.id as usize] = Some(
            Target::new(file, shown, d.size, false)
                .write_zeros(spec.write_zeros)
                .throttled(throttle),
        );
    }
    for d in plan.devices.iter().filter(|d| d.vmstate) {
        let f = staging.create(&d.tmp, &d.file)?;
        let shown = outdir.show(&d.tmp);
        f.set_len(d.size).map_err(|e| Failure::io(&shown, &e))?;
        targets[d.id as usize] = Some(Target::new(f, shown, d.size, true));
    }

    let summary = run(archive, input, targets, opts.verbose, out, |targets| {
        for (id, t) in targets.iter_mut().enumerate() {
            let Some(t) = t else { continue };
            if t.end > t.size() && t.is_vmstate() {
                t.file()
                    .set_len(t.end)
                    .map_err(|e| Failure::io(&t.shown, &e))?;
            }
            if !no_sync.contains(&(id as u8)) {
                t.file().sync_all().map_err(|e| Failure::io(&t.shown, &e))?;
            }
        }
        Ok(())
    })?;
    staging.place()?;
    Ok(ExtractReport {
        summary,
        files: staging.finish(),
        targets: written,
    })
}

/// Opens a map target for device `d` and checks it can hold the device.
fn open_target(
    spec: &TargetSpec,
    d: &PlannedDevice,
    map_err: &dyn Fn(String) -> Failure,
) -> Result<(File, String), Failure> {
    let shown = spec.path.display().to_string();
    if let Some(format) = spec.format.as_deref().filter(|f| *f != "raw") {
        return Err(map_err(format!(
            "{}: format={format} is not supported: targets are written as raw images \
             (convert with qemu-img after restoring to a raw target)",
            d.name
        )));
    }
    if let Some(cache) = spec.cache.as_deref() {
        if !CACHE_MODES.contains(&cache) {
            return Err(map_err(format!("invalid cache option: {cache}")));
        }
    }
    let sync = matches!(spec.cache.as_deref(), Some("writethrough" | "directsync"));
    let mut file = OpenOptions::new()
        .write(true)
        .custom_flags(if sync { libc_o_dsync() } else { 0 })
        .open(&spec.path)
        .map_err(|e| Failure::io(&shown, &e))?;
    let meta = file.metadata().map_err(|e| Failure::io(&shown, &e))?;
    let size = if meta.is_file() {
        meta.len()
    } else if meta.file_type().is_block_device() {
        file.seek(io::SeekFrom::End(0))
            .map_err(|e| Failure::io(&shown, &e))?
    } else {
        return Err(Failure::new(
            exit::USAGE,
            format!(
                "{shown}: not a regular file or block device (target of {})",
                d.name
            ),
        ));
    };
    if size < d.size {
        return Err(Failure::new(
            exit::USAGE,
            format!(
                "{shown}: target of {} holds {size} bytes, the device needs {}",
                d.name, d.size
            ),
        ));
    }
    Ok((file, shown))
}

/// O_DSYNC: every write reaches the device before it returns.
fn libc_o_dsync() -> i32 {
    rustix::fs::OFlags::DSYNC.bits() as i32
}

/// One line per device with missing clusters: `NAME: N of M clusters
/// missing: a-b, c, …` (at most `max_ranges` ranges, then `… (K more)`).
pub fn missing_line(m: &MissingClusters, max_ranges: usize) -> String {
    let mut shown = 0usize;
    let mut ranges: Vec<String> = m
        .ranges()
        .take(max_ranges)
        .inspect(|_| shown += 1)
        .map(|r| {
            if r.end - r.start == 1 {
                r.start.to_string()
            } else {
                format!("{}-{}", r.start, r.end - 1)
            }
        })
        .collect();
    if shown == max_ranges {
        let more = m.ranges().skip(max_ranges).count();
        if more > 0 {
            ranges.push(format!("… ({more} more)"));
        }
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
