//! Identity: merging an anonymous visitor's profile into the user profile it turned out to
//! be, and sending later updates of a merged profile to the user profile.
//!
//! An update of a user profile that carries an anonymous id (the batch of a visitor who
//! has identified) links that id to the user profile, and the apply script reports the
//! anonymous profile as still to be merged until the merge is recorded. The merge then
//! runs in three script calls, each on one profile's keys (one Redis Cluster slot), each
//! atomic and safe to repeat (`merge.lua` describes them): seal the anonymous profile and
//! read its data; fold that data into the user profile; delete the anonymous profile's
//! keys but for a redirect. A crash between two calls leaves the anonymous profile sealed,
//! and the next update of either profile finishes the merge; meanwhile the anonymous
//! profile's updates are held back from it and applied to the user profile after the
//! merge, so nothing is counted twice or lost.
//!
//! Guards: two user profiles are never merged (only anonymous profiles are folded in); an
//! anonymous profile merged into one user is never merged into a second (the second user's
//! link is refused and recorded as `refused` in its `merges` hash); a user profile takes at
//! most [`crate::ProfileConfig::max_anonymous_ids`] anonymous ids (`limit`).

use std::sync::LazyLock;

use redis::Value;
use serde::Deserialize;
use time::OffsetDateTime;

use crate::keys::{self, DEADLINES, ProfileKeys, TRANSITION_STREAM};
use crate::model::ProfileId;
use crate::schedule::parse_profile_id;
use crate::script::{self, millis};
use crate::store::{RedisProfiles, StoreError};

/// The script of the anonymous side of a merge.
static MERGE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("merge.lua")));

/// Replaces `folded` in a user profile's `merges` hash with the time the merge finished.
static RECORD_FINISHED: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        "if redis.call('HGET', KEYS[1], ARGV[1]) == 'folded' then \
           redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end return 0",
    )
});

/// What the apply script answered for one update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Applied {
    /// Applied: events applied and skipped as duplicates, and what the update means for the
    /// identity of the profile.
    Done {
        applied: u64,
        duplicates: u64,
        link: Link,
    },
    /// The profile was merged into `target`; nothing was written. `sealed`: the merge has
    /// not finished.
    Redirect { target: ProfileId, sealed: bool },
}

/// What an applied update says about its anonymous id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Link {
    /// Nothing to do.
    None,
    /// This anonymous profile is to be merged into the updated user profile.
    Merge(ProfileId),
    /// The user profile has as many anonymous ids as it may take: not linked.
    Limit,
}

/// How a merge ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeOutcome {
    /// The anonymous profile's data is now part of the user profile (now or before).
    Merged,
    /// The anonymous profile had been merged into another user profile: left alone.
    Refused,
}

/// Reads one apply script reply.
pub(crate) fn applied(reply: Value) -> Result<Applied, StoreError> {
    let unexpected = |what: &str| StoreError::Corrupt {
        key: "?".into(),
        field: "-".into(),
        detail: format!("unexpected apply script reply: {what}"),
    };
    let Value::Array(parts) = reply else {
        return Err(unexpected(&format!("{reply:?}")));
    };
    match parts.as_slice() {
        [Value::Int(applied), Value::Int(duplicates), link] => {
            let link: String = redis::from_redis_value(link.clone())
                .map_err(|_| unexpected("the link is not text"))?;
            let link = match link.as_str() {
                "" => Link::None,
                "limit" => Link::Limit,
                id => Link::Merge(
                    parse_profile_id(id).ok_or_else(|| unexpected("the link is no profile id"))?,
                ),
            };
            Ok(Applied::Done {
                applied: u64::try_from(*applied).unwrap_or(0),
                duplicates: u64::try_from(*duplicates).unwrap_or(0),
                link,
            })
        }
        [tag, target, state] => {
            let text = |v: &Value| redis::from_redis_value::<String>(v.clone()).ok();
            match (text(tag).as_deref(), text(target), text(state)) {
                (Some("merged"), Some(target), Some(state)) => Ok(Applied::Redirect {
                    target: parse_profile_id(&target).ok_or_else(|| StoreError::Corrupt {
                        key: "?".into(),
                        field: "merged_into".into(),
                        detail: format!("{target:?} is not a profile id"),
                    })?,
                    sealed: state != "done",
                }),
                _ => Err(unexpected(&format!("{parts:?}"))),
            }
        }
        _ => Err(unexpected(&format!("{parts:?}"))),
    }
}

impl RedisProfiles {
    /// Merges anonymous profile `source` into user profile `target` at `now`, or finishes a
    /// merge a crash interrupted. Safe to call again at any time, by any number of
    /// collectors at once.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when Redis cannot be reached (the merge resumes later),
    /// [`StoreError::Corrupt`] when either profile holds data this version cannot read.
    pub async fn merge(
        &self,
        source: &ProfileId,
        target: &ProfileId,
        now: OffsetDateTime,
    ) -> Result<MergeOutcome, StoreError> {
        if !target.as_str().starts_with("u:") {
            return Err(StoreError::Corrupt {
                key: keys::profile(source),
                field: "merged_into".into(),
                detail: format!("{target} is not a user profile"),
            });
        }
        let mut conn = self.conn.clone();
        let script = &*MERGE;
        let anonymous = ProfileKeys::new(source);
        let call = |op: &str, segments: &[String]| {
            let mut inv = script.prepare_invoke();
            for key in anonymous.all() {
                inv.key(key);
            }
            inv.key(TRANSITION_STREAM)
                .key(DEADLINES)
                .key(keys::suppressed(source));
            for name in segments {
                inv.key(keys::segment_members(name));
            }
            inv.arg(op)
                .arg(target.as_str())
                .arg(millis(now))
                .arg(self.config.transition_stream_max_len);
            for name in segments {
                inv.arg(name);
            }
            inv
        };

        let sealed: Vec<Value> = call("seal", &[]).invoke_async(&mut conn).await?;
        let snapshot = match reply_tag(&sealed).as_deref() {
            Some("sealed") => text_at(&sealed, 1).unwrap_or_default(),
            // Erased meanwhile: nothing to merge.
            Some("erased") => return Ok(MergeOutcome::Refused),
            Some("done") => {
                // Finished before, maybe without its record (a crash right after).
                self.record_finished(source, target, now).await?;
                return Ok(MergeOutcome::Merged);
            }
            Some("conflict") => {
                // Taken by another user: this user profile does not take it in.
                let k = ProfileKeys::new(target);
                let anon_member = format!("anon:{}", &source.as_str()[2..]);
                let _: () = redis::pipe()
                    .atomic()
                    .hset(&k.merges, source.as_str(), "refused")
                    .ignore()
                    .srem(&k.ids, anon_member)
                    .ignore()
                    .query_async(&mut conn)
                    .await?;
                return Ok(MergeOutcome::Refused);
            }
            _ => return Err(unexpected_merge(&sealed)),
        };

        let fold = script::fold(
            &self.script,
            &self.member_keys,
            target,
            source,
            &snapshot,
            now,
            &self.config,
        );
        let folded: Vec<Value> = fold.invoke_async(&mut conn).await?;
        match reply_tag(&folded).as_deref() {
            Some("folded" | "already") => {}
            // The user was erased meanwhile: the erasure takes the anonymous profile too.
            Some("erased") => return Ok(MergeOutcome::Refused),
            _ => return Err(unexpected_merge(&folded)),
        }

        let segments = snapshot_segments(&snapshot).map_err(|detail| StoreError::Corrupt {
            key: keys::segments(source),
            field: "-".into(),
            detail,
        })?;
        let finished: Vec<Value> = call("finish", &segments).invoke_async(&mut conn).await?;
        match reply_tag(&finished).as_deref() {
            Some("finished" | "done") => {}
            Some("erased") => return Ok(MergeOutcome::Refused),
            _ => return Err(unexpected_merge(&finished)),
        }
        self.record_finished(source, target, now).await?;
        Ok(MergeOutcome::Merged)
    }

    /// Replaces `folded` in the user profile's `merges` hash with the time: the merge's last
    /// step has run, so its updates stop asking for it. A merge recorded before keeps its
    /// time.
    async fn record_finished(
        &self,
        source: &ProfileId,
        target: &ProfileId,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = RECORD_FINISHED
            .key(keys::merges(target))
            .arg(source.as_str())
            .arg(millis(now))
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }
}

/// The segment names in a seal snapshot (its `segments` hash, flat `[name, entered, ...]`;
/// an empty Lua table comes out of cjson as `{}`).
fn snapshot_segments(snapshot: &str) -> Result<Vec<String>, String> {
    #[derive(Deserialize)]
    struct Snapshot {
        #[serde(default)]
        segments: serde_json::Value,
    }
    let s: Snapshot = serde_json::from_str(snapshot).map_err(|e| e.to_string())?;
    match s.segments {
        serde_json::Value::Array(flat) => Ok(flat
            .into_iter()
            .step_by(2)
            .filter_map(|v| v.as_str().map(String::from))
            .collect()),
        _ => Ok(Vec::new()),
    }
}

fn reply_tag(reply: &[Value]) -> Option<String> {
    text_at(reply, 0)
}

fn text_at(reply: &[Value], i: usize) -> Option<String> {
    redis::from_redis_value(reply.get(i)?.clone()).ok()
}

fn unexpected_merge(reply: &[Value]) -> StoreError {
    StoreError::Corrupt {
        key: "?".into(),
        field: "-".into(),
        detail: format!("unexpected merge script reply: {reply:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_segments_read_both_empty_forms() {
        assert_eq!(
            snapshot_segments(r#"{"segments":["vip","1","browsers","2"]}"#).unwrap(),
            ["vip", "browsers"]
        );
        assert!(snapshot_segments(r#"{"segments":{}}"#).unwrap().is_empty());
        assert!(snapshot_segments("{}").unwrap().is_empty());
        assert!(snapshot_segments("[").is_err());
    }

    #[test]
    fn apply_replies_are_read() {
        let s = |t: &str| Value::BulkString(t.as_bytes().to_vec());
        assert_eq!(
            applied(Value::Array(vec![Value::Int(2), Value::Int(1), s("a:x")])).unwrap(),
            Applied::Done {
                applied: 2,
                duplicates: 1,
                link: Link::Merge(ProfileId::anonymous("x").unwrap())
            }
        );
        assert_eq!(
            applied(Value::Array(vec![Value::Int(0), Value::Int(0), s("limit")])).unwrap(),
            Applied::Done {
                applied: 0,
                duplicates: 0,
                link: Link::Limit
            }
        );
        assert_eq!(
            applied(Value::Array(vec![s("merged"), s("u:alice"), s("sealed")])).unwrap(),
            Applied::Redirect {
                target: ProfileId::user("alice").unwrap(),
                sealed: true
            }
        );
        assert!(applied(Value::Int(3)).is_err());
    }
}
