//! Writing one device's clusters into a file or block device, at their
//! offsets: the images of an extract, and the targets of a restore map.
//!
//! Data blocks are written with `pwrite`. Zero blocks are left alone
//! (`write_zeros` off: a new sparse file, or a target that already reads as
//! zeros), or zeroed (`write_zeros` on): runs of zero blocks are gathered
//! across clusters and each run zeroed with one `fallocate` — first
//! `PUNCH_HOLE` (a hole in a file; on a block device the kernel's zero-out
//! that unmaps, as `BLKDISCARD` with zeroing guaranteed), then
//! `ZERO_RANGE` (on a block device the kernel's zero-out with its
//! writing fallback, as `BLKZEROOUT`), and where neither applies by writing
//! zeros.
//!
//! A write limit ([`Throttle`]) delays writes so that the bytes written
//! (data, and zeros where they are written as bytes) stay under a rate.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::rc::Rc;
use std::time::{Duration, Instant};

use rustix::fs::FallocateFlags;
use vma_format::{BlockMask, Cluster, BLOCKS_PER_CLUSTER, BLOCK_SIZE};

/// How one device is written.
pub struct Target {
    file: File,
    /// For messages: the path of the file or device.
    pub shown: String,
    /// The device's size.
    size: u64,
    /// RAM state: its size does not bound its clusters.
    vmstate: bool,
    write_zeros: bool,
    /// Gathered zero run not yet zeroed: [start, end).
    zero_run: Option<(u64, u64)>,
    zeroing: Zeroing,
    throttle: Option<Rc<RefCell<Throttle>>>,
    /// Bytes written since writeback was last started.
    dirty: u64,
    /// Highest byte written + 1.
    pub end: u64,
    /// `pwrite` calls made.
    pwrites: u64,
}

/// Writeback of what was written is started every this many bytes, so the
/// device writes while the archive is still being read (and decompressed)
/// instead of all at the final fsync; it also keeps dirty memory bounded.
pub const WRITEBACK_EVERY: u64 = 32 << 20;

/// The zeroing method that last worked (tried in this order).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Zeroing {
    PunchHole,
    ZeroRange,
    Write,
}

/// Zeros written as bytes when `fallocate` cannot zero a range.
static ZEROS: [u8; 1 << 16] = [0; 1 << 16];

impl Target {
    /// Writes a device of `size` bytes into `file` (named `shown`).
    pub fn new(file: File, shown: String, size: u64, vmstate: bool) -> Target {
        Target {
            file,
            shown,
            size,
            vmstate,
            write_zeros: false,
            zero_run: None,
            zeroing: Zeroing::PunchHole,
            throttle: None,
            dirty: 0,
            end: 0,
            pwrites: 0,
        }
    }

    /// Zero blocks are zeroed on the target (else left as they are).
    pub fn write_zeros(mut self, on: bool) -> Target {
        self.write_zeros = on;
        self
    }

    /// Writes are limited by `throttle` (shared by the targets of a group).
    pub fn throttled(mut self, throttle: Option<Rc<RefCell<Throttle>>>) -> Target {
        self.throttle = throttle;
        self
    }

    /// The file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The device's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// `pwrite` calls made so far (data runs, and zeros written as bytes).
    pub fn pwrites(&self) -> u64 {
        self.pwrites
    }

    /// Whether this is the RAM state.
    pub fn is_vmstate(&self) -> bool {
        self.vmstate
    }

    /// Writes one cluster.
    pub fn cluster(&mut self, c: &Cluster<'_>) -> io::Result<()> {
        self.clusters(c.data, std::slice::from_ref(c))
    }

    /// Writes clusters of this device that came in one extent, in slot
    /// order, each one's data a part of `data` (see
    /// [`ClusterSink::extent_clusters`](vma_format::ClusterSink::extent_clusters)):
    /// a run of data blocks that follow one another both on the device and
    /// in `data` — the stored blocks of adjacent clusters — is written with
    /// one `pwrite`.
    pub fn clusters(&mut self, data: &[u8], clusters: &[Cluster<'_>]) -> io::Result<()> {
        let base = data.as_ptr() as usize;
        // The run not yet written: device offset, start in `data`, length.
        let mut run: Option<(u64, usize, usize)> = None;
        for c in clusters {
            for (block, bytes) in c.runs() {
                let offset = c.offset() + (block * BLOCK_SIZE) as u64;
                let at = bytes.as_ptr() as usize - base;
                // The reader guarantees no block of a disk starts past its
                // end; the last block may straddle it, so clip. The vmstate
                // size does not bind its clusters: clip at it only a block
                // that straddles it.
                let len = if offset < self.size {
                    (self.size - offset).min(bytes.len() as u64)
                } else {
                    bytes.len() as u64
                } as usize;
                match &mut run {
                    Some((o, a, l)) if *o + *l as u64 == offset && *a + *l == at => *l += len,
                    _ => {
                        if let Some((o, a, l)) = run.take() {
                            self.write_run(&data[a..a + l], o)?;
                        }
                        run = Some((offset, at, len));
                    }
                }
                if len < bytes.len() {
                    // Clipped: nothing may join it.
                    let (o, a, l) = run.take().expect("just set");
                    self.write_run(&data[a..a + l], o)?;
                }
            }
            self.zero_gaps(c)?;
        }
        if let Some((o, a, l)) = run {
            self.write_run(&data[a..a + l], o)?;
        }
        Ok(())
    }

    fn write_run(&mut self, bytes: &[u8], offset: u64) -> io::Result<()> {
        self.pwrite(bytes, offset)?;
        self.end = self.end.max(offset + bytes.len() as u64);
        Ok(())
    }

    /// With `write_zeros`: gathers the zero blocks of `c` inside the device
    /// for zeroing.
    fn zero_gaps(&mut self, c: &Cluster<'_>) -> io::Result<()> {
        if self.write_zeros && c.mask != BlockMask::FULL && !self.vmstate {
            let allowed = BlockMask::in_device(c.cluster_num as u64, self.size);
            let mut i = 0;
            while i < BLOCKS_PER_CLUSTER {
                if !allowed.has(i) || c.mask.has(i) {
                    i += 1;
                    continue;
                }
                let first = i;
                while i < BLOCKS_PER_CLUSTER && allowed.has(i) && !c.mask.has(i) {
                    i += 1;
                }
                let start = c.offset() + (first * BLOCK_SIZE) as u64;
                let end = (c.offset() + (i * BLOCK_SIZE) as u64).min(self.size);
                self.zero(start, end)?;
            }
        }
        Ok(())
    }

    /// Zeroes what is gathered; call after the last cluster.
    pub fn flush_zeros(&mut self) -> io::Result<()> {
        if let Some((start, end)) = self.zero_run.take() {
            self.zero_now(start, end)?;
        }
        Ok(())
    }

    fn zero(&mut self, start: u64, end: u64) -> io::Result<()> {
        match &mut self.zero_run {
            Some((_, e)) if *e == start => *e = end,
            _ => {
                self.flush_zeros()?;
                self.zero_run = Some((start, end));
            }
        }
        Ok(())
    }

    fn zero_now(&mut self, start: u64, end: u64) -> io::Result<()> {
        let len = end - start;
        loop {
            let mode = match self.zeroing {
                Zeroing::PunchHole => FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                Zeroing::ZeroRange => FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE,
                Zeroing::Write => break,
            };
            match rustix::fs::fallocate(&self.file, mode, start, len) {
                Ok(()) => return Ok(()),
                // Not for this file system or device (or range): try the next way.
                Err(
                    rustix::io::Errno::OPNOTSUPP
                    | rustix::io::Errno::NOSYS
                    | rustix::io::Errno::INVAL,
                ) => {
                    self.zeroing = match self.zeroing {
                        Zeroing::PunchHole => Zeroing::ZeroRange,
                        _ => Zeroing::Write,
                    };
                }
                Err(e) => {
                    return Err(io::Error::new(
                        io::Error::from(e).kind(),
                        format!("{}: zeroing failed: {}", self.shown, io::Error::from(e)),
                    ))
                }
            }
        }
        let mut at = start;
        while at < end {
            let n = (end - at).min(ZEROS.len() as u64) as usize;
            self.pwrite(&ZEROS[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }

    fn pwrite(&mut self, bytes: &[u8], offset: u64) -> io::Result<()> {
        if let Some(t) = &self.throttle {
            let wait = t.borrow_mut().take(bytes.len() as u64, Instant::now());
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
        }
        self.file
            .write_all_at(bytes, offset)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.shown)))?;
        self.dirty += bytes.len() as u64;
        self.pwrites += 1;
        if self.dirty >= WRITEBACK_EVERY {
            self.dirty = 0;
            start_writeback(&self.file);
        }
        Ok(())
    }
}

/// Starts writing the file's dirty pages to the device without waiting for
/// them (`sync_file_range(SYNC_FILE_RANGE_WRITE)` over the whole file). Only
/// a hint: the final fsync makes the data durable, so a failure is ignored.
#[allow(unsafe_code)]
fn start_writeback(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain system call on a descriptor we own; no memory is passed.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// A write limit of `bps` bytes per second, as QEMU's throttling applies
/// it to a restore's writes: bytes may run ahead of the rate by at most
/// [`Throttle::BURST`] of a second's worth.
#[derive(Debug)]
pub struct Throttle {
    bps: u64,
    start: Option<Instant>,
    bytes: u64,
}

impl Throttle {
    /// How far ahead of the rate writes may run, in seconds' worth of it.
    pub const BURST: f64 = 0.1;

    /// A limit of `bps` bytes per second (`bps` > 0).
    pub fn new(bps: u64) -> Throttle {
        Throttle {
            bps: bps.max(1),
            start: None,
            bytes: 0,
        }
    }

    /// The limit.
    pub fn bps(&self) -> u64 {
        self.bps
    }

    /// Lowers the limit to `bps` if that is lower (targets of one group
    /// share the smallest limit given for any of them).
    pub fn limit_to(&mut self, bps: u64) {
        self.bps = self.bps.min(bps.max(1));
    }

    /// Accounts `n` bytes about to be written at `now`; returns how long to
    /// wait first so that the total stays within the rate (plus the burst).
    pub fn take(&mut self, n: u64, now: Instant) -> Duration {
        let start = *self.start.get_or_insert(now);
        self.bytes += n;
        let due = self.bytes as f64 / self.bps as f64 - Self::BURST;
        let elapsed = now.duration_since(start).as_secs_f64();
        if due > elapsed {
            Duration::from_secs_f64(due - elapsed)
        } else {
            Duration::ZERO
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three clusters of one extent, packed one after another as the
    /// reader hands them over: adjacent stored blocks, across clusters, go
    /// out with one pwrite each run; the image is byte-exact.
    #[test]
    fn adjacent_runs_of_an_extent_are_one_pwrite() {
        use vma_format::CLUSTER_SIZE;
        let size = 3 * CLUSTER_SIZE as u64 - 1000;
        // Cluster 0: blocks 14, 15; cluster 1: all; cluster 2: blocks 0, 1,
        // then 3 (a gap), then the last block, which straddles the end.
        let masks = [0xc000u16, 0xffff, 0b1000_0000_0000_1011];
        let mut data = Vec::new();
        for (n, m) in masks.iter().enumerate() {
            for b in 0..BlockMask(*m).count() {
                data.extend(std::iter::repeat_n((n * 16 + b) as u8 + 1, BLOCK_SIZE));
            }
        }
        let mut clusters = Vec::new();
        let mut at = 0;
        for (n, m) in masks.iter().enumerate() {
            let len = BlockMask(*m).data_len();
            clusters.push(Cluster {
                dev_id: 1,
                cluster_num: n as u32,
                mask: BlockMask(*m),
                data: &data[at..at + len],
            });
            at += len;
        }
        let file = tempfile::tempfile().unwrap();
        file.set_len(size).unwrap();
        let mut t = Target::new(file.try_clone().unwrap(), "t".into(), size, false);
        t.clusters(&data, &clusters).unwrap();
        // 14..=15 + 16 + 0..=1 of cluster 2: one run; block 3; block 15 (clipped).
        assert_eq!(t.pwrites(), 3);
        let mut want = vec![0u8; size as usize];
        for c in &clusters {
            let mut full = vec![0u8; CLUSTER_SIZE];
            c.expand_into(&mut full);
            let start = c.offset() as usize;
            let end = (start + CLUSTER_SIZE).min(want.len());
            want[start..end].copy_from_slice(&full[..end - start]);
        }
        let mut got = vec![0u8; size as usize];
        file.read_exact_at(&mut got, 0).unwrap();
        assert!(got == want, "image differs");
        assert_eq!(t.end, size);
        // One by one: a pwrite per run of each cluster.
        let mut t = Target::new(file, "t".into(), size, false);
        for c in &clusters {
            t.cluster(c).unwrap();
        }
        assert_eq!(t.pwrites(), 5);
    }

    #[test]
    fn throttle_delays_to_the_rate() {
        let t0 = Instant::now();
        let mut t = Throttle::new(1_000_000);
        // The first 100 kB are the burst: no wait.
        assert_eq!(t.take(100_000, t0), Duration::ZERO);
        // 1 MB in total at t0: 0.9 s must pass first.
        let w = t.take(900_000, t0);
        assert!((w.as_secs_f64() - 0.9).abs() < 1e-6, "{w:?}");
        // Two seconds later 2 MB more are due at 2.9 s: wait 0.9 s.
        let w = t.take(2_000_000, t0 + Duration::from_secs(2));
        assert!((w.as_secs_f64() - 0.9).abs() < 1e-6, "{w:?}");
        // Much later, nothing to wait for.
        assert_eq!(t.take(1, t0 + Duration::from_secs(100)), Duration::ZERO);
    }
}
