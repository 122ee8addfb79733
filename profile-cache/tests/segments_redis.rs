//! Segments evaluated by the apply script against real, throwaway redis-server processes:
//! every condition type entering and leaving through `apply`, the membership keys, the
//! transition stream, the deadline schedule, window buckets, the scheduler's claims and its
//! evaluations at deadlines (leases, concurrent schedulers, updates racing a claim), and a
//! property test that the script, updated and evaluated at each deadline, agrees with the
//! reference evaluator (`Predicate::evaluate`). Time comes from the events (`received_at`
//! is the script's `now`) or the claims' `now`, never from the wall clock.

use std::collections::{BTreeMap, BTreeSet};

use profile_cache::segments::{DEMO_SEGMENTS, Metric, Predicate, Segment, SegmentInput, TimeField};
use profile_cache::testing::{RedisServer, segments};
use profile_cache::{
    ApplyReport, ConsentChange, ConsentMask, Context, Event, EventKind, Item, Outcome, Profile,
    ProfileId, ProfileUpdate, Purpose, RedisProfiles, SegmentMembership, StoreError, Value,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use time::OffsetDateTime;
use time::macros::datetime;
use uuid::Uuid;

/// On the hour, so window buckets line up with the times below.
const NOW: OffsetDateTime = datetime!(2026-11-29 12:00:00 UTC);

fn minutes(n: i64) -> time::Duration {
    time::Duration::minutes(n)
}

fn ms(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

fn from_ms(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap()
}

/// The lease of the tests' claims.
const LEASE: std::time::Duration = std::time::Duration::from_secs(60);

fn anon(id: &str) -> ProfileId {
    ProfileId::anonymous(id).unwrap()
}

/// An event `minutes_ago` before `at`, received at `at`.
fn ev(n: u128, kind: EventKind, at: OffsetDateTime, minutes_ago: i64) -> Event {
    Event {
        message_id: Uuid::from_u128(n),
        kind,
        name: None,
        timestamp: at - minutes(minutes_ago),
        received_at: at,
        properties: vec![],
        items: vec![],
        user_id: None,
        previous_id: None,
        order_id: None,
        revenue: 0,
        currency: None,
        consent: None,
        purpose: Purpose::Analytics,
    }
}

fn item(product: &str, category: Option<&str>) -> Item {
    Item {
        product_id: product.into(),
        category: category.map(String::from),
        price: 1_000,
        quantity: 1,
        name: None,
    }
}

fn with_items(mut e: Event, items: Vec<Item>) -> Event {
    e.items = items;
    e
}

fn update(profile: &ProfileId, events: Vec<Event>) -> ProfileUpdate {
    ProfileUpdate {
        profile: profile.clone(),
        anonymous_id: profile.as_str().strip_prefix("a:").map(String::from),
        user_id: None,
        context: Context {
            session_id: Some("s1".into()),
            ..Context::default()
        },
        events,
    }
}

/// One `stream:transitions` entry's fields, in order.
type Transition = Vec<(String, String)>;

fn transition(profile: &str, segment: &str, change: &str, at: OffsetDateTime) -> Transition {
    transition_because(profile, segment, change, at, "event")
}

/// A transition written for `reason`: `event` (an update) or `deadline` (an evaluation).
fn transition_because(
    profile: &str,
    segment: &str,
    change: &str,
    at: OffsetDateTime,
    reason: &str,
) -> Transition {
    [
        ("profile", profile.to_string()),
        ("segment", segment.to_string()),
        ("change", change.to_string()),
        ("at", ms(at).to_string()),
        ("reason", reason.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The entries of `stream:transitions` after entry id `after` ("0" for all), and the last id.
async fn transitions_after(
    conn: &mut MultiplexedConnection,
    after: &str,
) -> (Vec<Transition>, String) {
    let entries: Vec<(String, Transition)> = redis::cmd("XRANGE")
        .arg("stream:transitions")
        .arg(format!("({after}"))
        .arg("+")
        .query_async(conn)
        .await
        .unwrap();
    let last = entries
        .last()
        .map_or_else(|| after.to_string(), |(id, _)| id.clone());
    (entries.into_iter().map(|(_, t)| t).collect(), last)
}

async fn transitions(conn: &mut MultiplexedConnection) -> Vec<Transition> {
    transitions_after(conn, "0").await.0
}

/// `profile:{ID}:segments`: segment to entered-at.
async fn memberships(conn: &mut MultiplexedConnection, id: &ProfileId) -> BTreeMap<String, i64> {
    conn.hgetall(format!("profile:{{{id}}}:segments"))
        .await
        .unwrap()
}

async fn members(conn: &mut MultiplexedConnection, segment: &str) -> Vec<(String, i64)> {
    conn.zrange_withscores(format!("segment:{{{segment}}}:members"), 0, -1)
        .await
        .unwrap()
}

async fn deadline(conn: &mut MultiplexedConnection, id: &ProfileId) -> Option<i64> {
    conn.zscore("schedule:deadlines", id.as_str())
        .await
        .unwrap()
}

// ------------------------------------------------------------------ each condition type

/// One segment, and batches received at the given minutes after NOW, each followed by the
/// membership it should leave.
struct Case {
    condition: &'static str,
    steps: Vec<(i64, Vec<Event>, bool)>,
}

fn case(condition: &'static str, steps: Vec<(i64, Vec<Event>, bool)>) -> Case {
    Case { condition, steps }
}

fn at(minute: i64) -> OffsetDateTime {
    NOW + minutes(minute)
}

fn identify(n: u128, minute: i64, plan: &str) -> Event {
    let mut e = ev(n, EventKind::Identify, at(minute), 0);
    e.properties = vec![("plan".into(), Value::String(plan.into()))];
    e
}

fn consent(n: u128, minute: i64, granted: bool) -> Event {
    let mut e = ev(n, EventKind::ConsentChange, at(minute), 0);
    let marketing = ConsentMask(Purpose::Marketing.bit());
    e.consent = Some(if granted {
        ConsentChange {
            granted: marketing,
            denied: ConsentMask(0),
        }
    } else {
        ConsentChange {
            granted: ConsentMask(0),
            denied: marketing,
        }
    });
    e
}

fn kind(n: u128, kind: EventKind, minute: i64) -> Event {
    ev(n, kind, at(minute), 0)
}

fn shoe_view(n: u128, minute: i64) -> Event {
    with_items(
        kind(n, EventKind::ProductViewed, minute),
        vec![item("sku-1", Some("shoes"))],
    )
}

fn cart(n: u128, k: EventKind, minute: i64, minutes_ago: i64) -> Event {
    with_items(ev(n, k, at(minute), minutes_ago), vec![item("sku-1", None)])
}

const DAY: i64 = 24 * 60;

fn cases() -> Vec<Case> {
    use EventKind::*;
    let track = |n, minute| {
        let mut e = kind(n, Track, minute);
        e.name = Some("Signed Up".into());
        e
    };
    vec![
        case(
            r#"{ metric = { field = "orders", at_least = 2 } }"#,
            vec![
                (0, vec![kind(1, OrderCompleted, 0)], false),
                (1, vec![kind(2, OrderCompleted, 1)], true),
            ],
        ),
        case(
            r#"{ metric = { field = "page_views", at_most = 1 } }"#,
            vec![
                (0, vec![kind(1, Page, 0)], true),
                (1, vec![kind(2, Page, 1)], false),
            ],
        ),
        case(
            r#"{ event_count = { event = "Signed Up", at_least = 1, at_most = 1 } }"#,
            vec![
                (0, vec![kind(1, Page, 0)], false),
                (1, vec![track(2, 1)], true),
                (2, vec![track(3, 2)], false),
            ],
        ),
        case(
            r#"{ event_count = { event = "product_viewed", category = "shoes", within = "2h", at_least = 2 } }"#,
            vec![
                (0, vec![shoe_view(1, 0)], false),
                (10, vec![shoe_view(2, 10)], true),
                // The 12:00 bucket leaves the 2-hour window at 14:00.
                (120, vec![kind(3, Page, 120)], false),
            ],
        ),
        case(
            r#"{ trait = { name = "plan", in = ["pro", "team"] } }"#,
            vec![
                (0, vec![identify(1, 0, "pro")], true),
                (1, vec![identify(2, 1, "free")], false),
            ],
        ),
        case(
            r#"{ trait = { name = "plan", exists = false } }"#,
            vec![
                (0, vec![kind(1, Page, 0)], true),
                (1, vec![identify(2, 1, "free")], false),
            ],
        ),
        case(
            r#"{ lifecycle = "new" }"#,
            vec![
                (0, vec![kind(1, Page, 0)], true),
                (15 * DAY, vec![kind(2, Page, 15 * DAY)], false),
            ],
        ),
        case(
            r#"{ lifecycle = "active" }"#,
            vec![
                (0, vec![kind(1, Page, 0)], false),
                (15 * DAY, vec![kind(2, Page, 15 * DAY)], true),
            ],
        ),
        case(
            r#"{ within = { field = "last_order_at", duration = "7d" } }"#,
            vec![
                (0, vec![kind(1, OrderCompleted, 0)], true),
                (7 * DAY, vec![kind(2, Page, 7 * DAY)], false),
            ],
        ),
        case(
            r#"{ older_than = { field = "first_seen", duration = "1h" } }"#,
            vec![
                (0, vec![kind(1, Page, 0)], false),
                (60, vec![kind(2, Page, 60)], true),
            ],
        ),
        case(
            r#"{ cart = "not_empty" }"#,
            vec![
                (0, vec![cart(1, CartAdd, 0, 0)], true),
                (1, vec![cart(2, CartRemove, 1, 0)], false),
            ],
        ),
        case(
            r#"{ cart = "empty" }"#,
            vec![
                (0, vec![cart(1, CartAdd, 0, 0)], false),
                (1, vec![kind(2, OrderCompleted, 1)], true),
            ],
        ),
        case(
            r#"{ no_order_since = "cart_updated_at" }"#,
            vec![
                (0, vec![cart(1, CartAdd, 0, 0)], true),
                (1, vec![kind(2, OrderCompleted, 1)], false),
            ],
        ),
        case(
            r#"{ consent_granted = "marketing" }"#,
            vec![
                (0, vec![consent(1, 0, true)], true),
                (1, vec![consent(2, 1, false)], false),
            ],
        ),
        case(
            r#"{ any = [
                { not = { consent_granted = "marketing" } },
                { metric = { field = "email_opens", at_least = 1 } },
            ] }"#,
            vec![
                (0, vec![consent(1, 0, true)], false),
                (1, vec![kind(2, EmailOpened, 1)], true),
            ],
        ),
        // A cart left 40 minutes before it reached us: in at once; an order takes it out.
        case(
            r#"{ all = [
                { cart = "not_empty" },
                { older_than = { field = "cart_updated_at", duration = "30m" } },
                { no_order_since = "cart_updated_at" },
            ] }"#,
            vec![
                (0, vec![cart(1, CartAdd, 0, 40)], true),
                (5, vec![kind(2, OrderCompleted, 5)], false),
            ],
        ),
    ]
}

#[tokio::test]
async fn each_condition_type_enters_and_exits_through_apply() {
    let redis = RedisServer::start().unwrap();
    let mut conn = redis.connection().await;
    for (i, c) in cases().into_iter().enumerate() {
        let s = segments(&format!(
            "[[segments]]\nname = \"s{i}\"\ncondition = {}\n",
            c.condition
        ));
        let name = &s[0].name;
        let profiles = redis.profiles(&s).await;
        let id = anon(&format!("case-{i}"));
        let mut expected = Vec::new();
        let mut member = false;
        let mut entered = None;
        for (minute, events, now_member) in c.steps {
            profiles.apply(&[update(&id, events)]).await.unwrap();
            if now_member != member {
                let change = if now_member { "enter" } else { "exit" };
                expected.push(transition(id.as_str(), name, change, at(minute)));
                entered = now_member.then(|| ms(at(minute)));
            }
            member = now_member;
            let stored = memberships(&mut conn, &id).await;
            let want: BTreeMap<String, i64> =
                entered.map(|t| (name.clone(), t)).into_iter().collect();
            assert_eq!(stored, want, "{} at minute {minute}", c.condition);
        }
        let mine: Vec<Transition> = transitions(&mut conn)
            .await
            .into_iter()
            .filter(|t| t[0].1 == id.as_str())
            .collect();
        assert_eq!(mine, expected, "{}", c.condition);
        let set = members(&mut conn, name).await;
        let want: Vec<(String, i64)> = entered.map(|t| (id.to_string(), t)).into_iter().collect();
        assert_eq!(set, want, "{}", c.condition);
    }
}

// ------------------------------------------------------------------ keys, retries, deadlines

const ABANDONERS: &str = r#"
[[segments]]
name = "cart_abandoners_30m"
condition = { all = [
  { cart = "not_empty" },
  { older_than = { field = "cart_updated_at", duration = "30m" } },
  { no_order_since = "cart_updated_at" },
] }

[[segments]]
name = "shoe_browsers"
condition = { event_count = { event = "product_viewed", category = "shoes", within = "24h", at_least = 2 } }
"#;

#[tokio::test]
async fn a_retried_batch_changes_no_membership_and_writes_no_transition() {
    let redis = RedisServer::start().unwrap();
    let store = redis.profiles(&segments(ABANDONERS)).await;
    let mut conn = redis.connection().await;
    let id = anon("v1");
    let batch = update(
        &id,
        vec![
            shoe_view(1, 0),
            shoe_view(2, 0),
            cart(3, EventKind::CartAdd, 0, 45),
        ],
    );
    assert_eq!(
        store.apply(std::slice::from_ref(&batch)).await.unwrap(),
        ApplyReport {
            applied: 3,
            duplicates: 0,
            ..ApplyReport::default()
        }
    );
    let entries = transitions(&mut conn).await;
    assert_eq!(
        entries,
        [
            transition("a:v1", "cart_abandoners_30m", "enter", NOW),
            transition("a:v1", "shoe_browsers", "enter", NOW),
        ]
    );
    let before = (
        memberships(&mut conn, &id).await,
        members(&mut conn, "cart_abandoners_30m").await,
        members(&mut conn, "shoe_browsers").await,
        deadline(&mut conn, &id).await,
    );
    // The shoe views' bucket (12:00) leaves the 24-hour window at 12:00 tomorrow.
    assert_eq!(before.3, Some(ms(NOW + time::Duration::days(1))));

    // The same batch again, received an hour later (a retry after a lost answer).
    let mut retry = batch.clone();
    for e in &mut retry.events {
        e.received_at = at(60);
    }
    assert_eq!(
        store.apply(&[retry]).await.unwrap(),
        ApplyReport {
            applied: 0,
            duplicates: 3,
            ..ApplyReport::default()
        }
    );
    let after = (
        memberships(&mut conn, &id).await,
        members(&mut conn, "cart_abandoners_30m").await,
        members(&mut conn, "shoe_browsers").await,
        deadline(&mut conn, &id).await,
    );
    assert_eq!(after, before);
    assert_eq!(transitions(&mut conn).await.len(), 2);
}

#[tokio::test]
async fn the_deadline_is_the_next_time_a_membership_can_change() {
    let redis = RedisServer::start().unwrap();
    let store = redis.profiles(&segments(ABANDONERS)).await;
    let mut conn = redis.connection().await;
    let id = anon("v2");
    // A cart change 10 minutes before it reached us: abandoned 20 minutes from now.
    store
        .apply(&[update(&id, vec![cart(1, EventKind::CartAdd, 0, 10)])])
        .await
        .unwrap();
    assert_eq!(deadline(&mut conn, &id).await, Some(ms(at(20))));
    // One view of shoes is not two: the cart's 30 minutes stay the next deadline.
    store
        .apply(&[update(&id, vec![shoe_view(2, 5)])])
        .await
        .unwrap();
    assert_eq!(deadline(&mut conn, &id).await, Some(ms(at(20))));
    // The order ends the cart's clock, and one view never reaches two: nothing to wait for.
    store
        .apply(&[update(&id, vec![kind(3, EventKind::OrderCompleted, 6)])])
        .await
        .unwrap();
    assert_eq!(deadline(&mut conn, &id).await, None);
    let scheduled: Vec<String> = conn.zrange("schedule:deadlines", 0, -1).await.unwrap();
    assert_eq!(scheduled, Vec::<String>::new());
    assert_eq!(transitions(&mut conn).await, Vec::<Transition>::new());
}

#[tokio::test]
async fn windows_keep_buckets_of_the_counted_pairs_within_the_longest_window() {
    let redis = RedisServer::start().unwrap();
    let toml = r#"
        [[segments]]
        name = "shoe_browsers"
        condition = { event_count = { event = "product_viewed", category = "shoes", within = "24h", at_least = 3 } }
        [[segments]]
        name = "clickers"
        condition = { event_count = { event = "email_clicked", within = "2h", at_least = 1 } }
    "#;
    let store = redis.profiles(&segments(toml)).await;
    let mut conn = redis.connection().await;
    let id = anon("v3");
    let hour = NOW.unix_timestamp() / 3_600;
    let views = vec![
        with_items(
            kind(1, EventKind::ProductViewed, 0),
            vec![
                item("a", Some("shoes")),
                item("b", Some("shoes")),
                item("c", Some("socks")),
            ],
        ),
        with_items(
            ev(2, EventKind::ProductViewed, at(0), 90),
            vec![item("a", Some("shoes"))],
        ),
        kind(3, EventKind::EmailClicked, 0),
        kind(4, EventKind::EmailOpened, 0),
        kind(5, EventKind::Page, 0),
        // Arrived a day late: its bucket has left every window already.
        with_items(
            ev(8, EventKind::ProductViewed, at(0), DAY),
            vec![item("a", Some("shoes"))],
        ),
    ];
    store.apply(&[update(&id, views)]).await.unwrap();
    let windows: BTreeMap<String, String> = conn.hgetall("profile:{a:v3}:windows").await.unwrap();
    let field = |h: i64, rest: &str| format!("[{h}{rest}");
    assert_eq!(
        windows,
        BTreeMap::from([
            // An event with two shoes counts once; socks and pages are counted by no segment.
            // The late view is not kept.
            (
                field(hour, r#","product_viewed","shoes"]"#),
                "1".to_string()
            ),
            (
                field(hour - 2, r#","product_viewed","shoes"]"#),
                "1".to_string()
            ),
            (field(hour, r#","email_clicked"]"#), "1".to_string()),
        ])
    );
    // At 10:00 the next day the 10:00 bucket leaves the longest window (24 hours) and is
    // dropped; at 12:00 the 12:00 buckets are.
    store
        .apply(&[update(&id, vec![shoe_view(6, DAY - 120)])])
        .await
        .unwrap();
    let windows: BTreeMap<String, String> = conn.hgetall("profile:{a:v3}:windows").await.unwrap();
    let kept: Vec<&String> = windows.keys().collect();
    assert_eq!(
        kept,
        [
            &field(hour, r#","email_clicked"]"#),
            &field(hour, r#","product_viewed","shoes"]"#),
            &field(hour + 22, r#","product_viewed","shoes"]"#),
        ]
    );
    store
        .apply(&[update(&id, vec![kind(7, EventKind::Page, DAY)])])
        .await
        .unwrap();
    let windows: BTreeMap<String, String> = conn.hgetall("profile:{a:v3}:windows").await.unwrap();
    assert_eq!(
        windows,
        BTreeMap::from([(
            field(hour + 22, r#","product_viewed","shoes"]"#),
            "1".to_string()
        )])
    );
}

#[tokio::test]
async fn profile_reads_list_segments_with_their_entry_times() {
    let redis = RedisServer::start().unwrap();
    let store = redis.profiles(&segments(DEMO_SEGMENTS)).await;
    let id = anon("v4");
    let mut order = with_items(
        kind(1, EventKind::OrderCompleted, 0),
        vec![item("sku-1", Some("shoes"))],
    );
    order.revenue = 60_000;
    store.apply(&[update(&id, vec![order])]).await.unwrap();
    store
        .apply(&[update(&id, vec![cart(2, EventKind::CartAdd, 45, 30)])])
        .await
        .unwrap();
    let p: Profile = store.profile(&id, at(45)).await.unwrap().unwrap();
    let entered = |name: &str, t| SegmentMembership {
        name: name.into(),
        entered_at: t,
    };
    // The cart was changed after the order, 30 minutes before the collector received it:
    // abandoned already.
    assert_eq!(
        p.segments,
        [
            entered("cart_abandoners_30m", at(45)),
            entered("high_value", NOW),
            entered("lifecycle_new", NOW),
            entered("recent_buyers", NOW),
        ]
    );
}

#[tokio::test]
async fn bad_segment_data_is_named_and_nothing_is_written() {
    let redis = RedisServer::start().unwrap();
    let store = redis.profiles(&segments(ABANDONERS)).await;
    let mut conn = redis.connection().await;
    let id = anon("v5");
    let corrupt = |err: StoreError| match err {
        StoreError::Corrupt { key, field, detail } => (key, field, detail),
        other => panic!("expected corrupt data, got {other:?}"),
    };
    let triple = |k: &str, f: &str, d: &str| (k.to_string(), f.to_string(), d.to_string());

    // A member set that is not a sorted set: found before anything is written.
    let _: () = conn
        .set("segment:{cart_abandoners_30m}:members", "x")
        .await
        .unwrap();
    let err = store
        .apply(&[update(&id, vec![cart(1, EventKind::CartAdd, 0, 45)])])
        .await
        .unwrap_err();
    assert_eq!(
        corrupt(err),
        triple(
            "segment:{cart_abandoners_30m}:members",
            "-",
            "is a string, expected a zset"
        )
    );
    let mut keys: Vec<String> = conn.keys("*").await.unwrap();
    keys.sort();
    assert_eq!(
        keys,
        [
            "meta:schema_version",
            "segment:{cart_abandoners_30m}:members"
        ]
    );
    let _: () = conn
        .del("segment:{cart_abandoners_30m}:members")
        .await
        .unwrap();

    let cases = [
        (
            "profile:{a:v5}:windows",
            "[1,\"x\"]",
            "many",
            "\"many\" is not a count",
        ),
        (
            "profile:{a:v5}:windows",
            "shoes",
            "1",
            "is not a bucket [hour,\"event\",\"category\"]",
        ),
        (
            "profile:{a:v5}:segments",
            "shoe_browsers",
            "soon",
            "\"soon\" is not a time",
        ),
    ];
    for (key, field, value, detail) in cases {
        let _: () = conn.hset(key, field, value).await.unwrap();
        let err = store
            .apply(&[update(&id, vec![kind(2, EventKind::Page, 0)])])
            .await
            .unwrap_err();
        assert_eq!(corrupt(err), triple(key, field, detail));
        let exists: bool = conn.exists("profile:{a:v5}").await.unwrap();
        assert!(!exists, "nothing was written");
        let _: () = conn.del(key).await.unwrap();
    }
    let err = store.profile(&id, NOW).await;
    assert!(matches!(err, Ok(None)), "{err:?}");
}

// ------------------------------------------------------------------ the script agrees with the reference

/// What a generated visitor does, `age` minutes before the batch reaches the collector.
#[derive(Debug, Clone)]
enum Act {
    Page,
    View(Option<&'static str>),
    Add(&'static str, Option<&'static str>),
    Remove(&'static str),
    Order(i64),
    Open,
    Click,
    Marketing(bool),
    Plan(&'static str),
    SignUp,
}

#[derive(Debug, Clone)]
struct Batch {
    /// Minutes since the previous batch was received.
    gap: i64,
    session: &'static str,
    /// Send the previous batch again instead (a retry).
    retry: bool,
    acts: Vec<(Act, i64)>,
}

fn act() -> impl Strategy<Value = Act> {
    let category = prop::option::of(prop::sample::select(vec!["shoes", "socks"]));
    let product = prop::sample::select(vec!["a", "b"]);
    prop_oneof![
        Just(Act::Page),
        category.clone().prop_map(Act::View),
        (product.clone(), category).prop_map(|(p, c)| Act::Add(p, c)),
        product.prop_map(Act::Remove),
        (0..3_i64).prop_map(Act::Order),
        Just(Act::Open),
        Just(Act::Click),
        any::<bool>().prop_map(Act::Marketing),
        prop::sample::select(vec!["pro", "free"]).prop_map(Act::Plan),
        Just(Act::SignUp),
    ]
}

fn batches() -> impl Strategy<Value = Vec<Batch>> {
    // Times in steps of 10 minutes, and durations from a few round ones, so that times
    // often fall exactly on a boundary.
    let batch = (
        0..216_i64,
        prop::sample::select(vec!["s1", "s2"]),
        prop::bool::weighted(0.15),
        prop::collection::vec((act(), 0..36_i64), 1..5),
    )
        .prop_map(|(gap, session, retry, acts)| Batch {
            gap: gap * 10,
            session,
            retry,
            acts: acts.into_iter().map(|(a, age)| (a, age * 10)).collect(),
        });
    prop::collection::vec(batch, 1..10)
}

fn time_field() -> impl Strategy<Value = TimeField> {
    prop::sample::select(vec![
        TimeField::FirstSeen,
        TimeField::LastSeen,
        TimeField::LastOrderAt,
        TimeField::LastEngagedAt,
        TimeField::CartUpdatedAt,
    ])
}

fn bounds() -> impl Strategy<Value = (Option<i64>, Option<i64>)> {
    (prop::option::of(0..4_i64), prop::option::of(0..4_i64))
        .prop_filter("a bound", |(min, max)| min.is_some() || max.is_some())
}

fn leaf() -> impl Strategy<Value = Predicate> {
    const MINUTE: i64 = 60_000;
    let duration =
        || prop::sample::select(vec![10, 30, 60, 120, 360, 1_440, 2_880]).prop_map(|m| m * MINUTE);
    let window_event = prop::sample::select(vec![
        ("product_viewed", true),
        ("cart_add", true),
        ("email_clicked", false),
        ("Signed Up", false),
    ]);
    prop_oneof![
        (time_field(), duration()).prop_map(|(field, ms)| Predicate::Within { field, ms }),
        (time_field(), duration()).prop_map(|(field, ms)| Predicate::OlderThan { field, ms }),
        (
            window_event,
            any::<bool>(),
            prop::sample::select(vec![1, 2, 3, 6, 24, 48]),
            bounds()
        )
            .prop_map(|((event, categories), shoes, hours, (min, max))| {
                Predicate::WindowCount {
                    event: event.into(),
                    category: (categories && shoes).then(|| "shoes".into()),
                    hours,
                    min,
                    max,
                }
            }),
        (
            prop::sample::select(vec!["Signed Up", "page", "order_completed"]),
            bounds()
        )
            .prop_map(|(event, (min, max))| Predicate::Count {
                event: event.into(),
                min,
                max,
            }),
        (
            prop::sample::select(vec![
                Metric::Events,
                Metric::PageViews,
                Metric::Sessions,
                Metric::Orders,
                Metric::Revenue,
                Metric::EmailOpens,
                Metric::EmailClicks,
            ]),
            bounds()
        )
            .prop_map(|(field, (min, max))| Predicate::Metric { field, min, max }),
        Just(Predicate::TraitIn {
            name: "plan".into(),
            values: vec!["pro".into()],
        }),
        Just(Predicate::TraitExists {
            name: "plan".into()
        }),
        Just(Predicate::CartNotEmpty),
        time_field()
            .prop_filter("not last_order_at", |f| *f != TimeField::LastOrderAt)
            .prop_map(|field| Predicate::NoOrderSince { field }),
        prop::sample::select(vec![Purpose::Marketing, Purpose::Necessary])
            .prop_map(|purpose| Predicate::ConsentGranted { purpose }),
    ]
}

fn predicate() -> impl Strategy<Value = Predicate> {
    leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 1..4).prop_map(|of| Predicate::All { of }),
            prop::collection::vec(inner.clone(), 1..4).prop_map(|of| Predicate::Any { of }),
            inner.prop_map(|p| Predicate::Not { of: Box::new(p) }),
        ]
    })
}

/// The demo segments, two that count by category, and a few random ones.
fn segment_set() -> impl Strategy<Value = Vec<Segment>> {
    prop::collection::vec(predicate(), 1..5).prop_map(|random| {
        let mut all = segments(DEMO_SEGMENTS);
        all.extend(segments(
            r#"
            [[segments]]
            name = "viewed-shoes-2h"
            condition = { event_count = { event = "product_viewed", category = "shoes", within = "2h", at_least = 1 } }
            [[segments]]
            name = "shoes-in-cart-6h"
            condition = { event_count = { event = "cart_add", category = "shoes", within = "6h", at_least = 2, at_most = 3 } }
            "#,
        ));
        all.extend(random.into_iter().enumerate().map(|(i, condition)| Segment {
            name: format!("random-{i}"),
            description: String::new(),
            condition,
        }));
        all
    })
}

/// The events of a batch received at `received`, numbered from `next_id`.
fn events(b: &Batch, received: OffsetDateTime, next_id: &mut u128) -> Vec<Event> {
    b.acts
        .iter()
        .map(|(act, age)| {
            *next_id += 1;
            let e = |k| ev(*next_id, k, received, *age);
            match act {
                Act::Page => e(EventKind::Page),
                Act::View(c) => with_items(e(EventKind::ProductViewed), vec![item("a", *c)]),
                Act::Add(p, c) => with_items(e(EventKind::CartAdd), vec![item(p, *c)]),
                Act::Remove(p) => with_items(e(EventKind::CartRemove), vec![item(p, None)]),
                Act::Order(revenue) => {
                    let mut o =
                        with_items(e(EventKind::OrderCompleted), vec![item("a", Some("shoes"))]);
                    o.revenue = *revenue;
                    o
                }
                Act::Open => e(EventKind::EmailOpened),
                Act::Click => e(EventKind::EmailClicked),
                Act::Marketing(granted) => {
                    let mut c = e(EventKind::ConsentChange);
                    let mask = ConsentMask(Purpose::Marketing.bit());
                    c.consent = Some(if *granted {
                        ConsentChange {
                            granted: mask,
                            denied: ConsentMask(0),
                        }
                    } else {
                        ConsentChange {
                            granted: ConsentMask(0),
                            denied: mask,
                        }
                    });
                    c
                }
                Act::Plan(plan) => {
                    let mut i = e(EventKind::Identify);
                    i.properties = vec![("plan".into(), Value::String((*plan).into()))];
                    i
                }
                Act::SignUp => {
                    let mut t = e(EventKind::Track);
                    t.name = Some("Signed Up".into());
                    t
                }
            }
        })
        .collect()
}

/// What the reference evaluator reads: the profile as read back, and window buckets
/// recorded from the events applied.
fn input(p: &Profile, applied: &[Event]) -> SegmentInput {
    let mut input = SegmentInput {
        first_seen: Some(p.first_seen),
        last_seen: Some(p.last_seen),
        last_order_at: p.last_order_at,
        last_engaged_at: p.last_engaged_at,
        cart_updated_at: p.cart_updated_at,
        events: p.events,
        page_views: p.page_views,
        sessions: p.sessions,
        orders: p.orders,
        revenue: p.revenue,
        email_opens: p.email_opens,
        email_clicks: p.email_clicks,
        counts: p.event_counts.clone(),
        traits: p.traits.clone(),
        cart_lines: p.cart.len(),
        consent: p.consent.iter().map(|(k, v)| (*k, v.status)).collect(),
        windows: BTreeMap::new(),
    };
    for e in applied {
        let name = match (e.kind, &e.name) {
            (EventKind::Track, Some(name)) => name.as_str(),
            (kind, _) => kind.as_str(),
        };
        let categories: Vec<&str> = e
            .items
            .iter()
            .filter_map(|i| i.category.as_deref())
            .collect();
        input.record(name, &categories, e.timestamp);
    }
    input
}

/// What the script should have written so far: memberships (segment to entered-at) and the
/// last transition read.
struct Written {
    members: BTreeMap<String, i64>,
    stream_id: String,
}

/// Applies the batches one by one and, between two batches, evaluates the profile at each
/// deadline the script scheduled before the next one, as the scheduler does (claim, then
/// evaluate at the deadline). After each call the memberships in Redis must be the
/// reference's at the call's `now`, the new transitions exactly the changes (reason `event`
/// or `deadline`), every key agree, and the deadline come after `now` and no later than the
/// reference's.
async fn agrees(
    redis: &RedisServer,
    segments: &[Segment],
    batches: &[Batch],
) -> Result<(), TestCaseError> {
    let mut conn = redis.connection().await;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    let store = redis.profiles(segments).await;
    let id = anon("p");
    let (mut received, mut next_id) = (NOW, 0_u128);
    let mut applied: Vec<Event> = Vec::new();
    let mut previous: Option<ProfileUpdate> = None;
    let mut written = Written {
        members: BTreeMap::new(),
        stream_id: "0".into(),
    };
    for b in batches {
        let next = received + minutes(b.gap);
        let mut rounds = 0;
        while let Some(due) = deadline(&mut conn, &id).await.filter(|&d| d < ms(next)) {
            rounds += 1;
            prop_assert!(rounds <= 200, "deadlines stopped advancing at {}", due);
            let at = from_ms(due);
            let claimed = store.claim_due(at, LEASE, 10).await.unwrap();
            prop_assert_eq!(claimed.claims.len(), 1);
            let outcomes = store.evaluate_claimed(&claimed.claims, at).await.unwrap();
            let changes = match outcomes[..] {
                [Ok(Outcome::Evaluated { changes })] => changes,
                _ => return Err(TestCaseError::fail(format!("{outcomes:?}"))),
            };
            let expected = check(
                &store,
                &mut conn,
                segments,
                &applied,
                at,
                "deadline",
                &mut written,
            )
            .await?;
            prop_assert_eq!(changes, expected);
        }
        received = next;
        let mut u = match (&previous, b.retry) {
            (Some(p), true) => p.clone(),
            _ => update(&id, events(b, received, &mut next_id)),
        };
        for e in &mut u.events {
            e.received_at = received;
        }
        u.context.session_id = Some(b.session.into());
        let report = store.apply(std::slice::from_ref(&u)).await.unwrap();
        if b.retry && previous.is_some() {
            prop_assert_eq!(report.applied, 0, "a retry applies nothing");
            let (new_transitions, _) = transitions_after(&mut conn, &written.stream_id).await;
            prop_assert_eq!(new_transitions, Vec::<Transition>::new());
        } else {
            prop_assert_eq!(report.applied as usize, u.events.len());
            applied.extend(u.events.iter().cloned());
            check(
                &store,
                &mut conn,
                segments,
                &applied,
                received,
                "event",
                &mut written,
            )
            .await?;
        }
        previous = Some(u);
    }
    Ok(())
}

/// Compares what Redis holds for profile `a:p` after a call at `now` with the reference
/// evaluation of the events `applied`, and updates `written`. Returns the number of changes.
async fn check(
    store: &RedisProfiles,
    conn: &mut MultiplexedConnection,
    segments: &[Segment],
    applied: &[Event],
    now: OffsetDateTime,
    reason: &str,
    written: &mut Written,
) -> Result<u64, TestCaseError> {
    let id = anon("p");
    let p = store.profile(&id, now).await.unwrap().unwrap();
    let reference = input(&p, applied);
    let (new_transitions, last) = transitions_after(conn, &written.stream_id).await;
    written.stream_id = last;
    let members = &mut written.members;
    let mut expected_transitions = Vec::new();
    let mut earliest: Option<i64> = None;
    for s in segments {
        let e = s.evaluate(&reference, now);
        if let Some(d) = e.deadline {
            earliest = Some(earliest.map_or(ms(d), |t: i64| t.min(ms(d))));
        }
        let change = match (e.member, members.contains_key(&s.name)) {
            (true, false) => {
                members.insert(s.name.clone(), ms(now));
                "enter"
            }
            (false, true) => {
                members.remove(&s.name);
                "exit"
            }
            _ => continue,
        };
        expected_transitions.push(transition_because("a:p", &s.name, change, now, reason));
    }
    prop_assert_eq!(&memberships(conn, &id).await, &*members);
    let changes = expected_transitions.len() as u64;
    prop_assert_eq!(new_transitions, expected_transitions);
    for s in segments {
        let set = self::members(conn, &s.name).await;
        let want: Vec<(String, i64)> = members
            .get(&s.name)
            .map(|t| ("a:p".to_string(), *t))
            .into_iter()
            .collect();
        prop_assert_eq!(set, want, "members of {}", s.name);
    }
    let listed: Vec<&str> = p.segments.iter().map(|m| m.name.as_str()).collect();
    prop_assert_eq!(
        listed,
        members.keys().map(String::as_str).collect::<Vec<_>>()
    );
    let scheduled = deadline(conn, &id).await;
    if let Some(t) = scheduled {
        prop_assert!(t > ms(now), "deadline {} not after now {}", t, ms(now));
    }
    if let Some(exact) = earliest {
        prop_assert!(
            scheduled.is_some_and(|t| t <= exact),
            "deadline {:?} later than the reference's {}",
            scheduled,
            exact
        );
    }
    Ok(changes)
}

#[test]
fn the_script_agrees_with_the_reference_evaluator() {
    let redis = RedisServer::start().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut runner = TestRunner::new(Config {
        cases: 256,
        ..Config::default()
    });
    let result = runner.run(&(segment_set(), batches()), |(segments, batches)| {
        runtime.block_on(agrees(&redis, &segments, &batches))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[tokio::test]
async fn window_fields_spell_event_names_as_json() {
    let name = r#"Viewed "A/B" \ test"#;
    let toml = format!(
        "[[segments]]\nname = \"quoted\"\ncondition = {{ event_count = {{ event = {:?}, within = \"1h\", at_least = 1 }} }}\n",
        name
    );
    let redis = RedisServer::start().unwrap();
    let store = redis.profiles(&segments(&toml)).await;
    let mut conn = redis.connection().await;
    let id = anon("q");
    let mut e = kind(1, EventKind::Track, 0);
    e.name = Some(name.into());
    store.apply(&[update(&id, vec![e])]).await.unwrap();
    let fields: BTreeSet<String> = conn.hkeys("profile:{a:q}:windows").await.unwrap();
    let hour = NOW.unix_timestamp() / 3_600;
    assert_eq!(
        fields,
        BTreeSet::from([format!(r#"[{hour},"Viewed \"A/B\" \\ test"]"#)])
    );
    assert_eq!(
        memberships(&mut conn, &id).await,
        BTreeMap::from([("quoted".to_string(), ms(NOW))])
    );
}

// ------------------------------------------------------------------ claims and deadlines

/// Claims what is due at `now` and evaluates it at `now`: one scheduler round.
async fn round(store: &RedisProfiles, now: OffsetDateTime) -> Vec<(String, Outcome)> {
    let claimed = store.claim_due(now, LEASE, 100).await.unwrap();
    let outcomes = store.evaluate_claimed(&claimed.claims, now).await.unwrap();
    claimed
        .claims
        .iter()
        .zip(outcomes)
        .map(|(c, o)| (c.profile().to_string(), o.unwrap()))
        .collect()
}

fn evaluated(profile: &str, changes: u64) -> (String, Outcome) {
    (profile.to_string(), Outcome::Evaluated { changes })
}

async fn schedule(conn: &mut MultiplexedConnection) -> Vec<(String, i64)> {
    conn.zrange_withscores("schedule:deadlines", 0, -1)
        .await
        .unwrap()
}

const CART_30M: &str = r#"
[[segments]]
name = "cart_abandoners_30m"
condition = { all = [
  { cart = "not_empty" },
  { older_than = { field = "cart_updated_at", duration = "30m" } },
  { no_order_since = "cart_updated_at" },
] }
"#;

#[tokio::test]
async fn a_due_profile_is_evaluated_at_its_deadline_with_reason_deadline() {
    let redis = RedisServer::start().unwrap();
    let store = redis.profiles(&segments(CART_30M)).await;
    let mut conn = redis.connection().await;
    let id = anon("v1");
    store
        .apply(&[update(&id, vec![cart(1, EventKind::CartAdd, 0, 0)])])
        .await
        .unwrap();
    assert_eq!(
        schedule(&mut conn).await,
        [("a:v1".to_string(), ms(at(30)))]
    );

    // A millisecond early: nothing is due, and the schedule says when something will be.
    let early = at(30) - time::Duration::milliseconds(1);
    let claimed = store.claim_due(early, LEASE, 100).await.unwrap();
    assert_eq!(claimed.claims, []);
    assert_eq!(claimed.next_due, Some(at(30)));

    let claimed = store.claim_due(at(30), LEASE, 100).await.unwrap();
    let [claim] = &claimed.claims[..] else {
        panic!("{claimed:?}")
    };
    assert_eq!(claim.profile(), "a:v1");
    assert_eq!(claim.until(), at(31));
    assert_eq!(
        claimed.next_due,
        Some(at(31)),
        "the claim is the earliest score"
    );
    let outcomes = store
        .evaluate_claimed(&claimed.claims, at(30))
        .await
        .unwrap();
    assert!(
        matches!(outcomes[..], [Ok(Outcome::Evaluated { changes: 1 })]),
        "{outcomes:?}"
    );

    assert_eq!(
        transitions(&mut conn).await,
        [transition_because(
            "a:v1",
            "cart_abandoners_30m",
            "enter",
            at(30),
            "deadline"
        )]
    );
    assert_eq!(
        memberships(&mut conn, &id).await,
        BTreeMap::from([("cart_abandoners_30m".to_string(), ms(at(30)))])
    );
    assert_eq!(
        members(&mut conn, "cart_abandoners_30m").await,
        [("a:v1".to_string(), ms(at(30)))]
    );
    // An abandoned cart stays abandoned until an event: nothing left to wait for.
    assert_eq!(schedule(&mut conn).await, []);
    // The evaluation left the profile itself as it was.
    let p = store.profile(&id, at(30)).await.unwrap().unwrap();
    assert_eq!((p.events, p.last_seen), (1, NOW));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_schedulers_claim_and_evaluate_each_due_profile_once() {
    const PROFILES: usize = 300;
    let redis = RedisServer::start().unwrap();
    let cart_segments = segments(CART_30M);
    let a = redis.profiles(&cart_segments).await;
    let b = redis.profiles(&cart_segments).await;
    let mut conn = redis.connection().await;
    let ids: Vec<ProfileId> = (0..PROFILES).map(|i| anon(&format!("v{i}"))).collect();
    for chunk in ids.chunks(50) {
        let updates: Vec<ProfileUpdate> = chunk
            .iter()
            .map(|id| update(id, vec![cart(1, EventKind::CartAdd, 0, 0)]))
            .collect();
        a.apply(&updates).await.unwrap();
    }

    // Both run rounds of 7 at once until nothing is due.
    async fn scheduler(store: RedisProfiles) -> Vec<(String, Outcome)> {
        let mut done = Vec::new();
        for _ in 0..PROFILES {
            let claimed = store.claim_due(at(30), LEASE, 7).await.unwrap();
            if claimed.claims.is_empty() {
                return done;
            }
            let outcomes = store.evaluate_claimed(&claimed.claims, at(30)).await;
            for (c, o) in claimed.claims.iter().zip(outcomes.unwrap()) {
                done.push((c.profile().to_string(), o.unwrap()));
            }
        }
        panic!("profiles still due after {PROFILES} rounds");
    }
    let (by_a, by_b) = tokio::join!(tokio::spawn(scheduler(a)), tokio::spawn(scheduler(b)));
    let (by_a, by_b) = (by_a.unwrap(), by_b.unwrap());

    assert_eq!(by_a.len() + by_b.len(), PROFILES, "claimed once each");
    let mut all: Vec<(String, Outcome)> = by_a.into_iter().chain(by_b).collect();
    all.sort_by(|x, y| x.0.cmp(&y.0));
    let mut expected: Vec<(String, Outcome)> =
        ids.iter().map(|id| evaluated(id.as_str(), 1)).collect();
    expected.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(all, expected);

    let mut entered: Vec<Transition> = transitions(&mut conn).await;
    entered.sort();
    let mut want: Vec<Transition> = ids
        .iter()
        .map(|id| {
            transition_because(
                id.as_str(),
                "cart_abandoners_30m",
                "enter",
                at(30),
                "deadline",
            )
        })
        .collect();
    want.sort();
    assert_eq!(entered, want);
    assert_eq!(schedule(&mut conn).await, []);
}

#[tokio::test]
async fn a_claim_holds_for_its_lease_then_another_scheduler_takes_the_profile_over() {
    let redis = RedisServer::start().unwrap();
    let first = redis.profiles(&segments(CART_30M)).await;
    let second = redis.profiles(&segments(CART_30M)).await;
    let mut conn = redis.connection().await;
    first
        .apply(&[update(&anon("v1"), vec![cart(1, EventKind::CartAdd, 0, 0)])])
        .await
        .unwrap();

    // The first scheduler claims the profile, then stalls (or dies) before evaluating it.
    let stalled = first.claim_due(at(30), LEASE, 100).await.unwrap();
    assert_eq!(stalled.claims.len(), 1);
    let just_before = at(31) - time::Duration::milliseconds(1);
    let claimed = second.claim_due(just_before, LEASE, 100).await.unwrap();
    assert_eq!(claimed.claims, [], "claimed until the lease ends");
    assert_eq!(claimed.next_due, Some(at(31)));

    // At the end of the lease the second scheduler takes it.
    let taken = second.claim_due(at(31), LEASE, 100).await.unwrap();
    assert_eq!(taken.claims.len(), 1);
    assert_eq!(taken.claims[0].until(), at(32));
    // The first one wakes up: its claim is no longer the profile's, so it writes nothing.
    let late = first
        .evaluate_claimed(&stalled.claims, at(30))
        .await
        .unwrap();
    assert!(matches!(late[..], [Ok(Outcome::Superseded)]), "{late:?}");
    assert_eq!(transitions(&mut conn).await, Vec::<Transition>::new());
    assert_eq!(
        schedule(&mut conn).await,
        [("a:v1".to_string(), ms(at(32)))]
    );

    let done = second
        .evaluate_claimed(&taken.claims, at(31))
        .await
        .unwrap();
    assert!(
        matches!(done[..], [Ok(Outcome::Evaluated { changes: 1 })]),
        "{done:?}"
    );
    assert_eq!(
        transitions(&mut conn).await,
        [transition_because(
            "a:v1",
            "cart_abandoners_30m",
            "enter",
            at(31),
            "deadline"
        )]
    );
    assert_eq!(schedule(&mut conn).await, []);
}

#[tokio::test]
async fn an_update_while_a_profile_is_claimed_wins_and_no_deadline_is_lost() {
    let redis = RedisServer::start().unwrap();
    // Two segments whose deadlines are a second apart.
    let toml = r#"
        [[segments]]
        name = "cart_30m"
        condition = { older_than = { field = "cart_updated_at", duration = "30m" } }
        [[segments]]
        name = "cart_30m_1s"
        condition = { older_than = { field = "cart_updated_at", duration = "30m 1s" } }
    "#;
    let store = redis.profiles(&segments(toml)).await;
    let mut conn = redis.connection().await;
    let second = time::Duration::SECOND;

    // 1. Claimed at 30m; a page view received at 30m 2s evaluates the profile first, past
    //    both deadlines. The scheduler's evaluation at 30m would take the visitor out of
    //    cart_30m_1s again; it writes nothing.
    let v1 = anon("v1");
    store
        .apply(&[update(&v1, vec![cart(1, EventKind::CartAdd, 0, 0)])])
        .await
        .unwrap();
    let claimed = store.claim_due(at(30), LEASE, 100).await.unwrap();
    let mut page = kind(2, EventKind::Page, 30);
    page.received_at += 2 * second;
    store.apply(&[update(&v1, vec![page])]).await.unwrap();
    let outcomes = store
        .evaluate_claimed(&claimed.claims, at(30))
        .await
        .unwrap();
    assert!(
        matches!(outcomes[..], [Ok(Outcome::Superseded)]),
        "{outcomes:?}"
    );
    let late = at(30) + 2 * second;
    assert_eq!(
        transitions(&mut conn).await,
        [
            transition("a:v1", "cart_30m", "enter", late),
            transition("a:v1", "cart_30m_1s", "enter", late),
        ]
    );
    assert_eq!(schedule(&mut conn).await, []);

    // 2. Claimed at 30m; the visitor changes the cart at that moment, which moves the
    //    deadline to 60m. The update's deadline stands and fires then.
    let v2 = anon("v2");
    store
        .apply(&[update(&v2, vec![cart(3, EventKind::CartAdd, 0, 0)])])
        .await
        .unwrap();
    let claimed = store.claim_due(at(30), LEASE, 100).await.unwrap();
    store
        .apply(&[update(&v2, vec![cart(4, EventKind::CartAdd, 30, 0)])])
        .await
        .unwrap();
    let outcomes = store
        .evaluate_claimed(&claimed.claims, at(30))
        .await
        .unwrap();
    assert!(
        matches!(outcomes[..], [Ok(Outcome::Superseded)]),
        "{outcomes:?}"
    );
    assert_eq!(
        schedule(&mut conn).await,
        [("a:v2".to_string(), ms(at(60)))]
    );
    assert_eq!(round(&store, at(59)).await, []);
    assert_eq!(round(&store, at(60)).await, [evaluated("a:v2", 1)]);
    assert_eq!(round(&store, at(60) + second).await, [evaluated("a:v2", 1)]);

    // 3. Claimed at 30m; an update from a collector whose clock is a second behind
    //    schedules the deadline it has not reached yet: due already, so the next round
    //    evaluates it.
    let v3 = anon("v3");
    store
        .apply(&[update(&v3, vec![cart(5, EventKind::CartAdd, 0, 0)])])
        .await
        .unwrap();
    let claimed = store.claim_due(at(30), LEASE, 100).await.unwrap();
    let mut page = kind(6, EventKind::Page, 30);
    page.received_at -= second;
    store.apply(&[update(&v3, vec![page])]).await.unwrap();
    let outcomes = store
        .evaluate_claimed(&claimed.claims, at(30))
        .await
        .unwrap();
    assert!(
        matches!(outcomes[..], [Ok(Outcome::Superseded)]),
        "{outcomes:?}"
    );
    assert_eq!(
        schedule(&mut conn).await,
        [("a:v3".to_string(), ms(at(30)))]
    );
    assert_eq!(round(&store, at(30)).await, [evaluated("a:v3", 1)]);

    let mine = |who: &str, all: Vec<Transition>| -> Vec<Transition> {
        all.into_iter().filter(|t| t[0].1 == who).collect()
    };
    assert_eq!(
        mine("a:v2", transitions(&mut conn).await),
        [
            transition_because("a:v2", "cart_30m", "enter", at(60), "deadline"),
            transition_because("a:v2", "cart_30m_1s", "enter", at(60) + second, "deadline"),
        ]
    );
    assert_eq!(
        mine("a:v3", transitions(&mut conn).await),
        [transition_because(
            "a:v3",
            "cart_30m",
            "enter",
            at(30),
            "deadline"
        )]
    );
    // cart_30m_1s is a second later: the next deadline of v3.
    assert_eq!(
        schedule(&mut conn).await,
        [("a:v3".to_string(), ms(at(30) + second))]
    );
}

#[tokio::test]
async fn a_deleted_profile_leaves_the_schedule() {
    let redis = RedisServer::start().unwrap();
    let store = redis.profiles(&segments(CART_30M)).await;
    let mut conn = redis.connection().await;
    let id = anon("v1");
    store
        .apply(&[update(&id, vec![cart(1, EventKind::CartAdd, 0, 0)])])
        .await
        .unwrap();
    let keys: Vec<String> = conn.keys("profile:{a:v1}*").await.unwrap();
    let _: () = conn.del(keys).await.unwrap();

    assert_eq!(
        round(&store, at(30)).await,
        [("a:v1".to_string(), Outcome::Gone)]
    );
    assert_eq!(schedule(&mut conn).await, []);
    assert_eq!(transitions(&mut conn).await, Vec::<Transition>::new());
    let left: Vec<String> = conn.keys("profile:{a:v1}*").await.unwrap();
    assert_eq!(left, Vec::<String>::new(), "nothing written for it");
}

#[tokio::test]
async fn a_profile_that_cannot_be_evaluated_keeps_its_claim_until_the_lease_ends() {
    let redis = RedisServer::start().unwrap();
    let store = redis.profiles(&segments(CART_30M)).await;
    let mut conn = redis.connection().await;
    store
        .apply(&[update(&anon("v1"), vec![cart(1, EventKind::CartAdd, 0, 0)])])
        .await
        .unwrap();
    let _: () = conn
        .hset("profile:{a:v1}", "cart_updated_at", "later")
        .await
        .unwrap();
    // A member no collector writes.
    let _: () = conn
        .zadd("schedule:deadlines", "nobody", ms(at(30)))
        .await
        .unwrap();

    let claimed = store.claim_due(at(30), LEASE, 100).await.unwrap();
    let outcomes = store
        .evaluate_claimed(&claimed.claims, at(30))
        .await
        .unwrap();
    let errors: Vec<(String, String)> = claimed
        .claims
        .iter()
        .zip(outcomes)
        .map(|(c, o)| (c.profile().to_string(), o.unwrap_err().to_string()))
        .collect();
    assert_eq!(
        errors,
        [
            (
                "a:v1".to_string(),
                r#"corrupt data in profile:{a:v1} field cart_updated_at: "later" is not an integer"#
                    .to_string()
            ),
            (
                "nobody".to_string(),
                "corrupt data in schedule:deadlines field nobody: is not a profile id".to_string()
            ),
        ]
    );
    // Both keep their claims: not due again until the lease ends, then claimed again.
    assert_eq!(
        schedule(&mut conn).await,
        [
            ("a:v1".to_string(), ms(at(31))),
            ("nobody".to_string(), ms(at(31))),
        ]
    );
    let soon = store
        .claim_due(at(30) + time::Duration::SECOND, LEASE, 100)
        .await
        .unwrap();
    assert_eq!(soon.claims, []);
    let again = store.claim_due(at(31), LEASE, 100).await.unwrap();
    let again: Vec<&str> = again.claims.iter().map(|c| c.profile()).collect();
    assert_eq!(again, ["a:v1", "nobody"]);
    assert_eq!(transitions(&mut conn).await, Vec::<Transition>::new());
}
