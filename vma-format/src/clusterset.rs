//! Which clusters of a device are present: the one tracker the archive
//! reader, the cluster-stream reader and the writer share.
//!
//! # Why not a bitmap, or a roaring bitmap
//!
//! Archives and streams come from anywhere, and their headers may claim
//! devices of 2^32 clusters (256 TiB). Memory must follow the clusters that
//! actually arrived, and arrive they do at up to 59 per 512-byte extent
//! header: 100 MB of input can name 11.5 million clusters, each of them
//! alone (every second cluster of 254 devices). A bitmap page per touched
//! region costs kilobytes per such cluster; roaring's containers (one per
//! 2^16 values, each with its own allocation) cost some 60 bytes each when
//! they hold one value — 700 MB for 100 MB of input. Runs stored as plain
//! `(start, end)` pairs cost 16 bytes each.
//!
//! # The structure
//!
//! A set of cluster numbers is kept as sorted runs `start..end`, stored in
//! *leaves* of at most [`MAX_RUNS`] runs, each leaf a byte string of
//! LEB128 varints: per run, `gap << 1 | (len > 1)` (`gap`: distance from the
//! end of the previous run, or from the leaf's key for its first), then
//! `len - 2` if `len > 1`. A run of any length costs 1 to 10 bytes, so a full
//! device is a few bytes, and a lone cluster costs what its distance to its
//! neighbour needs: at most 5 bytes, 3 or 4 when 100 MB of input spreads 11.5
//! million of them over 254 devices. Leaves are kept, exactly sized, in a
//! `BTreeMap` by key: every leaf holds clusters from its key up to the next
//! leaf's key.
//!
//! The leaf being worked on is kept decoded (the *hot* leaf), so clusters
//! arriving in order — the normal case — extend its last run in place, in a
//! few nanoseconds; a cluster elsewhere costs decoding one leaf (at most
//! [`MAX_RUNS`] runs) and encoding another. A hot leaf with more than
//! [`MAX_RUNS`] runs is split in two.

use std::collections::BTreeMap;
use std::ops::Range;

/// Most runs a leaf holds; a hot leaf with more is split in two halves.
pub const MAX_RUNS: usize = 128;

/// A run of present clusters, `start..end`, never empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    start: u64,
    end: u64,
}

/// A set of cluster numbers of one device, with memory proportional to the
/// runs of clusters present (see the module documentation).
#[derive(Clone, Debug)]
pub struct ClusterSet {
    clusters: u64,
    count: u64,
    /// Encoded leaves by key; the hot leaf's entry is stale while it is hot.
    leaves: BTreeMap<u64, Box<[u8]>>,
    /// Key of the hot leaf, and the next leaf's key (`u64::MAX` for none).
    hot_key: u64,
    hot_next: u64,
    /// The hot leaf's runs, sorted, neither overlapping nor adjacent.
    hot: Vec<Run>,
    /// Whether `hot` differs from its encoded leaf.
    dirty: bool,
}

impl Default for ClusterSet {
    fn default() -> Self {
        ClusterSet::new(0)
    }
}

impl ClusterSet {
    /// An empty set for a device of `clusters` clusters. Costs nothing more
    /// for a huge device than for a small one.
    pub fn new(clusters: u64) -> ClusterSet {
        let mut leaves = BTreeMap::new();
        leaves.insert(0, Box::default());
        ClusterSet {
            clusters,
            count: 0,
            leaves,
            hot_key: 0,
            hot_next: u64::MAX,
            hot: Vec::new(),
            dirty: false,
        }
    }

    /// Clusters of the device.
    pub fn clusters(&self) -> u64 {
        self.clusters
    }

    /// Clusters recorded so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Clusters not recorded.
    pub fn missing_count(&self) -> u64 {
        self.clusters - self.count
    }

    /// Bytes of heap this set holds, about: its leaves, their map entries
    /// and the hot leaf. For tests and benchmarks that bound memory.
    pub fn heap_bytes(&self) -> usize {
        // A BTreeMap entry costs its key and value and about as much again
        // in node slack and edges; each leaf allocation has malloc's header.
        const ENTRY: usize = 2 * (8 + 16);
        const MALLOC: usize = 16;
        let leaves: usize = self
            .leaves
            .values()
            .map(|l| if l.is_empty() { 0 } else { l.len() + MALLOC })
            .sum();
        leaves + self.leaves.len() * ENTRY + self.hot.capacity() * std::mem::size_of::<Run>()
    }

    /// Whether cluster `n` has been recorded.
    pub fn contains(&self, n: u64) -> bool {
        if n >= self.hot_key && n < self.hot_next {
            let i = self.hot.partition_point(|r| r.end <= n);
            return i < self.hot.len() && self.hot[i].start <= n;
        }
        let (&key, leaf) = self.leaves.range(..=n).next_back().expect("leaf 0");
        for r in decode(key, leaf) {
            if r.start > n {
                return false;
            }
            if n < r.end {
                return true;
            }
        }
        false
    }

    /// Records cluster `n` (which must be below [`clusters`](Self::clusters));
    /// returns false if it was recorded already.
    pub fn insert(&mut self, n: u64) -> bool {
        debug_assert!(n < self.clusters);
        self.insert_range(n..n + 1) == 1
    }

    /// Records every cluster of `range` (which must lie below
    /// [`clusters`](Self::clusters)); returns how many were new.
    pub fn insert_range(&mut self, range: Range<u64>) -> u64 {
        debug_assert!(range.end <= self.clusters || range.is_empty());
        let mut start = range.start;
        let mut added = 0;
        while start < range.end {
            if !(start >= self.hot_key && start < self.hot_next) {
                self.heat(start);
            }
            let end = range.end.min(self.hot_next);
            let new = self.insert_hot(start, end);
            self.dirty |= new > 0;
            added += new;
            start = end;
            if self.hot.len() > MAX_RUNS {
                self.split_hot();
            }
        }
        self.count += added;
        added
    }

    /// The first cluster of `range` already recorded, if any.
    pub fn first_in(&self, range: Range<u64>) -> Option<u64> {
        if range.is_empty() {
            return None;
        }
        self.runs_from(range.start)
            .take_while(|r| r.start < range.end)
            .find(|r| r.end > range.start)
            .map(|r| r.start.max(range.start))
    }

    /// The ranges of clusters not recorded, in ascending order.
    pub fn missing_ranges(&self) -> Vec<Range<u64>> {
        self.missing().collect()
    }

    /// The ranges of clusters not recorded, in ascending order, one by one
    /// (no list of them is built).
    pub fn missing(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        let clusters = self.clusters;
        let mut runs = self.runs_from(0).peekable();
        let mut at = 0u64;
        std::iter::from_fn(move || {
            // Skip the runs (adjacent ones included) that cover `at`.
            while let Some(r) = runs.peek() {
                if r.start > at {
                    break;
                }
                at = at.max(r.end);
                runs.next();
            }
            if at >= clusters {
                return None;
            }
            let end = runs.peek().map_or(clusters, |r| r.start.min(clusters));
            let gap = at..end;
            at = end;
            Some(gap)
        })
    }

    /// The first cluster not recorded, if any.
    pub fn first_missing(&self) -> Option<u64> {
        if self.count == self.clusters {
            return None;
        }
        self.missing().next().map(|r| r.start)
    }

    /// Every run, in order, from the leaf holding `from` on.
    fn runs_from(&self, from: u64) -> impl Iterator<Item = Run> + '_ {
        let first = *self.leaves.range(..=from).next_back().expect("leaf 0").0;
        self.leaves.range(first..).flat_map(move |(&key, leaf)| {
            let hot = (key == self.hot_key).then_some(&self.hot[..]);
            let (hot, cold) = match hot {
                Some(runs) => (runs.iter().copied(), None),
                None => ([].iter().copied(), Some(decode(key, leaf))),
            };
            hot.chain(cold.into_iter().flatten())
        })
    }

    /// Makes the leaf holding `n` the hot one, storing the current one back.
    fn heat(&mut self, n: u64) {
        if self.dirty {
            let encoded = encode(self.hot_key, &self.hot);
            *self.leaves.get_mut(&self.hot_key).expect("hot leaf") = encoded;
            self.dirty = false;
        }
        let (&key, leaf) = self.leaves.range(..=n).next_back().expect("leaf 0");
        decode_into(key, leaf, &mut self.hot);
        self.hot_key = key;
        self.hot_next = self
            .leaves
            .range(key + 1..)
            .next()
            .map_or(u64::MAX, |(&k, _)| k);
    }

    /// Adds `start..end` (inside the hot leaf's span) to the hot leaf;
    /// returns how many clusters were new.
    fn insert_hot(&mut self, start: u64, end: u64) -> u64 {
        let runs = &mut self.hot;
        // Fast path: clusters in order extend the last run.
        if let Some(last) = runs.last_mut() {
            if last.end == start {
                last.end = end;
                return end - start;
            }
        }
        // The runs that overlap or touch start..end merge with it.
        let i = runs.partition_point(|r| r.end < start);
        let j = runs.partition_point(|r| r.start <= end);
        if i == j {
            runs.insert(i, Run { start, end });
            return end - start;
        }
        let covered: u64 = runs[i..j]
            .iter()
            .map(|r| r.end.min(end).saturating_sub(r.start.max(start)))
            .sum();
        let merged = Run {
            start: start.min(runs[i].start),
            end: end.max(runs[j - 1].end),
        };
        runs[i] = merged;
        runs.drain(i + 1..j);
        (end - start) - covered
    }

    /// Splits the hot leaf in two; the upper half stays hot.
    fn split_hot(&mut self) {
        let upper = self.hot.split_off(self.hot.len() / 2);
        let key = upper[0].start;
        let lower = encode(self.hot_key, &self.hot);
        *self.leaves.get_mut(&self.hot_key).expect("hot leaf") = lower;
        self.leaves.insert(key, Box::default());
        self.hot = upper;
        self.hot.reserve(MAX_RUNS + 2 - self.hot.len());
        self.hot_key = key;
        self.dirty = true;
    }
}

/// Encodes `runs` (at or after `key`) as a leaf, exactly sized.
fn encode(key: u64, runs: &[Run]) -> Box<[u8]> {
    // At most 10 bytes for each of a run's two varints; a split leaves at
    // most MAX_RUNS + 1 runs.
    let mut buf = [0u8; (MAX_RUNS + 1) * 20];
    let mut at = 0;
    let mut prev = key;
    for r in runs {
        let len = r.end - r.start;
        at = put_varint(&mut buf, at, (r.start - prev) << 1 | (len > 1) as u64);
        if len > 1 {
            at = put_varint(&mut buf, at, len - 2);
        }
        prev = r.end;
    }
    Box::from(&buf[..at])
}

/// Decodes a leaf with key `key` into `runs` (cleared first).
fn decode_into(key: u64, leaf: &[u8], runs: &mut Vec<Run>) {
    runs.clear();
    let mut at = 0usize;
    let mut prev = key;
    while at < leaf.len() {
        let token = get_varint(leaf, &mut at);
        let start = prev + (token >> 1);
        prev = start
            + if token & 1 != 0 {
                get_varint(leaf, &mut at) + 2
            } else {
                1
            };
        runs.push(Run { start, end: prev });
    }
}

/// The runs of a leaf with key `key`.
fn decode(key: u64, leaf: &[u8]) -> impl Iterator<Item = Run> + '_ {
    let mut at = 0usize;
    let mut prev = key;
    std::iter::from_fn(move || {
        if at >= leaf.len() {
            return None;
        }
        let token = get_varint(leaf, &mut at);
        let start = prev + (token >> 1);
        let len = if token & 1 != 0 {
            get_varint(leaf, &mut at) + 2
        } else {
            1
        };
        prev = start + len;
        Some(Run { start, end: prev })
    })
}

/// Writes `v` as LEB128 at `buf[at..]`; returns the position after it.
fn put_varint(buf: &mut [u8], mut at: usize, mut v: u64) -> usize {
    while v >= 0x80 {
        buf[at] = v as u8 | 0x80;
        at += 1;
        v >>= 7;
    }
    buf[at] = v as u8;
    at + 1
}

fn get_varint(buf: &[u8], at: &mut usize) -> u64 {
    let mut v = 0u64;
    let mut shift = 0;
    loop {
        let b = buf[*at];
        *at += 1;
        v |= ((b & 0x7f) as u64) << shift;
        if b < 0x80 {
            return v;
        }
        shift += 7;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ranges_and_first_missing() {
        let mut b = ClusterSet::new(200);
        assert_eq!(b.first_missing(), Some(0));
        for n in (0..23).chain(32..55) {
            assert!(b.insert(n));
        }
        assert!(!b.insert(5));
        assert_eq!(b.count(), 46);
        assert_eq!(b.first_missing(), Some(23));
        assert_eq!(b.missing_ranges(), vec![23..32, 55..200]);
        assert_eq!(b.missing_count(), 154);
    }

    #[test]
    fn huge_device_costs_nothing_until_used() {
        let mut b = ClusterSet::new(1 << 32);
        assert_eq!(b.missing_ranges(), vec![0..(1 << 32)]);
        b.insert((1 << 32) - 1);
        assert_eq!(b.missing_ranges(), vec![0..(1 << 32) - 1]);
        let mut full = ClusterSet::new(70);
        for n in 0..70 {
            full.insert(n);
        }
        assert_eq!(full.first_missing(), None);
        assert!(full.missing_ranges().is_empty());
        // A whole 2^32-cluster device in one call is one run.
        let mut whole = ClusterSet::new(1 << 32);
        assert_eq!(whole.insert_range(0..1 << 32), 1 << 32);
        assert_eq!(whole.first_missing(), None);
        assert!(whole.heap_bytes() < 200, "{}", whole.heap_bytes());
    }

    /// Issue 8's hostile archive: one cluster every 2^18 of a 2^32-cluster
    /// device took 32 KiB per cluster as bitmap pages (512 MiB for 2^14
    /// clusters); as runs it takes a few bytes each.
    #[test]
    fn lone_clusters_cost_a_few_bytes_each() {
        let mut s = ClusterSet::new(1 << 32);
        for i in 0..1u64 << 14 {
            assert!(s.insert(i << 18));
        }
        assert_eq!(s.count(), 1 << 14);
        let per = s.heap_bytes() as f64 / (1 << 14) as f64;
        assert!(per < 5.0, "{per} bytes per cluster");
        // Every second cluster, inserted in a scrambled order: the worst
        // density for runs (each cluster alone, 1 byte of gap).
        let mut s = ClusterSet::new(1 << 32);
        let count = 1u64 << 18;
        let mut x = 1u64;
        for _ in 0..count {
            // A permutation of 0..2^18 (odd multiplier modulo a power of 2).
            x = (x.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(1)) & (count - 1);
            assert!(s.insert(2 * x));
        }
        assert_eq!(s.count(), count);
        let per = s.heap_bytes() as f64 / count as f64;
        assert!(per < 3.0, "{per} bytes per cluster");
        assert_eq!(s.first_missing(), Some(1));
        assert_eq!(s.missing().count() as u64, count);
    }

    #[test]
    fn in_order_inserts_stay_one_run() {
        let mut s = ClusterSet::new(1 << 22);
        for n in 0..1 << 22 {
            assert!(s.insert(n));
        }
        assert_eq!(s.first_missing(), None);
        assert_eq!(s.leaves.len(), 1);
        assert!(s.contains(12345) && !s.insert(777));
    }

    /// A model: the plain set of numbers.
    fn check_against_model(clusters: u64, ops: &[(u64, u64)]) -> Result<(), TestCaseError> {
        let mut set = ClusterSet::new(clusters);
        let mut model = std::collections::BTreeSet::new();
        for &(start, len) in ops {
            let start = start % clusters;
            let end = (start + len).min(clusters);
            let first = model.range(start..end).next().copied();
            prop_assert_eq!(set.first_in(start..end), first);
            let mut added = 0;
            for n in start..end {
                added += model.insert(n) as u64;
            }
            prop_assert_eq!(set.insert_range(start..end), added);
            prop_assert_eq!(set.count(), model.len() as u64);
            for probe in [start.saturating_sub(1), start, end, end.saturating_sub(1)] {
                prop_assert_eq!(set.contains(probe), model.contains(&probe));
            }
        }
        let mut expect: Vec<Range<u64>> = Vec::new();
        for n in (0..clusters).filter(|n| !model.contains(n)) {
            match expect.last_mut() {
                Some(r) if r.end == n => r.end = n + 1,
                _ => expect.push(n..n + 1),
            }
        }
        prop_assert_eq!(set.first_missing(), expect.first().map(|r| r.start));
        prop_assert_eq!(set.missing_ranges(), expect);
        for n in 0..clusters {
            prop_assert_eq!(set.contains(n), model.contains(&n));
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn matches_a_model(
            clusters in 1u64..5000,
            ops in proptest::collection::vec((any::<u64>(), 0u64..40), 1..400),
        ) {
            check_against_model(clusters, &ops)?;
        }

        #[test]
        fn matches_a_model_with_many_leaves(
            ops in proptest::collection::vec((0u64..20_000, 0u64..3), 300..2000),
        ) {
            check_against_model(20_000, &ops)?;
        }
    }
}
