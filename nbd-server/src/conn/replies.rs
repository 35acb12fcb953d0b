//! Replies of the transmission phase, written whole under one lock by
//! whichever worker finished its request, in any order (as the protocol
//! allows: the client matches replies to requests by handle).

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use super::{backend_failure, write_two, Failure};
use crate::backend::Backend;
use crate::proto::*;
use crate::sync::lock;
use crate::READ_CHUNK;

/// Most descriptors in one block-status reply.
const MAX_BLOCK_STATUS_EXTENTS: usize = 65536;
/// Longest human-readable message sent with an error.
const MAX_MESSAGE: usize = 1024;

/// The writing half of a connection in transmission.
pub(super) struct Replies<'a, W: Write> {
    wr: Mutex<W>,
    /// Structured replies were negotiated.
    structured: bool,
    /// A reply could not be sent whole: the connection is finished.
    broken: AtomicBool,
    kill: &'a (dyn Fn() + Sync),
}

/// An NBD structured reply chunk header.
fn chunk_header(flags: u16, kind: u16, handle: u64, len: u32) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&kind.to_be_bytes());
    h[8..16].copy_from_slice(&handle.to_be_bytes());
    h[16..].copy_from_slice(&len.to_be_bytes());
    h
}

impl<'a, W: Write> Replies<'a, W> {
    pub(super) fn new(wr: W, structured: bool, kill: &'a (dyn Fn() + Sync)) -> Self {
        Replies {
            wr: Mutex::new(wr),
            structured,
            broken: AtomicBool::new(false),
            kill,
        }
    }

    /// Whether a reply failed (the client is gone, or a reply had to be cut
    /// short): the reader stops at its next request.
    pub(super) fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// Marks the connection broken and shuts it down, so the client does
    /// not wait for the rest of a reply.
    fn break_off(&self) {
        if !self.broken.swap(true, Ordering::AcqRel) {
            (self.kill)();
        }
    }

    /// Runs `f` on the writer under the lock; a failure breaks the
    /// connection.
    fn with_writer(&self, wr: &mut W, f: impl FnOnce(&mut W) -> io::Result<()>) {
        if self.is_broken() {
            return;
        }
        if f(wr).and_then(|()| wr.flush()).is_err() {
            self.break_off();
        }
    }

    /// A simple reply: `errno` 0 for success.
    pub(super) fn send_simple(&self, handle: u64, errno: u32) {
        let mut r = [0u8; 16];
        r[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        r[4..8].copy_from_slice(&errno.to_be_bytes());
        r[8..].copy_from_slice(&handle.to_be_bytes());
        self.with_writer(&mut lock(&self.wr), |w| w.write_all(&r));
    }

    /// The error reply for `f`: a simple reply with its errno, or with
    /// structured replies an error chunk carrying its message.
    pub(super) fn send_error(&self, handle: u64, f: &Failure) {
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
        let hdr = chunk_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_ERROR,
            handle,
            6 + msg.len() as u32,
        );
        let mut out = [0u8; 26];
        out[..20].copy_from_slice(&hdr);
        out[20..24].copy_from_slice(&f.errno.to_be_bytes());
        out[24..].copy_from_slice(&(msg.len() as u16).to_be_bytes());
        self.with_writer(&mut lock(&self.wr), |w| write_two(w, &out, msg.as_bytes()));
    }

    /// Reads `offset..offset + len` from `backend` and sends it, in pieces
    /// of at most [`READ_CHUNK`] bytes through `buf` (at least that long, or
    /// `len`), so that a request never holds more than one piece whatever
    /// its size.
    ///
    /// With structured replies each piece is an `OFFSET_DATA` chunk, the
    /// last one flagged `DONE`, written under the lock one at a time
    /// (chunks of other replies may come between them); a read error after
    /// some pieces were sent ends the reply with an error chunk. A simple
    /// reply is one header before all the data, so it holds the lock for
    /// the whole read, and a read error in a later piece can only be
    /// reported by closing the connection. `Some`: the read failed before
    /// anything was sent; the caller sends the error.
    pub(super) fn send_read(
        &self,
        backend: &dyn Backend,
        handle: u64,
        offset: u64,
        len: usize,
        buf: &mut [u8],
    ) -> Option<Failure> {
        let mut simple = (!self.structured).then(|| lock(&self.wr));
        let mut done = 0;
        while done < len {
            let n = (len - done).min(READ_CHUNK);
            let at = offset + done as u64;
            if let Err(e) = backend.read_at(&mut buf[..n], at) {
                let f = backend_failure("read failed", e, false);
                if done == 0 {
                    return Some(f);
                }
                if simple.is_some() {
                    // Part of a simple reply is out: only closing says so.
                    self.break_off();
                    return None;
                }
                self.send_error(handle, &f);
                return None;
            }
            let last = done + n == len;
            let data = &buf[..n];
            match simple.as_mut() {
                None => {
                    let mut hdr = [0u8; 28];
                    hdr[..20].copy_from_slice(&chunk_header(
                        if last { REPLY_FLAG_DONE } else { 0 },
                        REPLY_TYPE_OFFSET_DATA,
                        handle,
                        8 + n as u32,
                    ));
                    hdr[20..].copy_from_slice(&at.to_be_bytes());
                    self.with_writer(&mut lock(&self.wr), |w| write_two(w, &hdr, data));
                }
                Some(wr) if done == 0 => {
                    let mut hdr = [0u8; 16];
                    hdr[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
                    hdr[8..].copy_from_slice(&handle.to_be_bytes());
                    self.with_writer(wr, |w| write_two(w, &hdr, data));
                }
                Some(wr) => self.with_writer(wr, |w| w.write_all(data)),
            }
            if self.is_broken() {
                return None;
            }
            done += n;
        }
        None
    }

    /// Sends the backend's extents, clipped to the request, merged where
    /// adjacent extents have the same status, and at most one with
    /// REQ_ONE; `out` is the caller's scratch buffer.
    pub(super) fn send_block_status(
        &self,
        handle: u64,
        offset: u64,
        len: u32,
        req_one: bool,
        extents: &[crate::Extent],
        out: &mut Vec<u8>,
    ) {
        out.clear();
        out.extend_from_slice(&[0u8; 20]);
        out.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
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
                let at = out.len() - 8;
                let prev = u32::from_be_bytes(out[at..at + 4].try_into().unwrap());
                out[at..at + 4].copy_from_slice(&(prev + l).to_be_bytes());
            } else {
                if count == MAX_BLOCK_STATUS_EXTENTS || (req_one && count == 1) {
                    break;
                }
                out.extend_from_slice(&l.to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
                count += 1;
                last_flags = Some(flags);
            }
            pos += u64::from(l);
        }
        if count == 0 {
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&0u32.to_be_bytes());
        }
        let payload_len = (out.len() - 20) as u32;
        let hdr = chunk_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            handle,
            payload_len,
        );
        out[..20].copy_from_slice(&hdr);
        self.with_writer(&mut lock(&self.wr), |w| w.write_all(out));
    }
}
