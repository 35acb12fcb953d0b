//! Proxmox-style progress and closing statistics of a read.
//!
//! Proxmox's reader counts per device `size / 65536` clusters (rounded
//! down) as the total, prints `progress N% (read B bytes, duration S sec)`
//! whenever the integer percentage of clusters read changes (so it may pass
//! 100% when devices end in a partial cluster), and at the end
//! `total bytes read B, sparse bytes Z (P%)` and `space reduction due to 4K
//! zero blocks Q%`. Zero bytes are counted per zero 4 KiB block, clipped in
//! 512-byte sectors at the device end. We reproduce all of it; one difference:
//! when every device is smaller than one cluster, Proxmox divides by zero
//! (and crashes); we print no progress lines then.

use std::io::{self, Write};
use std::time::Instant;

use vma_format::{BlockMask, Cluster, VmaHeader, BLOCKS_PER_CLUSTER, BLOCK_SIZE, CLUSTER_SIZE};

use crate::cfmt::g3;

/// Counts a read the way Proxmox's reader does and prints its lines.
pub struct ProxmoxProgress {
    start: Instant,
    cluster_count: u64,
    clusters_read: u64,
    zero_bytes: u64,
    partial_zero_bytes: u64,
    last_percent: i64,
    /// Device sizes by id, `u64::MAX` for vmstate (unbounded).
    sizes: [u64; 256],
}

impl ProxmoxProgress {
    /// Starts counting for `header`'s devices.
    pub fn new(header: &VmaHeader) -> ProxmoxProgress {
        let mut sizes = [0u64; 256];
        let mut cluster_count = 0;
        for d in header.devices() {
            sizes[d.id as usize] = if d.is_vmstate() { u64::MAX } else { d.size };
            cluster_count += d.size / CLUSTER_SIZE as u64;
        }
        ProxmoxProgress {
            start: Instant::now(),
            cluster_count,
            clusters_read: 0,
            zero_bytes: 0,
            partial_zero_bytes: 0,
            last_percent: 0,
            sizes,
        }
    }

    /// Counts one cluster; prints a progress line to `out` when the
    /// percentage changes.
    pub fn cluster<W: Write + ?Sized>(&mut self, c: &Cluster<'_>, out: &mut W) -> io::Result<()> {
        self.clusters_read += 1;
        if let Some(percent) = (self.clusters_read * 100).checked_div(self.cluster_count) {
            let percent = percent as i64;
            if percent != self.last_percent {
                writeln!(
                    out,
                    "progress {percent}% (read {} bytes, duration {} sec)",
                    self.clusters_read * CLUSTER_SIZE as u64,
                    self.start.elapsed().as_secs()
                )?;
                self.last_percent = percent;
            }
        }
        if c.mask != BlockMask::FULL {
            let size = self.sizes[c.dev_id as usize];
            let max_byte = if size == u64::MAX {
                u64::MAX
            } else {
                size / 512 * 512
            };
            for i in 0..BLOCKS_PER_CLUSTER {
                if c.mask.has(i) {
                    continue;
                }
                let start = c.offset() + (i * BLOCK_SIZE) as u64;
                let end = (start + BLOCK_SIZE as u64).min(max_byte);
                if end > start {
                    self.zero_bytes += end - start;
                    if c.mask != BlockMask::EMPTY {
                        self.partial_zero_bytes += end - start;
                    }
                }
            }
        }
        Ok(())
    }

    /// Prints the closing lines.
    pub fn finish<W: Write + ?Sized>(&self, out: &mut W) -> io::Result<()> {
        if self.clusters_read == 0 {
            return writeln!(out, "vma archive contains no image data");
        }
        let total = self.clusters_read * CLUSTER_SIZE as u64;
        writeln!(
            out,
            "total bytes read {total}, sparse bytes {} ({}%)",
            self.zero_bytes,
            g3(100.0 * self.zero_bytes as f64 / total as f64)
        )?;
        let data = total - self.zero_bytes;
        if data > 0 {
            writeln!(
                out,
                "space reduction due to 4K zero blocks {}%",
                g3(100.0 * self.partial_zero_bytes as f64 / data as f64)
            )?;
        }
        Ok(())
    }
}
