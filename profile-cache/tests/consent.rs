//! Consent on the server against real, throwaway redis-server processes: each answer's
//! source and the profile's consent history, and what withdrawing personalization or
//! marketing removes, at once and while it stays withdrawn.

use profile_cache::testing::{RedisServer, segments};
use profile_cache::{
    ConsentChange, ConsentMask, ConsentRecord, ConsentStatus, Context, Event, EventKind, Item,
    ProfileConfig, ProfileId, ProfileUpdate, Purpose, RedisProfiles, Value,
};
use redis::AsyncCommands;
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

fn ada() -> ProfileId {
    ProfileId::user("ada").unwrap()
}

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

/// A consent change from `source` (the tracker's `source` property).
fn answer(
    n: u128,
    t: OffsetDateTime,
    granted: &[Purpose],
    denied: &[Purpose],
    source: &str,
) -> Event {
    let mask = |ps: &[Purpose]| ConsentMask(ps.iter().map(|p| p.bit()).fold(0, |a, b| a | b));
    Event {
        consent: Some(ConsentChange {
            granted: mask(granted),
            denied: mask(denied),
        }),
        purpose: Purpose::Necessary,
        properties: vec![("source".into(), Value::String(source.into()))],
        ..ev(n, EventKind::ConsentChange, t)
    }
}

fn view(n: u128, t: OffsetDateTime, product: &str) -> Event {
    Event {
        items: vec![Item {
            product_id: product.into(),
            category: Some("shoes".into()),
            price: 4_500,
            quantity: 1,
            name: None,
        }],
        ..ev(n, EventKind::ProductViewed, t)
    }
}

fn identify(n: u128, t: OffsetDateTime, traits: &[(&str, &str)]) -> Event {
    Event {
        properties: traits
            .iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect(),
        ..ev(n, EventKind::Identify, t)
    }
}

fn update(events: Vec<Event>) -> ProfileUpdate {
    ProfileUpdate {
        profile: ada(),
        anonymous_id: None,
        user_id: Some("ada".into()),
        context: Context::default(),
        events,
    }
}

async fn store(redis: &RedisServer, toml: &str) -> RedisProfiles {
    RedisProfiles::connect(&redis.url(), ProfileConfig::default())
        .await
        .unwrap()
        .with_segments(&segments(toml))
        .await
        .unwrap()
}

const NEWSLETTER: &str = r#"
[[segments]]
name = "newsletter"
condition = { all = [{ consent_granted = "marketing" }, { trait = { name = "email", exists = true } }] }
"#;

#[tokio::test]
async fn each_answer_keeps_its_source_and_the_history_keeps_every_answer() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis, NEWSLETTER).await;
    let m = Purpose::Marketing;
    store
        .apply(&[update(vec![answer(1, at(-30), &[m], &[], "api")])])
        .await
        .unwrap();
    // A CMP's decision, then an older answer that arrives late (a retried batch).
    store
        .apply(&[update(vec![
            answer(2, at(-10), &[], &[m], "tcf"),
            answer(3, at(-20), &[m], &[], "gcm"),
        ])])
        .await
        .unwrap();
    let p = store.profile(&ada(), NOW).await.unwrap().unwrap();
    let state = &p.consent[&m];
    assert_eq!(
        (state.status, state.at, state.source.as_deref()),
        (ConsentStatus::Denied, at(-10), Some("tcf"))
    );
    let record = |t, status, source: &str| ConsentRecord {
        purpose: m,
        status,
        at: ms(t),
        source: Some(source.into()),
    };
    assert_eq!(
        p.consent_log,
        [
            record(at(-30), ConsentStatus::Granted, "api"),
            record(at(-20), ConsentStatus::Granted, "gcm"),
            record(at(-10), ConsentStatus::Denied, "tcf"),
        ]
    );
}

#[tokio::test]
async fn withdrawing_personalization_removes_browsing_affinities_until_granted_again() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis, NEWSLETTER).await;
    let p13n = Purpose::Personalization;
    store
        .apply(&[update(vec![
            answer(1, at(-30), &[p13n], &[], "api"),
            view(2, at(-29), "boot"),
        ])])
        .await
        .unwrap();
    let p = store.profile(&ada(), NOW).await.unwrap().unwrap();
    assert_eq!(p.recently_viewed.len(), 1);
    assert_eq!(p.categories_viewed, [("shoes".to_string(), 1)]);

    store
        .apply(&[update(vec![answer(3, at(-20), &[], &[p13n], "api")])])
        .await
        .unwrap();
    let mut conn = redis.connection().await;
    for key in ["viewed", "cat_viewed", "cat_bought"] {
        let exists: bool = conn
            .exists(format!("profile:{{u:ada}}:{key}"))
            .await
            .unwrap();
        assert!(!exists, "{key} is gone");
    }
    // Product views still count (analytics), but leave no affinities while denied.
    store
        .apply(&[update(vec![view(4, at(-10), "sandal")])])
        .await
        .unwrap();
    let p = store.profile(&ada(), NOW).await.unwrap().unwrap();
    assert!(p.recently_viewed.is_empty());
    assert!(p.categories_viewed.is_empty());
    assert_eq!(p.event_counts["product_viewed"], 2);

    store
        .apply(&[update(vec![
            answer(5, at(-5), &[p13n], &[], "api"),
            view(6, at(-4), "clog"),
        ])])
        .await
        .unwrap();
    let p = store.profile(&ada(), NOW).await.unwrap().unwrap();
    let viewed: Vec<_> = p
        .recently_viewed
        .iter()
        .map(|v| v.product_id.as_str())
        .collect();
    assert_eq!(viewed, ["clog"]);
}

#[tokio::test]
async fn withdrawing_marketing_removes_contact_traits_and_leaves_its_segments_at_once() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis, NEWSLETTER).await;
    let m = Purpose::Marketing;
    store
        .apply(&[update(vec![
            answer(1, at(-30), &[m], &[], "api"),
            identify(2, at(-29), &[("email", "ada@example.com"), ("plan", "pro")]),
        ])])
        .await
        .unwrap();
    let p = store.profile(&ada(), NOW).await.unwrap().unwrap();
    assert_eq!(p.segments.len(), 1, "in the newsletter segment");

    store
        .apply(&[update(vec![answer(3, at(-20), &[], &[m], "api")])])
        .await
        .unwrap();
    let p = store.profile(&ada(), NOW).await.unwrap().unwrap();
    assert!(p.segments.is_empty());
    assert_eq!(p.traits.get("email"), None);
    assert_eq!(p.traits["plan"], "pro");
    let mut conn = redis.connection().await;
    let members: Vec<String> = conn
        .zrange("segment:{newsletter}:members", 0, -1)
        .await
        .unwrap();
    assert!(members.is_empty());
    let entries: redis::streams::StreamRangeReply =
        conn.xrange_all("stream:transitions").await.unwrap();
    let last = entries.ids.last().unwrap();
    assert_eq!(last.get::<String>("change").unwrap(), "exit");
    assert_eq!(last.get::<String>("at").unwrap(), ms(at(-20)).to_string());

    // While marketing stays denied, an identify does not store the email again.
    store
        .apply(&[update(vec![identify(
            4,
            at(-10),
            &[("email", "ada@example.org")],
        )])])
        .await
        .unwrap();
    let p = store.profile(&ada(), NOW).await.unwrap().unwrap();
    assert_eq!(p.traits.get("email"), None);
    assert!(p.segments.is_empty());
}

#[tokio::test]
async fn a_merged_visitor_brings_their_consent_answers_and_history() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis, NEWSLETTER).await;
    let anonymous = ProfileUpdate {
        profile: ProfileId::anonymous("v9").unwrap(),
        anonymous_id: Some("v9".into()),
        user_id: None,
        context: Context::default(),
        events: vec![answer(1, at(-30), &[Purpose::Analytics], &[], "tcf")],
    };
    store.apply(&[anonymous]).await.unwrap();
    let mut login = update(vec![ev(2, EventKind::Page, at(-5))]);
    login.anonymous_id = Some("v9".into());
    store.apply(&[login]).await.unwrap();
    let p = store.profile(&ada(), NOW).await.unwrap().unwrap();
    let state = &p.consent[&Purpose::Analytics];
    assert_eq!(state.source.as_deref(), Some("tcf"));
    assert_eq!(
        p.consent_log,
        [ConsentRecord {
            purpose: Purpose::Analytics,
            status: ConsentStatus::Granted,
            at: ms(at(-30)),
            source: Some("tcf".into()),
        }]
    );
}
