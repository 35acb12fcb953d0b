//! Where captured clusters go: the cluster stream (`vma_format::stream`),
//! carried in frames over the control connection.

use std::io::{self, Read, Write};
use std::sync::Arc;

use vma_format::stream::{StreamDevice, StreamWriter};
use vma_format::Cluster;

use crate::engine::{Backup, CaptureSink};

/// Largest frame payload: what the stream writer hands over at once is 256
/// KiB; a reader refuses anything above this.
pub const MAX_FRAME: usize = 1 << 20;

/// Wraps bytes in frames: a 4-byte big-endian length, then that many bytes.
/// A zero-length frame ends the framed data (see [`FramedWriter::end`]).
/// This lets the control connection carry the cluster stream and, after it,
/// the final status.
pub struct FramedWriter<W: Write> {
    inner: W,
    on_bytes: Option<Arc<Backup>>,
}

impl<W: Write> FramedWriter<W> {
    /// Frames into `inner`; bytes written are counted on `backup` if given.
    ///
    /// If `inner` is a socket with a send timeout, a write that times out
    /// is retried as long as `backup` is running: a slow consumer only
    /// slows the backup down. Once the backup is over (aborted, e.g. a
    /// guest write's copy timed out) or without a backup, a timeout is an
    /// error, so a stalled consumer cannot hold the writer forever.
    pub fn new(inner: W, backup: Option<Arc<Backup>>) -> FramedWriter<W> {
        FramedWriter {
            inner,
            on_bytes: backup,
        }
    }

    /// Writes the end frame and returns the inner writer.
    pub fn end(mut self) -> io::Result<W> {
        self.send_all(&0u32.to_be_bytes())?;
        self.inner.flush()?;
        Ok(self.inner)
    }

    fn send_all(&mut self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            match self.inner.write(buf) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) && self.on_bytes.as_ref().is_some_and(|b| !b.is_over()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the consumer stopped reading",
                    ))
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl<W: Write> Write for FramedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = buf.len().min(MAX_FRAME);
        self.send_all(&(n as u32).to_be_bytes())?;
        self.send_all(&buf[..n])?;
        if let Some(b) = &self.on_bytes {
            b.count_emitted_bytes(n as u64);
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Reads framed data (see [`FramedWriter`]) and copies the payload to
/// `out` until the end frame. Returns the payload bytes copied.
///
/// # Errors
/// `UnexpectedEof` if the input ends before the end frame, `InvalidData`
/// for a frame above [`MAX_FRAME`], and `out`'s errors as
/// [`FrameCopyError::Output`].
pub fn copy_frames(input: &mut impl Read, out: &mut impl Write) -> Result<u64, FrameCopyError> {
    let mut buf = vec![0u8; MAX_FRAME];
    let mut total = 0u64;
    loop {
        let mut len = [0u8; 4];
        input.read_exact(&mut len).map_err(FrameCopyError::Input)?;
        let len = u32::from_be_bytes(len) as usize;
        if len == 0 {
            out.flush().map_err(FrameCopyError::Output)?;
            return Ok(total);
        }
        if len > MAX_FRAME {
            return Err(FrameCopyError::Input(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("frame of {len} bytes, more than {MAX_FRAME}"),
            )));
        }
        input
            .read_exact(&mut buf[..len])
            .map_err(FrameCopyError::Input)?;
        out.write_all(&buf[..len]).map_err(FrameCopyError::Output)?;
        total += len as u64;
    }
}

/// Which side of [`copy_frames`] failed.
#[derive(Debug)]
pub enum FrameCopyError {
    /// Reading the frames.
    Input(io::Error),
    /// Writing the payload.
    Output(io::Error),
}

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
        let writer = StreamWriter::new(out, backup.time(), &devices).map_err(to_io)?;
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

    fn finish(self) -> io::Result<()> {
        self.writer.finish().map(drop).map_err(to_io)
    }

    fn abort(self, reason: &str) -> io::Result<()> {
        self.writer.abort(reason).map(drop).map_err(to_io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut framed = FramedWriter::new(Vec::new(), None);
        framed.write_all(&[7u8; 3000]).unwrap();
        framed.write_all(b"xyz").unwrap();
        let mut bytes = framed.end().unwrap();
        bytes.extend_from_slice(b"trailer");
        let mut input = &bytes[..];
        let mut out = Vec::new();
        assert_eq!(copy_frames(&mut input, &mut out).unwrap(), 3003);
        assert_eq!(&out[3000..], b"xyz");
        assert_eq!(input, b"trailer");
        // Cut short: an error, not a silent end.
        let mut short = &bytes[..100];
        assert!(matches!(
            copy_frames(&mut short, &mut Vec::new()),
            Err(FrameCopyError::Input(e)) if e.kind() == io::ErrorKind::UnexpectedEof
        ));
    }
}
