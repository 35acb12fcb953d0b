//! `--sorted --base PREV` when PREV is a plain file whose clusters are not
//! in (device, cluster) order (a live backup's archive): its extents are
//! indexed first ([`Archive::index`]: headers only, every check but the
//! data's), then its clusters are read with `pread` in (device, cluster)
//! order and merged with the spool, so the output is sorted.
//!
//! The index costs 16 bytes per cluster of the base (device, cluster,
//! extent, mask, first block) and 32 per extent (a 1 TiB disk: 16 Mi
//! clusters, 256 MiB). Data checksums cover whole extents, whose clusters
//! now come in another order: each cluster's CRC-32 is taken as it is read
//! and combined with its neighbours' (`crc32fast::Hasher::combine`) until
//! its extent is whole, which is then checked — before the output is put in
//! place, which a mismatch prevents. Clusters the stream replaces are still
//! read for their extent's checksum. An extent in progress keeps 12 bytes
//! per cluster read out of its order.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;

use vma_format::cluster::{BlockMask, Cluster};
use vma_format::error::{Error, Location};
use vma_format::reader::{Archive, Flow, IndexSink, IndexedExtent, Seekable};
use vma_format::writer::Writer;
use vma_format::BLOCK_SIZE;

use crate::merge::{MergeStats, Spool};
use crate::progress::Progress;
use crate::EncodeError;
use vma_cli::Failure;

/// One cluster of the base: where its data lies.
#[derive(Clone, Copy)]
struct Entry {
    /// Its cluster number and (output) device id: the sort key.
    cluster: u32,
    /// Index into [`BaseIndex::extents`].
    extent: u32,
    mask: BlockMask,
    /// Its first block in the extent's data.
    first_block: u16,
    dev_id: u8,
}

/// One extent of the base.
struct ExtentEntry {
    /// Index of the extent in the archive and where its header lies.
    index: u64,
    offset: u64,
    blocks: u16,
    /// Its data checksum, if it carries one.
    crc: Option<u32>,
}

/// Where every cluster of a seekable base lies, and whether the base is
/// already in (device, cluster) order.
pub struct BaseIndex {
    entries: Vec<Entry>,
    extents: Vec<ExtentEntry>,
    map: [u8; 256],
    /// The last key seen while indexing; `None` in it once out of order.
    last: Option<Option<(u8, u32)>>,
}

impl BaseIndex {
    /// Indexes `archive` (its header read), whose device ids `map` turns
    /// into the output's.
    pub fn build(
        name: &str,
        archive: &mut Archive<Seekable<File>>,
        map: [u8; 256],
    ) -> Result<BaseIndex, Failure> {
        let mut index = BaseIndex {
            entries: Vec::new(),
            extents: Vec::new(),
            map,
            last: Some(None),
        };
        archive
            .index(&mut index)
            .map_err(|e| Failure::format(name, &e))?;
        Ok(index)
    }

    /// Whether the base's clusters were in (device, cluster) order.
    pub fn is_sorted(&self) -> bool {
        self.last.is_some()
    }
}

impl IndexSink for BaseIndex {
    fn extent(&mut self, extent: &IndexedExtent<'_>) -> io::Result<Flow> {
        let at = u32::try_from(self.extents.len()).map_err(|_| io::Error::other("extents"))?;
        self.extents.push(ExtentEntry {
            index: extent.index,
            offset: extent.offset,
            blocks: extent.block_count,
            crc: extent.data_checksum,
        });
        for c in extent.clusters {
            let dev_id = self.map[c.dev_id as usize];
            let key = (dev_id, c.cluster_num);
            if let Some(last) = &mut self.last {
                if last.is_some_and(|l| l >= key) {
                    self.last = None;
                } else {
                    *last = Some(key);
                }
            }
            self.entries.push(Entry {
                cluster: c.cluster_num,
                extent: at,
                mask: c.mask,
                first_block: c.first_block,
                dev_id,
            });
        }
        Ok(Flow::Continue)
    }
}

/// The CRC-32 of an extent's data being read out of order.
struct Pending {
    /// Blocks from the start whose CRC `done` holds.
    blocks: u16,
    done: crc32fast::Hasher,
    /// Pieces read past `blocks`: (first block, blocks, CRC-32).
    later: Vec<(u16, u16, u32)>,
}

impl Pending {
    fn add(&mut self, first: u16, blocks: u16, data: &[u8]) {
        if first != self.blocks {
            self.later.push((first, blocks, crc32fast::hash(data)));
            return;
        }
        self.done.update(data);
        self.blocks += blocks;
        while let Some(i) = self.later.iter().position(|p| p.0 == self.blocks) {
            let (_, n, crc) = self.later.swap_remove(i);
            let len = n as u64 * BLOCK_SIZE as u64;
            self.done
                .combine(&crc32fast::Hasher::new_with_initial_len(crc, len));
            self.blocks += n;
        }
    }
}

/// Writes the base's clusters in (device, cluster) order, each replaced
/// by the spool's where it has one, reading them from `file` where
/// `index` says (see the module documentation).
pub fn merge_indexed<W: Write>(
    base_name: &str,
    file: &File,
    mut index: BaseIndex,
    spool: &mut Spool,
    writer: &mut Writer<W>,
    progress: &mut Progress,
) -> Result<MergeStats, EncodeError> {
    let spilled = spool.spilled();
    let mut stats = MergeStats {
        spilled,
        ..MergeStats::default()
    };
    index
        .entries
        .sort_unstable_by_key(|e| (e.dev_id, e.cluster));
    let mut pending: HashMap<u32, Pending> = HashMap::new();
    let mut buf = vec![0u8; vma_format::CLUSTER_SIZE];
    let mut ours = Vec::new();
    let read_error = |e: io::Error| EncodeError::from(Failure::io(base_name, &e));
    for e in &index.entries {
        let extent = &index.extents[e.extent as usize];
        let len = e.mask.data_len();
        let data = &mut buf[..len];
        if len > 0 {
            let at = extent.offset
                + vma_format::EXTENT_HEADER_SIZE as u64
                + e.first_block as u64 * BLOCK_SIZE as u64;
            file.read_exact_at(data, at).map_err(read_error)?;
        }
        if let (Some(crc), true) = (extent.crc, len > 0) {
            let p = pending.entry(e.extent).or_insert_with(|| Pending {
                blocks: 0,
                done: crc32fast::Hasher::new(),
                later: Vec::new(),
            });
            p.add(e.first_block, e.mask.count() as u16, data);
            if p.blocks == extent.blocks {
                let p = pending.remove(&e.extent).expect("present");
                if p.done.finalize() != crc {
                    let loc = Location::Extent {
                        index: extent.index,
                        offset: extent.offset,
                    };
                    let err = Error::damaged(Some(loc), "data checksum mismatch");
                    return Err(Failure::format(base_name, &err).into());
                }
            }
        }
        let out = match spool
            .take(e.dev_id, e.cluster, &mut ours)
            .map_err(|err| EncodeError::io("temporary spool file", &err))?
        {
            Some(mask) => {
                stats.from_stream += 1;
                Cluster {
                    dev_id: e.dev_id,
                    cluster_num: e.cluster,
                    mask,
                    data: &ours,
                }
            }
            None => {
                stats.from_base += 1;
                Cluster {
                    dev_id: e.dev_id,
                    cluster_num: e.cluster,
                    mask: e.mask,
                    data,
                }
            }
        };
        let zero = writer.write_cluster(&out).map_err(EncodeError::output)?;
        progress.clusters(e.dev_id, u64::from(e.cluster), 1, zero);
    }
    // An extent without data is checked by its checksum alone.
    for x in &index.extents {
        if x.blocks == 0 && x.crc.is_some_and(|c| c != crc32fast::hash(&[])) {
            let loc = Location::Extent {
                index: x.index,
                offset: x.offset,
            };
            let err = Error::damaged(Some(loc), "data checksum mismatch");
            return Err(Failure::format(base_name, &err).into());
        }
    }
    crate::merge::check_spool_empty(base_name, spool)?;
    Ok(stats)
}

/// `--sorted --base` with a base that is a plain file (`path`, named
/// `base_name`): it is indexed; in (device, cluster) order already, it is
/// merged as it is read (`base`, its header read: [`crate::merge::merge`]);
/// else with [`merge_indexed`]. The index's copy of the header is checked
/// against `stream` again: the file is opened a second time.
#[allow(clippy::too_many_arguments)]
pub fn merge_sorted_file<R: io::Read, B: io::Read, W: Write>(
    base_name: &str,
    path: &std::path::Path,
    stream: &vma_format::stream::StreamReader<R>,
    base: &mut Archive<B>,
    map: [u8; 256],
    spool: &mut Spool,
    writer: &mut Writer<W>,
    progress: &mut Progress,
) -> Result<MergeStats, EncodeError> {
    let io_error = |e: io::Error| EncodeError::from(Failure::io(base_name, &e));
    let file = Seekable::new(File::open(path).map_err(io_error)?).map_err(io_error)?;
    let mut archive = Archive::new(file).map_err(|e| Failure::format(base_name, &e))?;
    let seek_map = crate::merge::check_base(base_name, archive.header(), stream)?;
    let index = BaseIndex::build(base_name, &mut archive, seek_map)?;
    if index.is_sorted() {
        drop(index);
        return crate::merge::merge(base_name, true, base, map, spool, writer, progress);
    }
    let file = archive.into_inner().into_inner();
    merge_indexed(base_name, &file, index, spool, writer, progress)
}
