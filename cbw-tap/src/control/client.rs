//! `cbw-tap backup`'s side of a control connection.

use std::io::{self, BufReader, IoSlice, Write};
use std::mem::MaybeUninit;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};

use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use vma_cli::{exit, Failure};

use super::{line_of, read_line, request, Reply, Status};
use crate::engine::BackupOptions;
use crate::stats::Stats;

/// What `cbw-tap backup` does, apart from flag parsing.
#[derive(Clone, Debug)]
pub struct BackupClient {
    /// The server's control socket.
    pub control: PathBuf,
    /// Settings sent to the server.
    pub options: BackupOptions,
    /// Shell command run before the instant (e.g. freeze file systems).
    pub pre: Option<String>,
    /// Shell command run right after the instant (e.g. thaw), also when the
    /// pre hook or the request failed.
    pub post: Option<String>,
    /// Where to put the device bytes the stream will cover once the server
    /// says (the progress total: an incremental stream covers only the
    /// changed clusters).
    pub total: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
}

/// A failed backup: the message (one line) and the exit code, plus the
/// server's counters if it got that far.
#[derive(Debug)]
pub struct BackupFailure {
    /// Code and message.
    pub failure: Failure,
    /// Counters from the server's final status, if received.
    pub stats: Option<Box<Stats>>,
}

impl From<Failure> for BackupFailure {
    fn from(failure: Failure) -> Self {
        BackupFailure {
            failure,
            stats: None,
        }
    }
}

/// Why a hook failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// `sh` could not be started.
    #[error("{phase} hook `{cmd}`: cannot run sh: {source}")]
    CannotRun {
        /// `pre` or `post`.
        phase: &'static str,
        /// The command.
        cmd: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The command exited unsuccessfully.
    #[error("{phase} hook `{cmd}` failed ({status})")]
    Failed {
        /// `pre` or `post`.
        phase: &'static str,
        /// The command.
        cmd: String,
        /// How it exited.
        status: ExitStatus,
    },
}

/// Runs `cmd` with `sh -c`, its output going to our stderr (stdout carries
/// the stream), with `CBW_TAP_HOOK` set to `phase`.
fn run_hook(phase: &'static str, cmd: &str) -> Result<(), HookError> {
    let status = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("CBW_TAP_HOOK", phase)
        .stdin(Stdio::null())
        .stdout(io::stderr())
        .status()
        .map_err(|source| HookError::CannotRun {
            phase,
            cmd: cmd.into(),
            source,
        })?;
    if status.success() {
        Ok(())
    } else {
        Err(HookError::Failed {
            phase,
            cmd: cmd.into(),
            status,
        })
    }
}

/// Sends `line` on `conn` with `out` attached (`SCM_RIGHTS`).
fn send_with_fd(conn: &UnixStream, line: &[u8], out: impl AsFd) -> io::Result<()> {
    let fds = [out.as_fd()];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    control.push(SendAncillaryMessage::ScmRights(&fds));
    let sent = loop {
        match sendmsg(
            conn,
            &[IoSlice::new(line)],
            &mut control,
            SendFlags::NOSIGNAL,
        ) {
            Ok(n) => break n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    };
    // The descriptor went with the first byte; the rest of a line the
    // kernel took only in part follows plainly.
    let mut w = conn;
    w.write_all(&line[sent..])
}

impl BackupClient {
    /// Runs the backup: connects, runs the pre hook, asks for the instant
    /// handing the server `out` (our stdout), runs the post hook, and waits
    /// for the server to have written the cluster stream into `out`.
    /// Returns the server's counters if the stream was finished cleanly.
    ///
    /// Failures (all exit code 3 but usage errors): cannot connect, a hook
    /// failed (pre: no backup is made), the server refused (a backup is
    /// running), the backup was aborted (its reason), the control
    /// connection broke, `out` failed (the consumer is gone), or the server
    /// gave up on a consumer that does not read after the backup was
    /// aborted. The last two are reported as such, not as the abort they
    /// caused. None of them waits for the consumer: the server has stopped
    /// writing to it when its final status comes.
    pub fn run(&self, out: impl AsFd) -> Result<Stats, BackupFailure> {
        self.run_with(out, &mut || Ok(()))
    }

    /// [`run`](Self::run) for a consumer the client runs itself
    /// (`options.confirm`): `out` is closed once handed to the server; once
    /// the stream is finished, `consumer_done` waits for the consumer
    /// (after closing whatever else feeds it) and says whether it
    /// succeeded. Only then is the server told to record the backup as
    /// completed; else the run fails with its message.
    pub fn run_with(
        &self,
        out: impl AsFd,
        consumer_done: &mut dyn FnMut() -> Result<(), String>,
    ) -> Result<Stats, BackupFailure> {
        let ctl = self.control.display().to_string();
        let conn = UnixStream::connect(&self.control)
            .map_err(|e| Failure::new(exit::IO, format!("{ctl}: cannot connect: {e}")))?;
        if let Some(pre) = &self.pre {
            if let Err(e) = run_hook("pre", pre) {
                if let Some(post) = &self.post {
                    if let Err(e2) = run_hook("post", post) {
                        eprintln!("cbw-tap backup: {e2}");
                    }
                }
                return Err(Failure::new(exit::IO, e.to_string()).into());
            }
        }
        let sent = line_of(&request(&self.options)).and_then(|l| send_with_fd(&conn, &l, out));
        let mut rd = BufReader::new(&conn);
        let reply = sent.and_then(|()| read_line::<Reply>(&mut rd, "reply"));
        if let (Some(total), Ok(r)) = (&self.total, &reply) {
            // At once: the stream is already flowing.
            let bytes = r.bytes.unwrap_or(crate::cli::NO_TOTAL);
            total.store(bytes, std::sync::atomic::Ordering::Release);
        }
        if let Some(post) = &self.post {
            if let Err(e) = run_hook("post", post) {
                // The instant is taken; a failed thaw is worth a warning,
                // not a lost backup.
                eprintln!("cbw-tap backup: warning: {e}");
            }
        }
        let reply = reply.map_err(|e| Failure::new(exit::IO, format!("{ctl}: {e}")))?;
        if !reply.ok {
            let why = reply.error.as_deref().unwrap_or("refused without a reason");
            return Err(
                Failure::new(exit::IO, format!("{ctl}: server refused the backup: {why}")).into(),
            );
        }
        if self.options.incremental {
            // Say which: an incremental request without a base is full.
            match &reply.base {
                Some((uuid, time)) => eprintln!(
                    "cbw-tap backup: incremental backup on base {uuid} of {time}"
                ),
                None => eprintln!(
                    "cbw-tap backup: no base to build on (first backup, unclean stop or failed backup): full backup"
                ),
            }
        }
        // The server writes the stream; we wait for its verdict, as long
        // as the stream takes.
        let status = read_line::<Status>(&mut rd, "final status").map_err(|e| {
            let why = if e.kind() == io::ErrorKind::UnexpectedEof {
                "the server closed the control connection before the final status".to_string()
            } else {
                e.to_string()
            };
            Failure::new(
                exit::IO,
                format!("{ctl}: the cluster stream broke off: {why}"),
            )
        })?;
        let stats = status.stats.map(Box::new);
        if status.ok && self.options.confirm {
            if let Err(why) = consumer_done() {
                // Closing the connection unconfirmed: not completed.
                return Err(BackupFailure {
                    failure: Failure::new(
                        exit::IO,
                        format!("{why} after the stream ended: the backup is not recorded as completed (the next backup is full)"),
                    ),
                    stats,
                });
            }
            let mut w = &conn;
            let confirmed = w.write_all(b"Y").and_then(|()| {
                // The server records it, then closes the connection.
                let mut rest = Vec::new();
                io::Read::read_to_end(&mut rd, &mut rest).map(|_| ())
            });
            if let Err(e) = confirmed {
                return Err(BackupFailure {
                    failure: Failure::new(
                        exit::IO,
                        format!("{ctl}: the consumer succeeded but the server could not be told ({e}): the backup may not be recorded as completed"),
                    ),
                    stats,
                });
            }
        }
        if status.ok {
            return Ok(stats.map(|s| *s).unwrap_or_default());
        }
        let message = if let Some(e) = status.output_error {
            format!("stdout: {e}: the consumer is gone, backup aborted")
        } else if status.output_stalled {
            format!("{ctl}: the server closed the connection before the end of the stream while stdout was blocked (the consumer does not read): backup aborted")
        } else {
            let why = status.error.as_deref().unwrap_or("no reason given");
            format!("backup aborted: {why}")
        };
        Err(BackupFailure {
            failure: Failure::new(exit::IO, message),
            stats,
        })
    }
}
