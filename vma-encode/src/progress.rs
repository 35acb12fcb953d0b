//! Progress on stderr: Proxmox's `vma create -v` lines, or a bar on a terminal.
//!
//! Proxmox counts per cluster the bytes of the device it covers
//! ("transferred": 64 KiB, less past the device end) and the bytes of its
//! zero 4 KiB blocks (whole blocks, also past the end), and prints
//! `progress N% TRANSFERRED/TOTAL ZEROS` whenever the integer percentage
//! changes; at the end `image NAME: size=S zeros=Z saved=S-Z` per device.
//! We print the same lines.

use std::io::Write;

use indicatif::{ProgressBar, ProgressStyle};
use vma_format::CLUSTER_SIZE;

/// Counts clusters as they are written and reports on stderr.
pub struct Progress {
    sizes: Vec<u64>,
    total: u64,
    transferred: u64,
    zero_bytes: u64,
    last_percent: i64,
    verbose: bool,
    bar: Option<ProgressBar>,
    since_bar: u32,
}

impl Progress {
    /// Progress over devices of these sizes (device 1 first). `verbose`
    /// prints Proxmox's lines; `bar` draws a progress bar instead.
    pub fn new(sizes: Vec<u64>, verbose: bool, bar: bool) -> Progress {
        let total = sizes.iter().sum();
        let bar = (bar && !verbose && total > 0).then(|| {
            let b = ProgressBar::new(total);
            b.set_style(
                ProgressStyle::with_template(
                    "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .expect("valid template"),
            );
            b
        });
        Progress {
            sizes,
            total,
            transferred: 0,
            zero_bytes: 0,
            last_percent: -1,
            verbose,
            bar,
            since_bar: 0,
        }
    }

    /// Counts clusters `first .. first + count` of device `dev_id` (1-based)
    /// with `zero` bytes of zero blocks among them.
    #[inline]
    pub fn clusters(&mut self, dev_id: u8, first: u64, count: u64, zero: u64) {
        let size = self.sizes[dev_id as usize - 1];
        let start = first * CLUSTER_SIZE as u64;
        let end = (first + count) * CLUSTER_SIZE as u64;
        self.transferred += end.min(size).saturating_sub(start);
        self.zero_bytes += zero;
        if self.verbose {
            let percent = (self.transferred * 100 / self.total) as i64;
            if percent != self.last_percent {
                self.last_percent = percent;
                // A closed stderr must not stop the backup.
                let _ = writeln!(
                    std::io::stderr(),
                    "progress {percent}% {}/{} {}",
                    self.transferred,
                    self.total,
                    self.zero_bytes
                );
            }
        } else if let Some(bar) = &self.bar {
            self.since_bar += count as u32;
            if self.since_bar >= 256 {
                self.since_bar = 0;
                bar.set_position(self.transferred);
            }
        }
    }

    /// Ends the bar; with `verbose`, prints the per-image lines for
    /// (name, size, zero bytes).
    pub fn finish(&mut self, images: &[(String, u64, u64)]) {
        if let Some(bar) = self.bar.take() {
            bar.set_position(self.transferred);
            bar.finish_and_clear();
        }
        if self.verbose {
            let mut err = std::io::stderr().lock();
            for (name, size, zeros) in images {
                let saved = *size as i64 - *zeros as i64;
                let _ = writeln!(err, "image {name}: size={size} zeros={zeros} saved={saved}");
            }
        }
    }

    /// Removes the bar (on failure).
    pub fn abandon(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
