//! Where captured clusters go: the cluster stream (`vma_format::stream`),
//! written straight into the consumer (see [`crate::output`]).

use std::io::{self, Write};

use vma_format::stream::{StreamDevice, StreamWriter};
use vma_format::Cluster;

use crate::engine::{Backup, CaptureSink};

/// The cluster stream as a [`CaptureSink`].
pub struct StreamSink<W: Write> {
    writer: StreamWriter<W>,
}

impl<W: Write> StreamSink<W> {
    /// Writes the preamble for `backup`'s devices (sizes rounded up to 512
    /// bytes, as Proxmox records them) and its instant.
    pub fn new(out: W, backup: &Backup) -> io::Result<StreamSink<W>> {
        let devices: Vec<StreamDevice> = backup
            .devices()
            .into_iter()
            .map(|(name, size)| StreamDevice::new(name, size.div_ceil(512) * 512))
            .collect();
        let writer =
            StreamWriter::with_identity(out, backup.time(), &devices, Some(backup.identity()))
                .map_err(to_io)?;
        Ok(StreamSink { writer })
    }
}

fn to_io(e: vma_format::Error) -> io::Error {
    io::Error::other(e.to_string())
}

impl<W: Write> CaptureSink for StreamSink<W> {
    fn cluster(&mut self, cluster: &Cluster<'_>) -> io::Result<()> {
        self.writer.write_cluster(cluster).map_err(to_io)
    }

    /// One `writev` for many records, each body in place, with the
    /// checksums computed at capture.
    fn clusters<'a>(
        &mut self,
        clusters: impl Iterator<Item = (Cluster<'a>, u32)>,
    ) -> io::Result<()> {
        self.writer.write_clusters_with_crc(clusters).map_err(to_io)
    }

    fn finish(self) -> io::Result<()> {
        self.writer.finish().map(drop).map_err(to_io)
    }

    fn abort(self, reason: &str) -> io::Result<()> {
        self.writer.abort(reason).map(drop).map_err(to_io)
    }
}
