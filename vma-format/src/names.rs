//! Names from archives become file names: check them first.
//!
//! Proxmox's `vma extract` builds paths from config and device names without
//! a check, so an archive naming a config `../../etc/cron.d/x` writes there.
//! Like the `tar` crate's `unpack`, we refuse such names.
//!
//! Names also reach terminals and parsers as text (`vma-decode list`, whose
//! `DEV:` lines qmrestore parses; `vma-verify -v`; error messages): there a
//! newline would forge a line and an escape sequence would drive the
//! terminal, so [`escape`] makes them inert first.

/// Checks that `name` (as stored, without its terminating NUL) is safe to
/// use as one file name inside an output directory, and returns it as text.
/// The reason quotes the name as Rust's `{:?}` does, which escapes control,
/// bidirectional and separator characters (`\n`, `\u{202e}`).
///
/// Refused, with the reason: the empty name, `.` and `..`, any `/`, NUL or
/// other control character (C0 below 0x20, DEL 0x7f, C1 U+0080–U+009F),
/// bidirectional controls and line or paragraph separators (see
/// [`is_deceptive`]: U+202E would show `exe.txt` for `txt.exe`), and bytes
/// that are not UTF-8.
pub fn check_file_name(name: &[u8]) -> Result<&str, NameProblem> {
    let text = std::str::from_utf8(name).map_err(|_| NameProblem::NotUtf8)?;
    let owned = || text.to_string();
    if text.is_empty() {
        return Err(NameProblem::Empty);
    }
    if text == "." || text == ".." {
        return Err(NameProblem::DirectoryReference(owned()));
    }
    if text.contains('/') {
        return Err(NameProblem::Slash(owned()));
    }
    if text.contains('\0') {
        return Err(NameProblem::Nul(owned()));
    }
    if text.chars().any(|c| c.is_control()) {
        return Err(NameProblem::Control(owned()));
    }
    if text.chars().any(is_deceptive) {
        return Err(NameProblem::Deceptive(owned()));
    }
    Ok(text)
}

/// Why a name cannot be one file name ([`check_file_name`]); the message
/// quotes the name as Rust's `{:?}` does.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameProblem {
    /// Not UTF-8.
    #[error("name is not UTF-8")]
    NotUtf8,
    /// Empty.
    #[error("name is empty")]
    Empty,
    /// `.` or `..`.
    #[error("name {0:?} is a directory reference")]
    DirectoryReference(String),
    /// Holds a `/`.
    #[error("name {0:?} contains '/'")]
    Slash(String),
    /// Holds a NUL.
    #[error("name {0:?} contains NUL")]
    Nul(String),
    /// Holds another control character.
    #[error("name {0:?} contains a control character")]
    Control(String),
    /// Holds a character [`is_deceptive`] names.
    #[error("name {0:?} contains a bidirectional control or line separator")]
    Deceptive(String),
}

/// Characters that reorder or break the text around them although they are
/// not control characters (Unicode category Cf / Zl / Zp): the bidirectional
/// marks, embeddings, overrides and isolates U+061C, U+200E, U+200F,
/// U+202A–U+202E, U+2066–U+2069, and the separators U+2028, U+2029.
pub fn is_deceptive(c: char) -> bool {
    matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{2028}' | '\u{2029}')
}

/// A name from an archive (as stored, up to its NUL) as inert text, for
/// listings, reports and messages:
///
/// * printable ASCII is kept, but `\` becomes `\\`;
/// * every byte of a control character (C0 0x00–0x1f, DEL 0x7f, C1
///   U+0080–U+009F), of a character [`is_deceptive`] names, and every byte
///   that is not part of valid UTF-8 becomes `\xNN` (two lower-case hex
///   digits): a newline is `\x0a`, ESC `\x1b`, U+202E `\xe2\x80\xae`;
/// * any other UTF-8 character is kept as it is.
///
/// Names without such characters (all that Proxmox writes) come out
/// unchanged, so `list` prints them exactly as Proxmox's `vma list` does; a
/// name that is escaped never equals the raw name of another device.
pub fn escape(name: &[u8]) -> String {
    let mut out = String::with_capacity(name.len());
    let hex = |out: &mut String, bytes: &[u8]| {
        for b in bytes {
            out.push_str(&format!("\\x{b:02x}"));
        }
    };
    for chunk in name.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\\' {
                out.push_str("\\\\");
            } else if c.is_control() || is_deceptive(c) {
                let mut buf = [0u8; 4];
                hex(&mut out, c.encode_utf8(&mut buf).as_bytes());
            } else {
                out.push(c);
            }
        }
        hex(&mut out, chunk.invalid());
    }
    out
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
            "a\u{202e}txt.exe".as_bytes(),
            "a\u{2066}b".as_bytes(),
            "a\u{2028}b".as_bytes(),
            "\u{85}".as_bytes(),
        ] {
            assert!(check_file_name(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            check_file_name(b"..").unwrap_err().to_string(),
            "name \"..\" is a directory reference"
        );
        assert_eq!(
            check_file_name("evil\u{202e}fdp.exe".as_bytes())
                .unwrap_err()
                .to_string(),
            "name \"evil\\u{202e}fdp.exe\" contains a bidirectional control or line separator"
        );
        assert_eq!(
            check_file_name(b"a\nb").unwrap_err().to_string(),
            "name \"a\\nb\" contains a control character"
        );
    }

    #[test]
    fn escapes_what_could_forge_lines_or_drive_terminals() {
        assert_eq!(escape(b"drive-scsi0"), "drive-scsi0");
        assert_eq!(escape("Ümlaut ✓".as_bytes()), "Ümlaut ✓");
        assert_eq!(
            escape(b"x\nDEV: dev_id=9 size: 1 devname: evil"),
            "x\\x0aDEV: dev_id=9 size: 1 devname: evil"
        );
        assert_eq!(escape(b"\x1b[2J\x07"), "\\x1b[2J\\x07");
        assert_eq!(escape(b"a\\b"), "a\\\\b");
        assert_eq!(escape(b"\xff\xfe ok"), "\\xff\\xfe ok");
        assert_eq!(escape("a\u{202e}b".as_bytes()), "a\\xe2\\x80\\xaeb");
        assert_eq!(escape("\u{9b}31m".as_bytes()), "\\xc2\\x9b31m");
        assert_eq!(escape(b"\x7f\r\t"), "\\x7f\\x0d\\x09");
    }
}
