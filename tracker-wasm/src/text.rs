//! Text helpers that do without `core::fmt`: decimal and hex digits, UUIDs, truncation at a
//! character boundary, Latin-1 byte strings for localStorage.
//!
//! `format!` and friends would pull the formatting machinery (about 5 KB gzip) into the
//! shipped wasm, so everything the tracker writes as text goes through these.

use alloc::string::String;
use alloc::vec::Vec;

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Appends `n` in decimal.
pub fn push_u64(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in &digits[i..] {
        out.push(d as char);
    }
}

/// Appends `n` in decimal, with a minus sign when negative.
pub fn push_i64(out: &mut String, n: i64) {
    if n < 0 {
        out.push('-');
    }
    push_u64(out, n.unsigned_abs());
}

/// `n` in decimal.
pub fn decimal(n: i64) -> String {
    let mut s = String::new();
    push_i64(&mut s, n);
    s
}

/// The fields of `s` separated by the ASCII byte `sep` (like `str::split`, but one small
/// loop over bytes instead of the generic pattern machinery; an ASCII separator always sits
/// on a character boundary).
pub struct Fields<'a> {
    rest: Option<&'a str>,
    sep: u8,
}

/// Splits `s` at every `sep` (ASCII).
pub fn fields(s: &str, sep: u8) -> Fields<'_> {
    Fields { rest: Some(s), sep }
}

impl<'a> Iterator for Fields<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let s = self.rest?;
        for (i, &b) in s.as_bytes().iter().enumerate() {
            if b == self.sep {
                self.rest = s.get(i + 1..);
                return s.get(..i);
            }
        }
        self.rest = None;
        Some(s)
    }
}

/// `s` split at its first `sep` (ASCII), like `str::split_once`.
pub fn cut(s: &str, sep: u8) -> Option<(&str, &str)> {
    let mut f = fields(s, sep);
    let head = f.next()?;
    Some((head, f.rest?))
}

/// Parses a non-empty run of ASCII digits (no sign, no spaces).
pub fn parse_u64(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 19 {
        return None;
    }
    let mut n = 0u64;
    for b in s.bytes() {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n * 10 + u64::from(b - b'0');
    }
    Some(n)
}

/// Appends `bytes` as lowercase hex.
pub fn push_hex(out: &mut String, bytes: &[u8]) {
    for &b in bytes {
        out.push(HEX[usize::from(b >> 4)] as char);
        out.push(HEX[usize::from(b & 15)] as char);
    }
}

/// A random (version 4) UUID in its usual 36-character form, from 16 random bytes.
pub fn uuid(mut b: [u8; 16]) -> String {
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut s = String::with_capacity(36);
    for (i, chunk) in [&b[0..4], &b[4..6], &b[6..8], &b[8..10], &b[10..16]]
        .iter()
        .enumerate()
    {
        if i > 0 {
            s.push('-');
        }
        push_hex(&mut s, chunk);
    }
    s
}

/// `s` cut to at most `max` bytes, at a character boundary.
pub fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    // `get`, not indexing: a str index's panic path brings in `core::fmt` (about 4 KB).
    s.get(..end).unwrap_or_default()
}

/// Bytes as a string of the characters U+0000..U+00FF, one per byte: what localStorage
/// (which stores UTF-16 text) can hold without a base64 step.
pub fn to_latin1(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() + bytes.len() / 2);
    for &b in bytes {
        s.push(char::from(b));
    }
    s
}

/// The inverse of [`to_latin1`]; `None` when a character is above U+00FF.
pub fn from_latin1(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len());
    for c in s.chars() {
        out.push(u8::try_from(u32::from(c)).ok()?);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_written_and_read_back() {
        assert_eq!(decimal(0), "0");
        assert_eq!(decimal(-42), "-42");
        assert_eq!(decimal(i64::MIN), "-9223372036854775808");
        assert_eq!(parse_u64("1700000000000"), Some(1_700_000_000_000));
        assert_eq!(parse_u64(""), None);
        assert_eq!(parse_u64("1e3"), None);
        assert_eq!(parse_u64("-1"), None);
    }

    #[test]
    fn uuid_has_version_and_variant_bits() {
        assert_eq!(uuid([0xff; 16]), "ffffffff-ffff-4fff-bfff-ffffffffffff");
        assert_eq!(uuid([0; 16]), "00000000-0000-4000-8000-000000000000");
    }

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(clip("aé", 2), "a");
        assert_eq!(clip("abc", 3), "abc");
        assert_eq!(clip("abc", 0), "");
    }

    #[test]
    fn latin1_round_trips_every_byte() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(from_latin1(&to_latin1(&bytes)), Some(bytes));
        assert_eq!(from_latin1("€"), None);
    }
}
