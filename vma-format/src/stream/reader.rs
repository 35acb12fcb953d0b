//! [`StreamReader`]: reads a cluster stream, checking everything.

use std::io::{self, Read};

use super::input::{Input, AHEAD, AHEAD_AFTER_LARGE, LARGE_BODY};

use super::{
    check_devices, StreamDevice, MAGIC, MAX_ABORT_REASON, MAX_NAME_LEN, PREAMBLE_FIXED_SIZE,
    RECORD_ABORT, RECORD_CLUSTER, RECORD_END, RECORD_HEADER_SIZE, VERSION,
};
use super::{BackupIdentity, IDENTITY_SIZE, VERSION_IDENTITY};
use crate::cluster::{BlockMask, Cluster};
use crate::devices::{CheckRules, DeviceTracker, Refusal};
use crate::error::{Error, Location};
use crate::read_full;
use crate::{CLUSTER_SIZE, MAX_DEVICES};

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
/// Memory: one 64 KiB record buffer, a 16 KiB read-ahead buffer, and a
/// [`ClusterSet`] per device (a few bytes per run of clusters received).
pub struct StreamReader<R: Read> {
    inner: Input<R>,
    backup_time: i64,
    identity: Option<BackupIdentity>,
    devices: Vec<StreamDevice>,
    state: DeviceTracker,
    body: Box<[u8]>,
    pos: u64,
    records: u64,
    /// The CRC-32 of the last record's body alone (its record checksum
    /// covers header and body): what the writer's data checksum combines
    /// instead of hashing the body again.
    body_crc: u32,
    done: bool,
    failed: bool,
    abort_reason: Option<String>,
}

impl<R: Read> StreamReader<R> {
    /// Reads and checks the preamble.
    pub fn new(inner: R) -> Result<StreamReader<R>, Error> {
        let mut inner = Input::new(inner);
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
            Some(BackupIdentity::decode(&id_bytes).map_err(|e| pre_damaged(e.to_string()))?)
        } else {
            None
        };
        let mut devices = Vec::with_capacity(count);
        for (i, (name, size)) in raw.into_iter().enumerate() {
            let name = String::from_utf8(name)
                .map_err(|_| pre_damaged(format!("device {}: name is not UTF-8", i + 1)))?;
            devices.push(StreamDevice { name, size });
        }
        check_devices(&devices).map_err(|e| pre_damaged(e.to_string()))?;
        let mut state = DeviceTracker::new();
        for (i, d) in devices.iter().enumerate() {
            state.declare(i as u8 + 1, d.size, d.is_vmstate());
        }
        Ok(StreamReader {
            inner,
            backup_time,
            identity,
            devices,
            state,
            body: vec![0u8; CLUSTER_SIZE].into_boxed_slice(),
            pos,
            records: 0,
            body_crc: 0,
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
        Ok(self.step(None)?.map(|(dev_id, cluster_num, mask)| Cluster {
            dev_id,
            cluster_num,
            mask,
            data: &self.body[..mask.data_len()],
        }))
    }

    /// The next cluster record, its data read into `room` (at least 64
    /// KiB) if given, else into the record buffer; `None` at the end.
    fn step(&mut self, room: Option<&mut [u8]>) -> Result<Option<(u8, u32, BlockMask)>, Error> {
        if self.failed {
            return Err(Error::damaged(
                Some(Location::End),
                "cluster stream failed earlier",
            ));
        }
        if self.done {
            return Ok(None);
        }
        match self.read_record(room) {
            Ok(Some(cluster)) => Ok(Some(cluster)),
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

    /// Reads one record; a cluster leaves its data at the start of `room`
    /// if given, else of `body`.
    fn read_record(
        &mut self,
        room: Option<&mut [u8]>,
    ) -> Result<Option<(u8, u32, BlockMask)>, Error> {
        let loc = Location::Record {
            index: self.records,
            offset: self.pos,
        };
        let damaged = |msg: String| Error::damaged(Some(loc), msg);
        let mut head = [0u8; RECORD_HEADER_SIZE];
        // Nothing read ahead: a large body may follow.
        let got = self
            .inner
            .fill(&mut head, 0, 0)
            .map_err(|e| read_error(loc, e))?;
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
        let body = match room {
            Some(room) if kind == RECORD_CLUSTER => &mut room[..len],
            _ => &mut self.body[..len],
        };
        // The body straight into its place, its checksum (and what
        // follows, see `input`) read ahead in the same call.
        let room = if len >= LARGE_BODY {
            AHEAD_AFTER_LARGE
        } else {
            AHEAD
        };
        let got = self
            .inner
            .fill(body, stored.len(), room)
            .map_err(|e| read_error(loc, e))?;
        let got_crc = if got == len {
            self.inner
                .fill(&mut stored, 0, 0)
                .map_err(|e| read_error(loc, e))?
        } else {
            0
        };
        if got < len || got_crc < 4 {
            return Err(damaged(truncated(
                RECORD_HEADER_SIZE + got + got_crc,
                self.records,
            )));
        }
        // The body hashed alone and combined with the header's CRC: the
        // same record checksum, and the body's own CRC for the writer.
        let mut body_crc = crc32fast::Hasher::new();
        body_crc.update(body);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&head);
        crc.combine(&body_crc);
        if crc.finalize() != u32::from_be_bytes(stored) {
            return Err(damaged("record checksum mismatch".into()));
        }
        self.body_crc = body_crc.finalize();
        self.pos += (RECORD_HEADER_SIZE + len + 4) as u64;
        self.records += 1;
        match kind {
            RECORD_CLUSTER => self.check_cluster(loc, a, b, c, len),
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
                self.check_end(loc, a, b, c, len)?;
                let mut byte = [0u8; 1];
                let more = self
                    .inner
                    .fill(&mut byte, 0, 0)
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

    /// Checks a cluster record's header (its body has been read): the
    /// device, the length its mask says, the device rule.
    fn check_cluster(
        &mut self,
        loc: Location,
        dev_id: u8,
        mask: u16,
        n: u32,
        len: usize,
    ) -> Result<Option<(u8, u32, BlockMask)>, Error> {
        let damaged = |msg: String| Error::damaged(Some(loc), msg);
        let mask = BlockMask(mask);
        let count = self.devices.len();
        let dev = match dev_id.checked_sub(1).map(usize::from) {
            Some(i) if i < count => &self.devices[i],
            _ => {
                return Err(damaged(format!(
                    "device id {dev_id} out of range (the stream has {count} devices)"
                )))
            }
        };
        if len != mask.data_len() {
            return Err(damaged(format!(
                "mask/length mismatch: cluster record with mask {:#06x} ({} blocks) has {len} data bytes",
                mask.0,
                mask.count()
            )));
        }
        match self
            .state
            .check(dev_id, n as u64, Some(mask), CheckRules::default())
        {
            Ok(_) => {}
            Err(Refusal::OutOfOrder { expected }) => {
                return Err(damaged(format!(
                    "vmstate cluster {n} out of order (expected {expected})"
                )))
            }
            Err(Refusal::PastEnd { clusters }) => {
                return Err(damaged(format!(
                    "cluster {n} is past the end of {} ({clusters} clusters)",
                    dev.name
                )))
            }
            Err(Refusal::MaskPastEnd) => {
                return Err(damaged(format!(
                    "cluster {n} of {}: mask {:#06x} names blocks past the end of the device",
                    dev.name, mask.0
                )))
            }
            Err(Refusal::Duplicate) => {
                return Err(damaged(format!("duplicate cluster {n} of {}", dev.name)))
            }
            Err(Refusal::Undeclared) => unreachable!("ids 1..=count are declared"),
        }
        self.state.record(dev_id, n as u64);
        Ok(Some((dev_id, n, mask)))
    }

    /// Checks the end record: its counts against what came, and (for a
    /// full backup) that every cluster came.
    fn check_end(
        &mut self,
        loc: Location,
        reserved: u8,
        count: u16,
        reserved2: u32,
        len: usize,
    ) -> Result<(), Error> {
        let damaged = |msg: String| Error::damaged(Some(loc), msg);
        if reserved != 0 || reserved2 != 0 {
            return Err(damaged("end record: reserved fields are not zero".into()));
        }
        if count as usize != self.devices.len() || len != 8 * self.devices.len() {
            return Err(damaged(format!(
                "end record: counts for {count} devices in {len} bytes, the stream has {} devices",
                self.devices.len()
            )));
        }
        for (i, (dev, (_, st))) in self.devices.iter().zip(self.state.declared()).enumerate() {
            let declared = u64::from_be_bytes(self.body[8 * i..8 * i + 8].try_into().expect("8"));
            if declared != st.accepted() {
                return Err(damaged(format!(
                    "end record: device {}: {declared} records declared, {} received",
                    dev.name,
                    st.accepted()
                )));
            }
        }
        if self.is_incremental() {
            return Ok(());
        }
        for (dev, (_, st)) in self.devices.iter().zip(self.state.declared()) {
            if let Some(first) = st.first_missing() {
                return Err(damaged(format!(
                    "device {}: cluster {first} missing ({} of {} clusters missing)",
                    dev.name,
                    st.seen().missing_count(),
                    st.clusters()
                )));
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

impl<R: Read> crate::source::ClusterSource for StreamReader<R> {
    type Error = Error;

    fn devices(&self) -> Vec<StreamDevice> {
        self.devices.clone()
    }

    /// Each cluster record as it comes, its data read straight into the
    /// writer's extent buffer; `None` after the end record and every
    /// end-of-stream check.
    fn next_piece<'a>(
        &'a mut self,
        room: &mut crate::source::RawRoom<'_>,
    ) -> Result<Option<crate::source::Piece<'a>>, Error> {
        Ok(self
            .step(Some(room.clusters(1)))?
            .map(|(dev_id, cluster_num, mask)| crate::source::Piece::Packed {
                dev_id,
                cluster_num,
                mask,
                data_crc: Some(self.body_crc),
            }))
    }
}
