//! The read-only NBD backend of `serve`: one device of an archive, read at
//! random through its [`ArchiveIndex`], from the archive file itself or from
//! the cache a compressed archive was decompressed into.
//!
//! Reads: stored blocks come from the archive with one `pread` per run of
//! blocks that are contiguous both in the request and in the archive;
//! blocks the archive does not store (zero blocks, and clusters past the end
//! of a `vmstate`) are zeros. Block status (`base:allocation`): stored blocks
//! are data, the rest holes that read as zeros, so `qemu-img convert`,
//! `qemu-img map` and `nbdcopy` skip them. Writes, trims and write-zeroes
//! are refused (the export is read-only; the server answers `EPERM`).
//! Several connections may read at once (`CAN_MULTI_CONN`): nothing changes.
//!
//! Every extent is checked before any of its clusters is served: its header
//! must be what the index says (for an index loaded from a file; a fresh
//! index comes from headers just checked by the reader), and, the first time
//! any of its data is read, its data must match the CRC-32 its header carries
//! (our extension; Proxmox's archives have none). An extent that fails is
//! remembered: every read of its data then fails with `EIO` — never bad data
//! — and says which device, cluster and extent; the failure is logged.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use nbd_server::{Backend, Extent, ZeroFlags};
use vma_format::{ExtentHeader, BLOCKS_PER_CLUSTER, BLOCK_SIZE, CLUSTER_SIZE, EXTENT_HEADER_SIZE};

use crate::index::{ArchiveIndex, ClusterEntry, DeviceIndex};

/// Extent not looked at yet (an index loaded from a file).
const UNCHECKED: u8 = 0;
/// Header checked; the data has a checksum not checked yet.
const HEADER_OK: u8 = 1;
/// Header checked and data checked (or without a checksum to check).
const GOOD: u8 = 2;
/// Header checked, data does not match its checksum.
const DATA_BAD: u8 = 3;
/// Header is not what the index says.
const HEADER_BAD: u8 = 4;

/// Most read failures logged (each also goes to the client that asked).
const MAX_LOGGED_FAILURES: u64 = 1000;
/// Most extents a block-status answer describes; the client asks again for
/// the rest. Small, because QEMU asks with `REQ_ONE` for the rest of the
/// disk each time and uses only the first: computing thousands per request
/// made `qemu-img convert` of a fragmented disk 2.8 times slower.
const MAX_STATUS_EXTENTS: usize = 64;

/// An archive being served: the file its data is read from, its index, and
/// what has been found of each extent.
pub struct ServedArchive {
    /// The archive's name, for the log.
    name: String,
    file: File,
    index: ArchiveIndex,
    states: Vec<AtomicU8>,
    failures: AtomicU64,
}

impl ServedArchive {
    /// Serves `index` from `file` (the archive, or its decompressed cache).
    /// `headers_checked`: the index was built from this file just now, so
    /// its extent headers were checked by the reader already.
    pub fn new(name: &str, file: File, index: ArchiveIndex, headers_checked: bool) -> Arc<Self> {
        let states = index
            .extents
            .iter()
            .map(|e| {
                AtomicU8::new(match (headers_checked, e.data_checksum) {
                    (false, _) => UNCHECKED,
                    (true, Some(_)) => HEADER_OK,
                    (true, None) => GOOD,
                })
            })
            .collect();
        Arc::new(ServedArchive {
            name: name.to_string(),
            file,
            index,
            states,
            failures: AtomicU64::new(0),
        })
    }

    /// The index.
    pub fn index(&self) -> &ArchiveIndex {
        &self.index
    }

    /// The backend of the `i`th device (in header order).
    pub fn export(self: &Arc<Self>, i: usize) -> DeviceExport {
        DeviceExport {
            archive: Arc::clone(self),
            dev: i,
            size: self.index.devices[i].export_size(),
        }
    }

    /// Read failures so far.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Makes sure cluster `n` of `dev` (at `entry`) may be served: its
    /// extent's header checked and, if `data` is wanted, its data too.
    fn check(&self, dev: &DeviceIndex, n: u64, entry: &ClusterEntry, data: bool) -> io::Result<()> {
        let id = entry.extent as usize;
        let mut state = self.states[id].load(Ordering::Acquire);
        if state == UNCHECKED || (data && state == HEADER_OK) {
            state = self.check_extent(id, data).map_err(|err| {
                let e = &self.index.extents[id];
                io::Error::new(
                    err.kind(),
                    format!("extent {id} at byte {}: read failed: {err}", e.offset),
                )
            })?;
        }
        let problem = match state {
            HEADER_BAD => "the extent's header is not what the index says",
            DATA_BAD if data => "data checksum mismatch",
            _ => return Ok(()),
        };
        let e = &self.index.extents[id];
        let msg = format!(
            "{} cluster {n} (extent {id} at byte {}): {problem}",
            dev.name, e.offset
        );
        if self.failures.fetch_add(1, Ordering::Relaxed) < MAX_LOGGED_FAILURES {
            eprintln!("vma-decode serve: {}: {msg}: answered EIO", self.name);
        }
        Err(io::Error::other(msg))
    }

    /// Checks extent `id`: its header against the index, and with `data`
    /// its data against its checksum. Returns the state it is then in; an
    /// error if it could not be read (nothing is learnt then).
    fn check_extent(&self, id: usize, data: bool) -> io::Result<u8> {
        thread_local! {
            static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
        }
        let e = self.index.extents[id];
        let with_data = data && e.data_checksum.is_some();
        let len = EXTENT_HEADER_SIZE + if with_data { e.data_len() as usize } else { 0 };
        // With the state found, the clusters the header lists when it
        // matches the index (for the log).
        let result = BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            if buf.len() < len {
                buf.resize(len, 0);
            }
            let buf = &mut buf[..len];
            self.file.read_exact_at(buf, e.offset)?;
            let head: &[u8; EXTENT_HEADER_SIZE] = buf[..EXTENT_HEADER_SIZE].try_into().unwrap();
            let Some(listed) = self.header_matches(id, head) else {
                return Ok((HEADER_BAD, Vec::new()));
            };
            if !with_data {
                let state = if e.data_checksum.is_some() {
                    HEADER_OK
                } else {
                    GOOD
                };
                return Ok((state, listed));
            }
            let crc = crc32fast::hash(&buf[EXTENT_HEADER_SIZE..]);
            let state = if Some(crc) == e.data_checksum {
                GOOD
            } else {
                DATA_BAD
            };
            Ok::<_, io::Error>((state, listed))
        });
        let (found, listed) = result?;
        let before = self.states[id].load(Ordering::Acquire);
        // Only ever forward, and a failure is final.
        if found > before || found >= DATA_BAD {
            self.states[id].store(found.max(before), Ordering::Release);
        }
        let now = self.states[id].load(Ordering::Acquire);
        if now >= DATA_BAD && before < DATA_BAD {
            let what = if now == DATA_BAD {
                "data checksum mismatch"
            } else {
                "header is not what the index says"
            };
            // Another thread may have found the failure meanwhile.
            let listed = if now == found { &listed[..] } else { &[] };
            eprintln!(
                "vma-decode serve: {}: extent {id} at byte {}: {what}: {}",
                self.name,
                e.offset,
                self.describe_clusters(listed)
            );
        }
        Ok(now)
    }

    /// If the extent header `head` is a valid header of this archive that
    /// lists exactly the clusters the index puts into extent `id`, at the
    /// places the index says: those clusters, as (device position, cluster
    /// number) in header order.
    fn header_matches(
        &self,
        id: usize,
        head: &[u8; EXTENT_HEADER_SIZE],
    ) -> Option<Vec<(usize, u64)>> {
        let header = ExtentHeader::parse(head, &self.index.uuid).ok()?;
        let e = &self.index.extents[id];
        if header.block_count() != e.block_count || header.data_checksum() != e.data_checksum {
            return None;
        }
        let mut at = 0usize;
        let mut listed = Vec::new();
        let slots = header.slots();
        for (i, slot) in slots.iter().enumerate() {
            if slot.dev_id == 0 {
                continue;
            }
            if slots[..i]
                .iter()
                .any(|s| s.dev_id == slot.dev_id && s.cluster_num == slot.cluster_num)
            {
                return None;
            }
            let d = self
                .index
                .devices
                .iter()
                .position(|d| d.id == slot.dev_id)?;
            let want = ClusterEntry {
                extent: id as u32,
                first_block: at as u16,
                mask: slot.mask,
            };
            if self.index.devices[d].cluster(slot.cluster_num as u64) != Some(&want) {
                return None;
            }
            at += slot.mask.count();
            listed.push((d, slot.cluster_num as u64));
        }
        (listed.len() == e.clusters as usize).then_some(listed)
    }

    /// The clusters an extent holds (`listed`, from its header), for the
    /// log: `reads of clusters drive-scsi0 58..116 fail with EIO`. Costs
    /// what the header lists, not what the index holds, so an archive bad
    /// in every extent is not logged in quadratic time. Empty for a header
    /// that is not what the index says (which clusters it holds is then
    /// unknown; every read of one names it).
    fn describe_clusters(&self, listed: &[(usize, u64)]) -> String {
        if listed.is_empty() {
            return "reads of its clusters fail with EIO".into();
        }
        let mut sorted = listed.to_vec();
        sorted.sort_unstable();
        let mut parts = Vec::new();
        let mut run: Option<(usize, u64, u64)> = None;
        for (d, n) in sorted {
            match &mut run {
                Some((rd, _, end)) if *rd == d && *end == n => *end = n + 1,
                _ => {
                    if let Some((rd, a, b)) = run.take() {
                        parts.push(format!("{} {a}..{b}", self.index.devices[rd].name));
                    }
                    run = Some((d, n, n + 1));
                }
            }
        }
        if let Some((rd, a, b)) = run {
            parts.push(format!("{} {a}..{b}", self.index.devices[rd].name));
        }
        format!("reads of clusters {} fail with EIO", parts.join(", "))
    }
}

/// One device of a [`ServedArchive`], as an NBD backend.
pub struct DeviceExport {
    archive: Arc<ServedArchive>,
    dev: usize,
    size: u64,
}

/// A run of bytes to read from the archive into the request buffer.
struct Pending {
    file_offset: u64,
    buf_offset: usize,
    len: usize,
}

impl DeviceExport {
    fn device(&self) -> &DeviceIndex {
        &self.archive.index.devices[self.dev]
    }

    fn read_run(&self, buf: &mut [u8], run: Option<Pending>) -> io::Result<()> {
        if let Some(r) = run {
            self.archive
                .file
                .read_exact_at(&mut buf[r.buf_offset..r.buf_offset + r.len], r.file_offset)?;
        }
        Ok(())
    }
}

/// Where the run of stored blocks that contains block `b` of `mask` starts.
fn run_start(mask: vma_format::BlockMask, b: usize) -> usize {
    let mut s = b;
    while s > 0 && mask.has(s - 1) {
        s -= 1;
    }
    s
}

impl Backend for DeviceExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        true
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let dev = self.device();
        let cs = CLUSTER_SIZE as u64;
        let bs = BLOCK_SIZE as u64;
        let end = offset + buf.len() as u64;
        let mut pending: Option<Pending> = None;
        let mut pos = offset;
        while pos < end {
            let n = pos / cs;
            let base = n * cs;
            let cluster_end = (base + cs).min(end);
            let Some(entry) = dev.cluster(n) else {
                let at = (pos - offset) as usize;
                buf[at..(cluster_end - offset) as usize].fill(0);
                pos = cluster_end;
                continue;
            };
            let stored = entry.mask.0 != 0;
            self.archive.check(dev, n, entry, stored)?;
            let data_offset = self.archive.index.extents[entry.extent as usize].data_offset();
            while pos < cluster_end {
                let b = ((pos - base) / bs) as usize;
                let block_start = base + b as u64 * bs;
                let block_end = (block_start + bs).min(cluster_end);
                let at = (pos - offset) as usize;
                let len = (block_end - pos) as usize;
                if !entry.mask.has(b) {
                    buf[at..at + len].fill(0);
                    pos = block_end;
                    continue;
                }
                // A run of stored blocks that starts before the recorded
                // size is clipped at it (only a vmstate reads past its size;
                // extract writes it the same way).
                let valid_end = if base + (run_start(entry.mask, b) as u64) * bs < dev.size {
                    dev.size.max(pos)
                } else {
                    u64::MAX
                };
                let data_len = (block_end.min(valid_end) - pos) as usize;
                let rank = (entry.mask.0 & ((1u32 << b) - 1) as u16).count_ones() as u64;
                let file_offset =
                    data_offset + (entry.first_block as u64 + rank) * bs + (pos - block_start);
                if data_len > 0 {
                    match &mut pending {
                        Some(p)
                            if p.buf_offset + p.len == at
                                && p.file_offset + p.len as u64 == file_offset =>
                        {
                            p.len += data_len
                        }
                        _ => {
                            self.read_run(buf, pending.take())?;
                            pending = Some(Pending {
                                file_offset,
                                buf_offset: at,
                                len: data_len,
                            });
                        }
                    }
                }
                buf[at + data_len..at + len].fill(0);
                pos = block_end;
            }
        }
        self.read_run(buf, pending)
    }

    fn write_at(&self, _buf: &[u8], _offset: u64, _fua: bool) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn trim(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _flags: ZeroFlags) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }

    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let dev = self.device();
        let cs = CLUSTER_SIZE as u64;
        let bs = BLOCK_SIZE as u64;
        let end = offset.saturating_add(len).min(self.size);
        let mut out: Vec<Extent> = Vec::new();
        let push = |out: &mut Vec<Extent>, e: Extent| match out.last_mut() {
            Some(last) if last.hole == e.hole && last.zero == e.zero => last.len += e.len,
            _ => out.push(e),
        };
        let mut pos = offset;
        while pos < end && out.len() < MAX_STATUS_EXTENTS {
            let n = pos / cs;
            let base = n * cs;
            let cluster_end = (base + cs).min(end);
            let Some(entry) = dev.cluster(n) else {
                push(&mut out, Extent::hole(cluster_end - pos));
                pos = cluster_end;
                continue;
            };
            self.archive.check(dev, n, entry, false)?;
            if entry.mask.0 == 0 || entry.mask.0 as usize == (1 << BLOCKS_PER_CLUSTER) - 1 {
                let e = if entry.mask.0 == 0 {
                    Extent::hole(cluster_end - pos)
                } else {
                    Extent::data(cluster_end - pos)
                };
                push(&mut out, e);
                pos = cluster_end;
                continue;
            }
            while pos < cluster_end {
                let b = ((pos - base) / bs) as usize;
                let block_end = (base + (b as u64 + 1) * bs).min(cluster_end);
                let e = if entry.mask.has(b) {
                    Extent::data(block_end - pos)
                } else {
                    Extent::hole(block_end - pos)
                };
                push(&mut out, e);
                pos = block_end;
            }
        }
        Ok(out)
    }

    fn can_multi_conn(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests;
