//! ingest: the collector.
//!
//! It receives FlatBuffers event batches from browsers, verifies them, authenticates the
//! write key and origin, drops events without consent, corrects client clocks, and applies
//! the events to Redis profiles through `profile-cache`, one atomic update per profile.
//!
//! - [`config`]: the TOML configuration, `INGEST_*` overrides, demo mode.
//! - [`api`]: routes and handlers ([`router`]), shared state, the clock.
//! - [`pipeline`]: a verified batch to profile updates (consent, enrichment, grouping).
//! - [`store`]: the storage trait, for Redis and an in-memory test double.
//! - [`error`]: the one API error type and its JSON shape.

pub mod api;
pub mod config;
pub mod error;
pub mod pipeline;
pub mod store;

use std::future::Future;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tracing::{info, warn};

pub use api::{AppState, Clock, SystemClock, router};
pub use config::Config;

/// Connects to Redis and serves until `shutdown` completes, then lets in-flight requests
/// finish for at most `config.shutdown_timeout`.
///
/// # Errors
/// Redis cannot be reached at start (schema mismatch included), or the server fails.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let segments = config.segments().context("configuration")?;
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
    let state = AppState {
        store: Arc::new(store),
        clock: Arc::new(SystemClock),
        config: Arc::new(config),
    };
    info!(addr = %listener.local_addr()?, "collector listening");
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, router(state)).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = stopping_tx.send(());
    });
    let server = tokio::spawn(async move { server.await });
    // Once shutdown starts, in-flight requests get `timeout` to finish.
    let deadline = async move {
        if stopping_rx.await.is_ok() {
            tokio::time::sleep(timeout).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        result = server => result.context("server task failed")?.context("server failed")?,
        () = deadline => warn!(?timeout, "in-flight requests did not finish in time"),
    }
    info!("collector stopped");
    Ok(())
}

/// A Redis URL without its password, for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}
