//! `--cpus LIST`: the CPUs a backup's own work may run on, so that the
//! guests keep the others.
//!
//! A full-speed backup keeps every CPU it may use busy (the server's
//! background reader and stream writer, the consumer behind them). Nice
//! values do not keep a guest write from waiting behind them: on a 2-core
//! machine, guest write p99 was 3.9–5.6 × idle during a full-speed
//! backup and 3.6–4.5 × with the consumer at nice 10, but 0.9–1.8 × with
//! the backup confined to one CPU (`benches/cbw.sh`, 8 GiB image, three
//! runs). The list is the `taskset -c` one: CPU numbers and ranges,
//! comma-separated (`1`, `0,2-3`).

use std::fmt;

use rustix::thread::{sched_getaffinity, sched_setaffinity, CpuSet};

/// A set of CPU numbers, ascending, without repeats, each below
/// [`CpuSet::MAX_CPU`]; never empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuList(Vec<usize>);

/// Why a CPU list was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CpuListError {
    /// Not numbers and ranges separated by commas.
    #[error("{0:?} is not a CPU list (CPU numbers and ranges, e.g. 1 or 0,2-3)")]
    Syntax(String),
    /// A range whose end is below its start.
    #[error("{0:?}: a range must not end below its start")]
    Backwards(String),
    /// A CPU number no affinity mask can hold (as written).
    #[error("CPU {0} is past the largest CPU number ({max})", max = CpuSet::MAX_CPU - 1)]
    TooLarge(String),
    /// CPUs this process may not run on (offline, or outside its cgroup or
    /// its own affinity).
    #[error("CPU {unusable} is not available (this process may use CPUs {allowed})")]
    Unavailable {
        /// The CPUs refused.
        unusable: CpuList,
        /// The CPUs this process may use.
        allowed: CpuList,
    },
}

impl CpuList {
    /// Parses a `taskset -c` list: `N` or `A-B`, comma-separated.
    pub fn parse(s: &str) -> Result<CpuList, CpuListError> {
        let syntax = || CpuListError::Syntax(s.to_string());
        let number = |t: &str| -> Result<usize, CpuListError> {
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
                return Err(syntax());
            }
            match t.parse::<usize>() {
                Ok(n) if n < CpuSet::MAX_CPU => Ok(n),
                _ => Err(CpuListError::TooLarge(t.to_string())),
            }
        };
        let mut cpus = Vec::new();
        for part in s.split(',') {
            let (a, b) = match part.split_once('-') {
                Some((a, b)) => (number(a)?, number(b)?),
                None => {
                    let n = number(part)?;
                    (n, n)
                }
            };
            if b < a {
                return Err(CpuListError::Backwards(part.to_string()));
            }
            cpus.extend(a..=b);
        }
        Ok(CpuList::from_numbers(cpus))
    }

    /// The list of `cpus` (sorted and deduplicated here). Numbers no
    /// affinity mask can hold (from [`CpuSet::MAX_CPU`] on) are left out;
    /// `None` if nothing is left.
    pub fn new(cpus: impl IntoIterator<Item = usize>) -> Option<CpuList> {
        let list = CpuList::from_numbers(cpus.into_iter().filter(|&c| c < CpuSet::MAX_CPU));
        (!list.0.is_empty()).then_some(list)
    }

    fn from_numbers(cpus: impl IntoIterator<Item = usize>) -> CpuList {
        let mut v: Vec<usize> = cpus.into_iter().collect();
        v.sort_unstable();
        v.dedup();
        CpuList(v)
    }

    /// The CPU numbers, ascending.
    pub fn cpus(&self) -> &[usize] {
        &self.0
    }

    /// The CPUs the calling thread may run on now.
    pub fn allowed() -> std::io::Result<CpuList> {
        let set = sched_getaffinity(None)?;
        Ok(CpuList::from_numbers(
            (0..CpuSet::MAX_CPU).filter(|&c| set.is_set(c)),
        ))
    }

    /// `Ok` if the calling thread may run on every CPU of the list;
    /// otherwise which it may not.
    pub fn check_available(&self) -> Result<(), CpuListError> {
        let Ok(allowed) = CpuList::allowed() else {
            return Ok(()); // cannot tell: binding will say
        };
        let unusable: Vec<usize> = self
            .0
            .iter()
            .copied()
            .filter(|c| allowed.0.binary_search(c).is_err())
            .collect();
        if unusable.is_empty() {
            return Ok(());
        }
        Err(CpuListError::Unavailable {
            unusable: CpuList(unusable),
            allowed,
        })
    }

    /// Binds the calling thread (only it: Linux affinity is per thread;
    /// threads and processes it starts later inherit it) to these CPUs.
    pub fn bind_current_thread(&self) -> std::io::Result<()> {
        let mut set = CpuSet::new();
        for &c in &self.0 {
            set.set(c);
        }
        Ok(sched_setaffinity(None, &set)?)
    }
}

/// The `taskset -c` form, ranges joined: `0,2-3`.
impl fmt::Display for CpuList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut i = 0;
        let mut first = true;
        while i < self.0.len() {
            let start = self.0[i];
            let mut j = i;
            while j + 1 < self.0.len() && self.0[j + 1] == self.0[j] + 1 {
                j += 1;
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if j == i {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{}", self.0[j])?;
            }
            i = j + 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_taskset_lists() {
        let l = CpuList::parse("3,0-1,1,7-9").unwrap();
        assert_eq!(l.cpus(), [0, 1, 3, 7, 8, 9]);
        assert_eq!(l.to_string(), "0-1,3,7-9");
        assert_eq!(CpuList::parse("5").unwrap().to_string(), "5");
        for bad in ["", "1,", ",1", "a", "1-", "-1", "1--2", "1 2", "+1", "0x1"] {
            assert_eq!(
                CpuList::parse(bad),
                Err(CpuListError::Syntax(bad.to_string())),
                "{bad:?}"
            );
        }
        assert_eq!(
            CpuList::parse("0,3-2"),
            Err(CpuListError::Backwards("3-2".into()))
        );
        let max = CpuSet::MAX_CPU;
        assert_eq!(
            CpuList::parse(&max.to_string()),
            Err(CpuListError::TooLarge(max.to_string()))
        );
        assert_eq!(
            CpuList::parse(&format!("{}", max - 1)).unwrap().cpus(),
            [max - 1]
        );
        assert_eq!(
            CpuList::parse("99999999999999999999999"),
            Err(CpuListError::TooLarge("99999999999999999999999".into()))
        );
        assert_eq!(CpuList::new([]), None);
        assert_eq!(CpuList::new([max]), None);
        assert_eq!(CpuList::new([max, 4]).unwrap().cpus(), [4]);
        assert_eq!(CpuList::new([2, 2, 1]).unwrap().cpus(), [1, 2]);
    }

    #[test]
    fn binds_only_the_calling_thread() {
        let allowed = CpuList::allowed().unwrap();
        let one = CpuList::new([allowed.cpus()[0]]).unwrap();
        let (inside, check) = std::thread::spawn(move || {
            one.bind_current_thread().unwrap();
            (CpuList::allowed().unwrap(), one.check_available())
        })
        .join()
        .unwrap();
        assert_eq!(inside.cpus(), [allowed.cpus()[0]]);
        assert_eq!(check, Ok(()));
        // The spawning thread keeps its mask.
        assert_eq!(CpuList::allowed().unwrap(), allowed);
        // A CPU outside the mask is named, with the mask.
        let outside = CpuSet::MAX_CPU - 1;
        assert_eq!(
            CpuList::new([outside]).unwrap().check_available(),
            Err(CpuListError::Unavailable {
                unusable: CpuList(vec![outside]),
                allowed: allowed.clone(),
            })
        );
    }
}
