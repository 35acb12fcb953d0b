//! The lzop container (`.lzo` files, as vzdump's `--compress lzo` writes
//! them), read as a stream; the LZO1X blocks inside are decoded by the
//! `lzo1x` crate.
//!
//! The container, in our words (all integers big-endian):
//!
//! ```text
//! magic       89 4c 5a 4f 00 0d 0a 1a 0a
//! version     u16   (we read 0x0900 and later)
//! lib_version u16
//! needed      u16   only if version >= 0x0940: version needed to extract
//! method      u8    1, 2 (LZO1X-1, -1(15)) or 3 (LZO1X-999): all LZO1X
//! level       u8    only if version >= 0x0940
//! flags       u32
//! filter      u32   only if flags & 0x800 (a filter we do not apply: refused)
//! mode        u32
//! mtime       u32, and a second u32 if version >= 0x0940
//! name        u8 length, then that many bytes
//! checksum    u32   Adler-32 (CRC-32 if flags & 0x1000) of every header
//!                   byte from `version` to the end of the name
//! extra field only if flags & 0x40: u32 length, bytes, u32 checksum
//! blocks      u32 uncompressed length (0 ends the stream; at most 64 MiB),
//!             u32 compressed length (at most the uncompressed one; equal
//!             means the block is stored),
//!             u32 Adler-32 of the uncompressed data if flags & 0x1,
//!             u32 CRC-32 of it if flags & 0x100,
//!             and, for a compressed block only, u32 Adler-32 / CRC-32 of the
//!             compressed bytes if flags & 0x2 / 0x200;
//!             then the block's bytes
//! ```
//!
//! Several containers may follow each other (`cat a.lzo b.lzo`); anything
//! else after an end marker is an error. Every checksum present is checked;
//! every malformed field is an error naming it, of kind
//! [`io::ErrorKind::InvalidData`] (or [`io::ErrorKind::UnexpectedEof`] when
//! the input ends early).

use std::io::{self, Read};

/// The 9 bytes every lzop container starts with.
pub const MAGIC: [u8; 9] = [0x89, 0x4c, 0x5a, 0x4f, 0x00, 0x0d, 0x0a, 0x1a, 0x0a];

/// lzop's largest block (its `MAX_BLOCK_SIZE`): nothing bigger is ever
/// allocated.
pub const MAX_BLOCK_SIZE: usize = 64 * 1024 * 1024;

const F_ADLER32_D: u32 = 0x0001;
const F_ADLER32_C: u32 = 0x0002;
const F_H_EXTRA_FIELD: u32 = 0x0040;
const F_CRC32_D: u32 = 0x0100;
const F_CRC32_C: u32 = 0x0200;
const F_H_FILTER: u32 = 0x0800;
const F_H_CRC32: u32 = 0x1000;

/// Largest extra field we accept: lzop itself writes none.
const MAX_EXTRA_FIELD: u32 = 64 * 1024;

/// A lzop container over `R`, read as the bytes it holds.
pub struct LzopReader<R> {
    inner: R,
    /// Flags of the container being read; `None` before its header (or
    /// after its end marker).
    flags: Option<u32>,
    /// At least one container was read completely.
    seen_one: bool,
    /// The current block's decoded bytes and how far they were read.
    block: Vec<u8>,
    pos: usize,
    /// Compressed bytes of the current block.
    packed: Vec<u8>,
    done: bool,
}

impl<R: Read> LzopReader<R> {
    /// Reads the container from `inner` (its header is read on the first read).
    pub fn new(inner: R) -> LzopReader<R> {
        LzopReader {
            inner,
            flags: None,
            seen_one: false,
            block: Vec::new(),
            pos: 0,
            packed: Vec::new(),
            done: false,
        }
    }

    /// Reads the next header (after the magic's first byte decides one is
    /// there); false at the end of the input after a complete container.
    fn next_header(&mut self) -> io::Result<bool> {
        let mut magic = [0u8; 9];
        let got = vma_format::read_full(&mut self.inner, &mut magic)?;
        if got == 0 && self.seen_one {
            return Ok(false);
        }
        if got < magic.len() {
            return Err(eof(if self.seen_one {
                "trailing bytes after the end marker"
            } else {
                "header cut short"
            }));
        }
        if magic != MAGIC {
            return Err(bad(if self.seen_one {
                "trailing data after the end marker"
            } else {
                "not an lzop file (wrong magic)"
            }));
        }
        // Everything from `version` to the end of the name is checksummed.
        let mut header = Vec::with_capacity(64);
        let take = |r: &mut R, n: usize, header: &mut Vec<u8>| -> io::Result<()> {
            let start = header.len();
            header.resize(start + n, 0);
            r.read_exact(&mut header[start..])
                .map_err(|e| cut(e, "header cut short"))
        };
        take(&mut self.inner, 4, &mut header)?;
        let version = u16::from_be_bytes([header[0], header[1]]);
        if version < 0x0900 {
            return Err(bad(format!("unsupported lzop version {version:#06x}")));
        }
        let new_format = version >= 0x0940;
        if new_format {
            take(&mut self.inner, 2, &mut header)?;
        }
        let at = header.len();
        take(&mut self.inner, 1, &mut header)?;
        let method = header[at];
        if !(1..=3).contains(&method) {
            return Err(bad(format!(
                "compression method {method} is not LZO1X (not supported)"
            )));
        }
        if new_format {
            take(&mut self.inner, 1, &mut header)?;
        }
        let at = header.len();
        take(&mut self.inner, 4, &mut header)?;
        let flags = be32(&header[at..]);
        if flags & F_H_FILTER != 0 {
            take(&mut self.inner, 4, &mut header)?;
            return Err(bad("the data is filtered (lzop --filter): not supported"));
        }
        // mode, mtime (and its high half).
        take(
            &mut self.inner,
            if new_format { 12 } else { 8 },
            &mut header,
        )?;
        let at = header.len();
        take(&mut self.inner, 1, &mut header)?;
        let name_len = header[at] as usize;
        take(&mut self.inner, name_len, &mut header)?;
        // The header and its extra field are checked with CRC-32 or Adler-32,
        // as the flags say.
        let checksum = |bytes: &[u8]| {
            if flags & F_H_CRC32 != 0 {
                crc32fast::hash(bytes)
            } else {
                adler2::adler32_slice(bytes)
            }
        };
        let stored = self.read_u32("header cut short")?;
        if stored != checksum(&header) {
            return Err(bad("header checksum mismatch"));
        }
        if flags & F_H_EXTRA_FIELD != 0 {
            let len = self.read_u32("header cut short")?;
            if len > MAX_EXTRA_FIELD {
                return Err(bad(format!("extra field of {len} bytes")));
            }
            let mut extra = vec![0u8; len as usize];
            self.inner
                .read_exact(&mut extra)
                .map_err(|e| cut(e, "header cut short"))?;
            let stored = self.read_u32("header cut short")?;
            if stored != checksum(&extra) {
                return Err(bad("extra field checksum mismatch"));
            }
        }
        self.flags = Some(flags);
        Ok(true)
    }

    /// Reads and decodes the next block into `self.block`; false at an end
    /// marker.
    fn next_block(&mut self, flags: u32) -> io::Result<bool> {
        let dst_len = self.read_u32("block cut short")? as usize;
        if dst_len == 0 {
            return Ok(false);
        }
        if dst_len > MAX_BLOCK_SIZE {
            return Err(bad(format!(
                "block of {dst_len} bytes (lzop's limit is {MAX_BLOCK_SIZE})"
            )));
        }
        let src_len = self.read_u32("block cut short")? as usize;
        if src_len == 0 || src_len > dst_len {
            return Err(bad(format!(
                "block of {dst_len} bytes stored in {src_len} bytes"
            )));
        }
        let data_sums = BlockSums::read(
            &mut self.inner,
            flags & F_ADLER32_D != 0,
            flags & F_CRC32_D != 0,
        )?;
        let compressed = src_len < dst_len;
        // A stored block has no checksums of its compressed bytes.
        let packed_sums = BlockSums::read(
            &mut self.inner,
            compressed && flags & F_ADLER32_C != 0,
            compressed && flags & F_CRC32_C != 0,
        )?;
        self.block.resize(dst_len, 0);
        if compressed {
            self.packed.resize(src_len, 0);
            self.inner
                .read_exact(&mut self.packed)
                .map_err(|e| cut(e, "block cut short"))?;
            if !packed_sums.holds_for(&self.packed) {
                return Err(bad("checksum of compressed block mismatch"));
            }
            lzo1x::decompress(&self.packed, &mut self.block)
                .map_err(|e| bad(format!("LZO1X data is corrupt ({e})")))?;
        } else {
            self.inner
                .read_exact(&mut self.block)
                .map_err(|e| cut(e, "block cut short"))?;
        }
        if !data_sums.holds_for(&self.block) {
            return Err(bad("checksum of block mismatch"));
        }
        self.pos = 0;
        Ok(true)
    }

    fn read_u32(&mut self, what: &str) -> io::Result<u32> {
        read_u32(&mut self.inner, what)
    }
}

/// The checksums a block header stores of one of its byte ranges (the
/// decoded data, or the compressed bytes): an Adler-32, a CRC-32, both or
/// none, as the container's flags say, in that order.
struct BlockSums {
    adler: Option<u32>,
    crc: Option<u32>,
}

impl BlockSums {
    /// Reads the checksums present (`adler`, `crc`: whether each is).
    fn read(r: &mut impl Read, adler: bool, crc: bool) -> io::Result<BlockSums> {
        let mut one = |present: bool| present.then(|| read_u32(r, "block cut short")).transpose();
        Ok(BlockSums {
            adler: one(adler)?,
            crc: one(crc)?,
        })
    }

    /// Whether every checksum present is that of `bytes`.
    fn holds_for(&self, bytes: &[u8]) -> bool {
        self.adler.is_none_or(|c| c == adler2::adler32_slice(bytes))
            && self.crc.is_none_or(|c| c == crc32fast::hash(bytes))
    }
}

fn read_u32(r: &mut impl Read, what: &str) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b).map_err(|e| cut(e, what))?;
    Ok(u32::from_be_bytes(b))
}

impl<R: Read> Read for LzopReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.block.len() {
            if self.done || buf.is_empty() {
                return Ok(0);
            }
            let flags = match self.flags {
                Some(flags) => flags,
                None => {
                    if !self.next_header()? {
                        self.done = true;
                        return Ok(0);
                    }
                    self.flags.expect("set by next_header")
                }
            };
            if !self.next_block(flags)? {
                self.flags = None;
                self.seen_one = true;
                self.block.clear();
                self.pos = 0;
            }
        }
        let n = buf.len().min(self.block.len() - self.pos);
        buf[..n].copy_from_slice(&self.block[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

fn eof(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, what.to_string())
}

/// `read_exact` ran out of input: say what was cut; other errors pass.
fn cut(e: io::Error, what: &str) -> io::Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        eof(what)
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a container the way lzop lays one out, with `flags`, the data
    /// cut into blocks of `block` bytes.
    pub(crate) fn container(data: &[u8], block: usize, flags: u32, version: u16) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        let mut h = Vec::new();
        h.extend_from_slice(&version.to_be_bytes());
        h.extend_from_slice(&0x2080u16.to_be_bytes());
        if version >= 0x0940 {
            h.extend_from_slice(&0x0940u16.to_be_bytes());
        }
        h.push(1);
        if version >= 0x0940 {
            h.push(5);
        }
        h.extend_from_slice(&flags.to_be_bytes());
        h.extend_from_slice(&0o100644u32.to_be_bytes());
        h.extend_from_slice(&1_700_000_000u32.to_be_bytes());
        if version >= 0x0940 {
            h.extend_from_slice(&0u32.to_be_bytes());
        }
        h.push(5);
        h.extend_from_slice(b"a.vma");
        let sum = if flags & F_H_CRC32 != 0 {
            crc32fast::hash(&h)
        } else {
            adler2::adler32_slice(&h)
        };
        out.extend_from_slice(&h);
        out.extend_from_slice(&sum.to_be_bytes());
        for chunk in data.chunks(block) {
            let packed = lzo1x::compress(chunk, lzo1x::CompressLevel::default());
            let stored = packed.len() >= chunk.len();
            let body: &[u8] = if stored { chunk } else { &packed };
            out.extend_from_slice(&(chunk.len() as u32).to_be_bytes());
            out.extend_from_slice(&(body.len() as u32).to_be_bytes());
            if flags & F_ADLER32_D != 0 {
                out.extend_from_slice(&adler2::adler32_slice(chunk).to_be_bytes());
            }
            if flags & F_CRC32_D != 0 {
                out.extend_from_slice(&crc32fast::hash(chunk).to_be_bytes());
            }
            if !stored && flags & F_ADLER32_C != 0 {
                out.extend_from_slice(&adler2::adler32_slice(body).to_be_bytes());
            }
            if !stored && flags & F_CRC32_C != 0 {
                out.extend_from_slice(&crc32fast::hash(body).to_be_bytes());
            }
            out.extend_from_slice(body);
        }
        out.extend_from_slice(&0u32.to_be_bytes());
        out
    }

    fn sample() -> Vec<u8> {
        // Compressible runs, random-looking bytes (stored blocks) and zeros.
        let mut data = Vec::new();
        let mut x = 12345u32;
        for i in 0..300_000u32 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            data.push(if i % 3 == 0 {
                (x >> 16) as u8
            } else {
                (i / 1000) as u8
            });
        }
        data.extend((0..70_000u32).map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 16) as u8
        }));
        data.extend(std::iter::repeat_n(0u8, 100_000));
        data
    }

    fn decode(bytes: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        LzopReader::new(bytes).read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn every_flag_combination_and_both_header_versions() {
        let data = sample();
        for flags in [
            0,
            F_ADLER32_D,
            F_ADLER32_D | F_ADLER32_C,
            F_CRC32_D | F_CRC32_C | F_H_CRC32,
            F_ADLER32_D | F_CRC32_D | F_ADLER32_C | F_CRC32_C,
        ] {
            for version in [0x0910u16, 0x1040] {
                for block in [256 * 1024, 70_000, 4096] {
                    let c = container(&data, block, flags, version);
                    assert!(
                        decode(&c).unwrap() == data,
                        "flags {flags:#x} version {version:#x} block {block}"
                    );
                }
            }
        }
    }

    #[test]
    fn concatenated_containers_and_empty_data() {
        let data = sample();
        let mut two = container(&data[..1000], 256, F_ADLER32_D, 0x1040);
        two.extend(container(&data[1000..], 65536, F_CRC32_D, 0x1040));
        assert!(decode(&two).unwrap() == data);
        assert!(decode(&container(&[], 4096, F_ADLER32_D, 0x1040))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn damage_is_reported() {
        let data = sample();
        let good = container(&data, 65536, F_ADLER32_D | F_ADLER32_C, 0x1040);
        let err = |b: &[u8]| {
            let e = decode(b).unwrap_err();
            (e.kind(), e.to_string())
        };
        // Every cut is an early end, none reads as complete.
        for cut_at in [0, 5, 9, 20, 40, good.len() / 2, good.len() - 1] {
            if cut_at == 0 {
                continue;
            }
            let (kind, _) = err(&good[..cut_at]);
            assert_eq!(kind, io::ErrorKind::UnexpectedEof, "cut at {cut_at}");
        }
        assert_eq!(
            err(&good[..good.len() - 4]).1,
            "block cut short",
            "a missing end marker"
        );
        let mut b = good.clone();
        b[0] ^= 1;
        assert_eq!(err(&b).1, "not an lzop file (wrong magic)");
        let mut b = good.clone();
        b[12] ^= 1; // lib_version: covered by the header checksum
        assert_eq!(err(&b).1, "header checksum mismatch");
        let mut b = good.clone();
        let n = b.len();
        b[n / 2] ^= 0x40; // inside some block's data
        assert_eq!(err(&b).0, io::ErrorKind::InvalidData);
        let mut b = good.clone();
        b.extend_from_slice(b"junk");
        assert_eq!(err(&b).1, "trailing bytes after the end marker");
        let mut b = good;
        b.extend_from_slice(b"more junk here");
        assert_eq!(err(&b).1, "trailing data after the end marker");
    }

    #[test]
    fn each_block_checksum_is_checked() {
        // One block each: "abc" is stored (no checksums of compressed
        // bytes), 4096 equal bytes are compressed.
        let compressible = [7u8; 4096];
        for (data, flags, at, what) in [
            (
                &b"abc"[..],
                F_ADLER32_D | F_CRC32_D,
                0,
                "checksum of block mismatch",
            ),
            (
                &b"abc"[..],
                F_ADLER32_D | F_CRC32_D,
                4,
                "checksum of block mismatch",
            ),
            (&b"abc"[..], F_CRC32_D, 0, "checksum of block mismatch"),
            (
                &compressible[..],
                F_ADLER32_C | F_CRC32_C,
                0,
                "checksum of compressed block mismatch",
            ),
            (
                &compressible[..],
                F_ADLER32_C | F_CRC32_C,
                4,
                "checksum of compressed block mismatch",
            ),
            (
                &compressible[..],
                F_ADLER32_D | F_CRC32_C,
                4,
                "checksum of compressed block mismatch",
            ),
            (
                &compressible[..],
                F_ADLER32_D | F_CRC32_C,
                0,
                "checksum of block mismatch",
            ),
        ] {
            let good = container(data, 4096, flags, 0x1040);
            assert!(decode(&good).unwrap() == data);
            // The block's checksums follow the header (the container of no
            // data, but its end marker) and the two lengths.
            let sums = container(&[], 4096, flags, 0x1040).len() - 4 + 8;
            let mut bad = good.clone();
            bad[sums + at] ^= 1;
            let e = decode(&bad).unwrap_err();
            assert_eq!(
                (e.kind(), e.to_string()),
                (io::ErrorKind::InvalidData, what.to_string()),
                "flags {flags:#x}, checksum at +{at}"
            );
        }
    }

    #[test]
    fn refuses_oversized_blocks_and_filters_without_allocating() {
        let mut c = container(b"abc", 4096, 0, 0x1040);
        // The first block's length field follows the header: make it huge.
        let header_len = c.len() - (4 + 4 + 3) - 4;
        c[header_len..header_len + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        let e = decode(&c).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "block of {} bytes (lzop's limit is {MAX_BLOCK_SIZE})",
                u32::MAX
            )
        );
        let c = container(b"abc", 4096, F_H_FILTER, 0x1040);
        assert_eq!(
            decode(&c).unwrap_err().to_string(),
            "the data is filtered (lzop --filter): not supported"
        );
    }
}
