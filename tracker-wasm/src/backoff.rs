//! Retries: what an answer from the collector means for the batch, and how long to wait
//! before the next try (exponential backoff with jitter, never sooner than `Retry-After`).

/// The first retry waits about this long (ms).
pub const BASE_MS: f64 = 1000.0;
/// No backoff step waits longer than this (ms); a longer `Retry-After` is still honoured.
pub const CAP_MS: f64 = 300_000.0;

/// What to do with a batch after the collector answered `status` (0: no answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Applied (2xx): forget the events.
    Ack,
    /// Try the same events again later: no answer, 408, 429, 5xx (and anything unexpected).
    Retry,
    /// Refused for good (other 4xx): forget the events, keep the error.
    Drop,
}

/// Classifies an HTTP status.
pub fn outcome(status: u16) -> Outcome {
    match status {
        200..=299 => Outcome::Ack,
        408 | 429 => Outcome::Retry,
        400..=499 => Outcome::Drop,
        _ => Outcome::Retry,
    }
}

/// A `Retry-After` header in milliseconds, from the seconds the loader read from it (NaN
/// when there was none, or an HTTP date, which falls back to plain backoff: the collector
/// sends seconds). At most a day.
pub fn retry_after_ms(seconds: f64) -> Option<f64> {
    (seconds >= 0.0).then(|| seconds.min(86_400.0) * 1000.0)
}

/// Exponential backoff state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backoff {
    attempt: u32,
}

impl Backoff {
    /// No failure yet.
    pub const NONE: Backoff = Backoff { attempt: 0 };

    /// Failed tries since the last success.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Records a failure and returns how long to wait (ms): `BASE_MS * 2^(n-1)` capped at
    /// [`CAP_MS`], half of it fixed and half random ("equal jitter", so many tabs do not
    /// retry in step), and never less than `retry_after`. `random` is uniform in `[0, 1)`.
    pub fn fail(&mut self, retry_after: Option<f64>, random: f64) -> f64 {
        self.attempt = self.attempt.saturating_add(1);
        let exp = BASE_MS * f64::from(1u32 << (self.attempt - 1).min(20));
        let exp = if exp > CAP_MS { CAP_MS } else { exp };
        let wait = exp / 2.0 + random * exp / 2.0;
        match retry_after {
            Some(ra) if ra > wait => ra,
            _ => wait,
        }
    }

    /// Records a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified() {
        assert_eq!(outcome(200), Outcome::Ack);
        assert_eq!(outcome(0), Outcome::Retry);
        assert_eq!(outcome(408), Outcome::Retry);
        assert_eq!(outcome(429), Outcome::Retry);
        assert_eq!(outcome(503), Outcome::Retry);
        assert_eq!(outcome(400), Outcome::Drop);
        assert_eq!(outcome(401), Outcome::Drop);
        assert_eq!(outcome(413), Outcome::Drop);
    }

    #[test]
    fn waits_double_with_jitter_up_to_the_cap() {
        let mut b = Backoff::default();
        assert_eq!(b.fail(None, 0.0), 500.0);
        assert_eq!(b.fail(None, 0.0), 1000.0);
        assert_eq!(b.fail(None, 0.999_999), 4000.0 - 0.002);
        for _ in 0..30 {
            b.fail(None, 0.5);
        }
        assert_eq!(b.fail(None, 1.0), CAP_MS);
        assert_eq!(b.fail(None, 0.0), CAP_MS / 2.0);
        b.reset();
        assert_eq!(b.attempts(), 0);
        assert_eq!(b.fail(None, 1.0), 1000.0);
    }

    #[test]
    fn retry_after_is_a_floor() {
        let mut b = Backoff::default();
        assert_eq!(b.fail(retry_after_ms(30.0), 0.0), 30_000.0);
        assert_eq!(b.fail(retry_after_ms(0.0), 0.0), 1000.0);
        assert_eq!(retry_after_ms(f64::NAN), None);
        assert_eq!(retry_after_ms(-1.0), None);
        assert_eq!(retry_after_ms(1e9), Some(86_400_000.0));
    }
}
