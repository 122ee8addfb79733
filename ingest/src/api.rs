//! The HTTP API: routes, shared state and handlers.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use profile_cache::audit::{AuditResult, Operation};
use profile_cache::segments::{Predicate, Segment};
use profile_cache::{Erasure, Export, Profile, ProfileId, StoreError};
use profile_cache::{MemberCursor, MemberPage, MembersRequest};
use serde::{Deserialize, Serialize};
use serde_json::json;
use subtle::ConstantTimeEq;
use time::OffsetDateTime;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::services::ServeDir;
use tower_http::trace::TraceLayer;
use tracing::{debug, error, info, instrument, warn};

use crate::auth::{self, ApiToken, AuditLog, Scope};
use crate::config::{Config, WriteKey};
use crate::error::ApiError;
use crate::pipeline::{self, Rejected};
use crate::ratelimit::RateLimits;
use crate::spool::{Spool, SpooledBatch};
use crate::store::ProfileStore;

/// The current time; injected so tests control it.
pub trait Clock: Send + Sync + 'static {
    /// Now.
    fn now(&self) -> OffsetDateTime;
}

/// The system clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// Profile storage.
    pub store: Arc<dyn ProfileStore>,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Where accesses to profiles are recorded.
    pub audit: Arc<dyn AuditLog>,
    /// Request rate limits, and how the client's address is found.
    pub limits: Arc<RateLimits>,
    /// The configuration the collector runs with.
    pub config: Arc<Config>,
    /// The segments the collector evaluates, compiled from `config` at start.
    pub segments: Arc<[Segment]>,
    /// Where batches go while Redis does not answer (`spool.enabled`).
    pub spool: Option<Spool>,
}

/// The collector's routes. Tests call this without a socket; the per-client rate limit
/// applies only where requests carry the peer's `ConnectInfo<SocketAddr>` (as
/// [`crate::serve`] provides it).
pub fn router(state: AppState) -> Router {
    let config = state.config.clone();
    // Requests in flight and body deadlines (`overload`): one set of limits per router.
    let shedder = crate::overload::LoadShedder::new(&config);
    let origins: Vec<HeaderValue> = config
        .write_keys
        .iter()
        .flat_map(|k| &k.origins)
        .filter(|o| *o != "*")
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    let any_origin = config
        .write_keys
        .iter()
        .any(|k| k.origins.iter().any(|o| o == "*"));
    // Preflights cannot carry the write key (it is in the body), so they are answered for
    // every origin some key allows; the POST itself is checked against its own key.
    let cors = CorsLayer::new()
        .allow_origin(AllowOrigin::predicate(move |origin, _| {
            any_origin || origins.iter().any(|o| o == origin)
        }))
        .allow_methods([Method::POST])
        .allow_headers([header::CONTENT_TYPE])
        // The tracker reads it to back off after a 429 or 503.
        .expose_headers([header::RETRY_AFTER])
        .max_age(Duration::from_secs(86_400));
    let batches = Router::new()
        .route(&config.batch_path, post(collect))
        // Inside the CORS layer, so that a browser can read a 503 or 408.
        .layer(axum::middleware::from_fn_with_state(
            shedder.clone(),
            crate::overload::batches,
        ))
        .layer(cors);
    let mut app = Router::new()
        .merge(batches)
        .merge(crate::segment::routes())
        .route("/v1/profiles/{id}", get(profile).delete(erase_profile))
        .route("/v1/profiles/{id}/export", get(export_profile))
        .route("/v1/segments", get(segments))
        .route("/v1/segments/{name}/members", get(segment_members))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz));
    if let Some(dir) = &config.www_dir {
        app = app.fallback_service(ServeDir::new(dir));
    }
    app.layer(axum::middleware::from_fn_with_state(
        shedder,
        crate::overload::api,
    ))
    .layer(TraceLayer::new_for_http())
    .with_state(state)
}

/// The answer to an accepted batch.
#[derive(Debug, Serialize)]
pub struct BatchResponse {
    /// Events applied now or before (a retried event counts as accepted).
    pub accepted: u64,
    /// Events left out, with the reason.
    pub rejected: Vec<Rejected>,
    /// The batch is in the collector's spool, to be applied when Redis answers again
    /// (left out when false).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub spooled: bool,
}

#[instrument(skip_all, fields(bytes))]
async fn collect(
    State(state): State<AppState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<BatchResponse>, ApiError> {
    // Before the body is read: a client over its rate costs as little as possible.
    if let Some(Extension(ConnectInfo(peer))) = peer {
        let client = state.limits.client_ip(peer.ip(), &headers);
        state.limits.check_client_ip(client)?;
    }
    let limits = state.config.limits.wire();
    let bytes = read_body(&headers, body, limits.max_bytes).await?;
    tracing::Span::current().record("bytes", bytes.len());
    let batch = wire::decode(&bytes, &limits)?;
    let key = write_key(&state.config.write_keys, &batch.write_key)?;
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        if !key.origins.iter().any(|o| o == "*" || o == origin) {
            return Err(ApiError::OriginNotAllowed(origin.into()));
        }
    }
    state.limits.check_write_key(&key.key)?;
    let received_at = state.clock.now();
    let write_key = batch.write_key.clone();
    let rules = pipeline::Rules::of(&state.config, &batch.write_key);
    let prepared =
        pipeline::prepare(batch, received_at, &rules).map_err(|e| ApiError::BadIdentity {
            field: e.field,
            problem: e.problem,
            limit: e.limit,
        })?;
    if prepared.consent_dropped > 0 {
        report_dropped_events("consent", prepared.consent_dropped);
    }
    if prepared.minimized > 0 {
        debug!(
            properties = prepared.minimized,
            "left out by the source's filters"
        );
    }
    let invalid = prepared.rejected.len() - prepared.consent_dropped;
    if invalid > 0 {
        report_dropped_events("invalid", invalid);
    }
    if prepared.updates.is_empty() {
        return Ok(Json(BatchResponse {
            accepted: 0,
            rejected: prepared.rejected,
            spooled: false,
        }));
    }
    let spooled = SpooledBatch {
        received_at,
        write_key,
        limits,
        body: bytes,
    };
    // While older batches wait in the spool, newer ones queue behind them, so that each
    // profile's batches are applied in the order they were accepted.
    if let Some(spool) = state.spool.as_ref().filter(|s| !s.is_drained()) {
        return spool_batch(&state, spool, &spooled, prepared).await;
    }
    let applied = match state.store.apply_batch(&prepared.updates).await {
        Ok(applied) => applied,
        Err(StoreError::Unavailable(err)) if state.spool.is_some() => {
            warn!(cause = %err, "redis unavailable: spooling");
            let spool = state.spool.as_ref().ok_or(ApiError::Internal)?;
            return spool_batch(&state, spool, &spooled, prepared).await;
        }
        Err(err) => return Err(store_error(&state, err)),
    };
    let report = applied.report;
    if report.duplicates > 0 {
        info!(duplicates = report.duplicates, "retried events skipped");
    }
    let mut rejected = prepared.rejected;
    if !applied.suppressed.is_empty() {
        // Events of an erased person: dropped by the store, not written anywhere.
        for update in &applied.suppressed {
            let indices = prepared.positions.get(*update).into_iter().flatten();
            rejected.extend(indices.map(|&index| Rejected {
                index,
                reason: SUPPRESSED.into(),
            }));
        }
        rejected.sort_by_key(|r| r.index);
        report_dropped_events("suppressed", applied.suppressed_events as usize);
    }
    Ok(Json(BatchResponse {
        accepted: report.applied + report.duplicates,
        rejected,
        spooled: false,
    }))
}

/// The reason given for an event of an erased person (a privacy deletion suppressed its id).
pub const SUPPRESSED: &str = "suppressed: the person was erased";

/// Acknowledges a batch once it is written to the spool (and, with `fsync = "always"`,
/// synced); the replayer applies it later. A full spool is 503 with `Retry-After`, like an
/// unreachable Redis: the tracker keeps the batch and backs off.
async fn spool_batch(
    state: &AppState,
    spool: &Spool,
    batch: &SpooledBatch,
    prepared: pipeline::Prepared,
) -> Result<Json<BatchResponse>, ApiError> {
    match spool.append(batch).await {
        Ok(_) => {
            let accepted = prepared.updates.iter().map(|u| u.events.len() as u64).sum();
            Ok(Json(BatchResponse {
                accepted,
                rejected: prepared.rejected,
                spooled: true,
            }))
        }
        Err(err) => {
            warn!(cause = %err, "spool refused a batch");
            Err(ApiError::Unavailable {
                retry_after: state.config.retry_after,
            })
        }
    }
}

/// Reads at most `limit` bytes, answering 413 early when `Content-Length` says it is more.
pub(crate) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::BodyTooLarge { limit });
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        // `to_bytes` reports a length-limit error in its source chain.
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            ApiError::BodyTooLarge { limit }
        } else {
            ApiError::BadBody(e.to_string())
        }
    })
}

pub(crate) fn write_key<'c>(keys: &'c [WriteKey], key: &str) -> Result<&'c WriteKey, ApiError> {
    // Compare every key in constant time so response timing does not reveal key prefixes.
    let mut found = None;
    for k in keys {
        if bool::from(k.key.as_bytes().ct_eq(key.as_bytes())) {
            found = Some(k);
        }
    }
    found.ok_or(ApiError::UnknownWriteKey)
}

#[instrument(skip_all)]
async fn profile(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Profile>, ApiError> {
    let access = (Operation::ProfileRead, id.as_str());
    let token = authorize(&state, &headers, Scope::ProfilesRead, Some(access)).await?;
    let profile = state
        .store
        .find(&id, state.clock.now())
        .await
        .map_err(|e| store_error(&state, e))?;
    let result = match profile {
        Some(_) => AuditResult::Ok,
        None => AuditResult::NotFound,
    };
    // Nothing is answered unless the access is on record.
    audit(&state, token, Operation::ProfileRead, &id, result).await?;
    profile.map(Json).ok_or(ApiError::NotFound)
}

/// `GET /v1/profiles/{id}/export`: everything stored about the person, as one JSON
/// document ([`Export`]). Needs `privacy:write`; recorded in the audit log (operation
/// `profile_export`) before it answers.
#[instrument(skip_all)]
async fn export_profile(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Export>, ApiError> {
    let access = (Operation::ProfileExport, id.as_str());
    let token = authorize(&state, &headers, Scope::PrivacyWrite, Some(access)).await?;
    let export = state
        .store
        .export(&id, state.clock.now())
        .await
        .map_err(|e| store_error(&state, e))?;
    let result = match export {
        Some(_) => AuditResult::Ok,
        None => AuditResult::NotFound,
    };
    audit(&state, token, Operation::ProfileExport, &id, result).await?;
    export.map(Json).ok_or(ApiError::NotFound)
}

/// `DELETE /v1/profiles/{id}`: erases the person and suppresses their ids ([`Erasure`]).
/// Needs `privacy:write`; a repeat answers 200 with `already_erased`, an id never seen 404.
/// Recorded in the audit log (operation `profile_delete`) once done: a failure midway
/// answers 503 or 500, and a retry finishes the erasure and is recorded then.
#[instrument(skip_all)]
async fn erase_profile(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Erasure>, ApiError> {
    let access = (Operation::ProfileDelete, id.as_str());
    let token = authorize(&state, &headers, Scope::PrivacyWrite, Some(access)).await?;
    let erasure = state
        .store
        .erase(&id, state.clock.now())
        .await
        .map_err(|e| store_error(&state, e))?;
    let result = match erasure {
        Some(_) => AuditResult::Ok,
        None => AuditResult::NotFound,
    };
    audit(&state, token, Operation::ProfileDelete, &id, result).await?;
    erasure.map(Json).ok_or(ApiError::NotFound)
}

/// The token of a request, counted against its rate, that allows `scope`. A known token
/// without the scope is refused; when the request is an access to a profile (`access`: the
/// operation and the id as the caller named it), the refusal is recorded in the audit log.
///
/// # Errors
/// [`ApiError::MissingToken`] / [`ApiError::InvalidToken`] (401),
/// [`ApiError::RateLimited`] (429), [`ApiError::MissingScope`] (403).
pub async fn authorize<'s>(
    state: &'s AppState,
    headers: &HeaderMap,
    scope: Scope,
    access: Option<(Operation, &str)>,
) -> Result<&'s ApiToken, ApiError> {
    let token = auth::authenticate(&state.config.api_tokens, headers)?;
    state.limits.check_token(&token.name)?;
    if let Err(refused) = token.require(scope) {
        warn!(actor = %token.name, %scope, "token lacks the scope");
        if let Some((operation, id)) = access {
            // The refusal stands whether or not it could be recorded.
            let _ = audit(state, token, operation, id, AuditResult::Forbidden).await;
        }
        return Err(refused);
    }
    Ok(token)
}

/// Records `token`'s `operation` on the profile named `id` in the audit log (see
/// [`auth::record`]); every read, export and deletion of a profile calls it before it
/// answers.
///
/// # Errors
/// [`ApiError::Unavailable`] (or [`ApiError::Internal`]) when the entry could not be
/// written: the caller then answers that instead of the data.
pub async fn audit(
    state: &AppState,
    token: &ApiToken,
    operation: Operation,
    id: &str,
    result: AuditResult,
) -> Result<(), ApiError> {
    auth::record(
        state.audit.as_ref(),
        token,
        operation,
        id,
        state.clock.now(),
        result,
    )
    .await
    .map_err(|e| store_error(state, e))
}

/// Members per page when `limit` is not given.
pub const DEFAULT_MEMBERS_LIMIT: usize = 100;

/// The most members one page returns: one page is two Redis round trips (members, then
/// their traits), and 1,000 members with a few traits each stay well under a millisecond
/// of Redis time.
pub const MAX_MEMBERS_LIMIT: usize = 1_000;

/// The most traits one page may ask for.
pub const MAX_TRAITS: usize = 20;

/// `GET /v1/segments`: every configured segment, with its size.
#[derive(Debug, Serialize)]
pub struct SegmentsResponse {
    /// In the order of the configuration.
    pub segments: Vec<SegmentSummary>,
}

/// One segment's definition and size.
#[derive(Debug, Serialize)]
pub struct SegmentSummary {
    /// The name.
    pub name: String,
    /// What it is for, when the definition says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The compiled condition (`profile_cache::segments`, "The compiled form").
    pub condition: Predicate,
    /// Its members now.
    pub size: u64,
}

/// `GET /v1/segments/{name}/members`: one page of members.
#[derive(Debug, Serialize)]
pub struct MembersResponse {
    /// The segment.
    pub segment: String,
    /// Members in (entered-at, id) order.
    pub members: Vec<MemberJson>,
    /// Pass as `cursor` for the next page; `null` when no member followed this page.
    pub next_cursor: Option<String>,
}

/// A member as the API shows it.
#[derive(Debug, Serialize)]
pub struct MemberJson {
    /// The profile id, `u:<user id>` or `a:<anonymous id>`.
    pub id: ProfileId,
    /// When it entered the segment, RFC 3339 in UTC.
    #[serde(with = "time::serde::rfc3339")]
    pub entered_at: OffsetDateTime,
    /// The same, Unix milliseconds.
    pub entered_at_ms: i64,
    /// The requested traits the profile has; missing ones are left out.
    pub traits: BTreeMap<String, String>,
}

impl MembersResponse {
    fn new(segment: String, page: MemberPage) -> Self {
        Self {
            segment,
            members: page
                .members
                .into_iter()
                .map(|m| MemberJson {
                    // Entered-at times are whole milliseconds within ±10^4 years.
                    entered_at_ms: m.entered_at.unix_timestamp_nanos().div_euclid(1_000_000) as i64,
                    id: m.id,
                    entered_at: m.entered_at,
                    traits: m.traits,
                })
                .collect(),
            next_cursor: page.next.map(|c| c.to_string()),
        }
    }
}

#[instrument(skip_all)]
async fn segments(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<SegmentsResponse>, ApiError> {
    authorize(&state, &headers, Scope::SegmentsRead, None).await?;
    let names: Vec<&str> = state.segments.iter().map(|s| s.name.as_str()).collect();
    let sizes = state
        .store
        .segment_sizes(&names)
        .await
        .map_err(|e| store_error(&state, e))?;
    let segments = state
        .segments
        .iter()
        .zip(sizes)
        .map(|(s, size)| SegmentSummary {
            description: Some(s.description.clone()).filter(|d| !d.is_empty()),
            name: s.name.clone(),
            condition: s.condition.clone(),
            size,
        })
        .collect();
    Ok(Json(SegmentsResponse { segments }))
}

/// The query of `GET /v1/segments/{name}/members`, as sent; an empty value counts as absent.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MembersQuery {
    cursor: Option<String>,
    limit: Option<String>,
    traits: Option<String>,
}

impl MembersQuery {
    /// Checks every parameter; `max_trait_bytes` is the longest trait name a batch can
    /// carry, so a longer one cannot exist.
    fn request(self, max_trait_bytes: usize) -> Result<MembersRequest, ApiError> {
        let present = |v: Option<String>| v.filter(|v| !v.is_empty());
        let after = present(self.cursor)
            .map(|c| {
                c.parse::<MemberCursor>()
                    .map_err(|e| ApiError::BadParameter {
                        parameter: "cursor",
                        problem: format!("{e}; pass next_cursor back as it came"),
                        limit: None,
                    })
            })
            .transpose()?;
        let limit = match present(self.limit) {
            None => DEFAULT_LIMIT,
            Some(text) => parse_limit(&text)?,
        };
        let traits = match present(self.traits) {
            None => Vec::new(),
            Some(list) => parse_traits(&list, max_trait_bytes)?,
        };
        Ok(MembersRequest {
            after,
            limit,
            traits,
        })
    }
}

const DEFAULT_LIMIT: NonZeroUsize = NonZeroUsize::new(DEFAULT_MEMBERS_LIMIT).unwrap();

/// A page size from 1 to [`MAX_MEMBERS_LIMIT`].
fn parse_limit(text: &str) -> Result<NonZeroUsize, ApiError> {
    let bad = |problem: String| ApiError::BadParameter {
        parameter: "limit",
        problem,
        limit: Some(MAX_MEMBERS_LIMIT),
    };
    let n: u64 = text.parse().map_err(|_| {
        bad(format!(
            "{text:?} is not a whole number from 1 to {MAX_MEMBERS_LIMIT}"
        ))
    })?;
    match usize::try_from(n).ok().and_then(NonZeroUsize::new) {
        None if n == 0 => Err(bad(format!("0 is too small, use 1 to {MAX_MEMBERS_LIMIT}"))),
        Some(limit) if limit.get() <= MAX_MEMBERS_LIMIT => Ok(limit),
        _ => Err(bad(format!("{n} is too large, limit {MAX_MEMBERS_LIMIT}"))),
    }
}

/// Comma-separated trait names: at most [`MAX_TRAITS`], each 1 to `max_bytes` bytes without
/// control characters or surrounding whitespace. A name listed twice is read once.
fn parse_traits(list: &str, max_bytes: usize) -> Result<Vec<String>, ApiError> {
    let names: Vec<&str> = list.split(',').collect();
    if names.len() > MAX_TRAITS {
        return Err(ApiError::BadParameter {
            parameter: "traits",
            problem: format!("{} names, limit {MAX_TRAITS}", names.len()),
            limit: Some(MAX_TRAITS),
        });
    }
    let mut traits: Vec<String> = Vec::with_capacity(names.len());
    for (i, name) in names.into_iter().enumerate() {
        let bad = |problem: String, limit| ApiError::BadParameter {
            parameter: "traits",
            problem: format!("name {} {problem}", i + 1),
            limit,
        };
        if name.is_empty() {
            return Err(bad("is empty".into(), None));
        }
        if name.len() > max_bytes {
            return Err(bad(
                format!("is {} bytes, limit {max_bytes}", name.len()),
                Some(max_bytes),
            ));
        }
        if name.chars().any(char::is_control) {
            return Err(bad(format!("{name:?} contains a control character"), None));
        }
        if name.trim() != name {
            return Err(bad(
                format!("{name:?} starts or ends with whitespace"),
                None,
            ));
        }
        if !traits.iter().any(|t| t == name) {
            traits.push(name.into());
        }
    }
    Ok(traits)
}

#[instrument(skip_all)]
async fn segment_members(
    State(state): State<AppState>,
    headers: HeaderMap,
    name: Result<Path<String>, PathRejection>,
    query: Result<Query<MembersQuery>, QueryRejection>,
) -> Result<Json<MembersResponse>, ApiError> {
    authorize(&state, &headers, Scope::SegmentsRead, None).await?;
    let Path(name) = name.map_err(|e| ApiError::BadParameter {
        parameter: "name",
        problem: e.body_text(),
        limit: None,
    })?;
    if !state.segments.iter().any(|s| s.name == name) {
        return Err(ApiError::UnknownSegment(name));
    }
    let Query(query) = query.map_err(|e| ApiError::BadParameter {
        parameter: "query",
        // The deserializer's words ("unknown field `trait`, expected one of ..."), without
        // axum's prefix.
        problem: std::error::Error::source(&e).map_or_else(|| e.body_text(), ToString::to_string),
        limit: None,
    })?;
    let request = query.request(state.config.limits.max_string_bytes)?;
    let page = state
        .store
        .segment_members(&name, &request)
        .await
        .map_err(|e| store_error(&state, e))?;
    Ok(Json(MembersResponse::new(name, page)))
}

async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

async fn readyz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    state
        .store
        .ping()
        .await
        .map_err(|e| store_error(&state, e))?;
    Ok(Json(json!({ "status": "ready" })))
}

pub(crate) fn store_error(state: &AppState, err: StoreError) -> ApiError {
    match err {
        StoreError::Unavailable(_) => {
            warn!(cause = %err, "redis unavailable");
            ApiError::Unavailable {
                retry_after: state.config.retry_after,
            }
        }
        other => {
            error!(cause = %other, "storage error");
            ApiError::Internal
        }
    }
}

/// Counts events the collector left out, by reason (`consent`, `invalid`, `suppressed`).
pub(crate) fn report_dropped_events(reason: &'static str, n: usize) {
    info!(reason, dropped = n, "events dropped");
}
