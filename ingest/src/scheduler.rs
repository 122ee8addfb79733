//! The deadline scheduler: a task that claims the profiles whose next deadline has come and
//! re-evaluates their segments, so a membership that changes by time alone (a cart left for
//! 30 minutes) changes without a new event. Claims carry a lease, so every collector can run
//! one over the same Redis: each due profile is evaluated by one of them
//! (`profile_cache::schedule` has the guarantees and the races).
//!
//! Each round claims up to `batch_size` due profiles and evaluates them at the clock's time,
//! two round trips in all, then sleeps until the earliest deadline left, at most
//! `poll_interval`; a full batch goes straight to the next round. A Redis error is logged
//! and retried with a growing pause; a profile that fails alone keeps its claim and is
//! tried again when the lease ends.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use profile_cache::{Outcome, RedisProfiles, StoreError};
use time::OffsetDateTime;
use tracing::{debug, error, info, warn};

use crate::api::Clock;
use crate::config::SchedulerConfig;

/// The longest pause after Redis errors.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Claims due profiles and re-evaluates them, round after round.
pub struct Scheduler {
    profiles: RedisProfiles,
    clock: Arc<dyn Clock>,
    config: SchedulerConfig,
}

/// What one round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Round {
    /// Profiles claimed.
    pub claimed: usize,
    /// Of those, profiles evaluated.
    pub evaluated: usize,
    /// Segments entered or left by the evaluated profiles.
    pub changes: u64,
    /// Claimed profiles that an update, or another scheduler, evaluated first.
    pub superseded: usize,
    /// Claimed profiles that no longer exist.
    pub gone: usize,
    /// Claimed profiles that could not be evaluated (logged); tried again after the lease.
    pub failed: usize,
    /// When the earliest profile left in the schedule falls due; `None`: none is scheduled.
    pub next_due: Option<OffsetDateTime>,
}

impl Scheduler {
    /// A scheduler over `profiles` (built with the segments to evaluate), on `clock`.
    pub fn new(profiles: RedisProfiles, clock: Arc<dyn Clock>, config: SchedulerConfig) -> Self {
        Self {
            profiles,
            clock,
            config,
        }
    }

    /// One round: claims up to `batch_size` due profiles and evaluates them at the clock's
    /// time.
    ///
    /// # Errors
    /// Redis failed as a whole (unreachable, or the schedule is not a sorted set); claims
    /// already taken expire after the lease.
    pub async fn round(&self) -> Result<Round, StoreError> {
        let now = self.clock.now();
        let claimed = self
            .profiles
            .claim_due(now, self.config.lease, self.config.batch_size)
            .await?;
        let mut round = Round {
            claimed: claimed.claims.len(),
            next_due: claimed.next_due,
            ..Round::default()
        };
        if claimed.claims.is_empty() {
            return Ok(round);
        }
        let outcomes = self.profiles.evaluate_claimed(&claimed.claims, now).await?;
        for outcome in outcomes {
            match outcome {
                Ok(Outcome::Evaluated { changes }) => {
                    round.evaluated += 1;
                    round.changes += changes;
                }
                Ok(Outcome::Superseded) => round.superseded += 1,
                Ok(Outcome::Gone) => round.gone += 1,
                Err(e) => {
                    round.failed += 1;
                    error!(
                        cause = %e,
                        lease = ?self.config.lease,
                        "profile not evaluated at its deadline; retried when the claim ends"
                    );
                }
            }
        }
        report_round(&round);
        Ok(round)
    }

    /// Runs rounds until `shutdown` completes; a round in progress finishes first, so that
    /// its claims are not left to expire.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        info!(
            poll_interval = ?self.config.poll_interval,
            lease = ?self.config.lease,
            "deadline scheduler started"
        );
        let mut backoff = None;
        loop {
            let pause = match self.round().await {
                Ok(round) => {
                    backoff = None;
                    self.pause_after(&round)
                }
                Err(e) => {
                    let pause = backoff.map_or(self.config.poll_interval, |b: Duration| {
                        (b * 2).min(MAX_BACKOFF)
                    });
                    backoff = Some(pause);
                    warn!(cause = %e, retry_in = ?pause, "deadline scheduler: redis error");
                    pause
                }
            };
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep(pause) => {}
            }
        }
        info!("deadline scheduler stopped");
    }

    /// How long to sleep after `round`: none after a full batch (more may be due), else
    /// until the earliest deadline left, at most `poll_interval` (an update may schedule an
    /// earlier one meanwhile).
    fn pause_after(&self, round: &Round) -> Duration {
        if round.claimed >= self.config.batch_size {
            return Duration::ZERO;
        }
        let poll = self.config.poll_interval;
        match round.next_due {
            None => poll,
            Some(due) => {
                let until = due - self.clock.now();
                Duration::try_from(until).map_or(Duration::ZERO, |d| d.min(poll))
            }
        }
    }
}

/// Counts a round's evaluations.
fn report_round(round: &Round) {
    debug!(
        claimed = round.claimed,
        evaluated = round.evaluated,
        changes = round.changes,
        superseded = round.superseded,
        gone = round.gone,
        failed = round.failed,
        "deadline round"
    );
}

#[cfg(test)]
mod tests {
    //! The scheduler against real, throwaway redis-servers, on a clock the tests move: time
    //! jumps minutes or days in a millisecond.

    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use profile_cache::testing::{RedisServer, free_port, segments};
    use profile_cache::{Event, EventKind, Item, ProfileId, ProfileUpdate, Purpose};
    use redis::AsyncCommands;
    use redis::aio::MultiplexedConnection;
    use time::macros::datetime;
    use tokio::sync::oneshot;
    use uuid::Uuid;

    use super::*;

    /// On the hour, so window buckets line up.
    const T0: OffsetDateTime = datetime!(2026-11-29 12:00:00 UTC);
    const MINUTE: time::Duration = time::Duration::MINUTE;
    const DAY: time::Duration = time::Duration::DAY;

    /// A clock that stands still until the test moves it.
    struct ManualClock(Mutex<OffsetDateTime>);

    impl ManualClock {
        fn at(t: OffsetDateTime) -> Arc<Self> {
            Arc::new(Self(Mutex::new(t)))
        }
        fn set(&self, t: OffsetDateTime) {
            *self.0.lock().unwrap() = t;
        }
    }

    impl Clock for ManualClock {
        fn now(&self) -> OffsetDateTime {
            *self.0.lock().unwrap()
        }
    }

    fn config() -> SchedulerConfig {
        SchedulerConfig {
            enabled: true,
            poll_interval: Duration::from_millis(5),
            lease: Duration::from_secs(30),
            batch_size: 100,
        }
    }

    /// An event at `ts`, received at T0, with a shoe in it for the kinds that carry items.
    fn event(n: u128, kind: EventKind, ts: OffsetDateTime) -> Event {
        let shoe = Item {
            product_id: "sku-1".into(),
            category: Some("shoes".into()),
            price: 5_000,
            quantity: 1,
            name: None,
        };
        let commerce = matches!(kind, EventKind::ProductViewed | EventKind::CartAdd);
        Event {
            message_id: Uuid::from_u128(n),
            kind,
            name: None,
            timestamp: ts,
            received_at: T0,
            properties: vec![],
            items: if commerce { vec![shoe] } else { vec![] },
            user_id: None,
            previous_id: None,
            order_id: None,
            revenue: 0,
            currency: None,
            consent: None,
            purpose: Purpose::Analytics,
        }
    }

    fn update(id: &ProfileId, events: Vec<Event>) -> ProfileUpdate {
        ProfileUpdate {
            profile: id.clone(),
            anonymous_id: None,
            user_id: None,
            context: Default::default(),
            events,
        }
    }

    fn ms(t: OffsetDateTime) -> String {
        (t.unix_timestamp_nanos() / 1_000_000).to_string()
    }

    /// `[profile, segment, change, at, reason]` of every transition, in order.
    async fn all_transitions(conn: &mut MultiplexedConnection) -> Vec<[String; 5]> {
        let entries: Vec<(String, BTreeMap<String, String>)> = redis::cmd("XRANGE")
            .arg("stream:transitions")
            .arg("-")
            .arg("+")
            .query_async(conn)
            .await
            .unwrap();
        entries
            .into_iter()
            .map(|(_, f)| ["profile", "segment", "change", "at", "reason"].map(|k| f[k].clone()))
            .collect()
    }

    /// The profile's transitions, in order.
    async fn transitions(conn: &mut MultiplexedConnection, profile: &str) -> Vec<[String; 5]> {
        let mut all = all_transitions(conn).await;
        all.retain(|t| t[0] == profile);
        all
    }

    fn transition(
        profile: &str,
        segment: &str,
        change: &str,
        at: OffsetDateTime,
        reason: &str,
    ) -> [String; 5] {
        [profile, segment, change, &ms(at), reason].map(String::from)
    }

    async fn deadline(conn: &mut MultiplexedConnection, profile: &str) -> Option<OffsetDateTime> {
        let ms: Option<i64> = conn.zscore("schedule:deadlines", profile).await.unwrap();
        ms.map(|ms| OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap())
    }

    /// Polls until `check` holds, for at most 5 s.
    async fn eventually<F, Fut>(what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let start = tokio::time::Instant::now();
        while !check().await {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// A running scheduler; `stop` shuts it down and checks that it ends.
    struct Running {
        stop: oneshot::Sender<()>,
        task: tokio::task::JoinHandle<()>,
    }

    fn start(profiles: RedisProfiles, clock: Arc<ManualClock>) -> Running {
        let (stop, stopped) = oneshot::channel::<()>();
        let scheduler = Scheduler::new(profiles, clock, config());
        let task = tokio::spawn(scheduler.run(async move {
            let _ = stopped.await;
        }));
        Running { stop, task }
    }

    impl Running {
        async fn stop(self) {
            self.stop.send(()).unwrap();
            tokio::time::timeout(Duration::from_secs(1), self.task)
                .await
                .expect("the scheduler stops on shutdown")
                .unwrap();
        }
    }

    /// One segment, the events one profile sent (received at T0), the changes they make at
    /// once, and the changes time alone makes later, minutes or days after T0.
    struct Case {
        condition: &'static str,
        events: Vec<(EventKind, time::Duration)>,
        at_once: Option<&'static str>,
        later: Vec<(time::Duration, &'static str)>,
    }

    fn cases() -> Vec<Case> {
        use EventKind::*;
        let case = |condition, events: Vec<(EventKind, time::Duration)>, at_once, later| Case {
            condition,
            events,
            at_once,
            later,
        };
        let zero = time::Duration::ZERO;
        vec![
            case(
                r#"{ older_than = { field = "cart_updated_at", duration = "30m" } }"#,
                vec![(CartAdd, zero)],
                None,
                vec![(30 * MINUTE, "enter")],
            ),
            case(
                r#"{ within = { field = "last_order_at", duration = "7d" } }"#,
                vec![(OrderCompleted, zero)],
                Some("enter"),
                vec![(7 * DAY, "exit")],
            ),
            case(
                r#"{ not = { within = { field = "last_engaged_at", duration = "30m" } } }"#,
                vec![(EmailOpened, zero)],
                None,
                vec![(30 * MINUTE, "enter")],
            ),
            // Views at 11:30 and 12:00: the 11:00 bucket leaves the 2-hour window at 13:00.
            case(
                r#"{ event_count = { event = "product_viewed", category = "shoes", within = "2h", at_least = 2 } }"#,
                vec![(ProductViewed, -30 * MINUTE), (ProductViewed, zero)],
                Some("enter"),
                vec![(60 * MINUTE, "exit")],
            ),
            case(
                r#"{ event_count = { event = "email_clicked", within = "1h", at_most = 0 } }"#,
                vec![(EmailClicked, zero)],
                None,
                vec![(60 * MINUTE, "enter")],
            ),
            case(
                r#"{ lifecycle = "new" }"#,
                vec![(Page, zero)],
                Some("enter"),
                vec![(14 * DAY, "exit")],
            ),
            case(
                r#"{ lifecycle = "active" }"#,
                vec![(Page, zero)],
                None,
                vec![(14 * DAY, "enter"), (30 * DAY, "exit")],
            ),
            case(
                r#"{ lifecycle = "dormant" }"#,
                vec![(Page, zero)],
                None,
                vec![(30 * DAY, "enter"), (90 * DAY, "exit")],
            ),
            case(
                r#"{ lifecycle = "churned" }"#,
                vec![(Page, zero)],
                None,
                vec![(90 * DAY, "enter")],
            ),
            case(
                r#"{ all = [
                  { cart = "not_empty" },
                  { older_than = { field = "cart_updated_at", duration = "30m" } },
                  { no_order_since = "cart_updated_at" },
                ] }"#,
                vec![(CartAdd, zero)],
                None,
                vec![(30 * MINUTE, "enter")],
            ),
            case(
                r#"{ all = [
                  { older_than = { field = "first_seen", duration = "10m" } },
                  { within = { field = "last_seen", duration = "30m" } },
                ] }"#,
                vec![(Page, zero)],
                None,
                vec![(10 * MINUTE, "enter"), (30 * MINUTE, "exit")],
            ),
        ]
    }

    #[tokio::test]
    async fn every_time_based_condition_enters_and_exits_through_the_scheduler() {
        for (i, case) in cases().into_iter().enumerate() {
            let redis = RedisServer::start().unwrap();
            let toml = format!(
                "[[segments]]\nname = \"s{i}\"\ncondition = {}\n",
                case.condition
            );
            let profiles = redis.profiles(&segments(&toml)).await;
            let mut conn = redis.connection().await;
            let id = ProfileId::anonymous("v").unwrap();
            let events = (case.events.iter().enumerate())
                .map(|(n, (kind, offset))| event(n as u128, *kind, T0 + *offset))
                .collect();
            profiles.apply(&[update(&id, events)]).await.unwrap();

            let name = format!("s{i}");
            let change = |c: &str, at, reason: &str| transition("a:v", &name, c, at, reason);
            let mut expected: Vec<_> = case
                .at_once
                .map(|c| change(c, T0, "event"))
                .into_iter()
                .collect();
            assert_eq!(transitions(&mut conn, "a:v").await, expected, "{toml}");

            let clock = ManualClock::at(T0);
            let scheduler = start(profiles, clock.clone());
            for (offset, c) in case.later {
                let due = T0 + offset;
                // Scheduled to the millisecond, so it cannot fire early.
                assert_eq!(deadline(&mut conn, "a:v").await, Some(due), "{toml}");
                clock.set(due);
                expected.push(change(c, due, "deadline"));
                eventually(&toml, || {
                    let mut conn = conn.clone();
                    let expected = expected.clone();
                    async move { transitions(&mut conn, "a:v").await == expected }
                })
                .await;
            }
            assert_eq!(deadline(&mut conn, "a:v").await, None, "{toml}");
            scheduler.stop().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_schedulers_share_the_due_profiles_and_write_each_transition_once() {
        const PROFILES: usize = 250;
        let redis = RedisServer::start().unwrap();
        let cart = segments(
            r#"
            [[segments]]
            name = "cart_abandoners_30m"
            condition = { all = [
              { cart = "not_empty" },
              { older_than = { field = "cart_updated_at", duration = "30m" } },
              { no_order_since = "cart_updated_at" },
            ] }
            "#,
        );
        let (a, b) = (redis.profiles(&cart).await, redis.profiles(&cart).await);
        let ids: Vec<ProfileId> = (0..PROFILES)
            .map(|i| ProfileId::anonymous(&format!("v{i}")).unwrap())
            .collect();
        let updates: Vec<ProfileUpdate> = ids
            .iter()
            .map(|id| update(id, vec![event(1, EventKind::CartAdd, T0)]))
            .collect();
        a.apply(&updates).await.unwrap();

        let clock = ManualClock::at(T0 + 30 * MINUTE);
        let small = SchedulerConfig {
            batch_size: 8,
            ..config()
        };
        // Each runs rounds until one finds nothing due.
        async fn rounds(scheduler: Scheduler) -> Round {
            let mut total = Round::default();
            for _ in 0..PROFILES {
                let round = scheduler.round().await.unwrap();
                if round.claimed == 0 {
                    return total;
                }
                total.claimed += round.claimed;
                total.evaluated += round.evaluated;
                total.changes += round.changes;
                total.superseded += round.superseded;
                total.failed += round.failed;
            }
            panic!("profiles still due after {PROFILES} rounds");
        }
        let (by_a, by_b) = tokio::join!(
            tokio::spawn(rounds(Scheduler::new(a, clock.clone(), small))),
            tokio::spawn(rounds(Scheduler::new(b, clock.clone(), small))),
        );
        let (by_a, by_b) = (by_a.unwrap(), by_b.unwrap());
        assert_eq!(by_a.claimed + by_b.claimed, PROFILES, "{by_a:?} {by_b:?}");
        assert_eq!(by_a.evaluated + by_b.evaluated, PROFILES);
        assert_eq!(by_a.changes + by_b.changes, PROFILES as u64);
        assert_eq!((by_a.superseded, by_b.superseded), (0, 0));
        assert_eq!((by_a.failed, by_b.failed), (0, 0));

        let mut conn = redis.connection().await;
        let mut written = all_transitions(&mut conn).await;
        written.sort();
        let entered = |id: &ProfileId| {
            let at = T0 + 30 * MINUTE;
            transition(id.as_str(), "cart_abandoners_30m", "enter", at, "deadline")
        };
        let mut expected: Vec<[String; 5]> = ids.iter().map(entered).collect();
        expected.sort();
        assert_eq!(written, expected);
    }

    #[tokio::test]
    async fn the_scheduler_keeps_going_through_a_redis_restart() {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port().unwrap();
        let redis = RedisServer::start_with_dir(dir.path(), port).unwrap();
        let cart = segments(
            "[[segments]]\nname = \"cart_30m\"\ncondition = { older_than = { field = \"cart_updated_at\", duration = \"30m\" } }\n",
        );
        let profiles = redis.profiles(&cart).await;
        let id = ProfileId::anonymous("v").unwrap();
        profiles
            .apply(&[update(&id, vec![event(1, EventKind::CartAdd, T0)])])
            .await
            .unwrap();
        let clock = ManualClock::at(T0);
        let scheduler = start(profiles, clock.clone());

        // Redis goes away (its data on disk), and the cart's deadline passes meanwhile.
        drop(redis);
        tokio::time::sleep(Duration::from_millis(200)).await;
        clock.set(T0 + 30 * MINUTE);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!scheduler.task.is_finished(), "still running");

        // Back, without the scripts it had loaded: the scheduler reconnects and catches up.
        let redis = RedisServer::start_with_dir(dir.path(), port).unwrap();
        let mut conn = redis.connection().await;
        let expected = vec![transition(
            "a:v",
            "cart_30m",
            "enter",
            T0 + 30 * MINUTE,
            "deadline",
        )];
        eventually("the deadline after the restart", || {
            let mut conn = conn.clone();
            let expected = expected.clone();
            async move { transitions(&mut conn, "a:v").await == expected }
        })
        .await;
        assert_eq!(deadline(&mut conn, "a:v").await, None);
        scheduler.stop().await;
    }
}
