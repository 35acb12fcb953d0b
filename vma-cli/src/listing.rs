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
/// 254; a device in slot 255 is listed too), names up to their first NUL,
/// then the creation time in local time as C's `ctime()` formats it (honours
/// `TZ`).
pub fn write_listing<W: Write + ?Sized>(out: &mut W, header: &VmaHeader) -> io::Result<()> {
    for c in header.configs() {
        write!(out, "CFG: size: {} name: ", c.data.len())?;
        out.write_all(c.c_name())?;
        out.write_all(b"\n")?;
    }
    for d in header.devices() {
        if d.is_vmstate() {
            writeln!(out, "VMSTATE: dev_id={} memory: {}", d.id, d.size)?;
        } else {
            write!(out, "DEV: dev_id={} size: {} devname: ", d.id, d.size)?;
            out.write_all(d.c_name())?;
            out.write_all(b"\n")?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
