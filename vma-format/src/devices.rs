//! The one rule every reader and writer of clusters applies: a cluster
//! belongs to a declared device, lies inside it, stores no block past its
//! end, comes at most once — and for the `vmstate` device, comes in order
//! from 0 instead (its size is not binding).
//!
//! [`DeviceTracker`] holds the declared devices and what has been seen of
//! each (a [`ClusterSet`]: memory follows the runs of clusters present, not
//! the sizes the header claims). The archive reader, the archive writer and
//! the cluster-stream reader each ask it; each words the [`Refusal`] in its
//! own message, since those messages are part of their interfaces.

use std::ops::Range;

use crate::cluster::BlockMask;
use crate::clusters_for;
use crate::clusterset::ClusterSet;

/// One declared device and what has been seen of it.
#[derive(Debug)]
pub struct TrackedDevice {
    size: u64,
    clusters: u64,
    vmstate: bool,
    seen: ClusterSet,
    vmstate_next: u64,
    accepted: u64,
    unchecked: bool,
}

impl TrackedDevice {
    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Its clusters (`size` rounded up to 64 KiB).
    pub fn clusters(&self) -> u64 {
        self.clusters
    }

    /// Whether it is the `vmstate` device (clusters in order, no size limit,
    /// never required complete).
    pub fn is_vmstate(&self) -> bool {
        self.vmstate
    }

    /// Whether duplicates and completeness go unchecked for it
    /// ([`DeviceTracker::set_unchecked`]).
    pub fn is_unchecked(&self) -> bool {
        self.unchecked
    }

    /// The next `vmstate` cluster expected (0 for other devices).
    pub fn vmstate_next(&self) -> u64 {
        self.vmstate_next
    }

    /// Clusters accepted so far ([`DeviceTracker::record`] calls, ranges
    /// counted in full), duplicates of unchecked devices included.
    pub fn accepted(&self) -> u64 {
        self.accepted
    }

    /// The clusters seen (empty for `vmstate` and unchecked devices).
    pub fn seen(&self) -> &ClusterSet {
        &self.seen
    }

    /// Whether every cluster that must come has come: always for `vmstate`
    /// and unchecked devices.
    pub fn first_missing(&self) -> Option<u64> {
        if self.vmstate || self.unchecked {
            return None;
        }
        self.seen.first_missing()
    }
}

/// Why a cluster is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Its device id is not declared.
    Undeclared,
    /// A `vmstate` cluster out of order: this one was expected.
    OutOfOrder {
        /// The cluster expected next.
        expected: u64,
    },
    /// Past the device's end: the device has this many clusters.
    PastEnd {
        /// Clusters of the device.
        clusters: u64,
    },
    /// Its mask names blocks at or past the device's end.
    MaskPastEnd,
    /// It came before.
    Duplicate,
}

/// How strictly [`DeviceTracker::check`] applies the rule.
#[derive(Clone, Copy, Debug, Default)]
pub struct CheckRules {
    /// The `vmstate` cluster expected instead of the tracker's own (a reader
    /// checking the slots of one extent before recording any).
    pub vmstate_expected: Option<u64>,
    /// Accept `vmstate` clusters past the one expected (salvage: the ones
    /// between were lost), not only the one expected.
    pub vmstate_gaps: bool,
    /// The cluster is already known to repeat one not yet recorded (an
    /// earlier slot of the same extent).
    pub repeats_pending: bool,
}

/// The declared devices, by id (1 to 255), and what has been seen of each.
#[derive(Debug)]
pub struct DeviceTracker {
    devices: Vec<Option<TrackedDevice>>,
}

impl Default for DeviceTracker {
    fn default() -> Self {
        DeviceTracker::new()
    }
}

impl DeviceTracker {
    /// No devices yet.
    pub fn new() -> DeviceTracker {
        DeviceTracker {
            devices: (0..256).map(|_| None).collect(),
        }
    }

    /// Declares device `id` of `size` bytes (replacing any declared before);
    /// `vmstate` says it is the RAM state device.
    pub fn declare(&mut self, id: u8, size: u64, vmstate: bool) {
        let clusters = clusters_for(size);
        self.devices[id as usize] = Some(TrackedDevice {
            size,
            clusters,
            vmstate,
            seen: ClusterSet::new(if vmstate { 0 } else { clusters }),
            vmstate_next: 0,
            accepted: 0,
            unchecked: false,
        });
    }

    /// Device `id`, if declared.
    #[inline]
    pub fn device(&self, id: u8) -> Option<&TrackedDevice> {
        self.devices[id as usize].as_ref()
    }

    /// Stops checking duplicates and completeness of device `id` and
    /// remembering its clusters (Proxmox's reading of a device a restore
    /// skips); an undeclared id is ignored.
    pub fn set_unchecked(&mut self, id: u8) {
        if let Some(dev) = &mut self.devices[id as usize] {
            dev.unchecked = true;
        }
    }

    /// Checks cluster `n` of device `id`, in this order: declared; for
    /// `vmstate` in order (nothing else); inside the device; no block of
    /// `mask` past the end (when a mask is given); not seen before (unless
    /// the device is unchecked). Records nothing.
    #[inline]
    pub fn check(
        &self,
        id: u8,
        n: u64,
        mask: Option<BlockMask>,
        rules: CheckRules,
    ) -> Result<&TrackedDevice, Refusal> {
        let dev = self.device(id).ok_or(Refusal::Undeclared)?;
        if dev.vmstate {
            let expected = rules.vmstate_expected.unwrap_or(dev.vmstate_next);
            let accept = if rules.vmstate_gaps {
                n >= expected
            } else {
                n == expected
            };
            return if accept {
                Ok(dev)
            } else {
                Err(Refusal::OutOfOrder { expected })
            };
        }
        if n >= dev.clusters {
            return Err(Refusal::PastEnd {
                clusters: dev.clusters,
            });
        }
        if let Some(mask) = mask {
            if !dev.mask_fits(n, mask) {
                return Err(Refusal::MaskPastEnd);
            }
        }
        if !dev.unchecked && (rules.repeats_pending || dev.seen.contains(n)) {
            return Err(Refusal::Duplicate);
        }
        Ok(dev)
    }

    /// Whether a writer of this archive could have written cluster `n` of
    /// device `id` with `mask`: the device is declared and, unless it is
    /// `vmstate` (whose size does not bind), the cluster is inside it and
    /// `mask` stores no block past its end. The part of
    /// [`check`](Self::check) that does not depend on what was seen: no
    /// writer writes a slot failing it, so resynchronisation after damage
    /// rules such candidates out before paying for their MD5.
    #[inline]
    pub fn could_hold(&self, id: u8, n: u64, mask: BlockMask) -> bool {
        match self.device(id) {
            None => false,
            Some(dev) => dev.vmstate || (n < dev.clusters && dev.mask_fits(n, mask)),
        }
    }

    /// Records cluster `n` of device `id` (declared; checked first).
    #[inline]
    pub fn record(&mut self, id: u8, n: u64) {
        let dev = self.devices[id as usize].as_mut().expect("declared");
        dev.accepted += 1;
        if dev.vmstate {
            dev.vmstate_next = n + 1;
        } else if !dev.unchecked {
            dev.seen.insert(n);
        }
    }

    /// Records clusters `range` of device `id` (declared, not `vmstate`;
    /// checked first, e.g. with [`first_seen_in`](Self::first_seen_in)).
    pub fn record_range(&mut self, id: u8, range: Range<u64>) {
        let dev = self.devices[id as usize].as_mut().expect("declared");
        dev.accepted += range.end - range.start;
        if !dev.unchecked {
            dev.seen.insert_range(range);
        }
    }

    /// The first cluster of `range` of device `id` seen already.
    pub fn first_seen_in(&self, id: u8, range: Range<u64>) -> Option<u64> {
        self.device(id).and_then(|d| d.seen.first_in(range))
    }

    /// Moves out the set of clusters seen of device `id` (declared), leaving
    /// it empty: for reports made once reading is over.
    pub fn take_seen(&mut self, id: u8) -> ClusterSet {
        let dev = self.devices[id as usize].as_mut().expect("declared");
        std::mem::take(&mut dev.seen)
    }

    /// The declared devices with their ids, lowest id first.
    pub fn declared(&self) -> impl Iterator<Item = (u8, &TrackedDevice)> + '_ {
        self.devices
            .iter()
            .enumerate()
            .filter_map(|(i, d)| d.as_ref().map(|d| (i as u8, d)))
    }
}

impl TrackedDevice {
    /// Whether `mask` stores no block at or past the device end in cluster `n`.
    #[inline]
    pub fn mask_fits(&self, n: u64, mask: BlockMask) -> bool {
        self.vmstate || mask.0 & !BlockMask::in_device(n, self.size).0 == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule() {
        let mut t = DeviceTracker::new();
        t.declare(1, 3 * 65536 + 4096, false);
        t.declare(2, 1, true);
        let r = CheckRules::default();
        assert_eq!(t.check(3, 0, None, r).unwrap_err(), Refusal::Undeclared);
        assert_eq!(
            t.check(1, 4, None, r).unwrap_err(),
            Refusal::PastEnd { clusters: 4 }
        );
        assert_eq!(
            t.check(1, 3, Some(BlockMask(0b10)), r).unwrap_err(),
            Refusal::MaskPastEnd
        );
        assert!(t.check(1, 3, Some(BlockMask(1)), r).is_ok());
        t.record(1, 3);
        assert_eq!(t.check(1, 3, None, r).unwrap_err(), Refusal::Duplicate);
        t.record_range(1, 0..2);
        assert_eq!(t.first_seen_in(1, 1..4), Some(1));
        assert_eq!(t.device(1).unwrap().first_missing(), Some(2));
        assert_eq!(t.device(1).unwrap().accepted(), 3);
        // vmstate: in order, past its size.
        assert_eq!(
            t.check(2, 1, None, r).unwrap_err(),
            Refusal::OutOfOrder { expected: 0 }
        );
        t.record(2, 0);
        assert!(t.check(2, 1, None, r).is_ok());
        let gaps = CheckRules {
            vmstate_gaps: true,
            ..r
        };
        assert!(t.check(2, 9, None, gaps).is_ok());
        assert_eq!(t.device(2).unwrap().first_missing(), None);
        // could_hold: what no writer writes, whatever was seen.
        assert!(!t.could_hold(3, 0, BlockMask(0)));
        assert!(!t.could_hold(1, 4, BlockMask(0)));
        assert!(!t.could_hold(1, 3, BlockMask(0b10)));
        assert!(
            t.could_hold(1, 3, BlockMask(1)),
            "seen before: still possible"
        );
        assert!(
            t.could_hold(2, 1 << 31, BlockMask(0xffff)),
            "vmstate: no size bound"
        );
        // Unchecked: duplicates pass, nothing is missing.
        t.set_unchecked(1);
        assert!(t.check(1, 3, None, r).is_ok());
        assert_eq!(t.device(1).unwrap().first_missing(), None);
    }
}
