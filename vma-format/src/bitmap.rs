//! Which clusters of a device have been seen.

use std::collections::BTreeMap;

/// Clusters per bitmap page: one page (32 KiB of bits) covers 16 GiB of device.
const PAGE_CLUSTERS: u64 = 1 << 18;
const PAGE_WORDS: usize = (PAGE_CLUSTERS / 64) as usize;

/// A set of cluster numbers of one device, with pages allocated on first use.
///
/// Memory grows with the clusters actually recorded, never with the declared
/// device size, so a header that claims a 256 TiB device costs nothing until
/// clusters arrive (and every recorded cluster was backed by input bytes).
#[derive(Clone, Debug, Default)]
pub struct ClusterBitmap {
    clusters: u64,
    pages: BTreeMap<u64, Box<[u64]>>,
    count: u64,
}

impl ClusterBitmap {
    /// An empty set for a device of `clusters` clusters.
    pub fn new(clusters: u64) -> ClusterBitmap {
        ClusterBitmap {
            clusters,
            pages: BTreeMap::new(),
            count: 0,
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

    /// Whether cluster `n` has been recorded.
    pub fn contains(&self, n: u64) -> bool {
        self.pages
            .get(&(n / PAGE_CLUSTERS))
            .is_some_and(|p| p[((n % PAGE_CLUSTERS) / 64) as usize] & (1 << (n % 64)) != 0)
    }

    /// Records cluster `n` (which must be below [`clusters`](Self::clusters));
    /// returns false if it was recorded already.
    pub fn insert(&mut self, n: u64) -> bool {
        debug_assert!(n < self.clusters);
        let page = self
            .pages
            .entry(n / PAGE_CLUSTERS)
            .or_insert_with(|| vec![0u64; PAGE_WORDS].into_boxed_slice());
        let word = &mut page[((n % PAGE_CLUSTERS) / 64) as usize];
        let bit = 1u64 << (n % 64);
        if *word & bit != 0 {
            return false;
        }
        *word |= bit;
        self.count += 1;
        true
    }

    /// The first cluster of `range` already recorded, if any; word by word.
    pub fn first_in(&self, range: std::ops::Range<u64>) -> Option<u64> {
        let mut n = range.start;
        while n < range.end {
            let page = n / PAGE_CLUSTERS;
            let page_end = ((page + 1) * PAGE_CLUSTERS).min(range.end);
            if let Some(words) = self.pages.get(&page) {
                while n < page_end {
                    let off = n % PAGE_CLUSTERS;
                    let word_end = (n - n % 64 + 64).min(page_end);
                    let hit = (words[(off / 64) as usize] >> (off % 64)) & low_bits(word_end - n);
                    if hit != 0 {
                        return Some(n + hit.trailing_zeros() as u64);
                    }
                    n = word_end;
                }
            }
            n = page_end;
        }
        None
    }

    /// Records every cluster of `range` (which must lie below
    /// [`clusters`](Self::clusters)), word by word; returns how many were new.
    pub fn insert_range(&mut self, range: std::ops::Range<u64>) -> u64 {
        debug_assert!(range.end <= self.clusters || range.is_empty());
        let mut n = range.start;
        let mut added = 0;
        while n < range.end {
            let page = n / PAGE_CLUSTERS;
            let page_end = ((page + 1) * PAGE_CLUSTERS).min(range.end);
            let words = self
                .pages
                .entry(page)
                .or_insert_with(|| vec![0u64; PAGE_WORDS].into_boxed_slice());
            while n < page_end {
                let off = n % PAGE_CLUSTERS;
                let word_end = (n - n % 64 + 64).min(page_end);
                let bits = low_bits(word_end - n) << (off % 64);
                let word = &mut words[(off / 64) as usize];
                added += (bits & !*word).count_ones() as u64;
                *word |= bits;
                n = word_end;
            }
        }
        self.count += added;
        added
    }

    /// Clusters not recorded.
    pub fn missing_count(&self) -> u64 {
        self.clusters - self.count
    }

    /// The ranges of clusters not recorded, in ascending order.
    pub fn missing_ranges(&self) -> Vec<std::ops::Range<u64>> {
        let mut out: Vec<std::ops::Range<u64>> = Vec::new();
        let mut push = |n: u64, end: u64| match out.last_mut() {
            Some(last) if last.end == n => last.end = end,
            _ => out.push(n..end),
        };
        let pages = self.clusters.div_ceil(PAGE_CLUSTERS);
        let mut page = 0;
        while page < pages {
            let base = page * PAGE_CLUSTERS;
            let page_end = (base + PAGE_CLUSTERS).min(self.clusters);
            match self.pages.get(&page) {
                None => {
                    // Jump over the run of unallocated pages in one step.
                    let next = self
                        .pages
                        .range(page..)
                        .next()
                        .map(|(&p, _)| p)
                        .unwrap_or(pages);
                    push(base, (next * PAGE_CLUSTERS).min(self.clusters));
                    page = next;
                    continue;
                }
                Some(words) => {
                    for (w, &word) in words.iter().enumerate() {
                        if word == u64::MAX {
                            continue;
                        }
                        let wbase = base + w as u64 * 64;
                        if wbase >= page_end {
                            break;
                        }
                        for b in 0..64 {
                            let n = wbase + b;
                            if n >= page_end {
                                break;
                            }
                            if word & (1 << b) == 0 {
                                push(n, n + 1);
                            }
                        }
                    }
                }
            }
            page += 1;
        }
        out
    }

    /// The first cluster not recorded, if any.
    pub fn first_missing(&self) -> Option<u64> {
        if self.count == self.clusters {
            return None;
        }
        let pages = self.clusters.div_ceil(PAGE_CLUSTERS);
        for page in 0..pages {
            let base = page * PAGE_CLUSTERS;
            match self.pages.get(&page) {
                None => return Some(base),
                Some(words) => {
                    for (w, &word) in words.iter().enumerate() {
                        if word != u64::MAX {
                            let n = base + w as u64 * 64 + (!word).trailing_zeros() as u64;
                            if n < self.clusters {
                                return Some(n);
                            }
                        }
                    }
                }
            }
        }
        None
    }
}

/// The lowest `len` bits set (`len` at most 64).
fn low_bits(len: u64) -> u64 {
    if len >= 64 {
        u64::MAX
    } else {
        (1u64 << len) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_first_missing() {
        let mut b = ClusterBitmap::new(200);
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
        let mut b = ClusterBitmap::new(1 << 32);
        assert_eq!(b.missing_ranges(), vec![0..(1 << 32)]);
        b.insert((1 << 32) - 1);
        assert_eq!(b.missing_ranges(), vec![0..(1 << 32) - 1]);
        assert_eq!(b.pages.len(), 1);
        let mut full = ClusterBitmap::new(70);
        for n in 0..70 {
            full.insert(n);
        }
        assert_eq!(full.first_missing(), None);
        assert!(full.missing_ranges().is_empty());
    }
}
