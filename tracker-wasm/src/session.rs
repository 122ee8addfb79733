//! Sessions: a new session id after a period without events (30 minutes by default).
//! The id is the session's start time in Unix milliseconds, as decimal text: unique per
//! visitor, which is all the profile needs, and readable when debugging.

use alloc::string::String;

use crate::text;

/// The default idle timeout (ms).
pub const DEFAULT_TIMEOUT_MS: f64 = 30.0 * 60.0 * 1000.0;

/// The current session.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Session {
    /// The id (empty before the first event).
    pub id: String,
    /// When the last event happened (Unix ms).
    pub last: f64,
}

impl Session {
    /// Records activity at `now`, starting a new session when none is running or the last
    /// activity is older than `timeout`. Returns whether a new session started.
    pub fn touch(&mut self, now: f64, timeout: f64) -> bool {
        let fresh = self.id.is_empty() || now - self.last > timeout;
        if fresh {
            self.id = text::decimal(now as i64);
        }
        if now > self.last {
            self.last = now;
        }
        fresh
    }

    /// The session as stored in localStorage: `id.last`.
    pub fn encode(&self) -> String {
        let mut s = self.id.clone();
        s.push('.');
        text::push_u64(&mut s, self.last as u64);
        s
    }

    /// A stored session, if the text is one.
    pub fn decode(stored: &str) -> Option<Session> {
        let (id, last) = text::cut(stored, b'.')?;
        text::parse_u64(id)?;
        Some(Session {
            id: id.into(),
            last: text::parse_u64(last)? as f64,
        })
    }

    /// Takes over another tab's session when it saw activity more recently.
    pub fn merge(&mut self, other: Session) {
        if other.last > self.last {
            *self = other;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_ends_after_the_idle_timeout() {
        let mut s = Session::default();
        assert!(s.touch(1_000_000.0, DEFAULT_TIMEOUT_MS));
        assert_eq!(s.id, "1000000");
        assert!(!s.touch(1_000_000.0 + DEFAULT_TIMEOUT_MS, DEFAULT_TIMEOUT_MS));
        assert_eq!(s.id, "1000000");
        let later = 1_000_000.0 + 2.0 * DEFAULT_TIMEOUT_MS + 1.0;
        assert!(s.touch(later, DEFAULT_TIMEOUT_MS));
        assert_eq!(s.id, "4600001");
    }

    #[test]
    fn sessions_round_trip_and_the_most_recent_wins() {
        let mut s = Session::default();
        s.touch(5000.0, DEFAULT_TIMEOUT_MS);
        s.touch(6000.0, DEFAULT_TIMEOUT_MS);
        let stored = s.encode();
        assert_eq!(stored, "5000.6000");
        assert_eq!(Session::decode(&stored), Some(s.clone()));
        assert_eq!(Session::decode("x.1"), None);
        let other = Session {
            id: "5500".into(),
            last: 7000.0,
        };
        s.merge(other.clone());
        assert_eq!(s, other);
    }
}
