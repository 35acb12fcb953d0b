//! Which backup a cluster stream holds, and which backup an incremental
//! stream applies to: the identity fields of cluster-stream version 2
//! (docs/CLUSTER-STREAM.md), and name-derived archive uuids.
//!
//! A backup is named by the archive it becomes: that archive's uuid and
//! ctime (the backup instant). The uuid alone is not enough once archives
//! get a fixed uuid (`--uuid-from`, so consecutive archives share their
//! extent headers); the instant tells consecutive backups apart.

use md5::{Digest, Md5};

/// Bytes the identity takes in a version-2 preamble.
pub const IDENTITY_SIZE: usize = 16 + 1 + 16 + 8;

/// A backup this stream applies to (an incremental stream's base): the
/// uuid and ctime of the archive that backup produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BaseRef {
    /// The base archive's uuid.
    pub uuid: [u8; 16],
    /// The base archive's ctime (its backup instant).
    pub time: i64,
}

/// What a version-2 stream says about itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackupIdentity {
    /// The uuid the archive of this backup gets (`vma-encode` uses it
    /// unless told otherwise).
    pub uuid: [u8; 16],
    /// `None`: a full backup (every cluster comes). `Some`: incremental,
    /// only clusters changed since `base` come; the others are the base's.
    pub base: Option<BaseRef>,
}

/// Why identity bytes do not decode ([`BackupIdentity::decode`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// Kind 0 (full) with a base uuid or time that is not zero.
    #[error("full backup with a base")]
    FullWithBase,
    /// A kind other than 0 (full) and 1 (incremental).
    #[error("unknown backup kind {0}")]
    UnknownKind(u8),
}

impl BackupIdentity {
    /// The preamble bytes: uuid, kind (0 full, 1 incremental), base uuid,
    /// base time (zero for a full backup).
    pub fn encode(&self) -> [u8; IDENTITY_SIZE] {
        let mut b = [0u8; IDENTITY_SIZE];
        b[..16].copy_from_slice(&self.uuid);
        if let Some(base) = &self.base {
            b[16] = 1;
            b[17..33].copy_from_slice(&base.uuid);
            b[33..41].copy_from_slice(&base.time.to_be_bytes());
        }
        b
    }

    /// Parses [`encode`](Self::encode)'s bytes.
    ///
    /// # Errors
    /// A kind other than 0 and 1, or a full backup (0) whose base uuid or
    /// time is not zero.
    pub fn decode(b: &[u8; IDENTITY_SIZE]) -> Result<BackupIdentity, IdentityError> {
        let uuid: [u8; 16] = b[..16].try_into().expect("16 bytes");
        let base_uuid: [u8; 16] = b[17..33].try_into().expect("16 bytes");
        let time = i64::from_be_bytes(b[33..41].try_into().expect("8 bytes"));
        match b[16] {
            0 if base_uuid == [0; 16] && time == 0 => Ok(BackupIdentity { uuid, base: None }),
            0 => Err(IdentityError::FullWithBase),
            1 => Ok(BackupIdentity {
                uuid,
                base: Some(BaseRef {
                    uuid: base_uuid,
                    time,
                }),
            }),
            k => Err(IdentityError::UnknownKind(k)),
        }
    }
}

/// A uuid derived from `name` alone (an RFC 4122 version-3 uuid: MD5 of
/// a fixed namespace and the name), so every archive made with the same
/// name gets the same uuid (`--uuid-from NAME`).
pub fn uuid_from_name(name: &str) -> [u8; 16] {
    /// Our namespace: the uuid of "vma-tools" in the URL namespace.
    const NAMESPACE: [u8; 16] = [
        0x6b, 0xa7, 0xb8, 0x11, 0x9d, 0xad, 0x11, 0xd1, 0x80, 0xb4, 0x00, 0xc0, 0x4f, 0xd4, 0x30,
        0xc8,
    ];
    let mut h = Md5::new();
    h.update(NAMESPACE);
    h.update(b"vma-tools:");
    h.update(name.as_bytes());
    let mut u: [u8; 16] = h.finalize().into();
    u[6] = (u[6] & 0x0f) | 0x30;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let full = BackupIdentity {
            uuid: [7; 16],
            base: None,
        };
        assert_eq!(BackupIdentity::decode(&full.encode()), Ok(full));
        let inc = BackupIdentity {
            uuid: [7; 16],
            base: Some(BaseRef {
                uuid: [9; 16],
                time: 1_700_000_000,
            }),
        };
        assert_eq!(BackupIdentity::decode(&inc.encode()), Ok(inc));
        let mut bad = inc.encode();
        bad[16] = 2;
        assert_eq!(
            BackupIdentity::decode(&bad),
            Err(IdentityError::UnknownKind(2))
        );
        assert_eq!(
            BackupIdentity::decode(&bad).unwrap_err().to_string(),
            "unknown backup kind 2"
        );
        bad[16] = 0;
        assert_eq!(
            BackupIdentity::decode(&bad),
            Err(IdentityError::FullWithBase)
        );
        assert_eq!(
            BackupIdentity::decode(&bad).unwrap_err().to_string(),
            "full backup with a base"
        );
    }

    #[test]
    fn name_uuid_is_stable_and_distinct() {
        let a = uuid_from_name("vm-100");
        assert_eq!(a, uuid_from_name("vm-100"));
        assert_ne!(a, uuid_from_name("vm-101"));
        assert_eq!(a[6] >> 4, 3);
        assert_eq!(a[8] >> 6, 2);
    }
}
