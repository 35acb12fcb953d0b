//! Byte sizes on the command line: `65536`, `64K`, `64M`, `1G`, `1GiB`.

/// Why a size was refused; the message names the argument.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// No number first.
    #[error("{0:?}: expected a size such as 65536, 64K, 64M or 1G")]
    NotASize(String),
    /// A unit other than K, M, G, T.
    #[error("{0:?}: unknown unit (use K, M, G or T)")]
    UnknownUnit(String),
    /// More than the address space.
    #[error("{0:?}: too large")]
    TooLarge(String),
}

/// Parses a size: a number, optionally followed by `K`, `M`, `G` or `T`
/// (powers of 1024, case-insensitive, optionally followed by `iB` or `B`).
pub fn parse_size(s: &str) -> Result<usize, SizeError> {
    let t = s.trim();
    let digits = t.chars().take_while(|c| c.is_ascii_digit()).count();
    let (num, unit) = t.split_at(digits);
    let n: u64 = num.parse().map_err(|_| SizeError::NotASize(s.into()))?;
    let unit = unit.to_ascii_lowercase();
    let shift = match unit.trim_end_matches("ib").trim_end_matches('b') {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(SizeError::UnknownUnit(s.into())),
    };
    n.checked_mul(1u64 << shift)
        .and_then(|v| usize::try_from(v).ok())
        .ok_or_else(|| SizeError::TooLarge(s.into()))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("2m"), Ok(2 << 20));
        assert_eq!(parse_size("1GB"), Ok(1 << 30));
        assert!(parse_size("").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999999999999T").is_err());
    }
}
