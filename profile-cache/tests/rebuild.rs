//! Rebuilds after the segment definitions change, against real, throwaway redis-server
//! processes: changed, added and removed segments, with their transitions and deadlines; a
//! rebuild interrupted and resumed from its cursor (cleanly, or after its collector died);
//! definitions changed again midway; two collectors starting at once; updates and
//! schedulers racing the rebuild's claims; an unchanged configuration. Time comes from the
//! events and the steps' `now`, never from the wall clock.

use std::collections::BTreeMap;
use std::time::Duration;

use profile_cache::rebuild::{Evaluated, Removed};
use profile_cache::segments::{Segment, fingerprint_all};
use profile_cache::testing::{RedisServer, segments};
use profile_cache::{
    Changes, Context, Event, EventKind, Item, Outcome, ProfileId, ProfileUpdate, Purpose, Reason,
    Rebuild, RedisProfiles, Step,
};
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use time::OffsetDateTime;
use time::macros::datetime;
use uuid::Uuid;

const T0: OffsetDateTime = datetime!(2026-11-29 12:00:00 UTC);
const LEASE: Duration = Duration::from_secs(60);

fn at(minute: i64) -> OffsetDateTime {
    T0 + time::Duration::minutes(minute)
}

fn ms(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

fn anon(id: &str) -> ProfileId {
    ProfileId::anonymous(id).unwrap()
}

/// An event of `kind` at `at`, received then.
fn ev(n: u128, kind: EventKind, at: OffsetDateTime) -> Event {
    let items = match kind {
        EventKind::CartAdd => vec![Item {
            product_id: "sku-1".into(),
            category: None,
            price: 1_000,
            quantity: 1,
            name: None,
        }],
        _ => vec![],
    };
    Event {
        message_id: Uuid::from_u128(n),
        kind,
        name: None,
        timestamp: at,
        received_at: at,
        properties: vec![],
        items,
        user_id: None,
        previous_id: None,
        order_id: None,
        revenue: 0,
        currency: None,
        consent: None,
        purpose: Purpose::Analytics,
    }
}

fn update(profile: &ProfileId, events: Vec<Event>) -> ProfileUpdate {
    ProfileUpdate {
        profile: profile.clone(),
        anonymous_id: profile.as_str().strip_prefix("a:").map(String::from),
        user_id: None,
        context: Context::default(),
        events,
    }
}

/// `orders` orders by profile `id`, at T0.
fn orders(id: &ProfileId, orders: u128) -> ProfileUpdate {
    let events = (0..orders)
        .map(|n| ev(n + 1, EventKind::OrderCompleted, T0))
        .collect();
    update(id, events)
}

/// `[profile, segment, change, at, reason]` of a transition.
type Transition = [String; 5];

fn transition(
    profile: &str,
    segment: &str,
    change: &str,
    at: OffsetDateTime,
    reason: &str,
) -> Transition {
    [profile, segment, change, &ms(at).to_string(), reason].map(String::from)
}

/// The transitions after entry id `after` ("0": all), and the last entry id.
async fn transitions_after(
    conn: &mut MultiplexedConnection,
    after: &str,
) -> (Vec<Transition>, String) {
    let entries: Vec<(String, BTreeMap<String, String>)> = redis::cmd("XRANGE")
        .arg("stream:transitions")
        .arg(format!("({after}"))
        .arg("+")
        .query_async(conn)
        .await
        .unwrap();
    let last = entries
        .last()
        .map_or_else(|| after.to_string(), |(id, _)| id.clone());
    let list = entries
        .into_iter()
        .map(|(_, f)| ["profile", "segment", "change", "at", "reason"].map(|k| f[k].clone()))
        .collect();
    (list, last)
}

async fn transitions(conn: &mut MultiplexedConnection) -> Vec<Transition> {
    transitions_after(conn, "0").await.0
}

async fn members(conn: &mut MultiplexedConnection, segment: &str) -> Vec<(String, i64)> {
    conn.zrange_withscores(format!("segment:{{{segment}}}:members"), 0, -1)
        .await
        .unwrap()
}

async fn memberships(conn: &mut MultiplexedConnection, id: &ProfileId) -> BTreeMap<String, i64> {
    conn.hgetall(format!("profile:{{{id}}}:segments"))
        .await
        .unwrap()
}

async fn schedule(conn: &mut MultiplexedConnection) -> Vec<(String, i64)> {
    conn.zrange_withscores("schedule:deadlines", 0, -1)
        .await
        .unwrap()
}

async fn record(conn: &mut MultiplexedConnection) -> BTreeMap<String, String> {
    conn.hgetall("meta:{segments}:definitions").await.unwrap()
}

async fn progress(conn: &mut MultiplexedConnection) -> BTreeMap<String, String> {
    conn.hgetall("meta:{segments}:rebuild").await.unwrap()
}

async fn exists(conn: &mut MultiplexedConnection, key: &str) -> bool {
    conn.exists(key).await.unwrap()
}

/// The record a finished rebuild of `segments` leaves.
fn recorded(segments: &[Segment]) -> BTreeMap<String, String> {
    segments
        .iter()
        .map(|s| (s.name.clone(), s.fingerprint().unwrap()))
        .collect()
}

/// What a rebuilder did over several steps.
#[derive(Debug, Default, PartialEq, Eq)]
struct Tally {
    pages: usize,
    evaluated: usize,
    changes: u64,
    exits: u64,
    busy: usize,
}

impl Tally {
    fn add(&mut self, step: &Step) {
        match step {
            Step::Evaluated(page) => {
                self.pages += 1;
                self.evaluated += page.evaluated;
                self.changes += page.changes;
                assert_eq!(page.failures, Vec::<String>::new());
            }
            Step::Removed(r) => self.exits += r.exits,
            Step::Busy => self.busy += 1,
            Step::Current | Step::Restarted => {}
        }
    }
}

/// Steps until `Current`, at `now`; panics on `Busy`.
async fn finish(rebuild: &mut Rebuild, now: OffsetDateTime) -> Tally {
    let mut tally = Tally::default();
    for _ in 0..1_000 {
        let step = rebuild.step(now).await.unwrap();
        assert_ne!(step, Step::Busy, "nobody else holds the lease");
        if step == Step::Current {
            return tally;
        }
        tally.add(&step);
    }
    panic!("no end after 1000 steps: {tally:?}");
}

/// `n` steps, which must all be pages of the walk.
async fn pages(rebuild: &mut Rebuild, now: OffsetDateTime, n: usize) -> Tally {
    let mut tally = Tally::default();
    for _ in 0..n {
        let step = rebuild.step(now).await.unwrap();
        assert!(
            matches!(&step, Step::Evaluated(page) if !page.finished),
            "{step:?}"
        );
        tally.add(&step);
    }
    tally
}

const BIG_2: &str = r#"
[[segments]]
name = "big"
condition = { metric = { field = "orders", at_least = 2 } }
"#;

const CART_30M: &str = r#"
[[segments]]
name = "cart"
condition = { all = [
  { cart = "not_empty" },
  { older_than = { field = "cart_updated_at", duration = "30m" } },
] }
"#;

// ------------------------------------------------------------------ what a rebuild does

#[tokio::test]
async fn a_changed_condition_moves_existing_profiles_and_their_deadlines() {
    let redis = RedisServer::start().unwrap();
    let mut conn = redis.connection().await;
    let before = segments(&format!("{BIG_2}{CART_30M}"));
    let old = redis.profiles(&before).await;
    for (id, n) in [("p1", 1), ("p2", 2), ("p3", 3)] {
        old.apply(&[orders(&anon(id), n)]).await.unwrap();
    }
    old.apply(&[update(&anon("p4"), vec![ev(1, EventKind::CartAdd, T0)])])
        .await
        .unwrap();
    // The first collector to start records its definitions; the events already made the
    // memberships right, so its walk finds nothing to change.
    let mut first = old.rebuild();
    assert_eq!(
        first.changes().await.unwrap(),
        Changes {
            added: vec!["big".into(), "cart".into()],
            ..Changes::default()
        }
    );
    let tally = finish(&mut first, at(1)).await;
    assert_eq!((tally.evaluated, tally.changes), (4, 0));
    assert_eq!(record(&mut conn).await, recorded(&before));
    let (enters, last) = transitions_after(&mut conn, "0").await;
    assert_eq!(
        enters,
        [
            transition("a:p2", "big", "enter", T0, "event"),
            transition("a:p3", "big", "enter", T0, "event"),
        ]
    );
    assert_eq!(schedule(&mut conn).await, [("a:p4".into(), ms(at(30)))]);

    // Restarted with "big" at 3 orders and carts at 60 minutes, 15 minutes after T0.
    let after = segments(
        r#"
        [[segments]]
        name = "big"
        description = "Three orders now"
        condition = { metric = { field = "orders", at_least = 3 } }
        [[segments]]
        name = "cart"
        condition = { all = [
          { cart = "not_empty" },
          { older_than = { field = "cart_updated_at", duration = "60m" } },
        ] }
        "#,
    );
    let new = redis.profiles(&after).await;
    let mut rebuild = new.rebuild();
    assert_eq!(
        rebuild.changes().await.unwrap(),
        Changes {
            changed: vec!["big".into(), "cart".into()],
            ..Changes::default()
        }
    );
    let tally = finish(&mut rebuild, at(15)).await;
    assert_eq!((tally.evaluated, tally.changes), (4, 1));

    assert_eq!(
        transitions_after(&mut conn, &last).await.0,
        [transition("a:p2", "big", "exit", at(15), "redefined")]
    );
    assert_eq!(members(&mut conn, "big").await, [("a:p3".into(), ms(T0))]);
    assert_eq!(memberships(&mut conn, &anon("p2")).await, BTreeMap::new());
    // The cart's deadline follows the new definition; the claims left no other entry.
    assert_eq!(schedule(&mut conn).await, [("a:p4".into(), ms(at(60)))]);
    assert_eq!(record(&mut conn).await, recorded(&after));
    assert_eq!(progress(&mut conn).await, BTreeMap::new());
    assert!(!exists(&mut conn, "meta:{segments}:rebuild_lease").await);
}

#[tokio::test]
async fn a_new_segment_fills_from_existing_profiles() {
    let redis = RedisServer::start().unwrap();
    let mut conn = redis.connection().await;
    let before = segments(BIG_2);
    let old = redis.profiles(&before).await;
    finish(&mut old.rebuild(), T0).await;
    for (id, n) in [("p1", 1), ("p2", 2), ("p3", 0)] {
        let mut u = orders(&anon(id), n);
        u.events.push(ev(9, EventKind::Page, T0));
        old.apply(&[u]).await.unwrap();
    }
    let (_, last) = transitions_after(&mut conn, "0").await;

    let after = segments(&format!(
        r#"{BIG_2}
        [[segments]]
        name = "recent_buyers"
        condition = {{ within = {{ field = "last_order_at", duration = "7d" }} }}
        "#
    ));
    let new = redis.profiles(&after).await;
    let mut rebuild = new.rebuild();
    assert_eq!(
        rebuild.changes().await.unwrap(),
        Changes {
            added: vec!["recent_buyers".into()],
            ..Changes::default()
        }
    );
    let tally = finish(&mut rebuild, at(60)).await;
    assert_eq!((tally.evaluated, tally.changes), (3, 2));

    let mut added = transitions_after(&mut conn, &last).await.0;
    added.sort();
    assert_eq!(
        added,
        [
            transition("a:p1", "recent_buyers", "enter", at(60), "redefined"),
            transition("a:p2", "recent_buyers", "enter", at(60), "redefined"),
        ]
    );
    assert_eq!(
        members(&mut conn, "recent_buyers").await,
        [("a:p1".into(), ms(at(60))), ("a:p2".into(), ms(at(60)))]
    );
    assert_eq!(
        memberships(&mut conn, &anon("p2")).await,
        BTreeMap::from([("big".into(), ms(T0)), ("recent_buyers".into(), ms(at(60)))])
    );
    // The buyers leave the new segment 7 days after their order: scheduled.
    let week = ms(T0 + time::Duration::days(7));
    assert_eq!(
        schedule(&mut conn).await,
        [("a:p1".into(), week), ("a:p2".into(), week)]
    );
    assert_eq!(record(&mut conn).await, recorded(&after));
}

#[tokio::test]
async fn a_removed_segment_is_emptied_with_exit_transitions_and_its_keys_gone() {
    let redis = RedisServer::start().unwrap();
    let mut conn = redis.connection().await;
    let before = segments(&format!(
        r#"{BIG_2}
        [[segments]]
        name = "buyers"
        condition = {{ metric = {{ field = "orders", at_least = 1 }} }}
        "#
    ));
    let old = redis.profiles(&before).await;
    finish(&mut old.rebuild(), T0).await;
    let ids: Vec<ProfileId> = (0..7).map(|i| anon(&format!("p{i}"))).collect();
    for id in &ids {
        old.apply(&[orders(id, 2)]).await.unwrap();
    }
    // A member by hand that is no profile id leaves too.
    let _: () = conn
        .zadd("segment:{buyers}:members", "junk", ms(T0))
        .await
        .unwrap();
    let (_, last) = transitions_after(&mut conn, "0").await;

    let after = segments(BIG_2);
    let new = redis.profiles(&after).await;
    let mut rebuild = new.rebuild().with_batches(1_000, 3);
    assert_eq!(
        rebuild.changes().await.unwrap(),
        Changes {
            removed: vec!["buyers".into()],
            ..Changes::default()
        }
    );
    let mut steps = Vec::new();
    loop {
        let step = rebuild.step(at(5)).await.unwrap();
        if step == Step::Current {
            break;
        }
        steps.push(step);
    }
    let removed = |exits, emptied| {
        Step::Removed(Removed {
            segment: "buyers".into(),
            exits,
            emptied,
        })
    };
    assert_eq!(
        steps,
        [
            removed(3, false),
            removed(3, false),
            removed(2, false),
            removed(0, true)
        ]
    );

    let mut exits = transitions_after(&mut conn, &last).await.0;
    exits.sort();
    let mut expected: Vec<Transition> = ids
        .iter()
        .map(|id| transition(id.as_str(), "buyers", "exit", at(5), "removed"))
        .collect();
    expected.push(transition("junk", "buyers", "exit", at(5), "removed"));
    expected.sort();
    assert_eq!(exits, expected);
    assert!(!exists(&mut conn, "segment:{buyers}:members").await);
    for id in &ids {
        assert_eq!(
            memberships(&mut conn, id).await,
            BTreeMap::from([("big".into(), ms(T0))]),
            "{id}"
        );
    }
    // No walk was needed: "big" did not change.
    assert_eq!(schedule(&mut conn).await, []);
    assert_eq!(record(&mut conn).await, recorded(&after));
    assert_eq!(progress(&mut conn).await, BTreeMap::new());
    assert!(!exists(&mut conn, "meta:{segments}:rebuild_lease").await);
}

#[tokio::test]
async fn an_unchanged_configuration_at_restart_triggers_no_rebuild() {
    let redis = RedisServer::start().unwrap();
    let mut conn = redis.connection().await;
    let config = format!("{BIG_2}{CART_30M}");
    let first = redis.profiles(&segments(&config)).await;
    first
        .apply(&[update(&anon("p"), vec![ev(1, EventKind::CartAdd, T0)])])
        .await
        .unwrap();
    finish(&mut first.rebuild(), T0).await;
    let before = (
        transitions(&mut conn).await,
        schedule(&mut conn).await,
        record(&mut conn).await,
    );

    // Restarted with the same definitions in another order, one with a new description.
    let same = segments(&format!(
        "{CART_30M}\n[[segments]]\nname = \"big\"\ndescription = \"Two orders\"\ncondition = {{ metric = {{ field = \"orders\", at_least = 2 }} }}\n"
    ));
    let restarted = redis.profiles(&same).await;
    let mut rebuild = restarted.rebuild();
    assert_eq!(rebuild.target(), first.rebuild().target());
    assert!(rebuild.changes().await.unwrap().is_empty());
    assert_eq!(rebuild.step(at(45)).await.unwrap(), Step::Current);
    assert_eq!(
        (
            transitions(&mut conn).await,
            schedule(&mut conn).await,
            record(&mut conn).await,
        ),
        before
    );
    assert!(!exists(&mut conn, "meta:{segments}:rebuild").await);
    assert!(!exists(&mut conn, "meta:{segments}:rebuild_lease").await);
}

// ------------------------------------------------------------------ resuming

/// `n` profiles with 2 orders each, recorded under `before`.
async fn populated(redis: &RedisServer, before: &[Segment], n: usize) -> Vec<ProfileId> {
    let old = redis.profiles(before).await;
    finish(&mut old.rebuild(), T0).await;
    let ids: Vec<ProfileId> = (0..n).map(|i| anon(&format!("p{i:03}"))).collect();
    let updates: Vec<ProfileUpdate> = ids.iter().map(|id| orders(id, 2)).collect();
    for chunk in updates.chunks(50) {
        old.apply(chunk).await.unwrap();
    }
    ids
}

const VIP: &str = r#"
[[segments]]
name = "vip"
condition = { metric = { field = "orders", at_least = 2 } }
"#;

#[tokio::test]
async fn an_interrupted_rebuild_resumes_from_its_cursor_and_writes_each_transition_once() {
    const PROFILES: usize = 120;
    let redis = RedisServer::start().unwrap();
    let mut conn = redis.connection().await;
    let ids = populated(&redis, &segments(BIG_2), PROFILES).await;
    let (_, last) = transitions_after(&mut conn, "0").await;
    let after = segments(&format!("{BIG_2}{VIP}"));
    let new = redis.profiles(&after).await;
    let small = |r: Rebuild| {
        r.with_batches(40, 100)
            .with_lease(Duration::from_millis(300))
    };

    // A walks three pages and stops cleanly: B continues at once from A's cursor.
    let mut a = small(new.rebuild());
    let by_a = pages(&mut a, at(10), 3).await;
    let saved = progress(&mut conn).await;
    assert_eq!(saved["target"], a.target());
    assert_eq!(saved["profiles"], by_a.evaluated.to_string());
    assert_ne!(saved["cursor"], "0");
    a.release().await.unwrap();

    let mut b = small(new.rebuild());
    let step = b.step(at(11)).await.unwrap();
    let Step::Evaluated(Evaluated {
        evaluated,
        total_evaluated,
        ..
    }) = step
    else {
        panic!("B continues: {step:?}")
    };
    assert_eq!(total_evaluated, (by_a.evaluated + evaluated) as u64);
    let by_b = pages(&mut b, at(11), 2).await;
    let by_b_evaluated = evaluated + by_b.evaluated;
    // B dies holding the lease: C waits for it to end, then continues from B's cursor.
    let cursor = progress(&mut conn).await["cursor"].clone();
    drop(b);

    let mut c = small(new.rebuild());
    assert_eq!(c.step(at(12)).await.unwrap(), Step::Busy);
    assert_eq!(progress(&mut conn).await["cursor"], cursor, "C waits");
    tokio::time::sleep(Duration::from_millis(350)).await;
    let by_c = finish(&mut c, at(12)).await;

    assert!(by_a.evaluated > 0 && by_b_evaluated > 0 && by_c.evaluated > 0);
    assert_eq!(by_a.evaluated + by_b_evaluated + by_c.evaluated, PROFILES);
    // One enter per profile, at the time of the collector that walked its page.
    let mut written = transitions_after(&mut conn, &last).await.0;
    written.sort();
    let without_time: Vec<[&str; 4]> = written
        .iter()
        .map(|t| [&t[0], &t[1], &t[2], &t[4]].map(String::as_str))
        .collect();
    let expected: Vec<[&str; 4]> = ids
        .iter()
        .map(|id| [id.as_str(), "vip", "enter", "redefined"])
        .collect();
    assert_eq!(without_time, expected);
    let at_time = |t: OffsetDateTime| written.iter().filter(|w| w[3] == ms(t).to_string()).count();
    assert_eq!(
        [at_time(at(10)), at_time(at(11)), at_time(at(12))],
        [by_a.evaluated, by_b_evaluated, by_c.evaluated]
    );
    assert_eq!(members(&mut conn, "vip").await.len(), PROFILES);
    assert_eq!(record(&mut conn).await, recorded(&after));
    assert_eq!(progress(&mut conn).await, BTreeMap::new());
}

#[tokio::test]
async fn definitions_changed_again_midway_start_the_rebuild_over() {
    const PROFILES: usize = 60;
    let redis = RedisServer::start().unwrap();
    let mut conn = redis.connection().await;
    populated(&redis, &segments(BIG_2), PROFILES).await;
    let second = redis.profiles(&segments(&format!("{BIG_2}{VIP}"))).await;
    let third_defs = segments(&format!(
        "{BIG_2}\n[[segments]]\nname = \"vip\"\ncondition = {{ metric = {{ field = \"orders\", at_least = 3 }} }}\n"
    ));
    let third = redis.profiles(&third_defs).await;

    let mut a = second.rebuild().with_batches(40, 100);
    let by_a = pages(&mut a, at(10), 2).await;
    assert!(by_a.evaluated > 0);

    // A collector with other definitions starts: it discards A's progress, and waits for
    // A's lease.
    let mut b = third.rebuild().with_batches(40, 100);
    assert_ne!(a.target(), b.target());
    assert_eq!(b.step(at(11)).await.unwrap(), Step::Busy);
    assert_eq!(progress(&mut conn).await, BTreeMap::new());
    // A learns it at its next step, and stops.
    assert_eq!(a.step(at(11)).await.unwrap(), Step::Restarted);
    a.release().await.unwrap();

    // B walks every profile from the start, and records its definitions.
    let by_b = finish(&mut b, at(12)).await;
    assert_eq!(by_b.evaluated, PROFILES);
    assert_eq!(record(&mut conn).await, recorded(&third_defs));
    // A's walk put some profiles into vip (2 orders); B's took them out again.
    let vip = transitions(&mut conn).await;
    let vip: Vec<&Transition> = vip.iter().filter(|t| t[1] == "vip").collect();
    assert_eq!(vip.len(), 2 * by_a.changes as usize);
    assert_eq!(by_b.changes, by_a.changes);
    assert_eq!(members(&mut conn, "vip").await, []);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_collectors_starting_at_once_do_not_both_rebuild() {
    const PROFILES: usize = 150;
    let redis = RedisServer::start().unwrap();
    let mut conn = redis.connection().await;
    let ids = populated(&redis, &segments(BIG_2), PROFILES).await;
    let (_, last) = transitions_after(&mut conn, "0").await;
    let after = segments(&format!("{BIG_2}{VIP}"));
    let (x, y) = (redis.profiles(&after).await, redis.profiles(&after).await);

    async fn collector(store: RedisProfiles) -> Tally {
        let mut rebuild = store.rebuild().with_batches(40, 100);
        let mut tally = Tally::default();
        for _ in 0..1_000 {
            let step = rebuild.step(at(10)).await.unwrap();
            if step == Step::Current {
                return tally;
            }
            tally.add(&step);
            if step == Step::Busy {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        panic!("no end: {tally:?}");
    }
    let (by_x, by_y) = tokio::join!(tokio::spawn(collector(x)), tokio::spawn(collector(y)));
    let (by_x, by_y) = (by_x.unwrap(), by_y.unwrap());
    assert!(
        (by_x.pages > 0) != (by_y.pages > 0),
        "exactly one rebuilds: {by_x:?} {by_y:?}"
    );
    assert_eq!(by_x.evaluated + by_y.evaluated, PROFILES);
    assert_eq!(by_x.changes + by_y.changes, PROFILES as u64);
    let mut written = transitions_after(&mut conn, &last).await.0;
    written.sort();
    let expected: Vec<Transition> = ids
        .iter()
        .map(|id| transition(id.as_str(), "vip", "enter", at(10), "redefined"))
        .collect();
    assert_eq!(written, expected);
}

// ------------------------------------------------------------------ races

#[tokio::test]
async fn an_update_between_the_claim_and_the_evaluation_is_not_undone() {
    let redis = RedisServer::start().unwrap();
    let mut conn = redis.connection().await;
    let old = redis.profiles(&segments(BIG_2)).await;
    finish(&mut old.rebuild(), T0).await;
    let (p, q) = (anon("p"), anon("q"));
    for id in [&p, &q] {
        old.apply(&[update(id, vec![ev(1, EventKind::CartAdd, T0)])])
            .await
            .unwrap();
    }
    let new = redis
        .profiles(&segments(&format!("{BIG_2}{CART_30M}")))
        .await;

    // The rebuild claims its page a second before the cart turns 30 minutes old...
    let now = at(30) - time::Duration::SECOND;
    let claims = new
        .claim(&[p.clone(), q.clone()], now, LEASE)
        .await
        .unwrap();
    assert_eq!(
        schedule(&mut conn).await,
        [
            ("a:p".into(), ms(now) + 60_000),
            ("a:q".into(), ms(now) + 60_000)
        ]
    );
    // ...p is updated at 30 minutes (a collector with the new definitions), and enters...
    new.apply(&[update(&p, vec![ev(2, EventKind::Page, at(30))])])
        .await
        .unwrap();
    // ...and the rebuild's evaluation, a second behind, leaves p alone. q, not updated, is
    // evaluated: not a member yet, which is what p would have been made again.
    let outcomes = new
        .evaluate_claimed_because(&claims, now, Reason::Redefined)
        .await
        .unwrap();
    assert!(
        matches!(
            outcomes[..],
            [
                Ok(Outcome::Superseded),
                Ok(Outcome::Evaluated { changes: 0 })
            ]
        ),
        "{outcomes:?}"
    );
    assert_eq!(
        transitions(&mut conn).await,
        [transition("a:p", "cart", "enter", at(30), "event")]
    );
    assert_eq!(
        members(&mut conn, "cart").await,
        [("a:p".into(), ms(at(30)))]
    );
    // q's deadline is its cart's 30 minutes; p has none left.
    assert_eq!(schedule(&mut conn).await, [("a:q".into(), ms(at(30)))]);
}

#[tokio::test]
async fn updates_between_steps_are_evaluated_with_the_new_definitions_and_kept() {
    const PROFILES: usize = 80;
    let redis = RedisServer::start().unwrap();
    let mut conn = redis.connection().await;
    let ids = populated(&redis, &segments(BIG_2), PROFILES).await;
    let (_, last) = transitions_after(&mut conn, "0").await;
    let stricter = segments(
        "[[segments]]\nname = \"big\"\ncondition = { metric = { field = \"orders\", at_least = 3 } }\n",
    );
    let new = redis.profiles(&stricter).await;
    let mut rebuild = new.rebuild().with_batches(30, 100);
    // Between steps, every tenth profile orders a third time: collectors keep serving.
    let mut tally = Tally::default();
    let mut ordered = ids.iter().step_by(10);
    for step_no in 0.. {
        let step = rebuild.step(at(10 + step_no)).await.unwrap();
        if step == Step::Current {
            break;
        }
        tally.add(&step);
        if let Some(id) = ordered.next() {
            let u = update(id, vec![ev(3, EventKind::OrderCompleted, at(10 + step_no))]);
            new.apply(&[u]).await.unwrap();
        }
    }
    for id in ordered {
        let u = update(id, vec![ev(3, EventKind::OrderCompleted, at(100))]);
        new.apply(&[u]).await.unwrap();
    }
    assert_eq!(tally.evaluated, PROFILES);

    // Whichever came first for a profile, the update or its page, it ends as the new
    // definition says: members with three orders, and nobody else.
    let third: Vec<&str> = ids.iter().step_by(10).map(ProfileId::as_str).collect();
    let mut now_members: Vec<String> = members(&mut conn, "big")
        .await
        .into_iter()
        .map(|(m, _)| m)
        .collect();
    now_members.sort();
    assert_eq!(now_members, third);
    // The others left once, for the redefinition; a profile with a third order either
    // stayed (its update came first) or left and came back with its order.
    let written = transitions_after(&mut conn, &last).await.0;
    for id in &ids {
        let mine: Vec<(&str, &str)> = written
            .iter()
            .filter(|t| t[0] == id.as_str())
            .map(|t| (t[2].as_str(), t[4].as_str()))
            .collect();
        if third.contains(&id.as_str()) {
            assert!(
                mine.is_empty() || mine == [("exit", "redefined"), ("enter", "event")],
                "{id}: {mine:?}"
            );
        } else {
            assert_eq!(mine, [("exit", "redefined")], "{id}");
        }
    }
}

#[tokio::test]
async fn a_profile_claimed_by_a_scheduler_is_taken_over_and_evaluated_once() {
    let redis = RedisServer::start().unwrap();
    let mut conn = redis.connection().await;
    let before = segments(CART_30M);
    let old = redis.profiles(&before).await;
    finish(&mut old.rebuild(), T0).await;
    old.apply(&[update(&anon("p"), vec![ev(1, EventKind::CartAdd, T0)])])
        .await
        .unwrap();
    let new = redis
        .profiles(&segments(&format!("{CART_30M}{BIG_2}")))
        .await;

    // A scheduler claims p at its deadline; the rebuild's page takes p over and evaluates
    // it; the scheduler's evaluation then writes nothing.
    let scheduled = new.claim_due(at(30), LEASE, 10).await.unwrap();
    assert_eq!(scheduled.claims.len(), 1);
    let tally = finish(&mut new.rebuild(), at(30)).await;
    assert_eq!((tally.evaluated, tally.changes), (1, 1));
    let late = new
        .evaluate_claimed(&scheduled.claims, at(30))
        .await
        .unwrap();
    assert!(matches!(late[..], [Ok(Outcome::Superseded)]), "{late:?}");
    assert_eq!(
        transitions(&mut conn).await,
        [transition("a:p", "cart", "enter", at(30), "redefined")]
    );
    assert_eq!(schedule(&mut conn).await, []);
}

#[tokio::test]
async fn the_target_is_the_fingerprint_of_the_whole_set() {
    let redis = RedisServer::start().unwrap();
    let defs = segments(&format!("{BIG_2}{CART_30M}"));
    let s = redis.profiles(&defs).await;
    let fingerprints: Vec<(String, String)> = defs
        .iter()
        .map(|d| (d.name.clone(), d.fingerprint().unwrap()))
        .collect();
    assert_eq!(
        s.rebuild().target(),
        fingerprint_all(fingerprints.iter().map(|(n, f)| (n.as_str(), f.as_str())))
    );
}
