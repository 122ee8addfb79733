//! The segment rebuild: a task that brings the memberships of existing profiles in line
//! with the collector's segment definitions when they differ from those recorded in Redis
//! (a segment added, changed or removed since the last start), in the background, while
//! the collector serves. `profile_cache::rebuild` has the design: the record, the lease that
//! lets one collector rebuild at a time, the resumable walk, and the races with updates.
//!
//! The task runs steps (each a bounded batch of a few round trips) until the record
//! matches, then ends. After each batch it rests as long as the batch took
//! ([`REST_PER_WORK`]), so the rebuild takes about half of Redis's time at most and leaves
//! the rest to ingest: with the demo segments one profile's evaluation took about 120 µs of
//! Redis time on a 2-core machine, so a rebuild flat out would keep Redis busy. While
//! another collector holds the rebuild's lease it looks again every [`BUSY_POLL`], and ends
//! as soon as that collector has finished the same rebuild. A Redis error is logged and retried with a growing pause; shutdown lets the
//! step in progress finish and gives the lease up, so a restarted collector continues at
//! once from the saved cursor.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use profile_cache::rebuild::Evaluated;
use profile_cache::{Rebuild, RedisProfiles, Step};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::api::Clock;

/// How often a collector waiting for another collector's rebuild looks again.
pub const BUSY_POLL: Duration = Duration::from_secs(1);

/// The first pause after a Redis error; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(250);

/// The longest pause after Redis errors.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The rest after each batch, as a share of the time the batch took: 1.0 halves the
/// rebuild's speed and its share of Redis's time.
pub const REST_PER_WORK: f64 = 1.0;

/// How often a running rebuild logs its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Drives a [`Rebuild`] to its end.
pub struct Rebuilder {
    rebuild: Rebuild,
    clock: Arc<dyn Clock>,
}

/// What one collector's rebuild task did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Batches this collector worked through (removals and pages of profiles).
    pub batches: u64,
    /// Profiles it evaluated.
    pub evaluated: u64,
    /// Segments they entered or left.
    pub changes: u64,
    /// Members it took out of removed segments.
    pub exits: u64,
    /// Profiles it could not evaluate.
    pub failed: u64,
    /// Steps that found another collector holding the lease.
    pub busy: u64,
    /// Whether the record matched the definitions when the task ended (false: stopped by
    /// shutdown first).
    pub current: bool,
}

impl Rebuilder {
    /// A rebuild for the segments `profiles` evaluates, with the default lease and batch
    /// sizes, on `clock`.
    pub fn new(profiles: &RedisProfiles, clock: Arc<dyn Clock>) -> Self {
        Self::with_rebuild(profiles.rebuild(), clock)
    }

    /// Drives `rebuild` (for tests: other batch sizes or lease).
    pub fn with_rebuild(rebuild: Rebuild, clock: Arc<dyn Clock>) -> Self {
        Self { rebuild, clock }
    }

    /// Runs steps until the recorded definitions are the configured ones, or `shutdown`
    /// completes (the step in progress finishes first and the lease is given up).
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Summary {
        tokio::pin!(shutdown);
        let mut summary = Summary::default();
        match self.rebuild.changes().await {
            Ok(changes) if !changes.is_empty() => info!(
                added = ?changes.added,
                changed = ?changes.changed,
                removed = ?changes.removed,
                "segment definitions differ from those recorded in redis: rebuilding memberships in the background"
            ),
            Ok(_) => {}
            // The steps retry; they log the error.
            Err(e) => {
                debug!(cause = %e, "segment rebuild: could not read the recorded definitions")
            }
        }
        let started = Instant::now();
        let mut last_report = started;
        let mut backoff: Option<Duration> = None;
        let mut waiting = false;
        loop {
            let began = Instant::now();
            let step = self.rebuild.step(self.clock.now()).await;
            let rest = began.elapsed().mul_f64(REST_PER_WORK);
            let pause = match step {
                Ok(step) => {
                    backoff = None;
                    if !matches!(step, Step::Busy) {
                        waiting = false;
                    }
                    match step {
                        Step::Current => {
                            summary.current = true;
                            report_end(&summary, started);
                            break;
                        }
                        Step::Busy => {
                            summary.busy += 1;
                            if !waiting {
                                info!(
                                    poll = ?BUSY_POLL,
                                    "another collector holds the segment rebuild's lease: waiting for it"
                                );
                                waiting = true;
                            }
                            BUSY_POLL
                        }
                        Step::Removed(r) => {
                            summary.exits += r.exits;
                            summary.batches += 1;
                            if r.emptied {
                                info!(segment = %r.segment, "removed segment emptied and forgotten");
                            }
                            rest
                        }
                        Step::Evaluated(page) => {
                            summary.batches += 1;
                            summary.evaluated += page.evaluated as u64;
                            summary.changes += page.changes;
                            summary.failed += page.failed as u64;
                            report_failures(&page);
                            if !page.finished && last_report.elapsed() >= PROGRESS_EVERY {
                                last_report = Instant::now();
                                report_progress(&summary, &page, started);
                            }
                            rest
                        }
                        Step::Restarted => {
                            warn!(
                                "a collector started with other segment definitions and discarded this rebuild's progress: starting over"
                            );
                            Duration::ZERO
                        }
                    }
                }
                Err(e) => {
                    let pause = backoff.map_or(FIRST_BACKOFF, |b| (b * 2).min(MAX_BACKOFF));
                    backoff = Some(pause);
                    warn!(cause = %e, retry_in = ?pause, "segment rebuild: redis error");
                    pause
                }
            };
            let pause = async {
                if pause.is_zero() {
                    tokio::task::yield_now().await;
                } else {
                    tokio::time::sleep(pause).await;
                }
            };
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                () = pause => {}
            }
        }
        if !summary.current {
            match self.rebuild.release().await {
                Ok(()) => info!(
                    evaluated = summary.evaluated,
                    "segment rebuild paused by shutdown; the next collector to start continues it"
                ),
                Err(e) => warn!(
                    cause = %e,
                    "segment rebuild paused by shutdown; its lease could not be released and ends by itself"
                ),
            }
        }
        summary
    }
}

fn report_failures(page: &Evaluated) {
    if let Some(first) = page.failures.first() {
        warn!(
            failed = page.failed,
            first = %first,
            "segment rebuild: profiles not evaluated; the scheduler tries them again when their claim ends"
        );
    }
}

fn report_progress(summary: &Summary, page: &Evaluated, started: Instant) {
    let secs = started.elapsed().as_secs_f64();
    info!(
        evaluated = summary.evaluated,
        changes = summary.changes,
        total_evaluated = page.total_evaluated,
        total_changes = page.total_changes,
        profiles_per_sec = (summary.evaluated as f64 / secs.max(0.001)).round(),
        "segment rebuild in progress"
    );
}

fn report_end(summary: &Summary, started: Instant) {
    if summary.batches == 0 {
        if summary.busy > 0 {
            info!(
                waited = ?started.elapsed(),
                "another collector finished the segment rebuild: memberships match the definitions"
            );
        } else {
            debug!("segment definitions match those recorded in redis: nothing to rebuild");
        }
        return;
    }
    info!(
        evaluated = summary.evaluated,
        changes = summary.changes,
        exits = summary.exits,
        failed = summary.failed,
        elapsed = ?started.elapsed(),
        "segment rebuild finished: memberships match the definitions, which are recorded"
    );
}

#[cfg(test)]
mod tests {
    //! The task against real, throwaway redis-servers; the steps' time comes from a fixed
    //! clock. `profile-cache/tests/rebuild.rs` covers what the steps do in detail.

    use std::collections::BTreeMap;

    use profile_cache::segments::Segment;
    use profile_cache::testing::{self, RedisServer, free_port};
    use profile_cache::{Event, EventKind, ProfileId, ProfileUpdate, Purpose};
    use redis::AsyncCommands;
    use redis::aio::MultiplexedConnection;
    use time::OffsetDateTime;
    use time::macros::datetime;
    use uuid::Uuid;

    use super::*;

    const T0: OffsetDateTime = datetime!(2026-11-29 12:00:00 UTC);

    struct Fixed;
    impl Clock for Fixed {
        fn now(&self) -> OffsetDateTime {
            T0 + time::Duration::HOUR
        }
    }

    fn segments(at_least: u32) -> Vec<Segment> {
        testing::segments(&format!(
            "[[segments]]\nname = \"big\"\ncondition = {{ metric = {{ field = \"orders\", at_least = {at_least} }} }}\n"
        ))
    }

    /// `n` profiles with two orders each, under definitions that record "big" at 2 orders.
    async fn populated(redis: &RedisServer, n: usize) {
        let old = redis.profiles(&segments(2)).await;
        let summary = Rebuilder::new(&old, Arc::new(Fixed))
            .run(std::future::pending())
            .await;
        assert!(summary.current);
        let updates: Vec<ProfileUpdate> = (0..n)
            .map(|i| ProfileUpdate {
                profile: ProfileId::anonymous(&format!("p{i}")).unwrap(),
                anonymous_id: None,
                user_id: None,
                context: Default::default(),
                events: (1..=2)
                    .map(|m| Event {
                        message_id: Uuid::from_u128(m),
                        kind: EventKind::OrderCompleted,
                        name: None,
                        timestamp: T0,
                        received_at: T0,
                        properties: vec![],
                        items: vec![],
                        user_id: None,
                        previous_id: None,
                        order_id: None,
                        revenue: 0,
                        currency: None,
                        consent: None,
                        purpose: Purpose::Analytics,
                    })
                    .collect(),
            })
            .collect();
        for chunk in updates.chunks(50) {
            old.apply(chunk).await.unwrap();
        }
    }

    /// `(segment, change, reason)` to how many transitions.
    async fn transition_counts(
        conn: &mut MultiplexedConnection,
    ) -> BTreeMap<(String, String, String), usize> {
        let entries: Vec<(String, BTreeMap<String, String>)> = redis::cmd("XRANGE")
            .arg("stream:transitions")
            .arg("-")
            .arg("+")
            .query_async(conn)
            .await
            .unwrap();
        let mut counts = BTreeMap::new();
        for (_, f) in entries {
            let key = (
                f["segment"].clone(),
                f["change"].clone(),
                f["reason"].clone(),
            );
            *counts.entry(key).or_default() += 1;
        }
        counts
    }

    fn count(
        segment: &str,
        change: &str,
        reason: &str,
        n: usize,
    ) -> ((String, String, String), usize) {
        ((segment.into(), change.into(), reason.into()), n)
    }

    #[tokio::test]
    async fn the_task_rebuilds_until_the_definitions_are_recorded_and_ends() {
        const PROFILES: usize = 50;
        let redis = RedisServer::start().unwrap();
        populated(&redis, PROFILES).await;
        let new = redis.profiles(&segments(3)).await;
        let rebuild = new.rebuild().with_batches(30, 10);
        let summary = Rebuilder::with_rebuild(rebuild, Arc::new(Fixed))
            .run(std::future::pending())
            .await;
        assert_eq!(
            (
                summary.evaluated,
                summary.changes,
                summary.failed,
                summary.busy
            ),
            (PROFILES as u64, PROFILES as u64, 0, 0)
        );
        assert!(summary.batches > 1, "{summary:?}");
        assert!(summary.current);

        let mut conn = redis.connection().await;
        assert_eq!(
            transition_counts(&mut conn).await,
            BTreeMap::from([
                count("big", "enter", "event", PROFILES),
                count("big", "exit", "redefined", PROFILES),
            ])
        );
        let record: BTreeMap<String, String> =
            conn.hgetall("meta:{segments}:definitions").await.unwrap();
        assert_eq!(
            record,
            BTreeMap::from([("big".to_string(), segments(3)[0].fingerprint().unwrap())])
        );
        let left: usize = conn
            .exists(&["meta:{segments}:rebuild", "meta:{segments}:rebuild_lease"])
            .await
            .unwrap();
        assert_eq!(left, 0);
    }

    #[tokio::test]
    async fn shutdown_pauses_the_rebuild_and_the_next_collector_continues_it() {
        const PROFILES: usize = 60;
        let redis = RedisServer::start().unwrap();
        populated(&redis, PROFILES).await;
        let new = redis.profiles(&segments(3)).await;

        // Shutdown has begun already: one step, then the lease is given up.
        let first = Rebuilder::with_rebuild(new.rebuild().with_batches(30, 10), Arc::new(Fixed))
            .run(std::future::ready(()))
            .await;
        assert_eq!((first.batches, first.current), (1, false), "{first:?}");
        let mut conn = redis.connection().await;
        let lease: bool = conn.exists("meta:{segments}:rebuild_lease").await.unwrap();
        assert!(!lease, "released");
        let cursor: String = conn
            .hget("meta:{segments}:rebuild", "cursor")
            .await
            .unwrap();
        assert_ne!(cursor, "0");

        // The next collector neither waits for a lease nor walks the first page again.
        let second = Rebuilder::with_rebuild(new.rebuild().with_batches(30, 10), Arc::new(Fixed))
            .run(std::future::pending())
            .await;
        assert_eq!(second.busy, 0);
        assert!(second.current);
        assert_eq!(first.evaluated + second.evaluated, PROFILES as u64);
        assert_eq!(
            transition_counts(&mut conn).await,
            BTreeMap::from([
                count("big", "enter", "event", PROFILES),
                count("big", "exit", "redefined", PROFILES),
            ])
        );
    }

    #[tokio::test]
    async fn a_collector_waits_while_another_rebuilds_and_ends_when_it_is_done() {
        const PROFILES: usize = 40;
        let redis = RedisServer::start().unwrap();
        populated(&redis, PROFILES).await;
        let new = redis.profiles(&segments(3)).await;
        let mut other = new.rebuild().with_batches(30, 10);
        assert!(matches!(other.step(T0).await.unwrap(), Step::Evaluated(_)));

        let waiting =
            tokio::spawn(Rebuilder::new(&new, Arc::new(Fixed)).run(std::future::pending()));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished());
        while other.step(T0).await.unwrap() != Step::Current {}
        let summary = tokio::time::timeout(BUSY_POLL * 3, waiting)
            .await
            .expect("ends within a poll or two")
            .unwrap();
        assert_eq!((summary.batches, summary.evaluated), (0, 0), "{summary:?}");
        assert!(summary.busy >= 1 && summary.current, "{summary:?}");
    }

    #[tokio::test]
    async fn the_task_keeps_going_through_a_redis_restart() {
        const PROFILES: usize = 30;
        let dir = tempfile::tempdir().unwrap();
        let port = free_port().unwrap();
        let redis = RedisServer::start_with_dir(dir.path(), port).unwrap();
        populated(&redis, PROFILES).await;
        let new = redis.profiles(&segments(3)).await;
        drop(redis);

        let task = tokio::spawn(
            Rebuilder::with_rebuild(new.rebuild().with_batches(30, 10), Arc::new(Fixed))
                .run(std::future::pending()),
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!task.is_finished(), "retrying");
        let redis = RedisServer::start_with_dir(dir.path(), port).unwrap();
        let summary = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("finishes once redis is back")
            .unwrap();
        assert!(summary.current);
        assert_eq!(summary.evaluated, PROFILES as u64);
        let mut conn = redis.connection().await;
        assert_eq!(
            transition_counts(&mut conn).await,
            BTreeMap::from([
                count("big", "enter", "event", PROFILES),
                count("big", "exit", "redefined", PROFILES),
            ])
        );
    }
}
