//! Identity against real, throwaway redis-server processes: an anonymous visitor's history
//! merging into the user profile when the visitor identifies, later events and retries of
//! the visitor landing once on the user profile, merges interrupted between their steps,
//! concurrent merges, and the guards (an anonymous profile belongs to one user at most; a
//! user profile takes a bounded number of anonymous ids).

use profile_cache::testing::{RedisServer, segments};
use profile_cache::{
    ApplyReport, ConsentChange, ConsentMask, ConsentStatus, Context, Event, EventKind, Item,
    MergeOutcome, ProfileConfig, ProfileId, ProfileUpdate, Purpose, RedisProfiles, Step, Value,
};
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use time::OffsetDateTime;
use time::macros::datetime;
use uuid::Uuid;

const NOW: OffsetDateTime = datetime!(2026-11-29 12:00:00 UTC);

fn at(minutes: i64) -> OffsetDateTime {
    NOW + time::Duration::minutes(minutes)
}

fn ms(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

fn alice() -> ProfileId {
    ProfileId::user("alice").unwrap()
}

fn visitor() -> ProfileId {
    ProfileId::anonymous("v1").unwrap()
}

/// Event `n` of `kind`, happened and received at `t`.
fn ev(n: u128, kind: EventKind, t: OffsetDateTime) -> Event {
    Event {
        message_id: Uuid::from_u128(n),
        kind,
        name: None,
        timestamp: t,
        received_at: t,
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

fn with_item(mut e: Event, product: &str, quantity: u32) -> Event {
    e.items = vec![Item {
        product_id: product.into(),
        category: Some("shoes".into()),
        price: 4_500,
        quantity,
        name: None,
    }];
    e
}

fn consent(n: u128, t: OffsetDateTime, granted: u8, denied: u8) -> Event {
    Event {
        consent: Some(ConsentChange {
            granted: ConsentMask(granted),
            denied: ConsentMask(denied),
        }),
        purpose: Purpose::Necessary,
        ..ev(n, EventKind::ConsentChange, t)
    }
}

/// The visitor's batch before logging in: anonymous id only.
fn anonymous(id: &str, events: Vec<Event>) -> ProfileUpdate {
    ProfileUpdate {
        profile: ProfileId::anonymous(id).unwrap(),
        anonymous_id: Some(id.into()),
        user_id: None,
        context: Context {
            session_id: Some(format!("s-{id}")),
            ..Context::default()
        },
        events,
    }
}

/// A batch of user `user` sent from the browser of anonymous visitor `anon`.
fn identified(user: &str, anon: Option<&str>, events: Vec<Event>) -> ProfileUpdate {
    ProfileUpdate {
        profile: ProfileId::user(user).unwrap(),
        anonymous_id: anon.map(String::from),
        user_id: Some(user.into()),
        context: Context {
            session_id: Some(format!("s-{user}")),
            ..Context::default()
        },
        events,
    }
}

fn report(applied: u64, duplicates: u64) -> ApplyReport {
    ApplyReport {
        applied,
        duplicates,
        ..ApplyReport::default()
    }
}

async fn keys_of(conn: &mut MultiplexedConnection, id: &ProfileId) -> Vec<String> {
    let mut keys: Vec<String> = conn.keys(format!("profile:{{{id}}}*")).await.unwrap();
    keys.sort();
    keys
}

async fn store_with(redis: &RedisServer, config: ProfileConfig, toml: &str) -> RedisProfiles {
    RedisProfiles::connect(&redis.url(), config)
        .await
        .unwrap()
        .with_segments(&segments(toml))
        .await
        .unwrap()
}

const SEGMENTS: &str = r#"
[[segments]]
name = "visitors"
condition = { metric = { field = "page_views", at_least = 1 } }
[[segments]]
name = "regulars"
condition = { metric = { field = "page_views", at_least = 3 } }
[[segments]]
name = "shoe_fans"
condition = { event_count = { event = "product_viewed", category = "shoes", within = "24h", at_least = 2 } }
"#;

/// Alice's history as a known user, then a visitor's history in another browser.
async fn two_histories(store: &RedisProfiles) {
    let mut own = vec![
        ev(1, EventKind::Page, at(-60)),
        with_item(ev(2, EventKind::CartAdd, at(-60)), "boot", 2),
        with_item(ev(3, EventKind::ProductViewed, at(-60)), "boot", 1),
        consent(4, at(-60), 0, 1 << 1),
    ];
    let mut identify = ev(5, EventKind::Identify, at(-60));
    identify.properties = vec![("email".into(), Value::String("a@example.com".into()))];
    own.push(identify);
    assert_eq!(
        store
            .apply(&[identified("alice", None, own)])
            .await
            .unwrap(),
        report(5, 0)
    );
    let browsing = vec![
        ev(11, EventKind::Page, at(-10)),
        ev(12, EventKind::Page, at(-9)),
        with_item(ev(13, EventKind::ProductViewed, at(-8)), "sandal", 1),
        with_item(ev(14, EventKind::CartAdd, at(-7)), "boot", 1),
        with_item(ev(15, EventKind::CartAdd, at(-7)), "sock", 3),
        consent(16, at(-6), 1 << 1 | 1 << 2, 0),
    ];
    assert_eq!(
        store.apply(&[anonymous("v1", browsing)]).await.unwrap(),
        report(6, 0)
    );
}

#[tokio::test]
async fn a_visitor_who_logs_in_brings_their_history_into_the_user_profile() {
    let redis = RedisServer::start().unwrap();
    let store = store_with(&redis, ProfileConfig::default(), SEGMENTS).await;
    two_histories(&store).await;
    let before = store.profile(&visitor(), at(-5)).await.unwrap().unwrap();
    assert_eq!(before.segments.len(), 1, "{:?}", before.segments); // visitors

    // The visitor logs in: the batch carries both ids.
    let login = identified("alice", Some("v1"), vec![ev(21, EventKind::Page, at(-5))]);
    let r = store.apply(&[login]).await.unwrap();
    assert_eq!(
        r,
        ApplyReport {
            merged: 1,
            ..report(1, 0)
        }
    );

    let p = store.profile(&alice(), at(-5)).await.unwrap().unwrap();
    assert_eq!(p.anonymous_ids, ["v1"]);
    assert_eq!((p.page_views, p.events), (4, 12));
    assert_eq!(p.first_seen, at(-60));
    assert_eq!(p.last_seen, at(-5));
    assert_eq!(p.event_counts["page"], 4);
    assert_eq!(p.event_counts["cart_add"], 3);
    assert_eq!(p.event_counts["product_viewed"], 2);
    assert_eq!(p.categories_viewed, [("shoes".to_string(), 2)]);
    let viewed: Vec<_> = p
        .recently_viewed
        .iter()
        .map(|v| v.product_id.as_str())
        .collect();
    assert_eq!(viewed, ["sandal", "boot"]);
    // Cart lines: the larger quantity of each product.
    let cart: Vec<_> = p
        .cart
        .iter()
        .map(|l| (l.product_id.as_str(), l.quantity))
        .collect();
    assert_eq!(cart, [("boot", 2), ("sock", 3)]);
    // Consent: the latest answer per purpose, whichever profile gave it.
    assert_eq!(
        p.consent[&Purpose::Analytics].status,
        ConsentStatus::Granted
    );
    assert_eq!(p.consent[&Purpose::Analytics].at, at(-6));
    assert_eq!(
        p.consent[&Purpose::Personalization].status,
        ConsentStatus::Granted
    );
    assert_eq!(p.traits["email"], "a@example.com");
    // Segments re-evaluated on the merged history (two shoe views in 24 h, four pages).
    let names: Vec<_> = p.segments.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["regulars", "shoe_fans", "visitors"]);

    // The visitor's profile is gone but for the redirect, and reading it finds Alice.
    let mut conn = redis.connection().await;
    assert_eq!(keys_of(&mut conn, &visitor()).await, ["profile:{a:v1}"]);
    let stub: Vec<(String, String)> = conn.hgetall("profile:{a:v1}").await.unwrap();
    assert_eq!(
        stub,
        [
            ("merged_into".to_string(), "u:alice".to_string()),
            ("merge_state".into(), "done".into()),
            ("merged_at".into(), ms(at(-5)).to_string()),
        ]
    );
    let found = store.find("v1", at(-5)).await.unwrap().unwrap();
    assert_eq!(found.id, alice());
    let visitors: Vec<String> = conn
        .zrange("segment:{visitors}:members", 0, -1)
        .await
        .unwrap();
    assert_eq!(visitors, ["u:alice"]);
    let merges: Vec<(String, String)> = conn.hgetall("profile:{u:alice}:merges").await.unwrap();
    assert_eq!(merges, [("a:v1".to_string(), ms(at(-5)).to_string())]);

    // Transitions: the visitor left with reason `merged`; Alice entered what the merged
    // history qualifies for, also with reason `merged`.
    let entries: redis::streams::StreamRangeReply =
        conn.xrange_all("stream:transitions").await.unwrap();
    let moves: Vec<(String, String, String, String)> = entries
        .ids
        .iter()
        .map(|e| {
            let f = |k: &str| e.get::<String>(k).unwrap();
            (f("profile"), f("segment"), f("change"), f("reason"))
        })
        .filter(|m| m.3 == "merged")
        .collect();
    let m = |p: &str, s: &str, c: &str| {
        (
            p.to_string(),
            s.to_string(),
            c.to_string(),
            "merged".to_string(),
        )
    };
    assert_eq!(moves.len(), 3, "{moves:?}");
    assert!(
        moves.contains(&m("u:alice", "regulars", "enter")),
        "{moves:?}"
    );
    assert!(
        moves.contains(&m("u:alice", "shoe_fans", "enter")),
        "{moves:?}"
    );
    assert!(moves.contains(&m("a:v1", "visitors", "exit")), "{moves:?}");
}

#[tokio::test]
async fn after_the_merge_the_visitors_events_and_retries_land_once_on_the_user() {
    let redis = RedisServer::start().unwrap();
    let store = store_with(&redis, ProfileConfig::default(), SEGMENTS).await;
    two_histories(&store).await;
    let login = identified("alice", Some("v1"), vec![ev(21, EventKind::Page, at(-5))]);
    store.apply(&[login]).await.unwrap();

    // A batch with the anonymous id only (a backend call, a tab that missed the login)...
    let later = anonymous("v1", vec![ev(31, EventKind::Page, at(-4))]);
    assert_eq!(store.apply(&[later]).await.unwrap(), report(1, 0));
    // ...and a retry of a batch the visitor sent before logging in.
    let retry = anonymous("v1", vec![ev(11, EventKind::Page, at(-10))]);
    assert_eq!(store.apply(&[retry]).await.unwrap(), report(0, 1));

    let p = store.profile(&alice(), at(-4)).await.unwrap().unwrap();
    assert_eq!(p.page_views, 5);
    let mut conn = redis.connection().await;
    assert_eq!(keys_of(&mut conn, &visitor()).await, ["profile:{a:v1}"]);
    // The event stream names the profile the event was applied to.
    let entries: redis::streams::StreamRangeReply = conn.xrange_all("stream:events").await.unwrap();
    let last = entries.ids.last().unwrap();
    assert_eq!(last.get::<String>("profile").unwrap(), "u:alice");
}

#[tokio::test]
async fn a_merge_interrupted_after_the_seal_finishes_with_the_next_update() {
    let redis = RedisServer::start().unwrap();
    let store = store_with(&redis, ProfileConfig::default(), SEGMENTS).await;
    two_histories(&store).await;
    // What the first step leaves behind when the collector dies right after it.
    let mut conn = redis.connection().await;
    let _: () = conn
        .hset_multiple(
            "profile:{a:v1}",
            &[("merged_into", "u:alice"), ("merge_state", "sealed")],
        )
        .await
        .unwrap();

    // The visitor's next batch finishes the merge and then lands on Alice.
    let next = anonymous("v1", vec![ev(31, EventKind::Page, at(-4))]);
    assert_eq!(
        store.apply(&[next]).await.unwrap(),
        ApplyReport {
            merged: 1,
            ..report(1, 0)
        }
    );
    let p = store.profile(&alice(), at(-4)).await.unwrap().unwrap();
    assert_eq!((p.page_views, p.events), (4, 12));
    assert_eq!(keys_of(&mut conn, &visitor()).await, ["profile:{a:v1}"]);

    // Running the merge again, by anyone, changes nothing.
    for _ in 0..2 {
        assert_eq!(
            store.merge(&visitor(), &alice(), at(-3)).await.unwrap(),
            MergeOutcome::Merged
        );
    }
    let again = store.profile(&alice(), at(-4)).await.unwrap().unwrap();
    assert_eq!(again, p);
}

#[tokio::test]
async fn a_login_applied_but_not_merged_is_merged_by_its_retry() {
    let redis = RedisServer::start().unwrap();
    let store = store_with(&redis, ProfileConfig::default(), SEGMENTS).await;
    two_histories(&store).await;
    let login = identified("alice", Some("v1"), vec![ev(21, EventKind::Page, at(-5))]);
    store.apply(std::slice::from_ref(&login)).await.unwrap();
    // Undo the merge's record on Alice's side only, as if the collector had died after the
    // login's update and before the merge (the visitor's keys stay merged here, which the
    // seal reports as done).
    let mut conn = redis.connection().await;
    let _: () = conn.hdel("profile:{u:alice}:merges", "a:v1").await.unwrap();
    let r = store.apply(&[login]).await.unwrap();
    assert_eq!(
        r,
        ApplyReport {
            merged: 1,
            ..report(0, 1)
        }
    );
}

#[tokio::test]
async fn concurrent_logins_merge_the_visitor_once() {
    let redis = RedisServer::start().unwrap();
    let config = ProfileConfig::default();
    let a = store_with(&redis, config.clone(), SEGMENTS).await;
    let b = store_with(&redis, config, SEGMENTS).await;
    two_histories(&a).await;
    let login = identified("alice", Some("v1"), vec![ev(21, EventKind::Page, at(-5))]);
    let (ra, rb) = tokio::join!(
        a.apply(std::slice::from_ref(&login)),
        b.apply(std::slice::from_ref(&login))
    );
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ra.applied + rb.applied, 1);
    let p = a.profile(&alice(), at(-5)).await.unwrap().unwrap();
    assert_eq!((p.page_views, p.events), (4, 12));
}

#[tokio::test]
async fn a_visitor_merged_into_one_user_is_never_merged_into_another() {
    let redis = RedisServer::start().unwrap();
    let store = store_with(&redis, ProfileConfig::default(), SEGMENTS).await;
    two_histories(&store).await;
    store
        .apply(&[identified(
            "alice",
            Some("v1"),
            vec![ev(21, EventKind::Page, at(-5))],
        )])
        .await
        .unwrap();
    let alice_before = store.profile(&alice(), at(-5)).await.unwrap().unwrap();

    // Bob logs in on the same browser (a shared computer): his batch carries v1 too.
    let bob = identified("bob", Some("v1"), vec![ev(41, EventKind::Page, at(-4))]);
    assert_eq!(
        store.apply(std::slice::from_ref(&bob)).await.unwrap(),
        ApplyReport {
            merges_refused: 1,
            ..report(1, 0)
        }
    );
    let p = store
        .profile(&ProfileId::user("bob").unwrap(), at(-4))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((p.page_views, p.events), (1, 1));
    assert!(p.anonymous_ids.is_empty(), "{:?}", p.anonymous_ids);
    assert_eq!(
        store.profile(&alice(), at(-5)).await.unwrap().unwrap(),
        alice_before
    );
    // Bob's next batch does not try again.
    let next = identified("bob", Some("v1"), vec![ev(42, EventKind::Page, at(-3))]);
    assert_eq!(store.apply(&[next]).await.unwrap(), report(1, 0));
    let mut conn = redis.connection().await;
    let merges: Vec<(String, String)> = conn.hgetall("profile:{u:bob}:merges").await.unwrap();
    assert_eq!(merges, [("a:v1".to_string(), "refused".to_string())]);
}

#[tokio::test]
async fn a_user_profile_takes_at_most_the_configured_number_of_anonymous_ids() {
    let redis = RedisServer::start().unwrap();
    let config = ProfileConfig {
        max_anonymous_ids: 2,
        ..ProfileConfig::default()
    };
    let store = store_with(&redis, config, SEGMENTS).await;
    for (n, device) in [(1u128, "d1"), (2, "d2"), (3, "d3")] {
        store
            .apply(&[anonymous(
                device,
                vec![ev(n * 10, EventKind::Page, at(-30))],
            )])
            .await
            .unwrap();
    }
    let mut reports = Vec::new();
    for (n, device) in [(1u128, "d1"), (2, "d2"), (3, "d3")] {
        let login = identified(
            "alice",
            Some(device),
            vec![ev(n * 10 + 1, EventKind::Page, at(-20))],
        );
        reports.push(store.apply(&[login]).await.unwrap());
    }
    assert_eq!(
        reports,
        [
            ApplyReport {
                merged: 1,
                ..report(1, 0)
            },
            ApplyReport {
                merged: 1,
                ..report(1, 0)
            },
            ApplyReport {
                ids_over_limit: 1,
                ..report(1, 0)
            },
        ]
    );
    let p = store.profile(&alice(), at(-20)).await.unwrap().unwrap();
    assert_eq!(p.anonymous_ids, ["d1", "d2"]);
    assert_eq!(p.page_views, 5);
    // The third device keeps its own profile.
    let d3 = store.find("d3", at(-20)).await.unwrap().unwrap();
    assert_eq!((d3.id.as_str(), d3.page_views), ("a:d3", 1));
}

#[tokio::test]
async fn deadlines_and_rebuilds_skip_merged_profiles() {
    let redis = RedisServer::start().unwrap();
    let store = store_with(&redis, ProfileConfig::default(), SEGMENTS).await;
    two_histories(&store).await;
    let mut conn = redis.connection().await;
    // The visitor entered `visitors`; give it a deadline as a time-based segment would.
    let _: () = conn
        .zadd("schedule:deadlines", "a:v1", ms(at(60)))
        .await
        .unwrap();
    store
        .apply(&[identified(
            "alice",
            Some("v1"),
            vec![ev(21, EventKind::Page, at(-5))],
        )])
        .await
        .unwrap();
    let deadline: Option<f64> = conn.zscore("schedule:deadlines", "a:v1").await.unwrap();
    assert_eq!(deadline, None, "a merged profile has no deadline");
    // A rebuild walks every profile hash, the redirect included, and changes nothing.
    let mut rebuild = store.rebuild();
    let (mut changes, mut gone, mut failed) = (0, 0, 0);
    loop {
        match rebuild.step(at(-4)).await.unwrap() {
            Step::Evaluated(e) => {
                changes += e.changes;
                gone += e.gone;
                failed += e.failed;
                if e.finished {
                    break;
                }
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((changes, gone, failed), (0, 1, 0));
    assert_eq!(keys_of(&mut conn, &visitor()).await, ["profile:{a:v1}"]);
}

#[tokio::test]
async fn a_merge_cut_off_after_its_fold_is_finished_by_the_next_login_batch() {
    let redis = RedisServer::start().unwrap();
    let store = store_with(&redis, ProfileConfig::default(), SEGMENTS).await;
    two_histories(&store).await;
    let mut conn = redis.connection().await;
    // The visitor's keys as they are before the merge, to put back afterwards.
    let keys = keys_of(&mut conn, &visitor()).await;
    let mut dumps = Vec::new();
    for key in &keys {
        let dump: Vec<u8> = redis::cmd("DUMP")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        dumps.push((key.clone(), dump));
    }
    let login = identified("alice", Some("v1"), vec![ev(21, EventKind::Page, at(-5))]);
    store.apply(std::slice::from_ref(&login)).await.unwrap();
    let merged = store.profile(&alice(), at(-5)).await.unwrap().unwrap();

    // The state a crash between the fold and the last step leaves: the history is in
    // Alice's profile, the visitor's keys are all still there (sealed), and the fold is
    // recorded as `folded`.
    for (key, dump) in &dumps {
        let _: () = redis::cmd("RESTORE")
            .arg(key)
            .arg(0)
            .arg(dump)
            .arg("REPLACE")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let _: () = conn
        .hset_multiple(
            "profile:{a:v1}",
            &[("merged_into", "u:alice"), ("merge_state", "sealed")],
        )
        .await
        .unwrap();
    let _: () = conn
        .hset("profile:{u:alice}:merges", "a:v1", "folded")
        .await
        .unwrap();

    // The retried login batch (all duplicates) finishes the merge without folding again.
    let r = store.apply(&[login]).await.unwrap();
    assert_eq!(
        r,
        ApplyReport {
            merged: 1,
            ..report(0, 1)
        }
    );
    assert_eq!(keys_of(&mut conn, &visitor()).await, ["profile:{a:v1}"]);
    assert_eq!(
        store.profile(&alice(), at(-5)).await.unwrap().unwrap(),
        merged
    );
    let merges: Vec<(String, String)> = conn.hgetall("profile:{u:alice}:merges").await.unwrap();
    assert_eq!(merges, [("a:v1".to_string(), ms(at(-5)).to_string())]);
    // And the next batch does not ask again.
    let next = identified("alice", Some("v1"), vec![ev(22, EventKind::Page, at(-4))]);
    assert_eq!(store.apply(&[next]).await.unwrap(), report(1, 0));
}
