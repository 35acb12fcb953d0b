//! The bounded queue of captured clusters between the copiers (background
//! reader, guest writes) and the stream writer.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vma_format::{ClusterBuf, CLUSTER_SIZE};

/// What one queued cluster costs besides its data, so that a queue of zero
/// clusters (no data) is bounded too.
pub const ITEM_OVERHEAD: usize = 64;

/// Most spare cluster buffers kept for reuse.
const MAX_FREE: usize = 64;

/// Longest a queued item waits for the consumer to be woken when the queue
/// holds less than its wake-up threshold.
const LINGER: Duration = Duration::from_millis(20);

/// Why a push did not happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushError {
    /// The deadline passed while the queue stayed full.
    Timeout,
    /// The backup ended (aborted, or the queue was closed).
    Closed,
}

struct Inner {
    items: VecDeque<ClusterBuf>,
    bytes: usize,
    closed: bool,
    aborted: bool,
    free: Vec<Vec<u8>>,
}

/// A FIFO of captured clusters bounded by bytes (`capacity`): a push waits
/// while the queue holds `capacity` bytes or more — an item is always
/// admitted into an empty queue, so any capacity makes progress.
///
/// The consumer is woken when the queue holds half its capacity (at most
/// 1 MiB), or after 20 ms at the latest: a trickle of copy-before-write
/// clusters then costs one wake-up of the stream writer (and of the
/// processes behind it) per batch, not one per guest write.
pub struct CaptureQueue {
    inner: Mutex<Inner>,
    not_empty: Condvar,
    not_full: Condvar,
    capacity: usize,
    wake_bytes: usize,
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn cost(c: &ClusterBuf) -> usize {
    c.data.len() + ITEM_OVERHEAD
}

impl CaptureQueue {
    /// An empty queue holding up to `capacity` bytes.
    pub fn new(capacity: usize) -> CaptureQueue {
        CaptureQueue {
            inner: Mutex::new(Inner {
                items: VecDeque::new(),
                bytes: 0,
                closed: false,
                aborted: false,
                free: Vec::new(),
            }),
            not_empty: Condvar::new(),
            not_full: Condvar::new(),
            capacity,
            wake_bytes: (capacity / 2).clamp(1, 1 << 20),
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
    /// (`None`: as long as it takes) or until the queue is aborted or closed.
    /// On failure the item's buffer is recycled.
    pub fn push(&self, item: ClusterBuf, deadline: Option<Instant>) -> Result<(), PushError> {
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
        Ok(())
    }

    /// The oldest item, waiting for one; `None` once the queue is closed and
    /// drained, or at once when it is aborted (queued items are dropped).
    pub fn pop(&self) -> Option<ClusterBuf> {
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
                return Some(item);
            }
            if inner.closed {
                return None;
            }
            inner = self
                .not_empty
                .wait_timeout(inner, LINGER)
                .unwrap_or_else(|e| e.into_inner())
                .0;
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
        let q = CaptureQueue::new(10_000);
        q.push(item(0, 2), None).unwrap(); // admitted into an empty queue
        let soon = Instant::now() + Duration::from_millis(30);
        assert_eq!(q.push(item(1, 1), Some(soon)), Err(PushError::Timeout));
        assert_eq!(q.pop().unwrap().cluster_num, 0);
        q.push(item(2, 1), Some(soon)).unwrap();
        q.close();
        assert_eq!(q.pop().unwrap().cluster_num, 2);
        assert!(q.pop().is_none());
        assert_eq!(q.push(item(3, 0), None), Err(PushError::Closed));
    }

    #[test]
    fn abort_wakes_a_blocked_push() {
        let q = Arc::new(CaptureQueue::new(1));
        q.push(item(0, 1), None).unwrap();
        let q2 = Arc::clone(&q);
        let t = std::thread::spawn(move || q2.push(item(1, 1), None));
        std::thread::sleep(Duration::from_millis(20));
        q.abort();
        assert_eq!(t.join().unwrap(), Err(PushError::Closed));
        assert!(q.pop().is_none());
        assert_eq!(q.bytes(), 0);
    }
}
