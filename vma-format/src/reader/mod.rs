//! The streaming reader: header, then extents, checked as they pass, their
//! clusters pushed into a [`ClusterSink`].
//!
//! It never seeks, so it reads pipes. Memory is bounded: one extent's data
//! (at most 59 × 64 KiB), and a [`ClusterSet`] per device: a few bytes per run
//! of clusters present, whatever the header claims.
//!
//! [`Archive::index`] walks the same extents with the same checks but passes
//! over their data ([`SkipData`]: a seek in a file) and hands on where each
//! cluster lies instead of its bytes, for random access to the archive later
//! (`vma-decode serve`).

use std::io::{self, Read};
use std::ops::Range;

use crate::cluster::{BlockMask, Cluster};
use crate::clusterset::ClusterSet;
use crate::devices::DeviceTracker;
use crate::error::{Error, Location};
use crate::extent::ExtentHeader;
use crate::header::VmaHeader;
use crate::{BLOCK_SIZE, EXTENT_SLOTS};

mod checks;
mod index;
mod pull;

pub use index::{IndexSink, IndexedCluster, IndexedExtent, Seekable, SkipData};
pub use pull::ArchiveClusters;

/// What a sink wants after a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Go on reading.
    Continue,
    /// Stop reading; [`Archive::run`] returns with [`Summary::stopped`] set.
    Stop,
}

/// Receives what the reader finds. Extract, verify, index and salvage are
/// sinks over the same reader, so the checks live in the reader once.
///
/// The reader calls `begin` once, `cluster` for each cluster in archive order
/// (each (device, cluster) at most once, every check of it already passed,
/// data checksum included), then `finish` once if the archive was read to its
/// end (or a sink asked to stop). An error — from the archive or from the
/// sink — ends reading without `finish`.
///
/// One exception, in salvage mode only: the whole clusters of an extent cut
/// off by the end of the input are delivered although its data checksum
/// (which covers the whole extent) cannot be checked — they are the best data
/// left, and the truncation is recorded in the summary's damage.
pub trait ClusterSink {
    /// Called before the first cluster.
    fn begin(&mut self, _header: &VmaHeader) -> io::Result<()> {
        Ok(())
    }

    /// Called for each cluster.
    fn cluster(&mut self, cluster: &Cluster<'_>) -> io::Result<Flow>;

    /// Called instead of [`cluster`](Self::cluster) with the clusters of
    /// one extent that passed every check, in slot order; each one's data
    /// is a part of `data`, the extent's data (clusters that follow one
    /// another in the extent follow one another there). The default hands
    /// them to `cluster` one by one. A sink overrides it to treat them
    /// together: extract writes a run of data blocks adjacent on disk and
    /// in `data` with one `pwrite`, across clusters.
    ///
    /// Returns how many clusters it took — all, or fewer if it asked to
    /// stop after the last one taken — and what it wants next.
    fn extent_clusters(
        &mut self,
        data: &[u8],
        clusters: &[Cluster<'_>],
    ) -> io::Result<(usize, Flow)> {
        let _ = data;
        for (i, c) in clusters.iter().enumerate() {
            if self.cluster(c)? == Flow::Stop {
                return Ok((i + 1, Flow::Stop));
            }
        }
        Ok((clusters.len(), Flow::Continue))
    }

    /// Called by the reader for each extent, instead of
    /// [`extent_clusters`](Self::extent_clusters) (which the default calls),
    /// with besides the extent's data checksum when it carried one, it was
    /// verified, and `data` is the whole of what it covers (every slot
    /// usable): a sink that writes the extent on (a merge) can reuse it.
    fn checked_extent(
        &mut self,
        data: &[u8],
        data_checksum: Option<u32>,
        clusters: &[Cluster<'_>],
    ) -> io::Result<(usize, Flow)> {
        let _ = data_checksum;
        self.extent_clusters(data, clusters)
    }

    /// Called after the last cluster and the end-of-archive checks.
    fn finish(&mut self, _summary: &Summary) -> io::Result<()> {
        Ok(())
    }
}

/// How to read.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReadOptions {
    /// Salvage: skip what is damaged instead of failing — bad extents are
    /// skipped by resynchronising on the next valid extent header, bad slots
    /// are skipped, a truncated extent yields its complete clusters — and
    /// report missing clusters in the summary instead of failing. The header
    /// must still be intact.
    pub salvage: bool,
}

/// Whether the archive's data checksums (our extension) were checked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataChecksums {
    /// Extents whose data checksum was verified.
    pub verified: u64,
    /// Extents without a data checksum (all of Proxmox's).
    pub absent: u64,
    /// Extents whose data checksum was not checked because their data was
    /// not read ([`Archive::index`]).
    pub unchecked: u64,
}

impl DataChecksums {
    /// `verified` (every extent had one and it matched), `absent` (no extent
    /// had one) or `partial` (some had).
    pub fn describe(&self) -> &'static str {
        match (self.verified, self.absent) {
            (0, _) => "absent",
            (_, 0) => "verified",
            _ => "partial",
        }
    }
}

/// Clusters of one device that the archive lacks (salvage).
///
/// It keeps the set of clusters that were present (memory proportional to
/// them) and yields the missing ones as ranges on demand: a hostile archive
/// holding every other cluster of a 2^48-byte device would otherwise make a
/// list of 2^31 ranges here, from a few MB of input.
#[derive(Clone, Debug)]
pub struct MissingClusters {
    /// Device id.
    pub dev_id: u8,
    /// Device name (lossy UTF-8).
    pub name: String,
    /// Clusters the device has.
    pub clusters: u64,
    /// How many are missing.
    pub count: u64,
    present: ClusterSet,
}

impl MissingClusters {
    /// The missing cluster numbers as ranges, ascending, one at a time (no
    /// list is built; `.count()` walks them all).
    pub fn ranges(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.present.missing()
    }
}

impl PartialEq for MissingClusters {
    fn eq(&self, other: &Self) -> bool {
        self.dev_id == other.dev_id
            && self.name == other.name
            && self.clusters == other.clusters
            && self.count == other.count
            && self.ranges().eq(other.ranges())
    }
}

impl Eq for MissingClusters {}

/// What a read found.
#[derive(Debug, Default)]
pub struct Summary {
    /// Extents read and accepted.
    pub extents: u64,
    /// Clusters pushed to the sink.
    pub clusters: u64,
    /// 4 KiB blocks of data pushed.
    pub data_blocks: u64,
    /// Bytes of input consumed.
    pub bytes_read: u64,
    /// Data checksum status.
    pub data_checksums: DataChecksums,
    /// Problems skipped over in salvage mode (the first 1000).
    pub damage: Vec<Error>,
    /// How many problems were skipped over.
    pub damage_count: u64,
    /// Devices with missing clusters (salvage mode).
    pub missing: Vec<MissingClusters>,
    /// The sink asked to stop before the end.
    pub stopped: bool,
    /// Candidate extent headers whose MD5 resynchronisation computed
    /// (salvage): what garbage cost beyond scanning it at memory speed.
    pub candidates_hashed: u64,
}

impl Summary {
    /// Whether nothing was skipped or missing.
    pub fn is_complete(&self) -> bool {
        self.damage_count == 0 && self.missing.is_empty() && !self.stopped
    }
}

/// What [`Archive::next_extent`] found.
// Returned once per extent and taken apart at once: boxing the header would
// cost an allocation per extent for nothing.
#[allow(clippy::large_enum_variant)]
enum NextExtent {
    /// The input ended (or, in salvage mode, was cut off in a header).
    End,
    /// A bad extent was skipped (salvage); the input is at the next one.
    Skipped,
    /// A checked extent header, where it was, its slots that passed their
    /// checks (all slots with a device id, unless in salvage mode) and the
    /// data blocks that follow; the input is at its data.
    Found(Location, ExtentHeader, [bool; EXTENT_SLOTS], usize),
}

/// A VMA archive being read from `R`.
///
/// ```no_run
/// # use vma_format::{Archive, ClusterSink, Cluster, Flow};
/// struct Count(u64);
/// impl ClusterSink for Count {
///     fn cluster(&mut self, _: &Cluster<'_>) -> std::io::Result<Flow> {
///         self.0 += 1;
///         Ok(Flow::Continue)
///     }
/// }
/// let mut archive = Archive::new(std::io::stdin().lock())?;
/// let summary = archive.run(&mut Count(0))?;
/// # Ok::<(), vma_format::Error>(())
/// ```
pub struct Archive<R> {
    inner: R,
    header: VmaHeader,
    options: ReadOptions,
    devices: DeviceTracker,
    pos: u64,
    pushback: Vec<u8>,
    pushback_pos: usize,
}

/// What [`Archive::read_extent`] found.
// As for NextExtent: taken apart at once.
#[allow(clippy::large_enum_variant)]
enum ExtentRead {
    /// The input ended.
    End,
    /// A bad extent was skipped (salvage).
    Skipped,
    /// A checked extent, its usable slots, and the length of its data at
    /// the start of [`ReadState::data`]: all of it (the last field true),
    /// or in salvage mode what arrived before the input ended.
    Data(ExtentHeader, [bool; EXTENT_SLOTS], usize, bool),
}

/// What reading extents keeps from one to the next.
#[derive(Default)]
struct ReadState {
    /// Extents so far.
    index: u64,
    /// The extent data buffer, reused.
    data: Vec<u8>,
}

const MAX_RECORDED_DAMAGE: usize = 1000;
const RESYNC_CHUNK: usize = 1 << 20;

impl<R: Read> Archive<R> {
    /// Reads and checks the header.
    pub fn new(inner: R) -> Result<Archive<R>, Error> {
        Archive::with_options(inner, ReadOptions::default())
    }

    /// Reads and checks the header, reading the rest as `options` say.
    pub fn with_options(mut inner: R, options: ReadOptions) -> Result<Archive<R>, Error> {
        let header = VmaHeader::read_from(&mut inner)?;
        let mut devices = DeviceTracker::new();
        for d in header.devices() {
            devices.declare(d.id, d.size, d.is_vmstate());
        }
        Ok(Archive {
            pos: header.header_size() as u64,
            inner,
            header,
            options,
            devices,
            pushback: Vec::new(),
            pushback_pos: 0,
        })
    }

    /// The checked header.
    pub fn header(&self) -> &VmaHeader {
        &self.header
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Reads device `dev_id` as Proxmox reads a device it skips: its
    /// clusters are still checked against the header (declared, inside the
    /// device, in order for `vmstate`) and delivered, but not checked for
    /// duplicates, nor required complete at the end, and nothing is
    /// remembered of them. For a restore that leaves the device out
    /// (`skip=` in a restore map). An undeclared id is ignored.
    pub fn unchecked_device(&mut self, dev_id: u8) {
        self.devices.set_unchecked(dev_id);
    }

    /// The input back.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Reads every extent, checks it, and pushes its clusters into `sink`.
    ///
    /// Checked for each extent: magic, header MD5, uuid equal to the
    /// archive's, reserved field 0, block_count equal to the blocks the masks
    /// name; for each slot with a device id: the device is declared, the
    /// cluster lies inside it and has no stored block past its end (for the
    /// `vmstate` device instead: clusters come in order from 0), the cluster
    /// was not seen before; the data is complete and, where the extent carries
    /// one, matches its data checksum. At the end: every cluster of every
    /// device (but `vmstate`) was present.
    ///
    /// Without salvage, the first problem is returned as an error. With it,
    /// problems are collected in the summary and reading goes on.
    pub fn run<S: ClusterSink + ?Sized>(&mut self, sink: &mut S) -> Result<Summary, Error> {
        sink.begin(&self.header).map_err(sink_error)?;
        let mut summary = Summary::default();
        let mut state = ReadState::default();
        loop {
            let (extent, usable, len, whole) = match self.read_extent(&mut state, &mut summary)? {
                ExtentRead::End => break,
                ExtentRead::Skipped => continue,
                ExtentRead::Data(extent, usable, len, whole) => (extent, usable, len, whole),
            };
            let data = &state.data[..len];
            // read_extent verified it (a whole extent's only).
            let crc = extent.data_checksum().filter(|_| whole);
            if self.deliver(&extent, &usable, data, crc, sink, &mut summary)? == Flow::Stop {
                summary.stopped = true;
                break;
            }
            if !whole {
                break;
            }
        }
        self.end_read(summary, |summary| sink.finish(summary))
    }

    /// The end of a read that was not cut short by an error: the
    /// end-of-archive checks (unless the sink stopped it), then the sink's
    /// `finish`.
    pub(super) fn end_read(
        &mut self,
        mut summary: Summary,
        finish: impl FnOnce(&Summary) -> io::Result<()>,
    ) -> Result<Summary, Error> {
        summary.bytes_read = self.pos;
        if !summary.stopped {
            self.check_complete(&mut summary)?;
        }
        finish(&summary).map_err(sink_error)?;
        Ok(summary)
    }

    /// Reads the next extent with every check, its data into `state.data`.
    /// A truncated extent (salvage) comes with the data that arrived, and
    /// is the last.
    fn read_extent(
        &mut self,
        state: &mut ReadState,
        summary: &mut Summary,
    ) -> Result<ExtentRead, Error> {
        let salvage = self.options.salvage;
        let (loc, extent, usable, blocks) = match self.next_extent(&mut state.index, summary)? {
            NextExtent::End => return Ok(ExtentRead::End),
            NextExtent::Skipped => return Ok(ExtentRead::Skipped),
            NextExtent::Found(loc, extent, usable, blocks) => (loc, extent, usable, blocks),
        };
        let need = blocks * BLOCK_SIZE;
        let data = &mut state.data;
        if data.len() < need {
            data.resize(need, 0);
        }
        // With a data checksum, the data is read in pieces and each hashed
        // right after its read, while it is in the CPU's cache: hashing the
        // whole extent after reading it read every byte back from memory.
        let mut hasher = extent.data_checksum().map(|_| crc32fast::Hasher::new());
        let mut got = 0;
        while got < need {
            let piece = &mut data[got..need.min(got + HASHED_READ)];
            let n = self
                .read_full(piece)
                .map_err(|e| Error::io(Some(loc), "read failed", e))?;
            if let Some(h) = hasher.as_mut() {
                h.update(&piece[..n]);
            }
            got += n;
            if n < piece.len() {
                break;
            }
        }
        if got < need {
            let err = Error::damaged(
                Some(loc),
                format!("truncated: got {got} of {need} data bytes"),
            );
            tolerate(salvage, summary, err)?;
            // Hand over the clusters that arrived whole.
            return Ok(ExtentRead::Data(extent, usable, got, false));
        }
        match (extent.data_checksum(), hasher) {
            (Some(crc), Some(hasher)) => {
                // Inline, piece by piece: measured faster on two cores than
                // hashing on a helper thread while reading (benches/decode.sh).
                if hasher.finalize() != crc {
                    let err = Error::damaged(Some(loc), "data checksum mismatch");
                    tolerate(salvage, summary, err)?;
                    return Ok(ExtentRead::Skipped);
                }
                summary.data_checksums.verified += 1;
            }
            _ => summary.data_checksums.absent += 1,
        }
        summary.extents += 1;
        Ok(ExtentRead::Data(extent, usable, need, true))
    }

    /// Records and pushes the usable clusters of an extent whose data is
    /// `data` (complete, or a prefix when the input was truncated); `crc`:
    /// its data checksum, verified.
    fn deliver<S: ClusterSink + ?Sized>(
        &mut self,
        extent: &ExtentHeader,
        usable: &[bool; EXTENT_SLOTS],
        data: &[u8],
        crc: Option<u32>,
        sink: &mut S,
        summary: &mut Summary,
    ) -> Result<Flow, Error> {
        const NONE: Cluster<'static> = Cluster {
            dev_id: 0,
            cluster_num: 0,
            mask: BlockMask::EMPTY,
            data: &[],
        };
        let mut clusters = [NONE; EXTENT_SLOTS];
        let mut count = 0;
        let mut at = 0usize;
        let mut all = true;
        for (i, slot) in extent.slots().iter().enumerate() {
            if slot.dev_id == 0 {
                continue;
            }
            let len = slot.mask.data_len();
            let end = at + len;
            if end > data.len() {
                all = false;
                break;
            }
            all &= usable[i];
            if usable[i] {
                self.record(slot);
                clusters[count] = Cluster {
                    dev_id: slot.dev_id,
                    cluster_num: slot.cluster_num,
                    mask: slot.mask,
                    data: &data[at..end],
                };
                count += 1;
            }
            at = end;
        }
        if count == 0 {
            return Ok(Flow::Continue);
        }
        let crc = crc.filter(|_| all && at == data.len());
        let (taken, flow) = sink
            .checked_extent(&data[..at], crc, &clusters[..count])
            .map_err(sink_error)?;
        for c in &clusters[..taken.min(count)] {
            summary.clusters += 1;
            summary.data_blocks += c.mask.count() as u64;
        }
        if flow == Flow::Stop {
            return Ok(Flow::Stop);
        }
        Ok(Flow::Continue)
    }

    /// Reads until `buf` is full or the input ends, taking pushed-back bytes
    /// first; returns the bytes read.
    fn read_full(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut got = 0;
        if self.pushback_pos < self.pushback.len() {
            let n = buf.len().min(self.pushback.len() - self.pushback_pos);
            buf[..n].copy_from_slice(&self.pushback[self.pushback_pos..self.pushback_pos + n]);
            self.pushback_pos += n;
            got = n;
            if self.pushback_pos == self.pushback.len() {
                self.pushback = Vec::new();
                self.pushback_pos = 0;
            }
        }
        got += crate::read_full(&mut self.inner, &mut buf[got..])?;
        self.pos += got as u64;
        Ok(got)
    }
}

/// Bytes of extent data read at a time when they are hashed as they come
/// (cat's buffer size: the piece stays in the CPU's cache from the read
/// to the hash).
const HASHED_READ: usize = 128 * 1024;

/// Without salvage, `err` ends the read; with it, `err` is recorded and
/// reading goes on.
fn tolerate(salvage: bool, summary: &mut Summary, err: Error) -> Result<(), Error> {
    if !salvage {
        return Err(err);
    }
    summary.damage_count += 1;
    if summary.damage.len() < MAX_RECORDED_DAMAGE {
        summary.damage.push(err);
    }
    Ok(())
}

fn sink_error(e: io::Error) -> Error {
    Error::io(None, "output failed", e)
}
