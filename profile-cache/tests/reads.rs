//! Segment reads against real, throwaway redis-server processes: sizes, pages of members with
//! traits, walks over every page (ties included), walks while members enter and leave, and
//! odd data reported as errors. Memberships come from `apply` where the writer matters, and
//! from plain `ZADD`s (the documented key schema) where a test needs thousands of members or
//! exact scores.

use std::collections::{BTreeMap, BTreeSet};
use std::num::NonZeroUsize;

use profile_cache::segments::compile;
use profile_cache::{
    Context, Event, EventKind, LifecycleThresholds, ProfileId, ProfileUpdate, Purpose,
    RedisProfiles, StoreError, Value,
};
use profile_cache::{MemberCursor, MemberPage, MembersRequest, SegmentMember};
use redis::AsyncCommands;
use serde_json::json;
use time::OffsetDateTime;
use time::macros::datetime;
use uuid::Uuid;

use profile_cache::testing::RedisServer;

const NOW: OffsetDateTime = datetime!(2026-11-29 12:00:00 UTC);

fn ms(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

fn at_ms(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap()
}

fn anon(id: &str) -> ProfileId {
    ProfileId::anonymous(id).unwrap()
}

async fn store(redis: &RedisServer) -> RedisProfiles {
    let segments = compile(
        &[
            json!({"name": "identified", "condition": {"trait": {"name": "email", "exists": true}}}),
            json!({"name": "visitors", "condition": {"metric": {"field": "page_views", "at_least": 1}}}),
        ],
        &LifecycleThresholds::default(),
    )
    .unwrap();
    redis.profiles(&segments).await
}

fn event(n: u128, kind: EventKind, received_at: OffsetDateTime) -> Event {
    Event {
        message_id: Uuid::from_u128(n),
        kind,
        name: None,
        timestamp: received_at,
        received_at,
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

fn identify(n: u128, received_at: OffsetDateTime, traits: &[(&str, &str)]) -> Event {
    let mut e = event(n, EventKind::Identify, received_at);
    e.properties = traits
        .iter()
        .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
        .collect();
    e
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

fn request(after: Option<MemberCursor>, limit: usize, traits: &[&str]) -> MembersRequest {
    MembersRequest {
        after,
        limit: NonZeroUsize::new(limit).unwrap(),
        traits: traits.iter().map(|t| t.to_string()).collect(),
    }
}

fn traits(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Every page of `segment` from the start, `limit` at a time, calling `between` after each
/// page with the page's number; the (entered-at ms, id) of every member returned, in order.
async fn walk<F, Fut>(
    store: &RedisProfiles,
    segment: &str,
    limit: usize,
    mut between: F,
) -> (Vec<(i64, String)>, usize)
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut seen = Vec::new();
    let mut after = None;
    let mut pages = 0;
    loop {
        let MemberPage { members, next } = store
            .segment_members(segment, &request(after, limit, &[]))
            .await
            .unwrap();
        pages += 1;
        assert!(members.len() <= limit);
        if next.is_some() {
            assert_eq!(members.len(), limit, "a page before the last is full");
        }
        seen.extend(members.iter().map(|m| (ms(m.entered_at), m.id.to_string())));
        between(pages).await;
        match next {
            Some(c) => after = Some(c),
            None => return (seen, pages),
        }
    }
}

/// A deterministic pseudo-random sequence (a 64-bit LCG), so failures reproduce.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

#[tokio::test]
async fn sizes_count_the_members_the_apply_script_wrote() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis).await;
    let (ada, bob, cy) = (anon("ada"), anon("bob"), anon("cy"));
    store
        .apply(&[
            update(
                &ada,
                vec![identify(1, NOW, &[("email", "ada@example.com")])],
            ),
            update(&bob, vec![event(2, EventKind::Page, NOW)]),
            update(&cy, vec![event(3, EventKind::Page, NOW)]),
        ])
        .await
        .unwrap();
    let sizes = store
        .segment_sizes(&["visitors", "identified", "nobody_here"])
        .await
        .unwrap();
    assert_eq!(sizes, [2, 1, 0]);
    assert_eq!(store.segment_sizes(&[]).await.unwrap(), Vec::<u64>::new());
}

#[tokio::test]
async fn a_page_carries_the_requested_traits_and_leaves_missing_ones_out() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis).await;
    let (ada, bob) = (anon("ada"), anon("bob"));
    let later = NOW + time::Duration::milliseconds(1_250);
    store
        .apply(&[update(
            &ada,
            vec![identify(
                1,
                NOW,
                &[
                    ("email", "ada@example.com"),
                    ("first_name", "Ada"),
                    ("plan", "pro"),
                ],
            )],
        )])
        .await
        .unwrap();
    store
        .apply(&[update(
            &bob,
            vec![identify(2, later, &[("email", "bob@example.com")])],
        )])
        .await
        .unwrap();

    let page = store
        .segment_members(
            "identified",
            &request(None, 10, &["email", "first_name", "phone"]),
        )
        .await
        .unwrap();
    assert_eq!(
        page,
        MemberPage {
            members: vec![
                SegmentMember {
                    id: ada.clone(),
                    entered_at: NOW,
                    traits: traits(&[("email", "ada@example.com"), ("first_name", "Ada")]),
                },
                SegmentMember {
                    id: bob.clone(),
                    entered_at: later,
                    traits: traits(&[("email", "bob@example.com")]),
                },
            ],
            next: None,
        }
    );

    // Without traits, no trait is read; with a limit of 1, the cursor leads to bob.
    let first = store
        .segment_members("identified", &request(None, 1, &[]))
        .await
        .unwrap();
    assert_eq!(first.members.len(), 1);
    assert_eq!(first.members[0].id, ada);
    assert_eq!(first.members[0].traits, BTreeMap::new());
    let next = first.next.expect("a second page");
    assert_eq!(next, MemberCursor::after(&first.members[0]));
    let second = store
        .segment_members("identified", &request(Some(next), 1, &["email"]))
        .await
        .unwrap();
    assert_eq!(second.members.len(), 1);
    assert_eq!(second.members[0].id, bob);
    assert_eq!(
        second.members[0].traits,
        traits(&[("email", "bob@example.com")])
    );
    assert_eq!(second.next, None);

    // A member whose profile has no traits at all still comes back, with none.
    let mut conn = redis.connection().await;
    let _: () = conn
        .zadd("segment:{identified}:members", "u:ghost", ms(later) + 1)
        .await
        .unwrap();
    let page = store
        .segment_members("identified", &request(None, 10, &["email"]))
        .await
        .unwrap();
    assert_eq!(page.members[2].id.as_str(), "u:ghost");
    assert_eq!(page.members[2].traits, BTreeMap::new());
}

#[tokio::test]
async fn walking_every_page_of_2500_members_returns_each_once_in_order() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis).await;
    let mut conn = redis.connection().await;
    let key = "segment:{visitors}:members";
    let base = ms(NOW);
    // Ties of up to 100 members on one millisecond, ids inserted out of order, `a:` and `u:`
    // ids and prefixes of one another mixed, so the order within a tie is by bytes.
    let mut lcg = Lcg(7);
    let mut expected = BTreeSet::new();
    let mut pipe = redis::pipe();
    for i in 0..2_500u64 {
        let score = base + (lcg.below(25) as i64) * 1_000;
        let id = match i % 3 {
            0 => format!("a:{}", lcg.below(1 << 40)),
            1 => format!("u:user-{i}"),
            _ => format!("a:{i}"),
        };
        if expected.insert((score, id.clone())) {
            pipe.zadd(key, &id, score).ignore();
        }
    }
    let _: () = pipe.query_async(&mut conn).await.unwrap();
    let expected: Vec<(i64, String)> = expected.into_iter().collect();
    assert_eq!(expected.len(), 2_500);
    assert_eq!(store.segment_sizes(&["visitors"]).await.unwrap(), [2_500]);

    for limit in [97, 1_000, 2_500, 3_000] {
        let (seen, pages) = walk(&store, "visitors", limit, |_| async {}).await;
        assert_eq!(seen, expected, "limit {limit}");
        assert_eq!(pages, 2_500usize.div_ceil(limit), "limit {limit}");
    }

    // Every member on one millisecond: one tie of 2,500, ordered by id bytes alone.
    let tie = "segment:{identified}:members";
    let mut pipe = redis::pipe();
    for (_, id) in &expected {
        pipe.zadd(tie, id, base).ignore();
    }
    let _: () = pipe.query_async(&mut conn).await.unwrap();
    let mut by_id: Vec<(i64, String)> = expected.iter().map(|(_, id)| (base, id.clone())).collect();
    by_id.sort();
    let (seen, _) = walk(&store, "identified", 64, |_| async {}).await;
    assert_eq!(seen, by_id);
}

#[tokio::test]
async fn members_present_throughout_a_walk_are_returned_once_while_others_enter_and_leave() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis).await;
    let mut conn = redis.connection().await;
    let key = "segment:{visitors}:members";
    let base = ms(NOW);
    // 600 members in ties of 20. Members whose number is a multiple of 3 are "volatile"
    // (the test may remove them and add them back); the others stay throughout.
    let mut members: BTreeMap<String, i64> = BTreeMap::new();
    for i in 0..600i64 {
        members.insert(format!("a:m{i:04}"), base + (i / 20) * 10);
    }
    let stable: BTreeSet<(i64, String)> = members
        .iter()
        .filter(|(id, _)| id[3..].parse::<i64>().unwrap() % 3 != 0)
        .map(|(id, score)| (*score, id.clone()))
        .collect();
    let mut pipe = redis::pipe();
    for (id, score) in &members {
        pipe.zadd(key, id, score).ignore();
    }
    let _: () = pipe.query_async(&mut conn).await.unwrap();

    // Between pages: the last member returned leaves (so the next page cannot find its
    // cursor by rank), volatile members ahead and behind leave or enter again later,
    // and new members enter on the cursor's own millisecond before and after its id, at
    // the start and at the end.
    let mut lcg = Lcg(11);
    let mut fresh = 0;
    let mut walked = Vec::new();
    let mut after: Option<MemberCursor> = None;
    loop {
        let page = store
            .segment_members("visitors", &request(after.clone(), 25, &[]))
            .await
            .unwrap();
        walked.extend(
            page.members
                .iter()
                .map(|m| (ms(m.entered_at), m.id.to_string())),
        );
        let Some(next) = page.next else { break };
        let mut pipe = redis::pipe();
        let cursor_id = next.id().as_str().to_string();
        let cursor_volatile = cursor_id[3..].parse::<i64>().is_ok_and(|n| n % 3 == 0);
        if cursor_volatile {
            pipe.zrem(key, &cursor_id).ignore();
        }
        for _ in 0..6 {
            let n = lcg.below(600) as i64;
            if n % 3 != 0 {
                continue;
            }
            let id = format!("a:m{n:04}");
            if lcg.below(2) == 0 {
                pipe.zrem(key, &id).ignore();
            } else {
                // Enters again, later: a new membership.
                pipe.zadd(key, &id, base + 10_000 + lcg.below(1_000) as i64)
                    .ignore();
            }
        }
        for score in [base - 5, next.entered_at_ms(), base + 20_000] {
            for id in [format!("a:!{fresh}"), format!("u:~{fresh}")] {
                pipe.zadd(key, id, score).ignore();
            }
            fresh += 1;
        }
        let _: () = pipe.query_async(&mut conn).await.unwrap();
        after = Some(next);
    }

    let positions: Vec<&(i64, String)> = walked.iter().collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "pages follow each other in strictly increasing order"
    );
    for member in &stable {
        let times = walked.iter().filter(|m| *m == member).count();
        assert_eq!(times, 1, "{member:?} was returned {times} times");
    }
    // Members that entered at the cursor's millisecond with an id after the cursor's, or
    // at the end, were returned too; those before the cursor were not.
    assert!(
        walked
            .iter()
            .any(|(t, id)| *t == base + 20_000 && id.starts_with("u:~"))
    );
    assert!(!walked.iter().any(|(t, _)| *t == base - 5));
}

#[tokio::test]
async fn a_walk_under_concurrent_churn_returns_every_steady_member_once() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis).await;
    let mut conn = redis.connection().await;
    let key = "segment:{visitors}:members";
    let base = ms(NOW);
    let mut pipe = redis::pipe();
    let mut steady = Vec::new();
    for i in 0..1_000i64 {
        let id = format!("u:steady-{i:04}");
        pipe.zadd(key, &id, base + i / 50).ignore();
        steady.push((base + i / 50, id));
    }
    let _: () = pipe.query_async(&mut conn).await.unwrap();
    steady.sort();

    // Another connection keeps adding and removing members on the same milliseconds
    // while the walk runs.
    let mut churn_conn = redis.connection().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut lcg = Lcg(3);
            let mut rounds = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let id = format!("a:churn-{}", lcg.below(300));
                let score = base + lcg.below(25) as i64;
                let _: () = if lcg.below(2) == 0 {
                    churn_conn.zadd(key, id, score).await.unwrap()
                } else {
                    churn_conn.zrem(key, id).await.unwrap()
                };
                rounds += 1;
                tokio::task::yield_now().await;
            }
            rounds
        }
    });
    let (walked, _) = walk(&store, "visitors", 40, |_| tokio::task::yield_now()).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = churn.await.unwrap();
    assert!(rounds > 0, "the churn ran during the walk");

    assert!(
        walked.windows(2).all(|w| w[0] < w[1]),
        "strictly increasing"
    );
    let steady_seen: Vec<(i64, String)> = walked
        .iter()
        .filter(|(_, id)| id.starts_with("u:steady-"))
        .cloned()
        .collect();
    assert_eq!(steady_seen, steady);
}

#[tokio::test]
async fn a_segment_nobody_is_in_reads_as_empty() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis).await;
    assert_eq!(store.segment_sizes(&["unknown"]).await.unwrap(), [0]);
    let page = store
        .segment_members("unknown", &request(None, 100, &["email"]))
        .await
        .unwrap();
    assert_eq!(
        page,
        MemberPage {
            members: vec![],
            next: None
        }
    );
    // A cursor into it (from a segment that emptied meanwhile) reads as the end too.
    let cursor = MemberCursor::after(&SegmentMember {
        id: anon("gone"),
        entered_at: NOW,
        traits: BTreeMap::new(),
    });
    let page = store
        .segment_members("unknown", &request(Some(cursor), 100, &[]))
        .await
        .unwrap();
    assert!(page.members.is_empty() && page.next.is_none());
}

fn corrupt(err: StoreError) -> (String, String, String) {
    match err {
        StoreError::Corrupt { key, field, detail } => (key, field, detail),
        other => panic!("expected corrupt data, got {other:?}"),
    }
}

#[tokio::test]
async fn odd_data_is_an_error_naming_the_key_not_a_panic() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis).await;
    let mut conn = redis.connection().await;

    let _: () = conn.set("segment:{text}:members", "x").await.unwrap();
    let (key, _, detail) = corrupt(
        store
            .segment_sizes(&["visitors", "text"])
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (key.as_str(), detail.as_str()),
        ("segment:{text}:members", "has the wrong type")
    );
    let (key, field, detail) = corrupt(
        store
            .segment_members("text", &request(None, 10, &[]))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (key.as_str(), field.as_str(), detail.as_str()),
        ("segment:{text}:members", "-", "has the wrong type")
    );

    let _: () = conn
        .zadd("segment:{odd}:members", "no-kind", 5)
        .await
        .unwrap();
    let (key, field, detail) = corrupt(
        store
            .segment_members("odd", &request(None, 10, &[]))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (key.as_str(), field.as_str(), detail.as_str()),
        ("segment:{odd}:members", "no-kind", "is not a profile id")
    );

    let _: () = conn
        .zadd("segment:{half}:members", "a:x", 1.5)
        .await
        .unwrap();
    let (_, field, detail) = corrupt(
        store
            .segment_members("half", &request(None, 10, &[]))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (field.as_str(), detail.as_str()),
        ("a:x", "score 1.5 is not a time")
    );
    let _: () = conn
        .zadd("segment:{ancient}:members", "a:x", -62_000_000_000_000i64)
        .await
        .unwrap();
    let (_, field, detail) = corrupt(
        store
            .segment_members("ancient", &request(None, 10, &[]))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (field.as_str(), detail.as_str()),
        ("a:x", "score -62000000000000 is not a time")
    );

    let _: () = conn
        .zadd("segment:{typed}:members", "a:y", 7)
        .await
        .unwrap();
    let _: () = conn.set("profile:{a:y}:traits", "x").await.unwrap();
    // Without traits the traits key is not read; with them, its type is reported.
    let page = store
        .segment_members("typed", &request(None, 10, &[]))
        .await
        .unwrap();
    assert_eq!(page.members[0].entered_at, at_ms(7));
    let (key, _, detail) = corrupt(
        store
            .segment_members("typed", &request(None, 10, &["email"]))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (key.as_str(), detail.as_str()),
        ("profile:{a:y}:traits", "has the wrong type")
    );
}
