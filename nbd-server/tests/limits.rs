//! What clients cannot take from the server (issue 8, item 15): more than
//! the maximum of connections, a thread held by a request that stops
//! arriving half-way, or memory growing with the size of their requests.
//! Checked with the server's counters, not with clocks.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::raw::*;
use common::*;
use nbd_server::{Server, MAX_PAYLOAD, READ_CHUNK};

const MIB: u64 = 1024 * 1024;

fn server_with(img: &std::path::Path, configure: impl FnOnce(&mut Server)) -> TestServer {
    let mut server = Server::new();
    server.add_export("disk", file_backend(img)).unwrap();
    configure(&mut server);
    TestServer::start_server(server)
}

/// Polls `cond` (the server's threads work on their own time); the
/// deadline only keeps a broken build from hanging.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < Duration::from_secs(60), "never: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn connections_beyond_the_maximum_are_closed_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    make_image(&img, MIB, &[(0, &[0x17; 512])]);
    let srv = server_with(&img, |s| {
        s.set_max_connections(3);
    });
    let mut open: Vec<Raw> = (0..3).map(|_| Raw::open(&srv.socket, "disk").0).collect();
    assert_eq!(srv.handle.stats().connections, 3);
    // The fourth gets no greeting: the server closes it.
    let mut extra = UnixStream::connect(&srv.socket).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut b = [0u8; 1];
    assert_eq!(extra.read(&mut b).unwrap_or(0), 0);
    assert_eq!(srv.handle.stats().refused_connections, 1);
    // The three are served as before.
    for (i, raw) in open.iter_mut().enumerate() {
        assert_eq!(raw.read(i as u64, 0, 512), [0x17; 512]);
    }
    // Once one leaves, a new client is served.
    open.pop().unwrap().disc();
    eventually("the connection is gone", || {
        srv.handle.stats().connections == 2
    });
    let (mut again, _, _) = Raw::open(&srv.socket, "disk");
    assert_eq!(again.read(9, 0, 512), [0x17; 512]);
    assert_eq!(srv.handle.stats().refused_connections, 1);
}

/// Sends `bytes` one at a time, `gap` apart, until the server closes the
/// connection; returns how many it accepted.
fn trickle(raw: &mut Raw, bytes: &[u8], gap: Duration) -> usize {
    for (i, b) in bytes.iter().enumerate() {
        if raw.s.write_all(&[*b]).is_err() {
            return i;
        }
        std::thread::sleep(gap);
    }
    bytes.len()
}

#[test]
fn a_request_that_stops_half_way_is_dropped_an_idle_client_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    make_image(&img, MIB, &[(0, &[0x42; 512])]);
    let original = fs::read(&img).unwrap();
    let srv = server_with(&img, |s| {
        s.set_request_timeout(Some(Duration::from_millis(200)));
    });
    // Idle from the start, and stays so: never dropped.
    let (mut idle, _, _) = Raw::open(&srv.socket, "disk");

    // Half a request header, then nothing.
    let (mut half, _, _) = Raw::open(&srv.socket, "disk");
    half.send(&REQUEST_MAGIC.to_be_bytes());
    half.send(&[0, 0, 0, 1]);
    assert!(half.is_closed());
    assert_eq!(srv.handle.stats().timed_out_requests, 1);

    // A write whose payload stops after 1000 of 65536 bytes: dropped, and
    // nothing is written.
    let (mut payload, _, _) = Raw::open(&srv.socket, "disk");
    let mut m = Vec::new();
    m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    m.extend_from_slice(&0u16.to_be_bytes());
    m.extend_from_slice(&CMD_WRITE.to_be_bytes());
    m.extend_from_slice(&5u64.to_be_bytes());
    m.extend_from_slice(&0u64.to_be_bytes());
    m.extend_from_slice(&65536u32.to_be_bytes());
    m.extend_from_slice(&[0xee; 1000]);
    payload.send(&m);
    assert!(payload.is_closed());
    assert_eq!(srv.handle.stats().timed_out_requests, 2);

    // The same for a write above READ_CHUNK (its buffer comes from the
    // shared budget, and goes back to it).
    let (mut big, _, _) = Raw::open(&srv.socket, "disk");
    big.request(0, CMD_WRITE, 6, 0, 512 * 1024, &[0xee; 4000]);
    assert!(big.is_closed());
    assert_eq!(srv.handle.stats().timed_out_requests, 3);

    // A deadline, not a timeout per byte: a header sent one byte every
    // 100 ms (2.7 s in all, far beyond 200 ms) is cut off before its end.
    let (mut slow, _, _) = Raw::open(&srv.socket, "disk");
    let mut hdr = Vec::new();
    hdr.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    hdr.extend_from_slice(&0u16.to_be_bytes());
    hdr.extend_from_slice(&CMD_FLUSH.to_be_bytes());
    hdr.extend_from_slice(&[0u8; 20]);
    let sent = trickle(&mut slow, &hdr, Duration::from_millis(100));
    assert!(sent < hdr.len(), "the whole slow header was accepted");
    assert!(slow.is_closed());
    assert_eq!(srv.handle.stats().timed_out_requests, 4);

    // The idle client waited longer than all of these, and is served.
    assert_eq!(idle.read(1, 0, 512), [0x42; 512]);
    idle.disc();
    eventually("all connections end", || {
        srv.handle.stats().connections == 0
    });
    assert_eq!(srv.handle.stats().buffered_bytes, 0);
    drop(srv);
    assert!(fs::read(&img).unwrap() == original, "image changed");
}

/// Opens a connection (structured replies when `structured`), sends a
/// 32 MiB read and reads only the first bytes of its reply: the server is
/// then busy sending to a client that does not read.
fn hold_a_big_read(socket: &std::path::Path, structured: bool, handle: u64) -> Raw {
    let mut raw = if structured {
        Raw::open(socket, "disk").0
    } else {
        let mut r = Raw::connect(socket);
        r.go("disk").unwrap();
        r
    };
    raw.request(0, CMD_READ, handle, 0, MAX_PAYLOAD as u32, &[]);
    raw.read_n(16);
    raw
}

#[test]
fn clients_holding_large_reads_do_not_grow_memory() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let data = pattern(MAX_PAYLOAD, 5);
    make_image(&img, MAX_PAYLOAD as u64, &[(0, &data)]);
    let srv = server_with(&img, |_| {});
    let clients: Vec<Raw> = (0..24)
        .map(|i| hold_a_big_read(&srv.socket, i % 2 == 0, i))
        .collect();
    // Each of the 24 has its reply under way: at most one piece each.
    let s = srv.handle.stats();
    assert_eq!(s.connections, 24);
    assert!(
        s.buffered_bytes >= 24 * READ_CHUNK,
        "not every client holds a read: {s:?}"
    );
    assert!(
        s.peak_buffered_bytes <= 24 * (READ_CHUNK + 4096),
        "{s:?} (24 × 32 MiB would be {} bytes)",
        24 * MAX_PAYLOAD
    );
    drop(clients);
    eventually("all connections end", || {
        srv.handle.stats().connections == 0
    });
    assert_eq!(srv.handle.stats().buffered_bytes, 0);

    // Large reads still arrive whole and exact, with either kind of reply.
    let (mut raw, _, _) = Raw::open(&srv.socket, "disk");
    assert!(raw.read(1, 0, MAX_PAYLOAD as u32) == data);
    raw.disc();
    let mut simple = Raw::connect(&srv.socket);
    simple.go("disk").unwrap();
    simple.request(0, CMD_READ, 2, 4096, (3 * READ_CHUNK + 100) as u32, &[]);
    assert_eq!(simple.simple(), (0, 2));
    assert!(simple.read_n(3 * READ_CHUNK + 100) == data[4096..4096 + 3 * READ_CHUNK + 100]);
    simple.disc();
}

#[test]
fn large_writes_share_one_budget() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    make_image(&img, MAX_PAYLOAD as u64, &[]);
    let budget = 2 * MAX_PAYLOAD;
    let srv = server_with(&img, |s| {
        s.set_payload_memory(budget);
        s.set_request_timeout(Some(Duration::from_secs(600)));
    });
    // 24 clients each start a 32 MiB write and stall after 64 KiB of it
    // (little enough to sit in the socket while the server waits for room).
    let clients: Vec<Raw> = (0..24u64)
        .map(|i| {
            let (mut raw, _, _) = Raw::open(&srv.socket, "disk");
            raw.request(0, CMD_WRITE, i, 0, MAX_PAYLOAD as u32, &[0x99; 65536]);
            raw
        })
        .collect();
    eventually("two writes hold the budget", || {
        srv.handle.stats().buffered_bytes >= budget
    });
    let s = srv.handle.stats();
    assert!(
        s.peak_buffered_bytes <= budget + 24 * READ_CHUNK,
        "{s:?} (24 × 32 MiB would be {} bytes)",
        24 * MAX_PAYLOAD
    );
    drop(clients);
    eventually("all connections end", || {
        srv.handle.stats().connections == 0
    });
    assert_eq!(srv.handle.stats().buffered_bytes, 0);
    // A whole large write goes through.
    let (mut raw, _, _) = Raw::open(&srv.socket, "disk");
    let data = pattern(MAX_PAYLOAD, 8);
    raw.write(1, 0, &data);
    assert!(raw.read(2, 0, MAX_PAYLOAD as u32) == data);
    raw.disc();
}

/// Fails every read that starts at or after `bad`.
struct FailsFrom {
    inner: std::sync::Arc<dyn nbd_server::Backend>,
    bad: u64,
}

impl nbd_server::Backend for FailsFrom {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if offset >= self.bad {
            return Err(std::io::Error::from_raw_os_error(5));
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> std::io::Result<()> {
        self.inner.write_at(buf, offset, fua)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn trim(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.trim(offset, len)
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: nbd_server::ZeroFlags,
    ) -> std::io::Result<()> {
        self.inner.write_zeroes(offset, len, flags)
    }
    fn block_status(&self, offset: u64, len: u64) -> std::io::Result<Vec<nbd_server::Extent>> {
        self.inner.block_status(offset, len)
    }
}

/// A read sent in pieces that fails after some were sent: with structured
/// replies the reply ends with an error chunk (and the connection goes on);
/// a simple reply has promised success already, so the connection closes
/// rather than deliver wrong data. Failing at the first piece is a plain
/// error reply either way.
#[test]
fn a_read_failing_after_its_first_piece() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let data = pattern(4 * MIB as usize, 3);
    make_image(&img, 4 * MIB, &[(0, &data)]);
    let bad = 2 * READ_CHUNK as u64;
    let srv = TestServer::start(vec![(
        "disk",
        std::sync::Arc::new(FailsFrom {
            inner: file_backend(&img),
            bad,
        }),
    )]);
    let (mut raw, _, _) = Raw::open(&srv.socket, "disk");
    raw.request(0, CMD_READ, 1, 0, (4 * READ_CHUNK) as u32, &[]);
    for piece in 0..2 {
        let c = raw.chunk();
        assert_eq!((c.flags, c.kind, c.handle), (0, TYPE_OFFSET_DATA, 1));
        let at = piece * READ_CHUNK;
        assert_eq!(&c.payload[..8], &(at as u64).to_be_bytes());
        assert!(c.payload[8..] == data[at..at + READ_CHUNK]);
    }
    let c = raw.chunk();
    assert_eq!((c.flags, c.handle), (1, 1));
    assert_eq!(c.error().0, EIO);
    // The connection goes on.
    assert_eq!(raw.read(2, 4096, 512), data[4096..4608]);
    // A read failing at once: one error chunk.
    raw.request(0, CMD_READ, 3, bad, 512, &[]);
    let c = raw.chunk();
    assert_eq!((c.flags, c.handle, c.error().0), (1, 3, EIO));
    raw.disc();

    let mut simple = Raw::connect(&srv.socket);
    simple.go("disk").unwrap();
    simple.request(0, CMD_READ, 4, bad, 512, &[]);
    assert_eq!(simple.simple(), (EIO, 4));
    simple.request(0, CMD_READ, 5, 0, (4 * READ_CHUNK) as u32, &[]);
    assert_eq!(simple.simple(), (0, 5));
    assert!(simple.read_n(2 * READ_CHUNK) == data[..2 * READ_CHUNK]);
    assert!(simple.is_closed());
}
