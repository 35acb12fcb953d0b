//! The control connection: `cbw-tap backup` asks the server for a backup,
//! hands it its stdout, and waits for the outcome.
//!
//! Over a Unix socket (mode 0600), every line is one JSON object:
//!
//! 1. client → server: the request,
//!    `{"request":"backup","buffer":BYTES,"cbw_timeout":SECONDS,"policy":"break-snapshot","bwlimit":BYTES_PER_SECOND}`
//!    (every field but `request` optional; `bwlimit` null or absent: none;
//!    optional `"fleecing":"/ABSOLUTE/PATH"` and `"cpus":"0,2-3"`), sent with the client's
//!    stdout attached (`SCM_RIGHTS`): the server writes the cluster stream
//!    straight into it, so no byte of the stream passes through the client;
//! 2. server → client: `{"ok":true,"time":UNIX_TIME,"devices":[{"name":…,"size":…}],"bytes":B}`
//!    (B: the device bytes the stream's clusters cover, the progress total)
//!    once the instant is taken, or `{"ok":false,"error":"…"}` (e.g. a
//!    backup is already running) and the connection ends;
//! 3. server → client, once the stream is over (finished, or aborted and
//!    the abort record written if the consumer still reads): the final
//!    status, `{"ok":true|false,"error":"…","stats":{…}}`, with
//!    `"output_error":"…"` if writing the stream failed while the backup
//!    ran (the consumer is gone) and `"output_stalled":true` if the server
//!    gave up on a consumer that did not read after the backup was over.
//!
//! 4. with `"confirm":true` in the request (`cbw-tap backup -- CONSUMER…`,
//!    which runs the consumer itself), after a finished stream: client →
//!    server one byte `Y` once the consumer has exited 0; only then does
//!    the server record the backup as completed (the base of the next
//!    incremental one), and it closes the connection after recording. If
//!    the connection closes without it, the backup is not completed.
//!
//! The client sends nothing else after the request: if the connection closes
//! (the client died), the server aborts the backup. A slow consumer only
//! slows the backup down (guest writes are protected by `cbw_timeout` and
//! the policy); once a backup is aborted, the server stops writing to a
//! consumer that makes no progress for a second (see [`crate::output`]).

mod client;
mod server;

pub use client::{BackupClient, BackupFailure};
pub use server::{handle_control, Outcome};

use std::io::{self, BufRead, Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::engine::{BackupOptions, Policy};
use crate::stats::Stats;

/// Longest request or reply line.
const MAX_LINE: usize = 64 * 1024;

/// A backup request, as sent.
#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    /// Always `"backup"`.
    pub request: String,
    /// `--buffer`, bytes.
    pub buffer: Option<u64>,
    /// `--cbw-timeout`, seconds.
    pub cbw_timeout: Option<f64>,
    /// `--on-cbw-error`.
    pub policy: Option<String>,
    /// `--bwlimit`, bytes per second.
    pub bwlimit: Option<u64>,
    /// `--fleecing`, an absolute path.
    pub fleecing: Option<String>,
    /// `--incremental`: only what changed since the last completed backup.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub incremental: bool,
    /// The archive uuid (`--uuid-from`), 32 hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// The client runs the consumer and confirms its success after the
    /// final status: only then is the backup completed (see step 4).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub confirm: bool,
    /// `--cpus`, as `taskset -c` writes it (`0,2-3`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<String>,
}

/// A device of the backup, in the reply.
#[derive(Debug, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Export name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
}

/// The server's answer to the request.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the backup began.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The instant (Unix time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<i64>,
    /// The devices, in device order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<DeviceInfo>>,
    /// The archive uuid the stream names, 32 hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// For an incremental backup: the base's uuid (32 hex digits) and
    /// instant. Absent: the backup is full.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<(String, i64)>,
    /// Bytes of the devices the stream's clusters will cover (64 KiB per
    /// cluster, less past a device's end): the devices' sizes for a full
    /// backup, the changed clusters' for an incremental one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
}

/// The final status of a backup.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Status {
    /// Whether the stream was finished.
    pub ok: bool,
    /// Why the backup was aborted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Its counters.
    #[serde(default)]
    pub stats: Option<Stats>,
    /// Writing the stream failed while the backup ran: the error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_error: Option<String>,
    /// The server gave up on a consumer that did not read.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub output_stalled: bool,
}

/// Why a request line was refused (sent back as the reply's error).
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum RequestError {
    /// Not JSON, or a field of the wrong type.
    #[error("the request line is not a backup request: {0}")]
    Malformed(String),
    /// `request` is not `backup`.
    #[error("unknown request (expected \"backup\")")]
    Unknown,
    /// A bad `cbw_timeout`.
    #[error("cbw_timeout must be a positive number of seconds")]
    Timeout,
    /// A bad `policy`.
    #[error("policy must be break-snapshot or break-guest-write")]
    Policy,
    /// A bad `fleecing`.
    #[error("fleecing must be an absolute path")]
    Fleecing,
    /// A bad `bwlimit`.
    #[error("bwlimit must be a positive byte count per second")]
    Bwlimit,
    /// A bad `buffer`.
    #[error("buffer must be a byte count")]
    Buffer,
    /// A bad `uuid`.
    #[error("uuid must be 32 hex digits")]
    Uuid,
    /// A bad `cpus`.
    #[error("cpus: {0}")]
    Cpus(#[from] crate::cpus::CpuListError),
}

/// `b` as lowercase hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// 32 hex digits as 16 bytes.
pub fn unhex16(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Reads one line of at most [`MAX_LINE`] bytes and parses it as `T`.
fn read_line<T: for<'de> Deserialize<'de>>(r: &mut impl BufRead, what: &str) -> io::Result<T> {
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

/// `v` as one JSON line.
fn line_of(v: &impl Serialize) -> io::Result<Vec<u8>> {
    let mut line = serde_json::to_vec(v).map_err(io::Error::other)?;
    line.push(b'\n');
    Ok(line)
}

fn write_line(w: &mut impl Write, v: &impl Serialize) -> io::Result<()> {
    w.write_all(&line_of(v)?)?;
    w.flush()
}

/// The request for `options`.
pub fn request(options: &BackupOptions) -> Request {
    Request {
        request: "backup".into(),
        buffer: Some(options.buffer as u64),
        cbw_timeout: Some(options.cbw_timeout.as_secs_f64()),
        policy: Some(options.policy.as_str().into()),
        bwlimit: options.bwlimit,
        fleecing: options
            .fleecing
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned()),
        incremental: options.incremental,
        uuid: options.uuid.map(|u| hex(&u)),
        confirm: options.confirm,
        cpus: options.cpus.as_ref().map(ToString::to_string),
    }
}

/// Parses a request line.
pub fn parse_request(line: &[u8]) -> Result<BackupOptions, RequestError> {
    let r: Request =
        serde_json::from_slice(line).map_err(|e| RequestError::Malformed(e.to_string()))?;
    if r.request != "backup" {
        return Err(RequestError::Unknown);
    }
    let mut o = BackupOptions::default();
    if let Some(b) = r.buffer {
        o.buffer = usize::try_from(b).map_err(|_| RequestError::Buffer)?;
    }
    if let Some(t) = r.cbw_timeout {
        if !(t.is_finite() && t > 0.0 && t <= 86400.0 * 365.0) {
            return Err(RequestError::Timeout);
        }
        o.cbw_timeout = Duration::from_secs_f64(t);
    }
    if let Some(p) = r.policy {
        o.policy = Policy::parse(&p).ok_or(RequestError::Policy)?;
    }
    if let Some(f) = r.fleecing {
        if !f.starts_with('/') {
            return Err(RequestError::Fleecing);
        }
        o.fleecing = Some(PathBuf::from(f));
    }
    if let Some(b) = r.bwlimit {
        if b == 0 {
            return Err(RequestError::Bwlimit);
        }
        o.bwlimit = Some(b);
    }
    o.incremental = r.incremental;
    o.confirm = r.confirm;
    if let Some(u) = r.uuid {
        o.uuid = Some(unhex16(&u).ok_or(RequestError::Uuid)?);
    }
    if let Some(c) = r.cpus {
        o.cpus = Some(crate::cpus::CpuList::parse(&c)?);
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_and_refusals() {
        let mut o = BackupOptions {
            buffer: 1 << 20,
            cbw_timeout: Duration::from_millis(1500),
            policy: Policy::BreakGuestWrite,
            bwlimit: Some(123),
            fleecing: Some("/tmp/f".into()),
            incremental: true,
            uuid: Some([0xa5; 16]),
            confirm: true,
            cpus: crate::cpus::CpuList::new([0, 2, 3]),
        };
        let line = line_of(&request(&o)).unwrap();
        let back = parse_request(&line).unwrap();
        assert!(back.incremental);
        assert!(back.confirm);
        assert!(String::from_utf8_lossy(&line).contains(r#""cpus":"0,2-3""#));
        assert_eq!(back.cpus, o.cpus);
        assert_eq!(back.uuid, Some([0xa5; 16]));
        assert_eq!(
            (back.buffer, back.cbw_timeout, back.policy, back.bwlimit),
            (o.buffer, o.cbw_timeout, o.policy, o.bwlimit)
        );
        assert_eq!(back.fleecing, o.fleecing);
        o.bwlimit = None;
        assert_eq!(
            parse_request(&line_of(&request(&o)).unwrap())
                .unwrap()
                .bwlimit,
            None
        );
        let bad = |s: &str| parse_request(s.as_bytes()).unwrap_err();
        assert_eq!(bad(r#"{"request":"restore"}"#), RequestError::Unknown);
        assert_eq!(
            bad(r#"{"request":"backup","cbw_timeout":0}"#),
            RequestError::Timeout
        );
        assert_eq!(
            bad(r#"{"request":"backup","policy":"x"}"#),
            RequestError::Policy
        );
        assert_eq!(
            bad(r#"{"request":"backup","fleecing":"f"}"#),
            RequestError::Fleecing
        );
        assert_eq!(
            bad(r#"{"request":"backup","bwlimit":0}"#),
            RequestError::Bwlimit
        );
        assert_eq!(
            bad(r#"{"request":"backup","cpus":"1-x"}"#).to_string(),
            r#"cpus: "1-x" is not a CPU list (CPU numbers and ranges, e.g. 1 or 0,2-3)"#
        );
        assert!(matches!(bad("nope"), RequestError::Malformed(_)));
        // Absent and null fields are the defaults.
        let d = parse_request(br#"{"request":"backup","bwlimit":null}"#).unwrap();
        assert_eq!((d.buffer, d.bwlimit), (64 << 20, None));
    }
}
