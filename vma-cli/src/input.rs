//! Opening inputs: a path, or `-` for standard input; compressed or plain.
//!
//! The first bytes decide: a zstd, gzip or lzop stream is decoded on its own
//! thread ([`crate::decompress`]) and the caller reads plain bytes; anything
//! else (a VMA archive, or bytes the archive reader will refuse) is read as
//! it is, without a thread or a copy: a regular file is peeked at with
//! `pread` and then read directly; a pipe gets its peeked bytes handed back
//! in front of it.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;

use indicatif::ProgressBar;

use crate::bar::{set_total, BarReader};
use crate::decompress::{Compression, Decompressed, MAGIC_LEN};

/// An opened input and the name to use for it in messages.
pub struct Input {
    /// The name: the path as given, or `<stdin>` for `-`.
    pub name: String,
    compression: Option<Compression>,
    reader: Box<dyn Read + Send>,
}

impl Input {
    /// Opens `path`; `-` is standard input. A compressed input is decoded
    /// on a thread of its own; large reads of a plain one go straight to the
    /// file or pipe (the archive reader does its own buffering).
    pub fn open(path: &str) -> io::Result<Input> {
        Input::open_with_bar(path, None)
    }

    /// [`Input::open`], advancing `bar` (if any) by the bytes read from the
    /// file or pipe itself (for a compressed archive, its compressed bytes),
    /// with the file's size as the bar's total where it has one.
    pub fn open_with_bar(path: &str, bar: Option<&ProgressBar>) -> io::Result<Input> {
        let counted = |r: Box<dyn Read + Send>| -> Box<dyn Read + Send> {
            match bar {
                Some(b) => Box::new(BarReader::new(r, b.clone())),
                None => r,
            }
        };
        if path == "-" {
            return Input::from_reader("<stdin>", counted(Box::new(io::stdin())));
        }
        let file = File::open(path)?;
        let meta = file.metadata()?;
        if meta.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "is a directory",
            ));
        }
        if meta.is_file() {
            if let Some(b) = bar {
                set_total(b, Some(meta.len()));
            }
            let mut prefix = [0u8; MAGIC_LEN];
            let got = pread_up_to(&file, &mut prefix)?;
            return Ok(match Compression::detect(&prefix[..got]) {
                None => Input {
                    name: path.to_string(),
                    compression: None,
                    reader: counted(Box::new(file)),
                },
                Some(c) => Input {
                    name: path.to_string(),
                    compression: Some(c),
                    reader: Box::new(Decompressed::start(c, Vec::new(), counted(Box::new(file)))?),
                },
            });
        }
        Input::from_reader(path, counted(Box::new(file)))
    }

    /// Reads `raw` (a pipe, a device, any stream), named `name`, decoding
    /// it if it is compressed.
    pub fn from_reader(name: &str, mut raw: Box<dyn Read + Send>) -> io::Result<Input> {
        let mut prefix = [0u8; MAGIC_LEN];
        let got = vma_format::read_full(&mut raw, &mut prefix)?;
        let prefix = prefix[..got].to_vec();
        let compression = Compression::detect(&prefix);
        let reader: Box<dyn Read + Send> = match compression {
            None => Box::new(Prefixed {
                prefix,
                pos: 0,
                inner: raw,
            }),
            Some(c) => Box::new(Decompressed::start(c, prefix, raw)?),
        };
        Ok(Input {
            name: name.to_string(),
            compression,
            reader,
        })
    }

    /// The compressor whose output this input is, if any.
    pub fn compression(&self) -> Option<Compression> {
        self.compression
    }
}

impl Read for Input {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reader.read(buf)
    }
}

/// A stream with the bytes already read from it put back in front.
struct Prefixed {
    prefix: Vec<u8>,
    pos: usize,
    inner: Box<dyn Read + Send>,
}

impl Read for Prefixed {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos < self.prefix.len() {
            let n = buf.len().min(self.prefix.len() - self.pos);
            buf[..n].copy_from_slice(&self.prefix[self.pos..self.pos + n]);
            self.pos += n;
            return Ok(n);
        }
        self.inner.read(buf)
    }
}

/// Reads the start of `f` (from offset 0) until `buf` is full or the file
/// ends, retrying interrupted reads; returns the bytes read. Its position is
/// left alone.
pub fn pread_up_to(f: &File, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_bytes_pass_untouched_from_files_and_streams() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        let mut with_magic = b"VMA\0".to_vec();
        with_magic.extend_from_slice(&data);
        for bytes in [with_magic, data.clone(), b"VM".to_vec(), Vec::new()] {
            let mut input =
                Input::from_reader("s", Box::new(io::Cursor::new(bytes.clone()))).unwrap();
            assert_eq!(input.compression(), None);
            let mut out = Vec::new();
            input.read_to_end(&mut out).unwrap();
            assert!(out == bytes);

            let f = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(f.path(), &bytes).unwrap();
            let mut input = Input::open(f.path().to_str().unwrap()).unwrap();
            assert_eq!(input.compression(), None);
            let mut out = Vec::new();
            input.read_to_end(&mut out).unwrap();
            assert!(out == bytes);
        }
    }

    #[test]
    fn compressed_files_and_streams_are_decoded() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i / 300) as u8).collect();
        let z = zstd::encode_all(&data[..], 1).unwrap();
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), &z).unwrap();
        let mut input = Input::open(f.path().to_str().unwrap()).unwrap();
        assert_eq!(input.compression(), Some(Compression::Zstd));
        let mut out = Vec::new();
        input.read_to_end(&mut out).unwrap();
        assert!(out == data);

        let mut input = Input::from_reader("p", Box::new(io::Cursor::new(z))).unwrap();
        assert_eq!(input.compression(), Some(Compression::Zstd));
        let mut out = Vec::new();
        input.read_to_end(&mut out).unwrap();
        assert!(out == data);
    }
}
