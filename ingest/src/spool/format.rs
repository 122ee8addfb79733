//! The spool's bytes: segment headers, record headers and the payload of a spooled batch.
//! Pure functions, no I/O; the writer and the reader decide what to do with a bad check.
//!
//! All integers are little-endian. Version 1:
//!
//! ```text
//! segment header, 32 bytes:
//!   0  magic "INGSPOOL"   8  version u16 = 1   10  reserved u16 = 0
//!   12 sequence u64       20 salt u64          28  crc32c of bytes 0..28
//! record, 20-byte header then the payload:
//!   0  magic C7 'S' 'P' 'R'   4  version u16 = 1   6  flags u16 = 0
//!   8  payload length u32     12 crc32c of the payload
//!   16 crc32c of (salt, bytes 0..16)
//! payload, version 1:
//!   0  received-at, Unix seconds i64       8  nanoseconds u32
//!   12 decode limits, 7 x u64: max_bytes, max_events, max_string_bytes, max_url_bytes,
//!      max_properties, max_items, max_depth
//!   68 write key length u32, then the write key (UTF-8)
//!   .. the request body, to the end of the payload
//! ```
//!
//! The salt is random per process that writes the segment. A request body is chosen by
//! the client, so it could contain bytes that look like a record; mixing the salt into
//! each record header's checksum keeps such bytes from passing for a record when the
//! reader searches for the next record after a damaged one.

use axum::body::Bytes;
use time::OffsetDateTime;

use super::SpooledBatch;

/// Identifies a segment file.
pub(super) const SEGMENT_MAGIC: [u8; 8] = *b"INGSPOOL";
/// The segment header layout this build writes and reads.
pub(super) const SEGMENT_VERSION: u16 = 1;
/// Bytes of a segment header.
pub(super) const SEGMENT_HEADER_LEN: u64 = 32;

/// Starts every record. The first byte is not ASCII so that text rarely looks like it.
pub(super) const RECORD_MAGIC: [u8; 4] = [0xC7, b'S', b'P', b'R'];
/// The payload layout this build writes and reads.
pub(super) const RECORD_VERSION: u16 = 1;
/// Bytes of a record header.
pub(super) const RECORD_HEADER_LEN: u64 = 20;
/// Bytes of a version 1 payload before the write key.
pub(super) const PAYLOAD_FIXED_LEN: u64 = 72;

/// A segment's header, as read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SegmentHeader {
    /// The segment's sequence number, also in its file name.
    pub(super) sequence: u64,
    /// The checksum seed derived from the segment's salt ([`salt_seed`]).
    pub(super) seed: u32,
}

/// The checksum seed of record headers written with `salt`.
pub(super) fn salt_seed(salt: u64) -> u32 {
    crc32c::crc32c(&salt.to_le_bytes())
}

/// The header of segment `sequence`, written by a process whose salt is `salt`.
pub(super) fn encode_segment_header(sequence: u64, salt: u64) -> [u8; SEGMENT_HEADER_LEN as usize] {
    let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..10].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
    h[12..20].copy_from_slice(&sequence.to_le_bytes());
    h[20..28].copy_from_slice(&salt.to_le_bytes());
    let crc = crc32c::crc32c(&h[0..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Reads a segment header.
///
/// # Errors
/// What is wrong with it, for the log.
pub(super) fn decode_segment_header(h: &[u8]) -> Result<SegmentHeader, String> {
    if h.len() < SEGMENT_HEADER_LEN as usize {
        return Err(format!(
            "segment header is {} bytes, needs {SEGMENT_HEADER_LEN}",
            h.len()
        ));
    }
    if h[0..8] != SEGMENT_MAGIC {
        return Err("not a spool segment (bad magic)".into());
    }
    let crc = u32_at(h, 28);
    if crc32c::crc32c(&h[0..28]) != crc {
        return Err("segment header checksum mismatch".into());
    }
    let version = u16_at(h, 8);
    if version != SEGMENT_VERSION {
        return Err(format!(
            "segment version {version} is not supported, this build reads {SEGMENT_VERSION}"
        ));
    }
    Ok(SegmentHeader {
        sequence: u64_at(h, 12),
        seed: salt_seed(u64_at(h, 20)),
    })
}

/// A record header whose checksum matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RecordHeader {
    /// The payload layout.
    pub(super) version: u16,
    /// Reserved, 0 in version 1.
    pub(super) flags: u16,
    /// Payload bytes.
    pub(super) len: u32,
    /// crc32c of the payload.
    pub(super) payload_crc: u32,
}

impl RecordHeader {
    /// Whether this build can decode the payload.
    pub(super) fn supported(&self) -> bool {
        self.version == RECORD_VERSION && self.flags == 0
    }
}

/// Reads a record header of a segment whose checksum seed is `seed`; `None` when the
/// magic or the checksum does not match (damaged, or not a record start).
pub(super) fn decode_record_header(h: &[u8], seed: u32) -> Option<RecordHeader> {
    if h.len() < RECORD_HEADER_LEN as usize || h[0..4] != RECORD_MAGIC {
        return None;
    }
    if crc32c::crc32c_append(seed, &h[0..16]) != u32_at(h, 16) {
        return None;
    }
    Some(RecordHeader {
        version: u16_at(h, 4),
        flags: u16_at(h, 6),
        len: u32_at(h, 8),
        payload_crc: u32_at(h, 12),
    })
}

/// Bytes of the record that [`encode_record`] makes for `batch`.
pub(super) fn record_len(batch: &SpooledBatch) -> u64 {
    RECORD_HEADER_LEN + PAYLOAD_FIXED_LEN + batch.write_key.len() as u64 + batch.body.len() as u64
}

/// The record (header and payload) for `batch`, in a segment whose checksum seed is `seed`.
/// The caller has checked that [`record_len`] fits a segment (so the payload length fits
/// a `u32`).
pub(super) fn encode_record(batch: &SpooledBatch, seed: u32) -> Vec<u8> {
    let total = record_len(batch);
    let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    out.extend_from_slice(&[0u8; RECORD_HEADER_LEN as usize]);
    let at = batch.received_at.to_offset(time::UtcOffset::UTC);
    out.extend_from_slice(&at.unix_timestamp().to_le_bytes());
    out.extend_from_slice(&at.nanosecond().to_le_bytes());
    let l = &batch.limits;
    for v in [
        l.max_bytes,
        l.max_events,
        l.max_string_bytes,
        l.max_url_bytes,
        l.max_properties,
        l.max_items,
        l.max_depth,
    ] {
        out.extend_from_slice(&(v as u64).to_le_bytes());
    }
    out.extend_from_slice(&(batch.write_key.len() as u32).to_le_bytes());
    out.extend_from_slice(batch.write_key.as_bytes());
    out.extend_from_slice(&batch.body);
    let payload_len = (out.len() - RECORD_HEADER_LEN as usize) as u32;
    let payload_crc = crc32c::crc32c(&out[RECORD_HEADER_LEN as usize..]);
    out[0..4].copy_from_slice(&RECORD_MAGIC);
    out[4..6].copy_from_slice(&RECORD_VERSION.to_le_bytes());
    out[8..12].copy_from_slice(&payload_len.to_le_bytes());
    out[12..16].copy_from_slice(&payload_crc.to_le_bytes());
    let header_crc = crc32c::crc32c_append(seed, &out[0..16]);
    out[16..20].copy_from_slice(&header_crc.to_le_bytes());
    out
}

/// Whether `payload` matches the checksum of its header.
pub(super) fn payload_matches(header: &RecordHeader, payload: &[u8]) -> bool {
    payload.len() as u64 == u64::from(header.len) && crc32c::crc32c(payload) == header.payload_crc
}

/// Decodes a version 1 payload whose checksum matched.
///
/// # Errors
/// What is wrong with it: only a bug in the writer (or a checksum collision) gets here.
pub(super) fn decode_payload(payload: &[u8]) -> Result<SpooledBatch, String> {
    let fixed = PAYLOAD_FIXED_LEN as usize;
    if payload.len() < fixed {
        return Err(format!(
            "payload is {} bytes, a version 1 payload has at least {fixed}",
            payload.len()
        ));
    }
    let seconds = i64::from_le_bytes(array(payload, 0));
    let nanos = u32_at(payload, 8);
    let received_at = OffsetDateTime::from_unix_timestamp(seconds)
        .ok()
        .and_then(|t| t.replace_nanosecond(nanos).ok())
        .ok_or_else(|| format!("received-at {seconds} s {nanos} ns is out of range"))?;
    let mut limits = [0usize; 7];
    for (i, slot) in limits.iter_mut().enumerate() {
        let v = u64_at(payload, 12 + 8 * i);
        *slot = usize::try_from(v).map_err(|_| format!("limit {v} does not fit this machine"))?;
    }
    let [
        max_bytes,
        max_events,
        max_string_bytes,
        max_url_bytes,
        max_properties,
        max_items,
        max_depth,
    ] = limits;
    let key_len = u32_at(payload, 68) as usize;
    let rest = &payload[fixed..];
    if key_len > rest.len() {
        return Err(format!(
            "write key of {key_len} bytes is longer than the {} bytes left",
            rest.len()
        ));
    }
    let write_key = std::str::from_utf8(&rest[..key_len])
        .map_err(|_| "write key is not UTF-8".to_string())?
        .to_string();
    Ok(SpooledBatch {
        received_at,
        write_key,
        limits: wire::Limits {
            max_bytes,
            max_events,
            max_string_bytes,
            max_url_bytes,
            max_properties,
            max_items,
            max_depth,
        },
        body: Bytes::copy_from_slice(&rest[key_len..]),
    })
}

fn array<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&b[at..at + N]);
    out
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(array(b, at))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(array(b, at))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(array(b, at))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> SpooledBatch {
        SpooledBatch {
            received_at: time::macros::datetime!(2026-03-01 12:34:56.789_012_345 UTC),
            write_key: "site-key".into(),
            limits: wire::Limits {
                max_bytes: 1,
                max_events: 2,
                max_string_bytes: 3,
                max_url_bytes: 4,
                max_properties: 5,
                max_items: 6,
                max_depth: 7,
            },
            body: Bytes::from_static(b"body bytes"),
        }
    }

    #[test]
    fn record_round_trips_with_its_exact_layout() {
        let seed = salt_seed(42);
        let b = batch();
        let rec = encode_record(&b, seed);
        assert_eq!(rec.len() as u64, record_len(&b));
        assert_eq!(rec.len(), 20 + 72 + 8 + 10);
        assert_eq!(rec[0..4], RECORD_MAGIC);
        assert_eq!(u32_at(&rec, 8), 72 + 8 + 10);
        let header = decode_record_header(&rec[..20], seed).expect("valid header");
        assert!(header.supported());
        assert!(payload_matches(&header, &rec[20..]));
        assert_eq!(decode_payload(&rec[20..]), Ok(b));
    }

    #[test]
    fn record_header_needs_the_segment_salt() {
        let rec = encode_record(&batch(), salt_seed(1));
        assert_eq!(decode_record_header(&rec[..20], salt_seed(2)), None);
        assert!(decode_record_header(&rec[..20], salt_seed(1)).is_some());
    }

    #[test]
    fn every_flipped_header_bit_is_detected() {
        let seed = salt_seed(7);
        let rec = encode_record(&batch(), seed);
        for byte in 0..20 {
            for bit in 0..8 {
                let mut h = rec[..20].to_vec();
                h[byte] ^= 1 << bit;
                assert_eq!(
                    decode_record_header(&h, seed),
                    None,
                    "byte {byte} bit {bit}"
                );
            }
        }
    }

    #[test]
    fn segment_header_round_trips_and_detects_damage() {
        let h = encode_segment_header(9, 1234);
        assert_eq!(
            decode_segment_header(&h),
            Ok(SegmentHeader {
                sequence: 9,
                seed: salt_seed(1234)
            })
        );
        let mut bad = h;
        bad[15] ^= 0x10;
        assert_eq!(
            decode_segment_header(&bad),
            Err("segment header checksum mismatch".into())
        );
        assert_eq!(
            decode_segment_header(&h[..31]),
            Err("segment header is 31 bytes, needs 32".into())
        );
    }
}
