//! profile-cache against real, throwaway redis-server processes (one per test).

use std::time::Duration;

use profile_cache::testing::RedisServer;
use profile_cache::{
    ConsentChange, ConsentMask, ConsentStatus, Context, Event, EventKind, Item, Lifecycle,
    ProfileConfig, ProfileId, ProfileUpdate, Purpose, RedisProfiles, StoreError, Value,
};
use redis::AsyncCommands;
use time::OffsetDateTime;
use time::macros::datetime;
use uuid::Uuid;

const NOW: OffsetDateTime = datetime!(2026-11-29 12:00:00 UTC);

fn ev(n: u128, kind: EventKind, minutes_ago: i64) -> Event {
    Event {
        message_id: Uuid::from_u128(n),
        kind,
        name: None,
        timestamp: NOW - time::Duration::minutes(minutes_ago),
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

fn update(profile: ProfileId, events: Vec<Event>) -> ProfileUpdate {
    ProfileUpdate {
        profile,
        anonymous_id: Some("anon-1".into()),
        user_id: None,
        context: Context {
            session_id: Some("s1".into()),
            ..Default::default()
        },
        events,
    }
}

fn anon() -> ProfileId {
    ProfileId::anonymous("anon-1").unwrap()
}

async fn store(redis: &RedisServer, config: ProfileConfig) -> RedisProfiles {
    RedisProfiles::connect(&redis.url(), config).await.unwrap()
}

async fn raw(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
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

#[tokio::test]
async fn a_shopping_session_yields_exact_profile_values() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis, ProfileConfig::default()).await;
    let report = store.apply(&[update(anon(), shopping())]).await.unwrap();
    assert_eq!((report.applied, report.duplicates), (13, 0));

    let p = store.profile(&anon(), NOW).await.unwrap().unwrap();
    assert_eq!(p.id, anon());
    assert_eq!(p.anonymous_ids, ["anon-1"]);
    assert_eq!(p.first_seen, NOW - time::Duration::minutes(60));
    assert_eq!(p.last_seen, NOW - time::Duration::minutes(1));
    assert_eq!(p.events, 13);
    assert_eq!(p.page_views, 1);
    assert_eq!(p.sessions, 1);
    assert_eq!(p.event_counts["Signed Up"], 1);
    assert_eq!(p.event_counts["cart_add"], 3);
    assert_eq!(p.event_counts["product_viewed"], 2);
    assert_eq!(p.traits["email"], "ada@example.com");
    assert_eq!(p.traits["age"], "36");
    assert_eq!(p.traits["score"], "0.75");
    assert_eq!(p.traits["vip"], "true");
    let viewed: Vec<_> = p
        .recently_viewed
        .iter()
        .map(|v| v.product_id.as_str())
        .collect();
    assert_eq!(viewed, ["sku-2", "sku-1"]);
    assert_eq!(p.recently_viewed[0].at, NOW - time::Duration::minutes(30));
    assert_eq!(
        p.categories_viewed,
        [("hats".to_string(), 1), ("shoes".to_string(), 1)]
    );
    assert_eq!(p.categories_bought, [("shoes".to_string(), 2)]);
    // The order emptied the cart; only what was added afterwards is left.
    assert_eq!(p.cart.len(), 1);
    assert_eq!(p.cart[0].product_id, "sku-3");
    assert_eq!(p.cart[0].quantity, 2);
    assert_eq!(p.cart[0].price, 500);
    assert_eq!(p.cart[0].category.as_deref(), Some("socks"));
    assert_eq!(p.cart_updated_at, Some(NOW - time::Duration::minutes(1)));
    assert_eq!(p.orders, 1);
    // No explicit revenue: the sum of the items.
    assert_eq!(p.revenue, 10_000);
    assert_eq!(p.last_order_at, Some(NOW - time::Duration::minutes(10)));
    assert_eq!(p.email_opens, 1);
    assert_eq!(p.email_clicks, 1);
    assert_eq!(p.last_engaged_at, Some(NOW - time::Duration::minutes(2)));
    assert_eq!(p.lifecycle, Lifecycle::New);
    assert_eq!(
        p.consent[&Purpose::Analytics].status,
        ConsentStatus::Granted
    );
    assert_eq!(p.consent[&Purpose::Marketing].status, ConsentStatus::Denied);
    assert_eq!(
        p.consent[&Purpose::Marketing].at,
        NOW - time::Duration::minutes(5)
    );
    assert!(!p.consent.contains_key(&Purpose::Necessary));
}

#[tokio::test]
async fn cart_lines_follow_adds_and_removes() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis, ProfileConfig::default()).await;
    let events = vec![
        with_items(
            ev(1, EventKind::CartAdd, 5),
            vec![item("a", "x", 100, 2), item("b", "y", 200, 1)],
        ),
        with_items(
            ev(2, EventKind::CartRemove, 4),
            vec![item("b", "y", 200, 5)],
        ),
        with_items(ev(3, EventKind::CartAdd, 3), vec![item("a", "x", 150, 1)]),
    ];
    store.apply(&[update(anon(), events)]).await.unwrap();
    let p = store.profile(&anon(), NOW).await.unwrap().unwrap();
    assert_eq!(p.cart.len(), 1);
    assert_eq!((p.cart[0].quantity, p.cart[0].price), (3, 150));
    assert_eq!(p.orders, 0);
}

#[tokio::test]
async fn retried_updates_count_once() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis, ProfileConfig::default()).await;
    let u = update(anon(), shopping());
    store.apply(std::slice::from_ref(&u)).await.unwrap();
    let again = store.apply(&[u]).await.unwrap();
    assert_eq!((again.applied, again.duplicates), (0, 13));
    // A duplicate inside one update counts once too.
    let twice = update(
        anon(),
        vec![ev(50, EventKind::Page, 0), ev(50, EventKind::Page, 0)],
    );
    let r = store.apply(&[twice]).await.unwrap();
    assert_eq!((r.applied, r.duplicates), (1, 1));
    let p = store.profile(&anon(), NOW).await.unwrap().unwrap();
    assert_eq!(p.events, 14);
    assert_eq!(p.page_views, 2);
    assert_eq!(p.orders, 1);
    assert_eq!(p.revenue, 10_000);
    let mut conn = raw(&redis).await;
    let len: u64 = conn.xlen("stream:events").await.unwrap();
    assert_eq!(len, 14, "the event stream holds applied events only");
}

#[tokio::test]
async fn one_apply_updates_several_profiles_and_find_resolves_ids() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis, ProfileConfig::default()).await;
    let user = ProfileId::user("user-7").unwrap();
    let mut u2 = update(
        user.clone(),
        vec![ev(2, EventKind::Page, 0), ev(3, EventKind::Page, 0)],
    );
    u2.user_id = Some("user-7".into());
    let r = store
        .apply(&[update(anon(), vec![ev(1, EventKind::Page, 0)]), u2])
        .await
        .unwrap();
    assert_eq!(r.applied, 3);
    let p = store.find("user-7", NOW).await.unwrap().unwrap();
    assert_eq!((p.id, p.page_views), (user, 2));
    assert_eq!(p.user_id.as_deref(), Some("user-7"));
    let p = store.find("anon-1", NOW).await.unwrap().unwrap();
    assert_eq!(p.page_views, 1);
    assert!(store.find("nobody", NOW).await.unwrap().is_none());
    assert!(store.find("bad{id}", NOW).await.unwrap().is_none());
}

#[tokio::test]
async fn the_event_stream_carries_the_event_and_is_capped() {
    let redis = RedisServer::start().unwrap();
    let config = ProfileConfig {
        event_stream_max_len: 10,
        ..ProfileConfig::default()
    };
    let store = store(&redis, config).await;
    let mut e = ev(1, EventKind::Track, 0);
    e.name = Some("Clicked".into());
    e.properties = vec![("button".into(), Value::String("buy".into()))];
    store.apply(&[update(anon(), vec![e])]).await.unwrap();
    let mut conn = raw(&redis).await;
    let entries: redis::streams::StreamRangeReply = conn.xrange_all("stream:events").await.unwrap();
    let entry = &entries.ids[0];
    let get = |f: &str| -> String { entry.get(f).unwrap() };
    assert_eq!(get("profile"), "a:anon-1");
    assert_eq!(get("kind"), "track");
    let event: serde_json::Value = serde_json::from_str(&get("event")).unwrap();
    assert_eq!(event["name"], "Clicked");
    assert_eq!(event["properties"]["button"], "buy");
    assert_eq!(event["message_id"], Uuid::from_u128(1).to_string());
    assert_eq!(event["context"]["session_id"], "s1");

    // Approximate trimming removes whole nodes (100 entries by default), so after 1000
    // events the stream is far below 1000 but at least the cap.
    for chunk in 0..10u128 {
        let events = (0..100)
            .map(|i| ev(1000 + chunk * 100 + i, EventKind::Page, 0))
            .collect();
        store.apply(&[update(anon(), events)]).await.unwrap();
    }
    let len: u64 = conn.xlen("stream:events").await.unwrap();
    assert!((10..=200).contains(&len), "stream length {len}");
}

#[tokio::test]
async fn message_ids_are_forgotten_after_the_dedupe_window() {
    let redis = RedisServer::start().unwrap();
    let config = ProfileConfig {
        dedupe_window: Duration::from_secs(3600),
        dedupe_max_ids: 3,
        ..ProfileConfig::default()
    };
    let store = store(&redis, config).await;
    let old = |n| {
        let mut e = ev(n, EventKind::Page, 120);
        e.received_at = NOW - time::Duration::hours(2);
        e
    };
    store.apply(&[update(anon(), vec![old(1)])]).await.unwrap();
    // Two hours later the id is outside the window: a replay is applied again.
    let r = store
        .apply(&[update(anon(), vec![ev(1, EventKind::Page, 0)])])
        .await
        .unwrap();
    assert_eq!(r.applied, 1);
    // The count cap keeps the newest ids.
    let events = (2..=6).map(|n| ev(n, EventKind::Page, 0)).collect();
    store.apply(&[update(anon(), events)]).await.unwrap();
    let mut conn = raw(&redis).await;
    let kept: u64 = conn.zcard("profile:{a:anon-1}:dedupe").await.unwrap();
    assert_eq!(kept, 3);
}

#[tokio::test]
async fn a_restarted_redis_without_the_script_is_handled() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis, ProfileConfig::default()).await;
    store
        .apply(&[update(anon(), vec![ev(1, EventKind::Page, 0)])])
        .await
        .unwrap();
    let mut conn = raw(&redis).await;
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    let r = store
        .apply(&[update(anon(), vec![ev(2, EventKind::Page, 0)])])
        .await
        .unwrap();
    assert_eq!(r.applied, 1);
    let p = store.profile(&anon(), NOW).await.unwrap().unwrap();
    assert_eq!(p.page_views, 2);
}

#[tokio::test]
async fn an_unreachable_redis_is_unavailable() {
    let redis = RedisServer::start().unwrap();
    let config = ProfileConfig {
        redis_timeout: Duration::from_millis(300),
        ..ProfileConfig::default()
    };
    let store = store(&redis, config).await;
    drop(redis);
    let err = store
        .apply(&[update(anon(), vec![ev(1, EventKind::Page, 0)])])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(matches!(
        store.ping().await,
        Err(StoreError::Unavailable(_))
    ));
}

#[tokio::test]
async fn corrupt_data_is_reported_by_key_and_field_and_nothing_is_half_applied() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis, ProfileConfig::default()).await;
    let mut conn = raw(&redis).await;
    let _: () = conn
        .hset("profile:{a:anon-1}", "orders", "abc")
        .await
        .unwrap();
    let _: () = conn
        .hset("profile:{a:anon-1}", "page_views", "4")
        .await
        .unwrap();
    let err = store
        .apply(&[update(anon(), vec![ev(1, EventKind::Page, 0)])])
        .await
        .unwrap_err();
    match err {
        StoreError::Corrupt { key, field, .. } => {
            assert_eq!(
                (key.as_str(), field.as_str()),
                ("profile:{a:anon-1}", "orders")
            );
        }
        other => panic!("{other:?}"),
    }
    let page_views: String = conn.hget("profile:{a:anon-1}", "page_views").await.unwrap();
    assert_eq!(page_views, "4", "nothing was written");
    let dedupe: u64 = conn.exists("profile:{a:anon-1}:dedupe").await.unwrap();
    assert_eq!(dedupe, 0);
    let err = store.profile(&anon(), NOW).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { field, .. } if field == "orders"),
        "{err:?}"
    );

    // A broken cart line, and a key of the wrong type.
    let user = ProfileId::user("u1").unwrap();
    let _: () = conn
        .hset("profile:{u:u1}:cart", "sku", "{not json")
        .await
        .unwrap();
    let add = with_items(ev(2, EventKind::CartAdd, 0), vec![item("sku", "c", 1, 1)]);
    let err = store.apply(&[update(user, vec![add])]).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { key, field, .. } if key == "profile:{u:u1}:cart" && field == "sku"),
        "{err:?}"
    );
    let _: () = conn.set("profile:{u:u2}:counts", "x").await.unwrap();
    let err = store
        .apply(&[update(
            ProfileId::user("u2").unwrap(),
            vec![ev(3, EventKind::Page, 0)],
        )])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { key, .. } if key == "profile:{u:u2}:counts"),
        "{err:?}"
    );
}

#[tokio::test]
async fn another_schema_version_is_refused() {
    let redis = RedisServer::start().unwrap();
    let mut conn = raw(&redis).await;
    let _: () = conn.set("meta:schema_version", "99").await.unwrap();
    let err = RedisProfiles::connect(&redis.url(), ProfileConfig::default())
        .await
        .err()
        .expect("refused");
    assert_eq!(
        err.to_string(),
        "redis holds key schema version 99, this build reads version 1"
    );
}

#[tokio::test]
async fn lifecycle_is_computed_at_read_time() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis, ProfileConfig::default()).await;
    store
        .apply(&[update(anon(), vec![ev(1, EventKind::Page, 0)])])
        .await
        .unwrap();
    let later = |days| NOW + time::Duration::days(days);
    let stage = |p: Option<profile_cache::Profile>| p.unwrap().lifecycle;
    assert_eq!(
        stage(store.profile(&anon(), later(1)).await.unwrap()),
        Lifecycle::New
    );
    assert_eq!(
        stage(store.profile(&anon(), later(40)).await.unwrap()),
        Lifecycle::Dormant
    );
    assert_eq!(
        stage(store.profile(&anon(), later(100)).await.unwrap()),
        Lifecycle::Churned
    );
}
