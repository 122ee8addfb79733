//! Privacy rights against real, throwaway redis-server processes: an export holds every key
//! of the person and their entries in both streams (those of the anonymous profiles merged
//! in too); an erasure leaves nothing of them in any key, member, field or stream entry of
//! the whole Redis but the hashed suppression keys; late events for erased ids are dropped
//! and counted, also by a store connected afterwards; erasing twice, erasing an unknown id,
//! and finishing an interrupted erasure.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use profile_cache::keys;
use profile_cache::privacy::{Erasure, ErasureStatus, STREAM_PAGE, Scanned, StoredKey};
use profile_cache::testing::{RedisServer, free_port, segments};
use profile_cache::{
    ApplyReport, BatchReport, ConsentChange, ConsentMask, Context, Event, EventKind, Item, Outcome,
    ProfileId, ProfileUpdate, Purpose, RedisProfiles, Value,
};
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use time::OffsetDateTime;
use time::macros::datetime;
use uuid::Uuid;

const NOW: OffsetDateTime = datetime!(2026-11-29 12:00:00 UTC);

/// The person: a user who browsed from two devices before logging in on each.
const USER: &str = "alice-7c1e";
const PHONE: &str = "visitor-93fd";
const TABLET: &str = "tablet-51aa";
const EMAIL: &str = "alice.7c1e@example.com";
/// Someone else, whose data must stay.
const OTHER: &str = "bob-2d44";

const SEGMENTS: &str = r#"
[[segments]]
name = "visitors"
condition = { metric = { field = "page_views", at_least = 1 } }
[[segments]]
name = "shoe_fans"
condition = { event_count = { event = "product_viewed", category = "shoes", within = "24h", at_least = 1 } }
[[segments]]
name = "cart"
condition = { all = [
  { cart = "not_empty" },
  { older_than = { field = "cart_updated_at", duration = "30m" } },
] }
[[segments]]
name = "pro"
condition = { trait = { name = "plan", equals = "pro" } }
"#;

fn at(minutes: i64) -> OffsetDateTime {
    NOW + time::Duration::minutes(minutes)
}

fn ms(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

fn user(id: &str) -> ProfileId {
    ProfileId::user(id).unwrap()
}

fn anon(id: &str) -> ProfileId {
    ProfileId::anonymous(id).unwrap()
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

fn shoe(n: u128, kind: EventKind, t: OffsetDateTime) -> Event {
    Event {
        items: vec![Item {
            product_id: "boot".into(),
            category: Some("shoes".into()),
            price: 4_500,
            quantity: 1,
            name: None,
        }],
        ..ev(n, kind, t)
    }
}

fn update(profile: ProfileId, anonymous: Option<&str>, events: Vec<Event>) -> ProfileUpdate {
    let user_id = profile.as_str().strip_prefix("u:").map(String::from);
    ProfileUpdate {
        profile,
        anonymous_id: anonymous.map(String::from),
        user_id,
        context: Context {
            session_id: Some("s1".into()),
            ..Context::default()
        },
        events,
    }
}

fn message_id(n: u128) -> String {
    Uuid::from_u128(n).simple().to_string()
}

async fn store(redis: &RedisServer) -> RedisProfiles {
    redis.profiles(&segments(SEGMENTS)).await
}

/// The person's history and someone else's around it, more than a stream page long.
/// Returns the message ids of the person's events.
async fn history(store: &RedisProfiles) -> BTreeSet<String> {
    let mut identify = ev(4, EventKind::Identify, at(-40));
    identify.properties = vec![
        ("email".into(), Value::String(EMAIL.into())),
        ("plan".into(), Value::String("pro".into())),
    ];
    let consent = Event {
        consent: Some(ConsentChange {
            granted: ConsentMask(Purpose::Marketing.bit()),
            denied: ConsentMask(0),
        }),
        purpose: Purpose::Necessary,
        ..ev(5, EventKind::ConsentChange, at(-40))
    };
    let steps = [
        update(
            anon(PHONE),
            Some(PHONE),
            vec![
                ev(1, EventKind::Page, at(-50)),
                shoe(2, EventKind::ProductViewed, at(-50)),
                shoe(3, EventKind::CartAdd, at(-50)),
            ],
        ),
        update(
            user(OTHER),
            None,
            (0..STREAM_PAGE as u128 + 200)
                .map(|n| ev(10_000 + n, EventKind::Page, at(-45)))
                .collect(),
        ),
        update(
            user(USER),
            Some(PHONE),
            vec![identify, consent, ev(6, EventKind::Page, at(-40))],
        ),
        update(
            anon(TABLET),
            Some(TABLET),
            vec![ev(7, EventKind::Page, at(-30))],
        ),
        update(
            user(USER),
            Some(TABLET),
            vec![ev(8, EventKind::Page, at(-20))],
        ),
        update(
            user(OTHER),
            None,
            vec![shoe(20_000, EventKind::CartAdd, at(-10))],
        ),
    ];
    for step in steps {
        store.apply(&[step]).await.unwrap();
    }
    (1..=8).map(message_id).collect()
}

/// Every key of `profiles`, found by a SCAN of the whole keyspace.
async fn keys_of(conn: &mut MultiplexedConnection, profiles: &[ProfileId]) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for p in profiles {
        let mut iter = conn
            .scan_match::<_, String>(format!("profile:{{{p}}}*"))
            .await
            .unwrap();
        while let Some(key) = iter.next_item().await {
            found.insert(key.unwrap());
        }
    }
    found
}

/// The entries of a stream whose `profile` is one of `profiles`: (entry id, profile).
async fn entries_of(
    conn: &mut MultiplexedConnection,
    stream: &str,
    profiles: &[ProfileId],
) -> Vec<(String, String)> {
    let reply: redis::streams::StreamRangeReply = conn.xrange_all(stream).await.unwrap();
    reply
        .ids
        .iter()
        .map(|e| (e.id.clone(), e.get::<String>("profile").unwrap()))
        .filter(|(_, p)| profiles.iter().any(|q| q.as_str() == p))
        .collect()
}

/// Everything in the whole Redis that contains one of `needles`: key names, hash fields and
/// values, set and sorted set members, strings, list elements, stream entry fields and
/// values. Each trace is described as `key: where`.
async fn traces(conn: &mut MultiplexedConnection, needles: &[&str]) -> Vec<String> {
    let mut all = Vec::new();
    let mut iter = conn.scan_match::<_, String>("*").await.unwrap();
    while let Some(key) = iter.next_item().await {
        all.push(key.unwrap());
    }
    drop(iter);
    let hit = |text: &str| needles.iter().any(|n| text.contains(n));
    let mut found = Vec::new();
    for key in all {
        if hit(&key) {
            found.push(format!("{key}: the name"));
        }
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(conn)
            .await
            .unwrap();
        let texts: Vec<String> = match kind.as_str() {
            "hash" => {
                let h: Vec<(String, String)> = conn.hgetall(&key).await.unwrap();
                h.into_iter().flat_map(|(f, v)| [f, v]).collect()
            }
            "set" => conn.smembers(&key).await.unwrap(),
            "zset" => conn.zrange(&key, 0, -1).await.unwrap(),
            "string" => vec![conn.get(&key).await.unwrap()],
            "list" => conn.lrange(&key, 0, -1).await.unwrap(),
            "stream" => {
                let reply: redis::streams::StreamRangeReply = conn.xrange_all(&key).await.unwrap();
                reply
                    .ids
                    .iter()
                    .flat_map(|e| {
                        e.map.iter().flat_map(|(f, v)| {
                            [
                                f.clone(),
                                redis::from_redis_value::<String>(v.clone()).unwrap(),
                            ]
                        })
                    })
                    .collect()
            }
            other => panic!("{key} is a {other}"),
        };
        found.extend(
            texts
                .into_iter()
                .filter(|t| hit(t))
                .map(|t| format!("{key}: {t}")),
        );
    }
    found
}

/// The suppression keys in the whole Redis, with their values.
async fn suppression_keys(conn: &mut MultiplexedConnection) -> BTreeMap<String, String> {
    let mut names = Vec::new();
    let mut iter = conn
        .scan_match::<_, String>(keys::SUPPRESSED_PATTERN)
        .await
        .unwrap();
    while let Some(key) = iter.next_item().await {
        names.push(key.unwrap());
    }
    drop(iter);
    let mut out = BTreeMap::new();
    for name in names {
        let value: String = conn.get(&name).await.unwrap();
        out.insert(name, value);
    }
    out
}

fn person() -> [ProfileId; 3] {
    [user(USER), anon(PHONE), anon(TABLET)]
}

// ------------------------------------------------------------------ export

#[tokio::test]
async fn an_export_holds_every_key_and_stream_entry_of_the_person_and_their_devices() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis).await;
    let mut conn = redis.connection().await;
    let sent = history(&store).await;

    for named in [USER, PHONE, TABLET] {
        let export = store.export(named, at(0)).await.unwrap().unwrap();
        assert_eq!(export.profile_id, user(USER), "{named}");
    }
    let export = store.export(USER, at(0)).await.unwrap().unwrap();
    assert_eq!(export.user_id.as_deref(), Some(USER));
    assert_eq!(export.anonymous_ids, [TABLET, PHONE]);
    assert_eq!(export.exported_at, at(0));

    // Every key of the user profile and of both devices' redirects, and nothing else.
    let stored = keys_of(&mut conn, &person()).await;
    assert_eq!(export.keys.keys().cloned().collect::<BTreeSet<_>>(), stored);
    assert!(stored.contains("profile:{a:visitor-93fd}"), "{stored:?}");
    assert!(
        stored.contains("profile:{u:alice-7c1e}:windows"),
        "{stored:?}"
    );
    assert_eq!(
        export.keys["profile:{u:alice-7c1e}:traits"],
        StoredKey::Hash(
            [
                ("email".to_string(), EMAIL.to_string()),
                ("plan".into(), "pro".into())
            ]
            .into()
        )
    );
    assert_eq!(
        export.keys["profile:{u:alice-7c1e}:ids"],
        StoredKey::Set(vec![
            format!("anon:{TABLET}"),
            format!("anon:{PHONE}"),
            format!("user:{USER}"),
        ])
    );
    assert_eq!(
        export.keys["profile:{a:visitor-93fd}"],
        StoredKey::Hash(
            [
                ("merged_into".to_string(), format!("u:{USER}")),
                ("merge_state".into(), "done".into()),
                ("merged_at".into(), ms(at(-40)).to_string()),
            ]
            .into()
        )
    );
    assert_eq!(
        export.keys["profile:{u:alice-7c1e}:viewed"],
        StoredKey::Zset(vec![("boot".into(), ms(at(-50)).into())])
    );

    // The profile as the read API shows it, its consent and its segments.
    let profile = export.profile.as_ref().unwrap();
    assert_eq!(
        profile,
        &store.profile(&user(USER), at(0)).await.unwrap().unwrap()
    );
    assert_eq!(profile.page_views, 4);
    assert_eq!(export.consent, profile.consent);
    assert_eq!(
        export.consent[&Purpose::Marketing].status,
        profile_cache::ConsentStatus::Granted
    );
    let memberships: Vec<(&str, &str)> = export
        .segments
        .iter()
        .map(|m| (m.segment.as_str(), m.profile_id.as_str()))
        .collect();
    assert_eq!(
        memberships,
        [
            ("cart", "u:alice-7c1e"),
            ("pro", "u:alice-7c1e"),
            ("shoe_fans", "u:alice-7c1e"),
            ("visitors", "u:alice-7c1e"),
        ]
    );
    let deadline: f64 = conn.zscore(keys::DEADLINES, "u:alice-7c1e").await.unwrap();
    assert_eq!(
        export.schedule,
        [("u:alice-7c1e".to_string(), deadline as i64)].into()
    );

    // Their events, the devices' from before the logins included, and no one else's.
    let exported: BTreeSet<String> = export
        .events
        .iter()
        .map(|e| {
            e.fields["event"]["message_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(exported, sent);
    let by_profile: Vec<(String, String)> = export
        .events
        .iter()
        .map(|e| (e.id.clone(), e.fields["profile"].as_str().unwrap().into()))
        .collect();
    assert_eq!(
        by_profile,
        entries_of(&mut conn, keys::EVENT_STREAM, &person()).await
    );
    assert_eq!(
        by_profile
            .iter()
            .filter(|(_, p)| p == "a:visitor-93fd")
            .count(),
        3
    );
    let transitions: Vec<(String, String)> = export
        .transitions
        .iter()
        .map(|e| (e.id.clone(), e.fields["profile"].as_str().unwrap().into()))
        .collect();
    assert_eq!(
        transitions,
        entries_of(&mut conn, keys::TRANSITION_STREAM, &person()).await
    );
    assert!(transitions.iter().any(|(_, p)| p == "a:tablet-51aa"));
    let events_len: u64 = conn.xlen(keys::EVENT_STREAM).await.unwrap();
    let transitions_len: u64 = conn.xlen(keys::TRANSITION_STREAM).await.unwrap();
    assert_eq!(
        export.scanned,
        Scanned {
            events: events_len,
            transitions: transitions_len
        }
    );
    assert!(events_len > STREAM_PAGE as u64);

    // The JSON document's shape (serde_json sorts object keys).
    let json = serde_json::to_value(&export).unwrap();
    let fields: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        fields,
        [
            "anonymous_ids",
            "consent",
            "events",
            "exported_at",
            "keys",
            "profile",
            "profile_id",
            "scanned",
            "schedule",
            "segments",
            "transitions",
            "user_id"
        ]
    );
    assert_eq!(
        json["keys"]["profile:{u:alice-7c1e}:cat_viewed"],
        serde_json::json!({"type": "zset", "value": [["shoes", 1]]})
    );

    assert!(store.export("nobody-here", at(0)).await.unwrap().is_none());
    assert!(store.export("null", at(0)).await.unwrap().is_none());
}

#[tokio::test]
async fn a_visitor_never_identified_is_exported_on_their_own() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis).await;
    store
        .apply(&[update(
            anon(PHONE),
            Some(PHONE),
            vec![ev(1, EventKind::Page, at(-5))],
        )])
        .await
        .unwrap();
    let export = store.export(PHONE, at(0)).await.unwrap().unwrap();
    assert_eq!(export.profile_id, anon(PHONE));
    assert_eq!(export.user_id, None);
    assert_eq!(export.anonymous_ids, [PHONE]);
    assert_eq!(export.events.len(), 1);
    assert_eq!(export.events[0].fields["kind"], "page");
}

// ------------------------------------------------------------------ erasure

#[tokio::test]
async fn an_erasure_leaves_nothing_of_the_person_in_the_whole_redis_but_hashed_suppressions() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis).await;
    let mut conn = redis.connection().await;
    history(&store).await;
    let needles = [USER, PHONE, TABLET, EMAIL];

    // Before: the scan sees the person everywhere.
    let before = traces(&mut conn, &needles).await;
    for expected in [
        "profile:{u:alice-7c1e}: the name",
        "profile:{a:tablet-51aa}: the name",
        "segment:{visitors}:members: u:alice-7c1e",
        "schedule:deadlines: u:alice-7c1e",
        "profile:{u:alice-7c1e}:traits: alice.7c1e@example.com",
    ] {
        assert!(
            before.iter().any(|t| t == expected),
            "{expected}: {before:?}"
        );
    }
    assert!(before.iter().any(|t| t.starts_with("stream:events: ")));
    assert!(before.iter().any(|t| t.starts_with("stream:transitions: ")));
    let keys_before = keys_of(&mut conn, &person()).await.len() as u64;
    let events_before = entries_of(&mut conn, keys::EVENT_STREAM, &person())
        .await
        .len() as u64;
    let transitions_before = entries_of(&mut conn, keys::TRANSITION_STREAM, &person())
        .await
        .len() as u64;
    let other_events = entries_of(&mut conn, keys::EVENT_STREAM, &[user(OTHER)]).await;
    let other_keys = keys_of(&mut conn, &[user(OTHER)]).await;

    let erasure = store.erase(PHONE, at(0)).await.unwrap().unwrap();
    let events_len: u64 = conn.xlen(keys::EVENT_STREAM).await.unwrap();
    let transitions_len: u64 = conn.xlen(keys::TRANSITION_STREAM).await.unwrap();
    assert_eq!(
        erasure,
        Erasure {
            profile_id: user(USER),
            status: ErasureStatus::Erased,
            profiles: 3,
            keys: keys_before,
            // visitors, shoe_fans, cart, pro.
            segment_memberships: 4,
            schedule_entries: 1,
            events: events_before,
            transitions: transitions_before,
            scanned: Scanned {
                events: events_len + events_before,
                transitions: transitions_len + transitions_before,
            },
        }
    );
    assert_eq!(events_before, 8);

    // After: nothing, anywhere.
    assert_eq!(traces(&mut conn, &needles).await, Vec::<String>::new());
    // But the suppression keys: the hashes of the three profile ids, with the time.
    let hashed: BTreeMap<String, String> = person()
        .iter()
        .map(|p| (keys::suppressed(p), ms(at(0)).to_string()))
        .collect();
    assert_eq!(suppression_keys(&mut conn).await, hashed);
    assert!(
        hashed
            .keys()
            .any(|k| k.ends_with(&profile_cache::privacy::hash_id("u:alice-7c1e").to_string()))
    );

    // Someone else's data is untouched.
    assert_eq!(
        entries_of(&mut conn, keys::EVENT_STREAM, &[user(OTHER)]).await,
        other_events
    );
    assert_eq!(keys_of(&mut conn, &[user(OTHER)]).await, other_keys);
    let other = store.find(OTHER, at(0)).await.unwrap().unwrap();
    assert_eq!(other.page_views, STREAM_PAGE as u64 + 200);
    assert!(store.find(USER, at(0)).await.unwrap().is_none());
    assert!(store.export(USER, at(0)).await.unwrap().is_none());
}

#[tokio::test]
async fn late_events_of_erased_ids_are_dropped_and_counted_also_by_a_later_store() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis).await;
    let mut conn = redis.connection().await;
    history(&store).await;
    store.erase(USER, at(0)).await.unwrap().unwrap();
    let needles = [USER, PHONE, TABLET, EMAIL];

    // The collector restarts: a new store on the same Redis.
    drop(store);
    let store = self::store(&redis).await;
    let late = [
        update(
            user(USER),
            Some(PHONE),
            vec![
                ev(30, EventKind::Page, at(1)),
                ev(31, EventKind::Page, at(1)),
            ],
        ),
        update(
            user("carol-0b3e"),
            None,
            vec![ev(32, EventKind::Page, at(1))],
        ),
        update(
            anon(TABLET),
            Some(TABLET),
            vec![ev(33, EventKind::Page, at(1))],
        ),
        update(
            anon(PHONE),
            Some(PHONE),
            vec![ev(34, EventKind::Page, at(1))],
        ),
    ];
    assert_eq!(
        store.apply_batch(&late).await.unwrap(),
        BatchReport {
            report: ApplyReport {
                applied: 1,
                ..ApplyReport::default()
            },
            suppressed: vec![0, 2, 3],
            suppressed_events: 4,
        }
    );
    assert_eq!(traces(&mut conn, &needles).await, Vec::<String>::new());
    // A retry of the same batch: the same answer.
    assert_eq!(
        store.apply_batch(&late).await.unwrap().suppressed,
        [0, 2, 3]
    );

    // Another user logging in on the erased phone: their events count, but the erased
    // anonymous id is neither linked nor merged, so its profile does not come back.
    let carol = update(
        user("carol-0b3e"),
        Some(PHONE),
        vec![ev(35, EventKind::Page, at(2))],
    );
    assert_eq!(
        store.apply_batch(&[carol]).await.unwrap(),
        BatchReport {
            report: ApplyReport {
                applied: 1,
                ..ApplyReport::default()
            },
            ..BatchReport::default()
        }
    );
    let p = store.find("carol-0b3e", at(2)).await.unwrap().unwrap();
    assert_eq!(p.page_views, 2);
    assert!(p.anonymous_ids.is_empty(), "{:?}", p.anonymous_ids);
    assert_eq!(keys_of(&mut conn, &[anon(PHONE)]).await, BTreeSet::new());

    // A batch with nothing suppressed costs no lookup and reports none.
    let fine = store
        .apply_batch(&[update(
            user("carol-0b3e"),
            None,
            vec![ev(36, EventKind::Page, at(3))],
        )])
        .await
        .unwrap();
    assert_eq!(fine.suppressed, Vec::<usize>::new());
    assert_eq!(fine.report.applied, 1);
}

#[tokio::test]
async fn erasing_twice_is_fine_and_an_unknown_id_is_none() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis).await;
    history(&store).await;
    let first = store.erase(USER, at(0)).await.unwrap().unwrap();
    assert_eq!(first.status, ErasureStatus::Erased);
    assert_eq!(
        store.erase(USER, at(1)).await.unwrap(),
        Some(Erasure::already(user(USER)))
    );
    assert_eq!(
        store.erase(TABLET, at(1)).await.unwrap(),
        Some(Erasure::already(anon(TABLET)))
    );
    assert_eq!(store.erase("never-seen-9", at(1)).await.unwrap(), None);
    assert_eq!(store.erase("undefined", at(1)).await.unwrap(), None);
    // The suppression keeps the time of the first erasure.
    let mut conn = redis.connection().await;
    let kept: String = conn.get(keys::suppressed(&user(USER))).await.unwrap();
    assert_eq!(kept, ms(at(0)).to_string());
}

#[tokio::test]
async fn an_erasure_interrupted_after_its_first_step_is_finished_by_a_retry_with_any_id() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis).await;
    let mut conn = redis.connection().await;
    history(&store).await;
    // What the first step writes; the erasure then failed.
    let _: () = conn
        .set(keys::suppressed(&user(USER)), ms(at(0)))
        .await
        .unwrap();
    // Meanwhile the person stays whole and findable, but nothing reaches it.
    assert_eq!(
        store
            .apply_batch(&[update(
                user(USER),
                None,
                vec![ev(40, EventKind::Page, at(1))]
            )])
            .await
            .unwrap()
            .suppressed,
        [0]
    );
    let export = store.export(TABLET, at(1)).await.unwrap().unwrap();
    assert_eq!(export.profile.unwrap().page_views, 4);

    let erasure = store.erase(TABLET, at(2)).await.unwrap().unwrap();
    assert_eq!(
        (erasure.status, erasure.profiles),
        (ErasureStatus::Erased, 3)
    );
    assert_eq!(
        traces(&mut conn, &[USER, PHONE, TABLET, EMAIL]).await,
        Vec::<String>::new()
    );
    // The first step's suppression keeps its time; the devices' are the retry's.
    assert_eq!(
        suppression_keys(&mut conn).await,
        BTreeMap::from([
            (keys::suppressed(&user(USER)), ms(at(0)).to_string()),
            (keys::suppressed(&anon(PHONE)), ms(at(2)).to_string()),
            (keys::suppressed(&anon(TABLET)), ms(at(2)).to_string()),
        ])
    );
}

#[tokio::test]
async fn the_scheduler_drops_an_erased_profile_without_writing_a_transition() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis).await;
    let mut conn = redis.connection().await;
    store
        .apply(&[update(
            user(USER),
            None,
            vec![shoe(1, EventKind::CartAdd, at(0))],
        )])
        .await
        .unwrap();
    let deadline: f64 = conn.zscore(keys::DEADLINES, "u:alice-7c1e").await.unwrap();
    assert_eq!(deadline as i64, ms(at(30)));
    let _: () = conn
        .set(keys::suppressed(&user(USER)), ms(at(1)))
        .await
        .unwrap();
    let transitions: u64 = conn.xlen(keys::TRANSITION_STREAM).await.unwrap();

    let claimed = store
        .claim_due(at(31), Duration::from_secs(30), 10)
        .await
        .unwrap();
    assert_eq!(claimed.claims.len(), 1);
    let outcomes = store
        .evaluate_claimed(&claimed.claims, at(31))
        .await
        .unwrap();
    assert!(matches!(outcomes[..], [Ok(Outcome::Gone)]), "{outcomes:?}");
    let left: Option<f64> = conn.zscore(keys::DEADLINES, "u:alice-7c1e").await.unwrap();
    assert_eq!(left, None);
    assert_eq!(
        conn.xlen::<_, u64>(keys::TRANSITION_STREAM).await.unwrap(),
        transitions
    );
}

/// The suppression key of a profile is in its Redis Cluster slot, as a cluster-enabled
/// redis-server computes it.
#[tokio::test]
async fn suppression_keys_are_in_the_slot_of_their_profile() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("redis.conf");
    std::fs::write(
        &config,
        "cluster-enabled yes\ncluster-config-file nodes.conf\nsave \"\"\nappendonly no\n",
    )
    .unwrap();
    let redis =
        RedisServer::start_with_config(&config, &dir.path().join("data"), free_port().unwrap())
            .unwrap();
    let mut conn = redis.connection().await;
    for n in 0..300 {
        for p in [user(&format!("user-{n}")), anon(&format!("{n:x}-device"))] {
            let profile: u16 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(keys::profile(&p))
                .query_async(&mut conn)
                .await
                .unwrap();
            let suppressed: u16 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(keys::suppressed(&p))
                .query_async(&mut conn)
                .await
                .unwrap();
            assert_eq!(
                (suppressed, profile),
                (profile, keys::slot(p.as_str())),
                "{p}"
            );
        }
    }
}
