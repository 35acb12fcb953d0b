//! The cluster stream's unit tests: layout, round trips, every refusal.

use super::*;
use crate::cluster::ClusterBuf;
use crate::{clusters_for, BlockMask, Error, ErrorClass, BLOCK_SIZE, CLUSTER_SIZE};
use proptest::prelude::*;

fn devices() -> Vec<StreamDevice> {
    vec![
        StreamDevice::new("drive-scsi0", 3 * CLUSTER_SIZE as u64 + 4608),
        StreamDevice::new("drive-virtio1", CLUSTER_SIZE as u64),
    ]
}

fn cluster(dev_id: u8, n: u32, mask: u16) -> ClusterBuf {
    let mask = BlockMask(mask);
    let data = (0..mask.data_len())
        .map(|i| (i / BLOCK_SIZE) as u8 ^ n as u8 ^ dev_id)
        .collect();
    ClusterBuf {
        dev_id,
        cluster_num: n,
        mask,
        data,
    }
}

/// Every cluster of `devices()`, in a scrambled order.
fn all_clusters() -> Vec<ClusterBuf> {
    vec![
        cluster(1, 2, 0xffff),
        cluster(2, 0, 0),
        cluster(1, 0, 0x8001),
        cluster(1, 3, 0b11),
        cluster(1, 1, 0),
    ]
}

fn stream_of(clusters: &[ClusterBuf]) -> Vec<u8> {
    let mut w = StreamWriter::new(Vec::new(), 1795689905, &devices()).unwrap();
    for c in clusters {
        w.write_cluster(&c.as_cluster()).unwrap();
    }
    w.finish().unwrap()
}

fn read_all(bytes: &[u8]) -> Result<Vec<ClusterBuf>, Error> {
    let mut r = StreamReader::new(bytes)?;
    let mut out = Vec::new();
    while let Some(c) = r.next_cluster()? {
        out.push(c.to_owned_buf());
    }
    Ok(out)
}

fn err_of(bytes: &[u8]) -> String {
    let e = read_all(bytes).unwrap_err();
    assert_eq!(e.class(), ErrorClass::Damaged, "{e}");
    e.to_string()
}

/// A record with a correct CRC.
fn raw_record(kind: u8, a: u8, b: u16, c: u32, body: &[u8]) -> Vec<u8> {
    let mut r = record_header(kind, a, b, c, body.len() as u32).to_vec();
    r.extend_from_slice(body);
    let crc = crc32fast::hash(&r);
    r.extend_from_slice(&crc.to_be_bytes());
    r
}

fn preamble_len() -> usize {
    PREAMBLE_FIXED_SIZE + devices().iter().map(|d| 10 + d.name.len()).sum::<usize>() + 4
}

#[test]
fn round_trip() {
    let clusters = all_clusters();
    let bytes = stream_of(&clusters);
    let mut r = StreamReader::new(&bytes[..]).unwrap();
    assert_eq!(r.backup_time(), 1795689905);
    assert_eq!(r.devices(), &devices()[..]);
    let mut got = Vec::new();
    while let Some(c) = r.next_cluster().unwrap() {
        got.push(c.to_owned_buf());
    }
    assert_eq!(got, clusters);
    assert_eq!(r.position(), bytes.len() as u64);
    assert!(r.next_cluster().unwrap().is_none());
}

#[test]
fn incremental_identity() {
    let id = BackupIdentity {
        uuid: [3; 16],
        base: Some(BaseRef {
            uuid: [4; 16],
            time: 1_700_000_000,
        }),
    };
    let some = &all_clusters()[1..3];
    let mut w = StreamWriter::with_identity(Vec::new(), 5, &devices(), Some(&id)).unwrap();
    for c in some {
        w.write_cluster(&c.as_cluster()).unwrap();
    }
    let bytes = w.finish().unwrap();
    assert_eq!(&bytes[8..10], &[0, 2]);
    let mut r = StreamReader::new(&bytes[..]).unwrap();
    assert_eq!(r.identity(), Some(&id));
    assert!(r.is_incremental());
    let mut n = 0;
    while r.next_cluster().unwrap().is_some() {
        n += 1;
    }
    assert_eq!(n, 2);
    // A full version-2 stream still needs every cluster.
    let full = BackupIdentity {
        uuid: [3; 16],
        base: None,
    };
    let mut w = StreamWriter::with_identity(Vec::new(), 5, &devices(), Some(&full)).unwrap();
    for c in some {
        w.write_cluster(&c.as_cluster()).unwrap();
    }
    let bytes = w.finish().unwrap();
    assert!(err_of(&bytes).contains("missing"), "{}", err_of(&bytes));
    // A damaged kind byte (CRC fixed up) is named.
    let mut w = StreamWriter::with_identity(Vec::new(), 5, &devices(), Some(&id)).unwrap();
    w.write_cluster(&some[0].as_cluster()).unwrap();
    let mut bytes = w.finish().unwrap();
    let pre = preamble_len() + IDENTITY_SIZE;
    bytes[pre - IDENTITY_SIZE - 4 + 16] = 9;
    let crc = crc32fast::hash(&bytes[..pre - 4]);
    bytes[pre - 4..pre].copy_from_slice(&crc.to_be_bytes());
    assert_eq!(err_of(&bytes), "header: unknown backup kind 9");
}

#[test]
fn layout() {
    let bytes = stream_of(&[]);
    assert_eq!(&bytes[..8], b"VMACSTRM");
    assert_eq!(&bytes[8..12], &[0, 1, 0, 0]);
    assert_eq!(&bytes[20..22], &[0, 2]);
    let end = &bytes[preamble_len()..];
    assert_eq!(&end[..12], &[b'E', 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 16]);
    assert_eq!(end.len(), 12 + 16 + 4);
}

#[test]
fn preamble_errors() {
    let good = stream_of(&all_clusters());
    assert_eq!(
        err_of(b""),
        "header: not a cluster stream: the input is empty"
    );
    assert_eq!(
        err_of(b"VMA\0hello"),
        "header: not a cluster stream (wrong magic number)"
    );
    assert_eq!(
        err_of(&good[..10]),
        "header: truncated: the input ends inside the preamble, after 10 bytes"
    );
    let mut bad = good.clone();
    bad[9] = 3;
    assert_eq!(
        err_of(&bad),
        "header: unsupported cluster stream version 3 (this reader knows 1 and 2)"
    );
    let mut bad = good.clone();
    bad[11] = 1;
    assert_eq!(err_of(&bad), "header: unknown preamble flags 0x0001");
    let mut bad = good.clone();
    bad[30] ^= 1;
    assert_eq!(err_of(&bad), "header: preamble checksum mismatch");
    // A name length beyond the limit is refused before anything is allocated.
    let mut bad = good[..PREAMBLE_FIXED_SIZE].to_vec();
    bad.extend_from_slice(&[0, 0, 0, 0, 0, 0, 2, 0, 0xff, 0xff]);
    assert_eq!(
        err_of(&bad),
        "header: device 1: name of 65535 bytes, more than 65534"
    );
}

#[test]
fn preamble_content_checked() {
    // A well-formed preamble (CRC right) declaring an unsafe name.
    let mut pre = MAGIC.to_vec();
    pre.extend_from_slice(&[0, 1, 0, 0]);
    pre.extend_from_slice(&0i64.to_be_bytes());
    pre.extend_from_slice(&1u16.to_be_bytes());
    pre.extend_from_slice(&4096u64.to_be_bytes());
    pre.extend_from_slice(&2u16.to_be_bytes());
    pre.extend_from_slice(b"..");
    let crc = crc32fast::hash(&pre);
    pre.extend_from_slice(&crc.to_be_bytes());
    assert_eq!(
        err_of(&pre),
        "header: device \"..\": name \"..\" is a directory reference"
    );
    assert!(StreamWriter::new(Vec::new(), 0, &[StreamDevice::new("a/b", 1)]).is_err());
    assert!(StreamWriter::new(Vec::new(), 0, &[StreamDevice::new("a", 0)]).is_err());
}

#[test]
fn record_errors() {
    let clusters = all_clusters();
    let good = stream_of(&clusters);
    let pre = preamble_len();
    let first = pre; // record 0: cluster 2 of device 1, full
                     // Bad CRC: one flipped data byte.
    let mut bad = good.clone();
    bad[first + 12 + 5000] ^= 0x40;
    assert_eq!(
        err_of(&bad),
        format!("record 0 at byte {pre}: record checksum mismatch")
    );
    // Unknown record type.
    let mut bad = good.clone();
    bad[first] = b'X';
    assert_eq!(
        err_of(&bad),
        format!("record 0 at byte {pre}: unknown record type 0x58")
    );
    // Truncated, inside a record and between records.
    assert_eq!(
        err_of(&good[..first + 100]),
        format!(
            "record 0 at byte {pre}: truncated: the stream ends 100 bytes into a record, without its end record"
        )
    );
    let second = first + 12 + CLUSTER_SIZE + 4;
    assert_eq!(
        err_of(&good[..second]),
        format!(
            "record 1 at byte {second}: truncated: the stream ends after 1 records, without its end record"
        )
    );
    let head = &good[..pre];
    let with = |recs: &[Vec<u8>]| {
        let mut s = head.to_vec();
        for r in recs {
            s.extend_from_slice(r);
        }
        s
    };
    // Device index out of range.
    assert_eq!(
        err_of(&with(&[raw_record(b'C', 3, 0, 0, &[])])),
        format!("record 0 at byte {pre}: device id 3 out of range (the stream has 2 devices)")
    );
    assert_eq!(
        err_of(&with(&[raw_record(b'C', 0, 0, 0, &[])])),
        format!("record 0 at byte {pre}: device id 0 out of range (the stream has 2 devices)")
    );
    // Mask/length mismatch.
    assert_eq!(
        err_of(&with(&[raw_record(b'C', 1, 0b11, 0, &[1; BLOCK_SIZE])])),
        format!(
            "record 0 at byte {pre}: mask/length mismatch: cluster record with mask 0x0003 (2 blocks) has 4096 data bytes"
        )
    );
    let mut huge = record_header(b'C', 1, 0xffff, 0, 1 << 30).to_vec();
    huge.extend_from_slice(&[0; 64]);
    assert_eq!(
        err_of(&with(&[huge])),
        format!(
            "record 0 at byte {pre}: mask/length mismatch: cluster record of 1073741824 data bytes, more than a cluster"
        )
    );
    // Past the end, mask past the end.
    assert_eq!(
        err_of(&with(&[raw_record(b'C', 2, 0, 1, &[])])),
        format!("record 0 at byte {pre}: cluster 1 is past the end of drive-virtio1 (1 clusters)")
    );
    assert_eq!(
        err_of(&with(&[raw_record(b'C', 1, 0b100, 3, &[1; BLOCK_SIZE])])),
        format!(
            "record 0 at byte {pre}: cluster 3 of drive-scsi0: mask 0x0004 names blocks past the end of the device"
        )
    );
    // Duplicate.
    let rec = raw_record(b'C', 2, 0, 0, &[]);
    assert_eq!(
        err_of(&with(&[rec.clone(), rec])),
        format!(
            "record 1 at byte {}: duplicate cluster 0 of drive-virtio1",
            pre + 16
        )
    );
    // Abort.
    let abort = raw_record(b'A', 0, 0, 0, b"guest disk\nread error");
    let bytes = with(&[raw_record(b'C', 2, 0, 0, &[]), abort]);
    let mut r = StreamReader::new(&bytes[..]).unwrap();
    assert!(r.next_cluster().unwrap().is_some());
    let e = r.next_cluster().unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "record 1 at byte {}: the producer aborted the stream: guest disk read error",
            pre + 16
        )
    );
    assert_eq!(r.abort_reason(), Some("guest disk read error"));
    assert!(r.next_cluster().is_err());
    // End counts that differ from what came.
    let mut counts = Vec::new();
    counts.extend_from_slice(&0u64.to_be_bytes());
    counts.extend_from_slice(&2u64.to_be_bytes());
    assert_eq!(
        err_of(&with(&[
            raw_record(b'C', 2, 0, 0, &[]),
            raw_record(b'E', 0, 2, 0, &counts)
        ])),
        format!(
            "record 1 at byte {}: end record: device drive-virtio1: 2 records declared, 1 received",
            pre + 16
        )
    );
    // A cluster never sent.
    let mut missing = clusters.clone();
    missing.remove(3);
    assert_eq!(
        err_of(&stream_of(&missing)),
        format!(
            "record 4 at byte {}: device drive-scsi0: cluster 3 missing (1 of 4 clusters missing)",
            good.len() - (12 + 2 * BLOCK_SIZE + 4) - (12 + 16 + 4)
        )
    );
    // Data after the end record.
    let mut more = good.clone();
    more.push(0);
    assert_eq!(
        err_of(&more),
        format!("record 6 at byte {}: data after the end record", good.len())
    );
}

#[test]
fn abort_from_writer() {
    let mut w = StreamWriter::new(Vec::new(), 0, &devices()).unwrap();
    w.write_cluster(&cluster(2, 0, 1).as_cluster()).unwrap();
    let bytes = w.abort(&"x".repeat(5000)).unwrap();
    let e = read_all(&bytes).unwrap_err().to_string();
    assert!(
        e.ends_with(&format!("aborted the stream: {}", "x".repeat(4096))),
        "{e}"
    );
}

#[test]
fn writer_refuses_bad_clusters() {
    let mut w = StreamWriter::new(Vec::new(), 0, &devices()).unwrap();
    let bad_dev = cluster(3, 0, 0);
    assert!(w.write_cluster(&bad_dev.as_cluster()).is_err());
    assert!(w.write_cluster(&cluster(2, 1, 0).as_cluster()).is_err());
    let mut short = cluster(1, 0, 1);
    short.data.pop();
    assert!(w.write_cluster(&short.as_cluster()).is_err());
    assert_eq!(w.counts(), &[0, 0]);
}

#[test]
fn vmstate_in_order() {
    let devs = vec![StreamDevice::new("vmstate", 4096)];
    let mut w = StreamWriter::new(Vec::new(), 0, &devs).unwrap();
    for n in [0, 1, 2] {
        w.write_cluster(&cluster(1, n, 1).as_cluster()).unwrap();
    }
    let bytes = w.finish().unwrap();
    let mut r = StreamReader::new(&bytes[..]).unwrap();
    let mut n = 0;
    while r.next_cluster().unwrap().is_some() {
        n += 1;
    }
    assert_eq!(n, 3);
    let mut w = StreamWriter::new(Vec::new(), 0, &devs).unwrap();
    w.write_cluster(&cluster(1, 1, 1).as_cluster()).unwrap();
    let e = read_all(&w.finish().unwrap()).unwrap_err().to_string();
    assert!(
        e.ends_with("vmstate cluster 1 out of order (expected 0)"),
        "{e}"
    );
}

proptest! {
    #[test]
    fn any_order_round_trip(
        sizes in proptest::collection::vec(1u64..600_000, 1..4),
        masks in proptest::collection::vec(any::<u16>(), 40),
        seed in any::<u64>(),
    ) {
        let devs: Vec<StreamDevice> = sizes
            .iter()
            .enumerate()
            .map(|(i, &s)| StreamDevice::new(format!("disk{i}"), s))
            .collect();
        let mut clusters = Vec::new();
        for (i, d) in devs.iter().enumerate() {
            for n in 0..clusters_for(d.size) {
                let allowed = BlockMask::in_device(n, d.size).0;
                let m = masks[(n as usize + i) % masks.len()] & allowed;
                clusters.push(cluster(i as u8 + 1, n as u32, m));
            }
        }
        test_support::shuffle(&mut clusters, seed);
        let mut w = StreamWriter::new(Vec::new(), -5, &devs).unwrap();
        for c in &clusters {
            w.write_cluster(&c.as_cluster()).unwrap();
        }
        let bytes = w.finish().unwrap();
        let mut r = StreamReader::new(&bytes[..]).unwrap();
        prop_assert_eq!(r.backup_time(), -5);
        prop_assert_eq!(r.devices(), &devs[..]);
        let mut got = Vec::new();
        while let Some(c) = r.next_cluster().unwrap() {
            got.push(c.to_owned_buf());
        }
        prop_assert_eq!(got, clusters);
    }
}

/// vma-encode's path: the writer pulls the stream, each record body read
/// straight into the extent buffer; the archive is byte for byte the one
/// written cluster by cluster (the tail past a device end zeroed alike).
#[test]
fn pulled_into_the_writer_as_written_cluster_by_cluster() {
    use crate::{HeaderBuilder, Writer, WriterOptions};
    let mut clusters = all_clusters();
    // Non-zero bytes past the device end (4608 bytes into cluster 3).
    for c in &mut clusters {
        if c.dev_id == 1 && c.cluster_num == 3 {
            c.data[BLOCK_SIZE..].fill(0xee);
        }
    }
    let bytes = stream_of(&clusters);
    let mut h = HeaderBuilder::new([9; 16], 1);
    for d in devices() {
        h.add_device(&d.name, d.size).unwrap();
    }
    let mut one_by_one = Writer::new(Vec::new(), &h, WriterOptions::default()).unwrap();
    let mut r = StreamReader::new(&bytes[..]).unwrap();
    while let Some(c) = r.next_cluster().unwrap() {
        one_by_one.write_cluster(&c).unwrap();
    }
    let mut pulled = Writer::new(Vec::new(), &h, WriterOptions::default()).unwrap();
    let mut r = StreamReader::new(&bytes[..]).unwrap();
    let mut n = 0;
    while let Some(p) = pulled.pull(&mut r).unwrap() {
        n += p.count;
    }
    assert_eq!(n, clusters.len() as u64);
    assert!(one_by_one.finish().unwrap() == pulled.finish().unwrap());
}

/// A `Write` that keeps the bytes and counts the calls.
#[derive(Default)]
struct Counting {
    bytes: Vec<u8>,
    writes: usize,
}

impl std::io::Write for Counting {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_vectored(&[std::io::IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        self.writes += 1;
        let before = self.bytes.len();
        for b in bufs {
            self.bytes.extend_from_slice(b);
        }
        Ok(self.bytes.len() - before)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn write_clusters_writes_the_bytes_write_cluster_does() {
    let devs = vec![StreamDevice::new("drive-scsi0", 4096 * CLUSTER_SIZE as u64)];
    let masks = [0xffff, 0, 0x0001, 0x00ff, 0, 0, 0xfffe, 0x8000];
    let clusters: Vec<ClusterBuf> = (0..700u32)
        .map(|n| cluster(1, n * 3, masks[n as usize % masks.len()]))
        .collect();
    let mut one = StreamWriter::new(Vec::new(), 7, &devs).unwrap();
    for c in &clusters {
        one.write_cluster(&c.as_cluster()).unwrap();
    }
    let one = one.finish().unwrap();
    for chunk in [1, 5, 64, 700] {
        let mut many = StreamWriter::new(Vec::new(), 7, &devs).unwrap();
        for part in clusters.chunks(chunk) {
            many.write_clusters(part.iter().map(ClusterBuf::as_cluster))
                .unwrap();
        }
        assert_eq!(many.counts(), &[700]);
        assert!(many.finish().unwrap() == one, "chunks of {chunk}");
    }
    // With the checksums given (as a producer computes them at capture):
    // the same bytes, whose checksums the reader checks.
    let mut given = StreamWriter::new(Vec::new(), 7, &devs).unwrap();
    given
        .write_clusters_with_crc(clusters.iter().map(|c| {
            let c = c.as_cluster();
            (c, super::cluster_record_crc(&c))
        }))
        .unwrap();
    assert!(given.finish().unwrap() == one);
    // Every record passes the reader's checksum check (the stream is not
    // complete: only its end refuses it).
    let mut r = StreamReader::new(&one[..]).unwrap();
    for _ in 0..700 {
        assert!(r.next_cluster().unwrap().is_some());
    }
}

/// A checksum that is not the record's is caught before it is written
/// (debug builds; release builds write what they are given, and every
/// reader refuses the record).
#[test]
#[cfg(debug_assertions)]
#[should_panic(expected = "wrong record checksum")]
fn write_clusters_with_crc_refuses_a_wrong_checksum_in_debug_builds() {
    let devs = vec![StreamDevice::new("drive-scsi0", 16 * CLUSTER_SIZE as u64)];
    let c = cluster(1, 2, 0x0f0f);
    let mut w = StreamWriter::new(Vec::new(), 7, &devs).unwrap();
    let wrong = super::cluster_record_crc(&c.as_cluster()) ^ 1;
    let _ = w.write_clusters_with_crc([(c.as_cluster(), wrong)]);
}

#[test]
fn write_clusters_batches_up_to_a_mebibyte_a_write() {
    let devs = vec![StreamDevice::new("drive-scsi0", 64 * CLUSTER_SIZE as u64)];
    let full: Vec<ClusterBuf> = (0..64).map(|n| cluster(1, n, 0xffff)).collect();
    let mut w = StreamWriter::new(Counting::default(), 0, &devs).unwrap();
    w.write_clusters(full.iter().map(ClusterBuf::as_cluster))
        .unwrap();
    // 16 records of 64 KiB (and their headers) reach 1 MiB: 4 writes,
    // the first with the preamble; each record whole once it returns.
    let out = w.finish().unwrap();
    assert_eq!(out.writes, 4 + 1, "4 batches and the end record");
    assert_eq!(read_all(&out.bytes).unwrap().len(), 64);

    // Empty records (holes) are only header and checksum in the buffer:
    // thousands to a write.
    let devs = vec![StreamDevice::new("drive-scsi0", 4096 * CLUSTER_SIZE as u64)];
    let empty: Vec<ClusterBuf> = (0..4096).map(|n| cluster(1, n, 0)).collect();
    let mut w = StreamWriter::new(Counting::default(), 0, &devs).unwrap();
    w.write_clusters(empty.iter().map(ClusterBuf::as_cluster))
        .unwrap();
    assert_eq!(w.out.writes, 1);
    let out = w.finish().unwrap();
    assert_eq!(read_all(&out.bytes).unwrap().len(), 4096);
}

#[test]
fn write_clusters_writes_what_precedes_a_refused_cluster() {
    let mut w = StreamWriter::new(Vec::new(), 0, &devices()).unwrap();
    let good = cluster(1, 0, 0x0003);
    let bad = cluster(2, 1, 0);
    let e = w
        .write_clusters([
            good.as_cluster(),
            bad.as_cluster(),
            cluster(1, 1, 0).as_cluster(),
        ])
        .unwrap_err();
    assert_eq!(e.to_string(), "cluster 1 is past the end of drive-virtio1");
    assert_eq!(w.counts(), &[1, 0]);
    let mut expected = StreamWriter::new(Vec::new(), 0, &devices()).unwrap();
    expected.write_cluster(&good.as_cluster()).unwrap();
    assert!(w.out == expected.finish().unwrap()[..w.out.len()]);
}
