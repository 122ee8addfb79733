//! The spool's replayer task: applies spooled batches to the store in the order they were
//! accepted, once it answers, and acknowledges them to the spool.
//!
//! A record is the request body as it arrived, with its receive time and limits, so
//! replaying runs the same decode and [`pipeline::prepare`] as the request would have, with
//! the same clock-skew correction. Applying is idempotent by message id, so a record applied
//! but not yet acknowledged when the collector died is applied again after the restart and
//! counted once.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use profile_cache::StoreError;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::pipeline;
use crate::spool::{Position, Record, Replayer};
use crate::store::ProfileStore;

/// Acknowledge at least this often while records keep coming (each acknowledgement costs
/// an fsync).
pub const ACK_EVERY: usize = 64;
/// The first wait after the store did not answer; doubled up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait between tries while the store does not answer.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Replays the spool into `store` until `stop` completes, with the consent and source
/// rules of `config` as they are now. Returns without acknowledging the record in hand when
/// stopped: it is replayed after the restart.
pub async fn run(
    mut replayer: Replayer,
    store: Arc<dyn ProfileStore>,
    config: Arc<Config>,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut unacked: Option<Position> = None;
    let mut since_ack = 0;
    let mut backoff = FIRST_BACKOFF;
    loop {
        // Acknowledge once nothing more is waiting, or every ACK_EVERY records.
        let next = match replayer.try_recv().await {
            Ok(Some(record)) => Some(record),
            Ok(None) => None,
            Err(err) => {
                warn!(cause = %err, "spool: reading failed");
                if sleep_or_stop(backoff, &mut stop).await {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        let record = match next {
            Some(record) => record,
            None => {
                if let Some(end) = unacked.take() {
                    ack(&mut replayer, end).await;
                    since_ack = 0;
                    continue;
                }
                tokio::select! {
                    record = replayer.recv() => match record {
                        Ok(record) => record,
                        Err(err) => {
                            warn!(cause = %err, "spool: reading failed");
                            continue;
                        }
                    },
                    () = &mut stop => return,
                }
            }
        };
        if !apply(&record, store.as_ref(), &config, &mut stop).await {
            // Stopped while the store did not answer: what was applied before is
            // acknowledged; this record is replayed after the restart.
            if let Some(end) = unacked {
                ack(&mut replayer, end).await;
            }
            return;
        }
        backoff = FIRST_BACKOFF;
        unacked = Some(record.end);
        since_ack += 1;
        if since_ack >= ACK_EVERY
            && let Some(end) = unacked.take()
        {
            ack(&mut replayer, end).await;
            since_ack = 0;
        }
    }
}

/// Applies one record, retrying while the store does not answer. Returns `false` when
/// stopped first. A record that can no longer be applied (it does not decode under its own
/// limits, or a profile holds data this version cannot update) is logged and skipped: it
/// would block every later record.
async fn apply(
    record: &Record,
    store: &dyn ProfileStore,
    config: &Config,
    stop: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> bool {
    let batch = &record.batch;
    let prepared = match wire::decode(&batch.body, &batch.limits) {
        Ok(decoded) => {
            let rules = pipeline::Rules::of(config, &decoded.write_key);
            pipeline::prepare(decoded, batch.received_at, &rules)
        }
        Err(err) => {
            error!(at = %record.start, cause = %err, "spool: a record does not decode; skipped");
            return true;
        }
    };
    let Ok(prepared) = prepared else {
        error!(at = %record.start, "spool: a record has no usable identity; skipped");
        return true;
    };
    let mut backoff = FIRST_BACKOFF;
    loop {
        match store.apply(&prepared.updates).await {
            Ok(report) => {
                if report.duplicates > 0 {
                    info!(
                        duplicates = report.duplicates,
                        "spool: replayed events already applied"
                    );
                }
                return true;
            }
            Err(StoreError::Unavailable(err)) => {
                warn!(cause = %err, retry_in = ?backoff, "spool: store unavailable");
                if sleep_or_stop(backoff, stop).await {
                    return false;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(err) => {
                error!(at = %record.start, cause = %err, "spool: a record cannot be applied; skipped");
                return true;
            }
        }
    }
}

async fn ack(replayer: &mut Replayer, end: Position) {
    if let Err(err) = replayer.ack(end).await {
        // Not recorded: the records since the last acknowledgement are applied again after
        // a restart, which dedupe makes harmless.
        warn!(cause = %err, "spool: acknowledging failed");
    }
}

/// Sleeps for `wait`; returns `true` when `stop` completed first.
async fn sleep_or_stop(
    wait: Duration,
    stop: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> bool {
    tokio::select! {
        () = tokio::time::sleep(wait) => false,
        () = stop.as_mut() => true,
    }
}
