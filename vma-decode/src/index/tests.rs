//! The saved index's unit tests.

use super::*;
use vma_format::{Archive, HeaderBuilder, Seekable, Writer, WriterOptions};

/// An archive of two disks and a vmstate, some clusters empty, and its
/// fresh index.
fn archive() -> (Vec<u8>, VmaHeader, ArchiveIndex) {
    let mut h = HeaderBuilder::new([3; 16], 0);
    h.add_device("drive-scsi0", 100 * CLUSTER_SIZE as u64 + 4608)
        .unwrap();
    h.add_device("vmstate", 3 * CLUSTER_SIZE as u64).unwrap();
    h.add_device("drive-virtio1", 70 * CLUSTER_SIZE as u64)
        .unwrap();
    let mut w = Writer::new(Vec::new(), &h, WriterOptions::default()).unwrap();
    for n in (0..101u32).rev() {
        let fill = if n % 7 == 0 { 0 } else { n as u8 };
        w.write_raw(1, n, &vec![fill; (n as usize % 16 + 1) * 4096])
            .unwrap();
        if n < 3 {
            w.write_raw(2, 2 - n, &[9; 100]).unwrap();
        }
        if n < 70 {
            w.write_raw(3, n, &[n as u8 | 1; 4096]).unwrap();
        }
    }
    let bytes = w.finish().unwrap();
    let input = Seekable::new(std::io::Cursor::new(&bytes[..])).unwrap();
    let mut a = Archive::new(input).unwrap();
    let header = a.header().clone();
    let mut b = IndexBuilder::new(&header);
    a.index(&mut b).unwrap();
    (bytes.clone(), header, b.finish().unwrap())
}

fn stamp(bytes: &[u8]) -> ArchiveStamp {
    ArchiveStamp {
        uuid: [3; 16],
        size: bytes.len() as u64,
        mtime: (1_700_000_000, 5),
    }
}

fn same(a: &ArchiveIndex, b: &ArchiveIndex) {
    assert_eq!(a.uuid, b.uuid);
    assert_eq!(a.extents, b.extents);
    assert_eq!(a.devices.len(), b.devices.len());
    for (x, y) in a.devices.iter().zip(&b.devices) {
        assert_eq!(
            (x.id, &x.name, x.size, x.vmstate),
            (y.id, &y.name, y.size, y.vmstate)
        );
        assert_eq!(x.clusters, y.clusters);
    }
}

#[test]
fn the_index_says_where_every_cluster_is() {
    let (bytes, _, index) = archive();
    assert_eq!(index.cluster_count(), 101 + 3 + 70);
    let scsi = index.device("drive-scsi0").unwrap();
    for n in 0..101u64 {
        let c = scsi.cluster(n).unwrap();
        let e = index.extents[c.extent as usize];
        let want = if n % 7 == 0 { 0 } else { (n % 16 + 1) as usize };
        // The last cluster: 4608 bytes, two blocks.
        let want = if n == 100 { want.min(2) } else { want };
        assert_eq!(c.mask.count(), want, "cluster {n}");
        if want > 0 {
            let at = (e.data_offset() + c.first_block as u64 * 4096) as usize;
            // (The device ends 512 bytes into cluster 100's second block.)
            let len = if n == 100 { 4608 } else { want * 4096 };
            assert!(bytes[at..at + len].iter().all(|&b| b == n as u8));
        }
    }
    assert!(scsi.cluster(101).is_none());
    assert_eq!(scsi.export_size(), scsi.size);
    let vm = index.device("vmstate").unwrap();
    assert_eq!(vm.cluster_count(), 3);
    assert_eq!(vm.export_size(), 3 * CLUSTER_SIZE as u64);
    assert!(index.extents.iter().all(|e| e.data_checksum.is_some()));
    let listed: u64 = index.extents.iter().map(|e| e.clusters as u64).sum();
    assert_eq!(listed, 174);
}

#[test]
fn saved_and_loaded_it_is_the_same() {
    let (bytes, header, index) = archive();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.vma.vmaidx");
    assert!(matches!(
        ArchiveIndex::load(&path, &header, &stamp(&bytes)),
        Loaded::Absent
    ));
    index.save(&path, &stamp(&bytes)).unwrap();
    let saved = fs::read(&path).unwrap();
    assert_eq!(
        saved.len(),
        FIXED_LEN + 3 * DEVICE_LEN + index.extents.len() * EXTENT_LEN + 174 * ENTRY_LEN + 4
    );
    match ArchiveIndex::load(&path, &header, &stamp(&bytes)) {
        Loaded::Index(back) => same(&index, &back),
        other => panic!("{other:?}"),
    }
    // Nothing else is left in the directory.
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
}

/// `bytes` with its CRC-32 recomputed, decoded.
fn decode_resealed(mut bytes: Vec<u8>, header: &VmaHeader, stamp: &ArchiveStamp) -> DecodeError {
    let n = bytes.len() - 4;
    let crc = crc32fast::hash(&bytes[..n]);
    bytes[n..].copy_from_slice(&crc.to_be_bytes());
    decode(&bytes, header, stamp).map(|_| ()).unwrap_err()
}

#[test]
fn an_index_that_does_not_fit_is_refused_with_the_reason() {
    let (bytes, header, index) = archive();
    let st = stamp(&bytes);
    let good = index.encode(&st);
    assert!(decode(&good, &header, &st).is_ok());
    let at_extents = FIXED_LEN + 3 * DEVICE_LEN;
    let at_entries = at_extents + index.extents.len() * EXTENT_LEN;
    let edit = |at: usize, new: &[u8]| {
        let mut b = good.clone();
        b[at..at + new.len()].copy_from_slice(new);
        decode_resealed(b, &header, &st)
    };
    // Each refusal is its variant, and says what it always said.
    let is = |got: DecodeError, want: DecodeError, message: &str| {
        assert_eq!(got, want);
        assert_eq!(got.to_string(), message);
    };
    let mut flipped = good.clone();
    flipped[200] ^= 1;
    is(
        decode(&flipped, &header, &st).unwrap_err(),
        DecodeError::Damaged,
        "its checksum does not match (damaged)",
    );
    is(
        decode(b"VMAINDEX", &header, &st).unwrap_err(),
        DecodeError::NotAnIndex,
        "not an index file",
    );
    is(
        edit(8, &2u32.to_be_bytes()),
        DecodeError::Version { found: 2 },
        "version 2, not 1",
    );
    is(
        edit(12, &1u32.to_be_bytes()),
        DecodeError::UnknownFlags,
        "unknown flags",
    );
    let mut other = st;
    other.size += 1;
    is(
        decode(&good, &header, &other).unwrap_err(),
        DecodeError::ArchiveSize {
            saved: st.size,
            actual: st.size + 1,
        },
        &format!(
            "stale: it was saved for an archive of {} bytes, this one has {}",
            st.size,
            st.size + 1
        ),
    );
    other = st;
    other.mtime.1 += 1;
    is(
        decode(&good, &header, &other).unwrap_err(),
        DecodeError::Modified,
        "stale: the archive was modified after it was saved",
    );
    other = st;
    other.uuid[0] ^= 1;
    is(
        decode(&good, &header, &other).unwrap_err(),
        DecodeError::OtherArchive,
        "stale: it was saved for another archive (uuid differs)",
    );
    // Device 1's size.
    is(
        edit(FIXED_LEN + 8, &1u64.to_be_bytes()),
        DecodeError::Devices,
        "stale: its devices are not the archive's",
    );
    // Device 1's cluster count: a disk must have all of them.
    is(
        edit(FIXED_LEN + 16, &100u64.to_be_bytes()),
        DecodeError::ClusterCount {
            device: "drive-scsi0".into(),
            indexed: 100,
            clusters: 101,
        },
        "drive-scsi0: 100 clusters indexed, not 101",
    );
    // vmstate's count: the tables no longer add up.
    is(
        edit(FIXED_LEN + DEVICE_LEN + 16, &(u64::MAX / 2).to_be_bytes()),
        DecodeError::TableLengths,
        "its tables do not have the lengths it states",
    );
    // An extent past the end of the archive; one inside the header.
    let e0 = index.extents[0].offset;
    is(
        edit(at_extents, &(st.size - 100).to_be_bytes()),
        DecodeError::ExtentMisfit {
            offset: st.size - 100,
        },
        &format!("extent at byte {} does not fit the archive", st.size - 100),
    );
    is(
        edit(at_extents, &100u64.to_be_bytes()),
        DecodeError::ExtentMisfit { offset: 100 },
        "extent at byte 100 does not fit the archive",
    );
    // Two extents overlapping.
    is(
        edit(at_extents + EXTENT_LEN, &(e0 + 512).to_be_bytes()),
        DecodeError::ExtentMisfit { offset: e0 + 512 },
        &format!("extent at byte {} does not fit the archive", e0 + 512),
    );
    // A cluster of a missing extent, or with data outside its extent.
    is(
        edit(at_entries, &1000u32.to_be_bytes()),
        DecodeError::NoExtent {
            device: "drive-scsi0".into(),
            cluster: 0,
            extent: 1000,
        },
        "drive-scsi0 cluster 0: no extent 1000",
    );
    is(
        edit(at_entries + 4, &1000u16.to_be_bytes()),
        DecodeError::DataOutsideExtent {
            device: "drive-scsi0".into(),
            cluster: 0,
        },
        "drive-scsi0 cluster 0: its data lies outside its extent",
    );
    // A cluster moved to another extent: the counts no longer match.
    let c0 = index.devices[0].clusters[0];
    let other_extent = (c0.extent + 1) % index.extents.len() as u32;
    let mut moved = good.clone();
    moved[at_entries..at_entries + 4].copy_from_slice(&other_extent.to_be_bytes());
    moved[at_entries + 4..at_entries + 8].copy_from_slice(&[0, 0, 0, 0]);
    let why = decode_resealed(moved, &header, &st);
    assert!(
        matches!(why, DecodeError::ExtentCount { pointing, listed, .. } if pointing != listed),
        "{why:?}"
    );
    assert!(
        why.to_string().contains("clusters point at it, it lists"),
        "{why}"
    );
}

#[test]
fn an_oversized_file_is_not_read_whole() {
    let (bytes, header, _) = archive();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.vmaidx");
    fs::write(&path, vec![0u8; bytes.len() + 64 * 1024]).unwrap();
    match ArchiveIndex::load(&path, &header, &stamp(&bytes)) {
        Loaded::Refused(why) => {
            assert!(matches!(why, Refusal::TooLarge), "{why:?}");
            assert_eq!(why.to_string(), "too large to be an index of this archive");
        }
        other => panic!("{other:?}"),
    }
}
