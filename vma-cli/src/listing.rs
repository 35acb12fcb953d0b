//! The text of Proxmox's `vma list`, to the character: Proxmox's qmrestore
//! parses these lines.

use std::io::{self, Write};

use chrono::{Local, TimeZone};
use vma_format::VmaHeader;

/// Writes the listing of `header`:
///
/// ```text
/// CFG: size: 832 name: qemu-server.conf
/// DEV: dev_id=1 size: 1061376 devname: drive-scsi0
/// VMSTATE: dev_id=2 memory: 4294967296
/// CTIME: Thu Nov 26 10:45:05 2026
/// ```
///
/// Configs in slot order, then devices in id order (Proxmox prints ids 1 to
/// 254; a device in slot 255 is listed too), names up to their first NUL
/// and escaped by [`vma_format::names::escape`] (a newline in a name must not
/// forge a `DEV:` line for qmrestore, nor an escape sequence reach the
/// terminal; ordinary names print exactly as Proxmox prints them), then the
/// creation time in local time as C's `ctime()` formats it (honours
/// `TZ`).
pub fn write_listing<W: Write + ?Sized>(out: &mut W, header: &VmaHeader) -> io::Result<()> {
    for c in header.configs() {
        writeln!(
            out,
            "CFG: size: {} name: {}",
            c.data.len(),
            c.display_name()
        )?;
    }
    for d in header.devices() {
        if d.is_vmstate() {
            writeln!(out, "VMSTATE: dev_id={} memory: {}", d.id, d.size)?;
        } else {
            writeln!(
                out,
                "DEV: dev_id={} size: {} devname: {}",
                d.id,
                d.size,
                d.display_name()
            )?;
        }
    }
    writeln!(out, "CTIME: {}", ctime(header.ctime()))
}

/// `secs` since the epoch in local time, formatted as C's `ctime()` does
/// (without its newline): `Thu Nov 26 10:45:05 2026`, the day padded with a
/// space. A time outside what the calendar handles prints as the number.
pub fn ctime(secs: i64) -> String {
    match Local.timestamp_opt(secs, 0).single() {
        Some(t) => t.format("%a %b %e %H:%M:%S %Y").to_string(),
        None => format!("{secs} (seconds since the epoch)"),
    }
}

/// `secs` since the epoch as local ISO-8601 with its UTC offset, to the
/// second: `2026-12-02T15:04:05+01:00` (`Z` is never used: the offset is
/// always written). A time outside what the calendar handles prints as the
/// number.
pub fn iso_time(secs: i64) -> String {
    match Local.timestamp_opt(secs, 0).single() {
        Some(t) => t.to_rfc3339_opts(chrono::SecondsFormat::Secs, false),
        None => format!("{secs} (seconds since the epoch)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cannot_forge_lines() {
        std::env::set_var("TZ", "UTC");
        let mut h = vma_format::HeaderBuilder::new([1; 16], 0);
        h.add_config("qemu-server.conf", b"x".to_vec()).unwrap();
        h.add_device("drive-scsi0", 512).unwrap();
        let mut raw = h.encode().unwrap();
        // Patch the names past HeaderBuilder's checks, as a hostile
        // archive would, and reseal the header.
        let at = |raw: &[u8], s: &[u8]| raw.windows(s.len()).position(|w| w == s).unwrap();
        let c = at(&raw, b"qemu-server.conf");
        raw[c..c + 16].copy_from_slice(b"a\nDEV: dev_id=9\x1b");
        let d = at(&raw, b"drive-scsi0");
        raw[d..d + 11].copy_from_slice("x\u{202e}\\\x07\r\u{9b}yz".as_bytes());
        vma_format::header::update_checksum(&mut raw);
        let header = VmaHeader::parse(&raw).unwrap();
        let mut out = Vec::new();
        write_listing(&mut out, &header).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "CFG: size: 1 name: a\\x0aDEV: dev_id=9\\x1b\n\
             DEV: dev_id=1 size: 512 devname: x\\xe2\\x80\\xae\\\\\\x07\\x0d\\xc2\\x9byz\n\
             CTIME: Thu Jan  1 00:00:00 1970\n"
        );
    }

    #[test]
    fn ctime_like_c() {
        std::env::set_var("TZ", "UTC");
        assert_eq!(ctime(1795689905), "Thu Nov 26 10:45:05 2026");
        assert_eq!(ctime(1635680622), "Sun Oct 31 11:43:42 2021");
        assert_eq!(ctime(1693905561), "Tue Sep  5 09:19:21 2023");
        assert_eq!(
            ctime(i64::MAX),
            "9223372036854775807 (seconds since the epoch)"
        );
    }
}
