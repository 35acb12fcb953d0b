//! The encode side pulls: a [`ClusterSource`] declares its devices up front,
//! then hands out clusters until it is exhausted, in any order; the
//! [`Writer`](crate::Writer) asks it for the next piece
//! ([`Writer::pull`](crate::Writer::pull)) and knows nothing of where clusters
//! come from.
//!
//! Sources: raw images and block devices (`vma-encode`'s `ImageSources`),
//! the cluster stream ([`StreamReader`](crate::stream::StreamReader)), an
//! archive read back ([`ArchiveClusters`](crate::ArchiveClusters), the base an
//! incremental stream will be merged onto).

use crate::cluster::{BlockMask, Cluster};
use crate::stream::StreamDevice;
use crate::CLUSTER_SIZE;

/// Where a source may read raw clusters straight into the writer's extent
/// buffer (the one copy of the data is then the kernel's).
#[derive(Debug)]
pub struct RawRoom<'w> {
    pub(crate) buf: &'w mut [u8],
}

impl RawRoom<'_> {
    /// Room for `k` raw clusters, `1 <= k <= max.max(1)` (fewer when the
    /// extent being filled is nearly full): `k * 65536` bytes to fill with
    /// the clusters' raw content, then to return as [`Piece::Raw`] with
    /// `count` at most `k`.
    pub fn clusters(&mut self, max: usize) -> &mut [u8] {
        let k = max.min(self.buf.len() / CLUSTER_SIZE).max(1);
        &mut self.buf[..k * CLUSTER_SIZE]
    }
}

/// What a source hands the writer at one pull.
#[derive(Debug)]
pub enum Piece<'a> {
    /// One packed cluster.
    Cluster(Cluster<'a>),
    /// One packed cluster whose `mask.count() * 4096` data bytes the source
    /// read into the start of the [`RawRoom`] (a cluster stream's record
    /// body, read straight into the extent buffer).
    Packed {
        /// Device id.
        dev_id: u8,
        /// Cluster number.
        cluster_num: u32,
        /// Its stored blocks.
        mask: BlockMask,
        /// The CRC-32 of those data bytes, when the source knows it (the
        /// cluster stream's record checksum gives it): the writer's data
        /// checksum combines it instead of hashing the data again.
        data_crc: Option<u32>,
    },
    /// Clusters `first .. first + count` of `dev_id` are all zero (a hole):
    /// written without data.
    Zeros {
        /// Device id.
        dev_id: u8,
        /// First cluster.
        first: u32,
        /// How many.
        count: u64,
    },
    /// Clusters `first .. first + count` of `dev_id` were read raw, 64 KiB
    /// each, into the start of the [`RawRoom`]; the writer packs them there.
    Raw {
        /// Device id.
        dev_id: u8,
        /// First cluster.
        first: u32,
        /// How many (at most the room given).
        count: usize,
    },
}

/// A source of clusters for the writer (see the module documentation).
pub trait ClusterSource {
    /// What reading the source fails with.
    type Error;

    /// The devices, id 1 first: complete before the first cluster, since the
    /// archive header (which lists them) precedes every extent.
    fn devices(&self) -> Vec<StreamDevice>;

    /// The next piece, `None` once the source is exhausted (and, for a
    /// source that can tell, found complete). `room` is where raw clusters
    /// may be read to; a source that does not read raw ignores it.
    fn next_piece<'a>(
        &'a mut self,
        room: &mut RawRoom<'_>,
    ) -> Result<Option<Piece<'a>>, Self::Error>;
}

/// What one [`Writer::pull`](crate::Writer::pull) wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pulled {
    /// Device id.
    pub dev_id: u8,
    /// First cluster.
    pub first: u64,
    /// Clusters written.
    pub count: u64,
    /// Bytes of zero blocks among them (whole 4 KiB blocks).
    pub zero_bytes: u64,
}

/// Why a pull failed: the source, or the writer.
#[derive(Debug)]
pub enum PullError<E> {
    /// Reading the source failed (or found it damaged).
    Source(E),
    /// The writer refused the piece or could not write.
    Write(crate::Error),
}
