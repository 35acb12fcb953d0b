//! What the fuzz targets share: the runs of each parser, and the checksum
//! repairs that let mutated inputs past the MD5s and CRCs.
//!
//! Every target takes its first byte as a mode and the rest as the input.
//! Bit 0 of the mode: repair the checksums after mutation (the header MD5,
//! each extent's MD5 and data CRC-32, the stream's preamble and record
//! CRC-32s), so that the fuzzer reaches the checks behind them; without it the
//! input is parsed exactly as given. Bit 1 (archive target): read in salvage
//! mode. Findings are replayed by `vma-format/tests/fuzz_regressions.rs`,
//! which calls these same functions.
//!
//! To add a target (e.g. a new parser): a `run_*` function here, a file in
//! `fuzz_targets/` calling it through [`split_mode`], a `[[bin]]` in
//! `Cargo.toml`, seeds in `vma-format/examples/fuzz_seeds.rs`, and its name in
//! `scripts/fuzz.sh`'s list.

use std::io::Read;

use vma_format::extent::{update_checksum as update_extent_md5, DATA_CHECKSUM_MASK, EXTENT_MAGIC};
use vma_format::header::update_checksum as update_header_md5;
use vma_format::stream::{
    StreamReader, MAGIC as STREAM_MAGIC, PREAMBLE_FIXED_SIZE, RECORD_HEADER_SIZE,
};
use vma_format::{
    Archive, ReadOptions, VmaHeader, BLOCK_SIZE, EXTENT_HEADER_SIZE, HEADER_FIXED_SIZE,
};

/// Bit 0 of the mode byte: repair checksums.
pub const MODE_REPAIR: u8 = 1;
/// Bit 1 of the mode byte: salvage (archive target).
pub const MODE_SALVAGE: u8 = 2;

/// Splits off the mode byte; `None` for an empty input.
pub fn split_mode(data: &[u8]) -> Option<(u8, &[u8])> {
    data.split_first().map(|(m, rest)| (*m, rest))
}

/// The header parser, from a slice and from a reader (which must agree).
pub fn run_header(mode: u8, input: &[u8]) {
    let mut buf = input.to_vec();
    if mode & MODE_REPAIR != 0 {
        repair_header(&mut buf);
    }
    let parsed = VmaHeader::parse(&buf);
    let read = VmaHeader::read_from(&mut &buf[..]);
    match (&parsed, &read) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a.header_size(), b.header_size());
            assert_eq!(a.devices(), b.devices());
            assert_eq!(a.configs(), b.configs());
            for d in a.devices() {
                assert!(d.size > 0 && d.size <= vma_format::MAX_DEVICE_SIZE);
                let _ = vma_format::names::check_file_name(d.c_name());
            }
        }
        (Err(_), Err(_)) => {}
        _ => panic!("parse and read_from disagree: {parsed:?} / {read:?}"),
    }
}

/// The archive reader with the verify sink, as `vma-verify` runs it.
pub fn run_archive(mode: u8, input: &[u8]) {
    let mut buf = input.to_vec();
    if mode & MODE_REPAIR != 0 {
        repair_archive(&mut buf);
    }
    let options = ReadOptions {
        salvage: mode & MODE_SALVAGE != 0,
    };
    let Ok(mut archive) = Archive::with_options(&buf[..], options) else {
        return;
    };
    let mut sink = vma_verify::VerifySink::new(archive.header());
    if let Ok(summary) = archive.run(&mut sink) {
        assert_eq!(summary.clusters, sink.clusters());
        assert!(summary.bytes_read <= buf.len() as u64);
    }
}

/// The cluster-stream reader, read to its end or first error.
pub fn run_stream(mode: u8, input: &[u8]) {
    let mut buf = input.to_vec();
    if mode & MODE_REPAIR != 0 {
        repair_stream(&mut buf);
    }
    let Ok(mut reader) = StreamReader::new(&buf[..]) else {
        return;
    };
    let mut n = 0u64;
    loop {
        match reader.next_cluster() {
            Ok(Some(c)) => {
                assert_eq!(c.data.len(), c.mask.data_len());
                n += 1;
            }
            Ok(None) => break,
            Err(_) => {
                assert!(reader.next_cluster().is_err());
                break;
            }
        }
    }
    assert!(n < reader.records() + 1);
    let _ = reader.into_inner().bytes().count();
}

/// Recomputes the header MD5 if the header size field fits the input.
pub fn repair_header(buf: &mut [u8]) -> Option<usize> {
    if buf.len() < HEADER_FIXED_SIZE || buf[..4] != *b"VMA\0" {
        return None;
    }
    let size = u32::from_be_bytes(buf[56..60].try_into().unwrap()) as usize;
    if size < HEADER_FIXED_SIZE || size > buf.len() {
        return None;
    }
    update_header_md5(&mut buf[..size]);
    Some(size)
}

/// Repairs the header, then walks the extents: each one's data CRC-32 (if
/// it has the checksum slot) and MD5, stepping by its block count.
pub fn repair_archive(buf: &mut [u8]) {
    let Some(mut pos) = repair_header(buf) else {
        return;
    };
    while pos + EXTENT_HEADER_SIZE <= buf.len() {
        if buf[pos..pos + 4] != EXTENT_MAGIC {
            pos += EXTENT_HEADER_SIZE;
            continue;
        }
        let blocks = u16::from_be_bytes([buf[pos + 6], buf[pos + 7]]) as usize;
        let data = pos + EXTENT_HEADER_SIZE;
        let end = data + blocks * BLOCK_SIZE;
        let slot = pos + 40 + 8 * 58;
        if u16::from_be_bytes([buf[slot], buf[slot + 1]]) == DATA_CHECKSUM_MASK && end <= buf.len()
        {
            let crc = crc32fast::hash(&buf[data..end]);
            buf[slot + 4..slot + 8].copy_from_slice(&crc.to_be_bytes());
        }
        let head: &mut [u8; EXTENT_HEADER_SIZE] = (&mut buf[pos..pos + EXTENT_HEADER_SIZE])
            .try_into()
            .unwrap();
        update_extent_md5(head);
        pos = end;
    }
}

/// Recomputes the preamble CRC and every record's CRC-32 that fits.
pub fn repair_stream(buf: &mut [u8]) {
    if buf.len() < PREAMBLE_FIXED_SIZE || buf[..8] != STREAM_MAGIC {
        return;
    }
    let count = u16::from_be_bytes([buf[20], buf[21]]) as usize;
    let mut pos = PREAMBLE_FIXED_SIZE;
    for _ in 0..count {
        if pos + 10 > buf.len() {
            return;
        }
        pos += 10 + u16::from_be_bytes([buf[pos + 8], buf[pos + 9]]) as usize;
    }
    if pos + 4 > buf.len() {
        return;
    }
    let crc = crc32fast::hash(&buf[..pos]);
    buf[pos..pos + 4].copy_from_slice(&crc.to_be_bytes());
    pos += 4;
    while pos + RECORD_HEADER_SIZE <= buf.len() {
        let len = u32::from_be_bytes(buf[pos + 8..pos + 12].try_into().unwrap()) as usize;
        let end = pos + RECORD_HEADER_SIZE + len;
        if end + 4 > buf.len() {
            return;
        }
        let crc = crc32fast::hash(&buf[pos..end]);
        buf[end..end + 4].copy_from_slice(&crc.to_be_bytes());
        pos = end + 4;
    }
}

/// Bit 0 of the `restore_map` mode byte: read through a one-byte buffer
/// (every line split across reads), which must give what a slice gives.
pub const MODE_SMALL_READS: u8 = 1;

/// The `-r` map parser of `vma-decode extract` (qmrestore's protocol):
/// [`RestoreMap::read`](vma_decode::restore_map::RestoreMap::read) over the
/// input, which must never panic and must give the same answer whatever
/// the read sizes; a map it accepts must come back the same when each entry
/// is written out again in qmrestore's syntax and parsed by `parse_line`.
pub fn run_restore_map(mode: u8, input: &[u8]) {
    use vma_decode::restore_map::{parse_line, RestoreMap};
    let whole = RestoreMap::read(input);
    if mode & MODE_SMALL_READS != 0 {
        let split = RestoreMap::read(std::io::BufReader::with_capacity(1, input));
        match (&whole, &split) {
            (Ok(a), Ok(b)) => assert_eq!(a, b),
            (Err(a), Err(b)) => assert_eq!(
                (a.line(), a.to_string(), a.is_io()),
                (b.line(), b.to_string(), b.is_io())
            ),
            _ => panic!("slice and one-byte reads disagree: {whole:?} / {split:?}"),
        }
    }
    if let Ok(map) = whole {
        for (name, mapping) in &map.devices {
            let line = restore_map_line(name, mapping);
            let (again, parsed) = parse_line(&line).expect("a written-out entry parses");
            assert_eq!((&again, &parsed), (name, mapping), "{line:?}");
        }
    }
}

/// One entry of a map in qmrestore's syntax (what `parse_line` reads).
pub fn restore_map_line(name: &str, mapping: &vma_decode::restore_map::Mapping) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    use vma_decode::restore_map::Mapping;
    let t = match mapping {
        Mapping::Skip => return format!("skip={name}").into_bytes(),
        Mapping::Target(t) => t,
    };
    let mut line = Vec::new();
    if let Some(f) = &t.format {
        line.extend_from_slice(format!("format={f}:").as_bytes());
    }
    if t.throttling_bps != 0 {
        line.extend_from_slice(format!("throttling.bps={}:", t.throttling_bps).as_bytes());
    }
    if let Some(g) = &t.throttling_group {
        line.extend_from_slice(format!("throttling.group={g}:").as_bytes());
    }
    if let Some(c) = &t.cache {
        line.extend_from_slice(format!("cache={c}:").as_bytes());
    }
    line.extend_from_slice(format!("{}:{name}=", u8::from(t.write_zeros)).as_bytes());
    line.extend_from_slice(t.path.as_os_str().as_bytes());
    line
}

/// Seeds of the `restore_map` target: maps as qmrestore writes them (LVM,
/// ZFS, RBD, file targets, skips, every option), and near misses.
pub fn restore_map_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let maps: [(&str, &str); 8] = [
        ("lvm", "format=raw:0:drive-scsi0=/dev/pve/vm-100-disk-0\ndone\n"),
        (
            "two-disks",
            "format=raw:0:drive-scsi0=/dev/zvol/rpool/data/vm-101-disk-0\n\
             format=raw:1:drive-virtio1=/var/lib/vz/images/101/vm-101-disk-1.raw\ndone\n",
        ),
        (
            "options",
            "throttling.bps=0x100000:throttling.group=restore:cache=none:format=raw:1:drive-sata0=/dev/rbd0\ndone\n",
        ),
        ("skip", "skip=drive-efidisk0\n0:drive-scsi0=/tmp/t=a:b\ndone\n"),
        ("octal", "throttling.bps=0777:0:drive-ide0=/dev/sdb\ndone\n"),
        ("unterminated", "format=raw:0:drive-scsi0=/dev/sdb\n"),
        ("twice", "0:drive-scsi0=/a\n1:drive-scsi0=/b\ndone\n"),
        ("empty-line", "0:drive-scsi0=/a\n\ndone\n"),
    ];
    maps.iter()
        .flat_map(|(name, text)| {
            [0u8, MODE_SMALL_READS].map(|m| {
                let mut seed = vec![m];
                seed.extend_from_slice(text.as_bytes());
                (*name, seed)
            })
        })
        .collect()
}

/// Bit 0 of the `nbd` mode byte: the input is preceded by a scripted
/// handshake (fixed newstyle, `NBD_OPT_GO` on the default export), so that
/// all of it is transmission-phase requests.
pub const MODE_NBD_HANDSHAKE: u8 = 1;
/// Bit 1 of the `nbd` mode byte (with bit 0): the scripted handshake also
/// negotiates structured replies and the `base:allocation` context.
pub const MODE_NBD_STRUCTURED: u8 = 2;

/// Size of the `nbd` target's export: not a multiple of 4096, so requests
/// that straddle its end are tried too.
pub const NBD_EXPORT_SIZE: u64 = 256 * 1024 + 512;

/// What reached the `nbd` target's backend (every call was inside the
/// export: the backend panics otherwise).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NbdCalls {
    /// `read_at` calls (a vectored read counts once per piece).
    pub reads: u64,
    /// `write_at` calls.
    pub writes: u64,
    /// `flush` calls.
    pub flushes: u64,
    /// `trim` calls.
    pub trims: u64,
    /// `write_zeroes` calls.
    pub write_zeroes: u64,
    /// `block_status` calls.
    pub block_status: u64,
    /// `cache` calls.
    pub caches: u64,
}

/// An export held in memory that checks every call against its bounds: a
/// request the server should have refused panics here.
struct MemoryExport {
    data: std::sync::Mutex<Vec<u8>>,
    calls: std::sync::Mutex<NbdCalls>,
}

impl MemoryExport {
    fn check(&self, what: &str, offset: u64, len: u64) {
        let end = offset.checked_add(len);
        assert!(
            len > 0 && end.is_some_and(|e| e <= NBD_EXPORT_SIZE),
            "{what} of {len} bytes at {offset} reached the backend (export of {NBD_EXPORT_SIZE})"
        );
    }

    fn count(&self, f: impl FnOnce(&mut NbdCalls)) {
        f(&mut self.calls.lock().unwrap());
    }
}

impl nbd_server::Backend for MemoryExport {
    fn size(&self) -> u64 {
        NBD_EXPORT_SIZE
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.check("read", offset, buf.len() as u64);
        self.count(|c| c.reads += 1);
        let data = self.data.lock().unwrap();
        buf.copy_from_slice(&data[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, _fua: bool) -> std::io::Result<()> {
        self.check("write", offset, buf.len() as u64);
        self.count(|c| c.writes += 1);
        let mut data = self.data.lock().unwrap();
        data[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> std::io::Result<()> {
        self.count(|c| c.flushes += 1);
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.check("trim", offset, len);
        self.count(|c| c.trims += 1);
        Ok(())
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        _flags: nbd_server::ZeroFlags,
    ) -> std::io::Result<()> {
        self.check("write_zeroes", offset, len);
        self.count(|c| c.write_zeroes += 1);
        let mut data = self.data.lock().unwrap();
        data[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> std::io::Result<Vec<nbd_server::Extent>> {
        self.check("block_status", offset, len);
        self.count(|c| c.block_status += 1);
        // Data in the first half, a hole after: the server must clip and
        // merge what it is given.
        let half = NBD_EXPORT_SIZE / 2;
        let end = offset + len;
        let mut out = Vec::new();
        if offset < half {
            out.push(nbd_server::Extent::data(end.min(half) - offset));
        }
        if end > half {
            out.push(nbd_server::Extent::hole(end - offset.max(half)));
        }
        Ok(out)
    }

    fn cache(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.check("cache", offset, len);
        self.count(|c| c.caches += 1);
        Ok(())
    }
}

/// Counts what the server writes, keeps none of it (reads of the whole
/// export, repeated, would otherwise pile up).
struct CountingSink<'a>(&'a mut u64);

impl std::io::Write for CountingSink<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        *self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The client's side of the scripted handshake of [`MODE_NBD_HANDSHAKE`].
pub fn nbd_handshake(structured: bool) -> Vec<u8> {
    const IHAVEOPT: &[u8; 8] = b"IHAVEOPT";
    let option = |out: &mut Vec<u8>, opt: u32, data: &[u8]| {
        out.extend_from_slice(IHAVEOPT);
        out.extend_from_slice(&opt.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
    };
    // Client flags: fixed newstyle, no zeroes.
    let mut out = 3u32.to_be_bytes().to_vec();
    if structured {
        option(&mut out, 8, &[]); // NBD_OPT_STRUCTURED_REPLY
        let query = b"base:allocation";
        let mut meta = 0u32.to_be_bytes().to_vec(); // default export
        meta.extend_from_slice(&1u32.to_be_bytes());
        meta.extend_from_slice(&(query.len() as u32).to_be_bytes());
        meta.extend_from_slice(query);
        option(&mut out, 10, &meta); // NBD_OPT_SET_META_CONTEXT
    }
    // NBD_OPT_GO on the default export, no information requests.
    option(&mut out, 7, &[0, 0, 0, 0, 0, 0]);
    out
}

/// One transmission-phase request (`payload` follows a write's header).
pub fn nbd_request(cmd: u16, flags: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut out = 0x2560_9513u32.to_be_bytes().to_vec();
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&cmd.to_be_bytes());
    out.extend_from_slice(&handle.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out
}

/// One client session against an export of [`NBD_EXPORT_SIZE`] bytes held
/// in memory: the input as the client's bytes (after the scripted handshake
/// if the mode says so), served by `Server::serve_stream` to its end.
/// The server's bytes go to `out`; returns what reached the backend.
pub fn nbd_session(mode: u8, input: &[u8], out: &mut (dyn std::io::Write + Send)) -> NbdCalls {
    let export = std::sync::Arc::new(MemoryExport {
        data: std::sync::Mutex::new(vec![0u8; NBD_EXPORT_SIZE as usize]),
        calls: Default::default(),
    });
    let mut server = nbd_server::Server::new();
    server.add_export("disk", export.clone()).unwrap();
    let mut client = Vec::new();
    if mode & MODE_NBD_HANDSHAKE != 0 {
        client = nbd_handshake(mode & MODE_NBD_STRUCTURED != 0);
    }
    client.extend_from_slice(input);
    let _ = server.serve_stream(&client[..], out);
    let calls = *export.calls.lock().unwrap();
    calls
}

/// The NBD server's option and request parsers (handshake and
/// transmission), over in-memory input: never a panic, never a request
/// outside the export at the backend (see [`nbd_session`]).
pub fn run_nbd(mode: u8, input: &[u8]) {
    let mut sent = 0u64;
    nbd_session(mode, input, &mut CountingSink(&mut sent));
}

/// Seeds of the `nbd` target: every command, in and out of bounds, with
/// and without the scripted handshake, and handshakes of every option.
pub fn nbd_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let size = NBD_EXPORT_SIZE;
    let mut requests = Vec::new();
    let mut h = 0u64;
    let mut req = |cmd: u16, flags: u16, offset: u64, len: u32| {
        h += 1;
        let mut r = nbd_request(cmd, flags, h, offset, len);
        if cmd == 1 {
            r.extend(std::iter::repeat_n(0x5a, len as usize));
        }
        r
    };
    let every: Vec<u8> = [
        req(0, 0, 0, 4096),             // READ
        req(1, 1, 4096, 4096),          // WRITE, FUA
        req(3, 0, 0, 0),                // FLUSH
        req(4, 0, 8192, 4096),          // TRIM
        req(6, 0, 65536, 65536),        // WRITE_ZEROES
        req(6, 2, 0, 512),              // WRITE_ZEROES, NO_HOLE
        req(7, 0, 0, size as u32),      // BLOCK_STATUS
        req(5, 0, 0, 4096),             // CACHE
        req(0, 0, size - 512, 512),     // READ of the last sector
        req(0, 0, size - 512, 4096),    // READ past the end
        req(1, 0, size, 512),           // WRITE past the end
        req(4, 0, u64::MAX - 511, 512), // TRIM whose end overflows
        req(2, 0, 0, 0),                // DISC
    ]
    .concat();
    requests.push(("every-command", every));
    let mut seeds = Vec::new();
    for (name, r) in &requests {
        for mode in [MODE_NBD_HANDSHAKE, MODE_NBD_HANDSHAKE | MODE_NBD_STRUCTURED] {
            let mut seed = vec![mode];
            seed.extend_from_slice(r);
            seeds.push((*name, seed));
        }
        // The same with the handshake in the input, for mode 0.
        let mut seed = vec![0];
        seed.extend_from_slice(&nbd_handshake(true));
        seed.extend_from_slice(r);
        seeds.push((*name, seed));
    }
    // Handshakes: list, info, export name, abort, an unknown option.
    let opt = |o: u32, data: &[u8]| {
        let mut out = b"IHAVEOPT".to_vec();
        out.extend_from_slice(&o.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        out
    };
    let flags = 3u32.to_be_bytes().to_vec();
    let info = [0, 0, 0, 4, b'd', b'i', b's', b'k', 0, 2, 0, 3, 0, 2];
    let handshakes: [(&str, Vec<u8>); 4] = [
        (
            "list-info-abort",
            [flags.clone(), opt(3, &[]), opt(6, &info), opt(2, &[])].concat(),
        ),
        ("list-meta", {
            let mut q = 4u32.to_be_bytes().to_vec();
            q.extend_from_slice(b"disk");
            q.extend_from_slice(&0u32.to_be_bytes());
            [flags.clone(), opt(8, &[]), opt(9, &q)].concat()
        }),
        (
            "export-name",
            [flags.clone(), opt(1, b"disk"), nbd_request(0, 0, 1, 0, 512)].concat(),
        ),
        (
            "unknown-option",
            [flags, opt(99, b"xyz"), opt(7, &[0, 0, 0, 0, 0, 0])].concat(),
        ),
    ];
    for (name, hs) in handshakes {
        let mut seed = vec![0];
        seed.extend_from_slice(&hs);
        seeds.push((name, seed));
    }
    seeds
}
