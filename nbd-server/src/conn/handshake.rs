//! The fixed-newstyle handshake: options until the client picks an export
//! (or aborts).

use std::borrow::Cow;
use std::io::{self, Read, Write};
use std::sync::atomic::Ordering;

use super::{drain, protocol_error, resolve, transmission_flags, Connection};
use crate::proto::*;
use crate::{MAX_OPTION_PAYLOAD, MAX_PAYLOAD, MAX_STRING, PREFERRED_BLOCK_SIZE};

/// Options longer than this are not even drained: the connection is dropped.
const MAX_DRAINED_OPTION: u32 = 16 * 1024 * 1024;

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

impl<R: Read, W: Write + Send> Connection<'_, R, W> {
    /// Negotiates; returns the export to serve, or `None` if the client
    /// aborted.
    pub(super) fn handshake(&mut self) -> io::Result<Option<usize>> {
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
}
