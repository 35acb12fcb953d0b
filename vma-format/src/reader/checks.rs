//! The checks of the archive reader: each extent header and its slots
//! against the declared devices, resynchronising after damage (salvage), and
//! completeness at the end.

use std::io::Read;

use super::{tolerate, Archive, MissingClusters, NextExtent, Summary, RESYNC_CHUNK};
use crate::cluster::BlockMask;
use crate::devices::{CheckRules, DeviceTracker, Refusal};
use crate::error::{Error, Location};
use crate::extent::{BlockInfo, ExtentHeader};
use crate::{EXTENT_HEADER_SIZE, EXTENT_SLOTS};

impl<R: Read> Archive<R> {
    /// Reads the next extent header and checks it and its slots — every
    /// check but those of its data — leaving the input at its data.
    /// `index` counts the extents; in salvage mode a bad header is recorded
    /// and skipped by resynchronising.
    pub(super) fn next_extent(
        &mut self,
        index: &mut u64,
        summary: &mut Summary,
    ) -> Result<NextExtent, Error> {
        let uuid = self.header.uuid();
        let salvage = self.options.salvage;
        let mut head = [0u8; EXTENT_HEADER_SIZE];
        let offset = self.pos;
        let loc = Location::Extent {
            index: *index,
            offset,
        };
        let got = self
            .read_full(&mut head)
            .map_err(|e| Error::io(Some(loc), "read failed", e))?;
        if got == 0 {
            return Ok(NextExtent::End);
        }
        if got < EXTENT_HEADER_SIZE {
            let err = Error::damaged(
                Some(loc),
                format!("truncated: got {got} of {EXTENT_HEADER_SIZE} header bytes"),
            );
            tolerate(salvage, summary, err)?;
            return Ok(NextExtent::End);
        }
        *index += 1;
        let extent = match ExtentHeader::parse(&head, &uuid) {
            Ok(extent) => extent,
            Err(problem) => {
                let err = Error::damaged(Some(loc), problem.to_string());
                tolerate(salvage, summary, err)?;
                return self.resync_after(*index, &head, offset, summary);
            }
        };

        // Check every slot before touching any state, so that a bad
        // extent leaves nothing half-recorded.
        let mut usable = [false; EXTENT_SLOTS];
        let mut blocks = 0usize;
        let mut vmstate_next = None;
        for (i, slot) in extent.slots().iter().enumerate() {
            if slot.dev_id == 0 {
                continue;
            }
            blocks += slot.mask.count();
            match self.check_slot(
                i,
                slot.dev_id,
                slot.cluster_num,
                slot.mask,
                &extent,
                &mut vmstate_next,
            ) {
                Ok(()) => usable[i] = true,
                Err(err) => tolerate(salvage, summary, err.at(loc))?,
            }
        }
        if blocks != extent.block_count() as usize {
            let err = Error::damaged(
                Some(loc),
                format!(
                    "block_count {} does not match the {blocks} blocks its masks name",
                    extent.block_count()
                ),
            );
            tolerate(salvage, summary, err)?;
            return self.resync_after(*index, &head, offset, summary);
        }
        Ok(NextExtent::Found(loc, extent, usable, blocks))
    }

    /// After a bad extent header `head` at `offset` (salvage): skip to the
    /// next valid one.
    fn resync_after(
        &mut self,
        index: u64,
        head: &[u8; EXTENT_HEADER_SIZE],
        offset: u64,
        summary: &mut Summary,
    ) -> Result<NextExtent, Error> {
        Ok(if self.resync(index, &head[1..], offset + 1, summary)? {
            NextExtent::Skipped
        } else {
            NextExtent::End
        })
    }

    /// Remembers that the cluster of `slot` (checked, usable) was handed on.
    pub(super) fn record(&mut self, slot: &BlockInfo) {
        self.devices.record(slot.dev_id, slot.cluster_num as u64);
    }

    /// Checks one slot against the devices and what was seen; returns the
    /// problem as a damaged-input error the caller locates. `vmstate_next` carries the next expected vmstate cluster
    /// across the slots of one extent.
    fn check_slot(
        &self,
        i: usize,
        dev_id: u8,
        cluster_num: u32,
        mask: BlockMask,
        extent: &ExtentHeader,
        vmstate_next: &mut Option<u64>,
    ) -> Result<(), Error> {
        let n = cluster_num as u64;
        let earlier = || {
            extent.slots()[..i]
                .iter()
                .any(|s| s.dev_id == dev_id && s.cluster_num == cluster_num)
        };
        let rules = CheckRules {
            vmstate_expected: *vmstate_next,
            vmstate_gaps: self.options.salvage,
            repeats_pending: false,
        };
        let checked = self
            .devices
            .check(dev_id, n, Some(mask), rules)
            .and_then(|dev| {
                if !dev.is_vmstate() && !dev.is_unchecked() && earlier() {
                    Err(Refusal::Duplicate)
                } else {
                    Ok(dev)
                }
            });
        // Only a problem needs the name: building it is an allocation and a
        // search, and this runs for every cluster.
        let name = || self.device_name(dev_id);
        let problem = match checked {
            Ok(dev) => {
                if dev.is_vmstate() {
                    *vmstate_next = Some(n + 1);
                }
                return Ok(());
            }
            Err(Refusal::Undeclared) => {
                format!("slot {i}: device {dev_id} is not declared in the header")
            }
            Err(Refusal::OutOfOrder { expected }) => format!(
                "slot {i}: {} cluster {n} out of order (expected {expected})",
                name()
            ),
            Err(Refusal::PastEnd { clusters }) => format!(
                "slot {i}: cluster {n} is past the end of {} ({clusters} clusters)",
                name(),
            ),
            Err(Refusal::MaskPastEnd) => format!(
                "slot {i}: cluster {n} of {} stores blocks past the device end (mask {:#06x})",
                name(),
                mask.0
            ),
            Err(Refusal::Duplicate) => format!("slot {i}: cluster {n} of {} appears twice", name()),
        };
        Err(Error::damaged(None, problem))
    }

    fn device_name(&self, dev_id: u8) -> String {
        self.header
            .device(dev_id)
            .map(|d| d.display_name())
            .unwrap_or_default()
    }

    /// The end-of-archive check: every cluster of every device present.
    pub(super) fn check_complete(&mut self, summary: &mut Summary) -> Result<(), Error> {
        for d in self.header.devices() {
            let dev = self.devices.device(d.id).expect("declared");
            if dev.first_missing().is_none() {
                continue;
            }
            let count = dev.seen().missing_count();
            if !self.options.salvage {
                let first = dev.first_missing().expect("some are missing");
                return Err(Error::damaged(
                    Some(Location::End),
                    format!(
                        "{}: cluster {first} missing ({count} of {} clusters missing)",
                        d.display_name(),
                        dev.clusters()
                    ),
                ));
            }
            summary.missing.push(MissingClusters {
                dev_id: d.id,
                name: d.display_name(),
                clusters: dev.clusters(),
                count,
                // Moved out, not copied: the read is over.
                present: self.devices.take_seen(d.id),
            });
        }
        Ok(())
    }

    /// After damage: finds the next valid extent header at or after
    /// `start_offset`, whose bytes begin with `start` (already consumed), and
    /// arranges for reading to go on from there. False at the end of input.
    /// `index` numbers the extent being looked for (for messages).
    ///
    /// Candidates are found cheaply before any MD5 is computed: by the
    /// archive's uuid (bytes 8..24 of every extent header) with `memmem`, then
    /// the magic, the reserved field, a block count that matches the masks
    /// (what [`run`](Self::run) would refuse anyway) and slots that name
    /// only clusters a writer of this archive could write
    /// ([`could_be_extent`]). A candidate equal to the last one ruled out is
    /// not examined again (repeated garbage). What remains costs one MD5 per
    /// candidate: garbage built to pass every cheap check can force one per
    /// candidate, but overlapping candidates break each other's slots (see
    /// [`could_be_extent`]), so only a few fit in 512 bytes.
    fn resync(
        &mut self,
        index: u64,
        start: &[u8],
        start_offset: u64,
        summary: &mut Summary,
    ) -> Result<bool, Error> {
        const UUID_AT: usize = 8;
        const UUID_END: usize = UUID_AT + 16;
        let uuid = self.header.uuid();
        let finder = memchr::memmem::Finder::new(&uuid);
        let mut rejected = [0u8; EXTENT_HEADER_SIZE];
        let mut have_rejected = false;
        let mut buf = start.to_vec();
        let mut base = start_offset;
        // Where the next uuid may start in `buf`.
        let mut search = UUID_AT;
        loop {
            let mut incomplete = None;
            while search + 16 <= buf.len() {
                let Some(i) = finder.find(&buf[search..]) else {
                    break;
                };
                let c = search + i - UUID_AT;
                if buf.len() - c < EXTENT_HEADER_SIZE {
                    incomplete = Some(c);
                    break;
                }
                search += i + 1;
                let candidate: &[u8; EXTENT_HEADER_SIZE] =
                    buf[c..c + EXTENT_HEADER_SIZE].try_into().expect("512");
                if candidate[..4] != crate::extent::EXTENT_MAGIC
                    || candidate[4..6] != [0, 0]
                    || (have_rejected && *candidate == rejected)
                {
                    continue;
                }
                if !could_be_extent(candidate, &self.devices) {
                    rejected = *candidate;
                    have_rejected = true;
                    continue;
                }
                summary.candidates_hashed += 1;
                if ExtentHeader::is_valid(candidate, &uuid) {
                    let mut rest = buf[c..].to_vec();
                    rest.extend_from_slice(&self.pushback[self.pushback_pos..]);
                    self.pushback = rest;
                    self.pushback_pos = 0;
                    self.pos = base + c as u64;
                    return Ok(true);
                }
                rejected = *candidate;
                have_rejected = true;
            }
            // Keep what a candidate not yet ruled out may start with.
            let keep = incomplete.unwrap_or(buf.len().saturating_sub(UUID_END - 1));
            buf.drain(..keep);
            base += keep as u64;
            search = search.saturating_sub(keep).max(UUID_AT);
            let old = buf.len();
            buf.resize(old + RESYNC_CHUNK, 0);
            let got = self.read_full(&mut buf[old..]).map_err(|e| {
                Error::io(
                    Some(Location::Extent {
                        index,
                        offset: base,
                    }),
                    "read failed",
                    e,
                )
            })?;
            buf.truncate(old + got);
            if got == 0 {
                return Ok(false);
            }
        }
    }
}

/// Whether an extent header could have been written for this archive, as
/// far as can be told without its MD5: its block count is the sum of the
/// blocks its masks name (slots with a device id), as
/// [`Archive::next_extent`] requires, and every slot with a device id names
/// a cluster some writer could have written ([`DeviceTracker::could_hold`]:
/// declared device, cluster and mask inside it), with its reserved byte 0
/// (Proxmox's writer and ours write 0 there) and no cluster named twice (a
/// writer writes each cluster once). Slots with device id 0 are skipped
/// whatever they hold, as every reader skips them (our data checksum is
/// one). Garbage made of overlapping candidates puts each candidate's magic
/// into its predecessors' slots, where its bytes become a nonzero reserved
/// byte or a cluster number of at least 0x564D (a device over 1.4 GB) or,
/// at most offsets, at least 0x564D41 (over 370 GB): dense garbage passes
/// these checks only over archives of very large devices.
fn could_be_extent(raw: &[u8; EXTENT_HEADER_SIZE], devices: &DeviceTracker) -> bool {
    let count = u16::from_be_bytes([raw[6], raw[7]]) as u32;
    // (dev_id, cluster) of each slot with a device id, to find repeats.
    let mut named = [0u64; EXTENT_SLOTS];
    let mut n = 0;
    let mut blocks = 0;
    // One pass, stopping at the first slot no writer writes: in garbage
    // that is usually one of the first few.
    for s in raw[40..].chunks_exact(8) {
        let v = u64::from_be_bytes(s.try_into().expect("8 bytes"));
        // mask: bits 48..64; reserved: 40..48; dev_id: 32..40.
        let dev_id = (v >> 32) as u8;
        if dev_id == 0 {
            continue;
        }
        let mask = BlockMask((v >> 48) as u16);
        if (v >> 40) as u8 != 0 || !devices.could_hold(dev_id, v as u32 as u64, mask) {
            return false;
        }
        blocks += mask.0.count_ones();
        named[n] = v & 0xff_ffff_ffff;
        n += 1;
    }
    if blocks != count {
        return false;
    }
    let named = &mut named[..n];
    named.sort_unstable();
    named.windows(2).all(|w| w[0] != w[1])
}
