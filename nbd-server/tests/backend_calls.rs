//! What a custom backend sees: exact calls and flags for each client
//! request (the contract cbw-tap relies on to intercept writes, trims and
//! write-zeroes), error mapping, and sanitising of odd block-status answers.

mod common;

use std::io;
use std::sync::{Arc, Mutex};

use common::raw::*;
use common::*;
use nbd_server::{Backend, Extent, ZeroFlags};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Write {
        offset: u64,
        len: usize,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u64,
    },
    Zero {
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    },
    Cache {
        offset: u64,
        len: u64,
    },
}

/// An in-memory disk that records every mutating call and can be told to
/// fail or to return canned extents.
struct Recorder {
    data: Mutex<Vec<u8>>,
    calls: Mutex<Vec<Call>>,
    fail_writes: Mutex<Option<io::Error>>,
    extents: Mutex<Vec<Extent>>,
}

impl Recorder {
    fn new(size: usize) -> Arc<Recorder> {
        Arc::new(Recorder {
            data: Mutex::new(vec![0; size]),
            calls: Mutex::new(Vec::new()),
            fail_writes: Mutex::new(None),
            extents: Mutex::new(Vec::new()),
        })
    }
    fn take_calls(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
}

impl Backend for Recorder {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self.data.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        if let Some(e) = self.fail_writes.lock().unwrap().take() {
            return Err(e);
        }
        self.calls.lock().unwrap().push(Call::Write {
            offset,
            len: buf.len(),
            fua,
        });
        self.data.lock().unwrap()[offset as usize..offset as usize + buf.len()]
            .copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.calls.lock().unwrap().push(Call::Flush);
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.calls.lock().unwrap().push(Call::Trim { offset, len });
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        self.calls
            .lock()
            .unwrap()
            .push(Call::Zero { offset, len, flags });
        if flags.fast_only {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "no fast zero"));
        }
        self.data.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn block_status(&self, _offset: u64, _len: u64) -> io::Result<Vec<Extent>> {
        Ok(self.extents.lock().unwrap().clone())
    }
    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        self.calls.lock().unwrap().push(Call::Cache { offset, len });
        Ok(())
    }
}

const SIZE: usize = 1 << 20;

#[test]
fn qemu_io_requests_reach_the_backend_with_their_flags() {
    let rec = Recorder::new(SIZE);
    let srv = TestServer::start(vec![("mem", rec.clone() as Arc<dyn Backend>)]);
    let uri = srv.uri("mem");
    // Write-back cache mode, so that QEMU adds FUA only where asked; it
    // flushes once when closing the image.
    let qemu_io = |uri: &str, cmds: &[&str]| {
        let mut args = vec!["-t", "writeback", "-f", "raw", uri];
        for c in cmds {
            args.extend(["-c", c]);
        }
        run_ok("qemu-io", &args);
        assert_eq!(
            rec.calls.lock().unwrap().pop(),
            Some(Call::Flush),
            "flush on close"
        );
    };
    qemu_io(&uri, &["write -P 0x11 4096 8192"]);
    assert_eq!(
        rec.take_calls(),
        vec![Call::Write {
            offset: 4096,
            len: 8192,
            fua: false
        }]
    );
    qemu_io(&uri, &["write -f -P 0x12 0 4096"]);
    assert_eq!(
        rec.take_calls(),
        vec![Call::Write {
            offset: 0,
            len: 4096,
            fua: true
        }]
    );
    qemu_io(&uri, &["write -z 65536 65536"]);
    let zero_no_hole = Call::Zero {
        offset: 65536,
        len: 65536,
        flags: ZeroFlags {
            may_punch_hole: false,
            fast_only: false,
        },
    };
    assert_eq!(rec.take_calls(), vec![zero_no_hole]);
    qemu_io(&uri, &["write -z -u 131072 65536"]);
    let zero_punch = Call::Zero {
        offset: 131072,
        len: 65536,
        flags: ZeroFlags {
            may_punch_hole: true,
            fast_only: false,
        },
    };
    assert_eq!(rec.take_calls(), vec![zero_punch]);
    qemu_io(&uri, &["discard 196608 65536"]);
    assert_eq!(
        rec.take_calls(),
        vec![Call::Trim {
            offset: 196608,
            len: 65536
        }]
    );
    qemu_io(&uri, &["flush"]);
    assert_eq!(rec.take_calls(), vec![Call::Flush]);
    assert_eq!(rec.data.lock().unwrap()[4096..12288], [0x11; 8192]);
    // Not multi-conn capable: the flag is not advertised.
    let out = run_ok("nbdinfo", &["--json", &uri]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["exports"][0]["can_multi_conn"].as_bool(),
        Some(false),
        "{out}"
    );
    assert_eq!(
        v["exports"][0]["is_read_only"].as_bool(),
        Some(false),
        "{out}"
    );
}

#[test]
fn raw_flags_errors_and_block_status_sanitising() {
    let rec = Recorder::new(SIZE);
    let srv = TestServer::start(vec![("mem", rec.clone() as Arc<dyn Backend>)]);
    let (mut raw, size, flags) = Raw::open(&srv.socket, "mem");
    assert_eq!(size, SIZE as u64);
    assert_eq!(flags, 0xc6d, "no CAN_MULTI_CONN");

    // FUA on trim and write-zeroes: the server flushes after the call.
    raw.request(FLAG_FUA, CMD_TRIM, 1, 512, 1024, &[]);
    assert_eq!(raw.status(1), 0);
    raw.request(FLAG_FUA | FLAG_NO_HOLE, CMD_WRITE_ZEROES, 2, 0, 4096, &[]);
    assert_eq!(raw.status(2), 0);
    let nh = ZeroFlags {
        may_punch_hole: false,
        fast_only: false,
    };
    assert_eq!(
        rec.take_calls(),
        vec![
            Call::Trim {
                offset: 512,
                len: 1024
            },
            Call::Flush,
            Call::Zero {
                offset: 0,
                len: 4096,
                flags: nh
            },
            Call::Flush,
        ]
    );

    // Fast zero the backend cannot do: ENOTSUP, and no flush follows.
    raw.request(FLAG_FAST_ZERO | FLAG_FUA, CMD_WRITE_ZEROES, 3, 0, 8192, &[]);
    let c = raw.chunk();
    assert_eq!(
        c.error(),
        (ENOTSUP, "write-zeroes failed: no fast zero".to_string())
    );
    assert_eq!(rec.take_calls().len(), 1);

    // Cache is passed through.
    raw.request(0, CMD_CACHE, 4, 4096, 65536, &[]);
    assert_eq!(raw.status(4), 0);
    assert_eq!(
        rec.take_calls(),
        vec![Call::Cache {
            offset: 4096,
            len: 65536
        }]
    );

    // Backend errors map to NBD errors, with the message.
    *rec.fail_writes.lock().unwrap() = Some(io::Error::from_raw_os_error(libc_enospc()));
    raw.request(0, CMD_WRITE, 5, 0, 512, &[1; 512]);
    let (errno, msg) = raw.chunk().error();
    assert_eq!(errno, ENOSPC);
    assert!(
        msg.starts_with("write failed: No space left on device"),
        "{msg}"
    );
    *rec.fail_writes.lock().unwrap() = Some(io::Error::other("backup target gone"));
    raw.request(0, CMD_WRITE, 6, 0, 512, &[1; 512]);
    assert_eq!(
        raw.chunk().error(),
        (EIO, "write failed: backup target gone".to_string())
    );
    // The connection goes on.
    raw.write(7, 0, &[9; 512]);
    assert_eq!(raw.read(8, 0, 512), [9; 512]);

    // Block status: zero-length extents skipped, equal neighbours merged,
    // overlong answers clipped, empty answers become one status-0 extent.
    let bs = |raw: &mut Raw, h: u64, flags: u16, off: u64, len: u32| {
        raw.request(flags, CMD_BLOCK_STATUS, h, off, len, &[]);
        let c = raw.chunk();
        assert_eq!((c.flags, c.kind, c.handle), (1, TYPE_BLOCK_STATUS, h));
        decode_block_status(&c.payload).1
    };
    *rec.extents.lock().unwrap() = vec![
        Extent::data(0),
        Extent::data(1000),
        Extent::data(24),
        Extent::hole(0),
        Extent::hole(3072),
        Extent {
            len: 1 << 40,
            hole: false,
            zero: true,
        },
    ];
    assert_eq!(
        bs(&mut raw, 10, 0, 0, 65536),
        vec![(1024, 0), (3072, 3), (61440, 2)]
    );
    assert_eq!(bs(&mut raw, 11, FLAG_REQ_ONE, 0, 65536), vec![(1024, 0)]);
    assert_eq!(bs(&mut raw, 12, 0, 0, 2000), vec![(1024, 0), (976, 3)]);
    *rec.extents.lock().unwrap() = vec![];
    assert_eq!(bs(&mut raw, 13, 0, 4096, 8192), vec![(8192, 0)]);
    raw.disc();
}

fn libc_enospc() -> i32 {
    28
}
