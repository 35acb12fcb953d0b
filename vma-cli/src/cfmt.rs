//! C's `printf("%.3g")`, as Proxmox's tool prints percentages.

/// Formats `x` like C's `%.3g`: three significant digits, trailing zeros
/// dropped, exponent form below 1e-4 or from 1e3 on.
pub fn g3(x: f64) -> String {
    g(x, 3)
}

/// Formats `x` like C's `%.{precision}g`.
pub fn g(x: f64, precision: usize) -> String {
    if x == 0.0 {
        return if x.is_sign_negative() {
            "-0".into()
        } else {
            "0".into()
        };
    }
    if !x.is_finite() {
        return if x.is_nan() {
            "nan".into()
        } else if x > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        };
    }
    let p = precision.max(1);
    // The exponent after rounding to p significant digits decides the style.
    let sci = format!("{:.*e}", p - 1, x);
    let (mantissa, exp) = sci.split_once('e').expect("exponent form");
    let exp: i32 = exp.parse().expect("exponent");
    if exp < -4 || exp >= p as i32 {
        let mantissa = trim_zeros(mantissa);
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    } else {
        let decimals = (p as i32 - 1 - exp).max(0) as usize;
        trim_zeros(&format!("{x:.decimals$}")).to_string()
    }
}

fn trim_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_c() {
        // Values from Proxmox's own output and C's printf.
        assert_eq!(g3(16.544117647), "16.5");
        assert_eq!(g3(89.625), "89.6");
        assert_eq!(g3(5.7268), "5.73");
        assert_eq!(g3(28.5), "28.5");
        assert_eq!(g3(0.0), "0");
        assert_eq!(g3(100.0), "100");
        assert_eq!(g3(0.207), "0.207");
        assert_eq!(g3(99.96), "100");
        assert_eq!(g3(999.6), "1e+03");
        assert_eq!(g3(0.0001234), "0.000123");
        assert_eq!(g3(0.00001234), "1.23e-05");
        assert_eq!(g3(3.0), "3");
        assert_eq!(g3(2.65), "2.65");
    }
}
