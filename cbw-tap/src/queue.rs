//! The bounded queue of captured clusters between the copiers (background
//! reader, guest writes) and the stream writer.
//!
//! Cheap on the hot path: a captured cluster lives in one 64 KiB buffer
//! from the capture (read straight into it, packed in place) to the stream
//! writer, and the buffer comes back for the next cluster without being
//! cleared. Copiers and the writer move clusters in batches, one lock each,
//! and each side has a condition variable of its own, signalled only when
//! someone waits on it.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nbd_server::sync::{lock, wait, wait_timeout};
use vma_format::{BlockMask, Cluster, CLUSTER_SIZE};

/// What one queued cluster costs besides its buffer, so that a queue of
/// zero clusters (no buffer) is bounded too.
pub const ITEM_OVERHEAD: usize = 64;

/// Spare buffers kept beyond what a full queue holds: the clusters a
/// reader batch, the stream writer and a few guest copies have in hand.
const SPARE_SLACK: usize = 16;

/// The share of the capacity kept for copy-before-write: the background
/// reader stops at `capacity - capacity / GUEST_RESERVE`.
pub const GUEST_RESERVE: usize = 4;

/// Longest a queued item waits for the consumer to be woken when the queue
/// holds less than its wake-up threshold.
const LINGER: Duration = Duration::from_millis(20);

/// One captured cluster: its place, its mask, and a buffer whose first
/// `mask.data_len()` bytes are the stored blocks (the rest is left over
/// from earlier use), with the checksum of its cluster-stream record.
/// Zero clusters have no buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Captured {
    /// Device id (1-based).
    pub dev_id: u8,
    /// Cluster number in the device.
    pub cluster_num: u32,
    /// Stored 4 KiB blocks.
    pub mask: BlockMask,
    buf: Vec<u8>,
    record_crc: u32,
}

impl Captured {
    /// A cluster whose stored blocks are the first `mask.data_len()` bytes
    /// of `buf` (a buffer from [`CaptureQueue::take_buffer`], or empty for
    /// an empty mask). Its record checksum is computed here, by the thread
    /// that captured it, while the data it just read and packed is still
    /// in the CPU's cache (the stream writer would read it from memory
    /// again).
    ///
    /// # Panics
    /// If `buf` is shorter than the mask says.
    pub fn new(dev_id: u8, cluster_num: u32, mask: BlockMask, buf: Vec<u8>) -> Captured {
        assert!(buf.len() >= mask.data_len(), "buffer shorter than its mask");
        let record_crc = vma_format::stream::cluster_record_crc(&Cluster {
            dev_id,
            cluster_num,
            mask,
            data: &buf[..mask.data_len()],
        });
        Captured {
            dev_id,
            cluster_num,
            mask,
            buf,
            record_crc,
        }
    }

    /// The checksum of its cluster-stream record
    /// ([`vma_format::stream::cluster_record_crc`]).
    pub fn record_crc(&self) -> u32 {
        self.record_crc
    }

    /// An all-zero cluster (nothing stored, no buffer).
    pub fn zero(dev_id: u8, cluster_num: u32) -> Captured {
        Captured::new(dev_id, cluster_num, BlockMask::EMPTY, Vec::new())
    }

    /// The stored blocks.
    pub fn data(&self) -> &[u8] {
        &self.buf[..self.mask.data_len()]
    }

    /// As a borrowed [`Cluster`].
    pub fn as_cluster(&self) -> Cluster<'_> {
        Cluster {
            dev_id: self.dev_id,
            cluster_num: self.cluster_num,
            mask: self.mask,
            data: self.data(),
        }
    }

    /// Its buffer, for [`CaptureQueue::recycle`].
    pub fn into_buffer(self) -> Vec<u8> {
        self.buf
    }

    /// What it costs in the queue: its buffer (a whole cluster whatever
    /// the mask: that is the memory it holds) plus [`ITEM_OVERHEAD`].
    fn cost(&self) -> usize {
        if self.mask.count() == 0 {
            ITEM_OVERHEAD
        } else {
            CLUSTER_SIZE + ITEM_OVERHEAD
        }
    }
}

/// Why a push did not happen.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// The deadline passed while the queue stayed full.
    #[error("the queue stayed full until the deadline")]
    Timeout,
    /// The backup ended (aborted, or the queue was closed).
    #[error("the backup is over")]
    Closed,
    /// Writing the fleecing file failed.
    #[error("writing the fleecing file failed: {0}")]
    Spill(String),
}

/// Why [`CaptureQueue::pop_batch`] could not deliver a cluster.
#[derive(Debug, thiserror::Error)]
pub enum PopError {
    /// A spilled cluster could not be read back.
    #[error("reading the fleecing file failed: {0}")]
    Unspill(#[source] io::Error),
}

/// Where a pushed item went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Into memory.
    Memory,
    /// Into the fleecing file, because memory was full.
    Spilled,
}

/// A cluster waiting in the fleecing file.
struct Spilled {
    dev_id: u8,
    cluster_num: u32,
    mask: BlockMask,
    offset: u64,
}

struct Inner {
    items: VecDeque<Captured>,
    bytes: usize,
    closed: bool,
    aborted: bool,
    free: Vec<Vec<u8>>,
    spilled: VecDeque<Spilled>,
    /// End of the data written to the fleecing file so far.
    spill_end: u64,
    /// Spill writes in progress (reserved, not yet listed).
    spilling: usize,
    /// Copiers waiting for room.
    producers_waiting: usize,
    /// Whether the consumer waits for items.
    consumer_waiting: bool,
}

/// A FIFO of captured clusters bounded by bytes (`capacity`): a push waits
/// while the queue holds `capacity` bytes or more — an item is always
/// admitted into an empty queue, so any capacity makes progress.
///
/// The background reader ([`push_all`](Self::push_all)) may fill only
/// the first three quarters; the last quarter ([`GUEST_RESERVE`]) is kept
/// for copy-before-write ([`push`](Self::push)). At full speed the reader
/// keeps the queue as full as it may, so without the reserve nearly every
/// guest copy would find it full and wait for the consumer to take a batch;
/// with it, a guest copy waits only when guest copies alone have filled
/// the reserve faster than the consumer takes them.
///
/// The consumer is woken when the queue holds half its capacity (at most
/// 1 MiB), or after 20 ms at the latest: a trickle of copy-before-write
/// clusters then costs one wake-up of the stream writer (and of the
/// processes behind it) per batch, not one per guest write. It takes what
/// is queued in batches of up to that threshold.
///
/// With a fleecing file, a push that may spill does not wait when memory
/// is full: the cluster is written to the file and read back when the
/// consumer gets to it (one extra write and read, but the guest does not
/// stall). The file grows by the clusters spilled; it is not reused.
pub struct CaptureQueue {
    inner: Mutex<Inner>,
    /// The consumer waits here.
    not_empty: Condvar,
    /// Copiers wait here.
    not_full: Condvar,
    capacity: usize,
    /// What the background reader may fill ([`push_all`](Self::push_all)):
    /// the rest is kept for copy-before-write ([`GUEST_RESERVE`]).
    reader_capacity: usize,
    wake_bytes: usize,
    max_free: usize,
    fleece: Option<File>,
}

impl CaptureQueue {
    /// An empty queue holding up to `capacity` bytes in memory, spilling
    /// to `fleece` (an empty file open for reading and writing) if given.
    pub fn new(capacity: usize, fleece: Option<File>) -> CaptureQueue {
        CaptureQueue {
            inner: Mutex::new(Inner {
                items: VecDeque::new(),
                bytes: 0,
                closed: false,
                aborted: false,
                free: Vec::new(),
                spilled: VecDeque::new(),
                spill_end: 0,
                spilling: 0,
                producers_waiting: 0,
                consumer_waiting: false,
            }),
            not_empty: Condvar::new(),
            not_full: Condvar::new(),
            capacity,
            reader_capacity: capacity - capacity / GUEST_RESERVE,
            wake_bytes: (capacity / 2).clamp(1, 1 << 20),
            max_free: capacity / CLUSTER_SIZE + SPARE_SLACK,
            fleece,
        }
    }

    /// A whole-cluster buffer to capture into, reused from one the writer
    /// returned when possible: no allocation on the hot path once warm,
    /// and no clearing (the capture overwrites what it uses).
    pub fn take_buffer(&self) -> Vec<u8> {
        lock(&self.inner)
            .free
            .pop()
            .unwrap_or_else(|| vec![0; CLUSTER_SIZE])
    }

    /// `n` buffers at once (one lock).
    pub fn take_buffers(&self, n: usize, out: &mut Vec<Vec<u8>>) {
        let mut inner = lock(&self.inner);
        while out.len() < n {
            match inner.free.pop() {
                Some(b) => out.push(b),
                None => break,
            }
        }
        drop(inner);
        while out.len() < n {
            out.push(vec![0; CLUSTER_SIZE]);
        }
    }

    /// Returns buffers for reuse (those of zero clusters are ignored).
    pub fn recycle(&self, bufs: impl IntoIterator<Item = Vec<u8>>) {
        let mut inner = lock(&self.inner);
        for b in bufs {
            if b.len() == CLUSTER_SIZE && inner.free.len() < self.max_free {
                inner.free.push(b);
            }
        }
    }

    /// Appends `item`, waiting while the queue is full: until `deadline`
    /// (`None`: as long as it takes) or until the queue is aborted or closed
    /// — unless `may_spill` and there is a fleecing file: then a full queue
    /// sends the item to the file at once. The item's buffer is recycled
    /// on failure and after a spill.
    pub fn push(
        &self,
        item: Captured,
        deadline: Option<Instant>,
        may_spill: bool,
    ) -> Result<Pushed, PushError> {
        let spill = may_spill && self.fleece.is_some();
        let inner = lock(&self.inner);
        let inner = match self.wait_for_room(inner, item.cost(), self.capacity, deadline, spill) {
            Ok(inner) => inner,
            Err((inner, e)) => {
                if let (PushError::Timeout, true, Some(file)) = (&e, may_spill, &self.fleece) {
                    return self.spill(inner, file, item);
                }
                drop(inner);
                self.recycle([item.into_buffer()]);
                return Err(e);
            }
        };
        self.append(inner, item);
        Ok(Pushed::Memory)
    }

    /// The background reader's push: appends every item of `items` in
    /// order (draining it), waiting for room below the reader's share (see
    /// [`GUEST_RESERVE`]) as long as it takes, with one lock for as many as
    /// fit. On
    /// failure (the queue was aborted or closed) the buffers of the items
    /// not queued are recycled.
    pub fn push_all(&self, items: &mut Vec<Captured>) -> Result<(), PushError> {
        let mut rest = items.drain(..);
        let mut inner = lock(&self.inner);
        while let Some(item) = rest.next() {
            inner = match self.wait_for_room(inner, item.cost(), self.reader_capacity, None, false)
            {
                Ok(inner) => inner,
                Err((inner, e)) => {
                    drop(inner);
                    self.recycle(std::iter::once(item).chain(rest).map(Captured::into_buffer));
                    return Err(e);
                }
            };
            inner.bytes += item.cost();
            inner.items.push_back(item);
        }
        self.wake_consumer(inner);
        Ok(())
    }

    /// Waits until `cost` more bytes fit (or the queue is empty), the
    /// queue ends (`Closed`) or `deadline` passes (`Timeout`; at once if
    /// the queue is full and the caller would rather `spill`).
    #[allow(clippy::type_complexity)]
    fn wait_for_room<'a>(
        &'a self,
        mut inner: MutexGuard<'a, Inner>,
        cost: usize,
        limit: usize,
        deadline: Option<Instant>,
        spill: bool,
    ) -> Result<MutexGuard<'a, Inner>, (MutexGuard<'a, Inner>, PushError)> {
        loop {
            if inner.aborted || inner.closed {
                return Err((inner, PushError::Closed));
            }
            if inner.items.is_empty() || inner.bytes + cost <= limit {
                return Ok(inner);
            }
            if spill {
                return Err((inner, PushError::Timeout));
            }
            // Full: whatever the threshold, the consumer must run now.
            if inner.consumer_waiting {
                self.not_empty.notify_one();
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Err((inner, PushError::Timeout));
            }
            inner.producers_waiting += 1;
            inner = match deadline {
                None => wait(&self.not_full, inner),
                Some(d) => wait_timeout(&self.not_full, inner, d - now).0,
            };
            inner.producers_waiting -= 1;
        }
    }

    fn append(&self, mut inner: MutexGuard<'_, Inner>, item: Captured) {
        inner.bytes += item.cost();
        inner.items.push_back(item);
        self.wake_consumer(inner);
    }

    /// Wakes the consumer if it waits and enough is queued.
    fn wake_consumer(&self, inner: MutexGuard<'_, Inner>) {
        let wake = inner.consumer_waiting && inner.bytes >= self.wake_bytes;
        drop(inner);
        if wake {
            self.not_empty.notify_one();
        }
    }

    /// Writes `item` to the fleecing file: the space is reserved under the
    /// lock, written without it, then listed for the consumer.
    fn spill(
        &self,
        mut inner: MutexGuard<'_, Inner>,
        file: &File,
        item: Captured,
    ) -> Result<Pushed, PushError> {
        let offset = inner.spill_end;
        inner.spill_end += item.data().len() as u64;
        inner.spilling += 1;
        drop(inner);
        let written = file.write_all_at(item.data(), offset);
        let mut inner = lock(&self.inner);
        inner.spilling -= 1;
        let result = match written {
            Err(e) => Err(PushError::Spill(e.to_string())),
            Ok(()) if inner.aborted => Err(PushError::Closed),
            Ok(()) => {
                inner.spilled.push_back(Spilled {
                    dev_id: item.dev_id,
                    cluster_num: item.cluster_num,
                    mask: item.mask,
                    offset,
                });
                Ok(Pushed::Spilled)
            }
        };
        let wake = inner.consumer_waiting;
        drop(inner);
        if wake {
            self.not_empty.notify_one();
        }
        self.recycle([item.into_buffer()]);
        result
    }

    /// Moves the oldest items in memory (up to the wake-up threshold, at
    /// least one) into `out`, else the oldest spilled one, waiting for
    /// some. `Ok(false)` once the queue is closed and drained, or at once
    /// when it is aborted (queued items are dropped); an error if a spilled
    /// item cannot be read back.
    pub fn pop_batch(&self, out: &mut Vec<Captured>) -> Result<bool, PopError> {
        let mut inner = lock(&self.inner);
        loop {
            if inner.aborted {
                return Ok(false);
            }
            if !inner.items.is_empty() {
                let mut taken = 0;
                while let Some(item) = inner.items.front() {
                    let c = item.cost();
                    if taken > 0 && taken + c > self.wake_bytes {
                        break;
                    }
                    taken += c;
                    out.extend(inner.items.pop_front());
                }
                inner.bytes -= taken;
                let wake = inner.producers_waiting > 0;
                drop(inner);
                if wake {
                    // Several copiers may wait for room.
                    self.not_full.notify_all();
                }
                return Ok(true);
            }
            if let Some(sp) = inner.spilled.pop_front() {
                drop(inner);
                out.push(self.unspill(sp)?);
                return Ok(true);
            }
            if inner.closed && inner.spilling == 0 {
                return Ok(false);
            }
            inner.consumer_waiting = true;
            inner = wait_timeout(&self.not_empty, inner, LINGER).0;
            inner.consumer_waiting = false;
        }
    }

    fn unspill(&self, sp: Spilled) -> Result<Captured, PopError> {
        let mut buf = self.take_buffer();
        let file = self.fleece.as_ref().expect("spilled without a file");
        match file.read_exact_at(&mut buf[..sp.mask.data_len()], sp.offset) {
            Ok(()) => Ok(Captured::new(sp.dev_id, sp.cluster_num, sp.mask, buf)),
            Err(e) => Err(PopError::Unspill(e)),
        }
    }

    /// No more pushes: [`pop_batch`](Self::pop_batch) returns what is
    /// queued, then `Ok(false)`.
    pub fn close(&self) {
        lock(&self.inner).closed = true;
        self.not_empty.notify_all();
        self.not_full.notify_all();
    }

    /// Drops everything queued and wakes every waiter: pushes fail with
    /// [`PushError::Closed`], pops return `Ok(false)`.
    pub fn abort(&self) {
        let mut inner = lock(&self.inner);
        inner.aborted = true;
        inner.items.clear();
        inner.spilled.clear();
        inner.bytes = 0;
        drop(inner);
        self.not_empty.notify_all();
        self.not_full.notify_all();
    }

    /// Bytes queued (buffers plus per-item overhead).
    pub fn bytes(&self) -> usize {
        lock(&self.inner).bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn item(n: u32, blocks: usize) -> Captured {
        let mut buf = vec![0; CLUSTER_SIZE];
        buf[..blocks * 4096].fill(1);
        Captured::new(1, n, BlockMask(((1u32 << blocks) - 1) as u16), buf)
    }

    fn pop(q: &CaptureQueue) -> Option<Captured> {
        let mut out = Vec::new();
        match q.pop_batch(&mut out).unwrap() {
            true => {
                assert_eq!(out.len(), 1, "one item expected");
                out.pop()
            }
            false => None,
        }
    }

    #[test]
    fn bounded_by_bytes_with_timeout() {
        let q = CaptureQueue::new(100_000, None);
        q.push(item(0, 2), None, true).unwrap(); // admitted into an empty queue
        let soon = Instant::now() + Duration::from_millis(30);
        assert_eq!(
            q.push(item(1, 1), Some(soon), true),
            Err(PushError::Timeout)
        );
        assert_eq!(pop(&q).unwrap().cluster_num, 0);
        q.push(item(2, 1), Some(soon), false).unwrap();
        q.close();
        assert_eq!(pop(&q).unwrap().cluster_num, 2);
        assert!(pop(&q).is_none());
        assert_eq!(q.push(item(3, 0), None, false), Err(PushError::Closed));
    }

    #[test]
    fn the_reader_leaves_a_quarter_for_guest_copies() {
        // Room for 8 data clusters: the reader's push stops after 6, guest
        // copies may still add 2, and the third waits.
        let q = Arc::new(CaptureQueue::new(8 * (CLUSTER_SIZE + ITEM_OVERHEAD), None));
        let q2 = Arc::clone(&q);
        let reader = std::thread::spawn(move || {
            let mut items: Vec<Captured> = (0..7).map(|n| item(n, 16)).collect();
            q2.push_all(&mut items)
        });
        let six = 6 * (CLUSTER_SIZE + ITEM_OVERHEAD);
        while q.bytes() < six {
            std::thread::yield_now();
        }
        let soon = || Some(Instant::now() + Duration::from_millis(30));
        assert_eq!(q.push(item(100, 16), soon(), false), Ok(Pushed::Memory));
        assert_eq!(q.push(item(101, 16), soon(), false), Ok(Pushed::Memory));
        assert_eq!(
            q.push(item(102, 16), soon(), false),
            Err(PushError::Timeout)
        );
        // The reader's seventh is still waiting: it may not use the reserve.
        assert_eq!(q.bytes(), six + 2 * (CLUSTER_SIZE + ITEM_OVERHEAD));
        assert!(!reader.is_finished());
        // One batch taken (half the capacity): the reader's seventh fits
        // below its share again, after the guest copies.
        let mut out = Vec::new();
        assert!(q.pop_batch(&mut out).unwrap());
        reader.join().unwrap().unwrap();
        q.close();
        while q.pop_batch(&mut out).unwrap() {}
        let order: Vec<u32> = out.iter().map(|c| c.cluster_num).collect();
        assert_eq!(order, [0, 1, 2, 3, 4, 5, 100, 101, 6]);
    }

    #[test]
    fn batches_and_spare_buffers() {
        let q = CaptureQueue::new(4 << 20, None);
        let mut items: Vec<Captured> = (0..40).map(|n| item(n, 16)).collect();
        q.push_all(&mut items).unwrap();
        assert!(items.is_empty());
        q.close();
        let mut out = Vec::new();
        let mut got = Vec::new();
        while q.pop_batch(&mut out).unwrap() {
            // At most the wake-up threshold (1 MiB) per batch.
            assert!(out.len() <= 16, "{}", out.len());
            got.extend(out.iter().map(|c| c.cluster_num));
            q.recycle(out.drain(..).map(Captured::into_buffer));
        }
        assert_eq!(got, (0..40).collect::<Vec<_>>());
        // Reused buffers keep their old bytes: nothing is cleared.
        assert_eq!(q.take_buffer()[0], 1);
    }

    #[test]
    fn abort_wakes_a_blocked_push() {
        let q = Arc::new(CaptureQueue::new(1, None));
        q.push(item(0, 1), None, false).unwrap();
        let q2 = Arc::clone(&q);
        let t = std::thread::spawn(move || q2.push(item(1, 1), None, false));
        std::thread::sleep(Duration::from_millis(20));
        q.abort();
        assert_eq!(t.join().unwrap(), Err(PushError::Closed));
        assert!(pop(&q).is_none());
        assert_eq!(q.bytes(), 0);
    }

    #[test]
    fn spills_to_the_fleecing_file_when_full() {
        let f = tempfile::tempfile().unwrap();
        let q = CaptureQueue::new(1, Some(f));
        assert_eq!(q.push(item(0, 1), None, true), Ok(Pushed::Memory));
        let mut two = item(1, 2);
        two.buf[5000] = 9;
        assert_eq!(q.push(two.clone(), None, true), Ok(Pushed::Spilled));
        assert_eq!(q.push(item(2, 0), None, true), Ok(Pushed::Spilled));
        // Without may_spill it would wait.
        let soon = Instant::now() + Duration::from_millis(10);
        assert_eq!(
            q.push(item(3, 1), Some(soon), false),
            Err(PushError::Timeout)
        );
        q.close();
        assert_eq!(pop(&q).unwrap().cluster_num, 0);
        let back = pop(&q).unwrap();
        assert_eq!(back.as_cluster(), two.as_cluster());
        assert_eq!(pop(&q).unwrap().as_cluster(), item(2, 0).as_cluster());
        assert!(pop(&q).is_none());
    }
}
