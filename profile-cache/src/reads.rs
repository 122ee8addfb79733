//! Reads for the API and for ESP connectors: the recorded segments, their sizes, paged
//! members with traits, and the transitions stream through a consumer group. Readers write
//! nothing of the key schema: [`RedisProfiles::connect_reader`] only checks its version.
//!
//! # Paging members
//!
//! A segment's members are the sorted set `segment:{NAME}:members`, scored by entered-at
//! (Unix ms). Redis orders a sorted set by score, then by member bytes, so the natural order
//! of a segment is (entered-at, profile id), a total order in which every membership has a
//! fixed place. A page is "the first `limit` members after position `c`", and its
//! [`MemberCursor`] is the position of its last member: `(entered-at ms, profile id)`, not an
//! offset.
//!
//! Why that is stable under concurrent enters and exits: the pages of a walk cover
//! consecutive, disjoint intervals of that order, `(c0, c1]`, `(c1, c2]`, ..., and each page
//! is read atomically, so it holds every member of its interval present at that moment.
//! A member present during the whole walk keeps its place (its score changes only when it
//! leaves and enters again), lies in exactly one interval, and is returned exactly once.
//! Members that enter or leave meanwhile do not move anyone else: an offset would shift by
//! one for each exit before it (skipping a member) or entry before it (repeating one). A
//! member that enters during the walk is returned if its place is after the cursor, which
//! is usual, since it entered "now"; one that leaves before its page is read is not. One
//! that leaves and enters again is a new membership with a later entered-at, and may be
//! returned for both.
//!
//! Redis has no single range command for "after (score, member)": `ZRANGE .. BYSCORE` with
//! `(score` skips the rest of a tie, and `BYLEX` is only defined when all scores are
//! equal. Ties are common (a rebuild enters many profiles at one millisecond), so a small
//! read-only script ([`PAGE_SCRIPT`]) finds the first index after the cursor inside one
//! atomic call: the cursor member's `ZRANK` + 1 when it is still there with the same score,
//! else a binary search by index among the members with the cursor's score (`ZCOUNT`
//! bounds them), comparing member bytes as Redis orders them. Then one `ZRANGE` by index
//! from there. One round trip per page for the members, whatever the ties.
//!
//! The page's traits come from `profile:{ID}:traits` with one `HMGET` per member, all in one
//! pipeline: a second round trip per page, not one per member. Each profile's read is
//! atomic by itself; a member that leaves between the two round trips is still returned
//! (it was a member when the page was read). So is one whose profile was deleted meanwhile
//! (an erasure), without traits: [`RedisProfiles::profiles_exist`] lets an export leave it
//! out, for a third round trip per page.
//!
//! # Following transitions
//!
//! A [`TransitionConsumer`] reads `stream:transitions` as one consumer of a Redis consumer
//! group, on a connection of its own: `XREADGROUP ... BLOCK` holds its connection while it
//! waits, and would hold up every command queued behind it on a shared one. It first
//! delivers the entries this consumer read earlier without acknowledging them (a process
//! that died between reading and acknowledging gets them again, under the same consumer
//! name), then new ones. Delivery is at least once: the caller acknowledges
//! ([`TransitionConsumer::ack`]) only what it has handed on.

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroUsize;
use std::str::FromStr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, RedisError};
use time::OffsetDateTime;

use crate::keys::{
    self, REBUILD_PROGRESS, SCHEMA_VERSION, SCHEMA_VERSION_KEY, SEGMENT_DEFINITIONS,
    TRANSITION_STREAM,
};
use crate::model::{MAX_ID_BYTES, ProfileId};
use crate::script::ScriptSegments;
use crate::store::{ProfileConfig, RedisProfiles, StoreError};

/// Finds the first index after a cursor and returns the members from there, with scores.
///
/// KEYS: 1 the member set. ARGV: 1 how many members to return; 2 and 3, the cursor's score
/// (decimal Unix ms) and member, absent for the first page. Returns a flat array of member,
/// score, member, score, ...; `CORRUPT {"key","field","detail"}` when the key is not a
/// sorted set.
///
/// Members are compared byte by byte (`after`) because Lua's `<` on strings follows the
/// server's collation locale, which need not be Redis's byte order.
const PAGE_SCRIPT: &str = r#"
local key, count = KEYS[1], tonumber(ARGV[1])
local kind = redis.call('TYPE', key)['ok']
if kind ~= 'zset' and kind ~= 'none' then
  return redis.error_reply('CORRUPT ' .. cjson.encode({ key = key, field = '-', detail = 'has the wrong type' }))
end
local function after(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x > y end
  end
  return #a > #b
end
local start = 0
if ARGV[2] then
  local score, member = ARGV[2], ARGV[3]
  local current = redis.call('ZSCORE', key, member)
  if current and tonumber(current) == tonumber(score) then
    start = redis.call('ZRANK', key, member) + 1
  else
    local lo = redis.call('ZCOUNT', key, '-inf', '(' .. score)
    local hi = lo + redis.call('ZCOUNT', key, score, score)
    while lo < hi do
      local mid = math.floor((lo + hi) / 2)
      if after(redis.call('ZRANGE', key, mid, mid)[1], member) then
        hi = mid
      else
        lo = mid + 1
      end
    end
    start = lo
  end
end
return redis.call('ZRANGE', key, start, start + count - 1, 'WITHSCORES')
"#;

static PAGE: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(PAGE_SCRIPT));

/// The last millisecond of the year 9999: entered-at times are from 1970 to then, which
/// every reader (RFC 3339 included) can show.
const MAX_TIME_MS: i64 = 253_402_300_799_999;

/// Cursor format version, the first byte of every cursor.
const CURSOR_VERSION: u8 = 1;

/// The longest cursor text: hex of the version, the ms and the longest profile id.
const MAX_CURSOR_CHARS: usize = 2 * (1 + 8 + 2 + MAX_ID_BYTES);

/// What a page of members should hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembersRequest {
    /// Start after this position ([`MemberPage::next`] of the previous page); `None`: from
    /// the first member.
    pub after: Option<MemberCursor>,
    /// The most members to return. Callers cap it: the whole page and its traits are read
    /// in two round trips.
    pub limit: NonZeroUsize,
    /// Traits to read for each member, by name.
    pub traits: Vec<String>,
}

/// One page of a segment's members, in (entered-at, profile id) order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberPage {
    /// The members.
    pub members: Vec<SegmentMember>,
    /// Where the next page starts; `None` when no member followed this page when it was
    /// read.
    pub next: Option<MemberCursor>,
}

/// A member of a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentMember {
    /// The profile.
    pub id: ProfileId,
    /// When it entered the segment (whole milliseconds).
    pub entered_at: OffsetDateTime,
    /// The requested traits the profile has, by name, as stored text; a trait it does not
    /// have is left out.
    pub traits: BTreeMap<String, String>,
}

/// A position in a segment's (entered-at, profile id) order: a page starts after it.
/// Opaque to clients: its text form ([`fmt::Display`], [`FromStr`]) is what they pass back.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MemberCursor {
    entered_at_ms: i64,
    id: ProfileId,
}

impl MemberCursor {
    /// The position of `member`: the next page starts after it.
    pub fn after(member: &SegmentMember) -> Self {
        Self {
            entered_at_ms: millis(member.entered_at),
            id: member.id.clone(),
        }
    }

    /// The entered-at of the position, Unix ms.
    pub fn entered_at_ms(&self) -> i64 {
        self.entered_at_ms
    }

    /// The profile id of the position.
    pub fn id(&self) -> &ProfileId {
        &self.id
    }
}

/// The text form: lowercase hex of a version byte, the entered-at as 8 bytes big-endian,
/// and the profile id's bytes.
impl fmt::Display for MemberCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut bytes = Vec::with_capacity(9 + self.id.as_str().len());
        bytes.push(CURSOR_VERSION);
        bytes.extend_from_slice(&self.entered_at_ms.to_be_bytes());
        bytes.extend_from_slice(self.id.as_str().as_bytes());
        f.write_str(&hex::encode(bytes))
    }
}

/// Why a text is not a [`MemberCursor`]. The messages complete "cursor ...".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CursorError {
    /// Longer than any cursor.
    #[error("is {len} characters, limit {MAX_CURSOR_CHARS}")]
    TooLong {
        /// Its length.
        len: usize,
    },
    /// Not an even number of hex digits.
    #[error("is not hexadecimal")]
    NotHex,
    /// Too few bytes for a version, a time and an id.
    #[error("is too short")]
    TooShort,
    /// Made by another format version.
    #[error("has version {0}, this build reads version {CURSOR_VERSION}")]
    Version(u8),
    /// The id part is not a profile id.
    #[error("does not hold a profile id")]
    BadId,
}

impl FromStr for MemberCursor {
    type Err = CursorError;

    fn from_str(s: &str) -> Result<Self, CursorError> {
        if s.len() > MAX_CURSOR_CHARS {
            return Err(CursorError::TooLong { len: s.len() });
        }
        let bytes = hex::decode(s).map_err(|_| CursorError::NotHex)?;
        let (&version, rest) = bytes.split_first().ok_or(CursorError::TooShort)?;
        if version != CURSOR_VERSION {
            return Err(CursorError::Version(version));
        }
        let (ms, id) = rest.split_first_chunk::<8>().ok_or(CursorError::TooShort)?;
        let id = std::str::from_utf8(id).map_err(|_| CursorError::BadId)?;
        Ok(Self {
            entered_at_ms: i64::from_be_bytes(*ms),
            id: profile_id(id).ok_or(CursorError::BadId)?,
        })
    }
}

impl RedisProfiles {
    /// The number of members of each segment in `names` (`ZCARD`), in that order, in one
    /// round trip. A segment nobody is in has 0.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`], or [`StoreError::Corrupt`] naming a member set key of
    /// the wrong type.
    pub async fn segment_sizes(&self, names: &[&str]) -> Result<Vec<u64>, StoreError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = names.iter().map(|n| keys::segment_members(n)).collect();
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.zcard(key);
        }
        // Errors come back per command, so a key of the wrong type can be named.
        pipe.ignore_errors();
        let mut conn = self.conn.clone();
        let replies: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
        let mut replies = replies.into_iter();
        keys.iter()
            .map(|key| parse(key, replies.next().unwrap_or(redis::Value::Nil)))
            .collect()
    }

    /// A page of the members of segment `segment` (see the module docs for the order and
    /// why paging is stable): at most `request.limit` members after `request.after`, each
    /// with the requested traits its profile has. Two round trips: the members, then the
    /// traits of all of them (none when no trait is requested). A segment nobody is in,
    /// or that is not configured, has no members.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`], or [`StoreError::Corrupt`] naming a key of the wrong
    /// type, a member that is not a profile id or a score that is not a time.
    pub async fn segment_members(
        &self,
        segment: &str,
        request: &MembersRequest,
    ) -> Result<MemberPage, StoreError> {
        let mut conn = self.conn.clone();
        // One more than the page, to know whether another page follows.
        let count = request.limit.get().saturating_add(1);
        let mut rows = member_range(&mut conn, segment, request.after.as_ref(), count).await?;
        let more = rows.len() > request.limit.get();
        rows.truncate(request.limit.get());
        let traits = if request.traits.is_empty() || rows.is_empty() {
            vec![BTreeMap::new(); rows.len()]
        } else {
            read_traits(&mut conn, &rows, &request.traits).await?
        };
        let members: Vec<SegmentMember> = rows
            .into_iter()
            .zip(traits)
            .map(|((id, entered_at), traits)| SegmentMember {
                id,
                entered_at,
                traits,
            })
            .collect();
        let next = if more {
            members.last().map(MemberCursor::after)
        } else {
            None
        };
        Ok(MemberPage { members, next })
    }
}

/// How long [`TransitionConsumer::next_batch`] waits for a new entry when none is there
/// (`XREADGROUP ... BLOCK`). The consumer's connection waits this much longer for replies
/// than the store's `redis_timeout`.
pub const TRANSITIONS_WAIT: Duration = Duration::from_secs(1);

/// The segments recorded in `meta:{segments}:definitions`: those whose memberships are
/// complete in this Redis ([`crate::rebuild`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordedSegments {
    /// By name.
    pub segments: Vec<RecordedSegment>,
    /// A rebuild is unfinished (`meta:{segments}:rebuild` exists): a segment added since
    /// the record was written is not in it yet, and a changed one is recorded with its
    /// previous fingerprint while its memberships mix the old and the new condition.
    pub rebuilding: bool,
}

impl RecordedSegments {
    /// Whether segment `name` is recorded.
    pub fn contains(&self, name: &str) -> bool {
        self.segments.iter().any(|s| s.name == name)
    }

    /// The recorded names, by name.
    pub fn names(&self) -> Vec<&str> {
        self.segments.iter().map(|s| s.name.as_str()).collect()
    }
}

/// A segment recorded in `meta:{segments}:definitions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedSegment {
    /// The name.
    pub name: String,
    /// The fingerprint of its compiled condition
    /// ([`Segment::fingerprint`](crate::segments::Segment::fingerprint)).
    pub fingerprint: String,
}

impl RedisProfiles {
    /// Connects for reading: checks `meta:schema_version` like [`RedisProfiles::connect`]
    /// but writes nothing (readers never write the key schema, docs/KEY_SCHEMA.md), and
    /// loads no script. A Redis without a schema version (nothing written yet) is
    /// accepted: its reads find nothing. Meant for reads: an update through it would load
    /// the apply script, for no segments, on first use.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when Redis cannot be reached within `redis_timeout`,
    /// [`StoreError::Schema`] when it holds data of another schema version.
    pub async fn connect_reader(url: &str, config: ProfileConfig) -> Result<Self, StoreError> {
        let mut conn = manager(url, &config, Duration::ZERO).await?;
        check_schema(&mut conn).await?;
        let segments = ScriptSegments::new(&[])?;
        Ok(Self {
            conn,
            config,
            script: Arc::new(redis::Script::new(&segments.source)),
            member_keys: segments.member_keys.into(),
            definitions: Arc::new([]),
        })
    }

    /// The segments recorded in `meta:{segments}:definitions`, and whether a rebuild is
    /// unfinished, in one round trip (`MULTI`/`EXEC`). The definitions themselves (the
    /// conditions) are in the collector's configuration, not in Redis.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`], or [`StoreError::Corrupt`] naming a key of the wrong
    /// type.
    pub async fn recorded_segments(&self) -> Result<RecordedSegments, StoreError> {
        let mut pipe = redis::pipe();
        pipe.hgetall(SEGMENT_DEFINITIONS)
            .exists(REBUILD_PROGRESS)
            .atomic()
            .ignore_errors();
        let mut conn = self.conn.clone();
        let replies: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
        let mut replies = replies.into_iter();
        let mut next = || replies.next().unwrap_or(redis::Value::Nil);
        let record: Vec<(String, String)> = parse(SEGMENT_DEFINITIONS, next())?;
        let rebuilding: bool = parse(REBUILD_PROGRESS, next())?;
        let mut segments: Vec<RecordedSegment> = record
            .into_iter()
            .map(|(name, fingerprint)| RecordedSegment { name, fingerprint })
            .collect();
        segments.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(RecordedSegments {
            segments,
            rebuilding,
        })
    }

    /// Whether each profile of `ids` exists (its `profile:{ID}` hash), in that order, in
    /// one round trip. A member of a page whose profile was deleted after the page was read
    /// (an erasure) is still in the page; an export asks this to leave it out.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    pub async fn profiles_exist(&self, ids: &[ProfileId]) -> Result<Vec<bool>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(keys::profile).collect();
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.exists(key);
        }
        pipe.ignore_errors();
        let mut conn = self.conn.clone();
        let replies: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
        let mut replies = replies.into_iter();
        keys.iter()
            .map(|key| parse(key, replies.next().unwrap_or(redis::Value::Nil)))
            .collect()
    }
}

/// Where a consumer group that does not exist yet starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupStart {
    /// With the entries added after it is created (`$`).
    New,
    /// With the oldest entry the stream still holds (`0`).
    Oldest,
}

/// A change of segment membership, an entry of `stream:transitions` (docs/KEY_SCHEMA.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// The stream entry id, e.g. `1795953600000-0`: what [`TransitionConsumer::ack`] takes.
    pub entry_id: String,
    /// The profile.
    pub profile: ProfileId,
    /// The segment.
    pub segment: String,
    /// Entered or left.
    pub change: Change,
    /// When the change was found (whole milliseconds).
    pub at: OffsetDateTime,
    /// Why: `event`, `deadline`, `redefined`, `removed`, or one a later version adds.
    pub reason: String,
}

/// Whether a [`Transition`] entered or left its segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// `enter`
    Enter,
    /// `exit`
    Exit,
}

impl Change {
    /// `enter` or `exit`, as in the stream.
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Enter => "enter",
            Change::Exit => "exit",
        }
    }
}

/// What one [`TransitionConsumer::next_batch`] delivered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransitionBatch {
    /// In stream order.
    pub transitions: Vec<Transition>,
    /// Ids of entries this consumer read before without acknowledging them that the stream
    /// no longer holds (trimmed by its cap meanwhile): nothing is left to deliver, so they
    /// should be acknowledged.
    pub trimmed: Vec<String>,
    /// The entries were read by this consumer before and not acknowledged: delivered again.
    pub redelivered: bool,
}

impl TransitionBatch {
    /// Neither transitions nor trimmed entries: nothing came within the wait.
    pub fn is_empty(&self) -> bool {
        self.transitions.is_empty() && self.trimmed.is_empty()
    }
}

/// One consumer of a consumer group of `stream:transitions`, on a connection of its own;
/// see the module docs.
#[derive(Debug)]
pub struct TransitionConsumer {
    conn: ConnectionManager,
    group: String,
    consumer: String,
    /// While this consumer's unacknowledged entries are delivered again: the id after
    /// which the next read continues. `None` once they all were: new entries only.
    pending_after: Option<String>,
}

impl TransitionConsumer {
    /// Connects (checking the schema version as [`RedisProfiles::connect_reader`] does)
    /// and joins consumer group `group` as `consumer`. A missing group is created, with
    /// the stream if there is none yet (`XGROUP CREATE ... MKSTREAM`), starting at
    /// `start`; an existing group keeps its position. Also answers whether it created the
    /// group.
    ///
    /// # Errors
    /// As [`RedisProfiles::connect_reader`]; [`StoreError::Corrupt`] when
    /// `stream:transitions` is not a stream.
    pub async fn connect(
        url: &str,
        config: &ProfileConfig,
        group: &str,
        consumer: &str,
        start: GroupStart,
    ) -> Result<(Self, bool), StoreError> {
        let mut conn = manager(url, config, TRANSITIONS_WAIT).await?;
        check_schema(&mut conn).await?;
        let id = match start {
            GroupStart::New => "$",
            GroupStart::Oldest => "0",
        };
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(TRANSITION_STREAM)
            .arg(group)
            .arg(id)
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        let created = match created {
            Ok(()) => true,
            Err(e) if e.code() == Some("BUSYGROUP") => false,
            Err(e) if e.code() == Some("WRONGTYPE") => {
                return Err(corrupt(TRANSITION_STREAM, "-", "is not a stream"));
            }
            Err(e) => return Err(e.into()),
        };
        let consumer = Self {
            conn,
            group: group.into(),
            consumer: consumer.into(),
            pending_after: Some("0".into()),
        };
        Ok((consumer, created))
    }

    /// The consumer group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// This consumer's name in the group.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// At most `count` entries: first those this consumer read before without
    /// acknowledging them (oldest first), then new ones, waiting up to
    /// [`TRANSITIONS_WAIT`] for one to come. An empty batch: nothing new came meanwhile.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`]; [`StoreError::Redis`] when the group was deleted
    /// meanwhile (`NOGROUP`); [`StoreError::Corrupt`] naming an entry whose fields are not
    /// a transition (it stays pending until acknowledged by hand).
    pub async fn next_batch(&mut self, count: NonZeroUsize) -> Result<TransitionBatch, StoreError> {
        if let Some(after) = self.pending_after.clone() {
            let reply = self.read(count, &after, None).await?;
            if let Some((last, _)) = reply.last() {
                self.pending_after = Some(last.clone());
                let mut batch = transitions(reply)?;
                batch.redelivered = true;
                return Ok(batch);
            }
            self.pending_after = None;
        }
        let reply = self.read(count, ">", Some(TRANSITIONS_WAIT)).await?;
        transitions(reply)
    }

    /// Acknowledges entries by id (`XACK`): the group does not deliver them again. Answers
    /// how many of them were pending.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`]: nothing may be assumed acknowledged.
    pub async fn ack(&mut self, entry_ids: &[String]) -> Result<u64, StoreError> {
        if entry_ids.is_empty() {
            return Ok(0);
        }
        let acked: u64 = redis::cmd("XACK")
            .arg(TRANSITION_STREAM)
            .arg(&self.group)
            .arg(entry_ids)
            .query_async(&mut self.conn)
            .await?;
        Ok(acked)
    }

    /// One `XREADGROUP` from `after` (`>`: new entries), as ids with fields (`None` for an
    /// entry the stream no longer holds).
    async fn read(
        &mut self,
        count: NonZeroUsize,
        after: &str,
        wait: Option<Duration>,
    ) -> Result<Vec<StreamEntry>, StoreError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count.get());
        if let Some(wait) = wait {
            // BLOCK 0 would wait for ever.
            cmd.arg("BLOCK").arg(wait.as_millis().max(1));
        }
        cmd.arg("STREAMS").arg(TRANSITION_STREAM).arg(after);
        let reply: redis::Value = cmd.query_async(&mut self.conn).await?;
        stream_entries(reply)
    }
}

/// A stream entry: its id and its fields, `None` when the stream no longer holds it.
type StreamEntry = (String, Option<Vec<(String, String)>>);

/// The entries of an `XREADGROUP` reply on one stream (RESP2 or RESP3 shape).
fn stream_entries(reply: redis::Value) -> Result<Vec<StreamEntry>, StoreError> {
    use redis::Value;
    let bad = |what: &str| {
        corrupt(
            TRANSITION_STREAM,
            "-",
            &format!("XREADGROUP answered {what}"),
        )
    };
    let per_stream = match reply {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(streams) => streams
            .into_iter()
            .map(|stream| match stream {
                Value::Array(mut pair) if pair.len() == 2 => Ok(pair.swap_remove(1)),
                other => Err(bad(&format!("{other:?} for a stream"))),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Value::Map(streams) => streams.into_iter().map(|(_, entries)| entries).collect(),
        other => return Err(bad(&format!("{other:?}"))),
    };
    let mut out = Vec::new();
    for entries in per_stream {
        let Value::Array(entries) = entries else {
            return Err(bad(&format!("{entries:?} for the entries")));
        };
        for entry in entries {
            let Value::Array(mut parts) = entry else {
                return Err(bad(&format!("{entry:?} for an entry")));
            };
            if parts.len() < 2 {
                return Err(bad(&format!("{parts:?} for an entry")));
            }
            let fields = parts.swap_remove(1);
            let id: String = redis::from_redis_value(parts.swap_remove(0))
                .map_err(|e| bad(&format!("an entry id that is not text: {e}")))?;
            let fields: Option<Vec<(String, String)>> = redis::from_redis_value(fields)
                .map_err(|e| corrupt(TRANSITION_STREAM, &id, &e.to_string()))?;
            out.push((id, fields));
        }
    }
    Ok(out)
}

/// Stream entries as transitions, and the ids of those the stream no longer holds.
fn transitions(entries: Vec<StreamEntry>) -> Result<TransitionBatch, StoreError> {
    let mut batch = TransitionBatch::default();
    for (id, fields) in entries {
        match fields {
            None => batch.trimmed.push(id),
            Some(fields) => batch.transitions.push(transition(id, fields)?),
        }
    }
    Ok(batch)
}

/// One entry's fields as a [`Transition`]; fields this version does not know are ignored.
fn transition(entry_id: String, fields: Vec<(String, String)>) -> Result<Transition, StoreError> {
    let fields: BTreeMap<String, String> = fields.into_iter().collect();
    let bad = |detail: String| corrupt(TRANSITION_STREAM, &entry_id, &detail);
    let field = |name: &str| {
        fields
            .get(name)
            .ok_or_else(|| bad(format!("has no field {name:?}")))
    };
    let profile = field("profile")?;
    let profile = profile_id(profile)
        .ok_or_else(|| bad(format!("profile {profile:?} is not a profile id")))?;
    let change = match field("change")?.as_str() {
        "enter" => Change::Enter,
        "exit" => Change::Exit,
        other => return Err(bad(format!("change {other:?} is not enter or exit"))),
    };
    let at = field("at")?;
    let at = at
        .parse::<i64>()
        .ok()
        .filter(|ms| (0..=MAX_TIME_MS).contains(ms))
        .and_then(from_millis)
        .ok_or_else(|| bad(format!("at {at:?} is not a time")))?;
    Ok(Transition {
        segment: field("segment")?.clone(),
        reason: field("reason")?.clone(),
        profile,
        change,
        at,
        entry_id,
    })
}

/// A connection manager on `url` with the store's timeouts, waiting `wait` longer for
/// replies (for blocking reads).
async fn manager(
    url: &str,
    config: &ProfileConfig,
    wait: Duration,
) -> Result<ConnectionManager, StoreError> {
    let client = crate::store::client(url, config)?;
    let manager = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(config.redis_timeout))
        .set_response_timeout(Some(config.redis_timeout + wait))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500));
    Ok(ConnectionManager::new_with_config(client, manager).await?)
}

/// Checks `meta:schema_version` without writing it: absent (nothing written yet) or
/// [`SCHEMA_VERSION`].
async fn check_schema(conn: &mut ConnectionManager) -> Result<(), StoreError> {
    let mut pipe = redis::pipe();
    pipe.cmd("TYPE").arg(SCHEMA_VERSION_KEY);
    pipe.cmd("GET").arg(SCHEMA_VERSION_KEY);
    pipe.ignore_errors();
    let replies: Vec<redis::Value> = pipe.query_async(conn).await?;
    let mut replies = replies.into_iter();
    let kind: String = parse(
        SCHEMA_VERSION_KEY,
        replies.next().unwrap_or(redis::Value::Nil),
    )?;
    match kind.as_str() {
        "none" => Ok(()),
        "string" => {
            let found: String = parse(
                SCHEMA_VERSION_KEY,
                replies.next().unwrap_or(redis::Value::Nil),
            )?;
            if found == SCHEMA_VERSION {
                Ok(())
            } else {
                Err(StoreError::Schema { found })
            }
        }
        other => Err(StoreError::Schema {
            found: format!("<a {other}, not a string>"),
        }),
    }
}

/// Up to `count` members of `segment` after `after` (from the first when `None`), in
/// (entered-at, id) order, with their entered-at, in one atomic call. The only function
/// that reads a member set for paging: sharding member sets across Redis Cluster slots
/// changes this one (read each shard's range after the cursor, merge, keep `count`).
async fn member_range(
    conn: &mut ConnectionManager,
    segment: &str,
    after: Option<&MemberCursor>,
    count: usize,
) -> Result<Vec<(ProfileId, OffsetDateTime)>, StoreError> {
    let key = keys::segment_members(segment);
    let mut invocation = PAGE.key(&key);
    invocation.arg(count);
    if let Some(c) = after {
        invocation.arg(c.entered_at_ms).arg(c.id.as_str());
    }
    let reply: redis::Value = invocation.invoke_async(conn).await?;
    let rows: Vec<(String, String)> = parse(&key, reply)?;
    rows.into_iter()
        .map(|(member, score)| {
            let id =
                profile_id(&member).ok_or_else(|| corrupt(&key, &member, "is not a profile id"))?;
            let entered_at = score
                .parse::<f64>()
                .ok()
                .and_then(whole)
                .filter(|ms| (0..=MAX_TIME_MS).contains(ms))
                .and_then(from_millis)
                .ok_or_else(|| corrupt(&key, &member, &format!("score {score} is not a time")))?;
            Ok((id, entered_at))
        })
        .collect()
}

/// The traits named `names` of each profile of `rows`, in one pipeline of `HMGET`s.
async fn read_traits(
    conn: &mut ConnectionManager,
    rows: &[(ProfileId, OffsetDateTime)],
    names: &[String],
) -> Result<Vec<BTreeMap<String, String>>, StoreError> {
    let keys: Vec<String> = rows.iter().map(|(id, _)| keys::traits(id)).collect();
    let mut pipe = redis::pipe();
    for key in &keys {
        pipe.cmd("HMGET").arg(key).arg(names);
    }
    pipe.ignore_errors();
    let replies: Vec<redis::Value> = pipe.query_async(conn).await?;
    let mut replies = replies.into_iter();
    keys.iter()
        .map(|key| {
            let values: Vec<Option<String>> =
                parse(key, replies.next().unwrap_or(redis::Value::Nil))?;
            if values.len() != names.len() {
                return Err(corrupt(
                    key,
                    "-",
                    "HMGET answered the wrong number of values",
                ));
            }
            Ok(names
                .iter()
                .zip(values)
                .filter_map(|(name, value)| Some((name.clone(), value?)))
                .collect())
        })
        .collect()
}

/// A profile id in its string form, `a:<id>` or `u:<id>`.
fn profile_id(s: &str) -> Option<ProfileId> {
    match s.split_once(':')? {
        ("a", id) => ProfileId::anonymous(id).ok(),
        ("u", id) => ProfileId::user(id).ok(),
        _ => None,
    }
}

/// One reply of a pipeline run with `ignore_errors` (or of a script), as `T`, or an error
/// naming `key`.
fn parse<T: FromRedisValue>(key: &str, value: redis::Value) -> Result<T, StoreError> {
    match value {
        redis::Value::ServerError(err) if err.code() == "WRONGTYPE" => {
            Err(corrupt(key, "-", "has the wrong type"))
        }
        redis::Value::ServerError(err) => Err(RedisError::from(err).into()),
        value => redis::from_redis_value(value).map_err(|e| corrupt(key, "-", &e.to_string())),
    }
}

fn corrupt(key: &str, field: &str, detail: &str) -> StoreError {
    StoreError::Corrupt {
        key: key.into(),
        field: field.into(),
        detail: detail.into(),
    }
}

/// A score that is a whole number within ±2^53, what the apply script writes.
fn whole(x: f64) -> Option<i64> {
    const LIMIT: f64 = 9_007_199_254_740_992.0;
    (x.fract() == 0.0 && x.abs() <= LIMIT).then_some(x as i64)
}

fn from_millis(ms: i64) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()
}

/// Unix milliseconds, rounded down.
fn millis(t: OffsetDateTime) -> i64 {
    // Any OffsetDateTime is within ±10^4 years: its milliseconds fit an i64.
    t.unix_timestamp_nanos().div_euclid(1_000_000) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cursor(ms: i64, id: &str) -> MemberCursor {
        MemberCursor {
            entered_at_ms: ms,
            id: profile_id(id).unwrap(),
        }
    }

    #[test]
    fn cursors_round_trip_through_their_text() {
        for c in [
            cursor(1_795_953_600_000, "a:7f3a"),
            cursor(-1, "u:ada@example.com"),
            cursor(0, &format!("u:{}", "x".repeat(MAX_ID_BYTES))),
        ] {
            let text = c.to_string();
            assert!(text.len() <= MAX_CURSOR_CHARS, "{text}");
            assert_eq!(text.parse::<MemberCursor>(), Ok(c));
        }
        assert_eq!(
            cursor(1, "a:b").to_string(),
            format!("01{:016x}{}", 1, hex::encode("a:b"))
        );
    }

    #[test]
    fn bad_cursors_say_what_is_wrong() {
        let parse = |s: &str| s.parse::<MemberCursor>().unwrap_err();
        assert_eq!(parse("xyz"), CursorError::NotHex);
        assert_eq!(parse("abc"), CursorError::NotHex);
        assert_eq!(parse(""), CursorError::TooShort);
        assert_eq!(parse("0100"), CursorError::TooShort);
        let valid = cursor(5, "a:b").to_string();
        assert_eq!(
            parse(&format!("02{}", &valid[2..])),
            CursorError::Version(2)
        );
        // An id without a kind, and one with a brace.
        assert_eq!(
            parse(&format!("01{:016x}{}", 5, hex::encode("b"))),
            CursorError::BadId
        );
        assert_eq!(
            parse(&format!("01{:016x}{}", 5, hex::encode("a:{b}"))),
            CursorError::BadId
        );
        assert_eq!(
            parse(&format!("01{:016x}ff", 5)),
            CursorError::BadId,
            "not UTF-8"
        );
        let long = "0".repeat(MAX_CURSOR_CHARS + 2);
        assert_eq!(
            parse(&long),
            CursorError::TooLong {
                len: MAX_CURSOR_CHARS + 2
            }
        );
        assert_eq!(
            CursorError::Version(2).to_string(),
            "has version 2, this build reads version 1"
        );
    }

    #[test]
    fn cursors_order_as_redis_orders_members() {
        // Score first, then the id's bytes: shorter prefixes first.
        let mut cs = [
            cursor(2, "a:a"),
            cursor(1, "u:b"),
            cursor(1, "a:bb"),
            cursor(1, "a:b"),
        ];
        cs.sort();
        let ids: Vec<_> = cs
            .iter()
            .map(|c| (c.entered_at_ms(), c.id().as_str()))
            .collect();
        assert_eq!(ids, [(1, "a:b"), (1, "a:bb"), (1, "u:b"), (2, "a:a")]);
    }

    fn text(s: &str) -> redis::Value {
        redis::Value::BulkString(s.as_bytes().to_vec())
    }

    fn fields(pairs: &[(&str, &str)]) -> redis::Value {
        redis::Value::Array(pairs.iter().flat_map(|(k, v)| [text(k), text(v)]).collect())
    }

    const ENTER: &[(&str, &str)] = &[
        ("profile", "a:7f3a"),
        ("segment", "vip"),
        ("change", "enter"),
        ("at", "1795953600000"),
        ("reason", "event"),
        ("added_later", "ignored"),
    ];

    #[test]
    fn stream_replies_in_both_protocols_give_entries_and_trimmed_ones() {
        use redis::Value;
        let entries = Value::Array(vec![
            Value::Array(vec![text("1-0"), fields(ENTER)]),
            Value::Array(vec![text("2-0"), Value::Nil]),
        ]);
        let resp2 = Value::Array(vec![Value::Array(vec![
            text(TRANSITION_STREAM),
            entries.clone(),
        ])]);
        let resp3 = Value::Map(vec![(text(TRANSITION_STREAM), entries)]);
        for reply in [resp2, resp3] {
            let batch = transitions(stream_entries(reply).unwrap()).unwrap();
            assert_eq!(
                batch.transitions,
                [Transition {
                    entry_id: "1-0".into(),
                    profile: ProfileId::anonymous("7f3a").unwrap(),
                    segment: "vip".into(),
                    change: Change::Enter,
                    at: from_millis(1_795_953_600_000).unwrap(),
                    reason: "event".into(),
                }]
            );
            assert_eq!(batch.trimmed, ["2-0"]);
        }
        assert_eq!(stream_entries(Value::Nil).unwrap(), []);
    }

    #[test]
    fn entries_that_are_not_transitions_are_named() {
        let with = |field: &str, value: &str| {
            let pairs: Vec<(&str, &str)> = ENTER
                .iter()
                .map(|&(k, v)| if k == field { (k, value) } else { (k, v) })
                .collect();
            let redis::Value::Array(flat) = fields(&pairs) else {
                unreachable!()
            };
            let pairs = flat
                .chunks(2)
                .map(|kv| {
                    (
                        redis::from_redis_value(kv[0].clone()).unwrap(),
                        redis::from_redis_value(kv[1].clone()).unwrap(),
                    )
                })
                .collect();
            transition("5-0".into(), pairs).unwrap_err().to_string()
        };
        assert_eq!(
            with("change", "moved"),
            "corrupt data in stream:transitions field 5-0: change \"moved\" is not enter or exit"
        );
        assert_eq!(
            with("at", "soon"),
            "corrupt data in stream:transitions field 5-0: at \"soon\" is not a time"
        );
        assert_eq!(
            with("profile", "7f3a"),
            "corrupt data in stream:transitions field 5-0: profile \"7f3a\" is not a profile id"
        );
        assert_eq!(
            transition("6-0".into(), vec![]).unwrap_err().to_string(),
            "corrupt data in stream:transitions field 6-0: has no field \"profile\""
        );
    }
}
