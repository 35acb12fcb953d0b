//! Per-cluster copy state of one export during a backup.

/// Where one cluster stands in the current backup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterState {
    /// Its content at the backup instant has not been captured yet: the next
    /// guest write to it must copy it first.
    NotCopied,
    /// Someone (the background reader or a guest write) has claimed it and is
    /// capturing it; everyone else waits for that, never reads it again.
    Copying,
    /// Captured: guest writes pass straight through.
    Copied,
}

/// The state of every cluster of one export: two bits per cluster, kept in
/// two bitmaps (each takes 2 MiB per TiB of disk).
///
/// Always used under its export's mutex; `waiters` counts threads sleeping
/// on the export's condition variable, so that finishing a copy only
/// signals when someone waits.
#[derive(Debug)]
pub struct ClusterStates {
    copied: Vec<u64>,
    claimed: Vec<u64>,
    clusters: u64,
    /// Threads waiting on the export's condition variable.
    pub waiters: usize,
}

impl ClusterStates {
    /// `clusters` clusters, all [`ClusterState::NotCopied`].
    pub fn new(clusters: u64) -> ClusterStates {
        let words = clusters.div_ceil(64) as usize;
        ClusterStates {
            copied: vec![0; words],
            claimed: vec![0; words],
            clusters,
            waiters: 0,
        }
    }

    /// Number of clusters.
    pub fn clusters(&self) -> u64 {
        self.clusters
    }

    /// State of cluster `n` (< [`clusters`](Self::clusters)).
    #[inline]
    pub fn get(&self, n: u64) -> ClusterState {
        let (w, b) = ((n / 64) as usize, 1u64 << (n % 64));
        if self.copied[w] & b != 0 {
            ClusterState::Copied
        } else if self.claimed[w] & b != 0 {
            ClusterState::Copying
        } else {
            ClusterState::NotCopied
        }
    }

    /// Sets the state of cluster `n`.
    #[inline]
    pub fn set(&mut self, n: u64, state: ClusterState) {
        let (w, b) = ((n / 64) as usize, 1u64 << (n % 64));
        match state {
            ClusterState::NotCopied => {
                self.copied[w] &= !b;
                self.claimed[w] &= !b;
            }
            ClusterState::Copying => {
                self.copied[w] &= !b;
                self.claimed[w] |= b;
            }
            ClusterState::Copied => {
                self.copied[w] |= b;
                self.claimed[w] &= !b;
            }
        }
    }

    /// Marks every cluster of `range` copied (whole words at a time).
    pub fn set_range_copied(&mut self, range: std::ops::Range<u64>) {
        let mut n = range.start;
        while n < range.end {
            let (w, bit) = ((n / 64) as usize, n % 64);
            if bit == 0 && range.end - n >= 64 {
                self.copied[w] = u64::MAX;
                self.claimed[w] = 0;
                n += 64;
            } else {
                self.set(n, ClusterState::Copied);
                n += 1;
            }
        }
    }

    /// Whether every cluster of `first..=last` is copied (a whole word at a
    /// time where possible: this is the check every guest write makes).
    pub fn all_copied(&self, first: u64, last: u64) -> bool {
        let mut n = first;
        while n <= last {
            let (w, bit) = ((n / 64) as usize, n % 64);
            if bit == 0 && last - n >= 63 {
                if self.copied[w] != u64::MAX {
                    return false;
                }
                n += 64;
            } else {
                if self.copied[w] & (1 << bit) == 0 {
                    return false;
                }
                n += 1;
            }
        }
        true
    }

    /// Number of copied clusters.
    pub fn copied_count(&self) -> u64 {
        self.copied.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_and_all_copied() {
        let mut s = ClusterStates::new(200);
        assert_eq!(s.get(199), ClusterState::NotCopied);
        s.set(5, ClusterState::Copying);
        assert_eq!(s.get(5), ClusterState::Copying);
        s.set(5, ClusterState::Copied);
        assert_eq!(s.get(5), ClusterState::Copied);
        assert!(s.all_copied(5, 5));
        assert!(!s.all_copied(4, 5));
        for n in 0..200 {
            s.set(n, ClusterState::Copied);
        }
        assert!(s.all_copied(0, 199));
        assert_eq!(s.copied_count(), 200);
        s.set(130, ClusterState::NotCopied);
        assert!(!s.all_copied(0, 199));
        assert!(s.all_copied(0, 129));
        assert!(s.all_copied(131, 199));
        assert_eq!(s.get(130), ClusterState::NotCopied);
    }
}
