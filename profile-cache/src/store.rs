//! [`RedisProfiles`]: applies profile updates and reads profiles back.
//!
//! Applying uses a Lua script (`apply.lua`), not a plain pipeline, because dedupe is
//! conditional: whether an event's counters move depends on whether its message id was seen
//! before, and a pipeline cannot branch on a reply without a second round trip. All scripts
//! of one batch travel in one pipeline (wrapped in `MULTI`/`EXEC` when the batch touches
//! several profiles): one round trip per batch. Figures: docs/BENCHMARKS.md.

use std::collections::BTreeMap;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, ErrorKind, RedisError, ServerErrorKind};
use serde::{Deserialize, Serialize};
use serde_json::json;
use time::OffsetDateTime;

use crate::keys::{EVENT_STREAM, ProfileKeys, SCHEMA_VERSION, SCHEMA_VERSION_KEY};
use crate::lifecycle::LifecycleThresholds;
use crate::model::{
    ApplyReport, CartLine, ConsentState, ConsentStatus, Event, EventKind, Profile, ProfileId,
    ProfileUpdate, Purpose, ViewedProduct,
};

/// How profiles are kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProfileConfig {
    /// How long a message id is remembered per profile, so retries are not counted twice.
    /// Default 7 days.
    #[serde(with = "humantime_serde")]
    pub dedupe_window: Duration,
    /// The most message ids remembered per profile (oldest forgotten first). Default 10,000.
    pub dedupe_max_ids: u32,
    /// Recently viewed products kept per profile. Default 20.
    pub recently_viewed_max: u32,
    /// Approximate cap of the event stream (`XADD MAXLEN ~`). Default 1,000,000.
    pub event_stream_max_len: u64,
    /// Connect and response timeout for Redis calls. Default 2 s.
    #[serde(with = "humantime_serde")]
    pub redis_timeout: Duration,
    /// Lifecycle stage thresholds.
    pub lifecycle: LifecycleThresholds,
}

impl Default for ProfileConfig {
    fn default() -> Self {
        Self {
            dedupe_window: Duration::from_secs(7 * 86_400),
            dedupe_max_ids: 10_000,
            recently_viewed_max: 20,
            event_stream_max_len: 1_000_000,
            redis_timeout: Duration::from_secs(2),
            lifecycle: LifecycleThresholds::default(),
        }
    }
}

impl ProfileConfig {
    /// Checks values types cannot.
    ///
    /// # Errors
    /// Names the setting.
    pub fn validate(&self) -> Result<(), String> {
        self.lifecycle.validate().map_err(|e| e.to_string())?;
        if self.dedupe_max_ids == 0 {
            return Err("dedupe_max_ids must be positive".into());
        }
        if self.dedupe_window.is_zero() {
            return Err("dedupe_window must be positive".into());
        }
        if self.recently_viewed_max == 0 {
            return Err("recently_viewed_max must be positive".into());
        }
        if self.redis_timeout.is_zero() {
            return Err("redis_timeout must be positive".into());
        }
        Ok(())
    }
}

/// Why a storage call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis cannot be reached or is not ready (refused, timed out, loading); retry later.
    #[error("redis unavailable: {0}")]
    Unavailable(RedisError),
    /// Stored data this version cannot read (written by another version, or by hand).
    #[error("corrupt data in {key} field {field}: {detail}")]
    Corrupt {
        /// The key.
        key: String,
        /// The field or member, `-` for the key as a whole.
        field: String,
        /// What is wrong.
        detail: String,
    },
    /// The Redis holds data of another schema version.
    #[error("redis holds key schema version {found}, this build reads version {SCHEMA_VERSION}")]
    Schema {
        /// The version found.
        found: String,
    },
    /// Any other Redis error.
    #[error("redis error: {0}")]
    Redis(RedisError),
}

impl From<RedisError> for StoreError {
    fn from(e: RedisError) -> Self {
        // A pipeline or transaction reports its commands' errors together; the first one
        // says what went wrong.
        let e = match e.clone().into_server_errors() {
            Some(errors) if !errors.is_empty() => RedisError::from(errors[0].1.clone()),
            _ => e,
        };
        let unavailable = e.is_io_error()
            || e.is_timeout()
            || e.is_connection_refusal()
            || e.is_connection_dropped()
            || matches!(
                e.kind(),
                ErrorKind::Server(ServerErrorKind::BusyLoading | ServerErrorKind::TryAgain)
            )
            || e.code() == Some("BUSY");
        if unavailable {
            return StoreError::Unavailable(e);
        }
        if e.code() == Some("CORRUPT") {
            // The script's error reply: "CORRUPT <key> <field> <detail...>".
            let detail = e.detail().unwrap_or_default();
            let mut parts = detail.splitn(3, ' ');
            return StoreError::Corrupt {
                key: parts.next().unwrap_or_default().into(),
                field: parts.next().unwrap_or_default().into(),
                detail: parts.next().unwrap_or_default().into(),
            };
        }
        if e.code() == Some("WRONGTYPE") {
            return StoreError::Corrupt {
                key: "?".into(),
                field: "-".into(),
                detail: e.to_string(),
            };
        }
        StoreError::Redis(e)
    }
}

/// Profiles in one Redis server. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct RedisProfiles {
    conn: ConnectionManager,
    config: ProfileConfig,
    script: redis::Script,
}

impl RedisProfiles {
    /// Connects, and marks an empty Redis with the schema version.
    ///
    /// # Errors
    /// Redis cannot be reached, or holds another schema version.
    pub async fn connect(url: &str, config: ProfileConfig) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(StoreError::Redis)?;
        let manager = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.redis_timeout))
            .set_response_timeout(Some(config.redis_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let mut conn = ConnectionManager::new_with_config(client, manager).await?;
        let _: bool = conn.set_nx(SCHEMA_VERSION_KEY, SCHEMA_VERSION).await?;
        let found: Option<String> = conn.get(SCHEMA_VERSION_KEY).await?;
        match found {
            Some(v) if v == SCHEMA_VERSION => {}
            other => {
                return Err(StoreError::Schema {
                    found: other.unwrap_or_default(),
                });
            }
        }
        Ok(Self {
            conn,
            config,
            script: redis::Script::new(include_str!("apply.lua")),
        })
    }

    /// Applies the updates of one batch in one round trip. Each profile's events apply
    /// atomically and in order; events already applied (same message id within the dedupe
    /// window) are skipped and counted as duplicates, so retrying after any failure is safe.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when Redis cannot be reached (nothing acknowledged),
    /// [`StoreError::Corrupt`] when a profile holds data this version cannot update (that
    /// profile is left unchanged).
    pub async fn apply(&self, updates: &[ProfileUpdate]) -> Result<ApplyReport, StoreError> {
        if updates.is_empty() {
            return Ok(ApplyReport::default());
        }
        let now = updates[0]
            .events
            .first()
            .map_or_else(OffsetDateTime::now_utc, |e| e.received_at);
        let mut pipe = redis::pipe();
        if updates.len() > 1 {
            pipe.atomic();
        }
        let invocations: Vec<_> = updates.iter().map(|u| self.invocation(u, now)).collect();
        for inv in &invocations {
            pipe.invoke_script(inv);
        }
        let mut conn = self.conn.clone();
        let result: Result<Vec<(u64, u64)>, RedisError> = pipe.query_async(&mut conn).await;
        let replies = match result {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                // Redis restarted and forgot the script: load it, then try once more. Events
                // that did apply in the failed attempt are deduped by the retry.
                let _: String = self.script.prepare_invoke().load_async(&mut conn).await?;
                pipe.query_async(&mut conn).await?
            }
            other => other?,
        };
        Ok(replies
            .into_iter()
            .fold(ApplyReport::default(), |r, (applied, duplicates)| {
                ApplyReport {
                    applied: r.applied + applied,
                    duplicates: r.duplicates + duplicates,
                }
            }))
    }

    fn invocation(&self, u: &ProfileUpdate, now: OffsetDateTime) -> redis::ScriptInvocation<'_> {
        let keys = ProfileKeys::new(&u.profile);
        let mut inv = self.script.prepare_invoke();
        for k in keys.all() {
            inv.key(k);
        }
        inv.key(EVENT_STREAM);
        let c = &self.config;
        inv.arg(millis(now))
            .arg(c.dedupe_window.as_millis() as u64)
            .arg(c.dedupe_max_ids)
            .arg(c.recently_viewed_max)
            .arg(c.event_stream_max_len)
            .arg(c.lifecycle.new_for.as_millis() as u64)
            .arg(u.profile.as_str())
            .arg(u.anonymous_id.as_deref().unwrap_or(""))
            .arg(u.user_id.as_deref().unwrap_or(""))
            .arg(u.context.session_id.as_deref().unwrap_or(""));
        for e in &u.events {
            inv.arg(ops(e).to_string())
                .arg(stream_entry(u, e).to_string());
        }
        inv
    }

    /// Reads a profile in one round trip, with its lifecycle stage as of `now`.
    ///
    /// # Errors
    /// Redis unavailable, or data this version cannot read ([`StoreError::Corrupt`]).
    pub async fn profile(
        &self,
        id: &ProfileId,
        now: OffsetDateTime,
    ) -> Result<Option<Profile>, StoreError> {
        let k = ProfileKeys::new(id);
        type Pairs = Vec<(String, String)>;
        type Scored = Vec<(String, f64)>;
        let mut pipe = redis::pipe();
        pipe.hgetall(&k.profile)
            .hgetall(&k.traits)
            .hgetall(&k.counts)
            .smembers(&k.ids)
            .zrevrange_withscores(&k.viewed, 0, -1)
            .zrevrange_withscores(&k.cat_viewed, 0, -1)
            .zrevrange_withscores(&k.cat_bought, 0, -1)
            .hgetall(&k.cart);
        let mut conn = self.conn.clone();
        let (hash, traits, counts, ids, viewed, cat_viewed, cat_bought, cart): (
            Pairs,
            Pairs,
            Pairs,
            Vec<String>,
            Scored,
            Scored,
            Scored,
            Pairs,
        ) = pipe.query_async(&mut conn).await.map_err(|e| {
            if e.code() == Some("WRONGTYPE") {
                StoreError::Corrupt {
                    key: k.profile.clone(),
                    field: "-".into(),
                    detail: "a key of this profile has the wrong type".into(),
                }
            } else {
                e.into()
            }
        })?;
        if hash.is_empty() {
            return Ok(None);
        }
        let h: BTreeMap<String, String> = hash.into_iter().collect();
        let read = Reader {
            key: &k.profile,
            h: &h,
        };
        let first_seen = read.time("first_seen")?.unwrap_or(now);
        let last_seen = read.time("last_seen")?.unwrap_or(first_seen);
        let mut consent = BTreeMap::new();
        for p in Purpose::ALL {
            let status = match h.get(&format!("consent:{p}")).map(String::as_str) {
                Some("granted") => ConsentStatus::Granted,
                Some("denied") => ConsentStatus::Denied,
                Some(other) => {
                    return Err(corrupt(&k.profile, &format!("consent:{p}"), other));
                }
                None => continue,
            };
            let at = read.time(&format!("consent:{p}:at"))?.unwrap_or(last_seen);
            consent.insert(p, ConsentState { status, at });
        }
        let (mut anonymous_ids, mut users) = (Vec::new(), Vec::new());
        for id in ids {
            match id.split_once(':') {
                Some(("anon", a)) => anonymous_ids.push(a.to_string()),
                Some(("user", u)) => users.push(u.to_string()),
                _ => return Err(corrupt(&k.ids, &id, "is not anon:<id> or user:<id>")),
            }
        }
        anonymous_ids.sort();
        let mut event_counts = BTreeMap::new();
        for (name, n) in counts {
            let n = n
                .parse()
                .map_err(|_| corrupt(&k.counts, &name, "is not a count"))?;
            event_counts.insert(name, n);
        }
        let recently_viewed = viewed
            .into_iter()
            .map(|(product_id, ms)| {
                Ok(ViewedProduct {
                    at: from_millis(ms as i64)
                        .ok_or_else(|| corrupt(&k.viewed, &product_id, "is not a time"))?,
                    product_id,
                })
            })
            .collect::<Result<_, StoreError>>()?;
        // Most first; ties by name, so the order does not depend on Redis internals.
        let counts_of = |v: Scored| {
            let mut v: Vec<(String, u64)> = v.into_iter().map(|(c, n)| (c, n as u64)).collect();
            v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            v
        };
        let mut cart_lines = Vec::new();
        for (product_id, line) in cart {
            #[derive(Deserialize)]
            struct Line {
                quantity: u32,
                price: i64,
                category: Option<String>,
            }
            let l: Line = serde_json::from_str(&line)
                .map_err(|e| corrupt(&k.cart, &product_id, &e.to_string()))?;
            cart_lines.push(CartLine {
                product_id,
                quantity: l.quantity,
                price: l.price,
                category: l.category,
            });
        }
        cart_lines.sort_by(|a, b| a.product_id.cmp(&b.product_id));
        Ok(Some(Profile {
            id: id.clone(),
            user_id: h.get("user_id").cloned().or_else(|| users.pop()),
            anonymous_ids,
            traits: traits.into_iter().collect(),
            first_seen,
            last_seen,
            events: read.count("events")?,
            page_views: read.count("page_views")?,
            sessions: read.count("sessions")?,
            event_counts,
            recently_viewed,
            categories_viewed: counts_of(cat_viewed),
            categories_bought: counts_of(cat_bought),
            cart: cart_lines,
            cart_updated_at: read.time("cart_updated_at")?,
            orders: read.count("orders")?,
            revenue: read.int("revenue")?.unwrap_or(0),
            last_order_at: read.time("last_order_at")?,
            email_opens: read.count("email_opens")?,
            email_clicks: read.count("email_clicks")?,
            last_engaged_at: read.time("last_engaged_at")?,
            lifecycle: self.config.lifecycle.stage(first_seen, last_seen, now),
            consent,
        }))
    }

    /// Finds a profile by user id, then by anonymous id. Ids that cannot be profile ids
    /// find nothing.
    ///
    /// # Errors
    /// As [`RedisProfiles::profile`].
    pub async fn find(&self, id: &str, now: OffsetDateTime) -> Result<Option<Profile>, StoreError> {
        let candidates = [ProfileId::user(id), ProfileId::anonymous(id)];
        for candidate in candidates.into_iter().flatten() {
            if let Some(p) = self.profile(&candidate, now).await? {
                return Ok(Some(p));
            }
        }
        Ok(None)
    }

    /// Succeeds when Redis answers `PING`.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when it does not.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }
}

/// What the script needs of an event. Integers travel as strings (Lua numbers are doubles).
fn ops(e: &Event) -> serde_json::Value {
    let count_name = match (e.kind, &e.name) {
        (EventKind::Track, Some(name)) if !name.is_empty() => name.as_str(),
        _ => e.kind.as_str(),
    };
    let items: Vec<_> = e
        .items
        .iter()
        .map(|i| {
            json!([
                i.product_id,
                i.category.as_deref().unwrap_or(""),
                i.price.to_string(),
                i.quantity.to_string()
            ])
        })
        .collect();
    let revenue = if e.revenue != 0 {
        e.revenue
    } else {
        e.items
            .iter()
            .map(|i| i.price.saturating_mul(i64::from(i.quantity)))
            .fold(0i64, i64::saturating_add)
    };
    let mut v = json!({
        "id": e.message_id.simple().to_string(),
        "k": e.kind.as_str(),
        "n": count_name,
        "ts": millis(e.timestamp).to_string(),
    });
    if !items.is_empty() {
        v["it"] = json!(items);
    }
    match e.kind {
        EventKind::Identify => {
            let traits: Vec<_> = e
                .properties
                .iter()
                .map(|(k, val)| json!([k, val.to_string()]))
                .collect();
            v["tr"] = json!(traits);
        }
        EventKind::OrderCompleted => {
            v["rev"] = json!(revenue.to_string());
            v["cur"] = json!(e.currency.as_deref().unwrap_or(""));
        }
        EventKind::ConsentChange => {
            let c = e.consent.unwrap_or_default();
            let names = |m: crate::model::ConsentMask| {
                Purpose::ALL
                    .into_iter()
                    .filter(|p| m.contains(*p))
                    .map(Purpose::as_str)
                    .collect::<Vec<_>>()
            };
            v["cg"] = json!(names(c.granted));
            v["cd"] = json!(names(c.denied));
        }
        _ => {}
    }
    v
}

/// The event as written to `stream:events`: everything known about it, readable JSON.
fn stream_entry(u: &ProfileUpdate, e: &Event) -> serde_json::Value {
    json!({
        "profile": u.profile,
        "message_id": e.message_id,
        "kind": e.kind,
        "name": e.name,
        "timestamp": millis(e.timestamp),
        "received_at": millis(e.received_at),
        "properties": e.properties.iter().cloned().collect::<BTreeMap<_, _>>(),
        "items": e.items,
        "user_id": e.user_id,
        "previous_id": e.previous_id,
        "order_id": e.order_id,
        "revenue": e.revenue,
        "currency": e.currency,
        "consent": e.consent,
        "purpose": e.purpose,
        "anonymous_id": u.anonymous_id,
        "context": u.context,
    })
}

fn millis(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

fn from_millis(ms: i64) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()
}

fn corrupt(key: &str, field: &str, detail: &str) -> StoreError {
    StoreError::Corrupt {
        key: key.into(),
        field: field.into(),
        detail: detail.into(),
    }
}

/// Typed reads of the profile hash, with errors naming the field.
struct Reader<'a> {
    key: &'a str,
    h: &'a BTreeMap<String, String>,
}

impl Reader<'_> {
    fn int(&self, field: &str) -> Result<Option<i64>, StoreError> {
        self.h
            .get(field)
            .map(|v| {
                v.parse()
                    .map_err(|_| corrupt(self.key, field, &format!("{v:?} is not an integer")))
            })
            .transpose()
    }

    fn count(&self, field: &str) -> Result<u64, StoreError> {
        let n = self.int(field)?.unwrap_or(0);
        u64::try_from(n).map_err(|_| corrupt(self.key, field, &format!("{n} is negative")))
    }

    fn time(&self, field: &str) -> Result<Option<OffsetDateTime>, StoreError> {
        self.int(field)?
            .map(|ms| from_millis(ms).ok_or_else(|| corrupt(self.key, field, "is not a time")))
            .transpose()
    }
}
