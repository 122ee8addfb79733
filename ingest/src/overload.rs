//! What keeps the collector standing when more arrives than it can take: limits on requests
//! in flight, beyond which it sheds load with `503` at once, and deadlines for clients that
//! send slowly.
//!
//! - [`LoadShedder`] and its two middlewares: [`batches`] lets at most
//!   `overload.max_batches_in_flight` batch requests run at once and [`api`] at most
//!   `overload.max_api_requests_in_flight` other `/v1/` requests (the reads); one more gets
//!   `503 overloaded` with `Retry-After` right away, its body unread. There is no wait queue:
//!   a request either runs now or is refused now, so a burst costs neither memory nor
//!   latency for the requests that do run, and the tracker keeps refused batches and sends
//!   them again after `Retry-After`. Both middlewares also give each request body
//!   `overload.body_read_timeout` to arrive in full, from the moment its head was read, and
//!   answer `408 request_timeout` when it does not.
//! - [`serve_http`]: the HTTP/1.1 connections, plain or after the TLS handshake. At most `overload.max_connections` at once (the
//!   next is accepted when one closes), a request head within
//!   `overload.header_read_timeout` (which is also how long an idle keep-alive connection
//!   stays open) and at most [`MAX_HEAD_BYTES`], and a graceful shutdown that lets requests
//!   in flight finish.
//!
//! Memory is bounded by these limits: request bodies by `max_batches_in_flight` times
//! `limits.max_body_bytes` (64 × 512 KiB = 32 MiB with the defaults; tracker batches are at
//! most 24 KiB), connections by `max_connections` times about 12 KiB for an idle keep-alive
//! connection (measured), [`MAX_HEAD_BYTES`] at worst.

use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt as _;
use tower_http::timeout::{DeadlineBody, TimeoutError};
use tracing::{debug, warn};

use crate::config::Config;

/// The largest request head (request line and headers) a connection reads; a larger one
/// gets `431 Request Header Fields Too Large`. It is also the most a connection buffers.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The `[overload]` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OverloadConfig {
    /// Batch requests handled at once (reading the body, applying or spooling it); one more
    /// gets `503 overloaded`. Default 64: on a 2-core machine the collector reaches its full
    /// rate with 8 to 16 in flight, and more only add latency and memory (about 100 KiB
    /// each); the rest is room for Redis latency spikes and more cores.
    pub max_batches_in_flight: NonZeroUsize,
    /// Other `/v1/` requests (profile and segment reads) handled at once; one more gets
    /// `503 overloaded`. Default 32.
    pub max_api_requests_in_flight: NonZeroUsize,
    /// Open client connections; while this many are open, the next waits in the listen
    /// backlog until one closes. An idle keep-alive connection takes about 12 KiB. Keep the
    /// process's open-file limit (`ulimit -n`) above it. Default 10,000.
    pub max_connections: NonZeroUsize,
    /// How long a client has to send a request's head (request line and headers), counted
    /// from when the connection is ready for it: after accepting, and after the previous
    /// response on a keep-alive connection, so this is also how long an idle connection
    /// stays open. The connection is closed when it passes. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// How long a client has to send a request's whole body, counted from when its head was
    /// read; past it the request gets `408 request_timeout` and the connection is closed.
    /// A total, not a pause between reads: a body trickled a byte at a time ends at the
    /// same deadline. Default 10 s (a 24 KiB tracker batch at 2.4 KB/s).
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
}

impl Default for OverloadConfig {
    fn default() -> Self {
        Self {
            max_batches_in_flight: NonZeroUsize::new(64).expect("not zero"),
            max_api_requests_in_flight: NonZeroUsize::new(32).expect("not zero"),
            max_connections: NonZeroUsize::new(10_000).expect("not zero"),
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
        }
    }
}

/// The shortest `header_read_timeout` and `body_read_timeout` accepted.
pub const MIN_READ_TIMEOUT: Duration = Duration::from_millis(1);

/// A setting of [`OverloadConfig`] that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct OverloadConfigError {
    /// The setting, e.g. `body_read_timeout`.
    pub field: &'static str,
    /// What is wrong.
    pub problem: String,
}

impl OverloadConfig {
    /// Checks what the types do not: timeouts of at least [`MIN_READ_TIMEOUT`].
    ///
    /// # Errors
    /// The first setting out of bounds.
    pub fn validate(&self) -> Result<(), OverloadConfigError> {
        for (field, value) in [
            ("header_read_timeout", self.header_read_timeout),
            ("body_read_timeout", self.body_read_timeout),
        ] {
            if value < MIN_READ_TIMEOUT {
                return Err(OverloadConfigError {
                    field,
                    problem: format!("{value:?} is shorter than {MIN_READ_TIMEOUT:?}"),
                });
            }
        }
        Ok(())
    }
}

/// Which limit a request counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// `overload.max_batches_in_flight`.
    Batch,
    /// `overload.max_api_requests_in_flight`.
    Api,
}

impl Class {
    /// The setting's name under `overload`.
    pub fn setting(self) -> &'static str {
        match self {
            Class::Batch => "max_batches_in_flight",
            Class::Api => "max_api_requests_in_flight",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Class::Batch => "batches",
            Class::Api => "API requests",
        }
    }
}

/// The in-flight limits of one router, shared by its requests. Cheap to clone.
#[derive(Clone, Debug)]
pub struct LoadShedder {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    batches: Arc<Semaphore>,
    api: Arc<Semaphore>,
    config: OverloadConfig,
    batch_path: String,
    retry_after: Duration,
    shed: ShedReport,
}

impl LoadShedder {
    /// The limits of `config.overload`; refusals tell clients to come back after
    /// `config.retry_after`.
    pub fn new(config: &Config) -> Self {
        let overload = config.overload;
        Self {
            inner: Arc::new(Shared {
                batches: Arc::new(Semaphore::new(overload.max_batches_in_flight.get())),
                api: Arc::new(Semaphore::new(overload.max_api_requests_in_flight.get())),
                config: overload,
                batch_path: config.batch_path.clone(),
                retry_after: config.retry_after,
                shed: ShedReport::default(),
            }),
        }
    }

    fn semaphore(&self, class: Class) -> (&Arc<Semaphore>, usize) {
        let c = &self.inner.config;
        match class {
            Class::Batch => (&self.inner.batches, c.max_batches_in_flight.get()),
            Class::Api => (&self.inner.api, c.max_api_requests_in_flight.get()),
        }
    }

    /// A place for one more request of `class`, or the refusal to answer with.
    fn admit(&self, class: Class) -> Result<OwnedSemaphorePermit, Refusal> {
        let (semaphore, limit) = self.semaphore(class);
        semaphore.clone().try_acquire_owned().map_err(|_| {
            self.inner.shed.record(class);
            Refusal::Overloaded {
                class,
                limit,
                retry_after: self.inner.retry_after,
            }
        })
    }

    /// Runs `request` with its body under the body deadline (and `permit` held until the
    /// response is ready), and answers 408 instead when the deadline passed while the handler
    /// read the body.
    async fn run(
        &self,
        request: Request,
        next: Next,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Response {
        let timeout = self.inner.config.body_read_timeout;
        let timed_out = Arc::new(AtomicBool::new(false));
        let flag = timed_out.clone();
        let request = request.map(|body| {
            Body::new(DeadlineBody::new(timeout, body).map_err(move |err| {
                if err.is::<TimeoutError>() {
                    flag.store(true, Ordering::Relaxed);
                }
                err
            }))
        });
        let response = next.run(request).await;
        drop(permit);
        if timed_out.load(Ordering::Relaxed) {
            report_body_timeout();
            return Refusal::BodyTimeout { timeout }.into_response();
        }
        response
    }
}

/// The middleware of the batch route: [`Class::Batch`]'s limit and the body deadline.
/// Layer it inside the route's CORS layer, so that a browser can read a refusal.
pub async fn batches(State(shedder): State<LoadShedder>, request: Request, next: Next) -> Response {
    match shedder.admit(Class::Batch) {
        Ok(permit) => shedder.run(request, next, Some(permit)).await,
        Err(refusal) => refusal.into_response(),
    }
}

/// The middleware of every other route: [`Class::Api`]'s limit for requests under `/v1/`
/// (the batch path excepted: [`batches`] has it), and the body deadline for all. Health
/// checks and static files count against no limit.
pub async fn api(State(shedder): State<LoadShedder>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if path == shedder.inner.batch_path {
        return next.run(request).await;
    }
    let permit = if path.starts_with("/v1/") {
        match shedder.admit(Class::Api) {
            Ok(permit) => Some(permit),
            Err(refusal) => return refusal.into_response(),
        }
    } else {
        None
    };
    shedder.run(request, next, permit).await
}

/// What the middlewares answer themselves, in the shape of [`crate::error::ApiError`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// At the in-flight limit of `class`.
    #[error(
        "too many {} in flight: limit {limit} per collector; retry in {}s",
        class.what(),
        retry_secs(*retry_after)
    )]
    Overloaded {
        /// Which limit.
        class: Class,
        /// Its value.
        limit: usize,
        /// What `Retry-After` says.
        retry_after: Duration,
    },
    /// The body did not arrive within `overload.body_read_timeout`.
    #[error("the request body did not arrive within {}", humantime_serde::re::humantime::format_duration(*timeout))]
    BodyTimeout {
        /// `overload.body_read_timeout`.
        timeout: Duration,
    },
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let message = self.to_string();
        match self {
            Refusal::Overloaded {
                class,
                limit,
                retry_after,
            } => {
                let body = json!({
                    "error": "overloaded",
                    "message": message,
                    "field": format!("overload.{}", class.setting()),
                    "limit": limit,
                });
                let mut response =
                    (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, retry_secs(retry_after).into());
                response
            }
            Refusal::BodyTimeout { .. } => {
                let body = json!({ "error": "request_timeout", "message": message });
                let mut response = (StatusCode::REQUEST_TIMEOUT, axum::Json(body)).into_response();
                // The rest of the body may still be on its way: the connection cannot be
                // reused.
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                response
            }
        }
    }
}

/// Whole seconds for `Retry-After`: rounded up, at least 1 (as [`crate::error::ApiError`]).
fn retry_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

/// Counts refused requests and logs them at most once a second: under overload, a line per
/// refusal would cost the CPU the refusal saves.
#[derive(Debug)]
struct ShedReport {
    started: Instant,
    /// Refusals since the last log line, per class.
    batches: AtomicU64,
    api: AtomicU64,
    /// Milliseconds since `started` of the last log line.
    last_logged_ms: AtomicU64,
}

impl Default for ShedReport {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            batches: AtomicU64::new(0),
            api: AtomicU64::new(0),
            last_logged_ms: AtomicU64::new(0),
        }
    }
}

impl ShedReport {
    fn record(&self, class: Class) {
        match class {
            Class::Batch => &self.batches,
            Class::Api => &self.api,
        }
        .fetch_add(1, Ordering::Relaxed);
        let now = self.started.elapsed().as_millis() as u64;
        let last = self.last_logged_ms.load(Ordering::Relaxed);
        let due = now.saturating_sub(last) >= 1_000 || last == 0;
        if due
            && self
                .last_logged_ms
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            report_shed_requests(
                self.batches.swap(0, Ordering::Relaxed),
                self.api.swap(0, Ordering::Relaxed),
            );
        }
    }
}

/// Requests refused with `503 overloaded` since the last report, by class.
fn report_shed_requests(batches: u64, api: u64) {
    warn!(batches, api, "overloaded: requests refused");
}

/// A request body that did not arrive within `overload.body_read_timeout`.
fn report_body_timeout() {
    debug!("request body timed out");
}

/// Serves `app` on `listener` (plain TCP, or [`crate::tls::TlsListener`]) over HTTP/1.1
/// until `shutdown` completes, then stops accepting, closes idle connections, and returns
/// once the requests in flight are answered. Handlers see the peer's address as
/// `ConnectInfo<SocketAddr>`. The listener deals with accept errors (for TCP, axum's: wait a
/// second when out of file descriptors).
pub async fn serve_http<L>(
    mut listener: L,
    app: Router,
    config: OverloadConfig,
    shutdown: impl Future<Output = ()>,
) where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    let connections = Arc::new(Semaphore::new(config.max_connections.get()));
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .max_header_size(MAX_HEAD_BYTES)
        // Bounds what a connection buffers while a head is incomplete too.
        .max_buf_size(MAX_HEAD_BYTES);
    tokio::pin!(shutdown);
    loop {
        // While `max_connections` are open, new ones wait in the kernel's backlog.
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let app = app.clone();
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let mut request = request.map(Body::new);
            request.extensions_mut().insert(ConnectInfo(peer));
            app.clone().oneshot(request)
        });
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                debug!(cause = %err, %peer, "connection closed");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
