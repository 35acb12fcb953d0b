//! The consumer's end of a backup's stream, on the server side.
//!
//! `cbw-tap backup` passes its stdout (the pipe into `vma-encode -`) to the
//! server over the control socket (`SCM_RIGHTS`), and the server's stream
//! writer writes the cluster stream straight into it: no byte of the
//! stream passes through the client, which only waits for the final
//! status. A pipe is enlarged to 1 MiB (fewer wake-ups of both sides).
//!
//! A consumer may be alive and not read (`| sleep 1000`, a wedged
//! pipeline). While the backup runs that only slows it down; once it is
//! over (aborted, e.g. a guest write's copy timed out) the writer gives up
//! on a consumer that makes no progress for a second, so the backup ends
//! and the client learns why. For that a pipe is written through a
//! non-blocking open file description of its own (`/proc/self/fd/N`
//! reopened: setting `O_NONBLOCK` on the passed one would change the
//! client's stdout, shared with whoever else holds it), a socket with a
//! send timeout; anything else (a file, `/dev/null`) never blocks for long.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nbd_server::sync::lock;
use rustix::event::{poll, PollFd, PollFlags};
use rustix::fs::{Mode, OFlags};

use crate::engine::Backup;

/// How long a write to a consumer that does not read waits before it
/// looks again whether the backup is over.
pub const STALL_POLL: Duration = Duration::from_secs(1);

/// Size asked for a pipe to the consumer.
const PIPE_SIZE: usize = 1 << 20;

/// What became of the output, for the final status.
#[derive(Debug, Default)]
pub struct OutputReport {
    /// Writing failed while the backup ran (the consumer is gone): the
    /// error, as `io::Error` displays it.
    error: Mutex<Option<String>>,
    /// The backup was over and the consumer made no progress: the writer
    /// gave up on it.
    stalled: AtomicBool,
}

impl OutputReport {
    /// The write error that ended the backup, if one did.
    pub fn error(&self) -> Option<String> {
        lock(&self.error).clone()
    }

    /// Whether the writer gave up on a consumer that did not read.
    pub fn stalled(&self) -> bool {
        self.stalled.load(Ordering::Relaxed)
    }
}

/// The consumer's descriptor as a [`Write`] for the stream writer.
pub struct ConsumerOutput {
    file: File,
    /// Writes return `WouldBlock` instead of waiting.
    nonblocking: bool,
    backup: Arc<Backup>,
    report: Arc<OutputReport>,
}

impl ConsumerOutput {
    /// Writes into `fd` (received from the client) for `backup`, noting in
    /// `report` how it ended.
    pub fn new(fd: OwnedFd, backup: Arc<Backup>, report: Arc<OutputReport>) -> ConsumerOutput {
        let file = File::from(fd);
        let kind = file.metadata().map(|m| m.file_type()).ok();
        let mut out = ConsumerOutput {
            file,
            nonblocking: false,
            backup,
            report,
        };
        match kind {
            Some(k) if k.is_fifo() => {
                let _ = rustix::pipe::fcntl_setpipe_size(&out.file, PIPE_SIZE);
                let path = format!("/proc/self/fd/{}", out.file.as_raw_fd());
                let flags = OFlags::WRONLY | OFlags::NONBLOCK | OFlags::CLOEXEC;
                if let Ok(fd) = rustix::fs::open(path.as_str(), flags, Mode::empty()) {
                    out.file = File::from(fd);
                    out.nonblocking = true;
                }
            }
            Some(k) if k.is_socket() => {
                let _ = rustix::net::sockopt::set_socket_timeout(
                    &out.file,
                    rustix::net::sockopt::Timeout::Send,
                    Some(STALL_POLL),
                );
            }
            _ => {}
        }
        out
    }

    /// Waits up to [`STALL_POLL`] for room; `false` if none came.
    fn wait_writable(&self) -> bool {
        if !self.nonblocking {
            // A socket's send timeout already waited.
            return false;
        }
        let mut fds = [PollFd::new(&self.file, PollFlags::OUT)];
        let t = rustix::event::Timespec {
            tv_sec: STALL_POLL.as_secs() as _,
            tv_nsec: 0,
        };
        matches!(poll(&mut fds, Some(&t)), Ok(n) if n > 0)
    }
}

impl Write for ConsumerOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[io::IoSlice::new(buf)])
    }

    /// One `writev`: the stream writer hands a record header and a cluster
    /// body in place (no copy into a buffer).
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        loop {
            match (&self.file).write_vectored(bufs) {
                Ok(n) => {
                    self.backup.count_emitted_bytes(n as u64);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    // A slow consumer only slows the backup down; once it
                    // is over, one that makes no progress is given up.
                    if !self.wait_writable() && self.backup.is_over() {
                        self.report.stalled.store(true, Ordering::Relaxed);
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the consumer stopped reading",
                        ));
                    }
                }
                Err(e) => {
                    if !self.backup.is_over() {
                        lock(&self.report.error).get_or_insert_with(|| e.to_string());
                    }
                    return Err(e);
                }
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
