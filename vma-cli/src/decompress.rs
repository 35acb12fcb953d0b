//! Compressed archives: which compressor wrote them (by magic bytes), and a
//! decoder on its own thread that hands plain bytes to the archive reader.
//!
//! vzdump writes `.vma.zst` (zstd, `-T0 --rsyncable`: one or more frames),
//! `.vma.gz` (gzip or pigz: one or more members) and `.vma.lzo` (lzop). All
//! frames and members are read, so `cat a.zst b.zst` decodes as the
//! concatenation, as `zstd -dc` does.
//!
//! The decoder runs on a thread of its own and passes buffers of
//! [`CHUNK`] bytes through a channel of [`DEPTH`] buffers (memory: at most
//! `DEPTH + 2` buffers), so decompression overlaps parsing and writing; the
//! buffers are recycled, nothing is allocated per chunk.
//!
//! Errors: a stream that is cut short or corrupt is a [`DecompressError`]
//! (carried inside an [`io::Error`] of kind `InvalidData`, so it passes
//! through the archive reader): the input is damaged, exit code 1. An error
//! reading the compressed input itself stays a plain I/O error (exit 3).

use std::cell::Cell;
use std::fmt;
use std::io::{self, BufReader, Read};
use std::rc::Rc;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};

use crate::lzop::{self, LzopReader};

/// Bytes per buffer passed from the decoder thread.
pub const CHUNK: usize = 1 << 20;
/// Buffers in flight between the decoder thread and the reader.
pub const DEPTH: usize = 8;
/// Bytes of an input's start that decide its format.
pub const MAGIC_LEN: usize = 9;

/// A compressor whose output we read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Zstandard (`.zst`).
    Zstd,
    /// gzip, pigz (`.gz`).
    Gzip,
    /// lzop (`.lzo`).
    Lzop,
}

impl Compression {
    /// Its name, as its command is called: `zstd`, `gzip`, `lzop`.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Zstd => "zstd",
            Compression::Gzip => "gzip",
            Compression::Lzop => "lzop",
        }
    }

    /// The compressor whose magic bytes `prefix` (the first up to
    /// [`MAGIC_LEN`] bytes of an input) starts with; `None` for anything
    /// else, a VMA archive included.
    ///
    /// zstd: a frame (`28 b5 2f fd`) or a skippable frame (`5? 2a 4d 18`);
    /// gzip: `1f 8b`; lzop: its 9-byte magic.
    pub fn detect(prefix: &[u8]) -> Option<Compression> {
        match prefix {
            [0x28, 0xb5, 0x2f, 0xfd, ..] => Some(Compression::Zstd),
            [b0, 0x2a, 0x4d, 0x18, ..] if b0 & 0xf0 == 0x50 => Some(Compression::Zstd),
            [0x1f, 0x8b, ..] => Some(Compression::Gzip),
            p if p.starts_with(&lzop::MAGIC) => Some(Compression::Lzop),
            _ => None,
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A compressed stream that could not be decoded: cut short or corrupt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecompressError {
    /// Which compressor's format.
    pub compression: Compression,
    /// The stream ended inside a frame, member or block.
    pub truncated: bool,
    /// What the decoder said.
    pub detail: String,
    /// Compressed bytes read when it was found.
    pub compressed_offset: u64,
}

impl fmt::Display for DecompressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = if self.truncated {
            "compressed data is truncated"
        } else {
            "compressed data is corrupt"
        };
        write!(
            f,
            "{}: {what} ({}, after {} compressed bytes)",
            self.compression, self.detail, self.compressed_offset
        )
    }
}

impl std::error::Error for DecompressError {}

/// The [`DecompressError`] inside `err`, if it is one.
pub fn decompress_error(err: &io::Error) -> Option<&DecompressError> {
    err.get_ref()?.downcast_ref::<DecompressError>()
}

/// Marks an error of the compressed input itself (not of its content), so
/// the decoder thread can tell the two apart whatever the decoder does with it.
#[derive(Debug)]
struct RawInputError(io::Error);

impl fmt::Display for RawInputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for RawInputError {}

/// The compressed input, counting what was read and marking its errors.
struct Counting<R> {
    inner: R,
    count: Rc<Cell<u64>>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.inner.read(buf) {
                Ok(n) => {
                    self.count.set(self.count.get() + n as u64);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io::Error::new(e.kind(), RawInputError(e))),
            }
        }
    }
}

enum Chunk {
    /// A buffer and how many of its bytes are filled.
    Data(Vec<u8>, usize),
    End,
    Failed(Failure),
}

/// An error, kept so that every later read reports it again.
#[derive(Clone, Debug)]
enum Failure {
    Damaged(DecompressError),
    Io(io::ErrorKind, String),
}

impl Failure {
    fn to_io(&self) -> io::Error {
        match self {
            Failure::Damaged(d) => io::Error::new(io::ErrorKind::InvalidData, d.clone()),
            Failure::Io(kind, message) => io::Error::new(*kind, message.clone()),
        }
    }
}

/// Plain bytes of a compressed input, decoded on a thread of its own.
pub struct Decompressed {
    chunks: Receiver<Chunk>,
    recycle: SyncSender<Vec<u8>>,
    current: Vec<u8>,
    len: usize,
    pos: usize,
    end: Option<Option<Failure>>,
}

impl Decompressed {
    /// Starts decoding `raw` (whose first bytes are `prefix`, already read
    /// from it) as `compression` on a new thread.
    pub fn start(
        compression: Compression,
        prefix: Vec<u8>,
        raw: Box<dyn Read + Send>,
    ) -> io::Result<Decompressed> {
        let (chunk_tx, chunks) = mpsc::sync_channel(DEPTH);
        let (recycle, recycled) = mpsc::sync_channel(DEPTH + 2);
        std::thread::Builder::new()
            .name(format!("vma-{compression}"))
            .spawn(move || decode(compression, prefix, raw, chunk_tx, recycled))?;
        Ok(Decompressed {
            chunks,
            recycle,
            current: Vec::new(),
            len: 0,
            pos: 0,
            end: None,
        })
    }
}

impl Read for Decompressed {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.len {
            if let Some(end) = &self.end {
                return match end {
                    None => Ok(0),
                    Some(f) => Err(f.to_io()),
                };
            }
            match self.chunks.recv() {
                Ok(Chunk::Data(next, len)) => {
                    let old = std::mem::replace(&mut self.current, next);
                    if old.capacity() > 0 {
                        // A full recycling queue just drops the buffer.
                        if let Err(TrySendError::Disconnected(_)) = self.recycle.try_send(old) {}
                    }
                    self.len = len;
                    self.pos = 0;
                }
                Ok(Chunk::End) => self.end = Some(None),
                Ok(Chunk::Failed(f)) => self.end = Some(Some(f)),
                Err(_) => {
                    self.end = Some(Some(Failure::Io(
                        io::ErrorKind::Other,
                        "the decompressor thread stopped".into(),
                    )))
                }
            }
        }
        let n = buf.len().min(self.len - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// The decoder thread: fills buffers until the stream ends or fails, or the
/// reader hangs up.
fn decode(
    compression: Compression,
    prefix: Vec<u8>,
    raw: Box<dyn Read + Send>,
    chunks: SyncSender<Chunk>,
    recycled: Receiver<Vec<u8>>,
) {
    let count = Rc::new(Cell::new(0u64));
    let counting = Counting {
        inner: io::Cursor::new(prefix).chain(raw),
        count: count.clone(),
    };
    let decoder: io::Result<Box<dyn Read>> = match compression {
        Compression::Zstd => {
            zstd::stream::read::Decoder::new(counting).map(|d| Box::new(d) as Box<dyn Read>)
        }
        Compression::Gzip => Ok(Box::new(flate2::read::MultiGzDecoder::new(
            BufReader::with_capacity(256 * 1024, counting),
        ))),
        Compression::Lzop => Ok(Box::new(LzopReader::new(BufReader::with_capacity(
            256 * 1024,
            counting,
        )))),
    };
    let mut decoder = match decoder {
        Ok(d) => d,
        Err(e) => {
            let _ = chunks.send(Chunk::Failed(Failure::Io(e.kind(), e.to_string())));
            return;
        }
    };
    loop {
        let mut buf = recycled.try_recv().unwrap_or_else(|_| vec![0u8; CHUNK]);
        let mut filled = 0;
        let mut outcome = None;
        while filled < CHUNK {
            match decoder.read(&mut buf[filled..]) {
                Ok(0) => {
                    outcome = Some(Chunk::End);
                    break;
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    outcome = Some(Chunk::Failed(classify(compression, e, count.get())));
                    break;
                }
            }
        }
        if filled > 0 && chunks.send(Chunk::Data(buf, filled)).is_err() {
            return;
        }
        if let Some(last) = outcome {
            let _ = chunks.send(last);
            return;
        }
    }
}

/// An error of the decoder: the compressed input's own (I/O), or the
/// stream's content (damage).
fn classify(compression: Compression, e: io::Error, offset: u64) -> Failure {
    if let Some(raw) = e.get_ref().and_then(|r| r.downcast_ref::<RawInputError>()) {
        return Failure::Io(raw.0.kind(), raw.0.to_string());
    }
    let truncated = e.kind() == io::ErrorKind::UnexpectedEof;
    let detail = match e.to_string() {
        s if s.is_empty() => format!("{:?}", e.kind()),
        s => s,
    };
    Failure::Damaged(DecompressError {
        compression,
        truncated,
        detail,
        compressed_offset: offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(len: usize) -> Vec<u8> {
        let mut x = 7u32;
        (0..len)
            .map(|i| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                if i % 4 == 0 {
                    (x >> 16) as u8
                } else {
                    (i >> 12) as u8
                }
            })
            .collect()
    }

    fn run(compression: Compression, bytes: Vec<u8>) -> io::Result<Vec<u8>> {
        let mut d = Decompressed::start(compression, Vec::new(), Box::new(io::Cursor::new(bytes)))?;
        let mut out = Vec::new();
        d.read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn detects_by_magic() {
        assert_eq!(
            Compression::detect(&[0x28, 0xb5, 0x2f, 0xfd, 0]),
            Some(Compression::Zstd)
        );
        assert_eq!(
            Compression::detect(&[0x5e, 0x2a, 0x4d, 0x18]),
            Some(Compression::Zstd)
        );
        assert_eq!(
            Compression::detect(&[0x1f, 0x8b, 8]),
            Some(Compression::Gzip)
        );
        assert_eq!(Compression::detect(&lzop::MAGIC), Some(Compression::Lzop));
        assert_eq!(Compression::detect(&lzop::MAGIC[..8]), None);
        assert_eq!(Compression::detect(b"VMA\0\0\0\0\x01\0"), None);
        assert_eq!(Compression::detect(b""), None);
    }

    #[test]
    fn every_zstd_frame_and_gzip_member_is_read() {
        let data = sample(3 * CHUNK + 12345);
        let (a, b) = data.split_at(CHUNK + 7);
        let mut z = zstd::encode_all(a, 3).unwrap();
        z.extend(zstd::encode_all(b, 3).unwrap());
        assert!(run(Compression::Zstd, z).unwrap() == data);

        let mut g = Vec::new();
        for part in [a, b] {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            io::Write::write_all(&mut e, part).unwrap();
            g.extend(e.finish().unwrap());
        }
        assert!(run(Compression::Gzip, g).unwrap() == data);
    }

    #[test]
    fn cut_and_corrupt_streams_are_damage_naming_the_compressor() {
        let data = sample(500_000);
        let z = zstd::encode_all(&data[..], 3).unwrap();
        let e = run(Compression::Zstd, z[..z.len() / 2].to_vec()).unwrap_err();
        let d = decompress_error(&e).expect("a decompress error");
        assert_eq!(d.compression, Compression::Zstd);
        assert!(d.truncated, "{d}");
        assert!(
            e.to_string()
                .starts_with("zstd: compressed data is truncated ("),
            "{e}"
        );

        let mut g = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut g, &data).unwrap();
        let mut g = g.finish().unwrap();
        let n = g.len();
        g[n - 6] ^= 0xff; // the CRC-32 of the member
        let e = run(Compression::Gzip, g).unwrap_err();
        let d = decompress_error(&e).expect("a decompress error");
        assert_eq!((d.compression, d.truncated), (Compression::Gzip, false));
        assert!(
            e.to_string()
                .starts_with("gzip: compressed data is corrupt ("),
            "{e}"
        );
    }

    #[test]
    fn errors_of_the_input_itself_stay_io_errors() {
        struct Failing(usize);
        impl Read for Failing {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::new(io::ErrorKind::BrokenPipe, "device gone"));
                }
                let n = buf.len().min(self.0);
                buf[..n].fill(0);
                self.0 -= n;
                Ok(n)
            }
        }
        let mut d =
            Decompressed::start(Compression::Gzip, vec![0x1f, 0x8b], Box::new(Failing(0))).unwrap();
        let e = d.read(&mut [0u8; 10]).unwrap_err();
        assert!(decompress_error(&e).is_none());
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
        assert_eq!(e.to_string(), "device gone");
        // And again on the next read.
        assert_eq!(
            d.read(&mut [0u8; 10]).unwrap_err().to_string(),
            "device gone"
        );
    }
}
