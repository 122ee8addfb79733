//! Text as the tracker holds it: UTF-8 bytes, never `str`. Decimal and hex digits, UUIDs, and
//! the collector's rule for ids, without `core::fmt`.
//!
//! Every text comes from the loader, which encodes it (`TextEncoder`, cut at a character
//! boundary), from localStorage, where the tracker put it, or from here. So the tracker never
//! validates UTF-8, and `format!` and friends, which would pull the formatting machinery
//! (about 5 KB gzip) into the shipped wasm, are not needed.

use alloc::vec::Vec;

/// The longest id (user, anonymous, product, order) the collector accepts, in bytes.
pub const MAX_ID_BYTES: usize = 256;

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Appends `n` in decimal.
pub fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0; 20];
    let mut start = digits.len();
    // Iterators, not indexes: no bounds check, so no panic path (which would bring
    // `core::fmt` along to format the index).
    for d in digits.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
        start -= 1;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(digits.get(start..).unwrap_or_default());
}

/// Appends `bytes` as lowercase hex.
pub fn push_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    for &b in bytes {
        out.extend_from_slice(&[HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
    }
}

/// `b` in a buffer of its own. Every buffer of the tracker grows by `extend_from_slice` (or
/// `resize` with zeros), never `to_vec`, `push`, `with_capacity` or `vec!`: each of those is
/// its own allocation code in the wasm.
pub fn copied(b: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(b);
    v
}

/// A random (version 4) UUID in its usual 36-character form, from 16 random bytes.
pub fn uuid(mut b: [u8; 16]) -> Vec<u8> {
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut s = Vec::new();
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.extend_from_slice(b"-");
        }
        push_hex(&mut s, &[*byte]);
    }
    s
}

/// Whether the collector accepts `s` as an id: 1 to 256 bytes without `{`, `}` or control
/// characters (C0, DEL, and C1, which UTF-8 writes as `C2 80` to `C2 9F`).
pub fn is_id(s: &[u8]) -> bool {
    let mut prev = 0;
    !s.is_empty()
        && s.len() <= MAX_ID_BYTES
        && s.iter().all(|&b| {
            let ok =
                b >= 0x20 && b != 0x7f && b != b'{' && b != b'}' && !(prev == 0xc2 && b < 0xa0);
            prev = b;
            ok
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decimal(n: u64) -> Vec<u8> {
        let mut v = b"x".to_vec();
        push_u64(&mut v, n);
        v
    }

    #[test]
    fn decimals_are_written() {
        assert_eq!(decimal(0), b"x0");
        assert_eq!(decimal(42), b"x42");
        assert_eq!(decimal(u64::MAX), b"x18446744073709551615");
    }

    #[test]
    fn uuid_has_version_and_variant_bits() {
        assert_eq!(uuid([0xff; 16]), b"ffffffff-ffff-4fff-bfff-ffffffffffff");
        assert_eq!(uuid([0; 16]), b"00000000-0000-4000-8000-000000000000");
    }

    #[test]
    fn ids_follow_the_collector_rules() {
        assert!(is_id(b"u-1"));
        assert!(is_id("é€".as_bytes()));
        assert!(!is_id(b""));
        assert!(!is_id(b"a{b}"));
        assert!(!is_id(b"a\x1fb"));
        assert!(!is_id(b"a\x7fb"));
        assert!(!is_id("a\u{85}b".as_bytes()));
        assert!(is_id("a\u{a0}b".as_bytes()));
        assert!(!is_id("é".repeat(129).as_bytes()));
        assert!(is_id("é".repeat(128).as_bytes()));
    }
}
