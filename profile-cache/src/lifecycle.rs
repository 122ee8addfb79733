//! Lifecycle stages (new, active, dormant, churned) and the thresholds between them.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::model::Lifecycle;

/// When a profile moves from one stage to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LifecycleThresholds {
    /// A profile first seen less than this long ago (and not dormant) is `new`. Default 14 days.
    #[serde(with = "humantime_serde")]
    pub new_for: Duration,
    /// A profile not seen for this long is `dormant`. Default 30 days.
    #[serde(with = "humantime_serde")]
    pub dormant_after: Duration,
    /// A profile not seen for this long is `churned`. Default 90 days.
    #[serde(with = "humantime_serde")]
    pub churned_after: Duration,
}

impl Default for LifecycleThresholds {
    fn default() -> Self {
        const DAY: u64 = 86_400;
        Self {
            new_for: Duration::from_secs(14 * DAY),
            dormant_after: Duration::from_secs(30 * DAY),
            churned_after: Duration::from_secs(90 * DAY),
        }
    }
}

/// Thresholds that contradict each other.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("lifecycle: {0}")]
pub struct ThresholdError(&'static str);

impl LifecycleThresholds {
    /// Checks `new_for <= dormant_after < churned_after`.
    ///
    /// # Errors
    /// Names the pair out of order.
    pub fn validate(&self) -> Result<(), ThresholdError> {
        if self.new_for > self.dormant_after {
            return Err(ThresholdError("new_for must not exceed dormant_after"));
        }
        if self.dormant_after >= self.churned_after {
            return Err(ThresholdError(
                "dormant_after must be less than churned_after",
            ));
        }
        Ok(())
    }

    /// The stage, at `now`, of a profile first and last seen at the given times.
    pub fn stage(
        &self,
        first_seen: OffsetDateTime,
        last_seen: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Lifecycle {
        let idle = now - last_seen;
        if idle >= self.churned_after {
            Lifecycle::Churned
        } else if idle >= self.dormant_after {
            Lifecycle::Dormant
        } else if now - first_seen < self.new_for {
            Lifecycle::New
        } else {
            Lifecycle::Active
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-06-01 00:00 UTC);

    fn days(n: i64) -> time::Duration {
        time::Duration::days(n)
    }

    #[test]
    fn stages_change_exactly_at_the_thresholds() {
        let t = LifecycleThresholds::default();
        let stage = |first: i64, last: i64| t.stage(NOW - days(first), NOW - days(last), NOW);
        assert_eq!(stage(0, 0), Lifecycle::New);
        assert_eq!(
            t.stage(NOW - days(14) + time::Duration::milliseconds(1), NOW, NOW),
            Lifecycle::New
        );
        assert_eq!(stage(14, 0), Lifecycle::Active);
        assert_eq!(stage(100, 29), Lifecycle::Active);
        assert_eq!(stage(100, 30), Lifecycle::Dormant);
        assert_eq!(stage(100, 89), Lifecycle::Dormant);
        assert_eq!(stage(100, 90), Lifecycle::Churned);
        // A new visitor who vanished is dormant, not new.
        assert_eq!(stage(31, 31), Lifecycle::Dormant);
    }

    #[test]
    fn contradictory_thresholds_are_named() {
        let mut t = LifecycleThresholds::default();
        t.churned_after = t.dormant_after;
        assert_eq!(
            t.validate().unwrap_err().to_string(),
            "lifecycle: dormant_after must be less than churned_after"
        );
        let mut t = LifecycleThresholds::default();
        t.new_for = Duration::from_secs(40 * 86_400);
        assert_eq!(
            t.validate().unwrap_err().to_string(),
            "lifecycle: new_for must not exceed dormant_after"
        );
    }
}
