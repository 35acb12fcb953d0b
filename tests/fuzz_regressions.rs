//! Replays every fuzz finding kept under `fuzz/regressions/TARGET/` through
//! the very code the fuzz target runs (`fuzz/src/lib.rs`, included here), so
//! that a fixed crash stays fixed without cargo-fuzz or a nightly compiler.
//! A finding is added by copying libFuzzer's artifact there (see
//! fuzz/README.md); the file's first byte is the target's mode.

mod common;

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod fuzz_lib;

use std::fs;

fn replay(target: &str, run: fn(u8, &[u8])) -> usize {
    let dir = common::root().join("fuzz/regressions").join(target);
    let mut n = 0;
    let Ok(entries) = fs::read_dir(&dir) else {
        return 0;
    };
    let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    for p in paths {
        if p.extension().is_some_and(|e| e == "md") {
            continue;
        }
        let data = fs::read(&p).unwrap();
        if let Some((mode, input)) = fuzz_lib::split_mode(&data) {
            eprintln!("replaying {}", p.display());
            run(mode, input);
            n += 1;
        }
    }
    n
}

#[test]
fn header_findings_stay_fixed() {
    replay("header", fuzz_lib::run_header);
}

#[test]
fn archive_findings_stay_fixed() {
    replay("archive", fuzz_lib::run_archive);
}

#[test]
fn stream_findings_stay_fixed() {
    replay("stream", fuzz_lib::run_stream);
}

#[test]
fn restore_map_findings_stay_fixed() {
    replay("restore_map", fuzz_lib::run_restore_map);
}

/// The `restore_map` seeds reach both ends of the parser: qmrestore's maps
/// are read (and come back the same written out again), the near misses are
/// refused on the line at fault, through whole and one-byte reads alike.
#[test]
fn restore_map_seeds_are_read_as_qmrestore_means_them() {
    use vma_decode::restore_map::RestoreMap;
    let seeds = fuzz_lib::restore_map_seeds();
    assert_eq!(seeds.len(), 16);
    let mut verdicts = Vec::new();
    for (name, seed) in &seeds {
        let (mode, input) = fuzz_lib::split_mode(seed).unwrap();
        fuzz_lib::run_restore_map(mode, input);
        if mode == 0 {
            let verdict = match RestoreMap::read(input) {
                Ok(map) => format!("{name}: {} devices", map.devices.len()),
                Err(e) => format!("{name}: {e}"),
            };
            verdicts.push(verdict);
        }
    }
    assert_eq!(
        verdicts,
        [
            "lvm: 1 devices",
            "two-disks: 2 devices",
            "options: 1 devices",
            "skip: 2 devices",
            "octal: 1 devices",
            "unterminated: ended without 'done' (the writer closed it early)",
            "twice: line 2: device \"drive-scsi0\" is named twice",
            "empty-line: line 2: empty line (the map ends with 'done')",
        ]
    );
    // What the options seed says, exactly (0x100000 read as hex).
    let (_, options) = &seeds[4];
    let map = RestoreMap::read(&options[1..]).unwrap();
    let line = fuzz_lib::restore_map_line("drive-sata0", &map.devices["drive-sata0"]);
    assert_eq!(
        String::from_utf8(line).unwrap(),
        "format=raw:throttling.bps=1048576:throttling.group=restore:cache=none:1:drive-sata0=/dev/rbd0"
    );
}

#[test]
fn nbd_findings_stay_fixed() {
    replay("nbd", fuzz_lib::run_nbd);
}

/// The `nbd` seeds reach every command the backend has, through the
/// scripted handshake (simple and structured replies) and through a
/// handshake in the input; BLOCK_STATUS only where `base:allocation` was
/// negotiated, as the protocol says.
#[test]
fn nbd_seeds_reach_every_command() {
    let seeds = fuzz_lib::nbd_seeds();
    let names: Vec<_> = seeds
        .iter()
        .map(|(n, s)| format!("{n}-m{}", s[0]))
        .collect();
    assert_eq!(
        names,
        [
            "every-command-m1",
            "every-command-m3",
            "every-command-m0",
            "list-info-abort-m0",
            "list-meta-m0",
            "export-name-m0",
            "unknown-option-m0",
        ]
    );
    let mut calls = Vec::new();
    for (_, seed) in &seeds {
        let (mode, input) = fuzz_lib::split_mode(seed).unwrap();
        let mut out = Vec::new();
        calls.push(fuzz_lib::nbd_session(mode, input, &mut out));
        assert!(!out.is_empty());
    }
    let every = |block_status| fuzz_lib::NbdCalls {
        reads: 2,
        writes: 1,
        flushes: 1,
        trims: 1,
        write_zeroes: 2,
        block_status,
        caches: 1,
    };
    assert_eq!(calls[0], every(0));
    assert_eq!(calls[1], every(1));
    assert_eq!(calls[2], every(1));
    assert_eq!(calls[3], fuzz_lib::NbdCalls::default());
    assert_eq!(calls[5].reads, 1, "the request after NBD_OPT_EXPORT_NAME");
    assert_eq!(calls[6], fuzz_lib::NbdCalls::default());
}

/// Requests that reach past the export's end (or overflow 64 bits) are
/// answered with the protocol's errors and never reach the backend, whose
/// every call panics outside its bounds: EINVAL (22) for reads, trims,
/// caches and block status (not negotiated here: EINVAL as well), ENOSPC
/// (28) for writes and write-zeroes.
#[test]
fn nbd_requests_outside_the_export_never_reach_the_backend() {
    let size = fuzz_lib::NBD_EXPORT_SIZE;
    let cases: [(u16, u64, u32, u32); 10] = [
        (0, size - 511, 512, 22),
        (0, u64::MAX - 1, 4096, 22),
        (1, size, 512, 28),
        (1, size - 4095, 4096, 28),
        (4, size - 1, 2, 22),
        (4, u64::MAX - 511, 512, 22),
        (6, size, 1, 28),
        (6, u64::MAX - 4095, 4096, 28),
        (5, size, 4096, 22),
        (7, size, 4096, 22),
    ];
    let mut input = Vec::new();
    for (i, (cmd, offset, len, _)) in cases.iter().enumerate() {
        input.extend(fuzz_lib::nbd_request(*cmd, 0, i as u64 + 1, *offset, *len));
        if *cmd == 1 {
            input.extend(std::iter::repeat_n(7u8, *len as usize));
        }
    }
    input.extend(fuzz_lib::nbd_request(2, 0, 99, 0, 0));
    let mut out = Vec::new();
    let calls = fuzz_lib::nbd_session(fuzz_lib::MODE_NBD_HANDSHAKE, &input, &mut out);
    assert_eq!(calls, fuzz_lib::NbdCalls::default());
    // Simple replies: an error is 16 bytes (magic, error, handle), the last
    // ones of `out`, in order (refusals are answered as they are read).
    let tail = &out[out.len() - cases.len() * 16..];
    let mut got = Vec::new();
    for c in tail.chunks(16) {
        let u32_at = |i: usize| u32::from_be_bytes(c[i..i + 4].try_into().unwrap());
        assert_eq!(u32_at(0), 0x6744_6698);
        got.push((u64::from_be_bytes(c[8..16].try_into().unwrap()), u32_at(4)));
    }
    let want: Vec<_> = cases
        .iter()
        .enumerate()
        .map(|(i, c)| (i as u64 + 1, c.3))
        .collect();
    assert_eq!(got, want);
}

/// The repairs make mutated inputs pass the checksums: a header, an archive
/// and a stream with every checksum wrong read as sound once repaired.
#[test]
fn checksum_repairs_let_inputs_past_the_checksums() {
    let mut h = vma_format::HeaderBuilder::new([3; 16], 0);
    h.add_device("drive-scsi0", 65536 * 2).unwrap();
    let mut w = vma_format::Writer::new(Vec::new(), &h, Default::default()).unwrap();
    w.write_raw(1, 0, &[7; 65536]).unwrap();
    w.write_raw(1, 1, &[9; 100]).unwrap();
    let good = w.finish().unwrap();
    let hsize = u32::from_be_bytes(good[56..60].try_into().unwrap()) as usize;
    let mut bad = good.clone();
    bad[40] ^= 1; // header MD5
    bad[hsize + 30] ^= 1; // extent MD5
    bad[hsize + 600] ^= 1; // extent data: its CRC
    assert!(vma_format::VmaHeader::parse(&bad).is_err());
    fuzz_lib::repair_archive(&mut bad);
    let mut archive = vma_format::Archive::new(&bad[..]).unwrap();
    let mut sink = vma_verify::VerifySink::new(archive.header());
    archive.run(&mut sink).unwrap();
    assert_eq!(sink.clusters(), 2);

    let devs = [vma_format::stream::StreamDevice::new("d", 4096)];
    let mut s = vma_format::stream::StreamWriter::new(Vec::new(), 0, &devs).unwrap();
    let data = vec![1u8; 4096];
    s.write_cluster(&vma_format::Cluster {
        dev_id: 1,
        cluster_num: 0,
        mask: vma_format::BlockMask(1),
        data: &data,
    })
    .unwrap();
    let mut stream = s.finish().unwrap();
    stream[15] ^= 1; // backup time: preamble CRC
    let rec = stream.len() - 32 - 4112;
    stream[rec + 100] ^= 1; // cluster data: record CRC
    assert!(vma_format::stream::StreamReader::new(&stream[..]).is_err());
    fuzz_lib::repair_stream(&mut stream);
    let mut r = vma_format::stream::StreamReader::new(&stream[..]).unwrap();
    assert!(r.next_cluster().unwrap().is_some());
    assert!(r.next_cluster().unwrap().is_none());
}
