//! One error type for every HTTP answer that is not a success, and its JSON shape:
//! `{"error": "<code>", "message": "<what is wrong>", "field"?: "...", "limit"?: n}`, plus
//! `scope` on a 403 for a missing scope and `rate_limit` on a 429. Internal causes are
//! logged, never sent.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::auth::Scope;
use crate::ratelimit::{LimitKind, Rate};

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is larger than the configured limit.
    #[error("body is larger than {limit} bytes")]
    BodyTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The body could not be read (client went away, bad chunking).
    #[error("could not read the body: {0}")]
    BadBody(String),
    /// The batch does not decode, or breaks a limit.
    #[error("{0}")]
    MalformedBatch(#[from] wire::DecodeError),
    /// The batch has no usable identity.
    #[error("{field}: {problem}")]
    BadIdentity {
        /// The field, e.g. `context.anonymous_id`.
        field: &'static str,
        /// What is wrong.
        problem: String,
        /// The limit broken, when one is.
        limit: Option<usize>,
    },
    /// The write key is not configured.
    #[error("unknown write key")]
    UnknownWriteKey,
    /// A Segment API request without a write key.
    #[error(
        "no write key: send it as the user name of HTTP Basic auth, or as writeKey in the body"
    )]
    MissingWriteKey,
    /// A Segment API body that is not JSON.
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    /// A Segment API request or message that breaks a limit or the message shapes.
    #[error("{field}: {problem}")]
    BadMessage {
        /// The field, e.g. `batch[3].properties.price` (`body` for the whole request).
        field: String,
        /// What is wrong, with the limit when one is broken.
        problem: String,
        /// The limit broken, when there is one.
        limit: Option<usize>,
    },
    /// A browser sent a batch from an origin the write key does not allow.
    #[error("origin {0:?} is not allowed for this write key")]
    OriginNotAllowed(String),
    /// No `Authorization: Bearer` header.
    #[error("missing bearer token")]
    MissingToken,
    /// A bearer token that is not configured.
    #[error("invalid bearer token")]
    InvalidToken,
    /// A configured token without the scope the route needs.
    #[error("this token lacks the scope {scope}")]
    MissingScope {
        /// The scope the route needs.
        scope: Scope,
    },
    /// Over a rate limit; the client should retry after `retry_after`.
    #[error(
        "too many requests for {}: limit {} per second, bursts of {}; retry in {}s",
        limit.what(),
        rate.per_second,
        rate.effective_burst(),
        retry_secs(*retry_after)
    )]
    RateLimited {
        /// Which limit.
        limit: LimitKind,
        /// Its rate.
        rate: Rate,
        /// How long until one more request is allowed.
        retry_after: Duration,
    },
    /// The profile does not exist.
    #[error("no profile with this id")]
    NotFound,
    /// No segment of this name is configured.
    #[error("no segment named {0:?} is configured")]
    UnknownSegment(String),
    /// A path or query parameter of a read is unusable.
    #[error("{parameter}: {problem}")]
    BadParameter {
        /// The parameter, e.g. `limit`.
        parameter: &'static str,
        /// What is wrong, with the limit when one is broken.
        problem: String,
        /// The limit broken, when there is one.
        limit: Option<usize>,
    },
    /// Redis cannot be reached now; the client should retry.
    #[error("storage unavailable, retry later")]
    Unavailable {
        /// What to put in `Retry-After`.
        retry_after: Duration,
    },
    /// Anything else; details are logged.
    #[error("internal error")]
    Internal,
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BadBody(_)
            | ApiError::MalformedBatch(_)
            | ApiError::BadIdentity { .. }
            | ApiError::MalformedJson(_)
            | ApiError::BadMessage { .. }
            | ApiError::BadParameter { .. } => StatusCode::BAD_REQUEST,
            ApiError::UnknownWriteKey
            | ApiError::MissingWriteKey
            | ApiError::MissingToken
            | ApiError::InvalidToken => StatusCode::UNAUTHORIZED,
            ApiError::OriginNotAllowed(_) | ApiError::MissingScope { .. } => StatusCode::FORBIDDEN,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::NotFound | ApiError::UnknownSegment(_) => StatusCode::NOT_FOUND,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::BodyTooLarge { .. } => "body_too_large",
            ApiError::BadBody(_) => "bad_body",
            ApiError::MalformedBatch(_) => "malformed_batch",
            ApiError::BadIdentity { .. } => "bad_identity",
            ApiError::UnknownWriteKey => "unknown_write_key",
            ApiError::MissingWriteKey => "missing_write_key",
            ApiError::MalformedJson(_) => "malformed_json",
            ApiError::BadMessage { .. } => "bad_message",
            ApiError::OriginNotAllowed(_) => "origin_not_allowed",
            ApiError::MissingToken => "missing_token",
            ApiError::InvalidToken => "invalid_token",
            ApiError::MissingScope { .. } => "insufficient_scope",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::NotFound => "not_found",
            ApiError::UnknownSegment(_) => "unknown_segment",
            ApiError::BadParameter { .. } => "bad_parameter",
            ApiError::Unavailable { .. } => "unavailable",
            ApiError::Internal => "internal",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.code(), "message": self.to_string() });
        match &self {
            ApiError::BodyTooLarge { limit } => body["limit"] = json!(limit),
            ApiError::MissingScope { scope } => body["scope"] = json!(scope.as_str()),
            ApiError::RateLimited { limit, rate, .. } => {
                body["rate_limit"] = json!(limit.as_str());
                body["limit"] = json!(rate.per_second);
            }
            ApiError::BadIdentity { field, limit, .. } => {
                body["field"] = json!(field);
                if let Some(limit) = limit {
                    body["limit"] = json!(limit);
                }
            }
            ApiError::BadMessage { field, limit, .. } => {
                body["field"] = json!(field);
                if let Some(limit) = limit {
                    body["limit"] = json!(limit);
                }
            }
            ApiError::BadParameter {
                parameter, limit, ..
            } => {
                body["field"] = json!(parameter);
                if let Some(limit) = limit {
                    body["limit"] = json!(limit);
                }
            }
            ApiError::MalformedBatch(e) => match e {
                wire::DecodeError::TooLarge { limit, .. } => body["limit"] = json!(limit),
                wire::DecodeError::TooMany { field, limit, .. }
                | wire::DecodeError::TooLong { field, limit, .. } => {
                    body["field"] = json!(field);
                    body["limit"] = json!(limit);
                }
                wire::DecodeError::Invalid { field, .. } => body["field"] = json!(field),
                wire::DecodeError::NotABatch | wire::DecodeError::Malformed(_) => {}
            },
            _ => {}
        }
        let mut response = (self.status(), Json(body)).into_response();
        let headers = response.headers_mut();
        match self {
            ApiError::Unavailable { retry_after } | ApiError::RateLimited { retry_after, .. } => {
                headers.insert(header::RETRY_AFTER, retry_secs(retry_after).into());
            }
            // Segment's clients authenticate with Basic auth, the write key as user name.
            ApiError::MissingWriteKey => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(r#"Basic realm="write key""#),
                );
            }
            // RFC 6750, section 3.
            ApiError::MissingToken => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::InvalidToken => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(r#"Bearer error="invalid_token""#),
                );
            }
            ApiError::MissingScope { scope } => {
                let challenge = format!(r#"Bearer error="insufficient_scope", scope="{scope}""#);
                if let Ok(v) = HeaderValue::from_str(&challenge) {
                    headers.insert(header::WWW_AUTHENTICATE, v);
                }
            }
            _ => {}
        }
        response
    }
}

/// Whole seconds for `Retry-After`: rounded up, at least 1 (0 would invite an immediate
/// retry that fails again).
fn retry_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}
