//! One client connection: the fixed-newstyle handshake ([`handshake`]),
//! then the transmission phase ([`transmission`]): the calling thread reads
//! the requests, a bounded pool of workers of the connection executes them
//! concurrently and writes each reply whole, in whatever order they finish.

mod handshake;
mod pool;
mod replies;
mod transmission;

pub use pool::MAX_IN_FLIGHT;

use std::borrow::Cow;
use std::io::{self, BufReader, IoSlice, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::backend::{nbd_errno, Backend};
use crate::limits::Limits;
use crate::proto::*;

/// A named export as the connection sees it.
pub(crate) struct Export {
    pub name: String,
    pub description: Option<String>,
    pub backend: Arc<dyn Backend>,
}

/// Finds the export a client named. The empty name selects the only export
/// when there is exactly one; with several exports it selects none.
pub(crate) fn resolve(exports: &[Export], name: &[u8]) -> Option<usize> {
    if name.is_empty() {
        return (exports.len() == 1).then_some(0);
    }
    exports.iter().position(|e| e.name.as_bytes() == name)
}

/// Transmission flags advertised for `backend`.
pub(crate) fn transmission_flags(backend: &dyn Backend) -> u16 {
    let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_CACHE;
    if backend.read_only() {
        flags |= FLAG_READ_ONLY;
    } else {
        flags |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
    }
    if backend.can_multi_conn() {
        flags |= FLAG_CAN_MULTI_CONN;
    }
    flags
}

fn protocol_error(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// A request that failed: the NBD error value and a message for humans.
struct Failure {
    errno: u32,
    msg: Cow<'static, str>,
}

fn fail(errno: u32, msg: &'static str) -> Failure {
    Failure {
        errno,
        msg: Cow::Borrowed(msg),
    }
}

fn backend_failure(what: &'static str, err: io::Error, fast_zero: bool) -> Failure {
    Failure {
        errno: nbd_errno(&err, fast_zero),
        msg: Cow::Owned(format!("{what}: {err}")),
    }
}

/// Writes `a` then `b` with as few syscalls as the kernel allows (one
/// `writev` in the common case).
fn write_two<W: Write>(w: &mut W, mut a: &[u8], mut b: &[u8]) -> io::Result<()> {
    while !a.is_empty() {
        match w.write_vectored(&[IoSlice::new(a), IoSlice::new(b)]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) if n < a.len() => a = &a[n..],
            Ok(n) => {
                b = &b[n - a.len()..];
                a = &[];
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    w.write_all(b)
}

/// Reads and discards exactly `len` bytes, by `deadline` if given.
fn drain<R: Read>(
    r: &mut BufReader<R>,
    limits: &Limits,
    mut len: u64,
    deadline: Option<Instant>,
) -> io::Result<()> {
    let mut scratch = [0u8; 16384];
    while len > 0 {
        let n = len.min(scratch.len() as u64) as usize;
        read_by(r, limits, &mut scratch[..n], deadline)?;
        len -= n as u64;
    }
    Ok(())
}

/// Whether a read error is the socket's receive timeout (the server sets
/// it to a short tick in transmission, so that waits can check deadlines
/// without a system call per request).
fn is_tick(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Fills `buf` from `r`; with a `deadline`, fails with `TimedOut` once it
/// has passed and the bytes have not all arrived (checked after every read
/// and at every tick of the socket's receive timeout). Bytes already
/// buffered cost no system call.
fn read_by<R: Read>(
    r: &mut BufReader<R>,
    limits: &Limits,
    buf: &mut [u8],
    deadline: Option<Instant>,
) -> io::Result<()> {
    if r.buffer().len() >= buf.len() {
        return r.read_exact(buf);
    }
    let mut filled = 0;
    while filled < buf.len() {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            limits.timed_out.fetch_add(1, Ordering::Relaxed);
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client stopped sending in the middle of a request",
            ));
        }
        match r.read(&mut buf[filled..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted || is_tick(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Per-connection state.
pub(crate) struct Connection<'a, R: Read, W: Write> {
    rd: BufReader<R>,
    wr: W,
    exports: &'a [Export],
    stopping: &'a AtomicBool,
    fixed_newstyle: bool,
    no_zeroes: bool,
    structured: bool,
    /// Export for which `base:allocation` was selected by the last
    /// `NBD_OPT_SET_META_CONTEXT`.
    meta_export: Option<usize>,
    /// Option payloads (handshake only; given back before transmission).
    buf: Vec<u8>,
    /// Capacity of `buf` counted in the server's buffered bytes.
    accounted: usize,
    /// Option replies being assembled; reused.
    out: Vec<u8>,
    limits: &'a Limits,
    /// Shuts the connection down at once (both directions): called when a
    /// reply could only be cut short, so the client does not wait for it.
    kill: &'a (dyn Fn() + Sync),
    /// Execute requests one by one on the connection's own thread, in
    /// order, instead of on the worker pool ([`Server::serve_stream`]).
    ///
    /// [`Server::serve_stream`]: crate::Server::serve_stream
    serial: bool,
}

impl<'a, R: Read, W: Write + Send> Connection<'a, R, W> {
    /// A connection reading `rd` and writing `wr`, under the server's
    /// `limits`. In transmission, `rd` may time out (a tick, see
    /// [`crate::server`]): waits simply go on, checking request deadlines.
    pub(crate) fn new(
        rd: R,
        wr: W,
        exports: &'a [Export],
        stopping: &'a AtomicBool,
        limits: &'a Limits,
        kill: &'a (dyn Fn() + Sync),
    ) -> Self {
        Connection {
            rd: BufReader::with_capacity(64 * 1024, rd),
            wr,
            exports,
            stopping,
            fixed_newstyle: false,
            no_zeroes: false,
            structured: false,
            meta_export: None,
            buf: Vec::new(),
            accounted: 0,
            out: Vec::with_capacity(4096),
            limits,
            kill,
            serial: false,
        }
    }

    /// Requests are executed in order on the connection's own thread, no
    /// worker pool (for [`crate::Server::serve_stream`]).
    pub(crate) fn serial(mut self) -> Self {
        self.serial = true;
        self
    }

    /// Makes `buf` `len` bytes long, counting what it allocates.
    fn resize_buf(&mut self, len: usize) {
        self.buf.resize(len, 0);
        let cap = self.buf.capacity();
        if cap > self.accounted {
            self.limits.grow(cap - self.accounted);
            self.accounted = cap;
        }
    }

    /// Runs the connection to its end, calling `entering_transmission` once
    /// the handshake has succeeded. `Ok` means the client disconnected
    /// cleanly (abort, `NBD_CMD_DISC`, or EOF between requests); an error means
    /// an I/O failure or a protocol violation that ended the connection.
    pub(crate) fn run(mut self, entering_transmission: impl FnOnce()) -> io::Result<()> {
        let chosen = self.handshake();
        // The option buffer is done with: transmission has buffers of its own.
        self.limits.shrink(self.accounted);
        self.accounted = 0;
        self.buf = Vec::new();
        match chosen? {
            Some(export) => {
                entering_transmission();
                self.transmission(export)
            }
            None => Ok(()),
        }
    }

    fn read_array<const N: usize>(&mut self) -> io::Result<[u8; N]> {
        let mut a = [0u8; N];
        self.rd.read_exact(&mut a)?;
        Ok(a)
    }
}
