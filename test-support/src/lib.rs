//! What the test crates of the workspace share: deterministic pseudo-random
//! numbers, bytes and shuffles, the same for a seed on every run and
//! machine; archives written with the library's writer; a raw NBD client
//! handshake. A dev-dependency only: nothing here is for production code.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use vma_format::{HeaderBuilder, Writer, WriterOptions};

/// Writes an archive with header `header` and the clusters
/// `(device id, cluster number, raw bytes)` in the order given, with or
/// without data checksums, through the library's [`Writer`]. Panics on any
/// error: the callers build valid archives.
pub fn write_archive(
    header: &HeaderBuilder,
    checksums: bool,
    clusters: impl IntoIterator<Item = (u8, u32, Vec<u8>)>,
) -> Vec<u8> {
    let mut w = Writer::new(
        Vec::new(),
        header,
        WriterOptions {
            data_checksums: checksums,
        },
    )
    .unwrap();
    for (dev, n, raw) in clusters {
        w.write_raw(dev, n, &raw).unwrap();
    }
    w.finish().unwrap()
}

/// Speaks raw NBD to the server at `sock`: fixed newstyle, NBD_OPT_GO for
/// export `name`, no structured replies. Returns the socket in transmission
/// phase, with `timeout` as its read timeout (which only keeps a broken
/// build from hanging the test run). Panics if the server refuses.
pub fn nbd_connect(sock: &Path, name: &str, timeout: Duration) -> UnixStream {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[..16], b"NBDMAGICIHAVEOPT");
    s.write_all(&3u32.to_be_bytes()).unwrap(); // FIXED_NEWSTYLE | NO_ZEROES
    let mut opt = Vec::new();
    opt.extend_from_slice(b"IHAVEOPT");
    opt.extend_from_slice(&7u32.to_be_bytes()); // GO
    opt.extend_from_slice(&((4 + name.len() + 2) as u32).to_be_bytes());
    opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
    opt.extend_from_slice(name.as_bytes());
    opt.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&opt).unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut body = vec![0u8; len as usize];
        s.read_exact(&mut body).unwrap();
        if kind == 1 {
            return s; // ACK
        }
        assert!(kind < 0x8000_0000, "GO refused: {kind:#x}");
    }
}

/// xorshift64*: a seeded generator of `u64`s.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// The generator for `seed` (any value, 0 included).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next number.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number below `n` (not 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

/// Shuffles `items` (Fisher–Yates driven by xorshift64 from `seed | 1`):
/// the same order for the same seed and length.
pub fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut state = seed | 1;
    for i in (1..items.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        items.swap(i, (state % (i as u64 + 1)) as usize);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        assert_eq!(a.bytes(100), b.bytes(100));
        assert_ne!(Rng::new(7).next(), Rng::new(8).next());
        assert!((0..1000).all(|_| a.below(10) < 10));
        let mut v: Vec<u32> = (0..50).collect();
        let mut w = v.clone();
        shuffle(&mut v, 3);
        shuffle(&mut w, 3);
        assert_eq!(v, w);
        assert_ne!(v, (0..50).collect::<Vec<_>>());
        v.sort();
        assert_eq!(v, (0..50).collect::<Vec<_>>());
    }
}
