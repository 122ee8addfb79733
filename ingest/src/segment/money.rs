//! Segment's decimal amounts (`price: 19.99`) to minor currency units (`1999`), exactly.
//!
//! The amount is read from its decimal text (a JSON number as written, or a numeric
//! string), never through a binary float: `19.99` is `1999`, not `1998`. Decimals beyond
//! the currency's minor unit are rounded half away from zero on that text (`19.995` USD is
//! `2000`, `-0.125` is `-13`).

/// ISO 4217 currencies without minor units: amounts are whole units.
const NO_MINOR_UNITS: [&str; 17] = [
    "BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX", "UYI", "VND",
    "VUV", "XAF", "XOF", "XPF",
];

/// ISO 4217 currencies with three decimal places.
const THREE_DECIMALS: [&str; 7] = ["BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"];

/// The most digits an amount in minor units may have: every 18-digit number fits an `i64`.
const MAX_DIGITS: usize = 18;

/// The decimal places of `currency`'s minor unit (case-insensitive): 0 for currencies
/// without minor units (JPY, KRW, ...), 3 for BHD, IQD, JOD, KWD, LYD, OMR and TND, and 2
/// for every other currency and when none is given.
pub fn minor_digits(currency: Option<&str>) -> u32 {
    let Some(c) = currency.map(str::trim) else {
        return 2;
    };
    if NO_MINOR_UNITS.iter().any(|n| n.eq_ignore_ascii_case(c)) {
        0
    } else if THREE_DECIMALS.iter().any(|n| n.eq_ignore_ascii_case(c)) {
        3
    } else {
        2
    }
}

/// The amount written as `text` (`19.99`, `-5`, `1.5e2`, `"19.99"`) in minor units with
/// `digits` decimal places, rounded half away from zero beyond them.
///
/// # Errors
/// A text that is not a decimal number, or an amount of more than 18 digits in minor units.
pub fn to_minor(text: &str, digits: u32) -> Result<i64, String> {
    let not_a_number = || format!("{text:?} is not a decimal amount such as 19.99");
    let s = text.trim();
    let (negative, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let (mantissa, exponent) = match s.find(['e', 'E']) {
        Some(at) => {
            let e: i64 = s[at + 1..].parse().map_err(|_| not_a_number())?;
            (&s[..at], e)
        }
        None => (s, 0),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let is_digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && fraction.is_empty()) || !is_digits(whole) || !is_digits(fraction) {
        return Err(not_a_number());
    }
    let all: Vec<u8> = whole
        .bytes()
        .chain(fraction.bytes())
        .map(|b| b - b'0')
        .collect();
    // value = all * 10^(exponent - fraction digits); minor = value * 10^digits.
    let shift = exponent
        .saturating_sub(fraction.len() as i64)
        .saturating_add(i64::from(digits));
    let first = all.iter().position(|d| *d != 0).unwrap_or(all.len());
    let significant = &all[first..];
    if significant.is_empty() {
        return Ok(0);
    }
    let too_large = || format!("{text:?} is too large, limit {MAX_DIGITS} digits in minor units");
    let (kept, round_up) = if shift >= 0 {
        if significant.len() as i64 + shift > MAX_DIGITS as i64 {
            return Err(too_large());
        }
        let mut kept = significant.to_vec();
        kept.resize(significant.len() + shift as usize, 0);
        (kept, false)
    } else {
        let dropped = shift.unsigned_abs();
        let keep = (significant.len() as u64).saturating_sub(dropped) as usize;
        // The first dropped digit decides; it is an implicit 0 when every digit is dropped
        // and more than them.
        let first_dropped = if dropped as usize <= significant.len() {
            significant[keep]
        } else {
            0
        };
        (significant[..keep].to_vec(), first_dropped >= 5)
    };
    if kept.len() > MAX_DIGITS {
        return Err(too_large());
    }
    let mut minor: i64 = 0;
    for d in kept {
        minor = minor * 10 + i64::from(d);
    }
    if round_up {
        minor += 1;
    }
    Ok(if negative { -minor } else { minor })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_decimals_are_exact_whatever_their_float_value() {
        assert_eq!(to_minor("19.99", 2), Ok(1999));
        assert_eq!(to_minor("0.29", 2), Ok(29));
        assert_eq!(to_minor("1.005", 2), Ok(101));
        assert_eq!(to_minor("4.35", 2), Ok(435));
        assert_eq!(to_minor("10", 2), Ok(1000));
        assert_eq!(to_minor("10.5", 2), Ok(1050));
        assert_eq!(to_minor(".5", 2), Ok(50));
        assert_eq!(to_minor("-3.10", 2), Ok(-310));
        assert_eq!(to_minor(" 7.00 ", 2), Ok(700));
        assert_eq!(to_minor("0", 2), Ok(0));
        assert_eq!(to_minor("0.000", 2), Ok(0));
    }

    #[test]
    fn more_decimals_round_half_away_from_zero() {
        assert_eq!(to_minor("19.995", 2), Ok(2000));
        assert_eq!(to_minor("19.994999", 2), Ok(1999));
        assert_eq!(to_minor("0.125", 2), Ok(13));
        assert_eq!(to_minor("-0.125", 2), Ok(-13));
        assert_eq!(to_minor("0.004", 2), Ok(0));
        assert_eq!(to_minor("0.0001", 2), Ok(0));
        assert_eq!(to_minor("0.005", 2), Ok(1));
    }

    #[test]
    fn exponents_and_currencies_without_minor_units() {
        assert_eq!(to_minor("1.5e2", 2), Ok(15000));
        assert_eq!(to_minor("1E-2", 2), Ok(1));
        assert_eq!(to_minor("5e-3", 2), Ok(1));
        assert_eq!(to_minor("1e-400", 2), Ok(0));
        assert_eq!(to_minor("1500", minor_digits(Some("JPY"))), Ok(1500));
        assert_eq!(to_minor("1500.5", minor_digits(Some("jpy"))), Ok(1501));
        assert_eq!(to_minor("1.234", minor_digits(Some("KWD"))), Ok(1234));
        assert_eq!(minor_digits(None), 2);
        assert_eq!(minor_digits(Some("EUR")), 2);
    }

    #[test]
    fn what_is_not_an_amount_or_too_large_is_refused() {
        for bad in [
            "", "-", ".", "abc", "1,5", "1.2.3", "1e", "0x10", "NaN", "1 000",
        ] {
            assert!(to_minor(bad, 2).is_err(), "{bad:?}");
        }
        assert_eq!(
            to_minor("9999999999999999.99", 2),
            Ok(999_999_999_999_999_999)
        );
        assert_eq!(
            to_minor("99999999999999999.99", 2),
            Err("\"99999999999999999.99\" is too large, limit 18 digits in minor units".into())
        );
        assert!(to_minor("1e300", 2).is_err());
    }
}
