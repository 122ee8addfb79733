//! The collector's view of profile storage: a small trait, implemented by
//! [`profile_cache::RedisProfiles`] and, for handler unit tests, by [`MemoryStore`].

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Mutex;

use async_trait::async_trait;
use profile_cache::privacy::{Scanned, StreamEntry};
use profile_cache::{ApplyReport, Profile, ProfileId, ProfileUpdate, RedisProfiles, StoreError};
use profile_cache::{BatchReport, Erasure, ErasureStatus, Export};
use profile_cache::{MemberCursor, MemberPage, MembersRequest, SegmentMember};
use time::OffsetDateTime;

/// Where profiles live.
#[async_trait]
pub trait ProfileStore: Send + Sync + 'static {
    /// Applies the updates of one batch, atomically per profile and idempotently. The
    /// events of an erased person are dropped, neither applied nor duplicates.
    async fn apply(&self, updates: &[ProfileUpdate]) -> Result<ApplyReport, StoreError>;
    /// As [`ProfileStore::apply`], and says which updates were dropped because their
    /// person was erased (at most one more round trip, only when some were).
    async fn apply_batch(&self, updates: &[ProfileUpdate]) -> Result<BatchReport, StoreError>;
    /// Everything stored about the person `id` names (user id, else anonymous id); `None`
    /// when nothing is.
    async fn export(&self, id: &str, now: OffsetDateTime) -> Result<Option<Export>, StoreError>;
    /// Erases the person `id` names and suppresses their ids; `None` when the id names
    /// nothing and was never erased. Safe to repeat.
    async fn erase(&self, id: &str, now: OffsetDateTime) -> Result<Option<Erasure>, StoreError>;
    /// Finds a profile by user id or anonymous id.
    async fn find(&self, id: &str, now: OffsetDateTime) -> Result<Option<Profile>, StoreError>;
    /// Succeeds when the store answers.
    async fn ping(&self) -> Result<(), StoreError>;
    /// The number of members of each segment in `names`, in that order; 0 for a segment
    /// nobody is in.
    async fn segment_sizes(&self, names: &[&str]) -> Result<Vec<u64>, StoreError>;
    /// A page of a segment's members in (entered-at, profile id) order, after
    /// `request.after`, with the requested traits they have.
    async fn segment_members(
        &self,
        segment: &str,
        request: &MembersRequest,
    ) -> Result<MemberPage, StoreError>;
}

#[async_trait]
impl ProfileStore for RedisProfiles {
    async fn apply(&self, updates: &[ProfileUpdate]) -> Result<ApplyReport, StoreError> {
        RedisProfiles::apply(self, updates).await
    }
    async fn apply_batch(&self, updates: &[ProfileUpdate]) -> Result<BatchReport, StoreError> {
        RedisProfiles::apply_batch(self, updates).await
    }
    async fn export(&self, id: &str, now: OffsetDateTime) -> Result<Option<Export>, StoreError> {
        RedisProfiles::export(self, id, now).await
    }
    async fn erase(&self, id: &str, now: OffsetDateTime) -> Result<Option<Erasure>, StoreError> {
        RedisProfiles::erase(self, id, now).await
    }
    async fn find(&self, id: &str, now: OffsetDateTime) -> Result<Option<Profile>, StoreError> {
        RedisProfiles::find(self, id, now).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        RedisProfiles::ping(self).await
    }
    async fn segment_sizes(&self, names: &[&str]) -> Result<Vec<u64>, StoreError> {
        RedisProfiles::segment_sizes(self, names).await
    }
    async fn segment_members(
        &self,
        segment: &str,
        request: &MembersRequest,
    ) -> Result<MemberPage, StoreError> {
        RedisProfiles::segment_members(self, segment, request).await
    }
}

/// An in-memory store for handler tests: records updates, dedupes by message id, and
/// answers `find` and the segment reads with profiles and members placed by the test. An
/// export is the placed profile with the events applied to it; an erasure removes the
/// profile and suppresses its id and anonymous ids, whose updates `apply` then drops. It
/// models no profile or segment logic.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Memory>,
}

#[derive(Default)]
struct Memory {
    applied: Vec<ProfileUpdate>,
    seen: HashSet<(String, uuid::Uuid)>,
    profiles: BTreeMap<String, Profile>,
    /// Segment name to its members, each with every trait of its profile.
    members: BTreeMap<String, Vec<SegmentMember>>,
    /// Profile ids of erased people.
    suppressed: BTreeSet<ProfileId>,
    down: bool,
}

impl MemoryStore {
    /// Every update applied so far, with duplicates removed from their events.
    pub fn applied(&self) -> Vec<ProfileUpdate> {
        self.lock().applied.clone()
    }

    /// Makes `find(id)` return `profile`.
    pub fn put_profile(&self, id: &str, profile: Profile) {
        self.lock().profiles.insert(id.into(), profile);
    }

    /// Puts `member` into `segment`; `member.traits` are all its profile's traits, of which
    /// a page returns the requested ones.
    pub fn put_member(&self, segment: &str, member: SegmentMember) {
        self.lock()
            .members
            .entry(segment.into())
            .or_default()
            .push(member);
    }

    /// Simulates an unreachable store.
    pub fn set_down(&self, down: bool) {
        self.lock().down = down;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Memory> {
        // A poisoned lock only means a test panicked mid-update; the data is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn unavailable() -> StoreError {
    StoreError::Unavailable(redis::RedisError::from((
        redis::ErrorKind::Io,
        "memory store is down",
    )))
}

#[async_trait]
impl ProfileStore for MemoryStore {
    async fn apply(&self, updates: &[ProfileUpdate]) -> Result<ApplyReport, StoreError> {
        let mut m = self.lock();
        if m.down {
            return Err(unavailable());
        }
        let mut report = ApplyReport::default();
        for u in updates {
            if m.suppressed.contains(&u.profile) {
                continue;
            }
            let mut u = u.clone();
            let profile = u.profile.to_string();
            u.events.retain(|e| {
                let fresh = m.seen.insert((profile.clone(), e.message_id));
                if fresh {
                    report.applied += 1;
                } else {
                    report.duplicates += 1;
                }
                fresh
            });
            m.applied.push(u);
        }
        Ok(report)
    }

    async fn apply_batch(&self, updates: &[ProfileUpdate]) -> Result<BatchReport, StoreError> {
        let report = self.apply(updates).await?;
        let m = self.lock();
        let suppressed: Vec<usize> = (0..updates.len())
            .filter(|i| {
                !updates[*i].events.is_empty() && m.suppressed.contains(&updates[*i].profile)
            })
            .collect();
        Ok(BatchReport {
            report,
            suppressed_events: suppressed
                .iter()
                .map(|i| updates[*i].events.len() as u64)
                .sum(),
            suppressed,
        })
    }

    async fn export(&self, id: &str, now: OffsetDateTime) -> Result<Option<Export>, StoreError> {
        let m = self.lock();
        if m.down {
            return Err(unavailable());
        }
        let Some(profile) = m.profiles.get(id).cloned() else {
            return Ok(None);
        };
        let events = m
            .applied
            .iter()
            .filter(|u| u.profile == profile.id)
            .flat_map(|u| &u.events)
            .enumerate()
            .map(|(n, e)| StreamEntry {
                id: format!("{}-0", n + 1),
                fields: serde_json::Map::from_iter([
                    ("profile".to_string(), profile.id.to_string().into()),
                    ("kind".to_string(), e.kind.as_str().into()),
                ]),
            })
            .collect();
        Ok(Some(Export {
            profile_id: profile.id.clone(),
            user_id: profile.user_id.clone(),
            anonymous_ids: profile.anonymous_ids.clone(),
            exported_at: now,
            consent: profile.consent.clone(),
            profile: Some(profile),
            segments: Vec::new(),
            schedule: BTreeMap::new(),
            keys: BTreeMap::new(),
            events,
            transitions: Vec::new(),
            scanned: Scanned::default(),
        }))
    }

    async fn erase(&self, id: &str, _now: OffsetDateTime) -> Result<Option<Erasure>, StoreError> {
        let mut m = self.lock();
        if m.down {
            return Err(unavailable());
        }
        let Some(profile) = m.profiles.remove(id) else {
            let erased = [ProfileId::user(id), ProfileId::anonymous(id)]
                .into_iter()
                .filter_map(Result::ok)
                .find(|p| m.suppressed.contains(p));
            return Ok(erased.map(Erasure::already));
        };
        m.profiles.retain(|_, p| p.id != profile.id);
        let mut erased = vec![profile.id.clone()];
        for a in &profile.anonymous_ids {
            if let Ok(a) = ProfileId::anonymous(a)
                && !erased.contains(&a)
            {
                erased.push(a);
            }
        }
        let events = m
            .applied
            .iter()
            .filter(|u| erased.contains(&u.profile))
            .map(|u| u.events.len() as u64)
            .sum();
        m.applied.retain(|u| !erased.contains(&u.profile));
        let profiles = erased.len() as u64;
        m.suppressed.extend(erased);
        Ok(Some(Erasure {
            profile_id: profile.id,
            status: ErasureStatus::Erased,
            profiles,
            keys: 0,
            segment_memberships: 0,
            schedule_entries: 0,
            events,
            transitions: 0,
            scanned: Scanned::default(),
        }))
    }

    async fn find(&self, id: &str, _now: OffsetDateTime) -> Result<Option<Profile>, StoreError> {
        let m = self.lock();
        if m.down {
            return Err(unavailable());
        }
        Ok(m.profiles.get(id).cloned())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        if self.lock().down {
            return Err(unavailable());
        }
        Ok(())
    }

    async fn segment_sizes(&self, names: &[&str]) -> Result<Vec<u64>, StoreError> {
        let m = self.lock();
        if m.down {
            return Err(unavailable());
        }
        Ok(names
            .iter()
            .map(|name| m.members.get(*name).map_or(0, |v| v.len() as u64))
            .collect())
    }

    async fn segment_members(
        &self,
        segment: &str,
        request: &MembersRequest,
    ) -> Result<MemberPage, StoreError> {
        let m = self.lock();
        if m.down {
            return Err(unavailable());
        }
        // The same order and cursor semantics as Redis: (entered-at, id), after the cursor.
        let mut members: Vec<SegmentMember> = m
            .members
            .get(segment)
            .into_iter()
            .flatten()
            .filter(|member| {
                request
                    .after
                    .as_ref()
                    .is_none_or(|after| MemberCursor::after(member) > *after)
            })
            .cloned()
            .collect();
        members.sort_by_key(MemberCursor::after);
        let more = members.len() > request.limit.get();
        members.truncate(request.limit.get());
        for member in &mut members {
            member
                .traits
                .retain(|name, _| request.traits.contains(name));
        }
        let next = if more {
            members.last().map(MemberCursor::after)
        } else {
            None
        };
        Ok(MemberPage { members, next })
    }
}
