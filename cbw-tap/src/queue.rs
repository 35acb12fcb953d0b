//! The bounded queue of captured clusters between the copiers (background
//! reader, guest writes) and the stream writer.

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vma_format::{BlockMask, ClusterBuf, CLUSTER_SIZE};

/// What one queued cluster costs besides its data, so that a queue of zero
/// clusters (no data) is bounded too.
pub const ITEM_OVERHEAD: usize = 64;

/// Most spare cluster buffers kept for reuse.
const MAX_FREE: usize = 64;

/// Longest a queued item waits for the consumer to be woken when the queue
/// holds less than its wake-up threshold.
const LINGER: Duration = Duration::from_millis(20);

/// Why a push did not happen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PushError {
    /// The deadline passed while the queue stayed full.
    Timeout,
    /// The backup ended (aborted, or the queue was closed).
    Closed,
    /// Writing the fleecing file failed (the message says why).
    Spill(String),
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
    items: VecDeque<ClusterBuf>,
    bytes: usize,
    closed: bool,
    aborted: bool,
    free: Vec<Vec<u8>>,
    spilled: VecDeque<Spilled>,
    /// End of the data written to the fleecing file so far.
    spill_end: u64,
    /// Spill writes in progress (reserved, not yet listed).
    spilling: usize,
}

/// A FIFO of captured clusters bounded by bytes (`capacity`): a push waits
/// while the queue holds `capacity` bytes or more — an item is always
/// admitted into an empty queue, so any capacity makes progress.
///
/// The consumer is woken when the queue holds half its capacity (at most
/// 1 MiB), or after 20 ms at the latest: a trickle of copy-before-write
/// clusters then costs one wake-up of the stream writer (and of the
/// processes behind it) per batch, not one per guest write.
///
/// With a fleecing file, a push that may spill does not wait when memory
/// is full: the cluster is written to the file and read back when the
/// consumer gets to it (one extra write and read, but the guest does not
/// stall). The file grows by the clusters spilled; it is not reused.
pub struct CaptureQueue {
    inner: Mutex<Inner>,
    not_empty: Condvar,
    not_full: Condvar,
    capacity: usize,
    wake_bytes: usize,
    fleece: Option<File>,
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn cost(c: &ClusterBuf) -> usize {
    c.data.len() + ITEM_OVERHEAD
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
            }),
            not_empty: Condvar::new(),
            not_full: Condvar::new(),
            capacity,
            wake_bytes: (capacity / 2).clamp(1, 1 << 20),
            fleece,
        }
    }

    /// A 64 KiB buffer for packing a cluster, reused from one the writer
    /// returned when possible (no allocation on the hot path once warm).
    pub fn take_buffer(&self) -> Vec<u8> {
        let mut buf = lock(&self.inner).free.pop().unwrap_or_default();
        buf.resize(CLUSTER_SIZE, 0);
        buf
    }

    /// Returns a cluster's buffer for reuse.
    pub fn recycle(&self, mut buf: Vec<u8>) {
        if buf.capacity() < CLUSTER_SIZE {
            return;
        }
        buf.clear();
        let mut inner = lock(&self.inner);
        if inner.free.len() < MAX_FREE {
            inner.free.push(buf);
        }
    }

    /// Appends `item`, waiting while the queue is full: until `deadline`
    /// (`None`: as long as it takes) or until the queue is aborted or closed
    /// — unless `may_spill` and there is a fleecing file: then a full queue
    /// sends the item to the file at once. The item's buffer is recycled
    /// on failure and after a spill.
    pub fn push(
        &self,
        item: ClusterBuf,
        deadline: Option<Instant>,
        may_spill: bool,
    ) -> Result<Pushed, PushError> {
        let c = cost(&item);
        let mut inner = lock(&self.inner);
        loop {
            if inner.aborted || inner.closed {
                drop(inner);
                self.recycle(item.data);
                return Err(PushError::Closed);
            }
            if inner.items.is_empty() || inner.bytes + c <= self.capacity {
                break;
            }
            if let (true, Some(file)) = (may_spill, &self.fleece) {
                return self.spill(inner, file, item);
            }
            // Full: whatever the threshold, the consumer must run now.
            self.not_empty.notify_one();
            inner = match deadline {
                None => self.not_full.wait(inner).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        drop(inner);
                        self.recycle(item.data);
                        return Err(PushError::Timeout);
                    }
                    self.not_full
                        .wait_timeout(inner, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
        inner.bytes += c;
        inner.items.push_back(item);
        let wake = inner.bytes >= self.wake_bytes;
        drop(inner);
        if wake {
            self.not_empty.notify_one();
        }
        Ok(Pushed::Memory)
    }

    /// Writes `item` to the fleecing file: the space is reserved under the
    /// lock, written without it, then listed for the consumer.
    fn spill(
        &self,
        mut inner: MutexGuard<'_, Inner>,
        file: &File,
        item: ClusterBuf,
    ) -> Result<Pushed, PushError> {
        let offset = inner.spill_end;
        inner.spill_end += item.data.len() as u64;
        inner.spilling += 1;
        drop(inner);
        let written = file.write_all_at(&item.data, offset);
        let mut inner = lock(&self.inner);
        inner.spilling -= 1;
        let result = match written {
            Err(e) => Err(PushError::Spill(format!(
                "writing the fleecing file failed: {e}"
            ))),
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
        drop(inner);
        self.not_empty.notify_one();
        self.recycle(item.data);
        result
    }

    /// The oldest item in memory, else the oldest spilled one, waiting for
    /// one; `None` once the queue is closed and drained, or at once when it
    /// is aborted (queued items are dropped). `Some(Err)` if a spilled item
    /// cannot be read back.
    pub fn pop(&self) -> Option<Result<ClusterBuf, String>> {
        let mut inner = lock(&self.inner);
        loop {
            if inner.aborted {
                return None;
            }
            if let Some(item) = inner.items.pop_front() {
                inner.bytes -= cost(&item);
                drop(inner);
                // Several copiers may wait for room.
                self.not_full.notify_all();
                return Some(Ok(item));
            }
            if let Some(sp) = inner.spilled.pop_front() {
                drop(inner);
                return Some(self.unspill(sp));
            }
            if inner.closed && inner.spilling == 0 {
                return None;
            }
            inner = self
                .not_empty
                .wait_timeout(inner, LINGER)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn unspill(&self, sp: Spilled) -> Result<ClusterBuf, String> {
        let mut data = self.take_buffer();
        data.truncate(sp.mask.data_len());
        let file = self.fleece.as_ref().expect("spilled without a file");
        match file.read_exact_at(&mut data, sp.offset) {
            Ok(()) => Ok(ClusterBuf {
                dev_id: sp.dev_id,
                cluster_num: sp.cluster_num,
                mask: sp.mask,
                data,
            }),
            Err(e) => Err(format!("reading the fleecing file failed: {e}")),
        }
    }

    /// No more pushes: [`pop`](Self::pop) returns what is queued, then `None`.
    pub fn close(&self) {
        lock(&self.inner).closed = true;
        self.not_empty.notify_all();
        self.not_full.notify_all();
    }

    /// Drops everything queued and wakes every waiter: pushes fail with
    /// [`PushError::Closed`], pops return `None`.
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

    /// Bytes queued (data plus per-item overhead).
    pub fn bytes(&self) -> usize {
        lock(&self.inner).bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;
    use vma_format::BlockMask;

    fn item(n: u32, blocks: usize) -> ClusterBuf {
        ClusterBuf {
            dev_id: 1,
            cluster_num: n,
            mask: BlockMask(((1u32 << blocks) - 1) as u16),
            data: vec![1; blocks * 4096],
        }
    }

    #[test]
    fn bounded_by_bytes_with_timeout() {
        let q = CaptureQueue::new(10_000, None);
        q.push(item(0, 2), None, true).unwrap(); // admitted into an empty queue
        let soon = Instant::now() + Duration::from_millis(30);
        assert_eq!(
            q.push(item(1, 1), Some(soon), true),
            Err(PushError::Timeout)
        );
        assert_eq!(q.pop().unwrap().unwrap().cluster_num, 0);
        q.push(item(2, 1), Some(soon), false).unwrap();
        q.close();
        assert_eq!(q.pop().unwrap().unwrap().cluster_num, 2);
        assert!(q.pop().is_none());
        assert_eq!(q.push(item(3, 0), None, false), Err(PushError::Closed));
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
        assert!(q.pop().is_none());
        assert_eq!(q.bytes(), 0);
    }

    #[test]
    fn spills_to_the_fleecing_file_when_full() {
        let f = tempfile::tempfile().unwrap();
        let q = CaptureQueue::new(1, Some(f));
        assert_eq!(q.push(item(0, 1), None, true), Ok(Pushed::Memory));
        let mut two = item(1, 2);
        two.data[5000] = 9;
        assert_eq!(q.push(two.clone(), None, true), Ok(Pushed::Spilled));
        assert_eq!(q.push(item(2, 0), None, true), Ok(Pushed::Spilled));
        // Without may_spill it would wait.
        let soon = Instant::now() + Duration::from_millis(10);
        assert_eq!(
            q.push(item(3, 1), Some(soon), false),
            Err(PushError::Timeout)
        );
        q.close();
        assert_eq!(q.pop().unwrap().unwrap().cluster_num, 0);
        assert_eq!(q.pop().unwrap().unwrap(), two);
        assert_eq!(q.pop().unwrap().unwrap(), item(2, 0));
        assert!(q.pop().is_none());
    }
}
