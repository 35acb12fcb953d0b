//! The archive header's unit tests: parsing, building, every refusal.

use super::*;

fn sample() -> HeaderBuilder {
    let mut b = HeaderBuilder::new([7; 16], 1795689905);
    b.add_config("qemu-server.conf", vec![b'x'; 832]).unwrap();
    b.add_device("drive-scsi0", 1061376).unwrap();
    b
}

#[test]
fn layout_matches_proxmox() {
    // The one-disk fixture: blob buffer 868 bytes used, header 13824 bytes,
    // name at 1, data at 20, device name at 854.
    let raw = sample().encode().unwrap();
    assert_eq!(raw.len(), 13824);
    let h = VmaHeader::parse(&raw).unwrap();
    assert_eq!(h.blob_buffer_size(), 868);
    assert_eq!(h.header_size(), 13824);
    assert_eq!(BigEndian::read_u32(&raw[OFF_CONFIG_NAMES..]), 1);
    assert_eq!(BigEndian::read_u32(&raw[OFF_CONFIG_DATA..]), 20);
    assert_eq!(BigEndian::read_u32(&raw[OFF_DEV_INFO + 32..]), 854);
    assert_eq!(h.devices()[0].name, b"drive-scsi0");
    assert_eq!(h.configs()[0].data.len(), 832);
    assert_eq!(h.ctime(), 1795689905);
}

#[test]
fn empty_header_is_readable() {
    let raw = HeaderBuilder::new([1; 16], 0).encode().unwrap();
    assert_eq!(raw.len(), HEADER_FIXED_SIZE + 512);
    let h = VmaHeader::parse(&raw).unwrap();
    assert!(h.devices().is_empty() && h.configs().is_empty());
}

#[test]
fn every_flipped_byte_is_caught() {
    let raw = sample().encode().unwrap();
    for pos in [
        0, 5, 9, 30, 40, 50, 57, 100, 2050, 4130, 12300, 13000, 13823,
    ] {
        let mut bad = raw.clone();
        bad[pos] ^= 0x10;
        assert!(VmaHeader::parse(&bad).is_err(), "flip at {pos} accepted");
    }
}

#[test]
fn refuses_bad_requests() {
    let mut b = HeaderBuilder::new([0; 16], 0);
    assert!(b.add_config("../x", vec![]).is_err());
    assert!(b.add_config("c", vec![0; MAX_BLOB_SIZE + 1]).is_err());
    assert!(b.add_device("d", 0).is_err());
    assert!(b.add_device("d", MAX_DEVICE_SIZE + 1).is_err());
    assert_eq!(b.add_device("d", 1).unwrap(), 1);
    assert!(b.add_device("d", 1).is_err());
}

#[test]
fn reading_truncated_input() {
    let raw = sample().encode().unwrap();
    let err = VmaHeader::read_from(&mut &raw[..13000]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "header: truncated: got 13000 of 13824 bytes"
    );
    let err = VmaHeader::read_from(&mut &raw[..100]).unwrap_err();
    assert_eq!(err.to_string(), "header: truncated: got 100 of 12288 bytes");
    let err = VmaHeader::read_from(&mut &b""[..]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "header: not a VMA archive: the input is empty"
    );
    let err = VmaHeader::read_from(&mut &b"hello world"[..]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "header: not a VMA archive (wrong magic number)"
    );
}
