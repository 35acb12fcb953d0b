//! The NBD backend of an export: copy-before-write in front of its writes.

use std::io;
use std::sync::Arc;

use nbd_server::{Backend, Extent, ZeroFlags};

use super::Engine;

/// An export served with copy-before-write: reads go straight to the image;
/// writes, trims and write-zeroes first make sure the running backup (if
/// any) has captured the clusters they touch.
pub struct CbwBackend {
    pub(super) engine: Arc<Engine>,
    pub(super) index: usize,
    pub(super) inner: Arc<dyn Backend>,
}

impl CbwBackend {
    fn guarded(
        &self,
        offset: u64,
        len: u64,
        op: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<()> {
        let gate = self.engine.gate();
        if len > 0 {
            self.engine.changes.record(self.index, offset, len);
        }
        if let Some(backup) = gate.as_ref() {
            if !backup.is_over() {
                backup.before_guest_write(self.index, offset, len)?;
            }
        }
        op()
    }
}

impl Backend for CbwBackend {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_only(&self) -> bool {
        self.inner.read_only()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn read_vectored_at(&self, bufs: &mut [&mut [u8]], offset: u64) -> io::Result<()> {
        self.inner.read_vectored_at(bufs, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.guarded(offset, buf.len() as u64, || {
            self.inner.write_at(buf, offset, fua)
        })
    }

    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.guarded(offset, len, || self.inner.trim(offset, len))
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        self.guarded(offset, len, || self.inner.write_zeroes(offset, len, flags))
    }

    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.inner.block_status(offset, len)
    }

    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.cache(offset, len)
    }

    /// All connections share this backend, the image and the gate, so a
    /// flush on one covers all: multi-conn is safe when the image's is.
    fn can_multi_conn(&self) -> bool {
        self.inner.can_multi_conn()
    }
}
