//! A deliberately minimal NBD client speaking raw bytes, to send exactly
//! what a test wants (including malformed traffic) and check exact replies.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_SHUTDOWN: u32 = 0x8000_0007;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const FLAG_FUA: u16 = 1;
pub const FLAG_NO_HOLE: u16 = 2;
pub const FLAG_DF: u16 = 4;
pub const FLAG_REQ_ONE: u16 = 8;
pub const FLAG_FAST_ZERO: u16 = 16;

pub const TYPE_NONE: u16 = 0;
pub const TYPE_OFFSET_DATA: u16 = 1;
pub const TYPE_BLOCK_STATUS: u16 = 5;
pub const TYPE_ERROR: u16 = 0x8001;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const ENOTSUP: u32 = 95;

/// One option reply.
#[derive(Debug, PartialEq, Eq)]
pub struct OptReply {
    pub opt: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

/// One structured reply chunk.
#[derive(Debug, PartialEq, Eq)]
pub struct Chunk {
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub payload: Vec<u8>,
}

impl Chunk {
    /// (errno, message) of an error chunk.
    pub fn error(&self) -> (u32, String) {
        assert_eq!(self.kind, TYPE_ERROR, "not an error chunk: {self:?}");
        let errno = u32::from_be_bytes(self.payload[..4].try_into().unwrap());
        let len = u16::from_be_bytes(self.payload[4..6].try_into().unwrap()) as usize;
        assert_eq!(self.payload.len(), 6 + len);
        (
            errno,
            String::from_utf8(self.payload[6..].to_vec()).unwrap(),
        )
    }
}

pub struct Raw {
    pub s: UnixStream,
}

impl Raw {
    /// Connects and reads the server greeting, checking it byte for byte.
    pub fn greet(socket: &Path) -> Raw {
        let s = UnixStream::connect(socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut raw = Raw { s };
        let hello = raw.read_n(18);
        assert_eq!(&hello[..8], &NBDMAGIC.to_be_bytes());
        assert_eq!(&hello[8..16], &IHAVEOPT.to_be_bytes());
        assert_eq!(
            &hello[16..],
            &[0, 3],
            "handshake flags FIXED_NEWSTYLE|NO_ZEROES"
        );
        raw
    }

    /// Greets and sends client flags `FIXED_NEWSTYLE | NO_ZEROES`.
    pub fn connect(socket: &Path) -> Raw {
        let mut raw = Raw::greet(socket);
        raw.send(&3u32.to_be_bytes());
        raw
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }

    pub fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.s.read_exact(&mut v).unwrap();
        v
    }

    /// True if the server has closed the connection (reads EOF or reset).
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ),
        }
    }

    pub fn opt(&mut self, opt: u32, data: &[u8]) {
        let mut m = Vec::new();
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.send(&m);
    }

    pub fn opt_reply(&mut self) -> OptReply {
        let h = self.read_n(20);
        assert_eq!(&h[..8], &REPLY_MAGIC.to_be_bytes(), "option reply magic");
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        assert!(len < 1 << 20, "absurd option reply length {len}");
        let data = self.read_n(len as usize);
        OptReply { opt, kind, data }
    }

    /// Option replies up to and including the final (ACK or error) one.
    pub fn opt_replies(&mut self) -> Vec<OptReply> {
        let mut v = Vec::new();
        loop {
            let r = self.opt_reply();
            let last = r.kind == REP_ACK || r.kind & 0x8000_0000 != 0;
            v.push(r);
            if last {
                return v;
            }
        }
    }

    pub fn structured(&mut self) {
        self.opt(OPT_STRUCTURED_REPLY, &[]);
        let r = self.opt_reply();
        assert_eq!(
            (r.opt, r.kind, r.data.len()),
            (OPT_STRUCTURED_REPLY, REP_ACK, 0)
        );
    }

    /// SET_META_CONTEXT `base:allocation` for `name`; returns the context id.
    pub fn set_meta(&mut self, name: &str) -> u32 {
        self.opt(
            OPT_SET_META_CONTEXT,
            &meta_payload(name, &["base:allocation"]),
        );
        let rs = self.opt_replies();
        assert_eq!(rs.len(), 2, "{rs:?}");
        assert_eq!(rs[0].kind, REP_META_CONTEXT);
        assert_eq!(&rs[0].data[4..], b"base:allocation");
        assert_eq!(rs[1].kind, REP_ACK);
        u32::from_be_bytes(rs[0].data[..4].try_into().unwrap())
    }

    /// NBD_OPT_GO; returns (size, transmission flags) on success, or the
    /// final error reply type.
    pub fn go(&mut self, name: &str) -> Result<(u64, u16), u32> {
        self.opt(OPT_GO, &info_payload(name, &[]));
        let rs = self.opt_replies();
        let last = rs.last().unwrap();
        if last.kind != REP_ACK {
            return Err(last.kind);
        }
        let export = rs
            .iter()
            .find(|r| r.kind == REP_INFO && r.data[..2] == [0, 0])
            .expect("NBD_INFO_EXPORT");
        assert_eq!(export.data.len(), 12);
        Ok((
            u64::from_be_bytes(export.data[2..10].try_into().unwrap()),
            u16::from_be_bytes(export.data[10..12].try_into().unwrap()),
        ))
    }

    /// Connects with structured replies and base:allocation, enters
    /// transmission on `name`; returns (size, flags).
    pub fn open(socket: &Path, name: &str) -> (Raw, u64, u16) {
        let mut raw = Raw::connect(socket);
        raw.structured();
        raw.set_meta(name);
        let (size, flags) = raw.go(name).unwrap();
        (raw, size, flags)
    }

    pub fn request(
        &mut self,
        flags: u16,
        cmd: u16,
        handle: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let mut m = Vec::with_capacity(28 + payload.len());
        m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&cmd.to_be_bytes());
        m.extend_from_slice(&handle.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(payload);
        self.send(&m);
    }

    /// Reads a simple reply: (error, handle).
    pub fn simple(&mut self) -> (u32, u64) {
        let r = self.read_n(16);
        assert_eq!(
            &r[..4],
            &SIMPLE_REPLY_MAGIC.to_be_bytes(),
            "simple reply magic: {r:?}"
        );
        (
            u32::from_be_bytes(r[4..8].try_into().unwrap()),
            u64::from_be_bytes(r[8..16].try_into().unwrap()),
        )
    }

    pub fn chunk(&mut self) -> Chunk {
        let h = self.read_n(20);
        assert_eq!(
            &h[..4],
            &STRUCTURED_REPLY_MAGIC.to_be_bytes(),
            "chunk magic: {h:?}"
        );
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        assert!(len <= 64 << 20, "absurd chunk length {len}");
        Chunk {
            flags: u16::from_be_bytes(h[4..6].try_into().unwrap()),
            kind: u16::from_be_bytes(h[6..8].try_into().unwrap()),
            handle: u64::from_be_bytes(h[8..16].try_into().unwrap()),
            payload: self.read_n(len as usize),
        }
    }

    /// Reads a structured or simple reply to a non-read command and returns
    /// its error value (0 on success), checking the handle.
    /// The next reply to a non-read command, whichever request it answers:
    /// (handle, error value). Simple, or one final structured chunk (NONE
    /// or an error). Replies to pipelined requests may come in any order.
    pub fn any_reply(&mut self) -> (u64, u32) {
        let magic = self.read_n(4);
        if magic == SIMPLE_REPLY_MAGIC.to_be_bytes() {
            let r = self.read_n(12);
            let error = u32::from_be_bytes(r[..4].try_into().unwrap());
            return (u64::from_be_bytes(r[4..12].try_into().unwrap()), error);
        }
        assert_eq!(magic, STRUCTURED_REPLY_MAGIC.to_be_bytes(), "reply magic");
        let h = self.read_n(16);
        assert_eq!(
            u16::from_be_bytes([h[0], h[1]]),
            1,
            "single final chunk expected"
        );
        let handle = u64::from_be_bytes(h[4..12].try_into().unwrap());
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let payload = self.read_n(len as usize);
        let error = if payload.len() >= 4 {
            u32::from_be_bytes(payload[..4].try_into().unwrap())
        } else {
            0
        };
        (handle, error)
    }

    pub fn status(&mut self, handle: u64) -> u32 {
        let mut magic = [0u8; 4];
        self.s.read_exact(&mut magic).unwrap();
        if magic == SIMPLE_REPLY_MAGIC.to_be_bytes() {
            let rest = self.read_n(12);
            assert_eq!(&rest[4..], &handle.to_be_bytes());
            return u32::from_be_bytes(rest[..4].try_into().unwrap());
        }
        assert_eq!(magic, STRUCTURED_REPLY_MAGIC.to_be_bytes(), "reply magic");
        let h = self.read_n(16);
        let flags = u16::from_be_bytes(h[..2].try_into().unwrap());
        let kind = u16::from_be_bytes(h[2..4].try_into().unwrap());
        assert_eq!(&h[4..12], &handle.to_be_bytes());
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let payload = self.read_n(len as usize);
        assert_eq!(flags, 1, "single final chunk expected");
        let c = Chunk {
            flags,
            kind,
            handle,
            payload,
        };
        if kind == TYPE_NONE {
            0
        } else {
            c.error().0
        }
    }

    /// Structured read expected to succeed: OFFSET_DATA chunks covering the
    /// range in order, each but the last of 256 KiB (the server's pieces),
    /// the last one flagged DONE.
    pub fn read(&mut self, handle: u64, offset: u64, len: u32) -> Vec<u8> {
        self.request(0, CMD_READ, handle, offset, len, &[]);
        let mut data = Vec::with_capacity(len as usize);
        loop {
            let c = self.chunk();
            let at = offset + data.len() as u64;
            let piece = (len as usize - data.len()).min(256 * 1024);
            let last = data.len() + piece == len as usize;
            assert_eq!(
                (c.flags, c.kind, c.handle),
                (u16::from(last), TYPE_OFFSET_DATA, handle)
            );
            assert_eq!(&c.payload[..8], &at.to_be_bytes());
            assert_eq!(c.payload.len(), 8 + piece);
            data.extend_from_slice(&c.payload[8..]);
            if last {
                return data;
            }
        }
    }

    /// Write expected to succeed.
    pub fn write(&mut self, handle: u64, offset: u64, data: &[u8]) {
        self.request(0, CMD_WRITE, handle, offset, data.len() as u32, data);
        assert_eq!(self.status(handle), 0);
    }

    pub fn disc(&mut self) {
        self.request(0, CMD_DISC, 0, 0, 0, &[]);
    }
}

/// Payload of NBD_OPT_INFO / NBD_OPT_GO.
pub fn info_payload(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&(name.len() as u32).to_be_bytes());
    p.extend_from_slice(name.as_bytes());
    p.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        p.extend_from_slice(&i.to_be_bytes());
    }
    p
}

/// Payload of NBD_OPT_{LIST,SET}_META_CONTEXT.
pub fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&(name.len() as u32).to_be_bytes());
    p.extend_from_slice(name.as_bytes());
    p.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        p.extend_from_slice(&(q.len() as u32).to_be_bytes());
        p.extend_from_slice(q.as_bytes());
    }
    p
}

/// Decodes a block-status payload into (context id, [(length, flags)]).
pub fn decode_block_status(payload: &[u8]) -> (u32, Vec<(u32, u32)>) {
    assert_eq!((payload.len() - 4) % 8, 0);
    let id = u32::from_be_bytes(payload[..4].try_into().unwrap());
    let ext = payload[4..]
        .chunks_exact(8)
        .map(|c| {
            (
                u32::from_be_bytes(c[..4].try_into().unwrap()),
                u32::from_be_bytes(c[4..].try_into().unwrap()),
            )
        })
        .collect();
    (id, ext)
}
