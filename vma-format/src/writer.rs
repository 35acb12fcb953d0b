//! The streaming writer: header first, then extents of at most 58 clusters.

use std::io::Write;

use crate::cluster::{BlockMask, Cluster};
use crate::devices::{CheckRules, DeviceTracker, Refusal, TrackedDevice};
use crate::error::{Error, Location};
use crate::extent::{BlockInfo, ExtentHeader};
use crate::header::HeaderBuilder;
use crate::source::{ClusterSource, Piece, PullError, Pulled, RawRoom};
use crate::zero::{pack_cluster, pack_cluster_within};
use crate::{
    BLOCKS_PER_CLUSTER, BLOCK_SIZE, CLUSTER_SIZE, EXTENT_HEADER_SIZE, VMSTATE_NAME,
    WRITER_CLUSTERS_PER_EXTENT,
};

/// How to write.
#[derive(Clone, Copy, Debug)]
pub struct WriterOptions {
    /// Put a CRC-32 of each extent's data into its free 59th slot (our
    /// extension; every reader skips the slot). Default: on.
    pub data_checksums: bool,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            data_checksums: true,
        }
    }
}

/// Per-device counters of a writer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceStats {
    /// Device name.
    pub name: String,
    /// Device size recorded in the header.
    pub size: u64,
    /// Clusters written so far.
    pub clusters_written: u64,
    /// Bytes of zero blocks written so far (not stored), counting whole
    /// 4 KiB blocks as Proxmox does.
    pub zero_bytes: u64,
}

/// Fewest whole empty extents worth encoding as a batch on two threads.
const EMPTY_EXTENT_BATCH_MIN: u64 = 64;
/// Most empty extents encoded in one batch (1 MiB of extent headers).
const EMPTY_EXTENT_BATCH: u64 = 2048;

/// Writes a VMA archive to `W`, like Proxmox's writer: the header at once,
/// then clusters (in any order) gathered into extents of at most 58 clusters,
/// zero blocks left out, the bytes of the last block past a device's end
/// zeroed and blocks wholly past it never stored.
///
/// [`finish`](Writer::finish) closes the archive only if every cluster of
/// every device (but `vmstate`) was written exactly once. Dropping a writer
/// without `finish` leaves an incomplete archive that every reader refuses.
pub struct Writer<W: Write> {
    out: W,
    /// Reused buffer of [`write_empty_extents`](Self::write_empty_extents).
    batch: Vec<u8>,
    uuid: [u8; 16],
    devices: DeviceTracker,
    /// Device names and zero bytes written, device 1 first.
    names: Vec<String>,
    zero_bytes: Vec<u64>,
    options: WriterOptions,
    /// The extent being filled: 512 bytes of header room, then data.
    buf: Vec<u8>,
    used: usize,
    slots: Vec<BlockInfo>,
    extents: u64,
    bytes_written: u64,
    failed: bool,
    /// CRC-32 of the extent's data so far, updated as each cluster is packed
    /// (while its bytes are still in the CPU cache).
    crc: crc32fast::Hasher,
}

impl<W: Write> Writer<W> {
    /// Encodes the header and writes it.
    pub fn new(
        mut out: W,
        header: &HeaderBuilder,
        options: WriterOptions,
    ) -> Result<Writer<W>, Error> {
        let raw = header.encode()?;
        let uuid: [u8; 16] = raw[8..24].try_into().expect("16 bytes");
        out.write_all(&raw).map_err(write_error)?;
        let mut devices = DeviceTracker::new();
        for (i, (name, size)) in header.devices().iter().enumerate() {
            devices.declare(i as u8 + 1, *size, name == VMSTATE_NAME);
        }
        let names: Vec<String> = header.devices().iter().map(|(n, _)| n.clone()).collect();
        Ok(Writer {
            out,
            batch: Vec::new(),
            uuid,
            devices,
            zero_bytes: vec![0; names.len()],
            names,
            options,
            buf: vec![0u8; EXTENT_HEADER_SIZE + WRITER_CLUSTERS_PER_EXTENT * CLUSTER_SIZE],
            used: 0,
            slots: Vec::with_capacity(WRITER_CLUSTERS_PER_EXTENT + 1),
            extents: 0,
            bytes_written: raw.len() as u64,
            failed: false,
            crc: crc32fast::Hasher::new(),
        })
    }

    /// Writes one cluster from its raw content: `raw` holds the cluster's
    /// bytes from its start, at most 64 KiB (shorter means the rest is zero;
    /// bytes past the device end are ignored). Zero blocks are detected and
    /// left out. Returns the bytes of zero blocks (whole 4 KiB blocks, as
    /// Proxmox counts them).
    pub fn write_raw(&mut self, dev_id: u8, cluster_num: u32, raw: &[u8]) -> Result<u64, Error> {
        if raw.len() > CLUSTER_SIZE {
            return Err(Error::invalid(format!(
                "cluster of {} bytes, more than 64 KiB",
                raw.len()
            )));
        }
        let dev = self.check(dev_id, cluster_num)?;
        let valid = if dev.is_vmstate() {
            raw.len()
        } else {
            (dev.size() - cluster_num as u64 * CLUSTER_SIZE as u64).min(raw.len() as u64) as usize
        };
        self.make_room()?;
        let start = EXTENT_HEADER_SIZE + self.used;
        let (mask, used) = pack_cluster(raw, valid, &mut self.buf[start..start + CLUSTER_SIZE]);
        Ok(self.commit(dev_id, cluster_num, mask, used))
    }

    /// Writes one cluster already packed (from a cluster stream, or another
    /// archive). Refused: a mask naming blocks past the device end, data not
    /// `mask.count() * 4096` bytes long. Bytes of the last block past the
    /// device end are stored as zero.
    pub fn write_cluster(&mut self, cluster: &Cluster<'_>) -> Result<u64, Error> {
        let (dev_id, n, mask) = (cluster.dev_id, cluster.cluster_num, cluster.mask);
        if cluster.data.len() != mask.data_len() {
            return Err(Error::invalid(format!(
                "cluster {n} of device {dev_id}: {} data bytes for {} blocks",
                cluster.data.len(),
                mask.count()
            )));
        }
        let tail = self.check_packed(dev_id, n, mask)?;
        self.make_room()?;
        let start = EXTENT_HEADER_SIZE + self.used;
        self.buf[start..start + cluster.data.len()].copy_from_slice(cluster.data);
        Ok(self.commit_packed(dev_id, n, mask, tail, None))
    }

    /// Checks that packed cluster `n` of `dev_id` with `mask` may be
    /// written now; returns where the device ends inside it, if inside a
    /// block (that block's bytes past the end must be zeroed).
    fn check_packed(&self, dev_id: u8, n: u32, mask: BlockMask) -> Result<Option<usize>, Error> {
        let dev = self.check(dev_id, n)?;
        if dev.is_vmstate() {
            return Ok(None);
        }
        if !dev.mask_fits(n as u64, mask) {
            return Err(Error::invalid(format!(
                "cluster {n} of {}: mask {:#06x} names blocks past the device end",
                self.name(dev_id),
                mask.0
            )));
        }
        let end_in_cluster = dev.size() - n as u64 * CLUSTER_SIZE as u64;
        Ok((end_in_cluster < CLUSTER_SIZE as u64
            && !end_in_cluster.is_multiple_of(BLOCK_SIZE as u64))
        .then_some(end_in_cluster as usize))
    }

    /// Commits the packed cluster whose data lies at the end of the extent
    /// being filled, zeroing the bytes past the device end (`tail`, from
    /// [`check_packed`](Self::check_packed)).
    fn commit_packed(
        &mut self,
        dev_id: u8,
        n: u32,
        mask: BlockMask,
        tail: Option<usize>,
        mut data_crc: Option<u32>,
    ) -> u64 {
        let start = EXTENT_HEADER_SIZE + self.used;
        if let Some(end) = tail {
            // The block holding the device end: zero what lies past the end.
            let block = end / BLOCK_SIZE;
            if mask.has(block) {
                let stored_before = BlockMask(mask.0 & ((1u16 << block) - 1)).count();
                let at = start + stored_before * BLOCK_SIZE + end % BLOCK_SIZE;
                let block_end = start + (stored_before + 1) * BLOCK_SIZE;
                if self.buf[at..block_end].iter().any(|&b| b != 0) {
                    // The data changed: the source's CRC no longer holds.
                    self.buf[at..block_end].fill(0);
                    data_crc = None;
                }
            }
        }
        match data_crc {
            Some(crc) if self.options.data_checksums => {
                let used = mask.data_len();
                self.crc
                    .combine(&crc32fast::Hasher::new_with_initial_len(crc, used as u64));
                self.commit_counted(dev_id, n, mask, used)
            }
            _ => self.commit(dev_id, n, mask, mask.data_len()),
        }
    }

    /// Room for up to `max` (at least 1) raw clusters at the end of the
    /// extent being filled, for reading a source straight into the extent
    /// buffer: the returned buffer holds `k * 65536` bytes, `1 <= k <= max`
    /// (fewer when the extent is nearly full). Fill it, then call
    /// [`commit_raw`](Self::commit_raw) to pack the clusters in place —
    /// the same result as [`write_raw`](Self::write_raw) without its copy.
    /// Writes the extent out first if it is full.
    pub fn raw_buffer(&mut self, max: usize) -> Result<&mut [u8], Error> {
        if self.failed {
            return Err(Error::invalid("writer failed earlier"));
        }
        self.make_room()?;
        let k = max
            .min(WRITER_CLUSTERS_PER_EXTENT - self.slots.len())
            .max(1);
        let start = EXTENT_HEADER_SIZE + self.used;
        Ok(&mut self.buf[start..start + k * CLUSTER_SIZE])
    }

    /// Writes the first `count` clusters of the buffer that
    /// [`raw_buffer`](Self::raw_buffer) just returned, as clusters
    /// `first .. first + count` of `dev_id`, each 64 KiB of raw content (bytes
    /// past the device end ignored). Zero blocks are left out by moving the
    /// others down in place. Returns the bytes of zero blocks. Every cluster
    /// is checked before any is written.
    pub fn commit_raw(&mut self, dev_id: u8, first: u32, count: usize) -> Result<u64, Error> {
        let room = (WRITER_CLUSTERS_PER_EXTENT - self.slots.len()).max(1);
        if count > room || (count > 0 && self.slots.len() >= WRITER_CLUSTERS_PER_EXTENT) {
            return Err(Error::invalid(format!(
                "{count} raw clusters committed, room for {room}"
            )));
        }
        let Some(last) = first.checked_add(count.saturating_sub(1) as u32) else {
            return Err(Error::invalid("cluster numbers past 2^32"));
        };
        if count == 0 {
            return Ok(0);
        }
        let (size, vmstate) = {
            let dev = self.check(dev_id, first)?;
            (dev.size(), dev.is_vmstate())
        };
        if !vmstate {
            // The whole range must be inside the device and not written yet
            // (vmstate: in order from `first`, which was checked).
            for n in first + 1..=last {
                self.check(dev_id, n)?;
            }
        }
        let base = EXTENT_HEADER_SIZE + self.used;
        let mut zero = 0;
        for i in 0..count {
            let n = first + i as u32;
            let src = base + i * CLUSTER_SIZE;
            let dst = EXTENT_HEADER_SIZE + self.used;
            let valid = if vmstate {
                CLUSTER_SIZE
            } else {
                (size - n as u64 * CLUSTER_SIZE as u64).min(CLUSTER_SIZE as u64) as usize
            };
            let (mask, used) = pack_cluster_within(&mut self.buf, src, dst, valid);
            zero += self.commit(dev_id, n, mask, used);
        }
        Ok(zero)
    }

    /// Pulls the next piece from `source` and writes it: the writer drives,
    /// the source only says what comes next (and may read raw clusters
    /// straight into the extent buffer, see [`RawRoom`]). Returns what was
    /// written, or `None` once the source is exhausted; call
    /// [`finish`](Self::finish) then. The whole encode loop is
    /// `while let Some(p) = writer.pull(&mut source)? { … }`.
    pub fn pull<S: ClusterSource + ?Sized>(
        &mut self,
        source: &mut S,
    ) -> Result<Option<Pulled>, PullError<S::Error>> {
        if self.failed {
            return Err(PullError::Write(Error::invalid("writer failed earlier")));
        }
        self.make_room().map_err(PullError::Write)?;
        let start = EXTENT_HEADER_SIZE + self.used;
        let free = (WRITER_CLUSTERS_PER_EXTENT - self.slots.len()) * CLUSTER_SIZE;
        let mut room = RawRoom {
            buf: &mut self.buf[start..start + free],
        };
        let piece = source.next_piece(&mut room).map_err(PullError::Source)?;
        // (device, first cluster, clusters, what writing them returned)
        let (dev_id, first, count, written) = match piece {
            None => return Ok(None),
            Some(Piece::Cluster(c)) => (c.dev_id, c.cluster_num, 1, self.write_cluster(&c)),
            Some(Piece::Packed {
                dev_id,
                cluster_num: n,
                mask,
                data_crc,
            }) => {
                let written = self
                    .check_packed(dev_id, n, mask)
                    .map(|tail| self.commit_packed(dev_id, n, mask, tail, data_crc));
                (dev_id, n, 1, written)
            }
            Some(Piece::Zeros {
                dev_id: d,
                first: f,
                count: k,
            }) => (d, f, k, self.write_zero_clusters(d, f, k)),
            Some(Piece::Raw {
                dev_id: d,
                first: f,
                count: k,
            }) => (d, f, k as u64, self.commit_raw(d, f, k)),
        };
        Ok(Some(Pulled {
            dev_id,
            first: first as u64,
            count,
            zero_bytes: written.map_err(PullError::Write)?,
        }))
    }

    /// Writes clusters `first .. first + count` of `dev_id` as all-zero
    /// clusters (mask 0, no data), as a hole in a source reads: the same
    /// archive bytes as `count` calls of [`write_cluster`](Self::write_cluster)
    /// with an empty mask, at a fraction of their cost (a sparse 8 TiB image
    /// is 128 Mi clusters). Returns the bytes of zero blocks. The whole range
    /// is checked before any of it is written.
    pub fn write_zero_clusters(
        &mut self,
        dev_id: u8,
        first: u32,
        count: u64,
    ) -> Result<u64, Error> {
        if count == 0 {
            return Ok(0);
        }
        let dev = self.check(dev_id, first)?;
        let end = first as u64 + count;
        if dev.is_vmstate() {
            for n in first as u64..end {
                let n =
                    u32::try_from(n).map_err(|_| Error::invalid("cluster numbers past 2^32"))?;
                self.write_cluster(&Cluster {
                    dev_id,
                    cluster_num: n,
                    mask: BlockMask::EMPTY,
                    data: &[],
                })?;
            }
            return Ok(count * CLUSTER_SIZE as u64);
        }
        if end > dev.clusters() {
            return Err(self.refusal(
                dev_id,
                end - 1,
                Refusal::PastEnd {
                    clusters: dev.clusters(),
                },
            ));
        }
        if let Some(n) = self.devices.first_seen_in(dev_id, first as u64..end) {
            return Err(self.refusal(dev_id, n, Refusal::Duplicate));
        }
        self.devices.record_range(dev_id, first as u64..end);
        let zero = count * CLUSTER_SIZE as u64;
        self.zero_bytes[dev_id as usize - 1] += zero;
        let mut n = first as u64;
        while n < end {
            self.make_room()?;
            let whole = (end - n) / WRITER_CLUSTERS_PER_EXTENT as u64;
            if self.slots.is_empty() && self.used == 0 && whole >= EMPTY_EXTENT_BATCH_MIN {
                n += self.write_empty_extents(dev_id, n, whole)?;
                continue;
            }
            let k = ((WRITER_CLUSTERS_PER_EXTENT - self.slots.len()) as u64).min(end - n);
            self.slots.extend((n..n + k).map(|c| BlockInfo {
                mask: BlockMask::EMPTY,
                reserved: 0,
                dev_id,
                cluster_num: c as u32,
            }));
            n += k;
        }
        Ok(zero)
    }

    /// Writes up to `extents` (at most [`EMPTY_EXTENT_BATCH`]) whole extents
    /// of 58 zero clusters each, clusters `first..` of `dev_id`, exactly as
    /// [`flush_extent`](Self::flush_extent) would one by one; returns the
    /// clusters written. The current extent must be empty.
    ///
    /// Why: an 8 TiB hole is 2.3 million such extents, and their MD5s are
    /// nearly all the work of encoding it; this encodes a batch on two
    /// threads and writes it with one call.
    fn write_empty_extents(&mut self, dev_id: u8, first: u64, extents: u64) -> Result<u64, Error> {
        let extents = extents.min(EMPTY_EXTENT_BATCH) as usize;
        let uuid = self.uuid;
        let checksums = self.options.data_checksums;
        let encode = |chunk: &mut [u8], first_extent: usize| {
            let mut slots = [BlockInfo::default(); crate::EXTENT_SLOTS];
            // An empty extent's data checksum is the CRC-32 of no bytes.
            slots[crate::EXTENT_SLOTS - 1] = BlockInfo::data_checksum(crc32fast::hash(&[]));
            let used = if checksums {
                crate::EXTENT_SLOTS
            } else {
                WRITER_CLUSTERS_PER_EXTENT
            };
            for (i, head) in chunk.chunks_exact_mut(EXTENT_HEADER_SIZE).enumerate() {
                let base = first + ((first_extent + i) * WRITER_CLUSTERS_PER_EXTENT) as u64;
                for (j, slot) in slots[..WRITER_CLUSTERS_PER_EXTENT].iter_mut().enumerate() {
                    *slot = BlockInfo {
                        mask: BlockMask::EMPTY,
                        reserved: 0,
                        dev_id,
                        cluster_num: (base + j as u64) as u32,
                    };
                }
                let head: &mut [u8; EXTENT_HEADER_SIZE] = head.try_into().expect("512 bytes");
                ExtentHeader::encode(&uuid, 0, &slots[..used], head);
            }
        };
        let mut batch = std::mem::take(&mut self.batch);
        batch.resize(extents * EXTENT_HEADER_SIZE, 0);
        let half = extents / 2;
        let (front, back) = batch.split_at_mut(half * EXTENT_HEADER_SIZE);
        std::thread::scope(|s| {
            s.spawn(|| encode(back, half));
            encode(front, 0);
        });
        let written = self.out.write_all(&batch);
        self.batch = batch;
        if let Err(e) = written {
            self.failed = true;
            return Err(write_error(e));
        }
        self.bytes_written += (extents * EXTENT_HEADER_SIZE) as u64;
        self.extents += extents as u64;
        Ok((extents * WRITER_CLUSTERS_PER_EXTENT) as u64)
    }

    /// Checks that (dev_id, cluster_num) may be written now.
    fn check(&self, dev_id: u8, n: u32) -> Result<&TrackedDevice, Error> {
        if self.failed {
            return Err(Error::invalid("writer failed earlier"));
        }
        self.devices
            .check(dev_id, n as u64, None, CheckRules::default())
            .map_err(|r| self.refusal(dev_id, n as u64, r))
    }

    /// The writer's words for refusing cluster `n` of `dev_id`.
    fn refusal(&self, dev_id: u8, n: u64, refusal: Refusal) -> Error {
        let name = || self.name(dev_id);
        Error::invalid(match refusal {
            Refusal::Undeclared => format!("device {dev_id} is not declared"),
            Refusal::OutOfOrder { expected } => {
                format!("{} cluster {n} out of order (expected {expected})", name())
            }
            Refusal::PastEnd { clusters } => {
                format!(
                    "cluster {n} is past the end of {} ({clusters} clusters)",
                    name()
                )
            }
            Refusal::Duplicate => format!("cluster {n} of {} written twice", name()),
            Refusal::MaskPastEnd => {
                format!(
                    "cluster {n} of {}: names blocks past the device end",
                    name()
                )
            }
        })
    }

    /// Name of declared device `dev_id`.
    fn name(&self, dev_id: u8) -> &str {
        &self.names[dev_id as usize - 1]
    }

    /// Flushes the extent if it already holds 58 clusters.
    fn make_room(&mut self) -> Result<(), Error> {
        if self.slots.len() >= WRITER_CLUSTERS_PER_EXTENT {
            self.flush_extent()?;
        }
        Ok(())
    }

    fn commit(&mut self, dev_id: u8, n: u32, mask: BlockMask, used: usize) -> u64 {
        if self.options.data_checksums {
            let start = EXTENT_HEADER_SIZE + self.used;
            self.crc.update(&self.buf[start..start + used]);
        }
        self.commit_counted(dev_id, n, mask, used)
    }

    /// [`commit`](Self::commit) once the data checksum has counted the
    /// cluster's `used` bytes.
    fn commit_counted(&mut self, dev_id: u8, n: u32, mask: BlockMask, used: usize) -> u64 {
        self.used += used;
        self.slots.push(BlockInfo {
            mask,
            reserved: 0,
            dev_id,
            cluster_num: n,
        });
        self.devices.record(dev_id, n as u64);
        let zero = (BLOCKS_PER_CLUSTER - mask.count()) as u64 * BLOCK_SIZE as u64;
        self.zero_bytes[dev_id as usize - 1] += zero;
        zero
    }

    /// Encodes the extent header of `self.slots` (plus the data checksum
    /// slot when `crc` is given) and `data_len` bytes of data into the
    /// first 512 bytes of the extent buffer. The one place both ways of
    /// writing an extent (through the buffer, or [`write_extent`]'s data
    /// in place) make their header.
    ///
    /// [`write_extent`]: Self::write_extent
    fn encode_extent_header(&mut self, data_len: usize, crc: Option<u32>) {
        if let Some(crc) = crc {
            self.slots
                .resize(crate::EXTENT_SLOTS - 1, BlockInfo::default());
            self.slots.push(BlockInfo::data_checksum(crc));
        }
        let head: &mut [u8; EXTENT_HEADER_SIZE] = (&mut self.buf[..EXTENT_HEADER_SIZE])
            .try_into()
            .expect("512 bytes");
        ExtentHeader::encode(
            &self.uuid,
            (data_len / BLOCK_SIZE) as u16,
            &self.slots,
            head,
        );
    }

    fn flush_extent(&mut self) -> Result<(), Error> {
        let data_end = EXTENT_HEADER_SIZE + self.used;
        let crc = self
            .options
            .data_checksums
            .then(|| std::mem::take(&mut self.crc).finalize());
        self.encode_extent_header(self.used, crc);
        if let Err(e) = self.out.write_all(&self.buf[..data_end]) {
            self.failed = true;
            return Err(write_error(e));
        }
        self.bytes_written += data_end as u64;
        self.extents += 1;
        self.used = 0;
        self.slots.clear();
        Ok(())
    }

    /// Per-device counters so far, device 1 first.
    pub fn device_stats(&self) -> Vec<DeviceStats> {
        self.devices
            .declared()
            .zip(self.names.iter().zip(&self.zero_bytes))
            .map(|((_, d), (name, zero_bytes))| DeviceStats {
                name: name.clone(),
                size: d.size(),
                clusters_written: d.accepted(),
                zero_bytes: *zero_bytes,
            })
            .collect()
    }

    /// Bytes written to the output so far (header and complete extents).
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    /// Writes the last extent and flushes the output, if every cluster of
    /// every device but `vmstate` was written; else fails naming the first
    /// device and cluster missing. An archive without any cluster still gets
    /// one empty extent, as Proxmox's writer does.
    pub fn finish(mut self) -> Result<W, Error> {
        for ((_, dev), name) in self.devices.declared().zip(&self.names) {
            if let Some(first) = dev.first_missing() {
                return Err(Error::damaged(
                    Some(Location::End),
                    format!(
                        "{name}: cluster {first} missing ({} of {} clusters missing)",
                        dev.seen().missing_count(),
                        dev.clusters()
                    ),
                ));
            }
        }
        if !self.slots.is_empty() || self.extents == 0 {
            self.flush_extent()?;
        }
        self.out.flush().map_err(write_error)?;
        Ok(self.out)
    }
}

fn write_error(e: std::io::Error) -> Error {
    Error::io(None, "write failed", e)
}

mod whole;

#[cfg(test)]
mod batch_tests;
