//! The cluster stream: clusters of a backup, in any order, over a pipe.
//!
//! Our own format (not Proxmox's), what `cbw-tap` emits and `vma-encode -`
//! reads; `docs/CLUSTER-STREAM.md` describes it in full. In short, all numbers
//! big-endian:
//!
//! * a **preamble**: magic `VMACSTRM`, version (1), flags (0), the backup
//!   instant, the devices (size and name each), and a CRC-32 of all of it;
//! * **records**, each a 12-byte header (type, three fields, body length), the
//!   body, and a CRC-32 of header and body:
//!   * `C` cluster: device id, mask, cluster number; the non-zero 4 KiB blocks;
//!   * `E` end: the number of cluster records sent for each device;
//!   * `A` abort: the reason the producer gave up.
//!
//! The stream is complete only with its end record, after which nothing may
//! follow. Between preamble and end record every cluster of every device
//! comes exactly once, in any order (the `vmstate` device: in order from 0,
//! as many as its producer sends).
//!
//! [`StreamWriter`] writes a stream; [`StreamReader`] reads one, checking
//! everything, and hands out each cluster as a borrowed [`Cluster`] from one
//! reused buffer.

use crate::{MAX_BLOB_SIZE, MAX_DEVICES, MAX_DEVICE_SIZE, VMSTATE_NAME};

mod input;
mod reader;
#[cfg(test)]
mod tests;
mod writer;

pub use reader::StreamReader;
pub use writer::{cluster_record_crc, StreamWriter, BATCH_BYTES, BATCH_SLICES};

/// Magic number at the start of every cluster stream.
pub const MAGIC: [u8; 8] = *b"VMACSTRM";
/// The version this module writes without a [`BackupIdentity`].
pub const VERSION: u16 = 1;
/// The version with a [`BackupIdentity`] in the preamble (after the
/// devices): the archive uuid, and for an incremental stream its base.
/// Readers of version 1 refuse it (`unsupported cluster stream version 2`).
pub const VERSION_IDENTITY: u16 = 2;

pub use crate::identity::{BackupIdentity, BaseRef, IDENTITY_SIZE};
/// Record type of a cluster record.
pub const RECORD_CLUSTER: u8 = b'C';
/// Record type of the end record.
pub const RECORD_END: u8 = b'E';
/// Record type of an abort record.
pub const RECORD_ABORT: u8 = b'A';
/// Size of a record header.
pub const RECORD_HEADER_SIZE: usize = 12;
/// Longest abort reason, in bytes (longer reasons are cut by the writer).
pub const MAX_ABORT_REASON: usize = 4096;
/// Longest device name, in bytes: what a VMA header blob can hold with its NUL.
pub const MAX_NAME_LEN: usize = MAX_BLOB_SIZE - 1;
/// Size of the fixed part of the preamble, before the device entries.
pub const PREAMBLE_FIXED_SIZE: usize = 22;

const IO_BUFFER: usize = 256 * 1024;

/// One device of a stream, as the preamble declares it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamDevice {
    /// Its name (a safe file name, at most [`MAX_NAME_LEN`] bytes).
    pub name: String,
    /// The size the VMA header should record: 1 ..= [`MAX_DEVICE_SIZE`]
    /// bytes. Producers should round image sizes up to a multiple of 512, as
    /// Proxmox records them (its restore works in 512-byte sectors).
    pub size: u64,
}

impl StreamDevice {
    /// A device named `name` of `size` bytes.
    pub fn new(name: impl Into<String>, size: u64) -> StreamDevice {
        StreamDevice {
            name: name.into(),
            size,
        }
    }

    fn is_vmstate(&self) -> bool {
        self.name == VMSTATE_NAME
    }

    /// The problem with this device, if any.
    fn check(&self) -> Result<(), DeviceListError> {
        crate::names::check_file_name(self.name.as_bytes()).map_err(|why| {
            DeviceListError::Name {
                name: self.name.clone(),
                why,
            }
        })?;
        if self.name.len() > MAX_NAME_LEN {
            return Err(DeviceListError::NameTooLong {
                len: self.name.len(),
            });
        }
        if self.size == 0 || self.size > MAX_DEVICE_SIZE {
            return Err(DeviceListError::Size {
                name: self.name.clone(),
                size: self.size,
            });
        }
        Ok(())
    }
}

/// What is wrong with a stream's device list (read: the preamble is
/// damaged; written: the caller's request is invalid).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DeviceListError {
    /// More than [`MAX_DEVICES`] devices.
    #[error("{count} devices, more than {}", MAX_DEVICES)]
    TooMany { count: usize },
    /// A name that is not a safe file name.
    #[error("device {name:?}: {why}")]
    Name {
        name: String,
        why: crate::names::NameProblem,
    },
    /// A name longer than [`MAX_NAME_LEN`] bytes.
    #[error("device name of {len} bytes, more than {}", MAX_NAME_LEN)]
    NameTooLong { len: usize },
    /// A size of 0 or over [`MAX_DEVICE_SIZE`].
    #[error("device {name}: size {size} outside 1..={}", MAX_DEVICE_SIZE)]
    Size { name: String, size: u64 },
    /// A name declared twice.
    #[error("device {name} declared twice")]
    Twice { name: String },
}

fn check_devices(devices: &[StreamDevice]) -> Result<(), DeviceListError> {
    if devices.len() > MAX_DEVICES {
        return Err(DeviceListError::TooMany {
            count: devices.len(),
        });
    }
    for (i, d) in devices.iter().enumerate() {
        d.check()?;
        if devices[..i].iter().any(|o| o.name == d.name) {
            return Err(DeviceListError::Twice {
                name: d.name.clone(),
            });
        }
    }
    Ok(())
}

fn record_header(kind: u8, a: u8, b: u16, c: u32, len: u32) -> [u8; RECORD_HEADER_SIZE] {
    let mut h = [0u8; RECORD_HEADER_SIZE];
    h[0] = kind;
    h[1] = a;
    h[2..4].copy_from_slice(&b.to_be_bytes());
    h[4..8].copy_from_slice(&c.to_be_bytes());
    h[8..12].copy_from_slice(&len.to_be_bytes());
    h
}
