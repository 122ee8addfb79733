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
pub enum ThresholdError {
    /// A profile would turn dormant while still new.
    #[error(
        "lifecycle.new_for ({}) must not exceed lifecycle.dormant_after ({})",
        human(*.new_for),
        human(*.dormant_after)
    )]
    NewLongerThanDormant {
        /// The configured `new_for`.
        new_for: Duration,
        /// The configured `dormant_after`.
        dormant_after: Duration,
    },
    /// A profile would churn before (or as) it turns dormant.
    #[error(
        "lifecycle.dormant_after ({}) must be less than lifecycle.churned_after ({})",
        human(*.dormant_after),
        human(*.churned_after)
    )]
    DormantNotBeforeChurned {
        /// The configured `dormant_after`.
        dormant_after: Duration,
        /// The configured `churned_after`.
        churned_after: Duration,
    },
}

/// `40d`, `36h`, `90m`, `45s`, `1500ms`: the largest whole unit, in a form the config accepts.
fn human(d: Duration) -> String {
    if d.subsec_nanos() != 0 {
        return format!("{}ms", d.as_millis());
    }
    let secs = d.as_secs();
    for (unit, n) in [("d", 86_400), ("h", 3_600), ("m", 60)] {
        if secs >= n && secs.is_multiple_of(n) {
            return format!("{}{unit}", secs / n);
        }
    }
    format!("{secs}s")
}

impl LifecycleThresholds {
    /// Checks `new_for <= dormant_after < churned_after`.
    ///
    /// # Errors
    /// Names the pair out of order and their values.
    pub fn validate(&self) -> Result<(), ThresholdError> {
        if self.new_for > self.dormant_after {
            return Err(ThresholdError::NewLongerThanDormant {
                new_for: self.new_for,
                dormant_after: self.dormant_after,
            });
        }
        if self.dormant_after >= self.churned_after {
            return Err(ThresholdError::DormantNotBeforeChurned {
                dormant_after: self.dormant_after,
                churned_after: self.churned_after,
            });
        }
        Ok(())
    }

    /// The stage, at `now`, of a profile first and last seen at the given times.
    ///
    /// Each threshold is the first instant of the later stage: seen exactly `dormant_after`
    /// ago is dormant, first seen exactly `new_for` ago is active. Times after `now` (a
    /// client clock ahead of ours) count as seen just now.
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
    const MS: time::Duration = time::Duration::milliseconds(1);

    fn days(n: i64) -> time::Duration {
        time::Duration::days(n)
    }

    #[test]
    fn stages_change_exactly_at_the_thresholds() {
        let t = LifecycleThresholds::default();
        let stage =
            |first: time::Duration, last: time::Duration| t.stage(NOW - first, NOW - last, NOW);
        assert_eq!(stage(days(0), days(0)), Lifecycle::New);
        assert_eq!(stage(days(14) - MS, days(0)), Lifecycle::New);
        assert_eq!(stage(days(14), days(0)), Lifecycle::Active);
        assert_eq!(stage(days(100), days(30) - MS), Lifecycle::Active);
        assert_eq!(stage(days(100), days(30)), Lifecycle::Dormant);
        assert_eq!(stage(days(100), days(90) - MS), Lifecycle::Dormant);
        assert_eq!(stage(days(100), days(90)), Lifecycle::Churned);
        assert_eq!(stage(days(900), days(800)), Lifecycle::Churned);
        // A new visitor who vanished is dormant, then churned, not new.
        assert_eq!(stage(days(13), days(13)), Lifecycle::New);
        assert_eq!(stage(days(31), days(31)), Lifecycle::Dormant);
        // With new_for = dormant_after, a profile is new until it turns dormant.
        let t = LifecycleThresholds {
            new_for: Duration::from_secs(30 * 86_400),
            ..t
        };
        assert_eq!(
            t.stage(NOW - days(30) + MS, NOW - days(30) + MS, NOW),
            Lifecycle::New
        );
        assert_eq!(
            t.stage(NOW - days(30), NOW - days(30), NOW),
            Lifecycle::Dormant
        );
    }

    #[test]
    fn times_ahead_of_now_count_as_just_seen() {
        let t = LifecycleThresholds::default();
        assert_eq!(t.stage(NOW + days(1), NOW + days(1), NOW), Lifecycle::New);
        assert_eq!(
            t.stage(NOW - days(20), NOW + days(1), NOW),
            Lifecycle::Active
        );
    }

    #[test]
    fn contradictory_thresholds_are_named_with_their_values() {
        let mut t = LifecycleThresholds::default();
        assert_eq!(t.validate(), Ok(()));
        t.churned_after = t.dormant_after;
        assert_eq!(
            t.validate().unwrap_err().to_string(),
            "lifecycle.dormant_after (30d) must be less than lifecycle.churned_after (30d)"
        );
        let mut t = LifecycleThresholds {
            new_for: Duration::from_secs(40 * 86_400),
            ..LifecycleThresholds::default()
        };
        assert_eq!(
            t.validate().unwrap_err().to_string(),
            "lifecycle.new_for (40d) must not exceed lifecycle.dormant_after (30d)"
        );
        t.new_for = t.dormant_after;
        assert_eq!(t.validate(), Ok(()));
    }

    #[test]
    fn durations_print_in_their_largest_whole_unit() {
        let cases = [
            (86_400 * 40, "40d"),
            (3_600 * 36, "36h"),
            (5_400, "90m"),
            (45, "45s"),
        ];
        for (secs, text) in cases {
            assert_eq!(human(Duration::from_secs(secs)), text);
        }
        assert_eq!(human(Duration::from_millis(1_500)), "1500ms");
    }
}
