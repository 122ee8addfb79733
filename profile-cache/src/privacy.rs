//! Privacy rights: exporting everything stored about a person ([`RedisProfiles::export`]),
//! erasing it ([`RedisProfiles::erase`]), and keeping an erased person from coming back
//! ([`RedisProfiles::apply_batch`]).
//!
//! # Who the person is
//!
//! The id a caller names is looked up as the read API does: a user id first, then an
//! anonymous id. An anonymous profile merged into a user profile (its hash keeps only
//! `merged_into`) stands for that user profile. The person is then the profile and the
//! anonymous profiles merged into it: the `anon:` members of its `ids` set, the merged
//! entries of its `merges` hash, and the anonymous profile named, unless one of them was
//! merged into another user.
//!
//! # Suppression
//!
//! Erasing writes, for each of the person's profile ids, a suppression key
//! ([`keys::suppressed`]: the SHA-256 of the id, in the id's Redis Cluster slot, never the
//! id). The apply script checks it in the same call that would write the profile: an update
//! of an erased profile writes nothing and applies no event, so a late event cannot
//! recreate the person. Since every event of a batch is otherwise applied or a duplicate, a
//! shortfall tells [`RedisProfiles::apply_batch`] that some update was suppressed, and only
//! then does it spend one more round trip to find which.
//!
//! # Erasing, step by step
//!
//! Each step can be repeated, and the person's data stays findable by the id (and by every
//! anonymous id) until the last step, so a retry after a failure at any point finishes the
//! erasure; a retry after the end finds the suppression keys and answers that the person
//! was erased already.
//!
//! 1. Suppress the profile, and in the same transaction read its ids, merges and segments
//!    (after the suppression, no update can link another anonymous id to it).
//! 2. Suppress the anonymous profiles merged into it.
//! 3. Take every profile out of every segment member set (the configured segments and those
//!    in its `segments` hash) and out of `schedule:deadlines`.
//! 4. Delete their entries from `stream:events` and `stream:transitions` (`XDEL`), found by
//!    scanning each stream up to its last entry at the start of the scan, in pages of
//!    [`STREAM_PAGE`] entries (`privacy_streams.lua`).
//! 5. In one transaction, delete every key of every profile, and their schedule entries
//!    again (a segment rebuild may have claimed a profile in between).
//!
//! The streams have no index by profile: an export or erasure reads both whole, one round
//! trip and about a millisecond of Redis time per page ([`STREAM_PAGE`]), so its cost grows
//! with the streams' lengths (`profiles.event_stream_max_len`,
//! `profiles.transition_stream_max_len`), not with the person's history: about 4 µs of Redis
//! time per entry, 4 s for a full event stream of 1,000,000.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::LazyLock;

use redis::Value;
use serde::Serialize;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tracing::{info, warn};

use crate::audit::Subject;
use crate::keys::{self, DEADLINES, EVENT_STREAM, ProfileKeys, TRANSITION_STREAM};
use crate::model::{ApplyReport, ConsentState, Profile, ProfileId, ProfileUpdate, Purpose};
use crate::schedule::parse_profile_id;
use crate::script::millis;
use crate::store::{RedisProfiles, StoreError};

/// Entries read per call when scanning a stream. Measured with event entries of about 480
/// bytes: a call holds Redis for about 1 ms (most of it copying the page into Lua), during
/// which it serves nothing else; a whole stream of 1,000,000 entries takes about 4 s of
/// Redis time in 4,000 calls. Pages of 1,000 cost the same in all but held Redis for 3 to
/// 4 ms at a time.
pub const STREAM_PAGE: usize = 250;

/// The SHA-256 of `text` (its UTF-8 bytes): how ids are kept where they must not be
/// readable, in suppression keys ([`keys::suppressed`], of the profile id, `u:alice`) and in
/// the audit stream ([`crate::audit`], of the id as the caller named it). Shown as 64
/// lowercase hex digits.
pub fn hash_id(text: &str) -> Subject {
    Subject::from_sha256(Sha256::digest(text.as_bytes()).into())
}

static READ_KEYS: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("privacy_keys.lua")));
static SCAN_STREAM: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("privacy_streams.lua")));

/// A batch applied by [`RedisProfiles::apply_batch`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchReport {
    /// What [`RedisProfiles::apply`] reported; suppressed events are neither applied nor
    /// duplicates.
    pub report: ApplyReport,
    /// The indices of the updates that were dropped, events and all, because their profile
    /// was erased.
    pub suppressed: Vec<usize>,
    /// The events of those updates.
    pub suppressed_events: u64,
}

/// Everything stored about a person ([`RedisProfiles::export`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Export {
    /// The person's profile: `u:<user id>`, or `a:<anonymous id>` for a visitor never
    /// identified.
    pub profile_id: ProfileId,
    /// The user id, for a known user.
    pub user_id: Option<String>,
    /// The anonymous ids whose profiles are part of the person (merged into the user
    /// profile, or the visitor's own), sorted.
    pub anonymous_ids: Vec<String>,
    /// When the export was made.
    #[serde(with = "time::serde::rfc3339")]
    pub exported_at: OffsetDateTime,
    /// The profile as the read API shows it (`GET /v1/profiles/{id}`); `None` when its data
    /// cannot be read as a profile (the raw keys are exported all the same).
    pub profile: Option<Profile>,
    /// Consent answers by purpose, as in the profile.
    pub consent: BTreeMap<Purpose, ConsentState>,
    /// The segment member sets the person's profiles are in now.
    pub segments: Vec<ExportedMembership>,
    /// The profiles' entries in `schedule:deadlines`: profile id to its next deadline
    /// (Unix ms).
    pub schedule: BTreeMap<String, i64>,
    /// Every key of the person's profiles, by name, as stored.
    pub keys: BTreeMap<String, StoredKey>,
    /// The profiles' entries still in `stream:events`, oldest first.
    pub events: Vec<StreamEntry>,
    /// The profiles' entries still in `stream:transitions`, oldest first.
    pub transitions: Vec<StreamEntry>,
    /// How many entries the scans read, to find those.
    pub scanned: Scanned,
}

/// A membership found in a segment's member set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExportedMembership {
    /// The segment.
    pub segment: String,
    /// The member: one of the person's profile ids.
    pub profile_id: String,
    /// When it entered (Unix ms, the member's score).
    pub entered_at_ms: i64,
}

/// One key's value as stored, by type.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum StoredKey {
    /// Field to value.
    Hash(BTreeMap<String, String>),
    /// Members, sorted.
    Set(Vec<String>),
    /// Members with their scores, lowest score first.
    Zset(Vec<(String, serde_json::Value)>),
    /// A string.
    String(String),
    /// Elements in order.
    List(Vec<String>),
    /// Entries in order.
    Stream(Vec<StreamEntry>),
}

/// A stream entry: its id and fields, in order. A field named `event` that holds JSON (the
/// event log's) is shown as that JSON.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StreamEntry {
    /// The entry id, `<ms>-<seq>`.
    pub id: String,
    /// Its fields.
    pub fields: serde_json::Map<String, serde_json::Value>,
}

/// Entries read by the stream scans of an export or an erasure.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Scanned {
    /// Of `stream:events`.
    pub events: u64,
    /// Of `stream:transitions`.
    pub transitions: u64,
}

/// Whether [`RedisProfiles::erase`] erased anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErasureStatus {
    /// The person's data was erased now.
    Erased,
    /// The person had been erased before: nothing was left to erase.
    AlreadyErased,
}

/// What [`RedisProfiles::erase`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Erasure {
    /// The person's profile.
    pub profile_id: ProfileId,
    /// Erased now, or before.
    pub status: ErasureStatus,
    /// Profiles erased and suppressed: the person's and the anonymous ones merged into it.
    pub profiles: u64,
    /// Keys deleted.
    pub keys: u64,
    /// Memberships removed from segment member sets.
    pub segment_memberships: u64,
    /// Entries removed from `schedule:deadlines`.
    pub schedule_entries: u64,
    /// Entries deleted from `stream:events`.
    pub events: u64,
    /// Entries deleted from `stream:transitions`.
    pub transitions: u64,
    /// Entries the stream scans read.
    pub scanned: Scanned,
}

impl Erasure {
    /// The answer for a person erased before.
    pub fn already(profile_id: ProfileId) -> Self {
        Self {
            profile_id,
            status: ErasureStatus::AlreadyErased,
            profiles: 0,
            keys: 0,
            segment_memberships: 0,
            schedule_entries: 0,
            events: 0,
            transitions: 0,
            scanned: Scanned::default(),
        }
    }
}

/// What an id names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Person {
    /// A profile with data: `target`, reached through the anonymous profile `via` when the
    /// id named one merged into it.
    Live {
        target: ProfileId,
        via: Option<ProfileId>,
    },
    /// Nothing is left but the suppression of this profile.
    Erased(ProfileId),
    /// Nothing, and never erased.
    Unknown,
}

impl RedisProfiles {
    /// Which of `profiles` belong to erased people (their suppression key exists), in
    /// order. One round trip; none for an empty list.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when Redis cannot be reached.
    pub async fn suppressed(&self, profiles: &[ProfileId]) -> Result<Vec<bool>, StoreError> {
        if profiles.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for p in profiles {
            pipe.exists(keys::suppressed(p));
        }
        let mut conn = self.conn.clone();
        Ok(pipe.query_async(&mut conn).await?)
    }

    /// Applies a batch as [`RedisProfiles::apply`] does, and says which updates were
    /// dropped because their profile was erased. That costs one more round trip, and only
    /// for a batch in which some events were neither applied nor duplicates.
    ///
    /// # Errors
    /// As [`RedisProfiles::apply`].
    pub async fn apply_batch(&self, updates: &[ProfileUpdate]) -> Result<BatchReport, StoreError> {
        let report = self.apply(updates).await?;
        let mut out = BatchReport {
            report,
            ..BatchReport::default()
        };
        let sent: u64 = updates.iter().map(|u| u.events.len() as u64).sum();
        if report.applied + report.duplicates >= sent {
            return Ok(out);
        }
        let profiles: Vec<ProfileId> = updates.iter().map(|u| u.profile.clone()).collect();
        let flags = self.suppressed(&profiles).await?;
        for (i, (update, suppressed)) in updates.iter().zip(flags).enumerate() {
            if suppressed && !update.events.is_empty() {
                out.suppressed.push(i);
                out.suppressed_events += update.events.len() as u64;
            }
        }
        Ok(out)
    }

    /// Everything stored about the person `id` names (a user id, else an anonymous id),
    /// as of `now`; `None` when nothing is (never stored, or erased).
    ///
    /// Reads the profile as the API shows it, every key of the person's profiles, their
    /// segment memberships and schedule entries, and their entries in both streams, which
    /// takes a scan of each stream (see the module documentation for the cost). Each part is
    /// consistent by itself; an update during the export may show in one part and not yet
    /// in another.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when Redis cannot be reached, another [`StoreError`]
    /// when a stream is not a stream.
    pub async fn export(
        &self,
        id: &str,
        now: OffsetDateTime,
    ) -> Result<Option<Export>, StoreError> {
        let Person::Live { target, via } = self.person(id).await? else {
            return Ok(None);
        };
        let mut conn = self.conn.clone();
        let own = read_keys(&mut conn, std::slice::from_ref(&target)).await?;
        let ids = set_of(own.get(&keys::ids(&target)));
        let merges = hash_of(own.get(&keys::merges(&target)));
        let anonymous = self.merged_in(&target, &ids, &merges, via).await?;
        let mut stored = own;
        stored.extend(read_keys(&mut conn, &anonymous).await?);

        let profile = match self.profile(&target, now).await {
            Ok(profile) => profile,
            Err(StoreError::Corrupt { .. }) => {
                warn!("an exported profile cannot be read as a profile; its keys are exported");
                None
            }
            Err(e) => return Err(e),
        };
        let profiles: Vec<ProfileId> = std::iter::once(target.clone())
            .chain(anonymous.iter().cloned())
            .collect();
        let (segments, schedule) = self.memberships(&profiles, &stored).await?;
        let names: Vec<String> = profiles.iter().map(|p| p.to_string()).collect();
        let (events, scanned_events) = self.scan_read(EVENT_STREAM, &names).await?;
        let (transitions, scanned_transitions) = self.scan_read(TRANSITION_STREAM, &names).await?;
        Ok(Some(Export {
            user_id: target.as_str().strip_prefix("u:").map(String::from),
            anonymous_ids: profiles
                .iter()
                .filter_map(|p| p.as_str().strip_prefix("a:").map(String::from))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
            profile_id: target,
            exported_at: now,
            consent: profile
                .as_ref()
                .map(|p| p.consent.clone())
                .unwrap_or_default(),
            profile,
            segments,
            schedule,
            keys: stored,
            events,
            transitions,
            scanned: Scanned {
                events: scanned_events,
                transitions: scanned_transitions,
            },
        }))
    }

    /// Erases the person `id` names (a user id, else an anonymous id) at `now`: every key
    /// of their profile and of the anonymous profiles merged into it (redirects included),
    /// their memberships in every segment member set, their schedule entries and their
    /// entries in `stream:events` and `stream:transitions`; and suppresses each of their
    /// profile ids, so that later events for them are dropped ([`keys::suppressed`]).
    /// `None` when the id names nothing and was never erased; [`ErasureStatus::AlreadyErased`]
    /// when it was.
    ///
    /// Safe to repeat: a call that fails midway leaves the person findable, and a repeat
    /// finishes the erasure (see the module documentation for the steps).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when Redis cannot be reached (retry), another
    /// [`StoreError`] when a stream is not a stream.
    pub async fn erase(
        &self,
        id: &str,
        now: OffsetDateTime,
    ) -> Result<Option<Erasure>, StoreError> {
        let (target, via) = match self.person(id).await? {
            Person::Unknown => return Ok(None),
            Person::Erased(profile) => return Ok(Some(Erasure::already(profile))),
            Person::Live { target, via } => (target, via),
        };
        let at = millis(now);
        let mut conn = self.conn.clone();

        // 1. Suppressed first, then read in the same transaction: no update can link
        // another anonymous id to the profile after the suppression.
        let k = ProfileKeys::new(&target);
        let replies: Vec<Value> = redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(keys::suppressed(&target))
            .arg(at)
            .arg("NX")
            .ignore()
            .smembers(&k.ids)
            .hgetall(&k.merges)
            .hkeys(&k.segments)
            // A key of the wrong type is read as empty; the last step deletes it anyway.
            .ignore_errors()
            .query_async(&mut conn)
            .await?;
        let mut replies = replies.into_iter();
        let ids: Vec<String> = lenient(replies.next());
        let merges: BTreeMap<String, String> = lenient(replies.next());
        let own_segments: Vec<String> = lenient(replies.next());

        // 2. The anonymous profiles merged into it.
        let anonymous = self.merged_in(&target, &ids, &merges, via).await?;
        let mut pipe = redis::pipe();
        for a in &anonymous {
            pipe.cmd("SET")
                .arg(keys::suppressed(a))
                .arg(at)
                .arg("NX")
                .ignore();
            pipe.hkeys(keys::segments(a));
        }
        let anonymous_segments: Vec<Value> = if anonymous.is_empty() {
            Vec::new()
        } else {
            pipe.ignore_errors().query_async(&mut conn).await?
        };

        // 3. Out of every segment and the schedule.
        let profiles: Vec<ProfileId> = std::iter::once(target.clone())
            .chain(anonymous.iter().cloned())
            .collect();
        let mut segment_names = vec![own_segments];
        segment_names.extend(anonymous_segments.into_iter().map(|v| lenient(Some(v))));
        let mut pipe = redis::pipe();
        for (p, names) in profiles.iter().zip(&segment_names) {
            for key in self.member_sets(names) {
                pipe.zrem(key, p.as_str());
            }
            pipe.zrem(DEADLINES, p.as_str());
        }
        let removed: Vec<u64> = pipe.query_async(&mut conn).await?;
        let (mut segment_memberships, mut schedule_entries) = (0, 0);
        let mut removed = removed.into_iter();
        for (_, names) in profiles.iter().zip(&segment_names) {
            segment_memberships += removed
                .by_ref()
                .take(self.member_sets(names).len())
                .sum::<u64>();
            schedule_entries += removed.next().unwrap_or(0);
        }

        // 4. The streams.
        let names: Vec<String> = profiles.iter().map(|p| p.to_string()).collect();
        let (events, scanned_events) = self.scan_delete(EVENT_STREAM, &names).await?;
        let (transitions, scanned_transitions) =
            self.scan_delete(TRANSITION_STREAM, &names).await?;

        // 5. The keys, all at once: until now a retry finds the person by any of its ids.
        let mut pipe = redis::pipe();
        pipe.atomic();
        for p in &profiles {
            pipe.del(&ProfileKeys::new(p).all()[..]);
        }
        for p in &profiles {
            pipe.zrem(DEADLINES, p.as_str());
        }
        let deleted: Vec<u64> = pipe.query_async(&mut conn).await?;
        let keys_deleted: u64 = deleted[..profiles.len()].iter().sum();
        schedule_entries += deleted[profiles.len()..].iter().sum::<u64>();
        info!(
            profiles = profiles.len(),
            keys = keys_deleted,
            events,
            transitions,
            "a person was erased"
        );
        Ok(Some(Erasure {
            profile_id: target,
            status: ErasureStatus::Erased,
            profiles: profiles.len() as u64,
            keys: keys_deleted,
            segment_memberships,
            schedule_entries,
            events,
            transitions,
            scanned: Scanned {
                events: scanned_events,
                transitions: scanned_transitions,
            },
        }))
    }

    /// What `id` names: a user profile with data, else an anonymous one (standing for the
    /// user profile it was merged into), else an erased user, else an erased visitor. One
    /// round trip.
    async fn person(&self, id: &str) -> Result<Person, StoreError> {
        let candidates: Vec<ProfileId> = [ProfileId::user(id), ProfileId::anonymous(id)]
            .into_iter()
            .filter_map(Result::ok)
            .collect();
        if candidates.is_empty() {
            return Ok(Person::Unknown);
        }
        let mut pipe = redis::pipe();
        for c in &candidates {
            let k = ProfileKeys::new(c);
            pipe.hget(&k.profile, "merged_into")
                .exists(&k.all()[..])
                .exists(keys::suppressed(c));
        }
        let mut conn = self.conn.clone();
        let replies: Vec<Value> = pipe.ignore_errors().query_async(&mut conn).await?;
        let states: Vec<(Option<String>, u64, bool)> = replies
            .chunks(3)
            .map(|r| {
                (
                    lenient(r.first().cloned()),
                    lenient(r.get(1).cloned()),
                    lenient(r.get(2).cloned()),
                )
            })
            .collect();
        for (c, (merged_into, keys, _)) in candidates.iter().zip(&states) {
            if *keys == 0 {
                continue;
            }
            let into = merged_into
                .as_deref()
                .and_then(parse_profile_id)
                .filter(|t| c.as_str().starts_with("a:") && t.as_str().starts_with("u:"));
            return Ok(match into {
                Some(target) => Person::Live {
                    target,
                    via: Some(c.clone()),
                },
                None => Person::Live {
                    target: c.clone(),
                    via: None,
                },
            });
        }
        Ok(candidates
            .iter()
            .zip(&states)
            .find(|(_, (_, _, erased))| *erased)
            .map_or(Person::Unknown, |(c, _)| Person::Erased(c.clone())))
    }

    /// The anonymous profiles that are part of `target`: the `anon:` members of its `ids`,
    /// the merged (timed or `folded`) entries of its `merges`, and `via`; without those merged into
    /// another user profile (a merge refused a moment later). One round trip when there
    /// are any.
    async fn merged_in(
        &self,
        target: &ProfileId,
        ids: &[String],
        merges: &BTreeMap<String, String>,
        via: Option<ProfileId>,
    ) -> Result<Vec<ProfileId>, StoreError> {
        let mut candidates = BTreeSet::new();
        for member in ids {
            if let Some(a) = member.strip_prefix("anon:")
                && let Ok(p) = ProfileId::anonymous(a)
            {
                candidates.insert(p);
            }
        }
        for (source, merged) in merges {
            if (merged == "folded" || merged.bytes().all(|b| b.is_ascii_digit()))
                && let Some(p) = parse_profile_id(source)
            {
                candidates.insert(p);
            }
        }
        candidates.extend(via);
        candidates.remove(target);
        candidates.retain(|p| p.as_str().starts_with("a:"));
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for p in &candidates {
            pipe.hget(keys::profile(p), "merged_into");
        }
        let mut conn = self.conn.clone();
        let into: Vec<Value> = pipe.ignore_errors().query_async(&mut conn).await?;
        Ok(candidates
            .into_iter()
            .zip(into)
            .filter(|(_, into)| {
                lenient::<Option<String>>(Some(into.clone())).is_none_or(|t| t == target.as_str())
            })
            .map(|(p, _)| p)
            .collect())
    }

    /// The member sets to look in for a profile: every configured segment's, and those of
    /// the segments in its `segments` hash (`names`; a segment no longer configured keeps
    /// members until a rebuild takes them out).
    fn member_sets(&self, names: &[String]) -> BTreeSet<String> {
        self.member_keys
            .iter()
            .cloned()
            .chain(names.iter().map(|n| keys::segment_members(n)))
            .collect()
    }

    /// The segment memberships and schedule entries of `profiles`, whose keys `stored`
    /// holds. One round trip.
    async fn memberships(
        &self,
        profiles: &[ProfileId],
        stored: &BTreeMap<String, StoredKey>,
    ) -> Result<(Vec<ExportedMembership>, BTreeMap<String, i64>), StoreError> {
        let mut asked = Vec::new();
        let mut pipe = redis::pipe();
        for p in profiles {
            let names: Vec<String> = hash_of(stored.get(&keys::segments(p)))
                .into_keys()
                .collect();
            for key in self.member_sets(&names) {
                pipe.zscore(&key, p.as_str());
                asked.push((p, Some(key)));
            }
            pipe.zscore(DEADLINES, p.as_str());
            asked.push((p, None));
        }
        let mut conn = self.conn.clone();
        let scores: Vec<Option<f64>> = pipe.query_async(&mut conn).await?;
        let (mut segments, mut schedule) = (Vec::new(), BTreeMap::new());
        for ((p, key), score) in asked.into_iter().zip(scores) {
            let Some(score) = score else { continue };
            // Scores are whole milliseconds.
            let ms = score as i64;
            match key {
                Some(key) => segments.push(ExportedMembership {
                    segment: segment_of_key(&key),
                    profile_id: p.to_string(),
                    entered_at_ms: ms,
                }),
                None => {
                    schedule.insert(p.to_string(), ms);
                }
            }
        }
        Ok((segments, schedule))
    }

    /// The entries of `profiles` in `stream`, and how many entries the scan read.
    async fn scan_read(
        &self,
        stream: &str,
        profiles: &[String],
    ) -> Result<(Vec<StreamEntry>, u64), StoreError> {
        let mut found = Vec::new();
        let scanned = self
            .scan(stream, profiles, "read", |page| found.extend(entries(page)))
            .await?;
        Ok((found, scanned))
    }

    /// Deletes the entries of `profiles` from `stream`: how many, and how many entries the
    /// scan read.
    async fn scan_delete(
        &self,
        stream: &str,
        profiles: &[String],
    ) -> Result<(u64, u64), StoreError> {
        let mut deleted = 0;
        let scanned = self
            .scan(stream, profiles, "delete", |page| {
                deleted += lenient::<u64>(Some(page));
            })
            .await?;
        Ok((deleted, scanned))
    }

    /// Runs `privacy_streams.lua` over `stream` page by page, up to the entry that was last
    /// when the scan began, handing each page's `found` to `each`; returns the entries read.
    async fn scan(
        &self,
        stream: &str,
        profiles: &[String],
        mode: &str,
        mut each: impl FnMut(Value),
    ) -> Result<u64, StoreError> {
        let mut conn = self.conn.clone();
        // Entries added after this one are not the person's: they are suppressed by now.
        let last: Value = match redis::cmd("XREVRANGE")
            .arg(stream)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut conn)
            .await
        {
            Ok(last) => last,
            Err(e) if e.code() == Some("WRONGTYPE") => {
                return Err(StoreError::Corrupt {
                    key: stream.into(),
                    field: "-".into(),
                    detail: "is not a stream".into(),
                });
            }
            Err(e) => return Err(e.into()),
        };
        let Some(stop) = entries(last).into_iter().next().map(|e| e.id) else {
            return Ok(0);
        };
        let mut start = "-".to_string();
        let mut scanned = 0;
        loop {
            let mut inv = SCAN_STREAM.prepare_invoke();
            inv.key(stream)
                .arg(&start)
                .arg(&stop)
                .arg(STREAM_PAGE)
                .arg(mode);
            for p in profiles {
                inv.arg(p);
            }
            let reply: Vec<Value> = inv.invoke_async(&mut conn).await?;
            let mut parts = reply.into_iter();
            let last: String = lenient(parts.next());
            let read: u64 = lenient(parts.next());
            each(parts.next().unwrap_or(Value::Nil));
            scanned += read;
            if read < STREAM_PAGE as u64 || last.is_empty() {
                return Ok(scanned);
            }
            start = format!("({last}");
        }
    }
}

/// Every key of each of `profiles`, read by `privacy_keys.lua` in one pipeline (one atomic
/// call per profile); missing keys are left out.
async fn read_keys(
    conn: &mut redis::aio::ConnectionManager,
    profiles: &[ProfileId],
) -> Result<BTreeMap<String, StoredKey>, StoreError> {
    if profiles.is_empty() {
        return Ok(BTreeMap::new());
    }
    let mut pipe = redis::pipe();
    let mut names = Vec::new();
    let invocations: Vec<_> = profiles
        .iter()
        .map(|p| {
            let k = ProfileKeys::new(p);
            let mut inv = READ_KEYS.prepare_invoke();
            for key in k.all() {
                inv.key(key);
                names.push(key.to_string());
            }
            inv
        })
        .collect();
    for inv in &invocations {
        pipe.invoke_script(inv);
    }
    let replies: Vec<Vec<Value>> = match pipe.query_async(conn).await {
        Err(e) if crate::store::is_noscript(&e) => {
            READ_KEYS.prepare_invoke().load_async(conn).await?;
            pipe.query_async(conn).await?
        }
        result => result?,
    };
    let mut out = BTreeMap::new();
    for (name, reply) in names.into_iter().zip(replies.into_iter().flatten()) {
        if let Some(value) = stored_key(reply) {
            out.insert(name, value);
        }
    }
    Ok(out)
}

/// One `{type, value}` of `privacy_keys.lua`; `None` for a missing key.
fn stored_key(reply: Value) -> Option<StoredKey> {
    let Value::Array(parts) = reply else {
        return None;
    };
    let mut parts = parts.into_iter();
    let kind: String = lenient(parts.next());
    let value = parts.next().unwrap_or(Value::Nil);
    Some(match kind.as_str() {
        "hash" => StoredKey::Hash(lenient(Some(value))),
        "set" => {
            let mut members: Vec<String> = lenient(Some(value));
            members.sort();
            StoredKey::Set(members)
        }
        "zset" => {
            let flat: Vec<String> = lenient(Some(value));
            StoredKey::Zset(
                flat.chunks(2)
                    .filter_map(|pair| match pair {
                        [member, score] => Some((member.clone(), score_json(score))),
                        _ => None,
                    })
                    .collect(),
            )
        }
        "string" => StoredKey::String(lenient::<Vec<String>>(Some(value)).concat()),
        "list" => StoredKey::List(lenient(Some(value))),
        "stream" => StoredKey::Stream(entries(value)),
        _ => return None,
    })
}

/// A sorted set score as JSON: an integer when it is one (times and counts), else a
/// number.
fn score_json(score: &str) -> serde_json::Value {
    if let Ok(n) = score.parse::<i64>() {
        return n.into();
    }
    score
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or_else(|| score.into(), serde_json::Value::Number)
}

/// Stream entries as XRANGE returns them.
fn entries(value: Value) -> Vec<StreamEntry> {
    let Value::Array(items) = value else {
        return Vec::new();
    };
    items
        .into_iter()
        .filter_map(|item| {
            let Value::Array(parts) = item else {
                return None;
            };
            let mut parts = parts.into_iter();
            let id: String = lenient(parts.next());
            let flat: Vec<String> = lenient(parts.next());
            let mut fields = serde_json::Map::new();
            for pair in flat.chunks(2) {
                if let [name, value] = pair {
                    let value = match name.as_str() {
                        "event" => serde_json::from_str(value)
                            .unwrap_or_else(|_| serde_json::Value::from(value.as_str())),
                        _ => value.as_str().into(),
                    };
                    fields.insert(name.clone(), value);
                }
            }
            (!id.is_empty()).then_some(StreamEntry { id, fields })
        })
        .collect()
}

/// The segment name in a `segment:{NAME}:members` key.
fn segment_of_key(key: &str) -> String {
    key.strip_prefix("segment:{")
        .and_then(|k| k.strip_suffix("}:members"))
        .unwrap_or(key)
        .to_string()
}

/// A stored set's members (empty when missing or another type).
fn set_of(key: Option<&StoredKey>) -> Vec<String> {
    match key {
        Some(StoredKey::Set(members)) => members.clone(),
        _ => Vec::new(),
    }
}

/// A stored hash's fields (empty when missing or another type).
fn hash_of(key: Option<&StoredKey>) -> BTreeMap<String, String> {
    match key {
        Some(StoredKey::Hash(fields)) => fields.clone(),
        _ => BTreeMap::new(),
    }
}

/// A reply as `T`, or `T::default()` when it is missing, an error or of another shape:
/// for reads whose failure only means there is less to find.
fn lenient<T: redis::FromRedisValue + Default>(value: Option<Value>) -> T {
    value
        .and_then(|v| redis::from_redis_value(v).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_hash_like_the_audit_subjects() {
        // `printf %s alice | sha256sum`
        assert_eq!(
            hash_id("alice").to_string(),
            "2bd806c97f0e00af1a1fc3328fa763a9269723c8db8fac4f93af71db186d6e90"
        );
    }

    #[test]
    fn stored_values_keep_their_types() {
        let s = |t: &str| Value::BulkString(t.as_bytes().to_vec());
        let reply =
            |kind: &str, value: Vec<Value>| Value::Array(vec![s(kind), Value::Array(value)]);
        assert_eq!(stored_key(reply("none", vec![])), None);
        assert_eq!(
            stored_key(reply("hash", vec![s("plan"), s("pro")])),
            Some(StoredKey::Hash([("plan".into(), "pro".into())].into()))
        );
        assert_eq!(
            stored_key(reply("set", vec![s("user:b"), s("anon:a")])),
            Some(StoredKey::Set(vec!["anon:a".into(), "user:b".into()]))
        );
        let zset = stored_key(reply(
            "zset",
            vec![s("sku"), s("1795953000000"), s("x"), s("0.5")],
        ));
        assert_eq!(
            serde_json::to_value(zset).unwrap(),
            serde_json::json!({"type": "zset", "value": [["sku", 1_795_953_000_000_i64], ["x", 0.5]]})
        );
        let stream = Value::Array(vec![Value::Array(vec![
            s("1-0"),
            Value::Array(vec![
                s("profile"),
                s("u:a"),
                s("event"),
                s(r#"{"kind":"page"}"#),
            ]),
        ])]);
        assert_eq!(
            serde_json::to_value(entries(stream)).unwrap(),
            serde_json::json!([{"id": "1-0", "fields": {"profile": "u:a", "event": {"kind": "page"}}}])
        );
        assert_eq!(segment_of_key("segment:{vip}:members"), "vip");
    }
}
