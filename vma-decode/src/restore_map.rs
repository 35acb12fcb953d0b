//! The device map of `extract -r MAPFILE`: which target each device of the
//! archive is restored to, as Proxmox's `qmrestore` writes it.
//!
//! `qmrestore` runs `vma extract -v -r FIFO - DIR`, waits for the `CTIME:`
//! line, allocates the volumes and writes one line per device into the
//! FIFO, then `done`:
//!
//! ```text
//! [throttling.bps=N:][throttling.group=G:][cache=C:][format=F:]{0|1}:DEVNAME=PATH
//! skip=DEVNAME
//! done
//! ```
//!
//! The options come in any order, each at most once, each value ending at
//! the next `:`. `0` says the target already reads as zeros (zero blocks
//! are not written), `1` that zeros must be written. `DEVNAME` ends at the
//! first `=`; the rest of the line is the path (it may hold `:` and `=`).
//! `throttling.bps` is a number as C's `strtoull` with base 0 reads it
//! (`0x…` hex, `0…` octal, else decimal).
//!
//! Stricter than Proxmox's reader, on purpose: the map must end with
//! `done` (a writer that closes the FIFO early is an error, not an end), an
//! empty line is an error, a line may not exceed 8191 bytes (Proxmox's
//! buffer; it would split a longer one), and naming a device twice is an
//! error (Proxmox keeps the last). Checks against the archive (unknown
//! devices, devices without a mapping, targets) are made by
//! [`crate::extract`] before anything is written.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{self, BufRead, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// Longest line, its newline included (Proxmox reads lines into 8192 bytes).
pub const MAX_LINE: usize = 8191;

/// Where one device goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// `skip=DEVNAME`: not written, and its clusters not checked for
    /// duplicates or completeness (as Proxmox).
    Skip,
    /// A target file or block device.
    Target(TargetSpec),
}

/// A target as the map names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetSpec {
    /// File or block device, written in place.
    pub path: PathBuf,
    /// Write zero blocks (`1:`), or leave them because the target reads as
    /// zeros already (`0:`).
    pub write_zeros: bool,
    /// `format=`: only `raw` can be written.
    pub format: Option<String>,
    /// `throttling.bps=`: write at most this many bytes per second (0: no limit).
    pub throttling_bps: u64,
    /// `throttling.group=`: targets of one group share one limit.
    pub throttling_group: Option<String>,
    /// `cache=`: QEMU's cache mode name.
    pub cache: Option<String>,
}

/// A complete map: one entry per device named, in the order given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreMap {
    /// Device name → mapping.
    pub devices: BTreeMap<String, Mapping>,
}

/// A problem with the map as a whole, or with one of its lines (1-based).
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// The map file cannot be opened.
    #[error("cannot open: {0}")]
    Open(#[source] io::Error),
    /// Reading line `line` failed.
    #[error("line {line}: read failed: {source}")]
    Read {
        /// The line being read.
        line: usize,
        /// What failed.
        source: io::Error,
    },
    /// The input ended before `done`.
    #[error("ended without 'done' (the writer closed it early)")]
    EndedEarly,
    /// Line `line` has more than [`MAX_LINE`] bytes, its newline included.
    #[error("line {line}: longer than {} bytes", MAX_LINE)]
    TooLong {
        /// The line at fault.
        line: usize,
    },
    /// Line `line` does not parse.
    #[error("line {line}: {error}")]
    Line {
        /// The line at fault.
        line: usize,
        /// What is wrong with it.
        error: LineError,
    },
    /// Line `line` names a device an earlier line named.
    #[error("line {line}: device {name:?} is named twice")]
    NamedTwice {
        /// The line at fault.
        line: usize,
        /// The device.
        name: String,
    },
}

impl MapError {
    /// The line at fault, counting from 1; 0 when no line is.
    pub fn line(&self) -> usize {
        match self {
            MapError::Open(_) | MapError::EndedEarly => 0,
            MapError::Read { line, .. }
            | MapError::TooLong { line }
            | MapError::Line { line, .. }
            | MapError::NamedTwice { line, .. } => *line,
        }
    }

    /// Whether reading the map failed (I/O), rather than its content.
    pub fn is_io(&self) -> bool {
        matches!(self, MapError::Open(_) | MapError::Read { .. })
    }
}

/// What is wrong with one line of the map ([`parse_line`]). Values quoted
/// in the messages are shown as lossy UTF-8.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// The line is empty.
    #[error("empty line (the map ends with 'done')")]
    Empty,
    /// `skip`, `skip=` or `skip…` without `=DEVNAME`.
    #[error("option 'skip' has no value ({line:?})")]
    SkipWithoutValue {
        /// The whole line.
        line: String,
    },
    /// An option given twice.
    #[error("duplicate value for option '{option}'")]
    DuplicateOption {
        /// The option's name.
        option: &'static str,
    },
    /// An option's value runs to the end of the line (no `:`).
    #[error("option '{option}' not terminated ({line:?})")]
    Unterminated {
        /// The option's name.
        option: &'static str,
        /// The whole line.
        line: String,
    },
    /// After the options, neither `0:` nor `1:`.
    #[error("parse error: expected 0: or 1: before DEVNAME=PATH ({line:?})")]
    NoZeroFlag {
        /// The whole line.
        line: String,
    },
    /// No `=` after `0:`/`1:`.
    #[error("no dev name specified ({line:?})")]
    NoDeviceName {
        /// The whole line.
        line: String,
    },
    /// `=` right after `0:`/`1:`.
    #[error("empty device name")]
    EmptyDeviceName,
    /// A device name that is not UTF-8.
    #[error("device name {name:?} is not UTF-8")]
    DeviceNameNotUtf8 {
        /// The name, lossy.
        name: String,
    },
    /// Nothing after `DEVNAME=`.
    #[error("no target path for device {name:?}")]
    NoPath {
        /// The device.
        name: String,
    },
    /// `format`, `throttling.group` or `cache` with a value that is not UTF-8.
    #[error("option '{option}' is not UTF-8")]
    OptionNotUtf8 {
        /// The option's name.
        option: &'static str,
    },
    /// `throttling.bps` that [`parse_u64`] does not read as a number.
    #[error("throttling.bps: not a number: {value:?}")]
    BadBps {
        /// The value, lossy.
        value: String,
    },
}

impl RestoreMap {
    /// Reads lines from `input` until `done`.
    pub fn read<R: BufRead>(mut input: R) -> Result<RestoreMap, MapError> {
        let mut map = RestoreMap::default();
        let mut line = Vec::new();
        let mut number = 0;
        loop {
            number += 1;
            line.clear();
            let got = input
                .by_ref()
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut line)
                .map_err(|source| MapError::Read {
                    line: number,
                    source,
                })?;
            if got == 0 {
                return Err(MapError::EndedEarly);
            }
            if got > MAX_LINE {
                return Err(MapError::TooLong { line: number });
            }
            let text = line.strip_suffix(b"\n").unwrap_or(&line);
            if text == b"done" {
                return Ok(map);
            }
            let (name, mapping) = parse_line(text).map_err(|error| MapError::Line {
                line: number,
                error,
            })?;
            if map.devices.contains_key(&name) {
                return Err(MapError::NamedTwice { line: number, name });
            }
            map.devices.insert(name, mapping);
        }
    }
}

/// Parses one line (without its newline) into (device name, mapping).
///
/// # Errors
/// The first problem found, in this order: an empty line; `skip` without
/// `=DEVNAME`; an option repeated or not ended by `:`; neither `0:` nor `1:`
/// after the options; no `=` after it; an empty or non-UTF-8 device name;
/// an empty path; `throttling.bps` not a number; `format`,
/// `throttling.group` or `cache` not UTF-8.
pub fn parse_line(line: &[u8]) -> Result<(String, Mapping), LineError> {
    let shown = || String::from_utf8_lossy(line).into_owned();
    if line.is_empty() {
        return Err(LineError::Empty);
    }
    if let Some(rest) = line.strip_prefix(b"skip") {
        let Some(name) = rest.strip_prefix(b"=").filter(|n| !n.is_empty()) else {
            return Err(LineError::SkipWithoutValue { line: shown() });
        };
        return Ok((device_name(name)?, Mapping::Skip));
    }
    let mut rest = line;
    let mut options: [(&str, Option<&[u8]>); 4] = [
        ("format", None),
        ("throttling.bps", None),
        ("throttling.group", None),
        ("cache", None),
    ];
    'options: loop {
        for (opt, value) in options.iter_mut() {
            let Some(after) = rest
                .strip_prefix(opt.as_bytes())
                .and_then(|r| r.strip_prefix(b"="))
            else {
                continue;
            };
            if value.is_some() {
                return Err(LineError::DuplicateOption { option: opt });
            }
            let Some(colon) = after.iter().position(|&b| b == b':') else {
                return Err(LineError::Unterminated {
                    option: opt,
                    line: shown(),
                });
            };
            *value = Some(&after[..colon]);
            rest = &after[colon + 1..];
            continue 'options;
        }
        break;
    }
    let write_zeros = match rest {
        [b'0', b':', ..] => false,
        [b'1', b':', ..] => true,
        _ => return Err(LineError::NoZeroFlag { line: shown() }),
    };
    let rest = &rest[2..];
    let Some(eq) = rest.iter().position(|&b| b == b'=') else {
        return Err(LineError::NoDeviceName { line: shown() });
    };
    let name = device_name(&rest[..eq])?;
    let path = &rest[eq + 1..];
    if path.is_empty() {
        return Err(LineError::NoPath { name });
    }
    let text = |v: Option<&[u8]>, option: &'static str| -> Result<Option<String>, LineError> {
        v.map(|v| String::from_utf8(v.to_vec()).map_err(|_| LineError::OptionNotUtf8 { option }))
            .transpose()
    };
    let [(_, format), (_, bps), (_, group), (_, cache)] = options;
    let throttling_bps = match bps {
        None => 0,
        Some(v) => parse_u64(v).ok_or_else(|| LineError::BadBps {
            value: String::from_utf8_lossy(v).into_owned(),
        })?,
    };
    Ok((
        name,
        Mapping::Target(TargetSpec {
            path: PathBuf::from(OsStr::from_bytes(path)),
            write_zeros,
            format: text(format, "format")?,
            throttling_bps,
            throttling_group: text(group, "throttling.group")?,
            cache: text(cache, "cache")?,
        }),
    ))
}

fn device_name(name: &[u8]) -> Result<String, LineError> {
    if name.is_empty() {
        return Err(LineError::EmptyDeviceName);
    }
    String::from_utf8(name.to_vec()).map_err(|_| LineError::DeviceNameNotUtf8 {
        name: String::from_utf8_lossy(name).into_owned(),
    })
}

/// An unsigned number as `strtoull(text, &end, 0)` reads a whole string:
/// `0x`/`0X` hex, a leading `0` octal, else decimal; nothing else allowed.
pub fn parse_u64(text: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(text).ok()?;
    let (digits, radix) = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        (h, 16)
    } else if s.len() > 1 && s.starts_with('0') {
        (&s[1..], 8)
    } else {
        (s, 10)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

/// Reads the map from `path` (a FIFO: opening it waits for the writer).
pub fn read_path(path: &std::path::Path) -> Result<RestoreMap, MapError> {
    let file = std::fs::File::open(path).map_err(MapError::Open)?;
    RestoreMap::read(io::BufReader::new(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(path: &str, write_zeros: bool) -> TargetSpec {
        TargetSpec {
            path: PathBuf::from(path),
            write_zeros,
            format: None,
            throttling_bps: 0,
            throttling_group: None,
            cache: None,
        }
    }

    #[test]
    fn lines_as_qmrestore_writes_them() {
        assert_eq!(
            parse_line(b"format=raw:1:drive-scsi0=/dev/pve/vm-100-disk-0"),
            Ok((
                "drive-scsi0".into(),
                Mapping::Target(TargetSpec {
                    format: Some("raw".into()),
                    ..target("/dev/pve/vm-100-disk-0", true)
                })
            ))
        );
        assert_eq!(
            parse_line(
                b"throttling.bps=104857600:throttling.group=local-lvm:format=raw:0:drive-virtio1=/dev/zvol/rpool/data/vm-100-disk-1"
            ),
            Ok((
                "drive-virtio1".into(),
                Mapping::Target(TargetSpec {
                    format: Some("raw".into()),
                    throttling_bps: 104857600,
                    throttling_group: Some("local-lvm".into()),
                    ..target("/dev/zvol/rpool/data/vm-100-disk-1", false)
                })
            ))
        );
        // Options in any order; the path keeps its ':' and '='.
        assert_eq!(
            parse_line(b"cache=unsafe:throttling.bps=0x10:1:d=/a:b=c"),
            Ok((
                "d".into(),
                Mapping::Target(TargetSpec {
                    cache: Some("unsafe".into()),
                    throttling_bps: 16,
                    ..target("/a:b=c", true)
                })
            ))
        );
        assert_eq!(
            parse_line(b"skip=drive-ide0"),
            Ok(("drive-ide0".into(), Mapping::Skip))
        );
    }

    #[test]
    fn malformed_lines() {
        let e = |l: &[u8]| parse_line(l).unwrap_err().to_string();
        assert_eq!(e(b""), "empty line (the map ends with 'done')");
        assert_eq!(e(b"skip"), "option 'skip' has no value (\"skip\")");
        assert_eq!(e(b"skip="), "option 'skip' has no value (\"skip=\")");
        assert_eq!(e(b"skipx"), "option 'skip' has no value (\"skipx\")");
        assert_eq!(
            e(b"format=raw:format=raw:1:d=/x"),
            "duplicate value for option 'format'"
        );
        assert_eq!(
            e(b"format=raw"),
            "option 'format' not terminated (\"format=raw\")"
        );
        assert_eq!(
            e(b"2:d=/x"),
            "parse error: expected 0: or 1: before DEVNAME=PATH (\"2:d=/x\")"
        );
        assert_eq!(e(b"1:/x"), "no dev name specified (\"1:/x\")");
        assert_eq!(e(b"1:=/x"), "empty device name");
        assert_eq!(e(b"1:d="), "no target path for device \"d\"");
        assert_eq!(
            e(b"throttling.bps=fast:1:d=/x"),
            "throttling.bps: not a number: \"fast\""
        );
        assert_eq!(
            e(b"throttling.bps=-1:1:d=/x"),
            "throttling.bps: not a number: \"-1\""
        );
    }

    #[test]
    fn malformed_lines_are_told_apart_by_variant() {
        let e = |l: &[u8]| parse_line(l).unwrap_err();
        assert_eq!(e(b""), LineError::Empty);
        assert_eq!(
            e(b"skip="),
            LineError::SkipWithoutValue {
                line: "skip=".into()
            }
        );
        assert_eq!(
            e(b"cache=a:cache=b:1:d=/x"),
            LineError::DuplicateOption { option: "cache" }
        );
        assert_eq!(
            e(b"1:\xff=/x"),
            LineError::DeviceNameNotUtf8 {
                name: "\u{fffd}".into()
            }
        );
        assert_eq!(
            e(b"format=\xff:1:d=/x"),
            LineError::OptionNotUtf8 { option: "format" }
        );
        assert_eq!(e(b"1:=/x"), LineError::EmptyDeviceName);
        assert_eq!(e(b"1:d="), LineError::NoPath { name: "d".into() });
    }

    #[test]
    fn numbers_as_strtoull_base_0() {
        assert_eq!(parse_u64(b"0"), Some(0));
        assert_eq!(parse_u64(b"1048576"), Some(1048576));
        assert_eq!(parse_u64(b"0x100000"), Some(1048576));
        assert_eq!(parse_u64(b"010"), Some(8));
        assert_eq!(parse_u64(b"09"), None);
        assert_eq!(parse_u64(b"0x"), None);
        assert_eq!(parse_u64(b""), None);
        assert_eq!(parse_u64(b"18446744073709551616"), None);
        assert_eq!(parse_u64(b" 1"), None);
    }

    #[test]
    fn a_map_ends_with_done_and_names_each_device_once() {
        let m = RestoreMap::read(&b"1:a=/x\nskip=b\ndone\n"[..]).unwrap();
        assert_eq!(m.devices.len(), 2);
        assert_eq!(m.devices["b"], Mapping::Skip);
        // `done` without a newline at the very end is still `done`.
        assert!(RestoreMap::read(&b"1:a=/x\ndone"[..]).is_ok());
        // Nothing after `done` is read.
        assert!(RestoreMap::read(&b"done\ngarbage"[..])
            .unwrap()
            .devices
            .is_empty());

        let e = RestoreMap::read(&b"1:a=/x\n"[..]).unwrap_err();
        assert!(matches!(e, MapError::EndedEarly) && e.line() == 0 && !e.is_io());
        assert_eq!(
            e.to_string(),
            "ended without 'done' (the writer closed it early)"
        );
        let e = RestoreMap::read(&b"1:a=/x\n0:a=/y\ndone\n"[..]).unwrap_err();
        assert_eq!(e.to_string(), "line 2: device \"a\" is named twice");
        let e = RestoreMap::read(&b"1:a=/x\n\ndone\n"[..]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 2: empty line (the map ends with 'done')"
        );
        let mut long = b"1:a=/".to_vec();
        long.resize(MAX_LINE + 10, b'x');
        long.extend_from_slice(b"\ndone\n");
        let e = RestoreMap::read(&long[..]).unwrap_err();
        assert_eq!(e.to_string(), "line 1: longer than 8191 bytes");
        // The longest line allowed, newline included.
        let mut max = b"1:a=/".to_vec();
        max.resize(MAX_LINE - 1, b'x');
        max.extend_from_slice(b"\ndone\n");
        assert!(RestoreMap::read(&max[..]).is_ok());
    }
}
