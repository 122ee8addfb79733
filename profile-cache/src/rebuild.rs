//! Rebuilding segment memberships after the definitions change, while ingest goes on: a
//! segment that is new or whose condition changed is evaluated for every existing profile,
//! and a segment that is no longer configured is emptied, each with its transitions, in
//! bounded steps that a collector restarted midway resumes.
//!
//! # What is recorded, and what a rebuild does
//!
//! `meta:{segments}:definitions` ([`keys::SEGMENT_DEFINITIONS`]) records, for each segment
//! whose memberships are complete in this Redis, the fingerprint of its compiled condition
//! ([`Segment::fingerprint`](crate::segments::Segment::fingerprint)). A collector compares it
//! with the segments it runs ([`RedisProfiles::with_segments`]) when it starts, and drives
//! [`Rebuild::step`] until it answers [`Step::Current`]:
//!
//! - The same names and fingerprints: nothing to do. The first step says so without taking
//!   the lease or writing anything.
//! - A segment recorded but no longer configured is emptied first, [`REMOVE_BATCH`] members
//!   a step: each leaves `segment:{NAME}:members` and its profile's `profile:{ID}:segments`,
//!   with an `exit` transition of reason `removed` (one atomic call per member,
//!   `leave.lua`). The step that finds the set empty removes the segment from the record.
//! - A segment configured but not recorded, or recorded with another fingerprint: every
//!   profile is evaluated again. A step takes one `SCAN` page of the keyspace (`MATCH
//!   profile:{*} COUNT` [`SCAN_COUNT`] `TYPE hash`), claims the profiles found in the
//!   deadline schedule and evaluates them with the apply script, as the scheduler does,
//!   with reason `redefined` ([`RedisProfiles::claim`],
//!   [`RedisProfiles::evaluate_claimed_because`]): memberships and transitions of every
//!   configured segment, and each profile's next deadline under the new definitions. The
//!   call that saves the walk's last cursor also records the configured definitions: the
//!   rebuild is then complete. Removals come first, so nothing else is left by then.
//!
//! Only profiles are walked, not segments: the apply script evaluates every configured
//! segment of a profile in one call, so a changed segment costs as much as all of them.
//!
//! # Progress, lease, resuming
//!
//! The walk's `SCAN` cursor lives in `meta:{segments}:rebuild` ([`keys::REBUILD_PROGRESS`])
//! with its target, the fingerprint of the whole set of definitions it rebuilds for
//! ([`fingerprint_all`]), and running counts; removals need no cursor, since a removed
//! member leaves the set. Only the holder of `meta:{segments}:rebuild_lease`
//! ([`keys::REBUILD_LEASE`], a token with an expiry of [`LEASE`]) works: every step renews
//! it, and its bookkeeping (`rebuild.lua`) checks it, so a collector that starts while
//! another rebuilds gets [`Step::Busy`] and waits. One that stops cleanly releases the
//! lease ([`Rebuild::release`]); one that dies leaves it to expire. Either way the next
//! holder continues from the saved cursor when the target is its own, and starts over when
//! it is not.
//!
//! A collector's first step discards progress made for other definitions, even while
//! another collector holds the lease: once collectors run definitions other than a walk's,
//! the profiles they update are evaluated with those, behind the walk's cursor, so the walk
//! no longer proves anything. Its owner finds its progress gone at its next step
//! ([`Step::Restarted`]) and starts over.
//!
//! A step that dies between its evaluations and saving the cursor leaves them done and the
//! cursor where it was: the page is evaluated again, which finds nothing to change. `SCAN`
//! returns every key that exists from the start of the walk to its end at least once (some
//! twice, which is as harmless); a profile created meanwhile was created by an update,
//! which evaluated it.
//!
//! # Races with updates and the scheduler
//!
//! An update evaluates every segment of its profile atomically, at its own time, with its
//! collector's definitions, and writes the profile's next deadline. A rebuild's page is
//! claimed first, in one `ZADD` that sets each profile's schedule score to `now + lease`
//! (adding entries for profiles without a deadline), and evaluated in a second round trip,
//! only while that claim holds, as in [`crate::schedule`]:
//!
//! - An update before the claim: the rebuild evaluates the updated profile later, as a
//!   scheduler would. If the update ran the new definitions there is nothing left to change
//!   (but a change by time alone that fell due since: it is written with reason
//!   `redefined`).
//! - An update between the claim and the evaluation writes its deadline over the claim, and
//!   the evaluation writes nothing ([`Outcome::Superseded`]): the rebuild's `now` was taken
//!   before the update's, and evaluating the updated profile at an earlier time could undo
//!   an enter or exit that the update found at a time boundary (a cart that turned 30
//!   minutes old). A collector with the new definitions has evaluated the profile fully.
//! - An update after the evaluation: an ordinary later evaluation.
//! - A scheduler's claim taken before the rebuild's is replaced by it, and the scheduler's
//!   evaluation writes nothing; the rebuild's writes the deadline under the new definitions.
//!   A scheduler cannot claim the profile after the rebuild did until that claim ends
//!   (its score is in the future); if the rebuild dies before evaluating, the claim ends
//!   and a scheduler evaluates the profile then, so no deadline is lost.
//! - Two rebuilders (one that stalled past its lease, and its successor) each evaluate only
//!   under their own claim, and transitions are written only where a membership differs
//!   from the stored one, so a change is never written twice.
//!
//! Every evaluation that goes ahead sets the profile's schedule entry to its next deadline
//! under the new definitions, or removes it. As for the scheduler, clocks must agree: an
//! update that ran before the claim with a later `now` than the rebuild's (a collector
//! whose clock is ahead) could have a time-based change undone, and redone at the
//! deadline.
//!
//! Removals race with nothing under one set of definitions: no update touches a segment
//! its collector does not run. Each member leaves in one atomic call that writes nothing
//! if it is no longer a member, so each `exit` is written once.
//!
//! # Collectors with different definitions
//!
//! While collectors with different definitions run over one Redis (a rolling restart),
//! each evaluates the profiles it updates with its own. Profiles that a collector with the
//! old definitions updates after the rebuild walked them keep the old memberships of the
//! changed segments until their next update or deadline, and it may put members back into
//! a removed segment while it is being emptied (they are removed again until a step finds
//! the set empty). Restart every collector with the new definitions before the rebuild
//! finishes; `DEL meta:{segments}:definitions` makes the next collector to start evaluate
//! every segment for every profile again.

use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::time::Duration;

use time::OffsetDateTime;

use crate::keys::{self, REBUILD_LEASE, REBUILD_PROGRESS, SEGMENT_DEFINITIONS, TRANSITION_STREAM};
use crate::model::ProfileId;
use crate::schedule::{Outcome, Reason, parse_profile_id};
use crate::script::millis;
use crate::segments::fingerprint_all;
use crate::store::{RedisProfiles, StoreError, is_noscript};

/// Keys a rebuild step's `SCAN` examines (its `COUNT`): a profile has several keys, so a
/// page holds fewer profiles, about a hundred with the demo's data. Each page is one
/// pipeline of evaluations, about 120 µs of Redis time a profile with the demo segments (on
/// a 2-core machine): some 12 ms in all, in slices between which other clients' commands
/// run.
pub const SCAN_COUNT: usize = 1_000;

/// Members of a removed segment taken out per step: one pipeline of small script calls.
pub const REMOVE_BATCH: usize = 200;

/// How long the rebuild's lease lasts without a step renewing it, and how long a page's
/// claims keep the profiles from the scheduler: how long a rebuild pauses when its
/// collector dies. Far beyond a step (a few round trips) and a Redis timeout.
pub const LEASE: Duration = Duration::from_secs(30);

/// `rebuild.lua`.
static BOOKKEEPING: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("rebuild.lua")));

/// `leave.lua`.
static LEAVE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("leave.lua")));

/// How the recorded definitions differ from a collector's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Configured, not recorded: filled from the existing profiles.
    pub added: Vec<String>,
    /// Recorded with another fingerprint: every profile evaluated again.
    pub changed: Vec<String>,
    /// Recorded, no longer configured: emptied.
    pub removed: Vec<String>,
}

impl Changes {
    /// No difference: nothing to rebuild.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }

    /// Whether every profile must be evaluated again.
    pub fn needs_walk(&self) -> bool {
        !self.added.is_empty() || !self.changed.is_empty()
    }
}

/// What one [`Rebuild::step`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The recorded definitions are the configured ones: nothing (left) to rebuild.
    Current,
    /// Another collector holds the rebuild's lease: try again later.
    Busy,
    /// A batch of members of a removed segment left it.
    Removed(Removed),
    /// The profiles of one page of the walk were evaluated.
    Evaluated(Evaluated),
    /// A collector that started with other definitions discarded the progress this
    /// rebuilder had saved (see the module docs): the walk starts over at the next step.
    Restarted,
}

/// A step of the removal of a segment that is no longer configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    /// The segment.
    pub segment: String,
    /// Members taken out, each with an `exit` transition.
    pub exits: u64,
    /// The set was found empty and the segment left the record: its removal is complete.
    pub emptied: bool,
}

/// A step of the walk over profiles.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Evaluated {
    /// Profiles found on the page.
    pub found: usize,
    /// Of those, profiles evaluated.
    pub evaluated: usize,
    /// Segments they entered or left.
    pub changes: u64,
    /// Profiles an update (or a scheduler) evaluated between the claim and the evaluation.
    pub superseded: usize,
    /// Profiles deleted since the page was read.
    pub gone: usize,
    /// Profiles that could not be evaluated (corrupt data, or a key that is not a profile
    /// id); a profile keeps its claim, so the scheduler tries it again when the lease ends.
    pub failed: usize,
    /// Why, one line each (keys and fields named, as [`StoreError`] says it).
    pub failures: Vec<String>,
    /// The walk's cursor after this page; 0 when the walk is complete.
    pub cursor: u64,
    /// The walk is complete and the definitions are recorded.
    pub finished: bool,
    /// Profiles evaluated since the rebuild started, by every collector that worked on it.
    pub total_evaluated: u64,
    /// Changes since the rebuild started.
    pub total_changes: u64,
}

/// A rebuild of the memberships of one collector's segments; see the module docs. Build
/// it with [`RedisProfiles::rebuild`] and call [`Rebuild::step`] until [`Step::Current`].
#[derive(Debug)]
pub struct Rebuild {
    profiles: RedisProfiles,
    /// This rebuilder's token in the lease.
    owner: String,
    /// The fingerprint of the whole set of definitions.
    target: String,
    lease: Duration,
    scan_count: usize,
    remove_batch: usize,
    /// Whether a step has answered: the first one discards other definitions' progress.
    begun: bool,
    /// Whether this rebuilder has saved progress of its walk: if the progress starts over
    /// after that, someone discarded it.
    walked: bool,
}

impl RedisProfiles {
    /// A rebuild for the segments this store evaluates ([`RedisProfiles::with_segments`]),
    /// with its own lease token, [`LEASE`], [`SCAN_COUNT`] and [`REMOVE_BATCH`].
    pub fn rebuild(&self) -> Rebuild {
        Rebuild {
            target: fingerprint_all(
                self.definitions
                    .iter()
                    .map(|(name, fp)| (name.as_str(), fp.as_str())),
            ),
            profiles: self.clone(),
            owner: uuid::Uuid::new_v4().simple().to_string(),
            lease: LEASE,
            scan_count: SCAN_COUNT,
            remove_batch: REMOVE_BATCH,
            begun: false,
            walked: false,
        }
    }
}

/// What `begin` answered.
enum Begin {
    Current,
    Busy,
    Go {
        record: BTreeMap<String, String>,
        cursor: u64,
        /// The progress started over in this call.
        fresh: bool,
    },
}

impl Rebuild {
    /// Another lease (at least a millisecond), for tests of takeovers.
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_millis(1));
        self
    }

    /// Other batch sizes (each at least 1): the `SCAN` `COUNT` of a page, and the members
    /// of a removed segment taken out per step.
    pub fn with_batches(mut self, scan_count: usize, remove_batch: usize) -> Self {
        self.scan_count = scan_count.max(1);
        self.remove_batch = remove_batch.max(1);
        self
    }

    /// The fingerprint of the definitions this rebuild works for ([`fingerprint_all`]).
    pub fn target(&self) -> &str {
        &self.target
    }

    /// How the recorded definitions differ from this collector's, for logs; the steps read
    /// the record again under the lease.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when Redis cannot be reached; [`StoreError::Redis`] when
    /// the record is not a hash.
    pub async fn changes(&self) -> Result<Changes, StoreError> {
        let mut conn = self.profiles.conn.clone();
        let record: BTreeMap<String, String> = redis::cmd("HGETALL")
            .arg(SEGMENT_DEFINITIONS)
            .query_async(&mut conn)
            .await?;
        Ok(diff(&record, &self.profiles.definitions))
    }

    /// One bounded step at `now`: the removal of a batch of members of a removed segment,
    /// or the evaluation of one page of profiles; [`Step::Current`] once the recorded
    /// definitions are the configured ones, [`Step::Busy`] while another collector holds
    /// the lease.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when Redis cannot be reached, [`StoreError::Redis`] or
    /// [`StoreError::Corrupt`] for keys of the wrong type. Whatever the step did before the
    /// error is safe to do again: call it again later.
    pub async fn step(&mut self, now: OffsetDateTime) -> Result<Step, StoreError> {
        let (record, cursor) = match self.begin(now).await? {
            Begin::Current => return Ok(Step::Current),
            Begin::Busy => return Ok(Step::Busy),
            Begin::Go { fresh: true, .. } if self.walked => {
                self.walked = false;
                return Ok(Step::Restarted);
            }
            Begin::Go { record, cursor, .. } => (record, cursor),
        };
        let changes = diff(&record, &self.profiles.definitions);
        if let Some(segment) = changes.removed.first() {
            return self.remove(segment, now).await;
        }
        // The record differs from the definitions, and not by a removal: a walk is due.
        self.walk(cursor, now).await
    }

    /// Gives the lease up, if this rebuild holds it, so that another collector (or this
    /// one restarted) continues at once rather than when the lease ends. The progress stays.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when Redis cannot be reached: the lease then expires.
    pub async fn release(&self) -> Result<(), StoreError> {
        let _: Vec<redis::Value> = self
            .bookkeeping("release")
            .invoke_async(&mut self.conn())
            .await?;
        Ok(())
    }

    async fn begin(&mut self, now: OffsetDateTime) -> Result<Begin, StoreError> {
        let mut inv = self.bookkeeping("begin");
        inv.arg(if self.begun { "0" } else { "1" }).arg(millis(now));
        self.definitions(&mut inv);
        let reply: Vec<redis::Value> = inv.invoke_async(&mut self.conn()).await?;
        self.begun = true;
        let mut reply = reply.into_iter();
        let what: String = from_value(reply.next())?;
        match what.as_str() {
            "current" => Ok(Begin::Current),
            "busy" => Ok(Begin::Busy),
            "ok" => {
                let flat: Vec<String> = from_value(reply.next())?;
                let cursor: String = from_value(reply.next())?;
                let fresh: String = from_value(reply.next())?;
                let record = flat
                    .chunks_exact(2)
                    .map(|pair| (pair[0].clone(), pair[1].clone()))
                    .collect();
                let cursor = cursor
                    .parse()
                    .map_err(|_| corrupt(REBUILD_PROGRESS, "cursor", &cursor))?;
                Ok(Begin::Go {
                    record,
                    cursor,
                    fresh: fresh == "1",
                })
            }
            other => Err(unexpected("begin", other)),
        }
    }

    /// Takes up to a batch of members out of `segment`, or removes it from the record when
    /// it has none left.
    async fn remove(&self, segment: &str, now: OffsetDateTime) -> Result<Step, StoreError> {
        let members_key = keys::segment_members(segment);
        let mut conn = self.conn();
        let last = isize::try_from(self.remove_batch).unwrap_or(isize::MAX) - 1;
        let members: Vec<String> = redis::cmd("ZRANGE")
            .arg(&members_key)
            .arg(0)
            .arg(last)
            .query_async(&mut conn)
            .await?;
        if members.is_empty() {
            let mut inv = self.bookkeeping("forget");
            inv.arg(segment);
            let reply: Vec<redis::Value> = inv.invoke_async(&mut conn).await?;
            let what: String = from_value(reply.into_iter().next())?;
            return match what.as_str() {
                "ok" => Ok(Step::Removed(Removed {
                    segment: segment.into(),
                    exits: 0,
                    emptied: true,
                })),
                "lost" => Ok(Step::Busy),
                other => Err(unexpected("forget", other)),
            };
        }
        let invocations: Vec<redis::ScriptInvocation<'_>> = members
            .iter()
            .map(|member| {
                let mut inv = LEAVE.key(&members_key);
                inv.key(TRANSITION_STREAM);
                if let Some(id) = parse_profile_id(member) {
                    inv.key(keys::segments(&id));
                }
                inv.arg(member)
                    .arg(segment)
                    .arg(millis(now))
                    .arg(self.profiles.config.transition_stream_max_len);
                inv
            })
            .collect();
        let mut pipe = redis::pipe();
        for inv in &invocations {
            pipe.invoke_script(inv);
        }
        let left: Vec<u64> = match pipe.query_async(&mut conn).await {
            Err(e) if is_noscript(&e) => {
                // Redis restarted and forgot the script; a call that ran took its member
                // out, so running it again writes nothing for it.
                LEAVE.load_async(&mut conn).await?;
                pipe.query_async(&mut conn).await?
            }
            result => result?,
        };
        Ok(Step::Removed(Removed {
            segment: segment.into(),
            exits: left.iter().sum(),
            emptied: false,
        }))
    }

    /// Evaluates the profiles of the page at `cursor` and saves the next cursor.
    async fn walk(&mut self, cursor: u64, now: OffsetDateTime) -> Result<Step, StoreError> {
        let mut conn = self.conn();
        let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(keys::PROFILE_PATTERN)
            .arg("COUNT")
            .arg(self.scan_count)
            .arg("TYPE")
            .arg("hash")
            .query_async(&mut conn)
            .await?;
        let mut page = Evaluated {
            found: found.len(),
            cursor: next,
            ..Evaluated::default()
        };
        let ids: Vec<ProfileId> = found
            .iter()
            .filter_map(|key| keys::profile_of_key(key).and_then(parse_profile_id))
            .collect();
        // Keys that match the pattern but hold no profile id were written by hand.
        for key in &found {
            if keys::profile_of_key(key)
                .and_then(parse_profile_id)
                .is_none()
            {
                page.failed += 1;
                page.failures
                    .push(format!("{key:?} is not the key of a profile id"));
            }
        }
        let claims = self.profiles.claim(&ids, now, self.lease).await?;
        let outcomes = self
            .profiles
            .evaluate_claimed_because(&claims, now, Reason::Redefined)
            .await?;
        for outcome in outcomes {
            match outcome {
                Ok(Outcome::Evaluated { changes }) => {
                    page.evaluated += 1;
                    page.changes += changes;
                }
                Ok(Outcome::Superseded) => page.superseded += 1,
                Ok(Outcome::Gone) => page.gone += 1,
                Err(e) => {
                    page.failed += 1;
                    page.failures.push(e.to_string());
                }
            }
        }

        let mut inv = self.bookkeeping("advance");
        inv.arg(next).arg(page.evaluated).arg(page.changes);
        self.definitions(&mut inv);
        let reply: Vec<redis::Value> = inv.invoke_async(&mut conn).await?;
        let mut reply = reply.into_iter();
        let what: String = from_value(reply.next())?;
        match what.as_str() {
            "ok" | "finished" => {
                page.finished = what == "finished";
                self.walked = !page.finished;
                page.total_evaluated = from_value(reply.next())?;
                page.total_changes = from_value(reply.next())?;
                Ok(Step::Evaluated(page))
            }
            // Another collector took the lease over (this one stalled past it): it walks
            // on from the last saved cursor, and this page's evaluations did no harm.
            "lost" => Ok(Step::Busy),
            "reset" => {
                self.walked = false;
                Ok(Step::Restarted)
            }
            other => Err(unexpected("advance", other)),
        }
    }

    /// A call of `rebuild.lua` with its keys and first arguments.
    fn bookkeeping(&self, op: &str) -> redis::ScriptInvocation<'static> {
        let mut inv = BOOKKEEPING.key(REBUILD_LEASE);
        inv.key(REBUILD_PROGRESS)
            .key(SEGMENT_DEFINITIONS)
            .arg(op)
            .arg(&self.owner)
            .arg(u64::try_from(self.lease.as_millis()).unwrap_or(u64::MAX))
            .arg(&self.target);
        inv
    }

    /// Adds the configured definitions as name, fingerprint arguments.
    fn definitions(&self, inv: &mut redis::ScriptInvocation<'_>) {
        for (name, fingerprint) in self.profiles.definitions.iter() {
            inv.arg(name).arg(fingerprint);
        }
    }

    fn conn(&self) -> redis::aio::ConnectionManager {
        self.profiles.conn.clone()
    }
}

/// How `record` differs from `configured` (name, fingerprint pairs, in config order).
fn diff(record: &BTreeMap<String, String>, configured: &[(String, String)]) -> Changes {
    let mut changes = Changes::default();
    for (name, fingerprint) in configured {
        match record.get(name) {
            None => changes.added.push(name.clone()),
            Some(recorded) if recorded != fingerprint => changes.changed.push(name.clone()),
            Some(_) => {}
        }
    }
    changes.removed = record
        .keys()
        .filter(|name| !configured.iter().any(|(n, _)| n == *name))
        .cloned()
        .collect();
    changes
}

fn from_value<T: redis::FromRedisValue>(value: Option<redis::Value>) -> Result<T, StoreError> {
    let value = value.unwrap_or(redis::Value::Nil);
    redis::from_redis_value(value).map_err(|e| StoreError::Redis(e.into()))
}

fn corrupt(key: &str, field: &str, value: &str) -> StoreError {
    StoreError::Corrupt {
        key: key.into(),
        field: field.into(),
        detail: format!("{value:?} is not a SCAN cursor"),
    }
}

/// `rebuild.lua` answered something this version does not know (not expected).
fn unexpected(op: &str, answer: &str) -> StoreError {
    StoreError::Redis(redis::RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        "unexpected answer from rebuild.lua",
        format!("{op}: {answer}"),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn the_record_and_the_configuration_differ_by_added_changed_and_removed_segments() {
        let record: BTreeMap<String, String> = pairs(&[("a", "1"), ("b", "2"), ("gone", "3")])
            .into_iter()
            .collect();
        let configured = pairs(&[("new", "9"), ("b", "7"), ("a", "1")]);
        assert_eq!(
            diff(&record, &configured),
            Changes {
                added: vec!["new".into()],
                changed: vec!["b".into()],
                removed: vec!["gone".into()],
            }
        );
        let same = pairs(&[("b", "2"), ("gone", "3"), ("a", "1")]);
        assert!(diff(&record, &same).is_empty());
        assert!(!diff(&record, &pairs(&[("a", "1"), ("b", "2")])).needs_walk());
    }
}
