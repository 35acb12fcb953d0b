//! [`Archive::index`]: the extents walked with the reader's checks, their
//! data passed over ([`SkipData`]), and where each cluster lies handed on.

use std::io::{self, Read, Seek, SeekFrom};

use super::{sink_error, tolerate, Archive, Flow, NextExtent, Summary};
use crate::cluster::BlockMask;
use crate::error::{Error, Location};
use crate::header::VmaHeader;
use crate::{BLOCK_SIZE, EXTENT_HEADER_SIZE, EXTENT_SLOTS};

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
                NextExtent::Found(loc, extent, usable, blocks) => (loc, extent, usable, blocks),
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
        self.end_read(summary, |summary| sink.finish(summary))
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
