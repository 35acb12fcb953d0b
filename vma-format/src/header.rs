//! The archive header: parsed with every field checked, or built.
//!
//! Layout (all numbers big-endian, except blob sizes):
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | magic `VMA\0` |
//! | 4..8 | version (1) |
//! | 8..24 | uuid (repeated in every extent header) |
//! | 24..32 | ctime, seconds since the epoch (signed) |
//! | 32..48 | MD5 of the first `header_size` bytes with this field zeroed |
//! | 48..52 | blob buffer offset (12288) |
//! | 52..56 | blob buffer size: bytes used, counting the unused byte 0 |
//! | 56..60 | header size: fixed part plus blob buffer, a multiple of 512 |
//! | 2044..3068 | 256 config name pointers |
//! | 3068..4092 | 256 config data pointers |
//! | 4096..12288 | 256 device slots of 32 bytes: name pointer, reserved, size, reserved |
//! | 12288.. | blob buffer: blobs of a 2-byte little-endian size and the data |
//!
//! Pointers are offsets into the blob buffer; 0 means "none", so writers start
//! the first blob at offset 1. Names are blobs ending in NUL.

use std::io::Read;

use byteorder::{BigEndian, ByteOrder};
use md5::{Digest, Md5};

use crate::error::{Error, Location};
use crate::{
    clusters_for, HEADER_FIXED_SIZE, MAX_BLOB_SIZE, MAX_CONFIGS, MAX_DEVICES, MAX_DEVICE_SIZE,
    MAX_READ_HEADER_SIZE, MAX_WRITTEN_HEADER_SIZE, VMSTATE_NAME,
};

/// Magic number at the start of every archive.
pub const MAGIC: [u8; 4] = *b"VMA\0";
const OFF_VERSION: usize = 4;
const OFF_UUID: usize = 8;
const OFF_CTIME: usize = 24;
const OFF_MD5: usize = 32;
const OFF_BLOB_OFFSET: usize = 48;
const OFF_BLOB_SIZE: usize = 52;
const OFF_HEADER_SIZE: usize = 56;
const OFF_CONFIG_NAMES: usize = 2044;
const OFF_CONFIG_DATA: usize = 3068;
const OFF_DEV_INFO: usize = 4096;
const DEV_INFO_SIZE: usize = 32;
/// Device slots in the header (slot 0 is never used).
pub const DEVICE_SLOTS: usize = 256;

/// One config file stored in the header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigEntry {
    /// Config slot (0..256) it was found in.
    pub slot: usize,
    /// Its name as stored, without the terminating NUL (file names from
    /// archives must pass [`crate::names::check_file_name`] before use).
    pub name: Vec<u8>,
    /// Its content.
    pub data: Vec<u8>,
}

impl ConfigEntry {
    /// The name as Proxmox's C code sees it: up to the first NUL.
    pub fn c_name(&self) -> &[u8] {
        c_str(&self.name)
    }

    /// The name as inert text for listings, reports and messages: see
    /// [`crate::names::escape`].
    pub fn display_name(&self) -> String {
        crate::names::escape(self.c_name())
    }
}

/// One device declared in the header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device id (1..=255): the slot index, and the id extents tag clusters with.
    pub id: u8,
    /// Its name as stored, without the terminating NUL.
    pub name: Vec<u8>,
    /// Its size in bytes (never 0: a slot with size 0 declares no device).
    pub size: u64,
}

impl DeviceInfo {
    /// Whether it holds the VM's RAM state (name `vmstate`): its clusters come
    /// in order from 0 and its size does not bound them.
    pub fn is_vmstate(&self) -> bool {
        self.c_name() == VMSTATE_NAME.as_bytes()
    }

    /// The name as Proxmox's C code sees it: up to the first NUL.
    pub fn c_name(&self) -> &[u8] {
        c_str(&self.name)
    }

    /// The name as inert text for listings, reports and messages: see
    /// [`crate::names::escape`] (unchanged for every ordinary name).
    pub fn display_name(&self) -> String {
        crate::names::escape(self.c_name())
    }

    /// Clusters the device has.
    pub fn clusters(&self) -> u64 {
        clusters_for(self.size)
    }
}

fn c_str(bytes: &[u8]) -> &[u8] {
    match bytes.iter().position(|&b| b == 0) {
        Some(n) => &bytes[..n],
        None => bytes,
    }
}

/// A parsed, checked archive header.
#[derive(Clone, Debug)]
pub struct VmaHeader {
    uuid: [u8; 16],
    ctime: i64,
    header_size: u32,
    blob_buffer_offset: u32,
    blob_buffer_size: u32,
    configs: Vec<ConfigEntry>,
    devices: Vec<DeviceInfo>,
}

fn damaged(message: impl Into<String>) -> Error {
    Error::damaged(Some(Location::Header), message)
}

impl VmaHeader {
    /// Reads and checks a header from the start of `input`, consuming exactly
    /// `header_size` bytes. Never allocates more than the bytes that arrive.
    pub fn read_from<R: Read + ?Sized>(input: &mut R) -> Result<VmaHeader, Error> {
        let mut raw = vec![0u8; HEADER_FIXED_SIZE];
        let got = crate::read_full(input, &mut raw)
            .map_err(|e| Error::io(Some(Location::Header), "read failed", e))?;
        if got == 0 {
            return Err(damaged("not a VMA archive: the input is empty"));
        }
        if got >= 4 && raw[..4] != MAGIC {
            return Err(damaged("not a VMA archive (wrong magic number)"));
        }
        if got < HEADER_FIXED_SIZE {
            return Err(damaged(format!(
                "truncated: got {got} of {HEADER_FIXED_SIZE} bytes"
            )));
        }
        let header_size = check_header_size(&raw)?;
        let rest = header_size as usize - HEADER_FIXED_SIZE;
        let got = input
            .take(rest as u64)
            .read_to_end(&mut raw)
            .map_err(|e| Error::io(Some(Location::Header), "read failed", e))?;
        if got < rest {
            return Err(damaged(format!(
                "truncated: got {} of {header_size} bytes",
                HEADER_FIXED_SIZE + got
            )));
        }
        VmaHeader::parse(&raw)
    }

    /// Parses and checks a whole header (`bytes` may run past `header_size`).
    ///
    /// Checked, in this order: magic; header size at least 12288 and at most
    /// [`MAX_READ_HEADER_SIZE`]; MD5; version 1; blob buffer inside the header;
    /// every device slot with a size has a name pointer to a NUL-terminated
    /// blob and a size a 32-bit cluster number can address; device names are
    /// unique; every config slot with both pointers set points at blobs (a
    /// name string and a data blob). Slots with only one pointer set, and
    /// device slots of size 0, declare nothing and are skipped, as Proxmox's
    /// reader does.
    pub fn parse(bytes: &[u8]) -> Result<VmaHeader, Error> {
        if bytes.len() < 4 || bytes[..4] != MAGIC {
            return Err(damaged("not a VMA archive (wrong magic number)"));
        }
        if bytes.len() < HEADER_FIXED_SIZE {
            return Err(damaged(format!(
                "truncated: got {} of {HEADER_FIXED_SIZE} bytes",
                bytes.len()
            )));
        }
        let header_size = check_header_size(bytes)?;
        if bytes.len() < header_size as usize {
            return Err(damaged(format!(
                "truncated: got {} of {header_size} bytes",
                bytes.len()
            )));
        }
        let raw = &bytes[..header_size as usize];
        if header_md5(raw) != raw[OFF_MD5..OFF_MD5 + 16] {
            return Err(damaged("header checksum mismatch"));
        }
        let version = BigEndian::read_u32(&raw[OFF_VERSION..]);
        if version != 1 {
            return Err(damaged(format!(
                "unsupported version {version} (only 1 exists)"
            )));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&raw[OFF_UUID..OFF_UUID + 16]);
        let ctime = BigEndian::read_i64(&raw[OFF_CTIME..]);
        let blob_buffer_offset = BigEndian::read_u32(&raw[OFF_BLOB_OFFSET..]);
        let blob_buffer_size = BigEndian::read_u32(&raw[OFF_BLOB_SIZE..]);
        if (blob_buffer_offset as usize) < HEADER_FIXED_SIZE || blob_buffer_offset > header_size {
            return Err(damaged(format!(
                "blob buffer offset {blob_buffer_offset} outside 12288..={header_size}"
            )));
        }
        if blob_buffer_offset as u64 + blob_buffer_size as u64 > header_size as u64 {
            return Err(damaged(format!(
                "blob buffer ({blob_buffer_size} bytes at {blob_buffer_offset}) runs past the header size {header_size}"
            )));
        }
        let blobs =
            BlobTable::parse(&raw[blob_buffer_offset as usize..][..blob_buffer_size as usize]);

        let mut devices: Vec<DeviceInfo> = Vec::new();
        for id in 1..DEVICE_SLOTS {
            let slot = &raw[OFF_DEV_INFO + id * DEV_INFO_SIZE..][..DEV_INFO_SIZE];
            let name_ptr = BigEndian::read_u32(&slot[0..]);
            let size = BigEndian::read_u64(&slot[8..]);
            if size == 0 {
                continue;
            }
            let name = blobs.string(name_ptr).ok_or_else(|| {
                damaged(format!(
                    "device {id}: name pointer {name_ptr} does not point at a NUL-terminated blob"
                ))
            })?;
            if size > MAX_DEVICE_SIZE {
                return Err(damaged(format!(
                    "device {id}: size {size} is larger than 32-bit cluster numbers can address"
                )));
            }
            let dev = DeviceInfo {
                id: id as u8,
                name: name.to_vec(),
                size,
            };
            if let Some(other) = devices.iter().find(|d| d.c_name() == dev.c_name()) {
                return Err(damaged(format!(
                    "devices {} and {id} have the same name {:?}",
                    other.id,
                    dev.display_name()
                )));
            }
            devices.push(dev);
        }

        let mut configs = Vec::new();
        for slot in 0..MAX_CONFIGS {
            let name_ptr = BigEndian::read_u32(&raw[OFF_CONFIG_NAMES + 4 * slot..]);
            let data_ptr = BigEndian::read_u32(&raw[OFF_CONFIG_DATA + 4 * slot..]);
            if name_ptr == 0 || data_ptr == 0 {
                continue;
            }
            let name = blobs.string(name_ptr).ok_or_else(|| {
                damaged(format!(
                    "config {slot}: name pointer {name_ptr} does not point at a NUL-terminated blob"
                ))
            })?;
            let data = blobs.blob(data_ptr).ok_or_else(|| {
                damaged(format!(
                    "config {slot}: data pointer {data_ptr} does not point at a blob"
                ))
            })?;
            configs.push(ConfigEntry {
                slot,
                name: name.to_vec(),
                data: data.to_vec(),
            });
        }

        Ok(VmaHeader {
            uuid,
            ctime,
            header_size,
            blob_buffer_offset,
            blob_buffer_size,
            configs,
            devices,
        })
    }

    /// The archive's uuid, repeated in every extent header.
    pub fn uuid(&self) -> [u8; 16] {
        self.uuid
    }

    /// When the backup was made, in seconds since the epoch.
    pub fn ctime(&self) -> i64 {
        self.ctime
    }

    /// Size of the header in bytes; the first extent starts here.
    pub fn header_size(&self) -> u32 {
        self.header_size
    }

    /// Where the blob buffer starts.
    pub fn blob_buffer_offset(&self) -> u32 {
        self.blob_buffer_offset
    }

    /// Bytes of the blob buffer in use.
    pub fn blob_buffer_size(&self) -> u32 {
        self.blob_buffer_size
    }

    /// The config files, in slot order.
    pub fn configs(&self) -> &[ConfigEntry] {
        &self.configs
    }

    /// The config named `name` (compared as Proxmox does, up to the first NUL).
    pub fn config(&self, name: &[u8]) -> Option<&ConfigEntry> {
        self.configs.iter().find(|c| c.c_name() == name)
    }

    /// The devices, in id order.
    pub fn devices(&self) -> &[DeviceInfo] {
        &self.devices
    }

    /// The device with id `id`, if declared.
    pub fn device(&self, id: u8) -> Option<&DeviceInfo> {
        self.devices.iter().find(|d| d.id == id)
    }
}

fn check_header_size(raw: &[u8]) -> Result<u32, Error> {
    let header_size = BigEndian::read_u32(&raw[OFF_HEADER_SIZE..]);
    if (header_size as usize) < HEADER_FIXED_SIZE || header_size as usize > MAX_READ_HEADER_SIZE {
        return Err(damaged(format!(
            "header size {header_size} outside {HEADER_FIXED_SIZE}..={MAX_READ_HEADER_SIZE}"
        )));
    }
    Ok(header_size)
}

/// Recomputes the MD5 of a whole header (`raw` is `header_size` bytes) and
/// stores it in place: for tools that patch headers, and for tests that
/// build hostile ones.
pub fn update_checksum(raw: &mut [u8]) {
    let md5 = header_md5(raw);
    raw[OFF_MD5..OFF_MD5 + 16].copy_from_slice(&md5);
}

/// MD5 of a header with its checksum field taken as zero.
fn header_md5(raw: &[u8]) -> [u8; 16] {
    let mut md5 = Md5::new();
    md5.update(&raw[..OFF_MD5]);
    md5.update([0u8; 16]);
    md5.update(&raw[OFF_MD5 + 16..]);
    md5.finalize().into()
}

/// The blobs of a blob buffer, found the way Proxmox's reader finds them:
/// walking from offset 1, each blob a 2-byte little-endian size and data.
/// A pointer is valid only if it is the start of one of these blobs.
struct BlobTable<'a> {
    buffer: &'a [u8],
    starts: Vec<u32>,
}

impl<'a> BlobTable<'a> {
    fn parse(buffer: &'a [u8]) -> BlobTable<'a> {
        let mut starts = Vec::new();
        let mut pos = 1usize;
        while pos + 2 <= buffer.len() {
            let size = u16::from_le_bytes([buffer[pos], buffer[pos + 1]]) as usize;
            if pos + 2 + size <= buffer.len() {
                starts.push(pos as u32);
            }
            pos += 2 + size;
        }
        BlobTable { buffer, starts }
    }

    fn blob(&self, ptr: u32) -> Option<&'a [u8]> {
        self.starts.binary_search(&ptr).ok()?;
        let pos = ptr as usize;
        let size = u16::from_le_bytes([self.buffer[pos], self.buffer[pos + 1]]) as usize;
        Some(&self.buffer[pos + 2..pos + 2 + size])
    }

    /// A NUL-terminated string blob, returned without its final NUL.
    fn string(&self, ptr: u32) -> Option<&'a [u8]> {
        match self.blob(ptr)? {
            [rest @ .., 0] => Some(rest),
            _ => None,
        }
    }
}

/// Collects configs and devices, then encodes a header byte for byte as
/// Proxmox's writer lays it out (configs' name and data blobs in the order
/// added, then device names in id order, the blob buffer grown in 512-byte
/// steps).
#[derive(Clone, Debug)]
pub struct HeaderBuilder {
    uuid: [u8; 16],
    ctime: i64,
    configs: Vec<(String, Vec<u8>)>,
    devices: Vec<(String, u64)>,
}

impl HeaderBuilder {
    /// An empty header with this uuid and creation time.
    pub fn new(uuid: [u8; 16], ctime: i64) -> HeaderBuilder {
        HeaderBuilder {
            uuid,
            ctime,
            configs: Vec::new(),
            devices: Vec::new(),
        }
    }

    /// Adds a config file. Refused: more than 256 configs, a name that is not
    /// a safe file name (see [`crate::names::check_file_name`]) or is longer
    /// than 65534 bytes, a name already added, data over 65535 bytes.
    pub fn add_config(&mut self, name: &str, data: Vec<u8>) -> Result<(), Error> {
        if self.configs.len() >= MAX_CONFIGS {
            return Err(Error::invalid(format!(
                "config {name}: more than {MAX_CONFIGS} configs"
            )));
        }
        check_name("config", name)?;
        if data.len() > MAX_BLOB_SIZE {
            return Err(Error::invalid(format!(
                "config {name}: {} bytes, more than the format's {MAX_BLOB_SIZE}",
                data.len()
            )));
        }
        if self.configs.iter().any(|(n, _)| n == name) {
            return Err(Error::invalid(format!("config {name}: added twice")));
        }
        self.configs.push((name.to_string(), data));
        Ok(())
    }

    /// Declares a device and returns its id (1, 2, … in order). Refused: more
    /// than 254 devices, size 0 or beyond what 32-bit cluster numbers address,
    /// an unsafe or overlong name, a name already declared.
    pub fn add_device(&mut self, name: &str, size: u64) -> Result<u8, Error> {
        if self.devices.len() >= MAX_DEVICES {
            return Err(Error::invalid(format!(
                "device {name}: more than {MAX_DEVICES} devices"
            )));
        }
        check_name("device", name)?;
        if size == 0 {
            return Err(Error::invalid(format!("device {name}: size is 0")));
        }
        if size > MAX_DEVICE_SIZE {
            return Err(Error::invalid(format!(
                "device {name}: size {size} is larger than the format's {MAX_DEVICE_SIZE}"
            )));
        }
        if self.devices.iter().any(|(n, _)| n == name) {
            return Err(Error::invalid(format!("device {name}: declared twice")));
        }
        self.devices.push((name.to_string(), size));
        Ok(self.devices.len() as u8)
    }

    /// The devices declared so far, as (name, size), id 1 first.
    pub fn devices(&self) -> &[(String, u64)] {
        &self.devices
    }

    /// The header's bytes. Refused if it would exceed Proxmox's 512 KiB
    /// header buffer.
    ///
    /// One deliberate difference from Proxmox's writer: with no configs and no
    /// devices Proxmox writes a 12288-byte header that its own reader then
    /// refuses ("wrong vma header size"); we always include a 512-byte blob
    /// buffer, so every reader accepts the header.
    pub fn encode(&self) -> Result<Vec<u8>, Error> {
        let mut blobs = BlobWriter::default();
        let mut config_ptrs = Vec::with_capacity(self.configs.len());
        for (name, data) in &self.configs {
            let n = blobs.add_string(name);
            let d = blobs.add(data);
            config_ptrs.push((n, d));
        }
        let mut device_ptrs = Vec::with_capacity(self.devices.len());
        for (name, size) in &self.devices {
            device_ptrs.push((blobs.add_string(name), *size));
        }
        if blobs.table.is_empty() {
            blobs.table = vec![0u8; 512];
        }
        let header_size = HEADER_FIXED_SIZE + blobs.table.len();
        if header_size > MAX_WRITTEN_HEADER_SIZE {
            return Err(Error::invalid(format!(
                "the configs and device names need a {header_size}-byte header, more than {MAX_WRITTEN_HEADER_SIZE}"
            )));
        }
        let mut raw = vec![0u8; header_size];
        raw[..4].copy_from_slice(&MAGIC);
        BigEndian::write_u32(&mut raw[OFF_VERSION..], 1);
        raw[OFF_UUID..OFF_UUID + 16].copy_from_slice(&self.uuid);
        BigEndian::write_i64(&mut raw[OFF_CTIME..], self.ctime);
        BigEndian::write_u32(&mut raw[OFF_BLOB_OFFSET..], HEADER_FIXED_SIZE as u32);
        BigEndian::write_u32(&mut raw[OFF_BLOB_SIZE..], blobs.pos as u32);
        BigEndian::write_u32(&mut raw[OFF_HEADER_SIZE..], header_size as u32);
        for (slot, (n, d)) in config_ptrs.iter().enumerate() {
            BigEndian::write_u32(&mut raw[OFF_CONFIG_NAMES + 4 * slot..], *n);
            BigEndian::write_u32(&mut raw[OFF_CONFIG_DATA + 4 * slot..], *d);
        }
        for (i, (ptr, size)) in device_ptrs.iter().enumerate() {
            let slot = OFF_DEV_INFO + (i + 1) * DEV_INFO_SIZE;
            BigEndian::write_u32(&mut raw[slot..], *ptr);
            BigEndian::write_u64(&mut raw[slot + 8..], *size);
        }
        raw[HEADER_FIXED_SIZE..].copy_from_slice(&blobs.table);
        let md5 = header_md5(&raw);
        raw[OFF_MD5..OFF_MD5 + 16].copy_from_slice(&md5);
        Ok(raw)
    }
}

fn check_name(what: &str, name: &str) -> Result<(), Error> {
    crate::names::check_file_name(name.as_bytes())
        .map_err(|why| Error::invalid(format!("{what} {name:?}: {why}")))?;
    if name.len() + 1 > MAX_BLOB_SIZE {
        return Err(Error::invalid(format!(
            "{what} name of {} bytes is longer than the format's {}",
            name.len(),
            MAX_BLOB_SIZE - 1
        )));
    }
    Ok(())
}

/// The blob buffer as Proxmox's writer fills it: offset 0 unused, storage
/// grown by whole 512-byte steps when a blob does not fit.
struct BlobWriter {
    table: Vec<u8>,
    pos: usize,
}

impl Default for BlobWriter {
    fn default() -> Self {
        BlobWriter {
            table: Vec::new(),
            pos: 1,
        }
    }
}

impl BlobWriter {
    fn add(&mut self, data: &[u8]) -> u32 {
        let len = data.len();
        if self.table.is_empty() || self.table.len() < self.pos + len + 2 {
            let grow = (len + 2).div_ceil(512) * 512;
            self.table.resize(self.table.len() + grow, 0);
        }
        let at = self.pos;
        self.table[at..at + 2].copy_from_slice(&(len as u16).to_le_bytes());
        self.table[at + 2..at + 2 + len].copy_from_slice(data);
        self.pos += len + 2;
        at as u32
    }

    fn add_string(&mut self, s: &str) -> u32 {
        let mut bytes = Vec::with_capacity(s.len() + 1);
        bytes.extend_from_slice(s.as_bytes());
        bytes.push(0);
        self.add(&bytes)
    }
}

#[cfg(test)]
mod tests;
