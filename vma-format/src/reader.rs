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

use std::io::{self, Read, Seek, SeekFrom};
use std::ops::Range;
use std::sync::mpsc;

use crate::cluster::{BlockMask, Cluster};
use crate::clusterset::ClusterSet;
use crate::error::{Error, Location};
use crate::extent::{BlockInfo, ExtentHeader};
use crate::header::VmaHeader;
use crate::{BLOCK_SIZE, EXTENT_HEADER_SIZE, EXTENT_SLOTS};

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
    /// A checked extent header; the input is at its data.
    Found {
        loc: Location,
        extent: ExtentHeader,
        /// Slots that passed their checks (all slots with a device id,
        /// unless in salvage mode).
        usable: [bool; EXTENT_SLOTS],
        /// Data blocks that follow.
        blocks: usize,
    },
}

/// An input that [`Archive::index`] can pass over extent data in without
/// reading it: a seekable file ([`Seekable`]), or a stream that reads the
/// bytes and does something else with them (copies them to a cache file).
pub trait SkipData: Read {
    /// Moves `n` bytes forward and returns how many there were: fewer only
    /// where the input ends.
    fn skip_data(&mut self, n: u64) -> io::Result<u64>;
}

/// A seekable input (a file) whose length is taken once, when it is
/// wrapped: [`SkipData`] is then a seek that stops at that length, so a
/// cut-off archive is seen to be cut off without reading its data.
#[derive(Debug)]
pub struct Seekable<R> {
    inner: R,
    pos: u64,
    len: u64,
}

impl<R: Read + Seek> Seekable<R> {
    /// Wraps `inner` at its current position.
    pub fn new(mut inner: R) -> io::Result<Seekable<R>> {
        let pos = inner.stream_position()?;
        let len = inner.seek(SeekFrom::End(0))?;
        inner.seek(SeekFrom::Start(pos))?;
        Ok(Seekable { inner, pos, len })
    }

    /// The length taken when it was wrapped.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether that length was 0.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The input back.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for Seekable<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R: Read + Seek> SkipData for Seekable<R> {
    fn skip_data(&mut self, n: u64) -> io::Result<u64> {
        let n = n.min(self.len.saturating_sub(self.pos));
        if n > 0 {
            let step = i64::try_from(n).map_err(|_| io::ErrorKind::InvalidInput)?;
            self.inner.seek(SeekFrom::Current(step))?;
            self.pos += n;
        }
        Ok(n)
    }
}

/// One cluster as [`Archive::index`] finds it: where its data lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexedCluster {
    /// Device id.
    pub dev_id: u8,
    /// Cluster number.
    pub cluster_num: u32,
    /// Which blocks are stored.
    pub mask: BlockMask,
    /// Its first stored block, counted in blocks from the start of the
    /// extent's data (its blocks follow one another from there).
    pub first_block: u16,
}

/// One extent as [`Archive::index`] finds it.
#[derive(Clone, Copy, Debug)]
pub struct IndexedExtent<'a> {
    /// Extents before it (damaged ones skipped in salvage mode included).
    pub index: u64,
    /// Position of its 512-byte header in the input; its data follows.
    pub offset: u64,
    /// Data blocks its header announces.
    pub block_count: u16,
    /// Bytes of its data present: `block_count * 4096`, less only for an
    /// extent cut off by the end of the input (salvage mode).
    pub data_len: u64,
    /// The CRC-32 its header carries for its `block_count * 4096` data
    /// bytes (our extension), not checked: the data was not read.
    pub data_checksum: Option<u32>,
    /// Its clusters that passed every check, in slot order (in salvage
    /// mode only those whose data is present whole).
    pub clusters: &'a [IndexedCluster],
}

impl IndexedExtent<'_> {
    /// Position of its first data byte in the input.
    pub fn data_offset(&self) -> u64 {
        self.offset + EXTENT_HEADER_SIZE as u64
    }
}

/// Receives what [`Archive::index`] finds: `begin` once, `extent` for each
/// extent in archive order, `finish` once if the archive was walked to its
/// end (or the sink asked to stop); an error ends the walk without `finish`.
pub trait IndexSink {
    /// Called before the first extent.
    fn begin(&mut self, _header: &VmaHeader) -> io::Result<()> {
        Ok(())
    }

    /// Called for each extent whose header passed every check.
    fn extent(&mut self, extent: &IndexedExtent<'_>) -> io::Result<Flow>;

    /// Called after the last extent and the end-of-archive checks.
    fn finish(&mut self, _summary: &Summary) -> io::Result<()> {
        Ok(())
    }
}

struct DeviceState {
    size: u64,
    clusters: u64,
    vmstate: bool,
    seen: ClusterSet,
    vmstate_next: u64,
    /// Neither duplicates nor completeness checked (see [`Archive::unchecked_device`]).
    unchecked: bool,
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
    devices: Vec<Option<DeviceState>>,
    pos: u64,
    pushback: Vec<u8>,
    pushback_pos: usize,
}

const MAX_RECORDED_DAMAGE: usize = 1000;
/// Extent data is hashed on a second thread in pieces of this size; an
/// extent of at most one piece is hashed on the reading thread.
const HASH_PIECE: usize = 512 * 1024;
const RESYNC_CHUNK: usize = 1 << 20;

impl<R: Read> Archive<R> {
    /// Reads and checks the header.
    pub fn new(inner: R) -> Result<Archive<R>, Error> {
        Archive::with_options(inner, ReadOptions::default())
    }

    /// Reads and checks the header, reading the rest as `options` say.
    pub fn with_options(mut inner: R, options: ReadOptions) -> Result<Archive<R>, Error> {
        let header = VmaHeader::read_from(&mut inner)?;
        let mut devices: Vec<Option<DeviceState>> = (0..256).map(|_| None).collect();
        for d in header.devices() {
            devices[d.id as usize] = Some(DeviceState {
                size: d.size,
                clusters: d.clusters(),
                vmstate: d.is_vmstate(),
                seen: ClusterSet::new(if d.is_vmstate() { 0 } else { d.clusters() }),
                vmstate_next: 0,
                unchecked: false,
            });
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
        if let Some(dev) = &mut self.devices[dev_id as usize] {
            dev.unchecked = true;
        }
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
        let salvage = self.options.salvage;
        let mut summary = Summary::default();
        let mut data: Vec<u8> = Vec::new();
        let mut index = 0u64;
        // Started with the first extent big enough to be hashed in pieces
        // (a thread costs more than hashing a small extent on this one).
        let mut crc_worker: Option<Option<CrcWorker>> = None;
        loop {
            let (loc, extent, usable, blocks) = match self.next_extent(&mut index, &mut summary)? {
                NextExtent::End => break,
                NextExtent::Skipped => continue,
                NextExtent::Found {
                    loc,
                    extent,
                    usable,
                    blocks,
                } => (loc, extent, usable, blocks),
            };
            let need = blocks * BLOCK_SIZE;
            if data.len() < need {
                data.resize(need, 0);
            }
            let worker = if extent.data_checksum().is_some() && need > HASH_PIECE {
                crc_worker.get_or_insert_with(CrcWorker::start).as_mut()
            } else {
                None
            };
            let (got, data_crc) = match (extent.data_checksum(), worker) {
                (Some(_), Some(worker)) => self.read_hashing(&mut data[..need], worker),
                _ => (self.read_full(&mut data[..need]), None),
            };
            let got = got.map_err(|e| Error::io(Some(loc), "read failed", e))?;
            if got < need {
                let err = Error::damaged(
                    Some(loc),
                    format!("truncated: got {got} of {need} data bytes"),
                );
                tolerate(salvage, &mut summary, err)?;
                // Hand over the clusters that arrived whole.
                if self.deliver(&extent, &usable, &data[..got], sink, &mut summary)? == Flow::Stop {
                    summary.stopped = true;
                }
                break;
            }
            match extent.data_checksum() {
                Some(crc) => {
                    let actual = data_crc.unwrap_or_else(|| crc32fast::hash(&data[..need]));
                    if actual != crc {
                        let err = Error::damaged(Some(loc), "data checksum mismatch");
                        tolerate(salvage, &mut summary, err)?;
                        continue;
                    }
                    summary.data_checksums.verified += 1;
                }
                None => summary.data_checksums.absent += 1,
            }
            summary.extents += 1;
            if self.deliver(&extent, &usable, &data[..need], sink, &mut summary)? == Flow::Stop {
                summary.stopped = true;
                break;
            }
        }
        summary.bytes_read = self.pos;
        if !summary.stopped {
            self.check_complete(&mut summary)?;
        }
        sink.finish(&summary).map_err(sink_error)?;
        Ok(summary)
    }

    /// Reads the next extent header and checks it and its slots — every
    /// check but those of its data — leaving the input at its data.
    /// `index` counts the extents; in salvage mode a bad header is recorded
    /// and skipped by resynchronising.
    fn next_extent(&mut self, index: &mut u64, summary: &mut Summary) -> Result<NextExtent, Error> {
        let uuid = self.header.uuid();
        let salvage = self.options.salvage;
        let mut head = [0u8; EXTENT_HEADER_SIZE];
        let offset = self.pos;
        let loc = Location::Extent {
            index: *index,
            offset,
        };
        let got = self
            .read_full(&mut head)
            .map_err(|e| Error::io(Some(loc), "read failed", e))?;
        if got == 0 {
            return Ok(NextExtent::End);
        }
        if got < EXTENT_HEADER_SIZE {
            let err = Error::damaged(
                Some(loc),
                format!("truncated: got {got} of {EXTENT_HEADER_SIZE} header bytes"),
            );
            tolerate(salvage, summary, err)?;
            return Ok(NextExtent::End);
        }
        *index += 1;
        let extent = match ExtentHeader::parse(&head, &uuid) {
            Ok(extent) => extent,
            Err(problem) => {
                let err = Error::damaged(Some(loc), problem);
                tolerate(salvage, summary, err)?;
                return self.resync_after(*index, &head, offset, summary);
            }
        };

        // Check every slot before touching any state, so that a bad
        // extent leaves nothing half-recorded.
        let mut usable = [false; EXTENT_SLOTS];
        let mut blocks = 0usize;
        let mut vmstate_next = None;
        for (i, slot) in extent.slots().iter().enumerate() {
            if slot.dev_id == 0 {
                continue;
            }
            blocks += slot.mask.count();
            match self.check_slot(
                i,
                slot.dev_id,
                slot.cluster_num,
                slot.mask,
                &extent,
                &mut vmstate_next,
            ) {
                Ok(()) => usable[i] = true,
                Err(problem) => {
                    let err = Error::damaged(Some(loc), problem);
                    tolerate(salvage, summary, err)?;
                }
            }
        }
        if blocks != extent.block_count() as usize {
            let err = Error::damaged(
                Some(loc),
                format!(
                    "block_count {} does not match the {blocks} blocks its masks name",
                    extent.block_count()
                ),
            );
            tolerate(salvage, summary, err)?;
            return self.resync_after(*index, &head, offset, summary);
        }
        Ok(NextExtent::Found {
            loc,
            extent,
            usable,
            blocks,
        })
    }

    /// After a bad extent header `head` at `offset` (salvage): skip to the
    /// next valid one.
    fn resync_after(
        &mut self,
        index: u64,
        head: &[u8; EXTENT_HEADER_SIZE],
        offset: u64,
        summary: &mut Summary,
    ) -> Result<NextExtent, Error> {
        Ok(if self.resync(index, &head[1..], offset + 1, summary)? {
            NextExtent::Skipped
        } else {
            NextExtent::End
        })
    }

    /// Remembers that the cluster of `slot` (checked, usable) was handed on.
    fn record(&mut self, slot: &BlockInfo) {
        let dev = self.devices[slot.dev_id as usize]
            .as_mut()
            .expect("checked");
        if dev.vmstate {
            dev.vmstate_next = slot.cluster_num as u64 + 1;
        } else if !dev.unchecked {
            dev.seen.insert(slot.cluster_num as u64);
        }
    }

    /// Checks one slot against the devices and what was seen; returns the
    /// problem. `vmstate_next` carries the next expected vmstate cluster
    /// across the slots of one extent.
    fn check_slot(
        &self,
        i: usize,
        dev_id: u8,
        cluster_num: u32,
        mask: BlockMask,
        extent: &ExtentHeader,
        vmstate_next: &mut Option<u64>,
    ) -> Result<(), String> {
        let Some(dev) = &self.devices[dev_id as usize] else {
            return Err(format!(
                "slot {i}: device {dev_id} is not declared in the header"
            ));
        };
        // Only a problem needs the name: building it is an allocation and a
        // search, and this runs for every cluster.
        let name = || self.device_name(dev_id);
        let n = cluster_num as u64;
        if dev.vmstate {
            let expected = vmstate_next.unwrap_or(dev.vmstate_next);
            let accept = if self.options.salvage {
                n >= expected
            } else {
                n == expected
            };
            if !accept {
                return Err(format!(
                    "slot {i}: {} cluster {n} out of order (expected {expected})",
                    name()
                ));
            }
            *vmstate_next = Some(n + 1);
            return Ok(());
        }
        if n >= dev.clusters {
            return Err(format!(
                "slot {i}: cluster {n} is past the end of {} ({} clusters)",
                name(),
                dev.clusters
            ));
        }
        let allowed = BlockMask::in_device(n, dev.size);
        if mask.0 & !allowed.0 != 0 {
            return Err(format!(
                "slot {i}: cluster {n} of {} stores blocks past the device end (mask {:#06x})",
                name(),
                mask.0
            ));
        }
        let earlier = extent.slots()[..i]
            .iter()
            .any(|s| s.dev_id == dev_id && s.cluster_num == cluster_num);
        if !dev.unchecked && (earlier || dev.seen.contains(n)) {
            return Err(format!("slot {i}: cluster {n} of {} appears twice", name()));
        }
        Ok(())
    }

    fn device_name(&self, dev_id: u8) -> String {
        self.header
            .device(dev_id)
            .map(|d| d.display_name())
            .unwrap_or_default()
    }

    /// Records and pushes the usable clusters of an extent whose data is
    /// `data` (complete, or a prefix when the input was truncated).
    fn deliver<S: ClusterSink + ?Sized>(
        &mut self,
        extent: &ExtentHeader,
        usable: &[bool; EXTENT_SLOTS],
        data: &[u8],
        sink: &mut S,
        summary: &mut Summary,
    ) -> Result<Flow, Error> {
        let mut at = 0usize;
        for (i, slot) in extent.slots().iter().enumerate() {
            if slot.dev_id == 0 {
                continue;
            }
            let len = slot.mask.data_len();
            let end = at + len;
            if end > data.len() {
                break;
            }
            if usable[i] {
                self.record(slot);
                let cluster = Cluster {
                    dev_id: slot.dev_id,
                    cluster_num: slot.cluster_num,
                    mask: slot.mask,
                    data: &data[at..end],
                };
                summary.clusters += 1;
                summary.data_blocks += slot.mask.count() as u64;
                if sink.cluster(&cluster).map_err(sink_error)? == Flow::Stop {
                    return Ok(Flow::Stop);
                }
            }
            at = end;
        }
        Ok(Flow::Continue)
    }

    /// The end-of-archive check: every cluster of every device present.
    fn check_complete(&mut self, summary: &mut Summary) -> Result<(), Error> {
        for d in self.header.devices() {
            let dev = self.devices[d.id as usize].as_mut().expect("declared");
            if dev.vmstate || dev.unchecked || dev.seen.missing_count() == 0 {
                continue;
            }
            let count = dev.seen.missing_count();
            if !self.options.salvage {
                let first = dev.seen.first_missing().expect("some are missing");
                return Err(Error::damaged(
                    Some(Location::End),
                    format!(
                        "{}: cluster {first} missing ({count} of {} clusters missing)",
                        d.display_name(),
                        dev.clusters
                    ),
                ));
            }
            summary.missing.push(MissingClusters {
                dev_id: d.id,
                name: d.display_name(),
                clusters: dev.clusters,
                count,
                // Moved out, not copied: the read is over.
                present: std::mem::take(&mut dev.seen),
            });
        }
        Ok(())
    }

    /// After damage: finds the next valid extent header at or after
    /// `start_offset`, whose bytes begin with `start` (already consumed), and
    /// arranges for reading to go on from there. False at the end of input.
    /// `index` numbers the extent being looked for (for messages).
    ///
    /// Candidates are found cheaply before any MD5 is computed: by the
    /// archive's uuid (bytes 8..24 of every extent header) with `memmem`, then
    /// the magic, the reserved field and a block count that matches the
    /// masks (what [`run`](Self::run) would refuse anyway). A candidate equal
    /// to the last one whose MD5 failed is not hashed again (repeated
    /// garbage). What remains costs one MD5 per candidate: garbage built to
    /// pass every cheap check can force one per 24 bytes.
    fn resync(
        &mut self,
        index: u64,
        start: &[u8],
        start_offset: u64,
        summary: &mut Summary,
    ) -> Result<bool, Error> {
        const UUID_AT: usize = 8;
        const UUID_END: usize = UUID_AT + 16;
        let uuid = self.header.uuid();
        let finder = memchr::memmem::Finder::new(&uuid);
        let mut rejected = [0u8; EXTENT_HEADER_SIZE];
        let mut have_rejected = false;
        let mut buf = start.to_vec();
        let mut base = start_offset;
        // Where the next uuid may start in `buf`.
        let mut search = UUID_AT;
        loop {
            let mut incomplete = None;
            while search + 16 <= buf.len() {
                let Some(i) = finder.find(&buf[search..]) else {
                    break;
                };
                let c = search + i - UUID_AT;
                if buf.len() - c < EXTENT_HEADER_SIZE {
                    incomplete = Some(c);
                    break;
                }
                search += i + 1;
                let candidate: &[u8; EXTENT_HEADER_SIZE] =
                    buf[c..c + EXTENT_HEADER_SIZE].try_into().expect("512");
                if candidate[..4] != crate::extent::EXTENT_MAGIC
                    || candidate[4..6] != [0, 0]
                    || (have_rejected && *candidate == rejected)
                {
                    continue;
                }
                if !block_count_matches(candidate) {
                    rejected = *candidate;
                    have_rejected = true;
                    continue;
                }
                summary.candidates_hashed += 1;
                if ExtentHeader::is_valid(candidate, &uuid) {
                    let mut rest = buf[c..].to_vec();
                    rest.extend_from_slice(&self.pushback[self.pushback_pos..]);
                    self.pushback = rest;
                    self.pushback_pos = 0;
                    self.pos = base + c as u64;
                    return Ok(true);
                }
                rejected = *candidate;
                have_rejected = true;
            }
            // Keep what a candidate not yet ruled out may start with.
            let keep = incomplete.unwrap_or(buf.len().saturating_sub(UUID_END - 1));
            buf.drain(..keep);
            base += keep as u64;
            search = search.saturating_sub(keep).max(UUID_AT);
            let old = buf.len();
            buf.resize(old + RESYNC_CHUNK, 0);
            let got = self.read_full(&mut buf[old..]).map_err(|e| {
                Error::io(
                    Some(Location::Extent {
                        index,
                        offset: base,
                    }),
                    "read failed",
                    e,
                )
            })?;
            buf.truncate(old + got);
            if got == 0 {
                return Ok(false);
            }
        }
    }

    /// Reads like [`read_full`](Self::read_full) while `worker` computes the
    /// CRC-32 of what has arrived: piece by piece, the worker hashes one piece
    /// while this thread reads the next, so the checksum costs almost no time
    /// on a machine with a second core. Returns the bytes read and, if all of
    /// `buf` arrived, its CRC.
    fn read_hashing(
        &mut self,
        buf: &mut [u8],
        worker: &mut CrcWorker,
    ) -> (io::Result<usize>, Option<u32>) {
        const PIECE: usize = HASH_PIECE;
        let len = buf.len();
        // Every piece is derived from this one pointer, so reading into a
        // later piece never reborrows the pieces the worker is hashing.
        let base = buf.as_mut_ptr();
        let pending = PendingPieces(worker);
        let mut got = 0;
        let mut result = Ok(0);
        while got < len {
            let end = (got + PIECE).min(len);
            // SAFETY: got..end lies inside `buf` and after every piece sent.
            let piece = unsafe { std::slice::from_raw_parts_mut(base.add(got), end - got) };
            match self.read_full(piece) {
                Ok(n) => {
                    pending
                        .0
                        .hash(PiecePtr(base.wrapping_add(got).cast_const()), n);
                    got += n;
                    if got < end {
                        break;
                    }
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        let crc = pending.finish();
        match result {
            Ok(_) => (Ok(got), (got == len).then_some(crc)),
            Err(e) => (Err(e), None),
        }
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
        while got < buf.len() {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.pos += got as u64;
                    return Err(e);
                }
            }
        }
        self.pos += got as u64;
        Ok(got)
    }
}

impl<R: SkipData> Archive<R> {
    /// Walks every extent as [`run`](Self::run) does, with every check
    /// `run` makes but those of the data, reading only the 512-byte extent
    /// headers and passing over the data with [`SkipData`] (a seek, in a
    /// file): the extents' data checksums are not checked (they are counted
    /// as [`DataChecksums::unchecked`]) and their bytes are not looked at.
    /// For each extent `sink` learns where it lies and where each of its
    /// clusters' data is.
    ///
    /// Checked as in `run`: each extent header (magic, MD5, uuid, reserved
    /// field, block_count against the masks), each slot (device declared,
    /// cluster inside it and nothing stored past its end, `vmstate` in
    /// order, no cluster twice), the data present in full (a cut-off archive
    /// is damaged), and at the end every cluster of every device but
    /// `vmstate` present. Salvage mode works as in `run`.
    pub fn index<S: IndexSink + ?Sized>(&mut self, sink: &mut S) -> Result<Summary, Error> {
        sink.begin(&self.header).map_err(sink_error)?;
        let salvage = self.options.salvage;
        let mut summary = Summary::default();
        let mut index = 0u64;
        let mut clusters: Vec<IndexedCluster> = Vec::with_capacity(EXTENT_SLOTS);
        loop {
            let (loc, extent, usable, blocks) = match self.next_extent(&mut index, &mut summary)? {
                NextExtent::End => break,
                NextExtent::Skipped => continue,
                NextExtent::Found {
                    loc,
                    extent,
                    usable,
                    blocks,
                } => (loc, extent, usable, blocks),
            };
            let Location::Extent {
                index: extent_index,
                offset,
            } = loc
            else {
                unreachable!("next_extent locates extents")
            };
            let need = (blocks * BLOCK_SIZE) as u64;
            let got = self
                .skip_full(need)
                .map_err(|e| Error::io(Some(loc), "read failed", e))?;
            let complete = got == need;
            if !complete {
                let err = Error::damaged(
                    Some(loc),
                    format!("truncated: got {got} of {need} data bytes"),
                );
                tolerate(salvage, &mut summary, err)?;
            }
            clusters.clear();
            let mut at = 0u64;
            for (i, slot) in extent.slots().iter().enumerate() {
                if slot.dev_id == 0 {
                    continue;
                }
                let n = slot.mask.count() as u64;
                if (at + n) * BLOCK_SIZE as u64 > got {
                    break;
                }
                if usable[i] {
                    self.record(slot);
                    clusters.push(IndexedCluster {
                        dev_id: slot.dev_id,
                        cluster_num: slot.cluster_num,
                        mask: slot.mask,
                        first_block: at as u16,
                    });
                    summary.clusters += 1;
                    summary.data_blocks += n;
                }
                at += n;
            }
            if complete {
                summary.extents += 1;
                match extent.data_checksum() {
                    Some(_) => summary.data_checksums.unchecked += 1,
                    None => summary.data_checksums.absent += 1,
                }
            }
            let found = IndexedExtent {
                index: extent_index,
                offset,
                block_count: extent.block_count(),
                data_len: got,
                data_checksum: extent.data_checksum(),
                clusters: &clusters,
            };
            if sink.extent(&found).map_err(sink_error)? == Flow::Stop {
                summary.stopped = true;
                break;
            }
            if !complete {
                break;
            }
        }
        summary.bytes_read = self.pos;
        if !summary.stopped {
            self.check_complete(&mut summary)?;
        }
        sink.finish(&summary).map_err(sink_error)?;
        Ok(summary)
    }

    /// Passes over `n` bytes, pushed-back bytes first; returns how many
    /// there were.
    fn skip_full(&mut self, n: u64) -> io::Result<u64> {
        let mut got = 0u64;
        if self.pushback_pos < self.pushback.len() {
            let k = n.min((self.pushback.len() - self.pushback_pos) as u64);
            self.pushback_pos += k as usize;
            got = k;
            if self.pushback_pos == self.pushback.len() {
                self.pushback = Vec::new();
                self.pushback_pos = 0;
            }
        }
        while got < n {
            match self.inner.skip_data(n - got) {
                Ok(0) => break,
                Ok(k) => got += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.pos += got;
                    return Err(e);
                }
            }
        }
        self.pos += got;
        Ok(got)
    }
}

/// A second thread that computes CRC-32s of pieces of a buffer while the
/// caller reads the next piece (see [`Archive::read_hashing`]).
struct CrcWorker {
    jobs: mpsc::Sender<CrcJob>,
    done: mpsc::Receiver<u32>,
}

enum CrcJob {
    /// Hash these bytes (a piece of the caller's buffer).
    Piece(PiecePtr, usize),
    /// Reply with the CRC of the pieces so far and start over.
    Finish,
}

/// A pointer to a piece of the caller's buffer. The caller keeps the piece
/// alive and unchanged until [`CrcWorker::finish`] has returned, which waits
/// for the worker to be done with every piece sent before it.
struct PiecePtr(*const u8);

// SAFETY: see PiecePtr: the bytes are only read, and only while the sender
// waits for them to be released.
unsafe impl Send for PiecePtr {}

impl CrcWorker {
    /// Starts the worker, if there is a second core to run it on.
    fn start() -> Option<CrcWorker> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if cores < 2 {
            return None;
        }
        let (jobs, job_rx) = mpsc::channel::<CrcJob>();
        let (done_tx, done) = mpsc::channel();
        std::thread::Builder::new()
            .name("vma-crc".into())
            .spawn(move || {
                let mut hasher = crc32fast::Hasher::new();
                for job in job_rx {
                    match job {
                        CrcJob::Piece(ptr, len) => {
                            // SAFETY: PiecePtr's contract.
                            hasher.update(unsafe { std::slice::from_raw_parts(ptr.0, len) })
                        }
                        CrcJob::Finish => {
                            let crc =
                                std::mem::replace(&mut hasher, crc32fast::Hasher::new()).finalize();
                            if done_tx.send(crc).is_err() {
                                break;
                            }
                        }
                    }
                }
            })
            .ok()?;
        Some(CrcWorker { jobs, done })
    }

    /// Queues `len` bytes at `piece` for hashing; they must stay alive and
    /// untouched until [`finish`](Self::finish) returns.
    fn hash(&mut self, piece: PiecePtr, len: usize) {
        if len > 0 {
            self.jobs
                .send(CrcJob::Piece(piece, len))
                .expect("crc worker alive");
        }
    }

    /// Waits until every queued piece is hashed; returns their CRC-32.
    fn finish(&mut self) -> u32 {
        self.jobs.send(CrcJob::Finish).expect("crc worker alive");
        self.done.recv().expect("crc worker alive")
    }
}

/// Pieces handed to a [`CrcWorker`]: collected on every way out, an unwind
/// from a panicking `Read` included, so the buffer outlives the worker's use.
struct PendingPieces<'a>(&'a mut CrcWorker);

impl PendingPieces<'_> {
    fn finish(self) -> u32 {
        let crc = self.0.finish();
        std::mem::forget(self);
        crc
    }
}

impl Drop for PendingPieces<'_> {
    fn drop(&mut self) {
        self.0.finish();
    }
}

/// Whether an extent header's block count is the sum of the blocks its
/// masks name (slots with a device id), as [`Archive::run`] requires.
fn block_count_matches(raw: &[u8; EXTENT_HEADER_SIZE]) -> bool {
    let count = u16::from_be_bytes([raw[6], raw[7]]) as u32;
    let blocks: u32 = raw[40..]
        .chunks_exact(8)
        .map(|slot| {
            let v = u64::from_be_bytes(slot.try_into().expect("8 bytes"));
            // mask: the top 16 bits; dev_id: bits 32..40.
            ((v >> 48) as u16).count_ones() * ((v >> 32) as u8 != 0) as u32
        })
        .sum();
    blocks == count
}

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
