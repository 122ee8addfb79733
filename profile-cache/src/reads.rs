//! Segment reads for the API and for ESP connectors: sizes and paged members with traits.
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
//! (it was a member when the page was read).

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroUsize;
use std::str::FromStr;
use std::sync::LazyLock;

use redis::aio::ConnectionManager;
use redis::{FromRedisValue, RedisError};
use time::OffsetDateTime;

use crate::keys;
use crate::model::{MAX_ID_BYTES, ProfileId};
use crate::store::{RedisProfiles, StoreError};

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
}
