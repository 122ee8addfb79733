//! [`RedisProfiles`]: applies profile updates and reads profiles back, and its config.
//!
//! Applying uses a Lua script (`apply.lua`), not a plain pipeline, because dedupe is
//! conditional: whether an event's counters move depends on whether its message id was seen
//! before, and a pipeline cannot branch on a reply without a second round trip (a `WATCH`
//! loop would need two and retries under contention). One `EVALSHA` per profile, all of a
//! batch's in one `MULTI`/`EXEC` pipeline: one round trip per batch. The same call
//! re-evaluates the profile's segments, so memberships never lag behind the profile.
//!
//! The segments are written into the script's text when the store is built
//! ([`RedisProfiles::with_segments`]) rather than sent with each call or kept in Redis: a
//! call then carries only its events, the script decodes nothing per call (a JSON argument
//! of the demo segments cost about 19 µs of Redis time per call to decode, the Lua table
//! about 6 µs to build), and two collectors with different definitions run different
//! scripts instead of reading one shared, changing key.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, RedisError, ServerErrorKind};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tracing::{info, warn};

use crate::identity::{self, Applied, Link, MergeOutcome};
use crate::keys::{self, ProfileKeys, SCHEMA_VERSION, SCHEMA_VERSION_KEY};
use crate::lifecycle::{LifecycleThresholds, ThresholdError};
use crate::model::{
    ApplyReport, CartLine, ConsentRecord, ConsentState, ConsentStatus, Profile, ProfileId,
    ProfileUpdate, Purpose, SegmentMembership, ViewedProduct,
};
use crate::schedule::parse_profile_id;
use crate::script::{self, ScriptSegments};
use crate::segments::Segment;

/// How profiles are kept. Every field has a default; `validate` checks what types cannot.
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
    /// Approximate cap of the segment transition stream (`XADD MAXLEN ~`). Default 1,000,000.
    pub transition_stream_max_len: u64,
    /// Connect and response timeout for Redis calls. Default 2 s.
    #[serde(with = "humantime_serde")]
    pub redis_timeout: Duration,
    /// Lifecycle stage thresholds.
    pub lifecycle: LifecycleThresholds,
    /// The most anonymous ids (devices, browsers, cleared cookies) one user profile takes
    /// in: beyond it, a new anonymous id is neither linked nor merged, which protects
    /// against shared devices and "log in as" support tools. Default 100.
    pub max_anonymous_ids: u32,
    /// TLS for `rediss://` URLs, beyond the system's trusted roots.
    pub redis_tls: RedisTls,
    /// The traits that need marketing consent: removed from a profile, and no longer
    /// stored, while marketing is denied. Default `email`, `phone`.
    pub marketing_traits: Vec<String>,
}

impl Default for ProfileConfig {
    fn default() -> Self {
        Self {
            dedupe_window: Duration::from_secs(7 * 86_400),
            dedupe_max_ids: 10_000,
            recently_viewed_max: 20,
            event_stream_max_len: 1_000_000,
            transition_stream_max_len: 1_000_000,
            redis_timeout: Duration::from_secs(2),
            lifecycle: LifecycleThresholds::default(),
            max_anonymous_ids: 100,
            marketing_traits: vec!["email".into(), "phone".into()],
            redis_tls: RedisTls::default(),
        }
    }
}

/// TLS settings for a `rediss://` URL (the user name and password of a Redis ACL user go in
/// the URL: `rediss://collector:secret@redis.internal:6380`). Paths are PEM files, relative
/// to the working directory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisTls {
    /// The certificate authority that signed the server's certificate, instead of the
    /// system's trusted roots (a private CA).
    pub ca_file: Option<std::path::PathBuf>,
    /// This client's certificate, for servers that require one (`tls-auth-clients yes`).
    pub client_cert: Option<std::path::PathBuf>,
    /// The key of `client_cert`.
    pub client_key: Option<std::path::PathBuf>,
}

/// The client for `url`, with the TLS settings of `config` for `rediss://`.
///
/// # Errors
/// A bad URL, a PEM file that cannot be read, or a client certificate without its key.
pub(crate) fn client(url: &str, config: &ProfileConfig) -> Result<redis::Client, StoreError> {
    // rustls needs a process-wide crypto provider for rediss://; the first one installed
    // stays (another part of the process may have installed it already).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tls = &config.redis_tls;
    if tls == &RedisTls::default() {
        return redis::Client::open(url).map_err(StoreError::Redis);
    }
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| StoreError::Tls(format!("{}: {e}", path.display())))
    };
    let client_tls = match (&tls.client_cert, &tls.client_key) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read(cert)?,
            client_key: read(key)?,
        }),
        _ => {
            return Err(StoreError::Tls(
                "redis_tls.client_cert and redis_tls.client_key go together".into(),
            ));
        }
    };
    let root_cert = tls.ca_file.as_deref().map(read).transpose()?;
    redis::Client::build_with_tls(
        url,
        redis::TlsCertificates {
            client_tls,
            root_cert,
        },
    )
    .map_err(StoreError::Redis)
}

/// A [`ProfileConfig`] that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A setting that must be positive is zero.
    #[error("{field} must be greater than zero")]
    Zero {
        /// The setting, e.g. `dedupe_max_ids`.
        field: &'static str,
    },
    /// The lifecycle thresholds contradict each other.
    #[error(transparent)]
    Lifecycle(#[from] ThresholdError),
}

impl ProfileConfig {
    /// Checks values types cannot: positive sizes and durations, ordered lifecycle thresholds.
    ///
    /// # Errors
    /// The first bad setting, by name.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let zero = [
            ("dedupe_window", self.dedupe_window.is_zero()),
            ("dedupe_max_ids", self.dedupe_max_ids == 0),
            ("recently_viewed_max", self.recently_viewed_max == 0),
            ("event_stream_max_len", self.event_stream_max_len == 0),
            (
                "transition_stream_max_len",
                self.transition_stream_max_len == 0,
            ),
            ("redis_timeout", self.redis_timeout.is_zero()),
            ("max_anonymous_ids", self.max_anonymous_ids == 0),
        ];
        if let Some((field, _)) = zero.into_iter().find(|(_, is_zero)| *is_zero) {
            return Err(ConfigError::Zero { field });
        }
        self.lifecycle.validate()?;
        Ok(())
    }
}

/// Why a storage call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis cannot be reached or is not ready (refused, timed out, loading, busy, read-only
    /// replica, out of memory): nothing was acknowledged, retry later.
    #[error("redis unavailable: {0}")]
    Unavailable(RedisError),
    /// Stored data this version cannot read or update (written by another version, or by
    /// hand). An update that meets it leaves that profile unchanged.
    #[error("corrupt data in {key} field {field}: {detail}")]
    Corrupt {
        /// The key.
        key: String,
        /// The field or member, `-` for the key as a whole.
        field: String,
        /// What is wrong.
        detail: String,
    },
    /// The Redis holds data of another key schema version.
    #[error("redis holds key schema version {found}, this build reads version {SCHEMA_VERSION}")]
    Schema {
        /// What `meta:schema_version` holds.
        found: String,
    },
    /// An event or a segment could not be encoded for the script.
    #[error("cannot be encoded for the script: {0}")]
    Encode(#[from] serde_json::Error),
    /// Any other Redis error.
    #[error("redis error: {0}")]
    Redis(RedisError),
    /// The TLS settings for Redis cannot be used.
    #[error("redis tls: {0}")]
    Tls(String),
}

impl From<RedisError> for StoreError {
    fn from(e: RedisError) -> Self {
        if e.is_io_error() || e.is_timeout() || e.is_connection_refusal() {
            return StoreError::Unavailable(e);
        }
        // A pipeline or transaction reports the errors of its commands together.
        let errors = e.clone().into_server_errors().unwrap_or_default();
        let mut corrupt = None;
        for (_, err) in errors.iter() {
            let unavailable = matches!(
                err.kind(),
                Some(
                    ServerErrorKind::BusyLoading
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::ClusterDown
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::ReadOnly
                )
            ) || matches!(err.code(), "BUSY" | "OOM");
            if unavailable {
                return StoreError::Unavailable(e);
            }
            if err.code() == "CORRUPT" && corrupt.is_none() {
                corrupt = Some(script_corrupt(err.details().unwrap_or_default()));
            }
        }
        corrupt.unwrap_or(StoreError::Redis(e))
    }
}

/// The script's `CORRUPT {"key":..,"field":..,"detail":..}` error reply.
fn script_corrupt(details: &str) -> StoreError {
    #[derive(Deserialize)]
    struct Reply {
        key: String,
        field: String,
        detail: String,
    }
    match serde_json::from_str::<Reply>(details) {
        Ok(r) => corrupt(&r.key, &r.field, &r.detail),
        Err(_) => corrupt("?", "?", details),
    }
}

pub(crate) fn is_noscript(e: &RedisError) -> bool {
    e.clone().into_server_errors().is_some_and(|errors| {
        errors
            .iter()
            .any(|(_, err)| err.kind() == Some(ServerErrorKind::NoScript))
    })
}

/// Profiles in one Redis server, and the segments evaluated on each update. Cheap to clone;
/// clones share the connection, which reconnects by itself after Redis comes back.
#[derive(Clone)]
pub struct RedisProfiles {
    pub(crate) conn: ConnectionManager,
    pub(crate) config: ProfileConfig,
    pub(crate) script: Arc<redis::Script>,
    /// The segments' member set keys, in the script's order.
    pub(crate) member_keys: Arc<[String]>,
    /// The segments' names and fingerprints ([`Segment::fingerprint`]), in the script's
    /// order: what a rebuild records ([`crate::rebuild`]).
    pub(crate) definitions: Arc<[(String, String)]>,
}

impl std::fmt::Debug for RedisProfiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisProfiles")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl RedisProfiles {
    /// Connects, marks an empty Redis with the schema version (`meta:schema_version`), and
    /// loads the apply script.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when Redis cannot be reached within `redis_timeout`,
    /// [`StoreError::Schema`] when it holds data of another schema version.
    pub async fn connect(url: &str, config: ProfileConfig) -> Result<Self, StoreError> {
        let client = client(url, &config)?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.redis_timeout))
            .set_response_timeout(Some(config.redis_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let mut conn = ConnectionManager::new_with_config(client, manager).await?;
        let (kind,): (String,) = redis::pipe()
            .cmd("SET")
            .arg(SCHEMA_VERSION_KEY)
            .arg(SCHEMA_VERSION)
            .arg("NX")
            .ignore()
            .cmd("TYPE")
            .arg(SCHEMA_VERSION_KEY)
            .query_async(&mut conn)
            .await?;
        if kind != "string" {
            return Err(StoreError::Schema {
                found: format!("<a {kind}, not a string>"),
            });
        }
        let found: Option<String> = redis::cmd("GET")
            .arg(SCHEMA_VERSION_KEY)
            .query_async(&mut conn)
            .await?;
        if let Some(found) = found.filter(|v| v != SCHEMA_VERSION) {
            return Err(StoreError::Schema { found });
        }
        let (script, member_keys) = load(&mut conn, ScriptSegments::new(&[])?, &config).await?;
        Ok(Self {
            conn,
            config,
            script,
            member_keys,
            definitions: Arc::new([]),
        })
    }

    /// Evaluates `segments` on every update from now on (none by default): each update
    /// re-evaluates every segment for its profile in the same script call, keeps the
    /// memberships, appends changes to `stream:transitions` and schedules the profile's
    /// next deadline (docs/KEY_SCHEMA.md); [`RedisProfiles::evaluate_claimed`] evaluates
    /// the same segments at deadlines, and [`RedisProfiles::rebuild`] brings the
    /// memberships of existing profiles in line with them. The segments are written into
    /// the apply script (`script.rs`), which is loaded here.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when Redis cannot be reached.
    pub async fn with_segments(mut self, segments: &[Segment]) -> Result<Self, StoreError> {
        self.definitions = segments
            .iter()
            .map(|s| Ok((s.name.clone(), s.fingerprint()?)))
            .collect::<Result<Vec<_>, serde_json::Error>>()?
            .into();
        (self.script, self.member_keys) =
            load(&mut self.conn, ScriptSegments::new(segments)?, &self.config).await?;
        Ok(self)
    }

    /// Applies the updates of one batch in one round trip (`MULTI`, one `EVALSHA` per
    /// update, `EXEC`). Each update's events apply atomically and in order; an event whose
    /// message id the profile already applied within the dedupe window is skipped and counted
    /// as a duplicate, so retrying after any failure is safe. Updates without events are
    /// skipped.
    ///
    /// When Redis restarted and forgot the script (`NOSCRIPT`), it is loaded and the batch is
    /// sent once more.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when Redis cannot be reached: nothing may be acknowledged.
    /// [`StoreError::Corrupt`] when a profile holds data this version cannot update: that
    /// profile is unchanged, but the batch's other profiles are applied (Redis transactions
    /// do not roll back), and a retry counts their events as duplicates.
    pub async fn apply(&self, updates: &[ProfileUpdate]) -> Result<ApplyReport, StoreError> {
        let mut report = ApplyReport::default();
        let first: Vec<&ProfileUpdate> = updates.iter().filter(|u| !u.events.is_empty()).collect();
        let mut redirected = Vec::new();
        for (update, reply) in first.iter().zip(self.apply_round(&first).await?) {
            self.account(&mut report, update, reply, &mut redirected)
                .await?;
        }
        // A redirect points at a user profile, and user profiles are never merged: the
        // second round is the last.
        let second: Vec<&ProfileUpdate> = redirected.iter().collect();
        let mut again = Vec::new();
        for (update, reply) in second.iter().zip(self.apply_round(&second).await?) {
            self.account(&mut report, update, reply, &mut again).await?;
        }
        if let Some(u) = again.first() {
            return Err(StoreError::Corrupt {
                key: keys::profile(&u.profile),
                field: "merged_into".into(),
                detail: "a user profile was merged into another profile".into(),
            });
        }
        Ok(report)
    }

    /// One round trip: the updates' script calls in one `MULTI`/`EXEC` pipeline.
    async fn apply_round(&self, updates: &[&ProfileUpdate]) -> Result<Vec<Applied>, StoreError> {
        if updates.is_empty() {
            return Ok(Vec::new());
        }
        let invocations = updates
            .iter()
            .map(|u| script::invocation(&self.script, &self.member_keys, u, &self.config))
            .collect::<Result<Vec<_>, _>>()?;
        let mut pipe = redis::pipe();
        // One script call is atomic by itself.
        if invocations.len() > 1 {
            pipe.atomic();
        }
        for inv in &invocations {
            pipe.invoke_script(inv);
        }
        let mut conn = self.conn.clone();
        let replies: Vec<redis::Value> = match pipe.query_async(&mut conn).await {
            Err(e) if is_noscript(&e) => {
                // Events that did apply before the failure dedupe on the second attempt.
                self.script.load_async(&mut conn).await?;
                pipe.query_async(&mut conn).await?
            }
            result => result?,
        };
        replies.into_iter().map(identity::applied).collect()
    }

    /// Adds one update's reply to `report`, runs the merge it asks for, and queues the
    /// update again for the user profile when its profile was merged into one.
    async fn account(
        &self,
        report: &mut ApplyReport,
        update: &ProfileUpdate,
        reply: Applied,
        redirected: &mut Vec<ProfileUpdate>,
    ) -> Result<(), StoreError> {
        let now = update
            .events
            .iter()
            .map(|e| e.received_at)
            .max()
            .unwrap_or_else(OffsetDateTime::now_utc);
        match reply {
            Applied::Done {
                applied,
                duplicates,
                link,
            } => {
                report.applied += applied;
                report.duplicates += duplicates;
                match link {
                    Link::None => {}
                    Link::Limit => {
                        // No ids in logs: they are personal data.
                        warn!(
                            "a user profile has as many anonymous ids as it may take; a new one was not linked"
                        );
                        report.ids_over_limit += 1;
                    }
                    Link::Merge(source) => match self.merge(&source, &update.profile, now).await? {
                        MergeOutcome::Merged => report.merged += 1,
                        MergeOutcome::Refused => {
                            info!(
                                "an anonymous profile merged into one user was not merged into another"
                            );
                            report.merges_refused += 1;
                        }
                    },
                }
            }
            Applied::Redirect { target, sealed } => {
                if sealed
                    && self.merge(&update.profile, &target, now).await? == MergeOutcome::Merged
                {
                    report.merged += 1;
                }
                redirected.push(ProfileUpdate {
                    user_id: target.as_str().strip_prefix("u:").map(String::from),
                    profile: target,
                    ..update.clone()
                });
            }
        }
        Ok(())
    }

    /// Reads a profile in one round trip (`MULTI`/`EXEC`, so a consistent snapshot), with its
    /// lifecycle stage as of `now`; `None` when `profile:{ID}` does not exist.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`], or [`StoreError::Corrupt`] naming the key and field of
    /// data this version cannot read.
    pub async fn profile(
        &self,
        id: &ProfileId,
        now: OffsetDateTime,
    ) -> Result<Option<Profile>, StoreError> {
        let k = ProfileKeys::new(id);
        let mut pipe = redis::pipe();
        pipe.hgetall(&k.profile)
            .hgetall(&k.traits)
            .hgetall(&k.counts)
            .smembers(&k.ids)
            .zrevrange_withscores(&k.viewed, 0, -1)
            .zrevrange_withscores(&k.cat_viewed, 0, -1)
            .zrevrange_withscores(&k.cat_bought, 0, -1)
            .hgetall(&k.cart)
            .hgetall(&k.segments)
            // One snapshot: no update lands between the reads of two keys.
            .atomic()
            // Errors come back per command, so a key of the wrong type can be named.
            .ignore_errors();
        let mut conn = self.conn.clone();
        let replies: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
        let mut replies = replies.into_iter();
        let mut next = || replies.next().unwrap_or(redis::Value::Nil);
        let hash: Vec<(String, String)> = parse(&k.profile, next())?;
        let traits: Vec<(String, String)> = parse(&k.traits, next())?;
        let counts: Vec<(String, String)> = parse(&k.counts, next())?;
        let ids: Vec<String> = parse(&k.ids, next())?;
        let viewed: Vec<(String, f64)> = parse(&k.viewed, next())?;
        let cat_viewed: Vec<(String, f64)> = parse(&k.cat_viewed, next())?;
        let cat_bought: Vec<(String, f64)> = parse(&k.cat_bought, next())?;
        let cart: Vec<(String, String)> = parse(&k.cart, next())?;
        let segments: Vec<(String, String)> = parse(&k.segments, next())?;
        if hash.is_empty() {
            return Ok(None);
        }
        if let Some((_, target)) = hash.iter().find(|(f, _)| f == "merged_into") {
            // A merged anonymous profile: the person is the user profile now.
            let target = parse_profile_id(target)
                .filter(|t| t.as_str().starts_with("u:"))
                .ok_or_else(|| {
                    corrupt(
                        &k.profile,
                        "merged_into",
                        &format!("{target:?} is not a user profile id"),
                    )
                })?;
            return Box::pin(self.profile(&target, now)).await;
        }

        let h = Fields {
            key: &k.profile,
            map: hash.into_iter().collect(),
        };
        let first_seen = h.time("first_seen")?.unwrap_or(now);
        let last_seen = h.time("last_seen")?.unwrap_or(first_seen);
        let mut consent = BTreeMap::new();
        for p in Purpose::ALL {
            let field = format!("consent:{p}");
            let status = match h.map.get(&field).map(String::as_str) {
                None => continue,
                Some("granted") => ConsentStatus::Granted,
                Some("denied") => ConsentStatus::Denied,
                Some(other) => {
                    return Err(corrupt(
                        &k.profile,
                        &field,
                        &format!("{other:?} is not granted or denied"),
                    ));
                }
            };
            let at_field = format!("{field}:at");
            let at = h
                .time(&at_field)?
                .ok_or_else(|| corrupt(&k.profile, &at_field, "is missing"))?;
            let source = h.map.get(&format!("{field}:source")).cloned();
            consent.insert(p, ConsentState { status, at, source });
        }
        let consent_log = match h.map.get("consent_log") {
            None => Vec::new(),
            Some(raw) => serde_json::from_str::<Vec<ConsentRecord>>(raw).map_err(|e| {
                corrupt(
                    &k.profile,
                    "consent_log",
                    &format!("not a list of consent answers: {e}"),
                )
            })?,
        };

        let (mut anonymous_ids, mut user_ids) = (Vec::new(), Vec::new());
        for member in ids {
            match member.split_once(':') {
                Some(("anon", a)) => anonymous_ids.push(a.to_string()),
                Some(("user", u)) => user_ids.push(u.to_string()),
                _ => return Err(corrupt(&k.ids, &member, "is not anon:<id> or user:<id>")),
            }
        }
        anonymous_ids.sort();
        user_ids.sort();

        let mut event_counts = BTreeMap::new();
        for (name, n) in counts {
            let n = n
                .parse()
                .map_err(|_| corrupt(&k.counts, &name, &format!("{n:?} is not a count")))?;
            event_counts.insert(name, n);
        }

        let recently_viewed = viewed
            .into_iter()
            .map(|(product_id, ms)| {
                let at = whole(ms).and_then(from_millis).ok_or_else(|| {
                    corrupt(&k.viewed, &product_id, &format!("{ms} is not a time"))
                })?;
                Ok(ViewedProduct { product_id, at })
            })
            .collect::<Result<_, StoreError>>()?;

        let mut cart_lines = Vec::with_capacity(cart.len());
        for (product_id, line) in cart {
            #[derive(Deserialize)]
            struct Line {
                quantity: u32,
                price: i64,
                category: Option<String>,
            }
            let l: Line = serde_json::from_str(&line)
                .map_err(|e| corrupt(&k.cart, &product_id, &format!("{line:?}: {e}")))?;
            cart_lines.push(CartLine {
                product_id,
                quantity: l.quantity,
                price: l.price,
                category: l.category,
            });
        }
        cart_lines.sort_by(|a, b| a.product_id.cmp(&b.product_id));

        let mut segments = segments
            .into_iter()
            .map(|(name, ms)| {
                let entered_at =
                    ms.parse().ok().and_then(from_millis).ok_or_else(|| {
                        corrupt(&k.segments, &name, &format!("{ms:?} is not a time"))
                    })?;
                Ok(SegmentMembership { name, entered_at })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        segments.sort_by(|a, b| a.name.cmp(&b.name));

        Ok(Some(Profile {
            id: id.clone(),
            user_id: h.map.get("user_id").cloned().or_else(|| user_ids.pop()),
            anonymous_ids,
            traits: traits.into_iter().collect(),
            first_seen,
            last_seen,
            events: h.count("events")?,
            page_views: h.count("page_views")?,
            sessions: h.count("sessions")?,
            event_counts,
            recently_viewed,
            categories_viewed: ranked(&k.cat_viewed, cat_viewed)?,
            categories_bought: ranked(&k.cat_bought, cat_bought)?,
            cart: cart_lines,
            cart_updated_at: h.time("cart_updated_at")?,
            orders: h.count("orders")?,
            revenue: h.int("revenue")?.unwrap_or(0),
            last_order_at: h.time("last_order_at")?,
            email_opens: h.count("email_opens")?,
            email_clicks: h.count("email_clicks")?,
            last_engaged_at: h.time("last_engaged_at")?,
            lifecycle: self.config.lifecycle.stage(first_seen, last_seen, now),
            consent,
            consent_log,
            segments,
        }))
    }

    /// The API's lookup: the profile of user `id`, else of anonymous visitor `id`. An id
    /// that cannot be a profile id ([`crate::model::check_id`]) finds nothing.
    ///
    /// # Errors
    /// As [`RedisProfiles::profile`].
    pub async fn find(&self, id: &str, now: OffsetDateTime) -> Result<Option<Profile>, StoreError> {
        for candidate in [ProfileId::user(id), ProfileId::anonymous(id)] {
            let Ok(candidate) = candidate else {
                return Ok(None);
            };
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

/// Loads the script now, so the first batch does not pay for a NOSCRIPT round trip.
async fn load(
    conn: &mut ConnectionManager,
    segments: ScriptSegments,
    config: &ProfileConfig,
) -> Result<(Arc<redis::Script>, Arc<[String]>), StoreError> {
    let script = redis::Script::new(&script::with_settings(&segments.source, config));
    script.load_async(conn).await?;
    Ok((Arc::new(script), segments.member_keys.into()))
}

/// One reply of a pipeline run with `ignore_errors`, as `T`, or an error naming `key`.
fn parse<T: FromRedisValue>(key: &str, value: redis::Value) -> Result<T, StoreError> {
    match value {
        redis::Value::ServerError(err) if err.code() == "WRONGTYPE" => {
            Err(corrupt(key, "-", "has the wrong type"))
        }
        redis::Value::ServerError(err) => Err(RedisError::from(err).into()),
        value => redis::from_redis_value(value).map_err(|e| corrupt(key, "-", &e.to_string())),
    }
}

/// A sorted set of counts, most first; ties by name so the order does not depend on Redis.
fn ranked(key: &str, scored: Vec<(String, f64)>) -> Result<Vec<(String, u64)>, StoreError> {
    let mut counts = scored
        .into_iter()
        .map(
            |(name, n)| match whole(n).and_then(|n| u64::try_from(n).ok()) {
                Some(n) => Ok((name, n)),
                None => Err(corrupt(key, &name, &format!("{n} is not a count"))),
            },
        )
        .collect::<Result<Vec<_>, _>>()?;
    counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    Ok(counts)
}

/// A sorted set score that is a whole number (scores are doubles).
fn whole(x: f64) -> Option<i64> {
    // Exact integers within ±2^53 are what the script writes.
    const LIMIT: f64 = 9_007_199_254_740_992.0;
    (x.fract() == 0.0 && x.abs() <= LIMIT).then_some(x as i64)
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
struct Fields<'a> {
    key: &'a str,
    map: BTreeMap<String, String>,
}

impl Fields<'_> {
    fn int(&self, field: &str) -> Result<Option<i64>, StoreError> {
        self.map
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
            .map(|ms| {
                from_millis(ms)
                    .ok_or_else(|| corrupt(self.key, field, &format!("{ms} is not a time")))
            })
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_human_durations_and_rejects_unknown_fields() {
        let c: ProfileConfig = serde_json::from_str(
            r#"{"dedupe_window": "1day", "redis_timeout": "250ms",
                "lifecycle": {"new_for": "7d"}}"#,
        )
        .unwrap();
        assert_eq!(c.dedupe_window, Duration::from_secs(86_400));
        assert_eq!(c.redis_timeout, Duration::from_millis(250));
        assert_eq!(c.lifecycle.new_for, Duration::from_secs(7 * 86_400));
        assert_eq!(c.lifecycle.dormant_after, Duration::from_secs(30 * 86_400));
        assert_eq!(c.dedupe_max_ids, 10_000);
        let err = serde_json::from_str::<ProfileConfig>(r#"{"dedupe_windows": "1d"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("unknown field `dedupe_windows`"), "{err}");
    }

    #[test]
    fn validation_names_the_setting() {
        assert_eq!(ProfileConfig::default().validate(), Ok(()));
        let c = ProfileConfig {
            recently_viewed_max: 0,
            ..ProfileConfig::default()
        };
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "recently_viewed_max must be greater than zero"
        );
        let mut c = ProfileConfig::default();
        c.lifecycle.churned_after = Duration::from_secs(86_400);
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "lifecycle.dormant_after (30d) must be less than lifecycle.churned_after (1d)"
        );
    }

    #[test]
    fn script_errors_become_typed_errors() {
        let reply = redis::make_extension_error(
            "CORRUPT".into(),
            Some(
                r#"{"key":"profile:{u:a b}","field":"Signed Up","detail":"\"x\" is not a count"}"#
                    .into(),
            ),
        );
        match StoreError::from(reply) {
            StoreError::Corrupt { key, field, detail } => {
                assert_eq!(key, "profile:{u:a b}");
                assert_eq!(field, "Signed Up");
                assert_eq!(detail, "\"x\" is not a count");
            }
            other => panic!("{other:?}"),
        }
        let loading = redis::make_extension_error("BUSY".into(), None);
        assert!(matches!(
            StoreError::from(loading),
            StoreError::Unavailable(_)
        ));
        let refused = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(matches!(
            StoreError::from(refused),
            StoreError::Unavailable(_)
        ));
    }

    #[test]
    fn scores_must_be_whole_counts() {
        assert_eq!(whole(3.0), Some(3));
        assert_eq!(whole(2.5), None);
        assert_eq!(whole(f64::INFINITY), None);
        assert_eq!(whole(f64::NAN), None);
        let err = ranked("k", vec![("a".into(), -1.0)]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "corrupt data in k field a: -1 is not a count"
        );
    }
}
