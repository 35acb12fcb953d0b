//! Proxmox VMA archives, read and written as streams.
//!
//! A VMA archive is a header (config files as blobs, up to 254 devices with
//! name and size) followed by extents: a 512-byte extent header that tags up
//! to 59 clusters of 64 KiB (device, cluster number, 16-bit mask of the
//! non-zero 4 KiB blocks), then the non-zero blocks themselves. Clusters may
//! come in any order, so an archive can be written and read over plain pipes.
//! `docs/FORMAT.md` describes the format in full, with its quirks.
//!
//! The pieces, in the order data flows:
//!
//! * [`Cluster`] / [`ClusterBuf`] — the one currency every source and sink
//!   trades in: (device id, cluster number, [`BlockMask`], non-zero blocks).
//! * [`zero`] — zero-block detection and packing of raw 64 KiB clusters.
//! * [`VmaHeader`] / [`HeaderBuilder`] — the archive header, parsed with every
//!   field checked, or built and encoded exactly as Proxmox's writer lays it out.
//! * [`ExtentHeader`] — one extent header, parsed with every field checked.
//! * [`Archive`] — the streaming reader over any [`std::io::Read`]: it checks
//!   everything and pushes clusters into a [`ClusterSink`]; or, over a file,
//!   walks only the extent headers with the same checks and tells an
//!   [`IndexSink`] where each cluster lies ([`Archive::index`]).
//! * [`Writer`] — the streaming writer over any [`std::io::Write`].
//! * [`stream`] — the cluster stream that `cbw-tap` emits and `vma-encode`
//!   reads.
//!
//! Nothing here seeks but [`Archive::index`] over a [`Seekable`] input:
//! readers and writers work on pipes.

pub mod cluster;
pub mod clusterset;
pub mod devices;
pub mod error;
pub mod extent;
pub mod header;
pub mod names;
pub mod reader;
pub mod source;
pub mod stream;
pub mod writer;
pub mod zero;

pub use cluster::{BlockMask, Cluster, ClusterBuf};
pub use clusterset::ClusterSet;
pub use devices::{DeviceTracker, Refusal};
pub use error::{Error, ErrorClass, Location};
pub use extent::{BlockInfo, ExtentHeader, DATA_CHECKSUM_MASK, DATA_CHECKSUM_VERSION};
pub use header::{ConfigEntry, DeviceInfo, HeaderBuilder, VmaHeader};
pub use reader::{
    Archive, ArchiveClusters, ClusterSink, DataChecksums, Flow, IndexSink, IndexedCluster,
    IndexedExtent, ReadOptions, Seekable, SkipData, Summary,
};
pub use source::{ClusterSource, Piece, PullError, Pulled, RawRoom};
pub use writer::{Writer, WriterOptions};

/// Size of a block, the unit of zero detection: 4 KiB.
pub const BLOCK_SIZE: usize = 4096;
/// Size of a cluster, the unit of addressing: 64 KiB.
pub const CLUSTER_SIZE: usize = 65536;
/// Blocks in one cluster (one bit each in a [`BlockMask`]).
pub const BLOCKS_PER_CLUSTER: usize = CLUSTER_SIZE / BLOCK_SIZE;
/// Size of an extent header.
pub const EXTENT_HEADER_SIZE: usize = 512;
/// Blockinfo slots in one extent header; readers accept this many clusters.
pub const EXTENT_SLOTS: usize = 59;
/// Clusters Proxmox's writer (and ours) puts into one extent at most; the
/// 59th slot stays free (ours carries the data checksum there).
pub const WRITER_CLUSTERS_PER_EXTENT: usize = 58;
/// Largest possible extent: header plus 59 full clusters.
pub const MAX_EXTENT_SIZE: usize = EXTENT_HEADER_SIZE + EXTENT_SLOTS * CLUSTER_SIZE;
/// Size of the fixed part of the archive header; the blob buffer follows it.
pub const HEADER_FIXED_SIZE: usize = 12288;
/// Config slots in the header.
pub const MAX_CONFIGS: usize = 256;
/// Devices a writer may declare (ids 1 to 254; 0 is "no device" and Proxmox
/// keeps 255 in reserve).
pub const MAX_DEVICES: usize = 254;
/// Largest blob (config data, or a name with its NUL): its size field has 16 bits.
pub const MAX_BLOB_SIZE: usize = 65535;
/// Largest header a writer produces (Proxmox's writer has a 512 KiB header buffer).
pub const MAX_WRITTEN_HEADER_SIZE: usize = 8 * CLUSTER_SIZE;
/// Largest header a reader accepts: the fixed part plus the largest blob
/// buffer the 256 configs and 255 device names can fill.
pub const MAX_READ_HEADER_SIZE: usize =
    HEADER_FIXED_SIZE + (2 * MAX_CONFIGS + 255) * (MAX_BLOB_SIZE + 2) + 1;
/// Largest device: cluster numbers have 32 bits.
pub const MAX_DEVICE_SIZE: u64 = (1u64 << 32) * CLUSTER_SIZE as u64;
/// Name of the device that holds the VM's RAM state.
pub const VMSTATE_NAME: &str = "vmstate";

/// Clusters needed to hold `size` bytes.
pub fn clusters_for(size: u64) -> u64 {
    size.div_ceil(CLUSTER_SIZE as u64)
}

/// Reads until `buf` is full or the input ends, retrying interrupted reads;
/// returns the bytes read (fewer than `buf.len()` only at the end of input).
/// The one such loop of the workspace: the header, archive and stream
/// readers, and the input layer (`vma-cli`) use it.
pub fn read_full<R: std::io::Read + ?Sized>(
    input: &mut R,
    buf: &mut [u8],
) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}
