//! `vma-encode --base PREV.vma -`: an incremental cluster stream (only the
//! clusters changed since a backup) merged onto that backup's archive into
//! a complete archive; and `--sorted` for a stream, which needs the same
//! spool.
//!
//! The stream comes first (stdin), whole, into a [`Spool`]: clusters in
//! memory up to a budget, the rest in an unlinked temporary file, with an
//! index of a few dozen bytes per cluster — memory follows the changed
//! data, not the disk. Then the base is read front to back with every
//! check of the archive reader (data checksums included): each of its
//! clusters is written as it is unless the spool has that cluster, which
//! is written instead. The merged archive thus keeps the base's cluster
//! order: a base in (device, cluster) order (every archive but a live
//! backup's holds every cluster once) gives a merge in that order, which is
//! how `--sorted --base` is a merge-join of the base with the spool. With
//! `--sorted`, the base's order is checked as it passes: a compressed or
//! piped base out of that order is refused (the output is not renamed into
//! place); a plain file is indexed first, and one out of order is read in
//! order instead ([`crate::indexed`]).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;

use vma_format::cluster::{BlockMask, Cluster};
use vma_format::header::VmaHeader;
use vma_format::identity::BaseRef;
use vma_format::reader::{Archive, ClusterSink, Flow};
use vma_format::stream::StreamReader;
use vma_format::writer::Writer;

use crate::progress::Progress;
use crate::EncodeError;
use vma_cli::Failure;

/// Stream clusters kept in memory before the spool spills to a file.
pub const DEFAULT_SPOOL_MEMORY: usize = 256 << 20;

/// Where a spooled cluster's stored blocks are.
#[derive(Clone, Copy)]
struct Slot {
    mask: BlockMask,
    /// Offset in memory, or (with the top bit) in the file.
    at: u64,
}

const IN_FILE: u64 = 1 << 63;

/// Clusters kept for later, by (device id, cluster number): in memory up to
/// a budget, then in an unlinked temporary file.
pub struct Spool {
    memory: Vec<u8>,
    limit: usize,
    file: Option<File>,
    file_len: u64,
    index: HashMap<(u8, u32), Slot>,
}

impl Spool {
    /// An empty spool keeping up to `limit` bytes of cluster data in memory.
    pub fn new(limit: usize) -> Spool {
        Spool {
            memory: Vec::new(),
            limit,
            file: None,
            file_len: 0,
            index: HashMap::new(),
        }
    }

    /// Clusters held.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Bytes spilled to the temporary file.
    pub fn spilled(&self) -> u64 {
        self.file_len
    }

    /// Keeps `c` (each (device, cluster) once: the stream reader checked).
    pub fn push(&mut self, c: &Cluster<'_>) -> io::Result<()> {
        let at = if self.memory.len() + c.data.len() <= self.limit {
            let at = self.memory.len() as u64;
            self.memory.extend_from_slice(c.data);
            at
        } else {
            let file = match &mut self.file {
                Some(f) => f,
                None => self.file.insert(tempfile::tempfile()?),
            };
            file.write_all_at(c.data, self.file_len)?;
            let at = self.file_len | IN_FILE;
            self.file_len += c.data.len() as u64;
            at
        };
        self.index
            .insert((c.dev_id, c.cluster_num), Slot { mask: c.mask, at });
        Ok(())
    }

    /// Whether it holds the cluster (`dev_id`, `n`).
    pub fn contains(&self, dev_id: u8, n: u32) -> bool {
        self.index.contains_key(&(dev_id, n))
    }

    /// Takes the cluster (`dev_id`, `n`) out, its data into `buf`.
    pub fn take(&mut self, dev_id: u8, n: u32, buf: &mut Vec<u8>) -> io::Result<Option<BlockMask>> {
        let Some(slot) = self.index.remove(&(dev_id, n)) else {
            return Ok(None);
        };
        let len = slot.mask.data_len();
        buf.resize(len, 0);
        if slot.at & IN_FILE == 0 {
            let at = slot.at as usize;
            buf.copy_from_slice(&self.memory[at..at + len]);
        } else {
            let file = self.file.as_ref().expect("spilled clusters have a file");
            file.read_exact_at(buf, slot.at & !IN_FILE)?;
        }
        Ok(Some(slot.mask))
    }

    /// The clusters held, in (device, cluster) order.
    pub fn sorted_keys(&self) -> Vec<(u8, u32)> {
        let mut keys: Vec<(u8, u32)> = self.index.keys().copied().collect();
        keys.sort_unstable();
        keys
    }
}

/// Reads the whole stream into a spool.
pub fn spool_stream<R: Read>(
    stream: &mut StreamReader<R>,
    limit: usize,
) -> Result<Spool, EncodeError> {
    let mut spool = Spool::new(limit);
    loop {
        let cluster = match stream.next_cluster() {
            Ok(Some(c)) => c,
            Ok(None) => return Ok(spool),
            Err(e) => return Err(Failure::format("<stdin>", &e).into()),
        };
        spool
            .push(&cluster)
            .map_err(|e| EncodeError::io("temporary spool file", &e))?;
    }
}

/// Writes every spooled cluster in (device, cluster) order.
pub fn write_sorted<W: Write>(
    spool: &mut Spool,
    writer: &mut Writer<W>,
    progress: &mut Progress,
) -> Result<(), EncodeError> {
    let mut buf = Vec::new();
    for (dev_id, n) in spool.sorted_keys() {
        let mask = spool
            .take(dev_id, n, &mut buf)
            .map_err(|e| EncodeError::io("temporary spool file", &e))?
            .expect("listed");
        let c = Cluster {
            dev_id,
            cluster_num: n,
            mask,
            data: &buf,
        };
        let zero = writer.write_cluster(&c).map_err(EncodeError::output)?;
        progress.clusters(dev_id, u64::from(n), 1, zero);
    }
    Ok(())
}

/// Checks that `stream` applies to the archive `base` (named `name`):
/// its base is `base`'s uuid and ctime, and its devices are `base`'s, in
/// name and size, in order. Returns the map from `base`'s device ids to the
/// stream's (1, 2, …).
pub fn check_base<R: Read>(
    name: &str,
    base: &VmaHeader,
    stream: &StreamReader<R>,
) -> Result<[u8; 256], Failure> {
    let want = stream.identity().and_then(|i| i.base).expect("incremental");
    let have = BaseRef {
        uuid: base.uuid(),
        time: base.ctime(),
    };
    if want != have {
        return Err(Failure::new(
            vma_cli::exit::USAGE,
            format!(
                "{name}: the stream applies to the backup {} of {}, not to this archive ({} of {})",
                uuid::Uuid::from_bytes(want.uuid),
                want.time,
                uuid::Uuid::from_bytes(have.uuid),
                have.time
            ),
        ));
    }
    let devices = stream.devices();
    let mut map = [0u8; 256];
    let base_devices = base.devices();
    let differ = |why: String| {
        Failure::new(
            vma_cli::exit::USAGE,
            format!("{name}: its devices differ from the stream's: {why}"),
        )
    };
    if base_devices.len() != devices.len() {
        return Err(differ(format!(
            "{} devices in the archive, {} in the stream",
            base_devices.len(),
            devices.len()
        )));
    }
    for (i, (b, s)) in base_devices.iter().zip(devices).enumerate() {
        if b.c_name() != s.name.as_bytes() || b.size != s.size {
            return Err(differ(format!(
                "device {}: {} of {} bytes in the archive, {} of {} bytes in the stream",
                i + 1,
                b.display_name(),
                b.size,
                s.name,
                s.size
            )));
        }
        map[b.id as usize] = (i + 1) as u8;
    }
    Ok(map)
}

/// Sink over the base: its clusters, or the spool's in their place.
struct MergeSink<'a, W: Write> {
    writer: &'a mut Writer<W>,
    spool: &'a mut Spool,
    map: [u8; 256],
    buf: Vec<u8>,
    progress: &'a mut Progress,
    error: Option<EncodeError>,
    from_stream: u64,
    from_base: u64,
    whole_extents: u64,
    /// With `--sorted`: the last (device, cluster) written.
    sorted: Option<Option<(u8, u32)>>,
    base_name: &'a str,
}

impl<W: Write> MergeSink<'_, W> {
    /// Whether the base's extent of `clusters` goes out whole: none of its
    /// clusters is in the spool and (with `--sorted`) they come in order.
    fn untouched(&self, clusters: &[Cluster<'_>]) -> bool {
        let mut last = self.sorted.map(|s| s.unwrap_or((0, 0)));
        let first = self.sorted.is_some_and(|s| s.is_none());
        clusters.iter().enumerate().all(|(i, c)| {
            let key = (self.map[c.dev_id as usize], c.cluster_num);
            let ordered = match &mut last {
                None => true,
                Some(l) => {
                    let ok = (first && i == 0) || key > *l;
                    *l = key;
                    ok
                }
            };
            ordered && !self.spool.contains(key.0, key.1)
        })
    }
}

impl<W: Write> ClusterSink for MergeSink<'_, W> {
    /// An extent of the base that the stream does not touch and that
    /// fills an extent of the output of its own goes out as it came: its
    /// data straight from the reader's buffer, its verified CRC-32 reused
    /// ([`Writer::write_extent`]); the same bytes as cluster by cluster.
    fn checked_extent(
        &mut self,
        data: &[u8],
        data_checksum: Option<u32>,
        clusters: &[Cluster<'_>],
    ) -> io::Result<(usize, Flow)> {
        if clusters.len() != vma_format::WRITER_CLUSTERS_PER_EXTENT || !self.untouched(clusters) {
            return self.extent_clusters(data, clusters);
        }
        let mut out = [Cluster {
            dev_id: 0,
            cluster_num: 0,
            mask: BlockMask::EMPTY,
            data: &[],
        }; vma_format::WRITER_CLUSTERS_PER_EXTENT];
        for (o, c) in out.iter_mut().zip(clusters) {
            *o = Cluster {
                dev_id: self.map[c.dev_id as usize],
                ..*c
            };
        }
        if let Err(e) = self.writer.write_extent(&out, data, data_checksum) {
            self.error = Some(EncodeError::output(e));
            return Err(io::Error::other("output"));
        }
        for c in &out {
            let zero = (vma_format::BLOCKS_PER_CLUSTER - c.mask.count()) as u64
                * vma_format::BLOCK_SIZE as u64;
            self.progress
                .clusters(c.dev_id, u64::from(c.cluster_num), 1, zero);
        }
        self.from_base += out.len() as u64;
        self.whole_extents += 1;
        if let Some(last) = &mut self.sorted {
            *last = out.last().map(|c| (c.dev_id, c.cluster_num));
        }
        Ok((clusters.len(), Flow::Continue))
    }

    fn cluster(&mut self, c: &Cluster<'_>) -> io::Result<Flow> {
        let dev_id = self.map[c.dev_id as usize];
        let n = c.cluster_num;
        if let Some(last) = &mut self.sorted {
            if let Some((d, m)) = *last {
                if (dev_id, n) <= (d, m) {
                    self.error = Some(
                        Failure::new(
                            vma_cli::exit::USAGE,
                            format!(
                                "{}: not in (device, cluster) order (device {dev_id} cluster {n} after device {d} cluster {m}): --sorted reads a compressed or piped base as it comes, so it must have been written with --sorted (merge without --sorted, decompress the base to a file, or write it again with vma-encode --sorted)",
                                self.base_name
                            ),
                        )
                        .into(),
                    );
                    return Err(io::Error::other("order"));
                }
            }
            *last = Some((dev_id, n));
        }
        let taken = match self.spool.take(dev_id, n, &mut self.buf) {
            Ok(t) => t,
            Err(e) => {
                self.error = Some(EncodeError::io("temporary spool file", &e));
                return Err(io::Error::other("spool"));
            }
        };
        let out = match taken {
            Some(mask) => {
                self.from_stream += 1;
                Cluster {
                    dev_id,
                    cluster_num: n,
                    mask,
                    data: &self.buf,
                }
            }
            None => {
                self.from_base += 1;
                Cluster { dev_id, ..*c }
            }
        };
        match self.writer.write_cluster(&out) {
            Ok(zero) => {
                self.progress.clusters(dev_id, u64::from(n), 1, zero);
                Ok(Flow::Continue)
            }
            Err(e) => {
                self.error = Some(EncodeError::output(e));
                Err(io::Error::other("output"))
            }
        }
    }
}

/// What a merge took from where.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MergeStats {
    /// Clusters written from the stream.
    pub from_stream: u64,
    /// Clusters written from the base.
    pub from_base: u64,
    /// Bytes the spool put in its temporary file.
    pub spilled: u64,
    /// Extents of the base written on whole (data and checksum reused).
    pub whole_extents: u64,
}

/// Writes the base's clusters, each replaced by the spool's where it has
/// one (see the module documentation). `map`: from [`check_base`].
/// `sorted`: refuse a base not in (device, cluster) order.
pub fn merge<R: Read, W: Write>(
    base_name: &str,
    sorted: bool,
    base: &mut Archive<R>,
    map: [u8; 256],
    spool: &mut Spool,
    writer: &mut Writer<W>,
    progress: &mut Progress,
) -> Result<MergeStats, EncodeError> {
    let spilled = spool.spilled();
    let mut sink = MergeSink {
        writer,
        spool,
        map,
        buf: Vec::new(),
        progress,
        error: None,
        from_stream: 0,
        from_base: 0,
        whole_extents: 0,
        sorted: sorted.then_some(None),
        base_name,
    };
    let result = base.run(&mut sink);
    if let Some(e) = sink.error.take() {
        return Err(e);
    }
    result.map_err(|e| EncodeError::from(Failure::format(base_name, &e)))?;
    let stats = MergeStats {
        from_stream: sink.from_stream,
        from_base: sink.from_base,
        spilled,
        whole_extents: sink.whole_extents,
    };
    check_spool_empty(base_name, spool)?;
    Ok(stats)
}

/// After a merge: every cluster of the stream found its place in the base.
pub fn check_spool_empty(base_name: &str, spool: &Spool) -> Result<(), EncodeError> {
    if spool.is_empty() {
        return Ok(());
    }
    // Every cluster of the base came (the reader checks), and the stream's
    // are inside the same devices: cannot happen.
    Err(Failure::new(
        vma_cli::exit::DAMAGED,
        format!(
            "{base_name}: {} clusters of the stream have no place in the archive",
            spool.len()
        ),
    )
    .into())
}
