//! The control connection: `cbw-tap backup` asks the server for a backup and
//! receives the cluster stream.
//!
//! Over a Unix socket (mode 0600), all text lines are one JSON object:
//!
//! 1. client → server: the request,
//!    `{"request":"backup","buffer":BYTES,"cbw_timeout":SECONDS,"policy":"break-snapshot","bwlimit":BYTES_PER_SECOND}`
//!    (every field but `request` optional; `bwlimit` null or absent: none;
//!    optional `"fleecing":"/ABSOLUTE/PATH"`);
//! 2. server → client: `{"ok":true,"time":UNIX_TIME,"devices":[{"name":…,"size":…}]}`
//!    once the instant is taken, or `{"ok":false,"error":"…"}` (e.g. a
//!    backup is already running) and the connection ends;
//! 3. server → client: the cluster stream in frames (4-byte big-endian
//!    length, payload), then an empty frame;
//! 4. server → client: the final status,
//!    `{"ok":true|false,"error":"…","stats":{…}}`.
//!
//! The client sends nothing after the request: if the connection closes
//! (the client died, or its stdout broke), the server aborts the backup.
//! A slow consumer only slows the backup down (guest writes are protected
//! by `cbw_timeout` and the policy); once a backup is aborted, the server
//! stops writing to a consumer that makes no progress for a second.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use serde_json::{json, Value};
use vma_cli::{exit, Failure};

use crate::engine::{BackupOptions, Engine, Policy};
use crate::relay::{Blocked, Relay};
use crate::sink::{FramedWriter, StreamSink, MAX_FRAME};
use crate::stats::Stats;

/// Longest request or reply line.
const MAX_LINE: usize = 64 * 1024;

/// How often a blocked write to the client checks whether to give up.
const STALL_POLL: Duration = Duration::from_secs(1);

/// How long a failed backup's client waits for a consumer that makes no
/// progress before it exits.
const ABORT_GRACE: Duration = Duration::from_secs(2);

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

fn read_line(r: &mut impl BufRead, what: &str) -> io::Result<Value> {
    let mut line = Vec::new();
    r.take(MAX_LINE as u64).read_until(b'\n', &mut line)?;
    if line.last() != Some(&b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("the {what} line is missing, cut short or longer than {MAX_LINE} bytes"),
        ));
    }
    serde_json::from_slice(&line).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the {what} line is not JSON: {e}"),
        )
    })
}

fn write_line(w: &mut impl Write, v: &Value) -> io::Result<()> {
    let mut line = serde_json::to_vec(v).map_err(io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line)?;
    w.flush()
}

/// The request line for `options`.
pub fn request(options: &BackupOptions) -> Value {
    json!({
        "request": "backup",
        "buffer": options.buffer,
        "cbw_timeout": options.cbw_timeout.as_secs_f64(),
        "policy": options.policy.as_str(),
        "bwlimit": options.bwlimit,
        "fleecing": options.fleecing.as_ref().map(|p| p.to_string_lossy().into_owned()),
    })
}

/// Parses a request line.
pub fn parse_request(v: &Value) -> Result<BackupOptions, String> {
    if v.get("request").and_then(Value::as_str) != Some("backup") {
        return Err("unknown request (expected \"backup\")".into());
    }
    let mut o = BackupOptions::default();
    if let Some(b) = v.get("buffer") {
        o.buffer = b
            .as_u64()
            .and_then(|b| usize::try_from(b).ok())
            .ok_or("buffer must be a byte count")?;
    }
    if let Some(t) = v.get("cbw_timeout") {
        let t = t
            .as_f64()
            .filter(|t| t.is_finite() && *t > 0.0 && *t <= 86400.0 * 365.0)
            .ok_or("cbw_timeout must be a positive number of seconds")?;
        o.cbw_timeout = Duration::from_secs_f64(t);
    }
    if let Some(p) = v.get("policy") {
        o.policy = p
            .as_str()
            .and_then(Policy::parse)
            .ok_or("policy must be break-snapshot or break-guest-write")?;
    }
    match v.get("fleecing") {
        None | Some(Value::Null) => {}
        Some(f) => {
            let f = f
                .as_str()
                .filter(|f| f.starts_with('/'))
                .ok_or("fleecing must be an absolute path")?;
            o.fleecing = Some(PathBuf::from(f));
        }
    }
    match v.get("bwlimit") {
        None | Some(Value::Null) => {}
        Some(b) => {
            o.bwlimit = Some(
                b.as_u64()
                    .filter(|&b| b > 0)
                    .ok_or("bwlimit must be a positive byte count per second")?,
            )
        }
    }
    Ok(o)
}

/// How a backup requested over the control socket ended.
#[derive(Debug)]
pub struct Outcome {
    /// Its instant (Unix time).
    pub time: i64,
    /// `Err(reason)` if it was aborted.
    pub result: Result<(), String>,
    /// Its counters.
    pub stats: Stats,
}

/// Serves one control connection on the server side: reads the request,
/// takes the instant, streams the backup, sends the final status. Returns
/// when the backup has ended, with its outcome (`None` if none began:
/// a bad request, or refused).
pub fn handle_control(engine: &Arc<Engine>, stream: UnixStream) -> Option<Outcome> {
    let reader = stream.try_clone().ok()?;
    let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
    let mut reader = BufReader::new(reader);
    let mut out = &stream;
    let options = match read_line(&mut reader, "request")
        .map_err(|e| e.to_string())
        .and_then(|v| parse_request(&v))
    {
        Ok(o) => o,
        Err(e) => {
            let _ = write_line(&mut out, &json!({"ok": false, "error": e}));
            return None;
        }
    };
    let backup = match engine.begin(options) {
        Ok(b) => b,
        Err(e) => {
            let _ = write_line(&mut out, &json!({"ok": false, "error": e.to_string()}));
            return None;
        }
    };
    // From here on the backup must end whatever happens.
    let devices: Vec<Value> = backup
        .devices()
        .into_iter()
        .map(|(name, size)| json!({"name": name, "size": size}))
        .collect();
    let reply = json!({"ok": true, "time": backup.time(), "devices": devices});
    if write_line(&mut out, &reply).is_err() {
        backup.abort("the backup client went away before the backup started");
    }
    // Writes wake up every second to see whether the backup was aborted
    // meanwhile (see FramedWriter).
    let _ = stream.set_write_timeout(Some(STALL_POLL));

    // Any byte or EOF from the client means it is gone (it sends nothing).
    let _ = stream.set_read_timeout(None);
    let watcher = {
        let backup = Arc::clone(&backup);
        thread::Builder::new()
            .name("cbw-watch".into())
            .spawn(move || {
                let mut b = [0u8; 1];
                let _ = reader.read(&mut b);
                backup.abort("the backup client went away (control connection closed)");
            })
            .ok()
    };
    let result = engine.run(&backup, |b| {
        StreamSink::new(FramedWriter::new(&stream, Some(Arc::clone(&backup))), b)
    });
    let stats = backup.stats();
    let status = match &result {
        Ok(()) => json!({"ok": true, "stats": stats.to_json()}),
        Err(reason) => json!({"ok": false, "error": reason, "stats": stats.to_json()}),
    };
    let _ = FramedWriter::new(&stream, None)
        .end()
        .and_then(|mut s| write_line(&mut s, &status));
    let _ = stream.shutdown(std::net::Shutdown::Both);
    if let Some(w) = watcher {
        let _ = w.join();
    }
    Some(Outcome {
        time: backup.time(),
        result,
        stats,
    })
}

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

/// Runs `cmd` with `sh -c`, its output going to our stderr (stdout carries
/// the stream), with `CBW_TAP_HOOK` set to `phase`.
fn run_hook(phase: &str, cmd: &str) -> Result<(), String> {
    let status = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("CBW_TAP_HOOK", phase)
        .stdin(Stdio::null())
        .stdout(io::stderr())
        .status()
        .map_err(|e| format!("{phase} hook `{cmd}`: cannot run sh: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{phase} hook `{cmd}` failed ({status})"))
    }
}

impl BackupClient {
    /// Runs the backup: connects, runs the pre hook, asks for the instant,
    /// runs the post hook, copies the cluster stream to `out`, and returns
    /// the server's counters if the stream was finished cleanly.
    ///
    /// Failures (all exit code 3 but usage errors): cannot connect, a hook
    /// failed (pre: no backup is made), the server refused (a backup is
    /// running), the backup was aborted (its reason), the control
    /// connection broke, or `out` failed (the connection is then closed, so
    /// the server aborts the backup).
    ///
    /// `out` is written by a thread of its own (see [`crate::relay`]): when
    /// the server gives up on a consumer that is alive but does not read,
    /// this returns soon after the server closes the connection, rather
    /// than staying blocked on `out`; such a thread is then left blocked
    /// (exit the process).
    pub fn run<W: Write + Send + 'static>(&self, out: W) -> Result<Stats, BackupFailure> {
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
                return Err(Failure::new(exit::IO, e).into());
            }
        }
        let mut w = &conn;
        let sent = write_line(&mut w, &request(&self.options));
        let mut rd = BufReader::with_capacity(256 << 10, &conn);
        let reply = sent.and_then(|()| read_line(&mut rd, "reply"));
        if let Some(post) = &self.post {
            if let Err(e) = run_hook("post", post) {
                // The instant is taken; a failed thaw is worth a warning,
                // not a lost backup.
                eprintln!("cbw-tap backup: warning: {e}");
            }
        }
        let reply = reply.map_err(|e| Failure::new(exit::IO, format!("{ctl}: {e}")))?;
        if reply.get("ok").and_then(Value::as_bool) != Some(true) {
            let why = reply
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("refused without a reason");
            return Err(
                Failure::new(exit::IO, format!("{ctl}: server refused the backup: {why}")).into(),
            );
        }
        let relay = Relay::start(out, &conn)
            .map_err(|e| Failure::new(exit::IO, format!("cannot start a thread: {e}")))?;
        let gone = |e: io::Error| -> BackupFailure {
            // Closing the connection (by returning) aborts the backup.
            let _ = conn.shutdown(std::net::Shutdown::Both);
            Failure::new(
                exit::IO,
                format!("stdout: {e}: the consumer is gone, backup aborted"),
            )
            .into()
        };
        // What the server had sent when it hung up while stdout was blocked.
        let mut drained: Option<io::Cursor<Vec<u8>>> = None;
        let broke_off = |e: io::Error, drained: bool| -> BackupFailure {
            if let Some(out) = relay.output_error() {
                return gone(out);
            }
            let why = if drained {
                "the server closed the connection before the end of the stream while stdout was blocked (the consumer does not read): backup aborted".to_string()
            } else {
                format!("the cluster stream broke off: {e}")
            };
            Failure::new(exit::IO, format!("{ctl}: {why}")).into()
        };
        loop {
            let src: &mut dyn BufRead = match drained.as_mut() {
                Some(d) => d,
                None => &mut rd,
            };
            let mut len = [0u8; 4];
            if let Err(e) = src.read_exact(&mut len) {
                return Err(broke_off(e, drained.is_some()));
            }
            let len = u32::from_be_bytes(len) as usize;
            if len == 0 {
                break;
            }
            if len > MAX_FRAME {
                let e = io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("frame of {len} bytes, more than {MAX_FRAME}"),
                );
                return Err(broke_off(e, false));
            }
            let mut chunk = relay.buffer(len);
            if let Err(e) = src.read_exact(&mut chunk) {
                return Err(broke_off(e, drained.is_some()));
            }
            let watch = if drained.is_none() { Some(&conn) } else { None };
            match relay.push(chunk, watch) {
                Ok(()) => {}
                Err(Blocked::Output(e)) => return Err(gone(e)),
                Err(Blocked::ServerHungUp) => {
                    // All the server sent is in the socket: take it, so
                    // the outcome is known without waiting for stdout.
                    let mut rest = Vec::new();
                    if let Err(e) = rd.read_to_end(&mut rest) {
                        return Err(broke_off(e, true));
                    }
                    drained = Some(io::Cursor::new(rest));
                }
            }
        }
        let src: &mut dyn BufRead = match drained.as_mut() {
            Some(d) => d,
            None => &mut rd,
        };
        let status = read_line(&mut &mut *src, "final status").map_err(|e| {
            Failure::new(
                exit::IO,
                format!("{ctl}: no final status from the server: {e}"),
            )
        })?;
        let stats = status.get("stats").map(Stats::from_json);
        if status.get("ok").and_then(Value::as_bool) == Some(true) {
            // A complete backup: the consumer gets it, however slowly.
            relay.finish(None).map_err(gone)?;
            Ok(stats.unwrap_or_default())
        } else {
            // Failed anyway: let the consumer see the abort record if it
            // reads, but do not wait for one that does not.
            let _ = relay.finish(Some(ABORT_GRACE));
            let why = status
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("no reason given");
            Err(BackupFailure {
                failure: Failure::new(exit::IO, format!("backup aborted: {why}")),
                stats: stats.map(Box::new),
            })
        }
    }
}
