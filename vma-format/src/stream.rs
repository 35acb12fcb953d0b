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

use std::io::{self, BufReader, BufWriter, Read, Write};

use crate::cluster::{BlockMask, Cluster};
use crate::clusterset::ClusterSet;
use crate::error::{Error, Location};
use crate::identity::{BackupIdentity, IDENTITY_SIZE};
use crate::{
    clusters_for, CLUSTER_SIZE, MAX_BLOB_SIZE, MAX_DEVICES, MAX_DEVICE_SIZE, VMSTATE_NAME,
};

/// Magic number at the start of every cluster stream.
pub const MAGIC: [u8; 8] = *b"VMACSTRM";
/// The version this module writes without a [`BackupIdentity`].
pub const VERSION: u16 = 1;
/// The version with a [`BackupIdentity`] in the preamble (after the
/// devices): the archive uuid, and for an incremental stream its base.
/// Readers of version 1 refuse it (`unsupported cluster stream version 2`).
pub const VERSION_IDENTITY: u16 = 2;
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
    fn check(&self) -> Result<(), String> {
        crate::names::check_file_name(self.name.as_bytes())
            .map_err(|why| format!("device {:?}: {why}", self.name))?;
        if self.name.len() > MAX_NAME_LEN {
            return Err(format!(
                "device name of {} bytes, more than {MAX_NAME_LEN}",
                self.name.len()
            ));
        }
        if self.size == 0 || self.size > MAX_DEVICE_SIZE {
            return Err(format!(
                "device {}: size {} outside 1..={MAX_DEVICE_SIZE}",
                self.name, self.size
            ));
        }
        Ok(())
    }
}

fn check_devices(devices: &[StreamDevice]) -> Result<(), String> {
    if devices.len() > MAX_DEVICES {
        return Err(format!(
            "{} devices, more than {MAX_DEVICES}",
            devices.len()
        ));
    }
    for (i, d) in devices.iter().enumerate() {
        d.check()?;
        if devices[..i].iter().any(|o| o.name == d.name) {
            return Err(format!("device {} declared twice", d.name));
        }
    }
    Ok(())
}

/// Writes a cluster stream to `W`.
///
/// The preamble is written at once; then [`write_cluster`](Self::write_cluster)
/// for each cluster, in any order; then [`finish`](Self::finish) (the end
/// record) or [`abort`](Self::abort). Dropping the writer without either
/// leaves a stream that every reader refuses as truncated.
///
/// Output is buffered (256 KiB); it reaches `W` when the buffer fills and at
/// `finish`/`abort`.
pub struct StreamWriter<W: Write> {
    out: BufWriter<W>,
    devices: Vec<StreamDevice>,
    counts: Vec<u64>,
    failed: bool,
}

impl<W: Write> StreamWriter<W> {
    /// Writes the preamble: `backup_time` (seconds since the epoch) and the
    /// devices, which get ids 1, 2, … in this order. Refused (as
    /// [`ErrorClass::Invalid`](crate::ErrorClass)): more than 254 devices,
    /// an unsafe, overlong or repeated name, size 0 or over
    /// [`MAX_DEVICE_SIZE`].
    pub fn new(
        out: W,
        backup_time: i64,
        devices: &[StreamDevice],
    ) -> Result<StreamWriter<W>, Error> {
        Self::with_identity(out, backup_time, devices, None)
    }

    /// [`new`](Self::new), and with `Some(identity)` a version-2 stream
    /// that names its archive uuid and, if incremental, its base. An
    /// incremental stream carries only the clusters changed since the base
    /// (the end record counts what was sent).
    pub fn with_identity(
        out: W,
        backup_time: i64,
        devices: &[StreamDevice],
        identity: Option<&BackupIdentity>,
    ) -> Result<StreamWriter<W>, Error> {
        check_devices(devices).map_err(Error::invalid)?;
        let mut pre = Vec::with_capacity(PREAMBLE_FIXED_SIZE + 4);
        pre.extend_from_slice(&MAGIC);
        let version = if identity.is_some() {
            VERSION_IDENTITY
        } else {
            VERSION
        };
        pre.extend_from_slice(&version.to_be_bytes());
        pre.extend_from_slice(&0u16.to_be_bytes());
        pre.extend_from_slice(&backup_time.to_be_bytes());
        pre.extend_from_slice(&(devices.len() as u16).to_be_bytes());
        for d in devices {
            pre.extend_from_slice(&d.size.to_be_bytes());
            pre.extend_from_slice(&(d.name.len() as u16).to_be_bytes());
            pre.extend_from_slice(d.name.as_bytes());
        }
        if let Some(id) = identity {
            pre.extend_from_slice(&id.encode());
        }
        let crc = crc32fast::hash(&pre);
        pre.extend_from_slice(&crc.to_be_bytes());
        let mut out = BufWriter::with_capacity(IO_BUFFER, out);
        out.write_all(&pre).map_err(write_error)?;
        Ok(StreamWriter {
            out,
            counts: vec![0; devices.len()],
            devices: devices.to_vec(),
            failed: false,
        })
    }

    /// Writes one cluster record. Refused: an undeclared device, a cluster
    /// past the device end (but for `vmstate`), data that is not
    /// `mask.count() * 4096` bytes. Not checked here (the reader does): a
    /// cluster sent twice.
    pub fn write_cluster(&mut self, cluster: &Cluster<'_>) -> Result<(), Error> {
        if self.failed {
            return Err(Error::invalid("stream writer failed earlier"));
        }
        let dev = cluster
            .dev_id
            .checked_sub(1)
            .and_then(|i| self.devices.get(i as usize))
            .ok_or_else(|| Error::invalid(format!("device {} is not declared", cluster.dev_id)))?;
        if !dev.is_vmstate() && cluster.cluster_num as u64 >= clusters_for(dev.size) {
            return Err(Error::invalid(format!(
                "cluster {} is past the end of {}",
                cluster.cluster_num, dev.name
            )));
        }
        if cluster.data.len() != cluster.mask.data_len() {
            return Err(Error::invalid(format!(
                "cluster {} of {}: {} data bytes for {} blocks",
                cluster.cluster_num,
                dev.name,
                cluster.data.len(),
                cluster.mask.count()
            )));
        }
        let head = record_header(
            RECORD_CLUSTER,
            cluster.dev_id,
            cluster.mask.0,
            cluster.cluster_num,
            cluster.data.len() as u32,
        );
        self.counts[cluster.dev_id as usize - 1] += 1;
        self.write_record(&head, cluster.data)
    }

    fn write_record(&mut self, head: &[u8; RECORD_HEADER_SIZE], body: &[u8]) -> Result<(), Error> {
        let mut crc = crc32fast::Hasher::new();
        crc.update(head);
        crc.update(body);
        let crc = crc.finalize().to_be_bytes();
        let res = self
            .out
            .write_all(head)
            .and_then(|_| self.out.write_all(body))
            .and_then(|_| self.out.write_all(&crc));
        res.map_err(|e| {
            self.failed = true;
            write_error(e)
        })
    }

    /// Cluster records written so far for each device, device 1 first.
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// Writes the end record (the per-device record counts) and flushes.
    pub fn finish(mut self) -> Result<W, Error> {
        let mut body = Vec::with_capacity(8 * self.counts.len());
        for c in &self.counts {
            body.extend_from_slice(&c.to_be_bytes());
        }
        let head = record_header(
            RECORD_END,
            0,
            self.counts.len() as u16,
            0,
            body.len() as u32,
        );
        self.write_record(&head, &body)?;
        self.into_inner()
    }

    /// Writes an abort record with `reason` (cut to [`MAX_ABORT_REASON`]
    /// bytes at a character boundary) and flushes: the consumer fails with
    /// this reason.
    pub fn abort(mut self, reason: &str) -> Result<W, Error> {
        let mut end = reason.len().min(MAX_ABORT_REASON);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let body = &reason.as_bytes()[..end];
        let head = record_header(RECORD_ABORT, 0, 0, 0, body.len() as u32);
        self.write_record(&head, body)?;
        self.into_inner()
    }

    fn into_inner(self) -> Result<W, Error> {
        self.out
            .into_inner()
            .map_err(|e| write_error(e.into_error()))
    }
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

fn write_error(e: io::Error) -> Error {
    Error::io(None, "write failed", e)
}

struct DeviceState {
    clusters: u64,
    size: u64,
    vmstate: bool,
    seen: ClusterSet,
    received: u64,
}

/// Reads a cluster stream from `R`, checking everything.
///
/// [`new`](Self::new) reads and checks the preamble;
/// [`next_cluster`](Self::next_cluster) returns the clusters one by one and
/// `None` once the end record has been checked and the input has ended.
/// Errors are [`ErrorClass::Damaged`](crate::ErrorClass) (or `Io` when
/// reading fails), located at [`Location::Header`] for the preamble and
/// [`Location::Record`] for records, each with its own message:
///
/// | problem | message starts with |
/// |---|---|
/// | wrong magic | `not a cluster stream` |
/// | other version, unknown flags | `unsupported cluster stream version`, `unknown preamble flags` |
/// | damaged preamble | `preamble checksum mismatch` (and others naming the field) |
/// | record CRC wrong | `record checksum mismatch` |
/// | unknown record type | `unknown record type` |
/// | device id not declared | `device id N out of range` |
/// | body length not what the mask says | `mask/length mismatch` |
/// | cluster past the device end, mask past it | `cluster N is past the end`, `mask … names blocks past the end` |
/// | cluster sent twice | `duplicate cluster` |
/// | `vmstate` cluster out of order | `vmstate cluster N out of order` |
/// | input ends before the end record | `truncated` |
/// | abort record | `the producer aborted the stream: REASON` |
/// | end record counts differ from what came | `end record: device … records declared, … received` |
/// | a cluster never sent | `device …: cluster N missing` |
/// | bytes after the end record | `data after the end record` |
///
/// Memory: one 64 KiB record buffer, a 256 KiB read buffer, and a
/// [`ClusterSet`] per device (a few bytes per run of clusters received).
pub struct StreamReader<R: Read> {
    inner: BufReader<R>,
    backup_time: i64,
    identity: Option<BackupIdentity>,
    devices: Vec<StreamDevice>,
    state: Vec<DeviceState>,
    body: Box<[u8]>,
    pos: u64,
    records: u64,
    done: bool,
    failed: bool,
    abort_reason: Option<String>,
}

impl<R: Read> StreamReader<R> {
    /// Reads and checks the preamble.
    pub fn new(inner: R) -> Result<StreamReader<R>, Error> {
        let mut inner = BufReader::with_capacity(IO_BUFFER, inner);
        let mut crc = crc32fast::Hasher::new();
        let mut fixed = [0u8; PREAMBLE_FIXED_SIZE];
        let got = read_full(&mut inner, &mut fixed).map_err(|e| read_error(Location::Header, e))?;
        if got == 0 {
            return Err(pre_damaged("not a cluster stream: the input is empty"));
        }
        if fixed[..got.min(MAGIC.len())] != MAGIC[..got.min(MAGIC.len())] {
            return Err(pre_damaged("not a cluster stream (wrong magic number)"));
        }
        if got < PREAMBLE_FIXED_SIZE {
            return Err(pre_damaged(format!(
                "truncated: the input ends inside the preamble, after {got} bytes"
            )));
        }
        crc.update(&fixed);
        let version = u16::from_be_bytes([fixed[8], fixed[9]]);
        if version != VERSION && version != VERSION_IDENTITY {
            return Err(pre_damaged(format!(
                "unsupported cluster stream version {version} (this reader knows {VERSION} and {VERSION_IDENTITY})"
            )));
        }
        let flags = u16::from_be_bytes([fixed[10], fixed[11]]);
        if flags != 0 {
            return Err(pre_damaged(format!("unknown preamble flags {flags:#06x}")));
        }
        let backup_time = i64::from_be_bytes(fixed[12..20].try_into().expect("8 bytes"));
        let count = u16::from_be_bytes([fixed[20], fixed[21]]) as usize;
        if count > MAX_DEVICES {
            return Err(pre_damaged(format!(
                "{count} devices, more than {MAX_DEVICES}"
            )));
        }
        let mut pos = PREAMBLE_FIXED_SIZE as u64;
        let mut raw = Vec::with_capacity(count);
        for i in 0..count {
            let mut entry = [0u8; 10];
            read_exact_pre(&mut inner, &mut entry, pos)?;
            crc.update(&entry);
            let size = u64::from_be_bytes(entry[..8].try_into().expect("8 bytes"));
            let len = u16::from_be_bytes([entry[8], entry[9]]) as usize;
            if len > MAX_NAME_LEN {
                return Err(pre_damaged(format!(
                    "device {}: name of {len} bytes, more than {MAX_NAME_LEN}",
                    i + 1
                )));
            }
            let mut name = vec![0u8; len];
            read_exact_pre(&mut inner, &mut name, pos + 10)?;
            crc.update(&name);
            pos += 10 + len as u64;
            raw.push((name, size));
        }
        let mut id_bytes = [0u8; IDENTITY_SIZE];
        if version == VERSION_IDENTITY {
            read_exact_pre(&mut inner, &mut id_bytes, pos)?;
            crc.update(&id_bytes);
            pos += IDENTITY_SIZE as u64;
        }
        let mut stored = [0u8; 4];
        read_exact_pre(&mut inner, &mut stored, pos)?;
        pos += 4;
        if crc.finalize() != u32::from_be_bytes(stored) {
            return Err(pre_damaged("preamble checksum mismatch"));
        }
        let identity = if version == VERSION_IDENTITY {
            Some(BackupIdentity::decode(&id_bytes).map_err(pre_damaged)?)
        } else {
            None
        };
        let mut devices = Vec::with_capacity(count);
        for (i, (name, size)) in raw.into_iter().enumerate() {
            let name = String::from_utf8(name)
                .map_err(|_| pre_damaged(format!("device {}: name is not UTF-8", i + 1)))?;
            devices.push(StreamDevice { name, size });
        }
        check_devices(&devices).map_err(pre_damaged)?;
        let state = devices
            .iter()
            .map(|d| {
                let vmstate = d.is_vmstate();
                let clusters = clusters_for(d.size);
                DeviceState {
                    clusters,
                    size: d.size,
                    vmstate,
                    seen: ClusterSet::new(if vmstate { 0 } else { clusters }),
                    received: 0,
                }
            })
            .collect();
        Ok(StreamReader {
            inner,
            backup_time,
            identity,
            devices,
            state,
            body: vec![0u8; CLUSTER_SIZE].into_boxed_slice(),
            pos,
            records: 0,
            done: false,
            failed: false,
            abort_reason: None,
        })
    }

    /// The backup instant, in seconds since the epoch.
    pub fn backup_time(&self) -> i64 {
        self.backup_time
    }

    /// The identity of a version-2 stream (archive uuid, base of an
    /// incremental stream); `None` for version 1.
    pub fn identity(&self) -> Option<&BackupIdentity> {
        self.identity.as_ref()
    }

    /// Whether only changed clusters come (an incremental stream): the
    /// end checks no cluster is missing only for full streams.
    pub fn is_incremental(&self) -> bool {
        self.identity.is_some_and(|i| i.base.is_some())
    }

    /// The devices, id 1 first.
    pub fn devices(&self) -> &[StreamDevice] {
        &self.devices
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Records read so far (clusters and the end record).
    pub fn records(&self) -> u64 {
        self.records
    }

    /// The reason of the abort record, once one was read.
    pub fn abort_reason(&self) -> Option<&str> {
        self.abort_reason.as_deref()
    }

    /// The next cluster, or `None` once the end record was read and checked
    /// and the input has ended. After an error, every call fails.
    pub fn next_cluster(&mut self) -> Result<Option<Cluster<'_>>, Error> {
        if self.failed {
            return Err(Error::damaged(
                Some(Location::End),
                "cluster stream failed earlier",
            ));
        }
        if self.done {
            return Ok(None);
        }
        match self.read_record() {
            Ok(Some((dev_id, cluster_num, mask))) => Ok(Some(Cluster {
                dev_id,
                cluster_num,
                mask,
                data: &self.body[..mask.data_len()],
            })),
            Ok(None) => {
                self.done = true;
                Ok(None)
            }
            Err(e) => {
                self.failed = true;
                Err(e)
            }
        }
    }

    /// Reads one record; a cluster leaves its data at the start of `body`.
    fn read_record(&mut self) -> Result<Option<(u8, u32, BlockMask)>, Error> {
        let loc = Location::Record {
            index: self.records,
            offset: self.pos,
        };
        let damaged = |msg: String| Error::damaged(Some(loc), msg);
        let mut head = [0u8; RECORD_HEADER_SIZE];
        let got = read_full(&mut self.inner, &mut head).map_err(|e| read_error(loc, e))?;
        if got < RECORD_HEADER_SIZE {
            return Err(damaged(truncated(got, self.records)));
        }
        let (kind, a, b) = (head[0], head[1], u16::from_be_bytes([head[2], head[3]]));
        let c = u32::from_be_bytes(head[4..8].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(head[8..12].try_into().expect("4 bytes")) as usize;
        let max = match kind {
            RECORD_CLUSTER => CLUSTER_SIZE,
            RECORD_END => 8 * self.devices.len(),
            RECORD_ABORT => MAX_ABORT_REASON,
            _ => return Err(damaged(format!("unknown record type {kind:#04x}"))),
        };
        if len > max {
            return Err(damaged(match kind {
                RECORD_CLUSTER => format!(
                    "mask/length mismatch: cluster record of {len} data bytes, more than a cluster"
                ),
                RECORD_END => format!(
                    "end record of {len} bytes, the {} devices need {max}",
                    self.devices.len()
                ),
                _ => format!("abort record of {len} bytes, more than {MAX_ABORT_REASON}"),
            }));
        }
        let mut stored = [0u8; 4];
        let body = &mut self.body[..len];
        let got = read_full(&mut self.inner, body).map_err(|e| read_error(loc, e))?;
        let got_crc = if got == len {
            read_full(&mut self.inner, &mut stored).map_err(|e| read_error(loc, e))?
        } else {
            0
        };
        if got < len || got_crc < 4 {
            return Err(damaged(truncated(
                RECORD_HEADER_SIZE + got + got_crc,
                self.records,
            )));
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(&head);
        crc.update(body);
        if crc.finalize() != u32::from_be_bytes(stored) {
            return Err(damaged("record checksum mismatch".into()));
        }
        self.pos += (RECORD_HEADER_SIZE + len + 4) as u64;
        self.records += 1;
        match kind {
            RECORD_CLUSTER => self.check_cluster(a, b, c, len).map_err(damaged),
            RECORD_ABORT => {
                let reason: String = String::from_utf8_lossy(&self.body[..len])
                    .chars()
                    .map(|ch| if ch.is_control() { ' ' } else { ch })
                    .collect();
                let msg = format!("the producer aborted the stream: {reason}");
                self.abort_reason = Some(reason);
                Err(damaged(msg))
            }
            _ => {
                self.check_end(a, b, c, len).map_err(damaged)?;
                let mut byte = [0u8; 1];
                let more = read_full(&mut self.inner, &mut byte)
                    .map_err(|e| read_error(Location::End, e))?;
                if more > 0 {
                    return Err(Error::damaged(
                        Some(Location::Record {
                            index: self.records,
                            offset: self.pos,
                        }),
                        "data after the end record",
                    ));
                }
                Ok(None)
            }
        }
    }

    fn check_cluster(
        &mut self,
        dev_id: u8,
        mask: u16,
        n: u32,
        len: usize,
    ) -> Result<Option<(u8, u32, BlockMask)>, String> {
        let mask = BlockMask(mask);
        let count = self.devices.len();
        let (dev, st) = match dev_id.checked_sub(1).map(usize::from) {
            Some(i) if i < count => (&self.devices[i], &mut self.state[i]),
            _ => {
                return Err(format!(
                    "device id {dev_id} out of range (the stream has {count} devices)"
                ))
            }
        };
        if len != mask.data_len() {
            return Err(format!(
                "mask/length mismatch: cluster record with mask {:#06x} ({} blocks) has {len} data bytes",
                mask.0,
                mask.count()
            ));
        }
        if st.vmstate {
            if n as u64 != st.received {
                return Err(format!(
                    "vmstate cluster {n} out of order (expected {})",
                    st.received
                ));
            }
        } else {
            if n as u64 >= st.clusters {
                return Err(format!(
                    "cluster {n} is past the end of {} ({} clusters)",
                    dev.name, st.clusters
                ));
            }
            let allowed = BlockMask::in_device(n as u64, st.size);
            if mask.0 & !allowed.0 != 0 {
                return Err(format!(
                    "cluster {n} of {}: mask {:#06x} names blocks past the end of the device",
                    dev.name, mask.0
                ));
            }
            if !st.seen.insert(n as u64) {
                return Err(format!("duplicate cluster {n} of {}", dev.name));
            }
        }
        st.received += 1;
        Ok(Some((dev_id, n, mask)))
    }

    fn check_end(
        &mut self,
        reserved: u8,
        count: u16,
        reserved2: u32,
        len: usize,
    ) -> Result<(), String> {
        if reserved != 0 || reserved2 != 0 {
            return Err("end record: reserved fields are not zero".into());
        }
        if count as usize != self.devices.len() || len != 8 * self.devices.len() {
            return Err(format!(
                "end record: counts for {count} devices in {len} bytes, the stream has {} devices",
                self.devices.len()
            ));
        }
        for (i, (dev, st)) in self.devices.iter().zip(&self.state).enumerate() {
            let declared = u64::from_be_bytes(self.body[8 * i..8 * i + 8].try_into().expect("8"));
            if declared != st.received {
                return Err(format!(
                    "end record: device {}: {declared} records declared, {} received",
                    dev.name, st.received
                ));
            }
        }
        if self.is_incremental() {
            return Ok(());
        }
        for (dev, st) in self.devices.iter().zip(&self.state) {
            if let Some(first) = st.seen.first_missing() {
                return Err(format!(
                    "device {}: cluster {first} missing ({} of {} clusters missing)",
                    dev.name,
                    st.seen.missing_count(),
                    st.clusters
                ));
            }
        }
        Ok(())
    }

    /// The underlying reader (bytes it had buffered are lost).
    pub fn into_inner(self) -> R {
        self.inner.into_inner()
    }
}

fn truncated(got: usize, records: u64) -> String {
    if got == 0 {
        format!("truncated: the stream ends after {records} records, without its end record")
    } else {
        format!("truncated: the stream ends {got} bytes into a record, without its end record")
    }
}

fn pre_damaged(message: impl Into<String>) -> Error {
    Error::damaged(Some(Location::Header), message)
}

fn read_error(loc: Location, e: io::Error) -> Error {
    Error::io(Some(loc), "read failed", e)
}

fn read_exact_pre<R: Read>(r: &mut R, buf: &mut [u8], pos: u64) -> Result<(), Error> {
    let got = read_full(r, buf).map_err(|e| read_error(Location::Header, e))?;
    if got < buf.len() {
        return Err(pre_damaged(format!(
            "truncated: the input ends inside the preamble, after {} bytes",
            pos + got as u64
        )));
    }
    Ok(())
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::ClusterBuf;
    use crate::{ErrorClass, BLOCK_SIZE};
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
        use crate::identity::BaseRef;
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
            format!(
                "record 0 at byte {pre}: cluster 1 is past the end of drive-virtio1 (1 clusters)"
            )
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
            err_of(&with(&[raw_record(b'C', 2, 0, 0, &[]), raw_record(b'E', 0, 2, 0, &counts)])),
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
            // A deterministic shuffle.
            let mut state = seed | 1;
            for i in (1..clusters.len()).rev() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                clusters.swap(i, (state % (i as u64 + 1)) as usize);
            }
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
}
