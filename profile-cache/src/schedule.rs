//! The deadline schedule: claiming the profiles whose deadline has come, with a lease, and
//! re-evaluating their segments, so that a membership that changes by time alone (a cart
//! left for 30 minutes) changes without a new event.
//!
//! # Claims and leases
//!
//! `schedule:deadlines` ([`crate::keys::DEADLINES`]) scores each profile by its next deadline; every
//! update writes it (`apply.lua`). [`RedisProfiles::claim_due`] runs one small script
//! (`claim.lua`) that takes up to `limit` profiles scored at or before `now` and sets their
//! scores to `now + lease`: the claim. The script is atomic, so two schedulers never claim
//! the same profile: once claimed, it is not due again until the lease ends.
//! [`RedisProfiles::evaluate_claimed`] then re-evaluates each claimed profile at `now` with
//! the apply script (no events; transitions with reason `deadline`), which replaces the
//! claim by the profile's real next deadline, or removes the entry when no membership can
//! change by time any more or the profile no longer exists.
//!
//! A scheduler that dies after claiming leaves its claims to expire: when the lease ends they
//! are due again and another scheduler claims them, so a crash delays a deadline by at most
//! a lease. A profile whose data the script cannot read ([`StoreError::Corrupt`]) keeps its
//! claim the same way: it is tried again once per lease, never in a tight loop.
//!
//! # Races with updates
//!
//! An evaluation is conditional: the script goes ahead only while the profile's score is
//! still its claim's (`now + lease`, to the millisecond), and otherwise writes nothing
//! ([`Outcome::Superseded`]). What can come between a claim and its evaluation:
//!
//! - An update of the profile (new events). Its script re-evaluates every segment at the
//!   update's time and writes the real next deadline over the claim, or removes the entry.
//!   The memberships are then current and the next deadline scheduled, so the scheduler has
//!   nothing left to do, and must not write: its `now` may be earlier than the update's (a
//!   batch received a moment after the claim, or a collector whose clock is a little
//!   ahead), and evaluating the updated profile at an earlier time could undo a change the
//!   update has just made (an exit right after the enter, then the enter again). If the
//!   update's deadline is due already, the next claim takes it: no deadline is lost.
//! - Another scheduler, after the lease ran out: it claimed the profile with a later score,
//!   so the first scheduler's evaluation finds a score that is not its own and writes
//!   nothing. One of them evaluates, never both.
//! - A rebuild after a change of segment definitions ([`crate::rebuild`]), which claims
//!   the profiles it evaluates with [`RedisProfiles::claim`] whatever their deadline: its
//!   claim replaced this one, so this evaluation writes nothing and the rebuild's evaluates
//!   the profile with the new definitions.
//! - An update whose events were all duplicates changes nothing, the claim included, and
//!   the evaluation goes ahead.
//!
//! In the other order (evaluation, then update) the two are ordinary evaluations one after
//! the other. Transitions are only written for memberships that differ from the stored
//! ones, so however the calls interleave, one change is never written twice.
//!
//! The one case the claim's score cannot tell apart: an update whose next deadline equals
//! the claim's score to the millisecond. The evaluation then goes ahead on the updated
//! profile, as a claim taken just after the update would.
//!
//! Claims compare times from the schedulers' clocks, so collectors whose clocks differ by
//! more than the lease could take each other's claims early. The lease (the collector's
//! default is 30 s) is far beyond what NTP keeps clocks apart.

use std::sync::LazyLock;
use std::time::Duration;

use time::OffsetDateTime;

use crate::keys::DEADLINES;
use crate::model::ProfileId;
use crate::script::{self, millis};
use crate::store::{RedisProfiles, StoreError};

/// `claim.lua`.
static CLAIM: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(CLAIM_SOURCE));
const CLAIM_SOURCE: &str = include_str!("claim.lua");

/// A profile claimed from the schedule: until the claim ends, no other scheduler claims it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The schedule's member: a profile id, unless the data is corrupt.
    profile: String,
    /// The score the claim gave it, Unix ms: the end of the lease.
    score: i64,
}

impl Claim {
    /// The claimed profile's id as the schedule holds it (`u:<id>` or `a:<id>`).
    pub fn profile(&self) -> &str {
        &self.profile
    }

    /// When the claim ends and the profile is due again, unless evaluated before.
    pub fn until(&self) -> OffsetDateTime {
        from_millis(self.score).unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }
}

/// Why claimed profiles are evaluated: the `reason` of the transitions the evaluation writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Their deadline has come: the scheduler's evaluation.
    Deadline,
    /// The segment definitions changed: a rebuild's evaluation ([`crate::rebuild`]).
    Redefined,
}

impl Reason {
    /// The `reason` field of the transitions: `deadline` or `redefined`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Deadline => "deadline",
            Reason::Redefined => "redefined",
        }
    }
}

/// What [`RedisProfiles::claim_due`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    /// The claimed profiles, earliest deadline first.
    pub claims: Vec<Claim>,
    /// The earliest score in the schedule after the claim (claims included): when the next
    /// profile falls due, unless an update schedules an earlier one. `None`: the schedule is
    /// empty.
    pub next_due: Option<OffsetDateTime>,
}

/// What the evaluation of one claimed profile did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The segments were re-evaluated: `changes` transitions written, and the schedule
    /// holds the next deadline or no entry.
    Evaluated {
        /// Segments entered or left.
        changes: u64,
    },
    /// The claim no longer held (an update re-evaluated the profile since, or another
    /// scheduler claimed it after the lease ended): nothing was written.
    Superseded,
    /// The profile no longer exists; it left the schedule.
    Gone,
}

impl RedisProfiles {
    /// Claims up to `limit` profiles whose deadline is at or before `now`, for `lease` (at
    /// least a millisecond): their schedule scores become `now + lease`, so no other
    /// scheduler claims them before then. Evaluate them with
    /// [`RedisProfiles::evaluate_claimed`]. See the module docs for the guarantees.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when Redis cannot be reached; [`StoreError::Redis`] when
    /// the schedule is not a sorted set.
    pub async fn claim_due(
        &self,
        now: OffsetDateTime,
        lease: Duration,
        limit: usize,
    ) -> Result<Claimed, StoreError> {
        let now = millis(now);
        let lease = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX).max(1);
        let score = now.saturating_add(lease);
        let mut conn = self.conn.clone();
        let (earliest, due): (String, Vec<String>) = CLAIM
            .key(DEADLINES)
            .arg(now)
            .arg(score)
            .arg(limit)
            .invoke_async(&mut conn)
            .await?;
        Ok(Claimed {
            claims: due
                .into_iter()
                .map(|profile| Claim { profile, score })
                .collect(),
            // Scores are whole milliseconds unless written by hand.
            next_due: earliest
                .parse::<f64>()
                .ok()
                .filter(|ms| ms.is_finite())
                .and_then(|ms| from_millis(ms.floor() as i64)),
        })
    }

    /// Claims `profiles` whatever their deadline, for `lease` (at least a millisecond): their
    /// schedule scores become `now + lease`, entries added for profiles without one, in one
    /// command. A rebuild ([`crate::rebuild`]) claims each page of profiles this way before
    /// it evaluates them with [`RedisProfiles::evaluate_claimed_because`], so that an update
    /// that comes in between supersedes the evaluation as it does a scheduler's. A claim
    /// taken over from a scheduler makes the scheduler's evaluation write nothing.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when Redis cannot be reached; [`StoreError::Redis`] when
    /// the schedule is not a sorted set.
    pub async fn claim(
        &self,
        profiles: &[ProfileId],
        now: OffsetDateTime,
        lease: Duration,
    ) -> Result<Vec<Claim>, StoreError> {
        if profiles.is_empty() {
            return Ok(Vec::new());
        }
        let lease = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX).max(1);
        let score = millis(now).saturating_add(lease);
        let mut zadd = redis::cmd("ZADD");
        zadd.arg(DEADLINES);
        for id in profiles {
            zadd.arg(score).arg(id.as_str());
        }
        let mut conn = self.conn.clone();
        let _: u64 = zadd.query_async(&mut conn).await?;
        Ok(profiles
            .iter()
            .map(|id| Claim {
                profile: id.as_str().to_string(),
                score,
            })
            .collect())
    }

    /// Re-evaluates the segments of claimed profiles at `now`, in one round trip (one
    /// `EVALSHA` of the apply script each, without events): memberships and transitions as
    /// for an update, with reason `deadline`, and each profile's schedule entry set to its
    /// next deadline or removed. A claim that no longer holds writes nothing. `now` should
    /// be the time of the claim or later.
    ///
    /// The result holds one outcome per claim, in order. A profile that fails alone (corrupt
    /// data, or a schedule member that is not a profile id) keeps its claim, so it is tried
    /// again when the lease ends.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when Redis cannot be reached: the claims stay, and
    /// expire.
    pub async fn evaluate_claimed(
        &self,
        claims: &[Claim],
        now: OffsetDateTime,
    ) -> Result<Vec<Result<Outcome, StoreError>>, StoreError> {
        self.evaluate_claimed_because(claims, now, Reason::Deadline)
            .await
    }

    /// [`RedisProfiles::evaluate_claimed`], with transitions written for `reason`.
    ///
    /// # Errors
    /// As [`RedisProfiles::evaluate_claimed`].
    pub async fn evaluate_claimed_because(
        &self,
        claims: &[Claim],
        now: OffsetDateTime,
        reason: Reason,
    ) -> Result<Vec<Result<Outcome, StoreError>>, StoreError> {
        let mut outcomes: Vec<Option<Result<Outcome, StoreError>>> = Vec::new();
        let mut pipe = redis::pipe();
        // Each profile's call stands alone: one's error is its own reply.
        pipe.ignore_errors();
        let mut sent = Vec::new();
        for (i, claim) in claims.iter().enumerate() {
            match profile_id(&claim.profile) {
                Ok(id) => {
                    pipe.invoke_script(&script::evaluation(
                        &self.script,
                        &self.member_keys,
                        &id,
                        claim.score,
                        reason,
                        now,
                        &self.config,
                    ));
                    sent.push(i);
                    outcomes.push(None);
                }
                Err(e) => outcomes.push(Some(Err(e))),
            }
        }
        if !sent.is_empty() {
            let mut conn = self.conn.clone();
            let mut replies: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
            if replies.iter().any(is_noscript) {
                // Redis restarted and forgot the script. A call that ran anyway has replaced
                // its claim, so running it again writes nothing.
                self.script.load_async(&mut conn).await?;
                replies = pipe.query_async(&mut conn).await?;
            }
            for (i, reply) in sent.into_iter().zip(replies) {
                outcomes[i] = Some(outcome(reply));
            }
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Err(missing_reply())))
            .collect())
    }
}

/// A schedule member as a profile id; the schedule only ever holds ids from
/// [`ProfileId`], so anything else was written by hand.
fn profile_id(member: &str) -> Result<ProfileId, StoreError> {
    parse_profile_id(member).ok_or_else(|| StoreError::Corrupt {
        key: DEADLINES.into(),
        field: member.into(),
        detail: "is not a profile id".into(),
    })
}

/// `u:<id>` or `a:<id>` as a profile id; `None` for anything else.
pub(crate) fn parse_profile_id(text: &str) -> Option<ProfileId> {
    match text.split_once(':') {
        Some(("u", id)) => ProfileId::user(id).ok(),
        Some(("a", id)) => ProfileId::anonymous(id).ok(),
        _ => None,
    }
}

fn is_noscript(reply: &redis::Value) -> bool {
    let noscript = Some(redis::ServerErrorKind::NoScript);
    matches!(reply, redis::Value::ServerError(e) if e.kind() == noscript)
}

/// One reply of the evaluation pipeline.
fn outcome(reply: redis::Value) -> Result<Outcome, StoreError> {
    if let redis::Value::ServerError(e) = reply {
        return Err(redis::RedisError::from(e).into());
    }
    let (what, changes): (String, u64) =
        redis::from_redis_value(reply).map_err(redis::RedisError::from)?;
    match what.as_str() {
        "evaluated" => Ok(Outcome::Evaluated { changes }),
        "superseded" => Ok(Outcome::Superseded),
        "gone" => Ok(Outcome::Gone),
        other => Err(StoreError::Redis(redis::RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "unknown evaluation outcome",
            other.to_string(),
        )))),
    }
}

/// Redis answered fewer replies than commands sent (not expected).
fn missing_reply() -> StoreError {
    StoreError::Redis(redis::RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        "no reply for an evaluation",
    )))
}

fn from_millis(ms: i64) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_members_must_be_profile_ids() {
        assert_eq!(profile_id("u:ada").unwrap().as_str(), "u:ada");
        assert_eq!(profile_id("a:7f3a").unwrap().as_str(), "a:7f3a");
        for bad in ["ada", "x:ada", "u:", "a:{x}"] {
            match profile_id(bad) {
                Err(StoreError::Corrupt { key, field, detail }) => {
                    assert_eq!(
                        (key.as_str(), field.as_str(), detail.as_str()),
                        ("schedule:deadlines", bad, "is not a profile id")
                    );
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }
}
