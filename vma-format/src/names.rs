//! Names from archives become file names: check them first.
//!
//! Proxmox's `vma extract` builds paths from config and device names without
//! a check, so an archive naming a config `../../etc/cron.d/x` writes there.
//! Like the `tar` crate's `unpack`, we refuse such names.

/// Checks that `name` (as stored, without its terminating NUL) is safe to
/// use as one file name inside an output directory, and returns it as text.
///
/// Refused, with the reason: the empty name, `.` and `..`, any `/`, NUL or
/// other control character (below 0x20, and 0x7f), and bytes that are not
/// UTF-8.
pub fn check_file_name(name: &[u8]) -> Result<&str, String> {
    let text = std::str::from_utf8(name).map_err(|_| "name is not UTF-8".to_string())?;
    if text.is_empty() {
        return Err("name is empty".into());
    }
    if text == "." || text == ".." {
        return Err(format!("name {text:?} is a directory reference"));
    }
    if text.contains('/') {
        return Err(format!("name {text:?} contains '/'"));
    }
    if text.contains('\0') {
        return Err(format!("name {text:?} contains NUL"));
    }
    if text.chars().any(|c| c.is_control()) {
        return Err(format!("name {text:?} contains a control character"));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_unsafe_names() {
        assert_eq!(check_file_name(b"qemu-server.conf"), Ok("qemu-server.conf"));
        assert_eq!(check_file_name(b"drive-scsi0"), Ok("drive-scsi0"));
        assert_eq!(check_file_name("Ümlaut".as_bytes()), Ok("Ümlaut"));
        for bad in [
            &b""[..],
            b".",
            b"..",
            b"../x",
            b"a/b",
            b"/etc",
            b"a\0b",
            b"a\nb",
            b"\x7f",
            b"\xff",
        ] {
            assert!(check_file_name(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            check_file_name(b"..").unwrap_err(),
            "name \"..\" is a directory reference"
        );
    }
}
