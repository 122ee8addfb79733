//! The HTTP API: routes, shared state and handlers.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use profile_cache::{Profile, StoreError};
use serde::Serialize;
use serde_json::json;
use subtle::ConstantTimeEq;
use time::OffsetDateTime;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::services::ServeDir;
use tower_http::trace::TraceLayer;
use tracing::{error, info, instrument, warn};

use crate::config::{Config, WriteKey};
use crate::error::ApiError;
use crate::pipeline::{self, Rejected};
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
    /// The configuration the collector runs with.
    pub config: Arc<Config>,
}

/// The collector's routes. Tests call this without a socket.
pub fn router(state: AppState) -> Router {
    let config = state.config.clone();
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
        .max_age(Duration::from_secs(86_400));
    let batches = Router::new()
        .route(&config.batch_path, post(collect))
        .layer(cors);
    let mut app = Router::new()
        .merge(batches)
        .route("/v1/profiles/{id}", get(profile))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz));
    if let Some(dir) = &config.www_dir {
        app = app.fallback_service(ServeDir::new(dir));
    }
    app.layer(TraceLayer::new_for_http()).with_state(state)
}

/// The answer to an accepted batch.
#[derive(Debug, Serialize)]
pub struct BatchResponse {
    /// Events applied now or before (a retried event counts as accepted).
    pub accepted: u64,
    /// Events left out, with the reason.
    pub rejected: Vec<Rejected>,
}

#[instrument(skip_all, fields(bytes))]
async fn collect(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<BatchResponse>, ApiError> {
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
    let received_at = state.clock.now();
    let prepared = pipeline::prepare(batch, received_at).map_err(|e| ApiError::BadIdentity {
        field: e.field,
        problem: e.problem,
    })?;
    if prepared.consent_dropped > 0 {
        report_dropped_events("consent", prepared.consent_dropped);
    }
    let invalid = prepared.rejected.len() - prepared.consent_dropped;
    if invalid > 0 {
        report_dropped_events("invalid", invalid);
    }
    let report = if prepared.updates.is_empty() {
        Default::default()
    } else {
        state
            .store
            .apply(&prepared.updates)
            .await
            .map_err(|e| store_error(&state, e))?
    };
    if report.duplicates > 0 {
        info!(duplicates = report.duplicates, "retried events skipped");
    }
    Ok(Json(BatchResponse {
        accepted: report.applied + report.duplicates,
        rejected: prepared.rejected,
    }))
}

/// Reads at most `limit` bytes, answering 413 early when `Content-Length` says it is more.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
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

fn write_key<'c>(keys: &'c [WriteKey], key: &str) -> Result<&'c WriteKey, ApiError> {
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
    authorize(&state.config.api_tokens, &headers)?;
    let profile = state
        .store
        .find(&id, state.clock.now())
        .await
        .map_err(|e| store_error(&state, e))?;
    profile.map(Json).ok_or(ApiError::NotFound)
}

fn authorize(tokens: &[String], headers: &HeaderMap) -> Result<(), ApiError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(ApiError::MissingToken)?;
    let mut ok = false;
    for t in tokens {
        ok |= bool::from(t.as_bytes().ct_eq(token.trim().as_bytes()));
    }
    if ok {
        Ok(())
    } else {
        Err(ApiError::InvalidToken)
    }
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

fn store_error(state: &AppState, err: StoreError) -> ApiError {
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

/// Counts events the collector left out, by reason (`consent`, `invalid`).
fn report_dropped_events(reason: &'static str, n: usize) {
    info!(reason, dropped = n, "events dropped");
}
