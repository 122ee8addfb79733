//! Sessions: a new session after a period without events (30 minutes by default). The
//! session id is the session's start time in Unix milliseconds, as decimal text: unique per
//! visitor, which is all the profile needs, and readable when debugging.

use alloc::vec::Vec;

use crate::text;

/// The default idle timeout (ms).
pub const DEFAULT_TIMEOUT_MS: f64 = 30.0 * 60.0 * 1000.0;

/// The current session.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Session {
    /// When it started (Unix ms; 0: no session yet).
    pub start: f64,
    /// When the last event happened (Unix ms).
    pub last: f64,
}

impl Session {
    /// Records activity at `now`, starting a new session when none is running or the last
    /// activity is older than `timeout`. Returns whether a new session started.
    pub fn touch(&mut self, now: f64, timeout: f64) -> bool {
        let fresh = self.start == 0.0 || now - self.last > timeout;
        if fresh {
            self.start = now;
        }
        if now > self.last {
            self.last = now;
        }
        fresh
    }

    /// The session id; empty before the first event.
    pub fn id(&self) -> Vec<u8> {
        let mut id = Vec::new();
        if self.start > 0.0 {
            text::push_u64(&mut id, self.start as u64);
        }
        id
    }

    /// The session as stored in localStorage: start and last activity, two little-endian
    /// doubles.
    pub fn encode(&self) -> [u8; 16] {
        let [a, b] = [self.start.to_le_bytes(), self.last.to_le_bytes()];
        [
            a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], b[0], b[1], b[2], b[3], b[4], b[5],
            b[6], b[7],
        ]
    }

    /// A stored session, if the bytes are one.
    pub fn decode(stored: &[u8]) -> Option<Session> {
        let b: &[u8; 16] = stored.try_into().ok()?;
        let s = Session {
            start: f64::from_le_bytes(*b.first_chunk()?),
            last: f64::from_le_bytes(*b.last_chunk()?),
        };
        (s.start > 0.0).then_some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_ends_after_the_idle_timeout() {
        let mut s = Session::default();
        assert_eq!(s.id(), b"");
        assert!(s.touch(1_000_000.0, DEFAULT_TIMEOUT_MS));
        assert_eq!(s.id(), b"1000000");
        assert!(!s.touch(1_000_000.0 + DEFAULT_TIMEOUT_MS, DEFAULT_TIMEOUT_MS));
        assert_eq!(s.id(), b"1000000");
        let later = 1_000_000.0 + 2.0 * DEFAULT_TIMEOUT_MS + 1.0;
        assert!(s.touch(later, DEFAULT_TIMEOUT_MS));
        assert_eq!(s.id(), b"4600001");
    }

    #[test]
    fn sessions_round_trip() {
        let mut s = Session::default();
        s.touch(5000.0, DEFAULT_TIMEOUT_MS);
        s.touch(6000.0, DEFAULT_TIMEOUT_MS);
        assert_eq!(Session::decode(&s.encode()), Some(s));
        assert_eq!(Session::decode(&s.encode()[..15]), None);
        assert_eq!(Session::decode(b"5000.6000"), None);
        assert_eq!(Session::decode(&Session::default().encode()), None);
    }
}
