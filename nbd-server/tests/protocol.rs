//! Byte-level protocol checks and malformed traffic from a raw socket: the
//! server answers with the proper NBD errors or drops just that connection,
//! keeps serving the next client, and never changes the image.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::net::UnixStream;

use common::raw::*;
use common::*;

const MIB: u64 = 1024 * 1024;
const SIZE: u64 = 4 * MIB;

/// A 4 MiB image of pattern bytes with a hole at 2 MiB..3 MiB, served as
/// "disk"; returns the server, the image path and its original contents.
fn setup() -> (TestServer, std::path::PathBuf, Vec<u8>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let a = pattern(2 * MIB as usize, 31);
    let b = pattern(MIB as usize, 32);
    make_image(&img, SIZE, &[(0, &a), (3 * MIB, &b)]);
    let original = fs::read(&img).unwrap();
    let srv = TestServer::start(vec![("disk", file_backend(&img))]);
    (srv, img, original, dir)
}

/// The server still serves a well-behaved client correctly.
fn assert_still_serving(srv: &TestServer, original: &[u8]) {
    let (mut raw, size, _) = Raw::open(&srv.socket, "disk");
    assert_eq!(size, SIZE);
    assert_eq!(raw.read(99, 0, 65536), original[..65536]);
    raw.disc();
    qemu_io(&srv.uri("disk"), &["read 0 64k"]);
}

#[test]
fn handshake_and_export_name_with_and_without_zeroes() {
    let (srv, _img, original, _dir) = setup();

    // Client without NO_ZEROES: 124 zero bytes follow size and flags.
    let mut raw = Raw::greet(&srv.socket);
    raw.send(&1u32.to_be_bytes());
    raw.opt(OPT_EXPORT_NAME, b"disk");
    let reply = raw.read_n(134);
    assert_eq!(&reply[..8], &SIZE.to_be_bytes());
    assert_eq!(&reply[8..10], &0xd6du16.to_be_bytes());
    assert!(reply[10..].iter().all(|&b| b == 0));
    // No structured replies negotiated: simple reply followed by the data.
    raw.request(0, CMD_READ, 7, 4096, 512, &[]);
    assert_eq!(raw.simple(), (0, 7));
    assert_eq!(raw.read_n(512), original[4096..4608]);
    raw.disc();
    assert!(raw.is_closed());

    // Client with NO_ZEROES: exactly 10 bytes, then the first reply.
    let mut raw = Raw::connect(&srv.socket);
    raw.opt(OPT_EXPORT_NAME, b"disk");
    let reply = raw.read_n(10);
    assert_eq!(&reply[..8], &SIZE.to_be_bytes());
    raw.request(0, CMD_FLUSH, 8, 0, 0, &[]);
    assert_eq!(raw.simple(), (0, 8));
    // Simple-reply errors carry no payload: the next reply follows at once.
    raw.request(0, CMD_READ, 9, SIZE - 512, 1024, &[]);
    assert_eq!(raw.simple(), (EINVAL, 9));
    raw.request(0, CMD_READ, 10, SIZE - 512, 512, &[]);
    assert_eq!(raw.simple(), (0, 10));
    assert_eq!(raw.read_n(512), original[(SIZE - 512) as usize..]);
    raw.disc();

    // Plain (non-fixed) newstyle client may only use EXPORT_NAME.
    let mut raw = Raw::greet(&srv.socket);
    raw.send(&0u32.to_be_bytes());
    raw.opt(OPT_LIST, &[]);
    assert!(raw.is_closed());

    // Unknown client flags end the connection.
    let mut raw = Raw::greet(&srv.socket);
    raw.send(&0x8000_0003u32.to_be_bytes());
    assert!(raw.is_closed());
    assert_still_serving(&srv, &original);
}

#[test]
fn option_negotiation_replies() {
    let (srv, _img, original, _dir) = setup();
    let mut raw = Raw::connect(&srv.socket);

    // Unknown and unsupported options: NBD_REP_ERR_UNSUP, connection usable.
    for opt in [OPT_EXTENDED_HEADERS, OPT_STARTTLS, 4, 9999] {
        raw.opt(opt, b"some data");
        let r = raw.opt_reply();
        assert_eq!((r.opt, r.kind), (opt, REP_ERR_UNSUP));
    }

    // LIST: one REP_SERVER per export, then ACK; with data: ERR_INVALID.
    raw.opt(OPT_LIST, &[]);
    let rs = raw.opt_replies();
    assert_eq!(rs.len(), 2);
    assert_eq!(
        (rs[0].kind, rs[0].data.as_slice()),
        (REP_SERVER, &b"\0\0\0\x04disk"[..])
    );
    assert_eq!((rs[1].kind, rs[1].data.len()), (REP_ACK, 0));
    raw.opt(OPT_LIST, b"x");
    assert_eq!(raw.opt_reply().kind, REP_ERR_INVALID);

    // Meta contexts need structured replies first.
    raw.opt(
        OPT_SET_META_CONTEXT,
        &meta_payload("disk", &["base:allocation"]),
    );
    assert_eq!(raw.opt_reply().kind, REP_ERR_INVALID);
    raw.opt(OPT_STRUCTURED_REPLY, b"x");
    assert_eq!(raw.opt_reply().kind, REP_ERR_INVALID);
    raw.structured();

    // LIST_META_CONTEXT: all with no query, "base:" as wildcard, others ignored.
    for queries in [
        &[][..],
        &["base:"][..],
        &["qemu:dirty-bitmap:x", "base:allocation"][..],
    ] {
        raw.opt(OPT_LIST_META_CONTEXT, &meta_payload("disk", queries));
        let rs = raw.opt_replies();
        assert_eq!(rs.len(), 2, "{queries:?}");
        assert_eq!(rs[0].kind, REP_META_CONTEXT);
        assert_eq!(rs[0].data, b"\0\0\0\0base:allocation");
        assert_eq!(rs[1].kind, REP_ACK);
    }
    raw.opt(
        OPT_LIST_META_CONTEXT,
        &meta_payload("disk", &["x-other:thing"]),
    );
    assert_eq!(
        raw.opt_replies().iter().map(|r| r.kind).collect::<Vec<_>>(),
        vec![REP_ACK]
    );
    raw.opt(
        OPT_SET_META_CONTEXT,
        &meta_payload("nope", &["base:allocation"]),
    );
    assert_eq!(raw.opt_reply().kind, REP_ERR_UNKNOWN);
    // Truncated query list.
    let mut bad = meta_payload("disk", &["base:allocation"]);
    bad.truncate(bad.len() - 3);
    raw.opt(OPT_SET_META_CONTEXT, &bad);
    assert_eq!(raw.opt_reply().kind, REP_ERR_INVALID);

    // INFO with NAME, DESCRIPTION and BLOCK_SIZE requests; malformed INFO.
    raw.opt(OPT_INFO, &info_payload("", &[1, 2, 3]));
    let rs = raw.opt_replies();
    let infos: Vec<&[u8]> = rs
        .iter()
        .filter(|r| r.kind == REP_INFO)
        .map(|r| &r.data[..])
        .collect();
    assert_eq!(rs.last().unwrap().kind, REP_ACK);
    let mut export = vec![0u8, 0];
    export.extend_from_slice(&SIZE.to_be_bytes());
    export.extend_from_slice(&0xd6du16.to_be_bytes());
    assert!(infos.contains(&&export[..]), "{infos:?}");
    assert!(infos.contains(&&b"\0\x01disk"[..]));
    assert!(infos.contains(&&[0u8, 3, 0, 0, 0, 1, 0, 0, 16, 0, 2, 0, 0, 0][..]));
    assert_eq!(infos.len(), 3, "no description was configured");
    let mut bad = info_payload("disk", &[1]);
    bad.push(0);
    raw.opt(OPT_INFO, &bad);
    assert_eq!(raw.opt_reply().kind, REP_ERR_INVALID);
    raw.opt(OPT_GO, &[0, 0, 0, 200, b'd']);
    assert_eq!(raw.opt_reply().kind, REP_ERR_INVALID);

    // Finally GO; block status works because SET_META_CONTEXT named it.
    let id = raw.set_meta("disk");
    assert_eq!(raw.go("disk"), Ok((SIZE, 0xd6d)));
    raw.request(0, CMD_BLOCK_STATUS, 1, 0, SIZE as u32, &[]);
    let c = raw.chunk();
    assert_eq!((c.flags, c.kind, c.handle), (1, TYPE_BLOCK_STATUS, 1));
    let m = MIB as u32;
    assert_eq!(
        decode_block_status(&c.payload),
        (id, vec![(2 * m, 0), (m, 3), (m, 0)])
    );
    raw.disc();

    // ABORT is acknowledged and ends the connection.
    let mut raw = Raw::connect(&srv.socket);
    raw.opt(OPT_ABORT, &[]);
    let r = raw.opt_reply();
    assert_eq!((r.opt, r.kind, r.data.len()), (OPT_ABORT, REP_ACK, 0));
    assert!(raw.is_closed());
    assert_still_serving(&srv, &original);
}

#[test]
fn oversized_and_malformed_options() {
    let (srv, _img, original, _dir) = setup();

    // Option payload above 64 KiB: drained, NBD_REP_ERR_TOO_BIG, usable after.
    let mut raw = Raw::connect(&srv.socket);
    raw.opt(OPT_GO, &vec![0x41; 1 << 20]);
    let r = raw.opt_reply();
    assert_eq!((r.opt, r.kind), (OPT_GO, REP_ERR_TOO_BIG));
    assert_eq!(raw.go("disk"), Ok((SIZE, 0xd6d)));
    raw.disc();

    // An absurd option length (4 GiB - 1) is not drained: connection dropped.
    let mut raw = Raw::connect(&srv.socket);
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&OPT_GO.to_be_bytes());
    m.extend_from_slice(&u32::MAX.to_be_bytes());
    raw.send(&m);
    assert!(raw.is_closed());

    // Export name longer than 4096 bytes in EXPORT_NAME.
    let mut raw = Raw::connect(&srv.socket);
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    m.extend_from_slice(&5000u32.to_be_bytes());
    raw.send(&m);
    assert!(raw.is_closed());

    // Bad option magic.
    let mut raw = Raw::connect(&srv.socket);
    raw.send(b"NOTMAGIC\0\0\0\x07\0\0\0\0");
    assert!(raw.is_closed());

    // Disconnect in the middle of an option header / payload.
    let mut raw = Raw::connect(&srv.socket);
    raw.send(&IHAVEOPT.to_be_bytes()[..5]);
    drop(raw);
    let mut raw = Raw::connect(&srv.socket);
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&OPT_GO.to_be_bytes());
    m.extend_from_slice(&100u32.to_be_bytes());
    m.extend_from_slice(&[0; 10]);
    raw.send(&m);
    drop(raw);
    // Disconnect right after connecting, and before sending client flags.
    drop(UnixStream::connect(&srv.socket).unwrap());
    drop(Raw::greet(&srv.socket));

    assert_still_serving(&srv, &original);
}

#[test]
fn bad_requests_get_proper_errors() {
    let (srv, img, original, _dir) = setup();
    let (mut raw, _, _) = Raw::open(&srv.socket, "disk");
    let err = |raw: &mut Raw, h: u64| {
        let c = raw.chunk();
        assert_eq!((c.flags, c.handle), (1, h), "{c:?}");
        c.error()
    };

    // Reads: out of range, overflowing offset, zero length, too long, bad flag.
    raw.request(0, CMD_READ, 1, SIZE - 4096, 8192, &[]);
    assert_eq!(
        err(&mut raw, 1),
        (EINVAL, "read beyond the end of the export".into())
    );
    raw.request(0, CMD_READ, 2, u64::MAX - 10, 512, &[]);
    assert_eq!(err(&mut raw, 2).0, EINVAL);
    raw.request(0, CMD_READ, 3, 0, 0, &[]);
    assert_eq!(err(&mut raw, 3).0, EINVAL);
    raw.request(0, CMD_READ, 4, 0, 32 * 1024 * 1024 + 1, &[]);
    assert_eq!(err(&mut raw, 4).0, EINVAL);
    raw.request(FLAG_DF, CMD_READ, 5, 0, 512, &[]);
    assert_eq!(err(&mut raw, 5).0, EINVAL);
    // The largest allowed read works.
    assert_eq!(raw.read(6, 0, SIZE as u32), original);

    // Writes past the end: ENOSPC, payload consumed.
    raw.request(0, CMD_WRITE, 10, SIZE - 100, 200, &[0xee; 200]);
    assert_eq!(raw.status(10), ENOSPC);
    // Pipelined: a good write, then one with a flag WRITE does not take;
    // each gets its own reply, in either order (the refusal is answered as
    // it is read, the write when a worker has done it).
    raw.request(0, CMD_WRITE, 11, 0, 16, &[0xee; 16]);
    raw.request(FLAG_NO_HOLE, CMD_WRITE, 12, 0, 16, &[0xee; 16]);
    let mut replies = [raw.any_reply(), raw.any_reply()];
    replies.sort();
    assert_eq!(replies, [(11, 0), (12, EINVAL)]);
    assert_eq!(raw.read(13, 0, 16), [0xee; 16]);
    raw.write(14, 0, &original[..16]);
    // Write above the 32 MiB maximum: payload skipped without buffering.
    let huge = 33 * 1024 * 1024;
    raw.request(0, CMD_WRITE, 15, 0, huge as u32, &vec![0xee; huge]);
    assert_eq!(raw.status(15), EINVAL);
    // Zero-length write.
    raw.request(0, CMD_WRITE, 16, 0, 0, &[]);
    assert_eq!(raw.status(16), EINVAL);

    // Trim / write-zeroes / cache / block status out of range.
    raw.request(0, CMD_TRIM, 20, SIZE, 1, &[]);
    assert_eq!(raw.status(20), EINVAL);
    raw.request(0, CMD_WRITE_ZEROES, 21, SIZE - 1, 2, &[]);
    assert_eq!(raw.status(21), ENOSPC);
    raw.request(0, CMD_CACHE, 22, SIZE, 4096, &[]);
    assert_eq!(raw.status(22), EINVAL);
    raw.request(0, CMD_BLOCK_STATUS, 23, SIZE - 1, 2, &[]);
    assert_eq!(raw.status(23), EINVAL);
    raw.request(0, CMD_TRIM, 24, 0, 0, &[]);
    assert_eq!(raw.status(24), EINVAL);
    // Flags not valid for the command.
    raw.request(FLAG_REQ_ONE, CMD_WRITE_ZEROES, 25, 0, 512, &[]);
    assert_eq!(raw.status(25), EINVAL);
    raw.request(FLAG_NO_HOLE, CMD_TRIM, 26, 0, 512, &[]);
    assert_eq!(raw.status(26), EINVAL);
    raw.request(0x8000, CMD_BLOCK_STATUS, 27, 0, 512, &[]);
    assert_eq!(raw.status(27), EINVAL);
    // Flush with non-zero offset/length; unknown commands.
    raw.request(0, CMD_FLUSH, 28, 1, 0, &[]);
    assert_eq!(raw.status(28), EINVAL);
    raw.request(0, 8, 29, 0, 0, &[]);
    assert_eq!(raw.status(29), EINVAL);
    raw.request(0, 0xffff, 30, 0, 512, &[]);
    assert_eq!(raw.status(30), EINVAL);
    // Valid ones in between still work.
    raw.request(0, CMD_CACHE, 31, 0, SIZE as u32, &[]);
    assert_eq!(raw.status(31), 0);
    raw.request(FLAG_FUA, CMD_FLUSH, 32, 0, 0, &[]);
    assert_eq!(raw.status(32), 0);

    // Block status with REQ_ONE: exactly one descriptor within the request.
    raw.request(FLAG_REQ_ONE, CMD_BLOCK_STATUS, 33, MIB, 2 * MIB as u32, &[]);
    let c = raw.chunk();
    assert_eq!(c.kind, TYPE_BLOCK_STATUS);
    assert_eq!(decode_block_status(&c.payload).1, vec![(MIB as u32, 0)]);
    // Unaligned ranges are clipped to the request.
    raw.request(0, CMD_BLOCK_STATUS, 34, 2 * MIB - 100, 300, &[]);
    let c = raw.chunk();
    assert_eq!(decode_block_status(&c.payload).1, vec![(100, 0), (200, 3)]);
    raw.disc();
    assert!(raw.is_closed());

    // Block status without a negotiated context: EINVAL.
    let mut raw = Raw::connect(&srv.socket);
    raw.structured();
    raw.go("disk").unwrap();
    raw.request(0, CMD_BLOCK_STATUS, 40, 0, 512, &[]);
    assert_eq!(raw.status(40), EINVAL);
    raw.disc();
    // SET_META_CONTEXT for "disk" then GO with the default name: the same
    // export, so the context stays selected.
    let mut raw = Raw::connect(&srv.socket);
    raw.structured();
    raw.set_meta("disk");
    raw.go("").unwrap();
    raw.request(0, CMD_BLOCK_STATUS, 41, 0, 512, &[]);
    assert_eq!(decode_block_status(&raw.chunk().payload).1, vec![(512, 0)]);
    raw.disc();

    assert_still_serving(&srv, &original);
    drop(srv);
    assert!(fs::read(&img).unwrap() == original, "image changed");
}

#[test]
fn broken_transmission_drops_only_that_connection() {
    let (srv, img, original, _dir) = setup();

    // Bad request magic: connection closed.
    let (mut raw, _, _) = Raw::open(&srv.socket, "disk");
    raw.send(&[0xde; 28]);
    assert!(raw.is_closed());

    // Disconnect mid-header.
    let (mut raw, _, _) = Raw::open(&srv.socket, "disk");
    raw.send(&REQUEST_MAGIC.to_be_bytes());
    raw.send(&[0, 0, 0, 1, 0, 0]);
    drop(raw);

    // Disconnect mid-payload of a 1 MiB write: nothing may be written.
    let (mut raw, _, _) = Raw::open(&srv.socket, "disk");
    let mut m = Vec::new();
    m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    m.extend_from_slice(&0u16.to_be_bytes());
    m.extend_from_slice(&CMD_WRITE.to_be_bytes());
    m.extend_from_slice(&5u64.to_be_bytes());
    m.extend_from_slice(&0u64.to_be_bytes());
    m.extend_from_slice(&(MIB as u32).to_be_bytes());
    m.extend_from_slice(&[0xee; 4000]);
    raw.send(&m);
    drop(raw);

    // Disconnect mid-payload of an oversized write being drained.
    let (mut raw, _, _) = Raw::open(&srv.socket, "disk");
    raw.request(0, CMD_WRITE, 6, 0, u32::MAX, &[0xee; 70000]);
    drop(raw);

    // Client vanishes while a large read reply is being sent.
    let (mut raw, _, _) = Raw::open(&srv.socket, "disk");
    raw.request(0, CMD_READ, 7, 0, SIZE as u32, &[]);
    raw.request(0, CMD_READ, 8, 0, SIZE as u32, &[]);
    let _ = raw.s.flush();
    drop(raw);

    // Requests after NBD_CMD_DISC are not processed.
    let (mut raw, _, _) = Raw::open(&srv.socket, "disk");
    raw.disc();
    // The server may already have closed the socket (EPIPE): that is fine.
    let mut m = Vec::new();
    m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    m.extend_from_slice(&0u16.to_be_bytes());
    m.extend_from_slice(&CMD_WRITE.to_be_bytes());
    m.extend_from_slice(&9u64.to_be_bytes());
    m.extend_from_slice(&0u64.to_be_bytes());
    m.extend_from_slice(&512u32.to_be_bytes());
    m.extend_from_slice(&[0xee; 512]);
    let _ = raw.s.write_all(&m);
    assert!(raw.is_closed());

    assert_still_serving(&srv, &original);
    // Give connection threads a moment to notice their peers are gone, then
    // check none is left behind.
    for _ in 0..100 {
        if srv.handle.connection_count() == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(srv.handle.connection_count(), 0);
    drop(srv);
    assert!(fs::read(&img).unwrap() == original, "image changed");
}

#[test]
fn concurrent_connections_and_shutdown() {
    let (srv, img, original, _dir) = setup();
    let threads: Vec<_> = (0..4u64)
        .map(|i| {
            let socket = srv.socket.clone();
            std::thread::spawn(move || {
                let (mut raw, _, _) = Raw::open(&socket, "disk");
                let data = pattern(65536, 100 + i);
                for round in 0..20u64 {
                    let off = (i * 16 + round % 16) * 65536;
                    raw.write(round * 2, off, &data);
                    assert_eq!(raw.read(round * 2 + 1, off, 65536), data);
                }
                raw.disc();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }

    // An idle client, a client mid-handshake; stop: no new connections,
    // open ones go on until disconnected.
    let (mut idle, _, _) = Raw::open(&srv.socket, "disk");
    let mut negotiating = Raw::connect(&srv.socket);
    srv.handle.stop();
    assert!(UnixStream::connect(&srv.socket)
        .map(|mut s| {
            // A connection queued in the backlog before the listener closed
            // is reset without a greeting.
            let mut b = [0u8; 1];
            std::io::Read::read(&mut s, &mut b).unwrap_or(0)
        })
        .map_or(true, |n| n == 0));
    // Offset 0 was rewritten by the first thread above.
    assert_eq!(idle.read(1, 0, 512), pattern(65536, 100)[..512]);
    negotiating.opt(OPT_LIST, &[]);
    assert_eq!(negotiating.opt_reply().kind, REP_ERR_SHUTDOWN);
    srv.handle.disconnect_all();
    assert!(idle.is_closed());
    assert!(negotiating.is_closed());
    srv.handle.wait();
    assert_eq!(srv.handle.connection_count(), 0);
    drop(srv);

    let mut expected = original.clone();
    for i in 0..4u64 {
        let data = pattern(65536, 100 + i);
        for k in 0..16u64 {
            let off = ((i * 16 + k) * 65536) as usize;
            expected[off..off + 65536].copy_from_slice(&data);
        }
    }
    assert!(fs::read(&img).unwrap() == expected);
}

#[test]
fn stalled_handshake_times_out_but_idle_transmission_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("t.raw");
    make_image(&img, MIB, &[(0, &[0x42; 512])]);
    let mut server = nbd_server::Server::new();
    server.add_export("t", file_backend(&img)).unwrap();
    server.set_handshake_timeout(Some(std::time::Duration::from_millis(200)));
    let srv = TestServer::start_server(server);

    let (mut idle, _, _) = Raw::open(&srv.socket, "t");
    let mut silent = Raw::greet(&srv.socket);
    let mut half = Raw::connect(&srv.socket);
    half.send(&IHAVEOPT.to_be_bytes());
    std::thread::sleep(std::time::Duration::from_millis(700));
    assert!(silent.is_closed());
    assert!(half.is_closed());
    assert_eq!(idle.read(1, 0, 512), [0x42; 512]);
    idle.disc();
}
