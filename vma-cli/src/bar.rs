//! Progress bars on a terminal (indicatif): bytes, rate and ETA on stderr,
//! drawn only when stderr is a terminal and the tool was not asked for
//! Proxmox's progress lines (`-v`), which stay exactly as Proxmox prints
//! them. Nothing is drawn on a non-terminal.

use std::io::{self, IsTerminal, Read};

pub use indicatif::ProgressBar;
use indicatif::{ProgressDrawTarget, ProgressStyle};

/// Whether a tool should draw a bar: stderr is a terminal and no `-v`.
pub fn wanted(verbose: bool) -> bool {
    !verbose && io::stderr().is_terminal()
}

/// A bar of bytes on stderr, with `prefix` (e.g. the archive's name) before
/// it. With a total: bar, bytes of total, rate and ETA; without (a pipe):
/// bytes and rate.
pub fn bytes(prefix: &str, total: Option<u64>) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
    bar.set_prefix(prefix.to_string());
    set_total(&bar, total);
    bar
}

/// Sets (or clears) the bar's total, switching between the two styles.
pub fn set_total(bar: &ProgressBar, total: Option<u64>) {
    let template = match total {
        Some(_) => "{prefix} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        None => "{prefix} {spinner} {bytes} {bytes_per_sec} {elapsed}",
    };
    bar.set_style(ProgressStyle::with_template(template).expect("valid template"));
    match total {
        Some(t) => bar.set_length(t),
        None => bar.unset_length(),
    }
}

/// A reader that advances a bar by the bytes read through it.
pub struct BarReader<R> {
    inner: R,
    bar: ProgressBar,
}

impl<R> BarReader<R> {
    /// Counts the bytes read from `inner` on `bar`.
    pub fn new(inner: R, bar: ProgressBar) -> BarReader<R> {
        BarReader { inner, bar }
    }
}

impl<R: Read> Read for BarReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
}
