//! The collector's view of profile storage: a small trait, implemented by
//! [`profile_cache::RedisProfiles`] and, for handler unit tests, by [`MemoryStore`].

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use async_trait::async_trait;
use profile_cache::{ApplyReport, Profile, ProfileUpdate, RedisProfiles, StoreError};
use profile_cache::{MemberCursor, MemberPage, MembersRequest, SegmentMember};
use time::OffsetDateTime;

/// Where profiles live.
#[async_trait]
pub trait ProfileStore: Send + Sync + 'static {
    /// Applies the updates of one batch, atomically per profile and idempotently.
    async fn apply(&self, updates: &[ProfileUpdate]) -> Result<ApplyReport, StoreError>;
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
/// answers `find` and the segment reads with profiles and members placed by the test. It
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
