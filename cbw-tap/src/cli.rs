//! The command line of `cbw-tap` (also read by xtask to generate the man
//! pages and shell completions).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::serve::parse_export;

const EXAMPLES: &str = "\
Examples:
  cbw-tap serve --socket /run/cbw-tap/vm100.nbd drive-scsi0=/dev/vg/vm-100-disk-0
  cbw-tap backup --control /run/cbw-tap/vm100.nbd.ctl | vma-encode -c qemu-server.conf - | zstd > vm100.vma.zst
  cbw-tap backup --control /run/cbw-tap/vm100.nbd.ctl --bwlimit 200M --pre 'qm guest cmd 100 fsfreeze-freeze' \\
      --post 'qm guest cmd 100 fsfreeze-thaw' > vm100.stream
  qemu-io -f raw 'nbd+unix:///drive-scsi0?socket=/run/cbw-tap/vm100.nbd' -c 'read 0 64k'

";

const SERVE_EXAMPLES: &str = "\
Examples:
  cbw-tap serve --socket /run/cbw-tap/100/nbd.sock drive-scsi0=/dev/pve/vm-100-disk-0 drive-scsi1=/dev/pve/vm-100-disk-1
  qemu-system-x86_64 … -blockdev driver=nbd,server.type=unix,server.path=/run/cbw-tap/100/nbd.sock,export=drive-scsi0,node-name=d0,reconnect-delay=30 -device virtio-blk-pci,drive=d0
  nbdinfo --list 'nbd+unix:///?socket=/run/cbw-tap/100/nbd.sock'

Running it as a systemd service, and a Proxmox VM's args: line: docs/DEPLOY.md.";

const BACKUP_EXAMPLES: &str = "\
Examples:
  cbw-tap backup --control /run/cbw-tap/100/nbd.sock.ctl | vma-encode -c qemu-server.conf=/etc/pve/qemu-server/100.conf - | zstd > vm100.vma.zst
  cbw-tap backup --control /run/cbw-tap/100/nbd.sock.ctl --cpus 3 --fleecing /var/tmp/vm100.fleece | taskset -c 3 vma-encode - > vm100.vma
  cbw-tap backup -v --json --control /run/cbw-tap/100/nbd.sock.ctl 2>backup.log | vma-encode - | zstd > vm100.vma.zst
  cbw-tap backup --control /run/cbw-tap/100/nbd.sock.ctl --incremental --uuid-from vm100 -- vma-encode --base mon.vma -o tue.vma -

A nightly job with retention and verification: examples/backup-cron.sh.";

/// Live point-in-time backups of disks in use: serves images over NBD with
/// copy-before-write, and streams backups of all of them taken at one
/// instant as a cluster stream for `vma-encode -`.
#[derive(Parser)]
#[command(name = "cbw-tap", version = vma_cli::version(env!("CARGO_PKG_VERSION")), after_help = format!("{EXAMPLES}{}", vma_cli::EXIT_CODES_HELP))]
pub struct Args {
    /// What to do.
    #[command(subcommand)]
    pub command: Cmd,
}

/// The subcommands.
#[derive(Subcommand)]
pub enum Cmd {
    /// Serve images as NBD exports until SIGINT/SIGTERM/SIGHUP.
    ///
    /// Clients: qemu-io -f raw 'nbd+unix:///NAME?socket=PATH', QEMU's
    /// -blockdev driver=nbd,server.type=unix,server.path=PATH,export=NAME,
    /// nbdinfo, nbdcopy.
    #[command(after_help = SERVE_EXAMPLES)]
    Serve {
        /// NBD Unix socket to create (mode 0600).
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
        /// Control socket for `cbw-tap backup` (mode 0600) [default: PATH.ctl].
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
        /// Also serve NBD over TCP on this address, e.g. 127.0.0.1:10809
        /// (no TLS, no authentication).
        #[arg(long, value_name = "ADDR:PORT")]
        tcp: Option<SocketAddr>,
        /// Serve images that start like qcow2, VMDK, VHDX, VDI, QED or VHD
        /// as raw disks all the same (a guest may write such bytes to its
        /// own disk's first sector; without this the next serve refuses it).
        #[arg(long)]
        assume_raw: bool,
        /// Keep the changed-cluster tracking across restarts: saved to
        /// DIR/cbw-tap.state on a clean shutdown, read (and removed) at
        /// start. Without it, or after an unclean stop, the next
        /// `backup --incremental` is full.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Exports: NAME=IMAGE (raw image file or block device), in device
        /// order.
        #[arg(value_name = "NAME=IMAGE", required = true, value_parser = parse_export)]
        exports: Vec<(String, PathBuf)>,
    },
    /// Back up every export of a running server, at one instant, as a
    /// cluster stream on stdout (e.g. `| vma-encode - > vm.vma`).
    ///
    /// Exits 0 only if the stream was finished cleanly; otherwise the stream
    /// ends with an abort record (if it could still be written) or is cut
    /// short, and vma-encode fails too.
    #[command(after_help = BACKUP_EXAMPLES)]
    Backup {
        /// The server's control socket.
        #[arg(long, value_name = "PATH")]
        control: PathBuf,
        /// Captured clusters that may wait for the consumer, e.g. 64M (the
        /// background reader fills at most three quarters: the rest is kept
        /// for copies before guest writes).
        #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = crate::size::parse_size)]
        buffer: usize,
        /// Limit the background reader to SIZE bytes per second, e.g. 200M
        /// (copy-before-write is never limited).
        #[arg(long, value_name = "SIZE", value_parser = crate::size::parse_size)]
        bwlimit: Option<usize>,
        /// Run the backup's own work on these CPUs only (`taskset -c` list,
        /// e.g. 1 or 0,2-3): the server's background reader and stream
        /// writer, and CONSUMER; guest I/O keeps the other CPUs. A consumer
        /// in a pipe: `taskset -c LIST vma-encode -`.
        #[arg(long, value_name = "LIST", value_parser = crate::cpus::CpuList::parse)]
        cpus: Option<crate::cpus::CpuList>,
        /// Fleecing: when the buffer is full, copy-before-write puts old
        /// clusters into FILE (created, mode 0600, removed at the end; must
        /// not exist) instead of making the guest wait.
        #[arg(long, value_name = "FILE")]
        fleecing: Option<PathBuf>,
        /// How long a guest write may wait for its copy when the buffer is
        /// full; also how long the consumer may stall.
        #[arg(long, value_name = "SECONDS", default_value_t = 45.0)]
        cbw_timeout: f64,
        /// What to do when a copy before a guest write fails or times out.
        #[arg(long, value_enum, default_value_t = PolicyArg::BreakSnapshot)]
        on_cbw_error: PolicyArg,
        /// Shell command run before the instant (e.g. freeze file systems).
        #[arg(long, value_name = "CMD")]
        pre: Option<String>,
        /// Shell command run right after the instant (e.g. thaw).
        #[arg(long, value_name = "CMD")]
        post: Option<String>,
        /// Print the final status and counters as one JSON object on stderr.
        #[arg(long)]
        json: bool,
        /// Print Proxmox-style progress lines on stderr
        /// (`progress N% TRANSFERRED/TOTAL ZEROS`, as `vma create -v`).
        #[arg(short, long)]
        verbose: bool,
        /// Only the clusters written since the last completed backup (full
        /// if there is none); `vma-encode --base LAST.vma -` completes it.
        #[arg(long)]
        incremental: bool,
        /// Archive uuid derived from NAME (the same for every backup made
        /// with it), instead of a random one; give vma-encode no --uuid.
        #[arg(long, value_name = "NAME")]
        uuid_from: Option<String>,
        /// Run CONSUMER (e.g. `vma-encode --base LAST.vma -o NEW.vma -`)
        /// with the stream on its standard input (its stdout is ours), and
        /// count the backup as completed — the base of the next
        /// incremental one — only if it exits 0 after the stream ended.
        #[arg(last = true, value_name = "CONSUMER")]
        consumer: Vec<std::ffi::OsString>,
    },
}

/// `--on-cbw-error`.
#[derive(Clone, Copy, ValueEnum)]
pub enum PolicyArg {
    /// Abort the backup, let the guest write through.
    BreakSnapshot,
    /// Fail the guest write with EIO, keep the backup.
    BreakGuestWrite,
}

/// What `cbw-tap backup` shows while the stream goes to stdout, read from
/// the stream's own bytes as they are written (its preamble names the
/// devices and sizes; every cluster of every device comes as one record):
/// on a terminal a bar of the disk bytes covered, with rate and ETA; with
/// `-v` the lines Proxmox's `vma create -v` prints,
/// `progress N% TRANSFERRED/TOTAL ZEROS` whenever the percentage changes.
/// Nothing is checked here: `vma-encode -` checks the stream.
pub struct StreamProgress<W> {
    inner: W,
    bar: Option<vma_cli::bar::ProgressBar>,
    verbose: bool,
    /// The preamble, gathered until the device table is complete.
    preamble: Vec<u8>,
    /// Device sizes once the preamble is known (device 1 first).
    sizes: Option<Vec<u64>>,
    total: u64,
    /// The current record's header, gathered.
    header: [u8; 12],
    header_len: usize,
    /// Bytes of the current record's body and CRC still to pass.
    skip: u64,
    transferred: u64,
    zero_bytes: u64,
    last_percent: i64,
    /// The device bytes the stream covers as the server said
    /// ([`UNKNOWN`] until then): an incremental stream covers only the
    /// changed clusters, not the devices the preamble lists.
    expected: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// [`StreamProgress`]'s total before the server has said it.
const UNKNOWN: u64 = u64::MAX;
/// The server said no total (an older one): the devices' sizes it is.
pub const NO_TOTAL: u64 = u64::MAX - 1;

impl<W> StreamProgress<W> {
    /// Where the server's total goes (see [`BackupClient::total`](crate::control::BackupClient::total)).
    pub fn total(&self) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
        self.expected.clone()
    }

    /// Takes the server's total once it is known; false until then (the
    /// stream may come before the client has read the server's reply).
    fn refresh_total(&mut self) -> bool {
        let e = self.expected.load(std::sync::atomic::Ordering::Acquire);
        if e == UNKNOWN || self.sizes.is_none() {
            return false;
        }
        if e != NO_TOTAL && e != self.total {
            self.total = e;
            if let Some(bar) = &self.bar {
                vma_cli::bar::set_total(bar, Some(e));
            }
        }
        true
    }

    /// Watches the stream written to `inner`; `bar` draws a progress bar,
    /// `verbose` prints Proxmox's progress lines on stderr.
    pub fn new(inner: W, bar: bool, verbose: bool) -> StreamProgress<W> {
        StreamProgress {
            inner,
            bar: bar.then(|| vma_cli::bar::bytes("cbw-tap backup", None)),
            verbose,
            preamble: Vec::new(),
            sizes: None,
            total: 0,
            header: [0; 12],
            header_len: 0,
            skip: 0,
            transferred: 0,
            zero_bytes: 0,
            last_percent: -1,
            expected: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(UNKNOWN)),
        }
    }

    /// A handle on the bar, to clear it before printing the outcome.
    pub fn bar(&self) -> Option<vma_cli::bar::ProgressBar> {
        self.bar.clone()
    }

    /// The device sizes and the preamble's length, once the preamble is
    /// complete (device table and CRC).
    fn parse_preamble(p: &[u8]) -> Option<(Vec<u64>, usize)> {
        let count = u16::from_be_bytes(p.get(20..22)?.try_into().ok()?) as usize;
        let mut at = 22;
        let mut sizes = Vec::with_capacity(count);
        for _ in 0..count {
            let size = u64::from_be_bytes(p.get(at..at + 8)?.try_into().ok()?);
            let len = u16::from_be_bytes(p.get(at + 8..at + 10)?.try_into().ok()?) as usize;
            at += 10 + len;
            sizes.push(size);
        }
        // Version 2 carries the backup's identity before the CRC.
        if p.get(8..10)? == vma_format::stream::VERSION_IDENTITY.to_be_bytes() {
            at += vma_format::stream::IDENTITY_SIZE;
        }
        p.get(at..at + 4)?;
        Some((sizes, at + 4))
    }

    fn observe(&mut self, buf: &[u8]) {
        if self.sizes.is_some() {
            return self.observe_records(buf);
        }
        self.preamble.extend_from_slice(buf);
        let Some((sizes, used)) = Self::parse_preamble(&self.preamble) else {
            return;
        };
        let rest = self.preamble.split_off(used);
        self.preamble = Vec::new();
        self.total = sizes.iter().sum();
        if let Some(bar) = &self.bar {
            vma_cli::bar::set_total(bar, Some(self.total));
        }
        self.sizes = Some(sizes);
        let _ = self.refresh_total();
        self.observe_records(&rest);
    }

    fn observe_records(&mut self, mut buf: &[u8]) {
        while !buf.is_empty() {
            if self.skip > 0 {
                let n = (self.skip.min(buf.len() as u64)) as usize;
                self.skip -= n as u64;
                buf = &buf[n..];
                continue;
            }
            let n = (12 - self.header_len).min(buf.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&buf[..n]);
            self.header_len += n;
            buf = &buf[n..];
            if self.header_len < 12 {
                return;
            }
            self.header_len = 0;
            let h = self.header;
            let body = u32::from_be_bytes([h[8], h[9], h[10], h[11]]) as u64;
            self.skip = body + 4;
            if h[0] == b'C' {
                let dev = h[1] as usize;
                let mask = u16::from_be_bytes([h[2], h[3]]);
                let cluster = u32::from_be_bytes([h[4], h[5], h[6], h[7]]) as u64;
                self.cluster(dev, mask, cluster);
            }
        }
    }

    /// Counts a cluster as Proxmox's writer does: the bytes of the device
    /// it covers, and its zero 4 KiB blocks.
    fn cluster(&mut self, dev: usize, mask: u16, cluster: u64) {
        let Some(size) = self
            .sizes
            .as_ref()
            .and_then(|s| dev.checked_sub(1).and_then(|i| s.get(i)))
            .copied()
        else {
            return;
        };
        let known = self.refresh_total();
        let start = cluster * vma_format::CLUSTER_SIZE as u64;
        let end = start + vma_format::CLUSTER_SIZE as u64;
        self.transferred += end.min(size).saturating_sub(start);
        self.zero_bytes += (16 - mask.count_ones() as u64) * 4096;
        if let Some(bar) = &self.bar {
            bar.set_position(self.transferred.min(self.total));
        }
        if self.verbose && known && self.total > 0 {
            let percent = (self.transferred.min(self.total) * 100 / self.total) as i64;
            if percent != self.last_percent {
                self.last_percent = percent;
                eprintln!(
                    "progress {percent}% {}/{} {}",
                    self.transferred, self.total, self.zero_bytes
                );
            }
        }
    }
}

impl<W: std::io::Write> std::io::Write for StreamProgress<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.observe(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The stream's way to stdout when progress is shown: the server writes
/// into a pipe ([`WatchedOutput::input`]) and a thread copies it to stdout
/// through [`StreamProgress`]. If stdout fails, the thread closes the pipe,
/// so the server sees the consumer gone, as it would on stdout itself.
pub struct WatchedOutput {
    input: std::os::fd::OwnedFd,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    bar: Option<vma_cli::bar::ProgressBar>,
    total: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl WatchedOutput {
    /// Starts copying to `out`, with a bar and/or `-v`'s lines.
    pub fn start(out: std::fs::File, bar: bool, verbose: bool) -> std::io::Result<WatchedOutput> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let (read_end, input) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        let mut watch = StreamProgress::new(out, bar, verbose);
        let bar = watch.bar();
        let total = watch.total();
        let done = std::sync::Arc::new(AtomicBool::new(false));
        let finished = done.clone();
        let thread = std::thread::Builder::new()
            .name("stream-watch".into())
            .spawn(move || {
                use std::io::{Read, Write};
                let mut src = std::fs::File::from(read_end);
                let mut buf = vec![0u8; 256 << 10];
                loop {
                    let mut fds = [rustix::event::PollFd::new(
                        &src,
                        rustix::event::PollFlags::IN,
                    )];
                    let tick = rustix::event::Timespec {
                        tv_sec: 0,
                        tv_nsec: 100_000_000,
                    };
                    match rustix::event::poll(&mut fds, Some(&tick)) {
                        Ok(0) => {
                            // Nothing to copy: once the backup is over (the
                            // server has stopped writing), the stream is done.
                            if finished.load(Ordering::Acquire) {
                                break;
                            }
                            continue;
                        }
                        Ok(_) => {}
                        Err(rustix::io::Errno::INTR) => continue,
                        Err(_) => break,
                    }
                    match src.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            if watch.write_all(&buf[..n]).is_err() {
                                // stdout failed: closing the pipe tells the server.
                                break;
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
            })?;
        Ok(WatchedOutput {
            input,
            done,
            bar,
            total,
            thread,
        })
    }

    /// Where the client puts the server's progress total.
    pub fn total(&self) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
        self.total.clone()
    }

    /// The descriptor to hand the server.
    pub fn input(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.input.as_fd()
    }

    /// After the backup: copies what is left, then clears the bar.
    pub fn finish(self) {
        drop(self.input);
        self.done.store(true, std::sync::atomic::Ordering::Release);
        let _ = self.thread.join();
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::StreamProgress;
    use vma_format::identity::BackupIdentity;
    use vma_format::stream::{StreamDevice, StreamWriter};

    #[test]
    fn preamble_length_of_both_versions() {
        let devices = [StreamDevice::new("a", 1 << 20)];
        let id = BackupIdentity {
            uuid: [1; 16],
            base: None,
        };
        for identity in [None, Some(&id)] {
            let w = StreamWriter::with_identity(Vec::new(), 7, &devices, identity).unwrap();
            let bytes = w.finish().unwrap();
            let (sizes, used) = StreamProgress::<Vec<u8>>::parse_preamble(&bytes).unwrap();
            assert_eq!(sizes, [1 << 20]);
            // What follows is the end record: 12 + 8 + 4 bytes.
            assert_eq!(used, bytes.len() - 24, "{identity:?}");
            assert_eq!(bytes[used], b'E');
        }
    }
}
