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
/// [`write_clusters`](Self::write_clusters) writes many records in one
/// `write_vectored`, none of their bodies copied.
pub struct StreamWriter<W: Write> {
    pub(super) out: W,
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
        let head = self.cluster_header(cluster)?;
        self.write_record(&head, cluster.data)
    }

    /// Writes cluster records for `clusters`, in order, several to a
    /// `write_vectored`: each body in place (never copied into the
    /// buffer), the record headers and checksums between them in the
    /// buffer, up to [`BATCH_BYTES`] and [`BATCH_SLICES`] a write. Unlike
    /// [`write_cluster`](Self::write_cluster), nothing is left in the buffer:
    /// once this returns, every record has reached `W` whole. Refused as
    /// `write_cluster` refuses; the records before a refused cluster are
    /// written, none after it.
    pub fn write_clusters<'a>(
        &mut self,
        clusters: impl IntoIterator<Item = Cluster<'a>>,
    ) -> Result<(), Error> {
        self.write_clusters_with_crc(clusters.into_iter().map(|c| {
            let crc = cluster_record_crc(&c);
            (c, crc)
        }))
    }

    /// [`write_clusters`](Self::write_clusters) for a producer that has
    /// each record's checksum already: `(cluster, cluster_record_crc(&cluster))`
    /// — computed where the data was captured, while it was in the cache,
    /// instead of here from memory again. A wrong checksum writes a record
    /// every reader refuses (debug builds check it here).
    pub fn write_clusters_with_crc<'a>(
        &mut self,
        clusters: impl IntoIterator<Item = (Cluster<'a>, u32)>,
    ) -> Result<(), Error> {
        if self.failed {
            return Err(Error::invalid("stream writer failed earlier"));
        }
        let mut clusters = clusters.into_iter();
        // Where the bodies go between the buffer's glue: after the buffer's
        // first `cuts[i]` bytes comes `bodies[i]`.
        let mut bodies: [&'a [u8]; BATCH_SLICES / 2] = [&[]; BATCH_SLICES / 2];
        let mut cuts = [0usize; BATCH_SLICES / 2];
        loop {
            let (mut n, mut bytes, mut refused, mut done) = (0, 0usize, None, false);
            while n < bodies.len()
                && bytes < BATCH_BYTES
                && self.buf.len() + GLUE <= self.buf.capacity()
            {
                let Some((cluster, crc)) = clusters.next() else {
                    done = true;
                    break;
                };
                debug_assert_eq!(crc, cluster_record_crc(&cluster), "wrong record checksum");
                let head = match self.cluster_header(&cluster) {
                    Ok(head) => head,
                    Err(e) => {
                        refused = Some(e);
                        break;
                    }
                };
                self.buf.extend_from_slice(&head);
                if !cluster.data.is_empty() {
                    cuts[n] = self.buf.len();
                    bodies[n] = cluster.data;
                    n += 1;
                }
                self.buf.extend_from_slice(&crc.to_be_bytes());
                bytes += RECORD_HEADER_SIZE + cluster.data.len() + 4;
            }
            self.write_glued(&bodies[..n], &cuts[..n]).map_err(|e| {
                self.failed = true;
                write_error(e)
            })?;
            if let Some(e) = refused {
                return Err(e);
            }
            if done {
                return Ok(());
            }
        }
    }

    /// One `write_vectored` (repeated until all is written) of the buffer
    /// with `bodies[i]` after its first `cuts[i]` bytes; empties the buffer.
    fn write_glued(&mut self, bodies: &[&[u8]], cuts: &[usize]) -> io::Result<()> {
        let mut slices = [IoSlice::new(&[]); BATCH_SLICES + 1];
        let (mut k, mut from) = (0, 0);
        for (body, &cut) in bodies.iter().zip(cuts) {
            slices[k] = IoSlice::new(&self.buf[from..cut]);
            slices[k + 1] = IoSlice::new(body);
            k += 2;
            from = cut;
        }
        slices[k] = IoSlice::new(&self.buf[from..]);
        let res = write_all_vectored(&mut self.out, &mut slices[..k + 1]);
        self.buf.clear();
        res
    }

    /// The record header of `cluster`, counted; refused as
    /// [`write_cluster`](Self::write_cluster) says.
    fn cluster_header(&mut self, cluster: &Cluster<'_>) -> Result<[u8; RECORD_HEADER_SIZE], Error> {
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
        self.counts[cluster.dev_id as usize - 1] += 1;
        Ok(record_header(
            RECORD_CLUSTER,
            cluster.dev_id,
            cluster.mask.0,
            cluster.cluster_num,
            cluster.data.len() as u32,
        ))
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

/// Most bytes of records one `write_vectored` of
/// [`StreamWriter::write_clusters`] carries: what a pipe enlarged to 1 MiB
/// holds.
pub const BATCH_BYTES: usize = 1 << 20;

/// Most slices one `write_vectored` of [`StreamWriter::write_clusters`]
/// hands over (a body and the glue before it each; far below `IOV_MAX`).
pub const BATCH_SLICES: usize = 256;

/// Buffer room one more record needs in a batch: its header and checksum
/// (its body stays in place).
const GLUE: usize = RECORD_HEADER_SIZE + 4;

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

/// The checksum of `cluster`'s record in a cluster stream: CRC-32 of its
/// record header and its data. For
/// [`StreamWriter::write_clusters_with_crc`]; it depends on the cluster
/// alone (device, number, mask, data), not on the stream.
pub fn cluster_record_crc(cluster: &Cluster<'_>) -> u32 {
    let head = record_header(
        RECORD_CLUSTER,
        cluster.dev_id,
        cluster.mask.0,
        cluster.cluster_num,
        cluster.data.len() as u32,
    );
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head);
    crc.update(cluster.data);
    crc.finalize()
}
