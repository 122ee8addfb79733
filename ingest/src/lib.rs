//! ingest: the collector.
//!
//! It receives FlatBuffers event batches from browsers, verifies them, authenticates the
//! write key and origin, drops events without consent, corrects client clocks, and applies
//! the events to Redis profiles through `profile-cache`, one atomic update per profile.
//!
//! - [`config`]: the TOML configuration, `INGEST_*` overrides, demo mode.
//! - [`api`]: routes and handlers ([`router`]), shared state, the clock.
//! - [`auth`]: API tokens with scopes (stored hashed), and the audit log of profile
//!   accesses.
//! - [`ratelimit`]: request rate limits per write key, client address and API token, and
//!   how the client's address is found behind trusted proxies.
//! - [`pipeline`]: a verified batch to profile updates (consent, enrichment, grouping).
//! - [`segment`]: the Segment-compatible HTTP Tracking API (`/v1/track`, `/v1/batch`, ...),
//!   whose messages become wire batches for the same pipeline.
//! - [`store`]: the storage trait, for Redis and an in-memory test double.
//! - [`scheduler`]: the task that re-evaluates profiles whose deadline has come.
//! - [`rebuild`]: the task that rebuilds segment memberships after the definitions changed.
//! - [`spool`]: the local spool batches go to while Redis does not answer, and
//!   [`replay`]: the task that applies them when it answers again.
//! - [`tls`]: serving HTTPS itself ([`tls::TlsListener`]).
//! - [`error`]: the one API error type and its JSON shape.
//! - [`overload`]: limits on requests in flight (503 beyond them), connections, and slow
//!   clients (header and body deadlines); the HTTP/1 server loop.

pub mod api;
pub mod auth;
pub mod config;
pub mod error;
pub mod overload;
pub mod pipeline;
pub mod ratelimit;
pub mod rebuild;
pub mod replay;
pub mod scheduler;
pub mod segment;
pub mod spool;
pub mod store;
pub mod tls;

use std::future::Future;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

pub use api::{AppState, Clock, SystemClock, router};
pub use config::Config;
pub use ratelimit::RateLimits;
pub use rebuild::Rebuilder;
pub use scheduler::Scheduler;

/// Connects to Redis and serves until `shutdown` completes, then lets in-flight requests
/// finish for at most `config.shutdown_timeout`. Requests beyond `config.overload`'s limits
/// are refused with 503, and slow clients are cut off ([`overload`]). Unless
/// `scheduler.enabled` is false, the deadline scheduler runs alongside and stops with the
/// server. When the segment definitions differ from those recorded in Redis, the segment
/// rebuild runs alongside too, until it is done or the server stops. With `spool.enabled`,
/// batches go to the local spool while Redis does not answer, and its replayer applies them
/// once it does; it is closed (everything appended synced) after the last request is
/// answered.
///
/// # Errors
/// Redis cannot be reached at start (schema mismatch included), or the server fails.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let segments = config.segments().context("configuration")?;
    // Certificate problems stop the collector now, not at the first client.
    let tls = match &config.tls {
        Some(t) => Some((tls::acceptor(t)?, t.handshake_timeout)),
        None => None,
    };
    config
        .overload
        .validate()
        .map_err(|e| anyhow::anyhow!("configuration: overload.{e}"))?;
    let store = profile_cache::RedisProfiles::connect(&config.redis_url, config.profiles.clone())
        .await
        .with_context(|| format!("connecting to redis at {}", redact(&config.redis_url)))?
        .with_segments(&segments)
        .await?;
    info!(
        segments = segments.len(),
        "segments evaluated on every update"
    );
    let timeout = config.shutdown_timeout;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    // Set once shutdown starts; dropped (which also stops the scheduler) if the server ends.
    let (stopping_tx, mut stopping_rx) = watch::channel(false);
    let scheduler = config.scheduler.enabled.then(|| {
        let scheduler = Scheduler::new(store.clone(), clock.clone(), config.scheduler);
        tokio::spawn(scheduler.run(stopping(stopping_rx.clone())))
    });
    let rebuild = Rebuilder::new(&store, clock.clone());
    let rebuild = tokio::spawn(rebuild.run(stopping(stopping_rx.clone())));
    let audit: Arc<dyn auth::AuditLog> = Arc::new(store.audit_stream(config.audit.stream_max_len));
    let store: Arc<dyn store::ProfileStore> = Arc::new(store);
    // Batches go to the spool while Redis does not answer; the replayer applies them.
    let spool = if config.spool.enabled {
        let (spool, replayer) = spool::Spool::open(&config.spool)
            .await
            .with_context(|| format!("opening the spool in {}", config.spool.dir.display()))?;
        info!(dir = %spool.dir().display(), "spool open");
        let replay = replay::run(
            replayer,
            store.clone(),
            Arc::new(config.clone()),
            stopping(stopping_rx.clone()),
        );
        Some((spool, tokio::spawn(replay)))
    } else {
        None
    };
    let limits = Arc::new(RateLimits::new(
        &config.rate_limits,
        &config.trusted_proxies,
    ));
    let state = AppState {
        store,
        clock,
        audit,
        limits,
        config: Arc::new(config),
        segments: segments.into(),
        spool: spool.as_ref().map(|(spool, _)| spool.clone()),
    };
    info!(addr = %listener.local_addr()?, https = tls.is_some(), "collector listening");
    let overload = state.config.overload;
    let shutdown = async move {
        shutdown.await;
        let _ = stopping_tx.send(true);
    };
    // The peer's address reaches handlers as `ConnectInfo`: the per-client rate limit needs it.
    let server = match tls {
        Some((acceptor, handshake_timeout)) => {
            let listener = tls::TlsListener::new(listener, acceptor, handshake_timeout)?;
            tokio::spawn(overload::serve_http(
                listener,
                router(state),
                overload,
                shutdown,
            ))
        }
        None => tokio::spawn(overload::serve_http(
            listener,
            router(state),
            overload,
            shutdown,
        )),
    };
    // Once shutdown starts, in-flight requests (and the scheduler's round) get `timeout` to
    // finish.
    let stopped = async move {
        if stopping_rx.wait_for(|stopping| *stopping).await.is_ok() {
            tokio::time::sleep(timeout).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::pin!(stopped);
    tokio::select! {
        result = server => result.context("server task failed")?,
        () = &mut stopped => warn!(?timeout, "in-flight requests did not finish in time"),
    }
    if let Some(scheduler) = scheduler {
        tokio::select! {
            result = scheduler => result.context("scheduler task failed")?,
            () = &mut stopped => warn!(?timeout, "the scheduler's round did not finish in time"),
        }
    }
    tokio::select! {
        result = rebuild => {
            result.context("segment rebuild task failed")?;
        }
        () = &mut stopped => warn!(?timeout, "the segment rebuild's step did not finish in time"),
    }
    if let Some((spool, replay)) = spool {
        // Every accepted batch is written and synced before the process ends.
        if let Err(err) = spool.close().await {
            warn!(cause = %err, "closing the spool");
        }
        tokio::select! {
            result = replay => result.context("spool replay task failed")?,
            () = &mut stopped => warn!(?timeout, "the spool replay did not stop in time"),
        }
    }
    info!("collector stopped");
    Ok(())
}

/// Completes when `stopping` turns true or its sender is gone.
async fn stopping(mut stopping: watch::Receiver<bool>) {
    let _ = stopping.wait_for(|stopping| *stopping).await;
}

/// A Redis URL without its password, for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}
