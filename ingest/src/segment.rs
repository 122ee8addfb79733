//! The Segment-compatible HTTP Tracking API: `POST /v1/track`, `/v1/identify`, `/v1/page`,
//! `/v1/screen`, `/v1/group`, `/v1/alias`, `/v1/batch` (and `/v1/import`, the same as
//! batch), so backends, CRMs and shops that already speak Segment reach the profiles.
//!
//! Each message becomes a wire event ([`convert`]); consecutive messages with the same
//! context, consent and `sentAt` share one wire batch, which is verified with the wire
//! limits and then takes the browser batches' road: consent filter, clock-skew correction,
//! the source's filters, one idempotent update per profile, or the spool while Redis does
//! not answer. Answers follow Segment: 200 `{"success": true}` once accepted, 400 for
//! malformed JSON or a message over [`MAX_MESSAGE_BYTES`] (or a request over
//! [`MAX_REQUEST_BYTES`]), 401 for a missing or unknown write key; 429 and 503 tell the
//! client to retry.

pub mod convert;
pub mod money;

use std::net::SocketAddr;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, header};
use axum::routing::{MethodRouter, post};
use axum::{Extension, Json, Router};
use profile_cache::{ProfileUpdate, StoreError};
use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use tracing::{info, instrument, warn};

use crate::api::{AppState, read_body, report_dropped_events, store_error, write_key};
use crate::error::ApiError;
use crate::pipeline;
use crate::spool::SpooledBatch;
pub use convert::{COMMERCE_EVENTS, CONSENT_EVENT, Call};

/// The largest message, bytes of compact JSON (Segment's 32 KB).
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024;

/// The largest request body, bytes (Segment's 500 KB).
pub const MAX_REQUEST_BYTES: usize = 500 * 1024;

/// The Segment routes, for [`crate::router`] to merge.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/track", route(Some(Call::Track)))
        .route("/v1/identify", route(Some(Call::Identify)))
        .route("/v1/page", route(Some(Call::Page)))
        .route("/v1/screen", route(Some(Call::Screen)))
        .route("/v1/group", route(Some(Call::Group)))
        .route("/v1/alias", route(Some(Call::Alias)))
        .route("/v1/batch", route(None))
        // Segment's historical import takes the batch shape; timestamps are corrected the
        // same way (a message's time counts only with its sentAt).
        .route("/v1/import", route(None))
}

/// `POST` of one call, or of a batch (`None`).
fn route(call: Option<Call>) -> MethodRouter<AppState> {
    post(
        move |State(state): State<AppState>,
              peer: Option<Extension<ConnectInfo<SocketAddr>>>,
              headers: HeaderMap,
              body: Body| receive(state, peer, headers, body, call),
    )
}

#[instrument(skip_all, fields(call = call.map_or("batch", Call::as_str), messages))]
async fn receive(
    state: AppState,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Body,
    call: Option<Call>,
) -> Result<Json<Value>, ApiError> {
    // Before the body is read: a client over its rate costs as little as possible.
    if let Some(Extension(ConnectInfo(peer))) = peer {
        let client = state.limits.client_ip(peer.ip(), &headers);
        state.limits.check_client_ip(client)?;
    }
    let bytes = read_body(&headers, body, MAX_REQUEST_BYTES)
        .await
        .map_err(|e| match e {
            // Segment answers 400 to a request over its size limit.
            ApiError::BodyTooLarge { limit } => ApiError::BadMessage {
                field: "body".into(),
                problem: format!("the request is larger than {limit} bytes, limit {limit}"),
                limit: Some(limit),
            },
            other => other,
        })?;
    let body: Value =
        serde_json::from_slice(&bytes).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    let Value::Object(body) = body else {
        return Err(ApiError::BadMessage {
            field: "body".into(),
            problem: "is not a JSON object".into(),
            limit: None,
        });
    };
    let key = request_key(&headers, &body).ok_or(ApiError::MissingWriteKey)?;
    let key = write_key(&state.config.write_keys, &key)?;
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        if !key.origins.iter().any(|o| o == "*" || o == origin) {
            return Err(ApiError::OriginNotAllowed(origin.into()));
        }
    }
    state.limits.check_write_key(&key.key)?;
    let received_at = state.clock.now();
    let messages = messages(call, &body, bytes.len())?;
    tracing::Span::current().record("messages", messages.len());
    let top = convert::Settings {
        write_key: &key.key,
        source: state.config.sources.get(&key.key),
        limits: &state.config.limits,
        sent_at_ms: 0,
        context: None,
    };
    let settings = convert::Settings {
        sent_at_ms: sent_at_only(&body)?,
        context: match call {
            None => object(&body, "context")?,
            Some(_) => None,
        },
        ..top
    };
    let mut converted = Vec::with_capacity(messages.len());
    for (prefix, call, message) in &messages {
        converted.push(convert::convert(*call, message, prefix, &settings)?);
    }
    let batches = assemble(&key.key, converted, &state.config.limits.wire())?;
    accept(&state, &key.key, received_at, batches).await?;
    Ok(Json(json!({ "success": true })))
}

/// The write key: the user name of HTTP Basic auth, or the body's `writeKey`.
fn request_key(headers: &HeaderMap, body: &Map<String, Value>) -> Option<String> {
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, credentials) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("basic").then_some(credentials)
        })
        .and_then(|c| base64_decode(c.trim()))
        .and_then(|c| String::from_utf8(c).ok())
        .map(|c| {
            c.split_once(':')
                .map_or(c.clone(), |(user, _)| user.to_string())
        })
        .filter(|k| !k.is_empty());
    basic.or_else(|| {
        body.get("writeKey")
            .and_then(Value::as_str)
            .filter(|k| !k.is_empty())
            .map(str::to_string)
    })
}

/// Standard or URL-safe base64, padding optional; `None` for anything else.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// A message of a request: its name in errors (`batch[3]`, empty for a single call), its
/// call and its fields.
type Named<'b> = (String, Call, &'b Map<String, Value>);

/// The messages of a request with their names in errors: the body itself for a single
/// call, each element of `batch` (with its own `type`) for a batch.
fn messages(
    call: Option<Call>,
    body: &Map<String, Value>,
    body_bytes: usize,
) -> Result<Vec<Named<'_>>, ApiError> {
    let too_large = |field: String, bytes: usize| ApiError::BadMessage {
        field,
        problem: format!("the message is {bytes} bytes, limit {MAX_MESSAGE_BYTES}"),
        limit: Some(MAX_MESSAGE_BYTES),
    };
    if let Some(call) = call {
        if body_bytes > MAX_MESSAGE_BYTES {
            return Err(too_large("body".into(), body_bytes));
        }
        return Ok(vec![(String::new(), call, body)]);
    }
    let bad = |field: String, problem: &str| ApiError::BadMessage {
        field,
        problem: problem.into(),
        limit: None,
    };
    let Some(Value::Array(batch)) = body.get("batch") else {
        return Err(bad(
            "batch".into(),
            "is missing or not an array; send {\"batch\": [messages]}",
        ));
    };
    let mut messages = Vec::with_capacity(batch.len());
    for (i, message) in batch.iter().enumerate() {
        let at = format!("batch[{i}]");
        let Value::Object(message) = message else {
            return Err(bad(at, "is not an object"));
        };
        // Segment measures a message as compact JSON.
        let bytes = serde_json::to_vec(message).map_or(0, |v| v.len());
        if bytes > MAX_MESSAGE_BYTES {
            return Err(too_large(at, bytes));
        }
        let call = message
            .get("type")
            .and_then(Value::as_str)
            .and_then(Call::from_type)
            .ok_or_else(|| {
                bad(
                    format!("{at}.type"),
                    "is not one of track, identify, page, screen, group, alias",
                )
            })?;
        messages.push((at, call, message));
    }
    Ok(messages)
}

fn object<'b>(
    body: &'b Map<String, Value>,
    name: &str,
) -> Result<Option<&'b Map<String, Value>>, ApiError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(o)) => Ok(Some(o)),
        Some(_) => Err(ApiError::BadMessage {
            field: name.into(),
            problem: "is not an object".into(),
            limit: None,
        }),
    }
}

/// The request's `sentAt`, Unix ms (0 when absent).
fn sent_at_only(body: &Map<String, Value>) -> Result<i64, ApiError> {
    use time::format_description::well_known::Rfc3339;
    match body.get("sentAt") {
        None | Some(Value::Null) => Ok(0),
        Some(Value::String(s)) => OffsetDateTime::parse(s, &Rfc3339)
            .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
            .map_err(|_| ApiError::BadMessage {
                field: "sentAt".into(),
                problem: format!("{s:?} is not an ISO 8601 time such as 2026-11-29T12:00:00.000Z"),
                limit: None,
            }),
        Some(_) => Err(ApiError::BadMessage {
            field: "sentAt".into(),
            problem: "is not an ISO 8601 time string".into(),
            limit: None,
        }),
    }
}

/// Wire batches of consecutive messages that share context, consent and `sentAt`, each
/// within the wire limits, verified as the spool's replayer will read them.
fn assemble(
    write_key: &str,
    messages: Vec<convert::Message>,
    limits: &wire::Limits,
) -> Result<Vec<(Bytes, wire::Batch)>, ApiError> {
    struct Group {
        context: wire::Context,
        consent: u8,
        sent_at_ms: i64,
        pieces: Vec<Vec<u8>>,
        bytes: usize,
    }
    // Room for the batch table, its vtable and the write key.
    let overhead = 64 + write_key.len();
    let mut groups: Vec<Group> = Vec::new();
    for m in messages {
        let piece = wire::encode::event(&m.event);
        let fits = groups.last().is_some_and(|g| {
            g.context == m.context
                && g.consent == m.consent
                && g.sent_at_ms == m.sent_at_ms
                && g.pieces.len() < limits.max_events
                && g.bytes + piece.len() + overhead <= limits.max_bytes
        });
        match groups.last_mut() {
            Some(g) if fits => {
                g.bytes += piece.len();
                g.pieces.push(piece);
            }
            _ => {
                let bytes = wire::encode::context(&m.context).len() + piece.len();
                groups.push(Group {
                    context: m.context,
                    consent: m.consent,
                    sent_at_ms: m.sent_at_ms,
                    pieces: vec![piece],
                    bytes,
                });
            }
        }
    }
    groups
        .into_iter()
        .map(|g| {
            let context = wire::encode::context(&g.context);
            let body = wire::encode::assemble(
                write_key.as_bytes(),
                g.sent_at_ms,
                g.consent,
                &context,
                g.pieces.iter().map(Vec::as_slice),
            );
            // What convert checked, checked again as the replayer will.
            let batch = wire::decode(&body, limits)?;
            Ok((Bytes::from(body), batch))
        })
        .collect()
}

/// Prepares the batches and applies them, or spools them while Redis does not answer
/// (as the browser batches' handler does).
async fn accept(
    state: &AppState,
    write_key: &str,
    received_at: OffsetDateTime,
    batches: Vec<(Bytes, wire::Batch)>,
) -> Result<(), ApiError> {
    let rules = pipeline::Rules::of(&state.config, write_key);
    let limits = state.config.limits.wire();
    let mut updates: Vec<ProfileUpdate> = Vec::new();
    let mut spooled = Vec::new();
    let (mut consent_dropped, mut invalid) = (0, 0);
    for (body, batch) in batches {
        let prepared =
            pipeline::prepare(batch, received_at, &rules).map_err(|e| ApiError::BadIdentity {
                field: e.field,
                problem: e.problem,
                limit: e.limit,
            })?;
        consent_dropped += prepared.consent_dropped;
        invalid += prepared.rejected.len() - prepared.consent_dropped;
        if prepared.updates.is_empty() {
            continue;
        }
        updates.extend(prepared.updates);
        spooled.push(SpooledBatch {
            received_at,
            write_key: write_key.to_string(),
            limits,
            body,
        });
    }
    if consent_dropped > 0 {
        report_dropped_events("consent", consent_dropped);
    }
    if invalid > 0 {
        report_dropped_events("invalid", invalid);
    }
    if updates.is_empty() {
        return Ok(());
    }
    // While older batches wait in the spool, newer ones queue behind them.
    if let Some(spool) = state.spool.as_ref().filter(|s| !s.is_drained()) {
        return spool_all(state, spool, &spooled).await;
    }
    match state.store.apply(&updates).await {
        Ok(report) => {
            if report.duplicates > 0 {
                info!(duplicates = report.duplicates, "retried events skipped");
            }
            Ok(())
        }
        Err(StoreError::Unavailable(err)) if state.spool.is_some() => {
            warn!(cause = %err, "redis unavailable: spooling");
            let spool = state.spool.as_ref().ok_or(ApiError::Internal)?;
            spool_all(state, spool, &spooled).await
        }
        Err(err) => Err(store_error(state, err)),
    }
}

/// Writes every batch to the spool; a refusal is 503 and the client retries the request
/// (the batches already written dedupe by message id when it is applied again).
async fn spool_all(
    state: &AppState,
    spool: &crate::spool::Spool,
    batches: &[SpooledBatch],
) -> Result<(), ApiError> {
    for batch in batches {
        if let Err(err) = spool.append(batch).await {
            warn!(cause = %err, "spool refused a batch");
            return Err(ApiError::Unavailable {
                retry_after: state.config.retry_after,
            });
        }
    }
    Ok(())
}
