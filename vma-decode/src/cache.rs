//! The cache of `serve`: an archive that cannot be read at random (a
//! compressed one, or one arriving on a pipe) is decompressed once into an
//! unnamed file in the cache directory, and indexed as it is written.
//!
//! [`CacheWriter`] sits between the input and the reader's
//! [`Archive::index`](vma_format::Archive::index): every byte the reader
//! reads or passes over goes into the cache file, at the position it has in
//! the plain archive, so the index built on the way points into the cache.
//! The file has no name ([`tempfile::tempfile_in`], `O_TMPFILE`): it is gone
//! when the server ends, however it ends.
//!
//! Space: [`space_needed`] is what the archive may need decompressed (its
//! devices as if every block were stored); `serve` refuses to start when the
//! cache directory has less free, unless told not to check. A disk that fills
//! up anyway stops the decompressing pass with [`CacheWriter::write_error`].

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::Path;

use vma_format::{
    SkipData, VmaHeader, CLUSTER_SIZE, EXTENT_HEADER_SIZE, WRITER_CLUSTERS_PER_EXTENT,
};

/// Bytes passed from the input to the cache in one step.
const STEP: usize = 1 << 20;

/// Copies everything read through it into the cache file.
pub struct CacheWriter<R> {
    input: R,
    out: BufWriter<File>,
    buf: Vec<u8>,
    written: u64,
    failed: Option<io::Error>,
}

impl<R: Read> CacheWriter<R> {
    /// Copies `input` into `cache` (an empty file) as it is read.
    pub fn new(input: R, cache: File) -> CacheWriter<R> {
        CacheWriter {
            input,
            out: BufWriter::with_capacity(STEP, cache),
            buf: Vec::new(),
            written: 0,
            failed: None,
        }
    }

    /// Bytes copied so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The error writing the cache failed with, if it did (the reader then
    /// saw an error reading).
    pub fn write_error(&self) -> Option<&io::Error> {
        self.failed.as_ref()
    }

    /// Writes what is buffered and returns the cache file.
    pub fn finish(self) -> io::Result<File> {
        self.out.into_inner().map_err(|e| e.into_error())
    }

    fn keep(&mut self, n: usize, from_buf: Option<&[u8]>) -> io::Result<()> {
        let bytes = match from_buf {
            Some(b) => b,
            None => &self.buf[..n],
        };
        if let Err(e) = self.out.write_all(bytes) {
            let kind = e.kind();
            let msg = e.to_string();
            self.failed = Some(e);
            return Err(io::Error::new(kind, format!("writing the cache: {msg}")));
        }
        self.written += n as u64;
        Ok(())
    }
}

impl<R: Read> Read for CacheWriter<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.input.read(buf)?;
        self.keep(n, Some(&buf[..n]))?;
        Ok(n)
    }
}

impl<R: Read> SkipData for CacheWriter<R> {
    fn skip_data(&mut self, n: u64) -> io::Result<u64> {
        if self.buf.is_empty() {
            self.buf = vec![0u8; STEP];
        }
        let want = n.min(STEP as u64) as usize;
        let got = loop {
            match self.input.read(&mut self.buf[..want]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => break other?,
            }
        };
        self.keep(got, None)?;
        Ok(got as u64)
    }
}

/// Bytes the archive with `header` has at most when every block of every
/// device is stored, laid out as Proxmox's writer (and ours) lays it out:
/// the header, each device's clusters, one 512-byte extent header per 58
/// clusters. (A `vmstate` may hold more than its size says; a writer may use
/// smaller extents: the disk may still fill up, which stops the copy.)
pub fn space_needed(header: &VmaHeader) -> u64 {
    let clusters: u64 = header.devices().iter().map(|d| d.clusters()).sum();
    let extents = clusters.div_ceil(WRITER_CLUSTERS_PER_EXTENT as u64).max(1);
    header.header_size() as u64
        + clusters * CLUSTER_SIZE as u64
        + extents * EXTENT_HEADER_SIZE as u64
}

/// Bytes an unprivileged process may still write into the file system
/// holding `dir`.
pub fn free_space(dir: &Path) -> io::Result<u64> {
    let st = rustix::fs::statvfs(dir)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Seek;

    #[test]
    fn what_is_read_and_skipped_lands_in_the_cache_in_order() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let cache = tempfile::tempfile().unwrap();
        let mut w = CacheWriter::new(&data[..], cache);
        let mut head = [0u8; 1000];
        w.read_exact(&mut head).unwrap();
        let mut skipped = 0;
        while skipped < 2_500_000 {
            skipped += w.skip_data(2_500_000 - skipped).unwrap();
        }
        let mut rest = Vec::new();
        w.read_to_end(&mut rest).unwrap();
        assert_eq!(w.skip_data(10).unwrap(), 0);
        assert_eq!(w.written(), data.len() as u64);
        let mut f = w.finish().unwrap();
        f.rewind().unwrap();
        let mut back = Vec::new();
        f.read_to_end(&mut back).unwrap();
        assert!(back == data);
    }

    #[test]
    fn a_cache_that_cannot_be_written_stops_the_copy() {
        // /dev/full: every write fails with ENOSPC.
        let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") else {
            eprintln!("skipped: no /dev/full");
            return;
        };
        let data = vec![7u8; 3 * STEP];
        let mut w = CacheWriter::new(&data[..], full);
        let mut err = None;
        for _ in 0..3 {
            if let Err(e) = w.skip_data(STEP as u64) {
                err = Some(e);
                break;
            }
        }
        let err = err.expect("the copy failed");
        assert!(err.to_string().starts_with("writing the cache: "), "{err}");
        assert_eq!(w.write_error().unwrap().raw_os_error(), Some(libc::ENOSPC));
    }
}
