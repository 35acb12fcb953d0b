//! Disk images that are not raw: found by their magic number and refused,
//! where a tool takes a file or block device as raw bytes (`vma-encode`'s
//! sources, `cbw-tap serve`'s exports).
//!
//! Archiving a qcow2 file as if it were a disk stores its container bytes:
//! the restore then yields a "disk" holding a qcow2 file, which is not what
//! anyone backed up. The formats QEMU can read and that start with a magic
//! number are recognised, as QEMU's own probes recognise them:
//!
//! | format | how |
//! |---|---|
//! | qcow2 (and qcow v1) | `QFI\xfb` at 0 (version at 4) |
//! | QED | `QED\0` at 0 |
//! | VMDK | `KDMV` or `COWD` at 0, or a descriptor file (`# Disk DescriptorFile`) |
//! | VHDX | `vhdxfile` at 0 |
//! | VDI | `0xbeda107f` (little-endian) at 0x40 |
//! | VHD (vpc, dynamic) | `conectix` at 0 |
//!
//! A raw disk whose first sector happens to (or was made to, by its guest)
//! start with such bytes is refused as well; that is why `vma-encode` has
//! `--assume-raw`.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::{exit, Failure};

/// Bytes to read from the start of an image to recognise it.
pub const PROBE_SIZE: usize = 512;

/// A recognised image format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    /// QEMU's qcow (version 1).
    Qcow,
    /// QEMU's qcow2 (versions 2 and 3).
    Qcow2,
    /// QEMU's QED.
    Qed,
    /// VMware's VMDK (sparse extent or descriptor).
    Vmdk,
    /// Microsoft's VHDX.
    Vhdx,
    /// VirtualBox's VDI.
    Vdi,
    /// Microsoft's VHD, dynamic or differencing (QEMU's `vpc`).
    Vpc,
}

impl ImageFormat {
    /// The name `qemu-img` uses for it (`-f NAME`).
    pub fn qemu_name(self) -> &'static str {
        match self {
            ImageFormat::Qcow => "qcow",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Qed => "qed",
            ImageFormat::Vmdk => "vmdk",
            ImageFormat::Vhdx => "vhdx",
            ImageFormat::Vdi => "vdi",
            ImageFormat::Vpc => "vpc",
        }
    }
}

/// The format `head` (the first bytes of a file, up to [`PROBE_SIZE`])
/// announces, if any.
pub fn detect(head: &[u8]) -> Option<ImageFormat> {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    if at(0, b"QFI\xfb") {
        let version = head
            .get(4..8)
            .map(|v| u32::from_be_bytes(v.try_into().unwrap()));
        return Some(if version == Some(1) {
            ImageFormat::Qcow
        } else {
            ImageFormat::Qcow2
        });
    }
    if at(0, b"QED\0") {
        return Some(ImageFormat::Qed);
    }
    if at(0, b"KDMV") || at(0, b"COWD") || at(0, b"# Disk DescriptorFile") {
        return Some(ImageFormat::Vmdk);
    }
    if at(0, b"vhdxfile") {
        return Some(ImageFormat::Vhdx);
    }
    if at(0x40, &0xbeda107fu32.to_le_bytes()) {
        return Some(ImageFormat::Vdi);
    }
    if at(0, b"conectix") {
        return Some(ImageFormat::Vpc);
    }
    None
}

/// Reads the start of `file` and refuses it if it is an image of a known
/// format: a usage error (exit 2) naming `shown` (the path for messages),
/// the format, and how to get the disk raw. `more` is appended to the
/// message (e.g. a flag that overrides the check), if not empty. A file
/// that cannot be read here is let through: reading it later reports the
/// error.
pub fn refuse_images(shown: &str, file: &File, more: &str) -> Result<(), Failure> {
    let mut head = [0u8; PROBE_SIZE];
    let mut got = 0;
    while got < head.len() {
        match file.read_at(&mut head[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Ok(()),
        }
    }
    match detect(&head[..got]) {
        None => Ok(()),
        Some(f) => {
            let name = f.qemu_name();
            Err(Failure::new(
                exit::USAGE,
                format!(
                    "{shown}: is a {name} image, not a raw disk: convert it (qemu-img convert -f {name} -O raw {shown} DISK.raw) or attach it raw (qemu-nbd -c /dev/nbd0 -f {name} {shown}){more}"
                ),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn magic_numbers() {
        assert_eq!(detect(b"QFI\xfb\0\0\0\x03rest"), Some(ImageFormat::Qcow2));
        assert_eq!(detect(b"QFI\xfb\0\0\0\x01"), Some(ImageFormat::Qcow));
        assert_eq!(detect(b"QED\0...."), Some(ImageFormat::Qed));
        assert_eq!(detect(b"KDMV\x01\0\0\0"), Some(ImageFormat::Vmdk));
        assert_eq!(
            detect(b"# Disk DescriptorFile\nversion=1\n"),
            Some(ImageFormat::Vmdk)
        );
        assert_eq!(detect(b"vhdxfile"), Some(ImageFormat::Vhdx));
        assert_eq!(detect(b"conectix\0\0\0\x02"), Some(ImageFormat::Vpc));
        let mut vdi = [0u8; 512];
        vdi[0x40..0x44].copy_from_slice(&[0x7f, 0x10, 0xda, 0xbe]);
        assert_eq!(detect(&vdi), Some(ImageFormat::Vdi));
        assert_eq!(detect(&[0u8; 512]), None);
        assert_eq!(detect(b"QFI"), None);
        assert_eq!(detect(b""), None);
        // A DOS partition table, an ext4 superblock region: raw.
        let mut mbr = [0u8; 512];
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        assert_eq!(detect(&mbr), None);
    }

    /// Images made by qemu-img itself (when it is installed, as in CI).
    #[test]
    fn images_made_by_qemu_img() {
        let dir = tempfile::tempdir().unwrap();
        for (fmt, expect) in [
            ("qcow2", Some(ImageFormat::Qcow2)),
            ("qed", Some(ImageFormat::Qed)),
            ("vmdk", Some(ImageFormat::Vmdk)),
            ("vhdx", Some(ImageFormat::Vhdx)),
            ("vdi", Some(ImageFormat::Vdi)),
            ("vpc", Some(ImageFormat::Vpc)),
            ("raw", None),
        ] {
            let path = dir.path().join(format!("img.{fmt}"));
            let made = Command::new("qemu-img")
                .args(["create", "-q", "-f", fmt])
                .arg(&path)
                .arg("1M")
                .status();
            let Ok(status) = made else {
                eprintln!("qemu-img not installed: skipping");
                return;
            };
            assert!(status.success(), "qemu-img create -f {fmt}");
            let file = File::open(&path).unwrap();
            let shown = path.display().to_string();
            let res = refuse_images(&shown, &file, "");
            let Some(expect) = expect else {
                assert!(res.is_ok());
                continue;
            };
            let f = res.unwrap_err();
            assert_eq!(f.code, 2);
            let name = expect.qemu_name();
            assert_eq!(
                f.message,
                format!("{shown}: is a {name} image, not a raw disk: convert it (qemu-img convert -f {name} -O raw {shown} DISK.raw) or attach it raw (qemu-nbd -c /dev/nbd0 -f {name} {shown})")
            );
        }
    }
}
