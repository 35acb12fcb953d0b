//! One client connection: the fixed-newstyle handshake, then the
//! transmission phase, on the calling thread, requests answered in order.

use std::borrow::Cow;
use std::io::{self, BufReader, IoSlice, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::backend::{nbd_errno, Backend, ZeroFlags};
use crate::limits::Limits;
use crate::proto::*;
use crate::{MAX_OPTION_PAYLOAD, MAX_PAYLOAD, MAX_STRING, PREFERRED_BLOCK_SIZE, READ_CHUNK};

/// A named export as the connection sees it.
pub(crate) struct Export {
    pub name: String,
    pub description: Option<String>,
    pub backend: Arc<dyn Backend>,
}

/// Options longer than this are not even drained: the connection is dropped.
const MAX_DRAINED_OPTION: u32 = 16 * 1024 * 1024;
/// Most descriptors in one block-status reply.
const MAX_BLOCK_STATUS_EXTENTS: usize = 65536;
/// Longest human-readable message sent with an error.
const MAX_MESSAGE: usize = 1024;

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

/// A cursor over an option payload; every accessor fails on short data.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// The decoded payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
struct InfoRequest<'a> {
    name: &'a [u8],
    /// Requested `NBD_INFO_*` types, 2 bytes each.
    requests: &'a [u8],
}

fn parse_info(payload: &[u8]) -> Option<InfoRequest<'_>> {
    let mut c = Cursor(payload);
    let name_len = c.u32()? as usize;
    let name = c.take(name_len)?;
    let count = c.u16()? as usize;
    let requests = c.take(count * 2)?;
    c.0.is_empty().then_some(InfoRequest { name, requests })
}

/// The decoded payload of `NBD_OPT_LIST_META_CONTEXT` / `SET_META_CONTEXT`.
struct MetaRequest<'a> {
    name: &'a [u8],
    /// Whether a query selects `base:allocation`.
    base_allocation: bool,
}

fn parse_meta(payload: &[u8], list: bool) -> Option<MetaRequest<'_>> {
    let mut c = Cursor(payload);
    let name_len = c.u32()? as usize;
    let name = c.take(name_len)?;
    let count = c.u32()?;
    // Listing with no query lists everything; setting with none selects nothing.
    let mut base_allocation = list && count == 0;
    for _ in 0..count {
        let len = c.u32()? as usize;
        let query = c.take(len)?;
        if query == BASE_ALLOCATION.as_bytes() || (list && query == b"base:") {
            base_allocation = true;
        }
        // Other namespaces and unknown base: leaves are ignored, as the spec
        // demands.
    }
    c.0.is_empty().then_some(MetaRequest {
        name,
        base_allocation,
    })
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
    /// Option payloads, request and reply data; reused, grows to at most
    /// [`READ_CHUNK`] (larger writes borrow from the server's payload
    /// budget, larger reads are sent in pieces).
    buf: Vec<u8>,
    /// Capacity of `buf` counted in the server's buffered bytes.
    accounted: usize,
    /// Replies being assembled; reused.
    out: Vec<u8>,
    limits: &'a Limits,
}

impl<R: Read, W: Write> Drop for Connection<'_, R, W> {
    fn drop(&mut self) {
        self.limits.shrink(self.accounted);
    }
}

impl<'a, R: Read, W: Write> Connection<'a, R, W> {
    /// A connection reading `rd` and writing `wr`, under the server's
    /// `limits`. In transmission, `rd` may time out (a tick, see
    /// [`crate::server`]): waits simply go on, checking request deadlines.
    pub(crate) fn new(
        rd: R,
        wr: W,
        exports: &'a [Export],
        stopping: &'a AtomicBool,
        limits: &'a Limits,
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
        }
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
        match self.handshake()? {
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

    // ---------------------------------------------------------------- handshake

    /// Negotiates; returns the export to serve, or `None` if the client
    /// aborted.
    fn handshake(&mut self) -> io::Result<Option<usize>> {
        let mut hello = [0u8; 18];
        hello[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
        hello[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
        hello[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        self.wr.write_all(&hello)?;
        self.wr.flush()?;

        let client_flags = u32::from_be_bytes(self.read_array()?);
        if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(protocol_error("unknown client flags"));
        }
        self.fixed_newstyle = client_flags & FLAG_C_FIXED_NEWSTYLE != 0;
        self.no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;

        loop {
            let hdr: [u8; 16] = self.read_array()?;
            let magic = u64::from_be_bytes(hdr[..8].try_into().unwrap());
            let opt = u32::from_be_bytes(hdr[8..12].try_into().unwrap());
            let len = u32::from_be_bytes(hdr[12..].try_into().unwrap());
            if magic != IHAVEOPT {
                return Err(protocol_error("bad option magic"));
            }
            if !self.fixed_newstyle && opt != OPT_EXPORT_NAME {
                // Plain newstyle has no way to refuse an option.
                return Err(protocol_error(
                    "option other than EXPORT_NAME without fixed newstyle",
                ));
            }
            if opt == OPT_EXPORT_NAME && len as usize > MAX_STRING {
                return Err(protocol_error("export name too long"));
            }
            if len as usize > MAX_OPTION_PAYLOAD {
                if len > MAX_DRAINED_OPTION {
                    return Err(protocol_error("option payload too large"));
                }
                drain(&mut self.rd, self.limits, u64::from(len), None)?;
                self.option_reply(opt, REP_ERR_TOO_BIG, b"option payload too large");
                self.send_out()?;
                continue;
            }
            let len = len as usize;
            self.resize_buf(len);
            self.rd.read_exact(&mut self.buf[..len])?;

            if self.stopping.load(Ordering::Relaxed) && opt != OPT_ABORT {
                if opt == OPT_EXPORT_NAME {
                    return Err(protocol_error("server shutting down"));
                }
                self.option_reply(opt, REP_ERR_SHUTDOWN, b"server is shutting down");
                self.send_out()?;
                continue;
            }

            match opt {
                OPT_EXPORT_NAME => {
                    let Some(idx) = resolve(self.exports, &self.buf) else {
                        // EXPORT_NAME cannot be refused politely.
                        return Err(protocol_error("unknown export"));
                    };
                    let backend = &self.exports[idx].backend;
                    self.out.clear();
                    self.out.extend_from_slice(&backend.size().to_be_bytes());
                    self.out
                        .extend_from_slice(&transmission_flags(&**backend).to_be_bytes());
                    if !self.no_zeroes {
                        self.out.extend_from_slice(&[0u8; 124]);
                    }
                    self.send_out()?;
                    self.keep_meta_for(idx);
                    return Ok(Some(idx));
                }
                OPT_ABORT => {
                    self.option_reply(opt, REP_ACK, &[]);
                    // The client may already have closed; that is fine.
                    let _ = self.send_out();
                    return Ok(None);
                }
                OPT_LIST => {
                    if len != 0 {
                        self.option_reply(opt, REP_ERR_INVALID, b"LIST takes no data");
                    } else {
                        for e in self.exports {
                            let mut data = Vec::with_capacity(
                                4 + e.name.len() + e.description.as_ref().map_or(0, |d| d.len()),
                            );
                            data.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                            data.extend_from_slice(e.name.as_bytes());
                            if let Some(d) = &e.description {
                                data.extend_from_slice(d.as_bytes());
                            }
                            self.option_reply(opt, REP_SERVER, &data);
                        }
                        self.option_reply(opt, REP_ACK, &[]);
                    }
                    self.send_out()?;
                }
                OPT_INFO | OPT_GO => {
                    if let Some(idx) = self.info_or_go(opt) {
                        self.send_out()?;
                        if opt == OPT_GO {
                            self.keep_meta_for(idx);
                            return Ok(Some(idx));
                        }
                    } else {
                        self.send_out()?;
                    }
                }
                OPT_STRUCTURED_REPLY => {
                    if len != 0 {
                        self.option_reply(opt, REP_ERR_INVALID, b"STRUCTURED_REPLY takes no data");
                    } else {
                        self.structured = true;
                        self.option_reply(opt, REP_ACK, &[]);
                    }
                    self.send_out()?;
                }
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                    self.meta_context(opt);
                    self.send_out()?;
                }
                _ => {
                    // Includes STARTTLS (no TLS here) and EXTENDED_HEADERS, which
                    // QEMU tries first and then falls back from.
                    self.option_reply(opt, REP_ERR_UNSUP, b"option not supported");
                    self.send_out()?;
                }
            }
        }
    }

    /// Forgets the meta-context selection unless it was made for `export`.
    fn keep_meta_for(&mut self, export: usize) {
        if self.meta_export != Some(export) {
            self.meta_export = None;
        }
    }

    /// Appends one option reply to `out`.
    fn option_reply(&mut self, opt: u32, reply: u32, data: &[u8]) {
        self.out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
        self.out.extend_from_slice(&opt.to_be_bytes());
        self.out.extend_from_slice(&reply.to_be_bytes());
        self.out
            .extend_from_slice(&(data.len() as u32).to_be_bytes());
        self.out.extend_from_slice(data);
    }

    fn send_out(&mut self) -> io::Result<()> {
        let res = self.wr.write_all(&self.out).and_then(|()| self.wr.flush());
        self.out.clear();
        res
    }

    /// Answers INFO or GO into `out`; returns the export on success.
    fn info_or_go(&mut self, opt: u32) -> Option<usize> {
        let payload = std::mem::take(&mut self.buf);
        let result = self.info_or_go_inner(opt, &payload);
        self.buf = payload;
        result
    }

    fn info_or_go_inner(&mut self, opt: u32, payload: &[u8]) -> Option<usize> {
        let Some(req) = parse_info(payload) else {
            self.option_reply(opt, REP_ERR_INVALID, b"malformed INFO/GO request");
            return None;
        };
        let Some(idx) = resolve(self.exports, req.name) else {
            let msg = if req.name.is_empty() {
                Cow::Borrowed("no default export: name one of the exports")
            } else {
                Cow::Owned(format!(
                    "unknown export '{}'",
                    String::from_utf8_lossy(&req.name[..req.name.len().min(256)])
                ))
            };
            self.option_reply(opt, REP_ERR_UNKNOWN, msg.as_bytes());
            return None;
        };
        let export = &self.exports[idx];
        let backend = &*export.backend;

        let mut info = [0u8; 14];
        info[..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
        info[2..10].copy_from_slice(&backend.size().to_be_bytes());
        info[10..12].copy_from_slice(&transmission_flags(backend).to_be_bytes());
        self.option_reply(opt, REP_INFO, &info[..12]);

        // Our limits are the protocol defaults, so sending them unasked is
        // harmless and spares clients a guess.
        let mut bs = [0u8; 14];
        bs[..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        bs[2..6].copy_from_slice(&1u32.to_be_bytes());
        bs[6..10].copy_from_slice(&PREFERRED_BLOCK_SIZE.to_be_bytes());
        bs[10..14].copy_from_slice(&(MAX_PAYLOAD as u32).to_be_bytes());
        self.option_reply(opt, REP_INFO, &bs);

        for r in req.requests.chunks_exact(2) {
            let kind = u16::from_be_bytes([r[0], r[1]]);
            let text = match kind {
                INFO_NAME => Some(export.name.as_bytes()),
                INFO_DESCRIPTION => export.description.as_deref().map(str::as_bytes),
                _ => None,
            };
            if let Some(text) = text {
                let mut data = Vec::with_capacity(2 + text.len());
                data.extend_from_slice(&kind.to_be_bytes());
                data.extend_from_slice(text);
                self.option_reply(opt, REP_INFO, &data);
            }
        }
        self.option_reply(opt, REP_ACK, &[]);
        Some(idx)
    }

    /// Answers LIST_META_CONTEXT / SET_META_CONTEXT into `out`.
    fn meta_context(&mut self, opt: u32) {
        let set = opt == OPT_SET_META_CONTEXT;
        if set {
            // A SET replaces the selection even when it fails.
            self.meta_export = None;
        }
        if !self.structured {
            self.option_reply(opt, REP_ERR_INVALID, b"negotiate structured replies first");
            return;
        }
        let payload = std::mem::take(&mut self.buf);
        let (reply, ctx) = match parse_meta(&payload, !set) {
            None => (
                Some((REP_ERR_INVALID, "malformed meta context request")),
                None,
            ),
            Some(req) => match resolve(self.exports, req.name) {
                None => (Some((REP_ERR_UNKNOWN, "unknown export")), None),
                Some(idx) => (None, req.base_allocation.then_some(idx)),
            },
        };
        self.buf = payload;
        if let Some((err, msg)) = reply {
            self.option_reply(opt, err, msg.as_bytes());
            return;
        }
        if let Some(idx) = ctx {
            let id = if set { BASE_ALLOCATION_ID } else { 0 };
            let mut data = Vec::with_capacity(4 + BASE_ALLOCATION.len());
            data.extend_from_slice(&id.to_be_bytes());
            data.extend_from_slice(BASE_ALLOCATION.as_bytes());
            self.option_reply(opt, REP_META_CONTEXT, &data);
            if set {
                self.meta_export = Some(idx);
            }
        }
        self.option_reply(opt, REP_ACK, &[]);
    }

    // ------------------------------------------------------------- transmission

    fn transmission(&mut self, export: usize) -> io::Result<()> {
        let backend = Arc::clone(&self.exports[export].backend);
        let backend = &*backend;
        let size = backend.size();
        let block_status_ok = self.meta_export == Some(export);
        loop {
            let mut hdr = [0u8; 28];
            // Idle between requests: no deadline, ticks are ignored. EOF
            // right at a request boundary is a (rude but) clean end.
            let first = loop {
                match self.rd.read(&mut hdr[..1]) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted || is_tick(&e) => {}
                    Err(e) => return Err(e),
                }
            };
            if first == 0 {
                return Ok(());
            }
            // From its first byte, the whole request must arrive in time.
            let deadline = self.limits.request_timeout.map(|t| Instant::now() + t);
            read_by(&mut self.rd, self.limits, &mut hdr[1..], deadline)?;
            let magic = u32::from_be_bytes(hdr[..4].try_into().unwrap());
            let flags = u16::from_be_bytes(hdr[4..6].try_into().unwrap());
            let cmd = u16::from_be_bytes(hdr[6..8].try_into().unwrap());
            let handle = u64::from_be_bytes(hdr[8..16].try_into().unwrap());
            let offset = u64::from_be_bytes(hdr[16..24].try_into().unwrap());
            let len = u32::from_be_bytes(hdr[24..28].try_into().unwrap());
            if magic != REQUEST_MAGIC {
                return Err(protocol_error("bad request magic"));
            }
            let in_range = offset
                .checked_add(u64::from(len))
                .is_some_and(|end| end <= size);
            let fua = flags & CMD_FLAG_FUA != 0;

            let result = match cmd {
                CMD_DISC => return Ok(()),
                CMD_READ => {
                    let check = if flags & !CMD_FLAG_FUA != 0 {
                        Err(fail(EINVAL, "unsupported flags for READ"))
                    } else if len == 0 {
                        Err(fail(EINVAL, "zero-length read"))
                    } else if len as usize > MAX_PAYLOAD {
                        Err(fail(
                            EINVAL,
                            "read larger than the maximum payload (32 MiB)",
                        ))
                    } else if !in_range {
                        Err(fail(EINVAL, "read beyond the end of the export"))
                    } else {
                        Ok(())
                    };
                    match check {
                        Ok(()) => match self.send_read(backend, handle, offset, len as usize)? {
                            None => continue,
                            Some(f) => Err(f),
                        },
                        Err(f) => Err(f),
                    }
                }
                CMD_WRITE => {
                    if len as usize > MAX_PAYLOAD {
                        // Never buffer an oversized payload: skip it.
                        drain(&mut self.rd, self.limits, u64::from(len), deadline)?;
                        Err(fail(
                            EINVAL,
                            "write larger than the maximum payload (32 MiB)",
                        ))
                    } else {
                        let len = len as usize;
                        // Small payloads use the connection's buffer; large
                        // ones wait for room in the server's budget (and
                        // then get the full time to arrive).
                        let mut big = None;
                        if len <= READ_CHUNK {
                            if self.buf.len() < len {
                                self.resize_buf(len);
                            }
                            read_by(&mut self.rd, self.limits, &mut self.buf[..len], deadline)?;
                        } else {
                            let limits = self.limits;
                            let mut p = limits.payload(len);
                            let deadline = limits.request_timeout.map(|t| Instant::now() + t);
                            read_by(&mut self.rd, self.limits, &mut p.data, deadline)?;
                            big = Some(p);
                        }
                        let data = match &big {
                            Some(p) => &p.data[..],
                            None => &self.buf[..len],
                        };
                        if flags & !CMD_FLAG_FUA != 0 {
                            Err(fail(EINVAL, "unsupported flags for WRITE"))
                        } else if backend.read_only() {
                            Err(fail(EPERM, "export is read-only"))
                        } else if len == 0 {
                            Err(fail(EINVAL, "zero-length write"))
                        } else if !in_range {
                            Err(fail(ENOSPC, "write beyond the end of the export"))
                        } else {
                            backend
                                .write_at(data, offset, fua)
                                .map_err(|e| backend_failure("write failed", e, false))
                        }
                    }
                }
                CMD_FLUSH => {
                    if flags & !CMD_FLAG_FUA != 0 {
                        Err(fail(EINVAL, "unsupported flags for FLUSH"))
                    } else if offset != 0 || len != 0 {
                        Err(fail(EINVAL, "FLUSH with non-zero offset or length"))
                    } else {
                        backend
                            .flush()
                            .map_err(|e| backend_failure("flush failed", e, false))
                    }
                }
                CMD_TRIM => {
                    if flags & !CMD_FLAG_FUA != 0 {
                        Err(fail(EINVAL, "unsupported flags for TRIM"))
                    } else if backend.read_only() {
                        Err(fail(EPERM, "export is read-only"))
                    } else if len == 0 {
                        Err(fail(EINVAL, "zero-length trim"))
                    } else if !in_range {
                        Err(fail(EINVAL, "trim beyond the end of the export"))
                    } else {
                        backend
                            .trim(offset, u64::from(len))
                            .and_then(|()| if fua { backend.flush() } else { Ok(()) })
                            .map_err(|e| backend_failure("trim failed", e, false))
                    }
                }
                CMD_WRITE_ZEROES => {
                    let fast = flags & CMD_FLAG_FAST_ZERO != 0;
                    if flags & !(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO) != 0 {
                        Err(fail(EINVAL, "unsupported flags for WRITE_ZEROES"))
                    } else if backend.read_only() {
                        Err(fail(EPERM, "export is read-only"))
                    } else if len == 0 {
                        Err(fail(EINVAL, "zero-length write-zeroes"))
                    } else if !in_range {
                        Err(fail(ENOSPC, "write-zeroes beyond the end of the export"))
                    } else {
                        let zf = ZeroFlags {
                            may_punch_hole: flags & CMD_FLAG_NO_HOLE == 0,
                            fast_only: fast,
                        };
                        backend
                            .write_zeroes(offset, u64::from(len), zf)
                            .and_then(|()| if fua { backend.flush() } else { Ok(()) })
                            .map_err(|e| backend_failure("write-zeroes failed", e, fast))
                    }
                }
                CMD_CACHE => {
                    if flags & !CMD_FLAG_FUA != 0 {
                        Err(fail(EINVAL, "unsupported flags for CACHE"))
                    } else if len == 0 {
                        Err(fail(EINVAL, "zero-length cache"))
                    } else if !in_range {
                        Err(fail(EINVAL, "cache beyond the end of the export"))
                    } else {
                        backend
                            .cache(offset, u64::from(len))
                            .map_err(|e| backend_failure("cache failed", e, false))
                    }
                }
                CMD_BLOCK_STATUS => {
                    if !block_status_ok {
                        Err(fail(EINVAL, "no metadata context was negotiated"))
                    } else if flags & !(CMD_FLAG_FUA | CMD_FLAG_REQ_ONE) != 0 {
                        Err(fail(EINVAL, "unsupported flags for BLOCK_STATUS"))
                    } else if len == 0 {
                        Err(fail(EINVAL, "zero-length block status"))
                    } else if !in_range {
                        Err(fail(EINVAL, "block status beyond the end of the export"))
                    } else {
                        match backend.block_status(offset, u64::from(len)) {
                            Ok(extents) => {
                                let req_one = flags & CMD_FLAG_REQ_ONE != 0;
                                self.send_block_status(handle, offset, len, req_one, &extents)?;
                                continue;
                            }
                            Err(e) => Err(backend_failure("block status failed", e, false)),
                        }
                    }
                }
                _ => Err(fail(EINVAL, "unknown command")),
            };
            match result {
                Ok(()) => self.send_simple(handle, 0)?,
                Err(f) => self.send_error(handle, &f)?,
            }
        }
    }

    fn send_simple(&mut self, handle: u64, errno: u32) -> io::Result<()> {
        let mut r = [0u8; 16];
        r[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        r[4..8].copy_from_slice(&errno.to_be_bytes());
        r[8..].copy_from_slice(&handle.to_be_bytes());
        self.wr.write_all(&r)?;
        self.wr.flush()
    }

    fn chunk_header(flags: u16, kind: u16, handle: u64, len: u32) -> [u8; 20] {
        let mut h = [0u8; 20];
        h[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        h[4..6].copy_from_slice(&flags.to_be_bytes());
        h[6..8].copy_from_slice(&kind.to_be_bytes());
        h[8..16].copy_from_slice(&handle.to_be_bytes());
        h[16..].copy_from_slice(&len.to_be_bytes());
        h
    }

    fn send_error(&mut self, handle: u64, f: &Failure) -> io::Result<()> {
        if !self.structured {
            return self.send_simple(handle, f.errno);
        }
        let mut msg = &f.msg[..];
        if msg.len() > MAX_MESSAGE {
            let mut cut = MAX_MESSAGE;
            while !msg.is_char_boundary(cut) {
                cut -= 1;
            }
            msg = &msg[..cut];
        }
        let hdr = Self::chunk_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_ERROR,
            handle,
            6 + msg.len() as u32,
        );
        self.out.clear();
        self.out.extend_from_slice(&hdr);
        self.out.extend_from_slice(&f.errno.to_be_bytes());
        self.out
            .extend_from_slice(&(msg.len() as u16).to_be_bytes());
        self.out.extend_from_slice(msg.as_bytes());
        self.send_out()
    }

    /// Reads `offset..offset + len` from `backend` and sends it, in pieces
    /// of at most [`READ_CHUNK`] bytes, so that a connection never holds
    /// more than one piece whatever the request's size.
    ///
    /// With structured replies each piece is an `OFFSET_DATA` chunk, the
    /// last one flagged `DONE`; a read error after some pieces were sent
    /// ends the reply with an error chunk. Simple replies carry one header
    /// before all the data, so a read error in a later piece can only be
    /// reported by closing the connection (`Err`). `Ok(Some)`: the read
    /// failed before anything was sent; the caller sends the error.
    fn send_read(
        &mut self,
        backend: &dyn Backend,
        handle: u64,
        offset: u64,
        len: usize,
    ) -> io::Result<Option<Failure>> {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(READ_CHUNK);
            if self.buf.len() < n {
                self.resize_buf(n);
            }
            let at = offset + done as u64;
            if let Err(e) = backend.read_at(&mut self.buf[..n], at) {
                let f = backend_failure("read failed", e, false);
                if done == 0 {
                    return Ok(Some(f));
                }
                if !self.structured {
                    return Err(io::Error::other(
                        "read failed after part of a simple reply was sent",
                    ));
                }
                self.send_error(handle, &f)?;
                return Ok(None);
            }
            let last = done + n == len;
            if self.structured {
                let mut hdr = [0u8; 28];
                hdr[..20].copy_from_slice(&Self::chunk_header(
                    if last { REPLY_FLAG_DONE } else { 0 },
                    REPLY_TYPE_OFFSET_DATA,
                    handle,
                    8 + n as u32,
                ));
                hdr[20..].copy_from_slice(&at.to_be_bytes());
                write_two(&mut self.wr, &hdr, &self.buf[..n])?;
            } else if done == 0 {
                let mut hdr = [0u8; 16];
                hdr[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
                hdr[8..].copy_from_slice(&handle.to_be_bytes());
                write_two(&mut self.wr, &hdr, &self.buf[..n])?;
            } else {
                self.wr.write_all(&self.buf[..n])?;
            }
            done += n;
        }
        self.wr.flush()?;
        Ok(None)
    }

    /// Sends the backend's extents, clipped to the request, merged where
    /// adjacent extents have the same status, and at most one with REQ_ONE.
    fn send_block_status(
        &mut self,
        handle: u64,
        offset: u64,
        len: u32,
        req_one: bool,
        extents: &[crate::Extent],
    ) -> io::Result<()> {
        self.out.clear();
        self.out.extend_from_slice(&[0u8; 20]);
        self.out
            .extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
        let end = offset + u64::from(len);
        let mut pos = offset;
        let mut count = 0usize;
        let mut last_flags = None;
        for e in extents {
            if pos >= end {
                break;
            }
            if e.len == 0 {
                continue;
            }
            // Clipped to the request, so it fits in 32 bits.
            let l = e.len.min(end - pos) as u32;
            let flags = e.nbd_flags();
            if last_flags == Some(flags) {
                let at = self.out.len() - 8;
                let prev = u32::from_be_bytes(self.out[at..at + 4].try_into().unwrap());
                self.out[at..at + 4].copy_from_slice(&(prev + l).to_be_bytes());
            } else {
                if count == MAX_BLOCK_STATUS_EXTENTS || (req_one && count == 1) {
                    break;
                }
                self.out.extend_from_slice(&l.to_be_bytes());
                self.out.extend_from_slice(&flags.to_be_bytes());
                count += 1;
                last_flags = Some(flags);
            }
            pos += u64::from(l);
        }
        if count == 0 {
            self.out.extend_from_slice(&len.to_be_bytes());
            self.out.extend_from_slice(&0u32.to_be_bytes());
        }
        let payload_len = (self.out.len() - 20) as u32;
        let hdr = Self::chunk_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            handle,
            payload_len,
        );
        self.out[..20].copy_from_slice(&hdr);
        self.send_out()
    }
}
