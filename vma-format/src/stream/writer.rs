//! [`StreamWriter`]: writes a cluster stream.

use std::io::{self, IoSlice, Write};

use super::{
    check_devices, record_header, StreamDevice, IO_BUFFER, MAGIC, MAX_ABORT_REASON,
    PREAMBLE_FIXED_SIZE, RECORD_ABORT, RECORD_CLUSTER, RECORD_END, RECORD_HEADER_SIZE, VERSION,
};
use crate::cluster::Cluster;
use crate::clusters_for;
use crate::error::Error;

/// Writes a cluster stream to `W`.
///
/// The preamble is written at once; then [`write_cluster`](Self::write_cluster)
/// for each cluster, in any order; then [`finish`](Self::finish) (the end
/// record) or [`abort`](Self::abort). Dropping the writer without either
/// leaves a stream that every reader refuses as truncated.
///
/// Output is buffered (256 KiB); it reaches `W` when the buffer fills and at
/// `finish`/`abort`. A large record body (a cluster of at least
/// 16 KiB) is not copied into the buffer: it goes to `W`
/// in place, in one `write_vectored` after what is buffered (so `W` should
/// implement `write_vectored`, as files, pipes and `Vec` do).
pub struct StreamWriter<W: Write> {
    out: W,
    buf: Vec<u8>,
    devices: Vec<StreamDevice>,
    counts: Vec<u64>,
    failed: bool,
}

impl<W: Write> StreamWriter<W> {
    /// Writes the preamble: `backup_time` (seconds since the epoch) and the
    /// devices, which get ids 1, 2, … in this order. Refused (as
    /// [`ErrorClass::Invalid`](crate::ErrorClass)): more than 254 devices,
    /// an unsafe, overlong or repeated name, size 0 or over
    /// [`MAX_DEVICE_SIZE`].
    pub fn new(
        out: W,
        backup_time: i64,
        devices: &[StreamDevice],
    ) -> Result<StreamWriter<W>, Error> {
        Self::with_identity(out, backup_time, devices, None)
    }

    /// [`new`](Self::new), and with `Some(identity)` a version-2 stream
    /// that names its archive uuid and, if incremental, its base. An
    /// incremental stream carries only the clusters changed since the base
    /// (the end record counts what was sent).
    pub fn with_identity(
        out: W,
        backup_time: i64,
        devices: &[StreamDevice],
        identity: Option<&super::BackupIdentity>,
    ) -> Result<StreamWriter<W>, Error> {
        check_devices(devices).map_err(|e| Error::invalid(e.to_string()))?;
        let mut pre = Vec::with_capacity(PREAMBLE_FIXED_SIZE + 4);
        pre.extend_from_slice(&MAGIC);
        let version = if identity.is_some() {
            super::VERSION_IDENTITY
        } else {
            VERSION
        };
        pre.extend_from_slice(&version.to_be_bytes());
        pre.extend_from_slice(&0u16.to_be_bytes());
        pre.extend_from_slice(&backup_time.to_be_bytes());
        pre.extend_from_slice(&(devices.len() as u16).to_be_bytes());
        for d in devices {
            pre.extend_from_slice(&d.size.to_be_bytes());
            pre.extend_from_slice(&(d.name.len() as u16).to_be_bytes());
            pre.extend_from_slice(d.name.as_bytes());
        }
        if let Some(id) = identity {
            pre.extend_from_slice(&id.encode());
        }
        let crc = crc32fast::hash(&pre);
        pre.extend_from_slice(&crc.to_be_bytes());
        let mut buf = Vec::with_capacity(IO_BUFFER);
        buf.extend_from_slice(&pre);
        Ok(StreamWriter {
            out,
            buf,
            counts: vec![0; devices.len()],
            devices: devices.to_vec(),
            failed: false,
        })
    }

    /// Writes one cluster record. Refused: an undeclared device, a cluster
    /// past the device end (but for `vmstate`), data that is not
    /// `mask.count() * 4096` bytes. Not checked here (the reader does): a
    /// cluster sent twice.
    pub fn write_cluster(&mut self, cluster: &Cluster<'_>) -> Result<(), Error> {
        if self.failed {
            return Err(Error::invalid("stream writer failed earlier"));
        }
        let dev = cluster
            .dev_id
            .checked_sub(1)
            .and_then(|i| self.devices.get(i as usize))
            .ok_or_else(|| Error::invalid(format!("device {} is not declared", cluster.dev_id)))?;
        if !dev.is_vmstate() && cluster.cluster_num as u64 >= clusters_for(dev.size) {
            return Err(Error::invalid(format!(
                "cluster {} is past the end of {}",
                cluster.cluster_num, dev.name
            )));
        }
        if cluster.data.len() != cluster.mask.data_len() {
            return Err(Error::invalid(format!(
                "cluster {} of {}: {} data bytes for {} blocks",
                cluster.cluster_num,
                dev.name,
                cluster.data.len(),
                cluster.mask.count()
            )));
        }
        let head = record_header(
            RECORD_CLUSTER,
            cluster.dev_id,
            cluster.mask.0,
            cluster.cluster_num,
            cluster.data.len() as u32,
        );
        self.counts[cluster.dev_id as usize - 1] += 1;
        self.write_record(&head, cluster.data)
    }

    fn write_record(&mut self, head: &[u8; RECORD_HEADER_SIZE], body: &[u8]) -> Result<(), Error> {
        let mut crc = crc32fast::Hasher::new();
        crc.update(head);
        crc.update(body);
        let crc = crc.finalize().to_be_bytes();
        let total = head.len() + body.len() + crc.len();
        let res = if body.len() >= DIRECT_BODY {
            self.buf.extend_from_slice(head);
            let res = write_all_vectored(
                &mut self.out,
                &mut [IoSlice::new(&self.buf), IoSlice::new(body)],
            );
            self.buf.clear();
            self.buf.extend_from_slice(&crc);
            res
        } else {
            let res = if self.buf.len() + total > IO_BUFFER {
                self.flush_buf()
            } else {
                Ok(())
            };
            self.buf.extend_from_slice(head);
            self.buf.extend_from_slice(body);
            self.buf.extend_from_slice(&crc);
            res
        };
        res.map_err(|e| {
            self.failed = true;
            write_error(e)
        })
    }

    /// Cluster records written so far for each device, device 1 first.
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// Writes the end record (the per-device record counts) and flushes.
    pub fn finish(mut self) -> Result<W, Error> {
        let mut body = Vec::with_capacity(8 * self.counts.len());
        for c in &self.counts {
            body.extend_from_slice(&c.to_be_bytes());
        }
        let head = record_header(
            RECORD_END,
            0,
            self.counts.len() as u16,
            0,
            body.len() as u32,
        );
        self.write_record(&head, &body)?;
        self.into_inner()
    }

    /// Writes an abort record with `reason` (cut to [`MAX_ABORT_REASON`]
    /// bytes at a character boundary) and flushes: the consumer fails with
    /// this reason.
    pub fn abort(mut self, reason: &str) -> Result<W, Error> {
        let mut end = reason.len().min(MAX_ABORT_REASON);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let body = &reason.as_bytes()[..end];
        let head = record_header(RECORD_ABORT, 0, 0, 0, body.len() as u32);
        self.write_record(&head, body)?;
        self.into_inner()
    }

    fn flush_buf(&mut self) -> io::Result<()> {
        let res = self.out.write_all(&self.buf);
        self.buf.clear();
        res
    }

    fn into_inner(mut self) -> Result<W, Error> {
        self.flush_buf()
            .and_then(|_| self.out.flush())
            .map_err(write_error)?;
        Ok(self.out)
    }
}

/// A record body of at least this many bytes is written in place, not
/// copied into the writer's buffer.
const DIRECT_BODY: usize = 16 * 1024;

/// `write_all` for several slices (`Write::write_all_vectored` is not
/// stable yet).
fn write_all_vectored<W: Write>(out: &mut W, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match out.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn write_error(e: io::Error) -> Error {
    Error::io(None, "write failed", e)
}
