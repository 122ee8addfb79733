//! The collector's view of profile storage: a small trait, implemented by
//! [`profile_cache::RedisProfiles`] and, for handler unit tests, by [`MemoryStore`].

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use async_trait::async_trait;
use profile_cache::{ApplyReport, Profile, ProfileUpdate, RedisProfiles, StoreError};
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
}

/// An in-memory store for handler tests: records updates, dedupes by message id, and
/// answers `find` with profiles placed by the test. It models no profile logic.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Memory>,
}

#[derive(Default)]
struct Memory {
    applied: Vec<ProfileUpdate>,
    seen: HashSet<(String, uuid::Uuid)>,
    profiles: BTreeMap<String, Profile>,
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
}
