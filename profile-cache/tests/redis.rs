//! profile-cache against real, throwaway redis-server processes (one per test, so tests run
//! in parallel). Time comes from the events (`received_at`), never from the wall clock.

use std::collections::BTreeMap;
use std::time::Duration;

use profile_cache::testing::RedisServer;
use profile_cache::{
    ApplyReport, CartLine, ConsentChange, ConsentMask, ConsentRecord, ConsentState, ConsentStatus,
    Context, Event, EventKind, Item, Lifecycle, Profile, ProfileConfig, ProfileId, ProfileUpdate,
    Purpose, RedisProfiles, StoreError, Value, ViewedProduct,
};
use redis::AsyncCommands;
use time::OffsetDateTime;
use time::macros::datetime;
use uuid::Uuid;

const NOW: OffsetDateTime = datetime!(2026-11-29 12:00:00 UTC);

fn ago(minutes: i64) -> OffsetDateTime {
    NOW - time::Duration::minutes(minutes)
}

fn ms(t: OffsetDateTime) -> String {
    (t.unix_timestamp_nanos() / 1_000_000).to_string()
}

fn ev(n: u128, kind: EventKind, minutes_ago: i64) -> Event {
    Event {
        message_id: Uuid::from_u128(n),
        kind,
        name: None,
        timestamp: ago(minutes_ago),
        received_at: NOW,
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

fn item(product: &str, category: &str, price: i64, quantity: u32) -> Item {
    Item {
        product_id: product.into(),
        category: Some(category.into()),
        price,
        quantity,
        name: None,
    }
}

fn with_items(mut e: Event, items: Vec<Item>) -> Event {
    e.items = items;
    e
}

fn page(n: u128) -> Event {
    ev(n, EventKind::Page, 0)
}

fn anon() -> ProfileId {
    ProfileId::anonymous("anon-1").unwrap()
}

fn update(profile: ProfileId, events: Vec<Event>) -> ProfileUpdate {
    ProfileUpdate {
        profile,
        anonymous_id: Some("anon-1".into()),
        user_id: None,
        context: Context {
            session_id: Some("s1".into()),
            ..Context::default()
        },
        events,
    }
}

/// An update of a profile by a batch without an anonymous id (a backend's, say), so no
/// anonymous profile is merged into it.
fn lone(profile: ProfileId, events: Vec<Event>) -> ProfileUpdate {
    ProfileUpdate {
        anonymous_id: None,
        ..update(profile, events)
    }
}

fn report(applied: u64, duplicates: u64) -> ApplyReport {
    ApplyReport {
        applied,
        duplicates,
        ..ApplyReport::default()
    }
}

async fn store(redis: &RedisServer, config: ProfileConfig) -> RedisProfiles {
    RedisProfiles::connect(&redis.url(), config).await.unwrap()
}

async fn profile(store: &RedisProfiles, id: &ProfileId) -> Profile {
    store
        .profile(id, NOW)
        .await
        .unwrap()
        .expect("profile exists")
}

/// `(id, [(field, value)])` of every entry of `stream:events`.
type Entries = Vec<(String, Vec<(String, String)>)>;

async fn stream(conn: &mut redis::aio::MultiplexedConnection) -> Entries {
    redis::cmd("XRANGE")
        .arg("stream:events")
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .unwrap()
}

fn shopping() -> Vec<Event> {
    let mut identify = ev(1, EventKind::Identify, 60);
    identify.properties = vec![
        ("email".into(), Value::String("ada@example.com".into())),
        ("age".into(), Value::Int(36)),
        ("score".into(), Value::Float(0.75)),
        ("vip".into(), Value::Bool(true)),
    ];
    let mut signup = ev(2, EventKind::Track, 59);
    signup.name = Some("Signed Up".into());
    let mut order = with_items(
        ev(9, EventKind::OrderCompleted, 10),
        vec![item("sku-1", "shoes", 5_000, 2)],
    );
    order.order_id = Some("o-1".into());
    order.currency = Some("EUR".into());
    let mut consent = ev(10, EventKind::ConsentChange, 5);
    consent.purpose = Purpose::Necessary;
    consent.consent = Some(ConsentChange {
        granted: ConsentMask(Purpose::Analytics.bit() | Purpose::Personalization.bit()),
        denied: ConsentMask(Purpose::Marketing.bit()),
    });
    vec![
        identify,
        signup,
        ev(3, EventKind::Page, 50),
        with_items(
            ev(4, EventKind::ProductViewed, 40),
            vec![item("sku-1", "shoes", 5_000, 1)],
        ),
        with_items(
            ev(5, EventKind::ProductViewed, 30),
            vec![item("sku-2", "hats", 2_000, 1)],
        ),
        with_items(
            ev(6, EventKind::CartAdd, 25),
            vec![item("sku-1", "shoes", 5_000, 3)],
        ),
        with_items(
            ev(7, EventKind::CartAdd, 24),
            vec![item("sku-2", "hats", 2_000, 1)],
        ),
        with_items(
            ev(8, EventKind::CartRemove, 20),
            vec![item("sku-1", "shoes", 5_000, 1)],
        ),
        order,
        consent,
        ev(11, EventKind::EmailOpened, 3),
        ev(12, EventKind::EmailClicked, 2),
        with_items(
            ev(13, EventKind::CartAdd, 1),
            vec![item("sku-3", "socks", 500, 2)],
        ),
    ]
}

fn strings<const N: usize>(pairs: [(&str, &str); N]) -> BTreeMap<String, String> {
    pairs
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test]
async fn a_shopping_session_yields_exact_profile_values() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis, ProfileConfig::default()).await;
    let r = store.apply(&[update(anon(), shopping())]).await.unwrap();
    assert_eq!(r, report(13, 0));

    let consent = |status| ConsentState {
        status,
        at: ago(5),
        source: None,
    };
    let logged = |purpose, status| ConsentRecord {
        purpose,
        status,
        at: (ago(5).unix_timestamp_nanos() / 1_000_000) as i64,
        source: None,
    };
    let expected = Profile {
        id: anon(),
        user_id: None,
        anonymous_ids: vec!["anon-1".into()],
        // The email went when marketing was denied (`profiles.marketing_traits`).
        traits: strings([("age", "36"), ("score", "0.75"), ("vip", "true")]),
        first_seen: ago(60),
        last_seen: ago(1),
        events: 13,
        page_views: 1,
        sessions: 1,
        event_counts: [
            ("identify", 1),
            ("Signed Up", 1),
            ("page", 1),
            ("product_viewed", 2),
            ("cart_add", 3),
            ("cart_remove", 1),
            ("order_completed", 1),
            ("consent_change", 1),
            ("email_opened", 1),
            ("email_clicked", 1),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
        recently_viewed: vec![
            ViewedProduct {
                product_id: "sku-2".into(),
                at: ago(30),
            },
            ViewedProduct {
                product_id: "sku-1".into(),
                at: ago(40),
            },
        ],
        categories_viewed: vec![("hats".into(), 1), ("shoes".into(), 1)],
        categories_bought: vec![("shoes".into(), 2)],
        // The order emptied the cart; only what was added afterwards is left.
        cart: vec![CartLine {
            product_id: "sku-3".into(),
            quantity: 2,
            price: 500,
            category: Some("socks".into()),
        }],
        cart_updated_at: Some(ago(1)),
        orders: 1,
        // No explicit revenue: the items' total.
        revenue: 10_000,
        last_order_at: Some(ago(10)),
        email_opens: 1,
        email_clicks: 1,
        last_engaged_at: Some(ago(2)),
        lifecycle: Lifecycle::New,
        consent: [
            (Purpose::Analytics, consent(ConsentStatus::Granted)),
            (Purpose::Personalization, consent(ConsentStatus::Granted)),
            (Purpose::Marketing, consent(ConsentStatus::Denied)),
        ]
        .into(),
        consent_log: vec![
            logged(Purpose::Analytics, ConsentStatus::Granted),
            logged(Purpose::Marketing, ConsentStatus::Denied),
            logged(Purpose::Personalization, ConsentStatus::Granted),
        ],
        segments: vec![],
    };
    assert_eq!(profile(&store, &anon()).await, expected);

    // What connectors read: the raw keys, exactly.
    let mut conn = redis.connection().await;
    let hash: BTreeMap<String, String> = conn.hgetall("profile:{a:anon-1}").await.unwrap();
    assert_eq!(
        hash,
        strings([
            ("id", "a:anon-1"),
            ("first_seen", &ms(ago(60))),
            ("last_seen", &ms(ago(1))),
            ("events", "13"),
            ("page_views", "1"),
            ("sessions", "1"),
            ("last_session_id", "s1"),
            ("orders", "1"),
            ("revenue", "10000"),
            ("currency", "EUR"),
            ("last_order_at", &ms(ago(10))),
            ("email_opens", "1"),
            ("email_clicks", "1"),
            ("last_engaged_at", &ms(ago(2))),
            ("cart_updated_at", &ms(ago(1))),
            ("lifecycle", "new"),
            ("consent:analytics", "granted"),
            ("consent:analytics:at", &ms(ago(5))),
            ("consent:personalization", "granted"),
            ("consent:personalization:at", &ms(ago(5))),
            ("consent:marketing", "denied"),
            ("consent:marketing:at", &ms(ago(5))),
            (
                "consent_log",
                &format!(
                    "[{{\"purpose\":\"analytics\",\"status\":\"granted\",\"at\":{t}}},\
                     {{\"purpose\":\"marketing\",\"status\":\"denied\",\"at\":{t}}},\
                     {{\"purpose\":\"personalization\",\"status\":\"granted\",\"at\":{t}}}]",
                    t = ms(ago(5))
                )
            ),
        ])
    );
    let cart: BTreeMap<String, String> = conn.hgetall("profile:{a:anon-1}:cart").await.unwrap();
    assert_eq!(
        cart,
        strings([("sku-3", r#"{"quantity":2,"price":500,"category":"socks"}"#)])
    );
    let ids: Vec<String> = conn.smembers("profile:{a:anon-1}:ids").await.unwrap();
    assert_eq!(ids, ["anon:anon-1"]);
    let dedupe: Vec<(String, i64)> = conn
        .zrange_withscores("profile:{a:anon-1}:dedupe", 0, 0)
        .await
        .unwrap();
    assert_eq!(
        dedupe,
        [(
            "00000000000000000000000000000001".to_string(),
            NOW.unix_timestamp() * 1000
        )]
    );
    let version: String = conn.get("meta:schema_version").await.unwrap();
    assert_eq!(version, "1");
}

#[tokio::test]
async fn a_known_user_collects_both_ids_and_counts_sessions() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis, ProfileConfig::default()).await;
    let ada = ProfileId::user("ada").unwrap();
    let mut u = update(ada.clone(), vec![page(1)]);
    u.user_id = Some("ada".into());
    store.apply(std::slice::from_ref(&u)).await.unwrap();
    // Same session: no new session; another one, and back: two more.
    for (n, session) in [(2, "s1"), (3, "s2"), (4, "s1")] {
        u.events = vec![page(n)];
        u.context.session_id = Some(session.into());
        store.apply(std::slice::from_ref(&u)).await.unwrap();
    }
    // Only duplicates: the session is not counted.
    u.context.session_id = Some("s3".into());
    assert_eq!(
        store.apply(std::slice::from_ref(&u)).await.unwrap(),
        report(0, 1)
    );
    // No session id: not counted either.
    u.events = vec![page(5)];
    u.context.session_id = None;
    store.apply(&[u]).await.unwrap();

    let p = profile(&store, &ada).await;
    assert_eq!(p.user_id.as_deref(), Some("ada"));
    assert_eq!(p.anonymous_ids, ["anon-1"]);
    assert_eq!((p.events, p.page_views, p.sessions), (5, 5, 3));
    let mut conn = redis.connection().await;
    let mut ids: Vec<String> = conn.smembers("profile:{u:ada}:ids").await.unwrap();
    ids.sort();
    assert_eq!(ids, ["anon:anon-1", "user:ada"]);
    let fields: (String, String) = redis::cmd("HMGET")
        .arg("profile:{u:ada}")
        .arg("user_id")
        .arg("last_session_id")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(fields, ("ada".to_string(), "s1".to_string()));
}

#[tokio::test]
async fn cart_lines_follow_adds_and_removes_and_orders_clear_them() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis, ProfileConfig::default()).await;
    let events = vec![
        with_items(
            ev(1, EventKind::CartAdd, 5),
            vec![item("a", "x", 100, 2), item("b", "y", 200, 1)],
        ),
        // Removing more than is there deletes the line.
        with_items(
            ev(2, EventKind::CartRemove, 4),
            vec![item("b", "y", 200, 5)],
        ),
        // Adding again keeps the quantity and takes the latest price.
        with_items(ev(3, EventKind::CartAdd, 3), vec![item("a", "x", 150, 1)]),
        // Removing what is not in the cart changes nothing.
        with_items(ev(4, EventKind::CartRemove, 2), vec![item("zz", "y", 1, 1)]),
    ];
    store.apply(&[update(anon(), events)]).await.unwrap();
    let p = profile(&store, &anon()).await;
    assert_eq!(
        p.cart,
        [CartLine {
            product_id: "a".into(),
            quantity: 3,
            price: 150,
            category: Some("x".into()),
        }]
    );
    assert_eq!(p.cart_updated_at, Some(ago(2)));

    // A later batch: partial removal, then an order with an explicit revenue.
    let mut order = with_items(
        ev(6, EventKind::OrderCompleted, 0),
        vec![item("a", "x", 150, 2), item("c", "z", 10, 1)],
    );
    order.revenue = 299;
    order.currency = Some("USD".into());
    let events = vec![
        with_items(
            ev(5, EventKind::CartRemove, 1),
            vec![item("a", "x", 150, 1)],
        ),
        order,
    ];
    store.apply(&[update(anon(), events)]).await.unwrap();
    let p = profile(&store, &anon()).await;
    assert_eq!(p.cart, []);
    assert_eq!(p.cart_updated_at, Some(NOW));
    assert_eq!((p.orders, p.revenue), (1, 299));
    assert_eq!(p.categories_bought, [("x".into(), 2), ("z".into(), 1)]);
    let mut conn = redis.connection().await;
    let exists: bool = conn.exists("profile:{a:anon-1}:cart").await.unwrap();
    assert!(!exists);
    let currency: String = conn.hget("profile:{a:anon-1}", "currency").await.unwrap();
    assert_eq!(currency, "USD");

    // An older order arriving late counts, but does not change the last order's fields.
    let mut late = with_items(
        ev(7, EventKind::OrderCompleted, 30),
        vec![item("d", "x", 100, 1)],
    );
    late.currency = Some("GBP".into());
    store.apply(&[update(anon(), vec![late])]).await.unwrap();
    let p = profile(&store, &anon()).await;
    assert_eq!((p.orders, p.revenue), (2, 399));
    assert_eq!((p.last_order_at, p.cart_updated_at), (Some(NOW), Some(NOW)));
    let currency: String = conn.hget("profile:{a:anon-1}", "currency").await.unwrap();
    assert_eq!(currency, "USD");
}

#[tokio::test]
async fn recently_viewed_keeps_the_newest_and_categories_count_views() {
    let redis = RedisServer::start().unwrap();
    let config = ProfileConfig {
        recently_viewed_max: 3,
        ..ProfileConfig::default()
    };
    let store = store(&redis, config).await;
    let view = |n, product: &str, minutes_ago| {
        with_items(
            ev(n, EventKind::ProductViewed, minutes_ago),
            vec![item(product, "cat", 100, 1)],
        )
    };
    let events = vec![
        view(1, "p1", 50),
        view(2, "p2", 40),
        view(3, "p3", 30),
        view(4, "p4", 20),
        view(5, "p5", 10),
        // Seen again: moves to the front.
        view(6, "p3", 5),
    ];
    store.apply(&[update(anon(), events)]).await.unwrap();
    // A late event about an older view does not move p5 back.
    store
        .apply(&[update(anon(), vec![view(7, "p5", 45)])])
        .await
        .unwrap();
    let p = profile(&store, &anon()).await;
    let viewed: Vec<_> = p
        .recently_viewed
        .iter()
        .map(|v| (v.product_id.as_str(), v.at))
        .collect();
    assert_eq!(viewed, [("p3", ago(5)), ("p5", ago(10)), ("p4", ago(20))]);
    assert_eq!(p.categories_viewed, [("cat".into(), 7)]);
    assert_eq!(p.event_counts["product_viewed"], 7);
}

#[tokio::test]
async fn the_latest_consent_answer_wins_whatever_the_arrival_order() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis, ProfileConfig::default()).await;
    let answer = |n, minutes_ago, granted: u8, denied: u8| {
        let mut e = ev(n, EventKind::ConsentChange, minutes_ago);
        e.consent = Some(ConsentChange {
            granted: ConsentMask(granted),
            denied: ConsentMask(denied),
        });
        e
    };
    let marketing = Purpose::Marketing.bit();
    let analytics = Purpose::Analytics.bit();
    store
        .apply(&[update(
            anon(),
            vec![answer(1, 10, marketing | analytics, 0)],
        )])
        .await
        .unwrap();
    // Withdrawn 5 minutes ago, then an older grant arrives late (a retried batch).
    store
        .apply(&[update(
            anon(),
            vec![answer(2, 5, 0, marketing), answer(3, 8, marketing, 0)],
        )])
        .await
        .unwrap();
    let p = profile(&store, &anon()).await;
    assert_eq!(
        p.consent,
        [
            (
                Purpose::Analytics,
                ConsentState {
                    status: ConsentStatus::Granted,
                    at: ago(10),
                    source: None,
                }
            ),
            (
                Purpose::Marketing,
                ConsentState {
                    status: ConsentStatus::Denied,
                    at: ago(5),
                    source: None,
                }
            ),
        ]
        .into()
    );
}

#[tokio::test]
async fn retried_updates_count_once() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis, ProfileConfig::default()).await;
    let u = update(anon(), shopping());
    assert_eq!(
        store.apply(std::slice::from_ref(&u)).await.unwrap(),
        report(13, 0)
    );
    let before = profile(&store, &anon()).await;
    assert_eq!(store.apply(&[u]).await.unwrap(), report(0, 13));
    assert_eq!(profile(&store, &anon()).await, before);

    // A duplicate inside one update counts once too; a new event next to old ones applies.
    let r = store
        .apply(&[update(anon(), vec![page(50), page(50), page(3)])])
        .await
        .unwrap();
    assert_eq!(r, report(1, 2));
    let p = profile(&store, &anon()).await;
    assert_eq!(
        (p.events, p.page_views, p.orders, p.revenue),
        (14, 2, 1, 10_000)
    );
    let mut conn = redis.connection().await;
    let entries = stream(&mut conn).await;
    assert_eq!(
        entries.len(),
        14,
        "the event stream holds applied events only"
    );
}

#[tokio::test]
async fn one_apply_updates_several_profiles_and_merges_the_visitor_into_the_user() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis, ProfileConfig::default()).await;
    let user = ProfileId::user("user-7").unwrap();
    let mut u2 = update(user.clone(), vec![page(2), page(3)]);
    u2.user_id = Some("user-7".into());
    let updates = [
        update(anon(), vec![page(1)]),
        u2,
        update(ProfileId::anonymous("empty").unwrap(), vec![]),
    ];
    // The user's update carries the visitor's anonymous id: the visitor's profile, updated
    // first in the same batch, merges into the user's.
    let merged = ApplyReport {
        merged: 1,
        ..report(3, 0)
    };
    assert_eq!(store.apply(&updates).await.unwrap(), merged);
    // The visitor's update now lands on the user profile, where its id is known.
    assert_eq!(store.apply(&updates).await.unwrap(), report(0, 3));
    assert_eq!(store.apply(&[]).await.unwrap(), report(0, 0));

    let p = store.find("user-7", NOW).await.unwrap().unwrap();
    assert_eq!((&p.id, p.page_views), (&user, 3));
    assert_eq!(p.user_id.as_deref(), Some("user-7"));
    assert_eq!(p.anonymous_ids, ["anon-1"]);
    let p = store.find("anon-1", NOW).await.unwrap().unwrap();
    assert_eq!((p.id, p.page_views), (user, 3));
    assert_eq!(store.find("nobody", NOW).await.unwrap(), None);
    assert_eq!(store.find("empty", NOW).await.unwrap(), None);
    assert_eq!(store.find("bad{id}", NOW).await.unwrap(), None);
    assert_eq!(store.find("", NOW).await.unwrap(), None);
}

#[tokio::test]
async fn the_event_stream_carries_each_applied_event_in_order() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis, ProfileConfig::default()).await;
    let mut track = ev(1, EventKind::Track, 1);
    track.name = Some("Clicked".into());
    track.properties = vec![
        ("button".into(), Value::String("buy".into())),
        ("n".into(), Value::Int(2)),
    ];
    let mut u = update(anon(), vec![track, page(2)]);
    u.context.page_url = Some("https://shop.example/p/1".into());
    store.apply(&[u]).await.unwrap();

    let mut conn = redis.connection().await;
    let entries = stream(&mut conn).await;
    let fields: Vec<_> = entries.iter().map(|(_, f)| f.clone()).collect();
    let entry = |kind: &str, event: &str| {
        vec![
            ("profile".to_string(), "a:anon-1".to_string()),
            ("kind".to_string(), kind.to_string()),
            ("event".to_string(), event.to_string()),
        ]
    };
    let context = r#""context":{"page_url":"https://shop.example/p/1","session_id":"s1"}"#;
    assert_eq!(
        fields,
        [
            entry(
                "track",
                &format!(
                    concat!(
                        r#"{{"message_id":"00000000000000000000000000000001","profile":"a:anon-1","#,
                        r#""anonymous_id":"anon-1","kind":"track","name":"Clicked","timestamp":{},"#,
                        r#""received_at":{},"purpose":"analytics","#,
                        r#""properties":{{"button":"buy","n":2}},{}}}"#
                    ),
                    ms(ago(1)),
                    ms(NOW),
                    context
                )
            ),
            entry(
                "page",
                &format!(
                    concat!(
                        r#"{{"message_id":"00000000000000000000000000000002","profile":"a:anon-1","#,
                        r#""anonymous_id":"anon-1","kind":"page","timestamp":{},"#,
                        r#""received_at":{},"purpose":"analytics",{}}}"#
                    ),
                    ms(NOW),
                    ms(NOW),
                    context
                )
            ),
        ]
    );
}

#[tokio::test]
async fn the_event_stream_is_capped() {
    let redis = RedisServer::start().unwrap();
    let config = ProfileConfig {
        event_stream_max_len: 10,
        ..ProfileConfig::default()
    };
    let store = store(&redis, config).await;
    let mut conn = redis.connection().await;
    // `MAXLEN ~` trims whole stream nodes only (100 entries each by default), so the stream
    // stays above the cap by less than a node.
    for batch in 0..10u128 {
        let events = (0..100).map(|i| page(1000 + batch * 100 + i)).collect();
        store.apply(&[update(anon(), events)]).await.unwrap();
    }
    let len: usize = conn.xlen("stream:events").await.unwrap();
    assert!((10..110).contains(&len), "stream length {len}");
    // With one entry per node, approximate trimming is exact.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("stream-node-max-entries")
        .arg(1)
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = conn.del("stream:events").await.unwrap();
    let events = (0..25).map(|i| page(5000 + i)).collect();
    store.apply(&[update(anon(), events)]).await.unwrap();
    let entries = stream(&mut conn).await;
    let kept: Vec<_> = entries
        .iter()
        .map(|(_, f)| f[2].1[..49].to_string())
        .collect();
    let expected: Vec<_> = (15..25)
        .map(|i| {
            format!(
                r#"{{"message_id":"{}","#,
                Uuid::from_u128(5000 + i).simple()
            )
        })
        .collect();
    assert_eq!(kept, expected, "the newest 10 are kept");
}

#[tokio::test]
async fn message_ids_are_forgotten_after_the_dedupe_window_and_over_the_cap() {
    let redis = RedisServer::start().unwrap();
    let config = ProfileConfig {
        dedupe_window: Duration::from_secs(3600),
        dedupe_max_ids: 3,
        ..ProfileConfig::default()
    };
    let store = store(&redis, config).await;
    let received = |n, hours_ago| {
        let mut e = page(n);
        e.received_at = NOW - time::Duration::hours(hours_ago);
        e.timestamp = e.received_at;
        e
    };
    store
        .apply(&[update(anon(), vec![received(1, 2)])])
        .await
        .unwrap();
    // Within the window (received 30 minutes later): a duplicate.
    let mut retry = received(1, 2);
    retry.received_at += time::Duration::minutes(30);
    let r = store.apply(&[update(anon(), vec![retry])]).await.unwrap();
    assert_eq!(r, report(0, 1));
    // Two hours later the id is outside the window: a replay applies again.
    let r = store.apply(&[update(anon(), vec![page(1)])]).await.unwrap();
    assert_eq!(r, report(1, 0));
    // The count cap keeps the most recently received ids: 4, 1 and 5.
    let events = (2..=5)
        .map(|n| {
            let mut e = page(n);
            e.received_at = NOW - time::Duration::minutes(5 - n as i64);
            e
        })
        .collect();
    store.apply(&[update(anon(), events)]).await.unwrap();
    let mut conn = redis.connection().await;
    let kept: Vec<String> = conn
        .zrange("profile:{a:anon-1}:dedupe", 0, -1)
        .await
        .unwrap();
    let hex = |n: u128| Uuid::from_u128(n).simple().to_string();
    assert_eq!(kept, [hex(4), hex(1), hex(5)]);
    let p = profile(&store, &anon()).await;
    assert_eq!(p.page_views, 6);
}

#[tokio::test]
async fn a_redis_that_forgot_the_script_gets_it_again() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis, ProfileConfig::default()).await;
    store.apply(&[update(anon(), vec![page(1)])]).await.unwrap();
    let mut conn = redis.connection().await;
    let flush = || redis::cmd("SCRIPT").arg("FLUSH").to_owned();
    let _: () = flush().query_async(&mut conn).await.unwrap();
    let r = store
        .apply(&[update(anon(), vec![page(1), page(2)])])
        .await
        .unwrap();
    assert_eq!(r, report(1, 1));
    // Several profiles: the scripts run inside MULTI/EXEC.
    let _: () = flush().query_async(&mut conn).await.unwrap();
    let user = ProfileId::user("u1").unwrap();
    let r = store
        .apply(&[update(anon(), vec![page(3)]), lone(user, vec![page(4)])])
        .await
        .unwrap();
    assert_eq!(r, report(2, 0));
    assert_eq!(profile(&store, &anon()).await.page_views, 3);
}

#[tokio::test]
async fn a_restarted_persistent_redis_keeps_profiles_and_dedupe() {
    let dir = tempfile::tempdir().unwrap();
    let port = profile_cache::testing::free_port().unwrap();
    let redis = RedisServer::start_with_dir(dir.path(), port).unwrap();
    let store = store(&redis, ProfileConfig::default()).await;
    store.apply(&[update(anon(), vec![page(1)])]).await.unwrap();
    drop(redis);
    let err = store.ping().await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");

    let _redis = RedisServer::start_with_dir(dir.path(), port).unwrap();
    // The same store reconnects; the new server has no scripts loaded.
    let mut result = store.apply(&[update(anon(), vec![page(1), page(2)])]).await;
    for _ in 0..50 {
        if !matches!(result, Err(StoreError::Unavailable(_))) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        result = store.apply(&[update(anon(), vec![page(1), page(2)])]).await;
    }
    assert_eq!(result.unwrap(), report(1, 1));
    assert_eq!(profile(&store, &anon()).await.page_views, 2);
}

#[tokio::test]
async fn an_unreachable_redis_is_unavailable() {
    let redis = RedisServer::start().unwrap();
    let config = ProfileConfig {
        redis_timeout: Duration::from_millis(300),
        ..ProfileConfig::default()
    };
    let store = store(&redis, config.clone()).await;
    let port = redis.port();
    drop(redis);
    let err = store
        .apply(&[update(anon(), vec![page(1)])])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    let err = store.profile(&anon(), NOW).await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    let err = store.ping().await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    let err = RedisProfiles::connect(&format!("redis://127.0.0.1:{port}"), config)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
}

fn corrupt(err: StoreError) -> (String, String, String) {
    match err {
        StoreError::Corrupt { key, field, detail } => (key, field, detail),
        other => panic!("expected corrupt data, got {other:?}"),
    }
}

fn triple(key: &str, field: &str, detail: &str) -> (String, String, String) {
    (key.into(), field.into(), detail.into())
}

#[tokio::test]
async fn a_bad_counter_is_named_and_nothing_is_written() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis, ProfileConfig::default()).await;
    let mut conn = redis.connection().await;
    let _: () = conn
        .hset_multiple(
            "profile:{a:anon-1}",
            &[("orders", "abc"), ("page_views", "4")],
        )
        .await
        .unwrap();
    let err = store
        .apply(&[update(anon(), vec![page(1)])])
        .await
        .unwrap_err();
    assert_eq!(
        corrupt(err),
        triple("profile:{a:anon-1}", "orders", "\"abc\" is not an integer")
    );
    let page_views: String = conn.hget("profile:{a:anon-1}", "page_views").await.unwrap();
    assert_eq!(page_views, "4", "nothing was written");
    let keys: Vec<String> = conn.keys("*").await.unwrap();
    let mut keys = keys;
    keys.sort();
    assert_eq!(keys, ["meta:schema_version", "profile:{a:anon-1}"]);

    let err = store.profile(&anon(), NOW).await.unwrap_err();
    assert_eq!(
        corrupt(err),
        triple("profile:{a:anon-1}", "orders", "\"abc\" is not an integer")
    );
}

#[tokio::test]
async fn a_broken_cart_line_is_named_on_update_and_on_read() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis, ProfileConfig::default()).await;
    let mut conn = redis.connection().await;
    let user = ProfileId::user("u1").unwrap();
    let _: () = conn
        .hset_multiple(
            "profile:{u:u1}",
            &[("id", "u:u1"), ("first_seen", "0"), ("last_seen", "0")],
        )
        .await
        .unwrap();
    let _: () = conn
        .hset("profile:{u:u1}:cart", "sku", "{not json")
        .await
        .unwrap();
    let add = with_items(ev(2, EventKind::CartAdd, 0), vec![item("sku", "c", 1, 1)]);
    let err = store
        .apply(&[lone(user.clone(), vec![add])])
        .await
        .unwrap_err();
    assert_eq!(
        corrupt(err),
        triple(
            "profile:{u:u1}:cart",
            "sku",
            r#"is not a cart line {"quantity":n,"price":p,"category":c}"#
        )
    );
    let (key, field, _) = corrupt(store.profile(&user, NOW).await.unwrap_err());
    assert_eq!(
        (key.as_str(), field.as_str()),
        ("profile:{u:u1}:cart", "sku")
    );
    // An order replaces the cart without reading it.
    let order = with_items(ev(3, EventKind::OrderCompleted, 0), vec![]);
    assert_eq!(
        store
            .apply(&[lone(user.clone(), vec![order])])
            .await
            .unwrap(),
        report(1, 0)
    );
    assert_eq!(profile(&store, &user).await.cart, []);
}

#[tokio::test]
async fn a_key_of_the_wrong_type_is_named_on_update_and_on_read() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis, ProfileConfig::default()).await;
    let mut conn = redis.connection().await;
    let user = ProfileId::user("u2").unwrap();
    let _: () = conn.hset("profile:{u:u2}", "events", "1").await.unwrap();
    let _: () = conn.set("profile:{u:u2}:counts", "x").await.unwrap();
    let err = store
        .apply(&[update(user.clone(), vec![page(3)])])
        .await
        .unwrap_err();
    assert_eq!(
        corrupt(err),
        triple("profile:{u:u2}:counts", "-", "is a string, expected a hash")
    );
    let err = store.profile(&user, NOW).await.unwrap_err();
    assert_eq!(
        corrupt(err),
        triple("profile:{u:u2}:counts", "-", "has the wrong type")
    );
}

#[tokio::test]
async fn unreadable_profile_fields_are_named() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis, ProfileConfig::default()).await;
    let mut conn = redis.connection().await;
    store.apply(&[update(anon(), vec![page(1)])]).await.unwrap();
    let cases: [(&str, &str, &str, &str); 4] = [
        (
            "profile:{a:anon-1}",
            "consent:marketing",
            "maybe",
            "\"maybe\" is not granted or denied",
        ),
        ("profile:{a:anon-1}", "sessions", "-2", "-2 is negative"),
        (
            "profile:{a:anon-1}:counts",
            "page",
            "1.5",
            "\"1.5\" is not a count",
        ),
        (
            "profile:{a:anon-1}:ids",
            "",
            "",
            "is not anon:<id> or user:<id>",
        ),
    ];
    for (key, field, value, detail) in cases {
        let mut restore = false;
        if key.ends_with(":ids") {
            let _: () = conn.sadd(key, "someone").await.unwrap();
        } else {
            let _: () = conn.hset(key, field, value).await.unwrap();
            restore = true;
        }
        let err = store.profile(&anon(), NOW).await.unwrap_err();
        let field = if field.is_empty() { "someone" } else { field };
        assert_eq!(corrupt(err), triple(key, field, detail));
        if restore {
            let _: () = conn.hdel(key, field).await.unwrap();
        }
    }
    // The apply script checks the counts it increments too.
    let _: () = conn
        .srem("profile:{a:anon-1}:ids", "someone")
        .await
        .unwrap();
    let _: () = conn
        .hset("profile:{a:anon-1}:counts", "page", "x")
        .await
        .unwrap();
    let err = store
        .apply(&[update(anon(), vec![page(2)])])
        .await
        .unwrap_err();
    assert_eq!(
        corrupt(err),
        triple("profile:{a:anon-1}:counts", "page", "\"x\" is not a count")
    );
}

#[tokio::test]
async fn another_schema_version_is_refused() {
    let redis = RedisServer::start().unwrap();
    let mut conn = redis.connection().await;
    let _: () = conn.set("meta:schema_version", "99").await.unwrap();
    let err = RedisProfiles::connect(&redis.url(), ProfileConfig::default())
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "redis holds key schema version 99, this build reads version 1"
    );
    let _: () = conn.del("meta:schema_version").await.unwrap();
    let _: () = conn.sadd("meta:schema_version", "1").await.unwrap();
    let err = RedisProfiles::connect(&redis.url(), ProfileConfig::default())
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "redis holds key schema version <a set, not a string>, this build reads version 1"
    );
}

#[tokio::test]
async fn lifecycle_is_stored_at_write_and_computed_at_read() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis, ProfileConfig::default()).await;
    let mut first = page(1);
    first.timestamp = NOW - time::Duration::days(20);
    first.received_at = first.timestamp;
    store.apply(&[update(anon(), vec![first])]).await.unwrap();
    let mut conn = redis.connection().await;
    let stored: String = conn.hget("profile:{a:anon-1}", "lifecycle").await.unwrap();
    assert_eq!(stored, "new");
    store.apply(&[update(anon(), vec![page(2)])]).await.unwrap();
    let stored: String = conn.hget("profile:{a:anon-1}", "lifecycle").await.unwrap();
    assert_eq!(stored, "active", "first seen 20 days before this write");

    let later = |days| NOW + time::Duration::days(days);
    let stage = |p: Option<Profile>| p.map(|p| p.lifecycle);
    assert_eq!(
        stage(store.profile(&anon(), NOW).await.unwrap()),
        Some(Lifecycle::Active)
    );
    assert_eq!(
        stage(store.profile(&anon(), later(30)).await.unwrap()),
        Some(Lifecycle::Dormant)
    );
    assert_eq!(
        stage(store.profile(&anon(), later(90)).await.unwrap()),
        Some(Lifecycle::Churned)
    );
}
