//! Handler tests through `router(..).oneshot(..)` with the in-memory store: status codes,
//! JSON error shapes, consent filtering, clock-skew correction, auth and CORS, and the
//! segment reads.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use ingest::auth::{ApiToken, MemoryAuditLog, Scope, TokenHash};
use ingest::config::{Config, WriteKey};
use ingest::store::MemoryStore;
use ingest::{AppState, Clock, RateLimits, router};
use profile_cache::SegmentMember;
use profile_cache::audit::{AuditResult, Operation};
use profile_cache::{EventKind, ProfileId};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::macros::datetime;
use tower::ServiceExt;

const NOW: OffsetDateTime = datetime!(2026-11-29 12:00:00 UTC);

struct Fixed;
impl Clock for Fixed {
    fn now(&self) -> OffsetDateTime {
        NOW
    }
}

fn app() -> (Router, Arc<MemoryStore>) {
    app_with(Config {
        write_keys: vec![WriteKey {
            key: "site-key".into(),
            origins: vec!["https://shop.example".into()],
        }],
        api_tokens: vec![reader()],
        ..Config::default()
    })
}

/// A token that reads profiles and segments: `reader-token-1`.
fn reader() -> ApiToken {
    ApiToken {
        name: "reader".into(),
        sha256: TokenHash::of("reader-token-1"),
        scopes: vec![Scope::ProfilesRead, Scope::SegmentsRead],
    }
}

fn app_with(config: Config) -> (Router, Arc<MemoryStore>) {
    let store = Arc::new(MemoryStore::default());
    let state = AppState {
        store: store.clone(),
        clock: Arc::new(Fixed),
        audit: Arc::new(MemoryAuditLog::default()),
        limits: Arc::new(RateLimits::new(
            &config.rate_limits,
            &config.trusted_proxies,
        )),
        segments: config.segments().expect("test segments compile").into(),
        spool: None,
        config: Arc::new(config),
    };
    (router(state), store)
}

fn event(n: u8, kind: wire::EventKind, purpose: wire::Purpose) -> wire::Event {
    wire::Event {
        message_id: [n; 16],
        timestamp_ms: 1_000_000,
        kind,
        purpose,
        ..Default::default()
    }
}

fn page(n: u8) -> wire::Event {
    event(n, wire::EventKind::Page, wire::Purpose::Analytics)
}

fn batch(events: Vec<wire::Event>) -> wire::Batch {
    wire::Batch {
        write_key: "site-key".into(),
        sent_at_ms: 1_005_000,
        consent: 0b0011, // necessary + analytics
        context: wire::Context {
            anonymous_id: Some("anon-1".into()),
            session_id: Some("s1".into()),
            ..Default::default()
        },
        events,
    }
}

async fn send(app: &Router, req: Request<Body>) -> (StatusCode, Value, axum::http::HeaderMap) {
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let bytes = axum::body::to_bytes(res.into_body(), usize::MAX)
        .await
        .unwrap();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, body, headers)
}

fn post(body: Vec<u8>) -> Request<Body> {
    Request::post("/v1/fb").body(Body::from(body)).unwrap()
}

#[tokio::test]
async fn accepted_batch_reports_counts_and_drops_events_without_consent() {
    let (app, store) = app();
    let b = batch(vec![
        page(1),
        event(2, wire::EventKind::Page, wire::Purpose::Marketing),
        // Declares `necessary`, but cart events need analytics, which is granted.
        event(3, wire::EventKind::CartAdd, wire::Purpose::Necessary),
        // Email engagement needs marketing, whatever it declares.
        event(4, wire::EventKind::EmailOpened, wire::Purpose::Necessary),
        event(5, wire::EventKind::ConsentChange, wire::Purpose::Necessary),
    ]);
    let (status, body, _) = send(&app, post(wire::encode(&b))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"accepted": 3, "rejected": [
            {"index": 1, "reason": "consent: marketing not granted"},
            {"index": 3, "reason": "consent: marketing not granted"},
        ]})
    );
    let applied = store.applied();
    assert_eq!(applied.len(), 1);
    assert_eq!(applied[0].profile.as_str(), "a:anon-1");
    let kinds: Vec<_> = applied[0].events.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            EventKind::Page,
            EventKind::CartAdd,
            EventKind::ConsentChange
        ]
    );
}

#[tokio::test]
async fn client_clock_skew_is_corrected_from_sent_at() {
    let (app, store) = app();
    // The client sent at 1_005_000 ms and the event happened 5 s earlier on its clock.
    send(&app, post(wire::encode(&batch(vec![page(1)])))).await;
    let e = &store.applied()[0].events[0];
    assert_eq!(e.received_at, NOW);
    assert_eq!(e.timestamp, NOW - time::Duration::seconds(5));
}

#[tokio::test]
async fn retried_batch_is_accepted_again_and_applied_once() {
    let (app, store) = app();
    let bytes = wire::encode(&batch(vec![page(1)]));
    let (_, first, _) = send(&app, post(bytes.clone())).await;
    let (_, second, _) = send(&app, post(bytes)).await;
    assert_eq!(first["accepted"], 1);
    assert_eq!(second["accepted"], 1);
    let total: usize = store.applied().iter().map(|u| u.events.len()).sum();
    assert_eq!(total, 1);
}

#[tokio::test]
async fn identify_goes_to_the_user_profile() {
    let (app, store) = app();
    let mut identify = event(1, wire::EventKind::Identify, wire::Purpose::Analytics);
    identify.user_id = Some("user-42".into());
    send(&app, post(wire::encode(&batch(vec![identify, page(2)])))).await;
    let applied = store.applied();
    let profiles: Vec<_> = applied.iter().map(|u| u.profile.as_str()).collect();
    assert_eq!(profiles, ["u:user-42", "a:anon-1"]);
    assert_eq!(applied[0].anonymous_id.as_deref(), Some("anon-1"));
    assert_eq!(applied[0].user_id.as_deref(), Some("user-42"));
}

#[tokio::test]
async fn malformed_batches_name_the_problem() {
    let (app, store) = app();
    let (status, body, _) = send(&app, post(b"garbage bytes".to_vec())).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "malformed_batch");

    let mut e = page(1);
    e.properties = (0..65)
        .map(|i| wire::Property {
            key: format!("k{i}"),
            value: wire::Value::Int(i),
        })
        .collect();
    let (status, body, _) = send(&app, post(wire::encode(&batch(vec![e])))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body,
        json!({"error": "malformed_batch", "message": "events[0].properties has 65 elements, limit 64",
               "field": "events[0].properties", "limit": 64})
    );

    let mut b = batch(vec![page(1)]);
    b.context.anonymous_id = None;
    let (status, body, _) = send(&app, post(wire::encode(&b))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["field"], "context.anonymous_id");

    let mut b = batch(vec![]);
    b.context.anonymous_id = Some("a{b}".into());
    let (status, body, _) = send(&app, post(wire::encode(&b))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body["message"],
        "context.anonymous_id: id contains '{', which is not allowed"
    );
    assert!(store.applied().is_empty());
}

#[tokio::test]
async fn oversized_body_gets_413_with_the_limit() {
    let (app, _) = app();
    let limit = wire::Limits::default().max_bytes;
    let (status, body, _) = send(&app, post(vec![0; limit + 1])).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["limit"], limit);
    // Without Content-Length (chunked), the limit still holds.
    let chunks = (0..10).map(move |_| Ok::<_, std::io::Error>(vec![0u8; limit / 5]));
    let req = Request::post("/v1/fb")
        .body(Body::from_stream(futures::stream::iter(chunks)))
        .unwrap();
    let (status, body, _) = send(&app, req).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["error"], "body_too_large");
}

#[tokio::test]
async fn unknown_write_key_is_401_and_wrong_origin_is_403() {
    let (app, store) = app();
    let mut b = batch(vec![page(1)]);
    b.write_key = "nope".into();
    let (status, body, _) = send(&app, post(wire::encode(&b))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"], "unknown_write_key");

    let good = wire::encode(&batch(vec![page(1)]));
    let req = Request::post("/v1/fb")
        .header(header::ORIGIN, "https://evil.example")
        .body(Body::from(good.clone()))
        .unwrap();
    let (status, body, _) = send(&app, req).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body["error"], "origin_not_allowed");
    assert!(store.applied().is_empty());

    let req = Request::post("/v1/fb")
        .header(header::ORIGIN, "https://shop.example")
        .body(Body::from(good))
        .unwrap();
    let (status, _, headers) = send(&app, req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        headers[header::ACCESS_CONTROL_ALLOW_ORIGIN],
        "https://shop.example"
    );
}

#[tokio::test]
async fn preflight_is_answered_for_allowed_origins_only() {
    let (app, _) = app();
    let preflight = |origin: &str| {
        Request::options("/v1/fb")
            .header(header::ORIGIN, origin)
            .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
            .header(header::ACCESS_CONTROL_REQUEST_HEADERS, "content-type")
            .body(Body::empty())
            .unwrap()
    };
    let (_, _, headers) = send(&app, preflight("https://shop.example")).await;
    assert_eq!(
        headers[header::ACCESS_CONTROL_ALLOW_ORIGIN],
        "https://shop.example"
    );
    let (_, _, headers) = send(&app, preflight("https://evil.example")).await;
    assert!(headers.get(header::ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
}

#[tokio::test]
async fn storage_outage_is_503_with_retry_after() {
    let (app, store) = app();
    store.set_down(true);
    let (status, body, headers) = send(&app, post(wire::encode(&batch(vec![page(1)])))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["error"], "unavailable");
    assert_eq!(headers[header::RETRY_AFTER], "1");
    let get = |path: &str| Request::get(path).body(Body::empty()).unwrap();
    let (status, _, _) = send(&app, get("/readyz")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, _, _) = send(&app, get("/healthz")).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn profile_reads_need_a_valid_bearer_token() {
    let (app, _) = app();
    let get = |auth: Option<&str>| {
        let mut r = Request::get("/v1/profiles/anon-1");
        if let Some(a) = auth {
            r = r.header(header::AUTHORIZATION, a);
        }
        r.body(Body::empty()).unwrap()
    };
    let (status, body, headers) = send(&app, get(None)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"], "missing_token");
    assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");
    let (status, body, _) = send(&app, get(Some("Bearer wrong-token"))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"], "invalid_token");
    let (status, body, _) = send(&app, get(Some("Bearer reader-token-1"))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"], "not_found");
}

// ------------------------------------------------------------------ segment reads

/// An app with two segments, for the segment reads.
fn segments_app() -> (Router, Arc<MemoryStore>) {
    app_with(Config {
        api_tokens: vec![reader()],
        segments: vec![
            json!({"name": "cart_abandoners_30m", "description": "Cart left for 30 minutes",
                   "condition": {"all": [
                       {"cart": "not_empty"},
                       {"older_than": {"field": "cart_updated_at", "duration": "30m"}}]}}),
            json!({"name": "vip", "condition": {"trait": {"name": "plan", "equals": "pro"}}}),
        ],
        ..Config::default()
    })
}

fn member(id: &str, entered_at: OffsetDateTime, traits: &[(&str, &str)]) -> SegmentMember {
    SegmentMember {
        id: ProfileId::anonymous(id).unwrap(),
        entered_at,
        traits: traits
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn read(path: &str) -> Request<Body> {
    Request::get(path)
        .header(header::AUTHORIZATION, "Bearer reader-token-1")
        .body(Body::empty())
        .unwrap()
}

fn unix_ms(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

#[tokio::test]
async fn segment_reads_need_a_valid_bearer_token() {
    let (app, _) = segments_app();
    for path in [
        "/v1/segments",
        "/v1/segments/vip/members",
        "/v1/segments/nope/members?limit=0",
    ] {
        let anonymous = Request::get(path).body(Body::empty()).unwrap();
        let (status, body, headers) = send(&app, anonymous).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(body["error"], "missing_token", "{path}");
        assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");
        let wrong = Request::get(path)
            .header(header::AUTHORIZATION, "Bearer wrong-token")
            .body(Body::empty())
            .unwrap();
        let (status, body, _) = send(&app, wrong).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(body["error"], "invalid_token", "{path}");
    }
}

#[tokio::test]
async fn segments_are_listed_with_their_compiled_condition_and_size() {
    let (app, store) = segments_app();
    store.put_member("cart_abandoners_30m", member("ada", NOW, &[]));
    store.put_member("cart_abandoners_30m", member("bob", NOW, &[]));
    let (status, body, _) = send(&app, read("/v1/segments")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"segments": [
            {"name": "cart_abandoners_30m", "description": "Cart left for 30 minutes",
             "condition": {"op": "all", "of": [
                 {"op": "cart_not_empty"},
                 {"op": "older_than", "field": "cart_updated_at", "ms": 1_800_000}]},
             "size": 2},
            {"name": "vip", "condition": {"op": "trait_in", "name": "plan", "values": ["pro"]},
             "size": 0},
        ]})
    );
}

#[tokio::test]
async fn members_come_in_pages_with_entered_at_traits_and_a_cursor() {
    let (app, store) = segments_app();
    let earlier = NOW - time::Duration::milliseconds(60_250);
    let traits = [
        ("email", "ada@example.com"),
        ("first_name", "Ada"),
        ("plan", "pro"),
    ];
    store.put_member(
        "cart_abandoners_30m",
        member("bob", NOW, &[("email", "bob@example.com")]),
    );
    store.put_member("cart_abandoners_30m", member("ada", NOW, &traits));
    store.put_member("cart_abandoners_30m", member("cy", earlier, &[]));

    let (status, first, _) = send(
        &app,
        read("/v1/segments/cart_abandoners_30m/members?limit=2&traits=email,first_name,phone"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let cursor = first["next_cursor"].as_str().expect("a cursor").to_string();
    assert_eq!(
        first,
        json!({"segment": "cart_abandoners_30m", "members": [
            {"id": "a:cy", "entered_at": "2026-11-29T11:58:59.75Z",
             "entered_at_ms": unix_ms(earlier), "traits": {}},
            {"id": "a:ada", "entered_at": "2026-11-29T12:00:00Z", "entered_at_ms": unix_ms(NOW),
             "traits": {"email": "ada@example.com", "first_name": "Ada"}},
        ], "next_cursor": cursor})
    );

    let (status, second, _) = send(
        &app,
        read(&format!(
            "/v1/segments/cart_abandoners_30m/members?cursor={cursor}&limit=2&traits=email"
        )),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        second,
        json!({"segment": "cart_abandoners_30m", "members": [
            {"id": "a:bob", "entered_at": "2026-11-29T12:00:00Z", "entered_at_ms": unix_ms(NOW),
             "traits": {"email": "bob@example.com"}},
        ], "next_cursor": null})
    );

    // Defaults: from the start, up to 100, no traits; empty values count as absent.
    let (status, all, _) = send(
        &app,
        read("/v1/segments/cart_abandoners_30m/members?cursor=&limit=&traits="),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<&str> = all["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a:cy", "a:ada", "a:bob"]);
    assert_eq!(all["members"][1]["traits"], json!({}));
    assert_eq!(all["next_cursor"], Value::Null);

    // A configured segment nobody is in.
    let (status, empty, _) = send(&app, read("/v1/segments/vip/members")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        empty,
        json!({"segment": "vip", "members": [], "next_cursor": null})
    );
}

#[tokio::test]
async fn an_unknown_segment_is_404_json() {
    let (app, _) = segments_app();
    let (status, body, _) = send(&app, read("/v1/segments/nope/members")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        body,
        json!({"error": "unknown_segment", "message": "no segment named \"nope\" is configured"})
    );
}

#[tokio::test]
async fn bad_member_parameters_are_400_naming_the_parameter_and_the_limit() {
    let (app, _) = segments_app();
    let long = "x".repeat(1_025);
    let many = (0..21)
        .map(|i| format!("t{i}"))
        .collect::<Vec<_>>()
        .join(",");
    let cases = [
        (
            "limit=0".to_string(),
            json!({"error": "bad_parameter", "message": "limit: 0 is too small, use 1 to 1000",
                   "field": "limit", "limit": 1000}),
        ),
        (
            "limit=1001".into(),
            json!({"error": "bad_parameter", "message": "limit: 1001 is too large, limit 1000",
                   "field": "limit", "limit": 1000}),
        ),
        (
            "limit=99999999999999999999999".into(),
            json!({"error": "bad_parameter",
                   "message": "limit: \"99999999999999999999999\" is not a whole number from 1 to 1000",
                   "field": "limit", "limit": 1000}),
        ),
        (
            "limit=-5".into(),
            json!({"error": "bad_parameter",
                   "message": "limit: \"-5\" is not a whole number from 1 to 1000",
                   "field": "limit", "limit": 1000}),
        ),
        (
            format!("traits={many}"),
            json!({"error": "bad_parameter", "message": "traits: 21 names, limit 20",
                   "field": "traits", "limit": 20}),
        ),
        (
            "traits=email,,first_name".into(),
            json!({"error": "bad_parameter", "message": "traits: name 2 is empty",
                   "field": "traits"}),
        ),
        (
            format!("traits=email,{long}"),
            json!({"error": "bad_parameter", "message": "traits: name 2 is 1025 bytes, limit 1024",
                   "field": "traits", "limit": 1024}),
        ),
        (
            "traits=email,%20first_name".into(),
            json!({"error": "bad_parameter",
                   "message": "traits: name 2 \" first_name\" starts or ends with whitespace",
                   "field": "traits"}),
        ),
        (
            "traits=a%07b".into(),
            json!({"error": "bad_parameter",
                   "message": "traits: name 1 \"a\\u{7}b\" contains a control character",
                   "field": "traits"}),
        ),
        (
            "cursor=not-a-cursor".into(),
            json!({"error": "bad_parameter",
                   "message": "cursor: is not hexadecimal; pass next_cursor back as it came",
                   "field": "cursor"}),
        ),
        (
            "cursor=0100".into(),
            json!({"error": "bad_parameter",
                   "message": "cursor: is too short; pass next_cursor back as it came",
                   "field": "cursor"}),
        ),
        (
            "trait=email".into(),
            json!({"error": "bad_parameter",
                   "message": "query: trait: unknown field `trait`, expected one of `cursor`, `limit`, `traits`",
                   "field": "query"}),
        ),
    ];
    for (query, expected) in cases {
        let (status, body, _) =
            send(&app, read(&format!("/v1/segments/vip/members?{query}"))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}");
        assert_eq!(body, expected, "{query}");
    }
    // A trait listed twice is read once.
    let (status, _, _) = send(&app, read("/v1/segments/vip/members?traits=email,email")).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn segment_reads_during_a_storage_outage_are_503() {
    let (app, store) = segments_app();
    store.set_down(true);
    for path in ["/v1/segments", "/v1/segments/vip/members"] {
        let (status, body, headers) = send(&app, read(path)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{path}");
        assert_eq!(body["error"], "unavailable");
        assert_eq!(headers[header::RETRY_AFTER], "1");
    }
}

/// Every row of the limits table in docs/SECURITY.md at its edge: a batch exactly at the
/// limit is accepted, one past it is refused as a whole with 400 naming the field and the
/// limit, and nothing of it is applied.
#[tokio::test]
async fn every_batch_limit_holds_at_its_edge() {
    type Build = fn(usize) -> wire::Batch;
    let rows: [(&str, usize, Build, &str); 6] = [
        (
            "events per batch",
            500,
            |n| batch((0..n).map(|i| page((i % 250) as u8 + 1)).collect()),
            "events",
        ),
        (
            "string length",
            1024,
            |n| {
                let mut e = page(1);
                e.name = Some("n".repeat(n));
                batch(vec![e])
            },
            "events[0].name",
        ),
        (
            "url length",
            4096,
            |n| {
                let mut b = batch(vec![page(1)]);
                b.context.page_url = Some(format!("https://shop.example/{}", "p".repeat(n - 21)));
                b
            },
            "context.page_url",
        ),
        (
            "properties per event",
            64,
            |n| {
                let mut e = page(1);
                e.properties = (0..n)
                    .map(|i| wire::Property {
                        key: format!("k{i}"),
                        value: wire::Value::Int(i as i64),
                    })
                    .collect();
                batch(vec![e])
            },
            "events[0].properties",
        ),
        (
            "items per event",
            100,
            |n| {
                let mut e = event(1, wire::EventKind::CartAdd, wire::Purpose::Analytics);
                e.items = (0..n)
                    .map(|i| wire::Item {
                        product_id: format!("sku-{i}"),
                        quantity: 1,
                        ..Default::default()
                    })
                    .collect();
                batch(vec![e])
            },
            "events[0].items",
        ),
        (
            "anonymous id length",
            256,
            |n| {
                let mut b = batch(vec![page(1)]);
                b.context.anonymous_id = Some("a".repeat(n));
                b
            },
            "context.anonymous_id",
        ),
    ];
    for (name, limit, build, field) in rows {
        let (at, store) = app();
        let (status, body, _) = send(&at, post(wire::encode(&build(limit)))).await;
        assert_eq!(status, StatusCode::OK, "{name} at {limit}: {body}");
        let (past, store_over) = app();
        let (status, body, _) = send(&past, post(wire::encode(&build(limit + 1)))).await;
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "{name} past {limit}: {body}"
        );
        assert_eq!(body["field"], field, "{name}: {body}");
        assert_eq!(body["limit"], limit, "{name}: {body}");
        assert!(store_over.applied().is_empty(), "{name}: nothing applied");
        assert!(!store.applied().is_empty(), "{name}: applied at the limit");
    }

    // An event's own ids are checked per event: a bad one drops that event, named.
    let identify = |n: usize| {
        let mut e = event(1, wire::EventKind::Identify, wire::Purpose::Analytics);
        e.user_id = Some("u".repeat(n));
        batch(vec![e])
    };
    let (router, _) = app();
    let (_, body, _) = send(&router, post(wire::encode(&identify(256)))).await;
    assert_eq!(body["accepted"], 1, "{body}");
    let (_, body, _) = send(&router, post(wire::encode(&identify(257)))).await;
    assert_eq!(
        body,
        json!({"accepted": 0, "rejected": [{"index": 0, "reason": "user_id: id is 257 bytes, limit 256"}]})
    );
}

#[tokio::test]
async fn placeholder_ids_never_name_a_person() {
    let (app, store) = app();
    let mut b = batch(vec![page(1)]);
    b.context.user_id = Some("null".into());
    let (status, body, _) = send(&app, post(wire::encode(&b))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body,
        json!({"error": "bad_identity", "field": "context.user_id",
               "message": "context.user_id: id \"null\" is a placeholder, not an id"})
    );
    let mut e = event(2, wire::EventKind::Identify, wire::Purpose::Analytics);
    e.user_id = Some("Undefined".into());
    let (status, body, _) = send(&app, post(wire::encode(&batch(vec![e, page(3)])))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"accepted": 1, "rejected": [{"index": 0,
               "reason": "user_id: id \"Undefined\" is a placeholder, not an id"}]})
    );
    let applied = store.applied();
    assert_eq!(applied.len(), 1);
    assert_eq!(applied[0].user_id, None, "the page view stays anonymous");
}

/// While the store is down, batches are spooled and acknowledged; while the spool holds
/// any, later batches queue behind them; the replayer applies them all, in order, once the
/// store answers.
#[tokio::test]
async fn batches_spooled_while_the_store_is_down_are_replayed_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let config = ingest::spool::SpoolConfig {
        enabled: true,
        dir: dir.path().join("spool"),
        ..Default::default()
    };
    let (spool, replayer) = ingest::spool::Spool::open(&config).await.unwrap();
    let store = Arc::new(MemoryStore::default());
    let state = AppState {
        store: store.clone(),
        clock: Arc::new(Fixed),
        audit: Arc::new(MemoryAuditLog::default()),
        limits: Arc::new(RateLimits::new(&Default::default(), &[])),
        segments: Arc::from([]),
        spool: Some(spool.clone()),
        config: Arc::new(Config {
            write_keys: vec![WriteKey {
                key: "site-key".into(),
                origins: vec![],
            }],
            ..Config::default()
        }),
    };
    let app = router(state);
    store.set_down(true);
    let (status, body, _) = send(&app, post(wire::encode(&batch(vec![page(1), page(2)])))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"accepted": 2, "rejected": [], "spooled": true})
    );
    // The store is back, but the spool is not drained: this batch goes behind the others.
    store.set_down(false);
    let (_, body, _) = send(&app, post(wire::encode(&batch(vec![page(3)])))).await;
    assert_eq!(body["spooled"], true);
    assert!(store.applied().is_empty());

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = Arc::new(Config::default());
    let replay = tokio::spawn(ingest::replay::run(
        replayer,
        store.clone(),
        config,
        async {
            let _ = stopped.await;
        },
    ));
    for _ in 0..100 {
        if spool.is_drained() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(spool.is_drained());
    let ids: Vec<u8> = store
        .applied()
        .iter()
        .flat_map(|u| &u.events)
        .map(|e| e.message_id.as_bytes()[0])
        .collect();
    assert_eq!(ids, [1, 2, 3], "in the order they were accepted");
    // Drained: the next batch goes straight to the store.
    let (_, body, _) = send(&app, post(wire::encode(&batch(vec![page(4)])))).await;
    assert_eq!(body, json!({"accepted": 1, "rejected": []}));
    let _ = stop.send(());
    replay.await.unwrap();
}

// ------------------------------------------------------------------ privacy rights

/// An app with a reader token (`reader-token-1`) and a privacy token (`privacy-token-1`),
/// the store and the audit log, with anonymous visitor `anon-1` placed in the store.
fn privacy_app() -> (Router, Arc<MemoryStore>, Arc<MemoryAuditLog>) {
    let config = Config {
        write_keys: vec![WriteKey {
            key: "site-key".into(),
            origins: vec![],
        }],
        api_tokens: vec![
            reader(),
            ApiToken {
                name: "dpo".into(),
                sha256: TokenHash::of("privacy-token-1"),
                scopes: vec![Scope::PrivacyWrite],
            },
        ],
        ..Config::default()
    };
    let store = Arc::new(MemoryStore::default());
    let audit = Arc::new(MemoryAuditLog::default());
    store.put_profile("anon-1", visitor_profile());
    let state = AppState {
        store: store.clone(),
        clock: Arc::new(Fixed),
        audit: audit.clone(),
        limits: Arc::new(RateLimits::new(
            &config.rate_limits,
            &config.trusted_proxies,
        )),
        segments: Arc::from([]),
        spool: None,
        config: Arc::new(config),
    };
    (router(state), store, audit)
}

fn visitor_profile() -> profile_cache::Profile {
    profile_cache::Profile {
        id: ProfileId::anonymous("anon-1").unwrap(),
        user_id: None,
        anonymous_ids: vec!["anon-1".into()],
        traits: Default::default(),
        first_seen: NOW,
        last_seen: NOW,
        events: 1,
        page_views: 1,
        sessions: 1,
        event_counts: [("page".to_string(), 1)].into(),
        recently_viewed: vec![],
        categories_viewed: vec![],
        categories_bought: vec![],
        cart: vec![],
        cart_updated_at: None,
        orders: 0,
        revenue: 0,
        last_order_at: None,
        email_opens: 0,
        email_clicks: 0,
        last_engaged_at: None,
        lifecycle: profile_cache::Lifecycle::New,
        consent: Default::default(),
        consent_log: vec![],
        segments: vec![],
    }
}

fn privacy_request(method: &str, path: &str, bearer: Option<&str>) -> Request<Body> {
    let mut r = Request::builder().method(method).uri(path);
    if let Some(token) = bearer {
        r = r.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    r.body(Body::empty()).unwrap()
}

fn audited(
    actor: &str,
    operation: Operation,
    id: &str,
    result: AuditResult,
) -> (String, Operation, String, AuditResult) {
    (
        actor.into(),
        operation,
        profile_cache::privacy::hash_id(id).to_string(),
        result,
    )
}

fn audit_log(audit: &MemoryAuditLog) -> Vec<(String, Operation, String, AuditResult)> {
    audit
        .entries()
        .into_iter()
        .map(|e| (e.actor, e.operation, e.subject.to_string(), e.result))
        .collect()
}

#[tokio::test]
async fn export_and_delete_need_the_privacy_write_scope_and_are_audited() {
    let (app, _, audit) = privacy_app();
    for (method, path) in [
        ("GET", "/v1/profiles/anon-1/export"),
        ("DELETE", "/v1/profiles/anon-1"),
    ] {
        let (status, body, _) = send(&app, privacy_request(method, path, None)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}");
        assert_eq!(body["error"], "missing_token");
        let (status, body, headers) =
            send(&app, privacy_request(method, path, Some("reader-token-1"))).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}");
        assert_eq!(
            body,
            json!({"error": "insufficient_scope",
                   "message": "this token lacks the scope privacy:write",
                   "scope": "privacy:write"})
        );
        assert_eq!(
            headers[header::WWW_AUTHENTICATE],
            r#"Bearer error="insufficient_scope", scope="privacy:write""#
        );
    }
    // Refused: nothing was exported or erased.
    let (status, body, _) = send(
        &app,
        privacy_request("GET", "/v1/profiles/anon-1/export", Some("privacy-token-1")),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["profile_id"], "a:anon-1");
    assert_eq!(body["anonymous_ids"], json!(["anon-1"]));
    assert_eq!(body["profile"]["page_views"], 1);
    assert_eq!(body["exported_at"], "2026-11-29T12:00:00Z");

    let (status, body, _) = send(
        &app,
        privacy_request("DELETE", "/v1/profiles/anon-1", Some("privacy-token-1")),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"profile_id": "a:anon-1", "status": "erased", "profiles": 1, "keys": 0,
               "segment_memberships": 0, "schedule_entries": 0, "events": 0,
               "transitions": 0, "scanned": {"events": 0, "transitions": 0}})
    );
    // Again: nothing left, and it says so.
    let (status, body, _) = send(
        &app,
        privacy_request("DELETE", "/v1/profiles/anon-1", Some("privacy-token-1")),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "already_erased");
    assert_eq!(body["profiles"], 0);
    let (status, body, _) = send(
        &app,
        privacy_request("GET", "/v1/profiles/anon-1/export", Some("privacy-token-1")),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"], "not_found");
    let (status, _, _) = send(
        &app,
        privacy_request("DELETE", "/v1/profiles/never-seen", Some("privacy-token-1")),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    use AuditResult::{Forbidden, NotFound, Ok};
    use Operation::{ProfileDelete, ProfileExport};
    assert_eq!(
        audit_log(&audit),
        [
            audited("reader", ProfileExport, "anon-1", Forbidden),
            audited("reader", ProfileDelete, "anon-1", Forbidden),
            audited("dpo", ProfileExport, "anon-1", Ok),
            audited("dpo", ProfileDelete, "anon-1", Ok),
            audited("dpo", ProfileDelete, "anon-1", Ok),
            audited("dpo", ProfileExport, "anon-1", NotFound),
            audited("dpo", ProfileDelete, "never-seen", NotFound),
        ]
    );
}

#[tokio::test]
async fn a_deletion_is_not_done_when_it_cannot_be_audited() {
    let (app, store, audit) = privacy_app();
    store.set_down(true);
    let (status, body, headers) = send(
        &app,
        privacy_request("DELETE", "/v1/profiles/anon-1", Some("privacy-token-1")),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["error"], "unavailable");
    assert_eq!(headers[header::RETRY_AFTER], "1");
    store.set_down(false);
    audit.set_down(true);
    let (status, _, _) = send(
        &app,
        privacy_request("GET", "/v1/profiles/anon-1/export", Some("privacy-token-1")),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(audit.entries().is_empty());
}

#[tokio::test]
async fn late_events_of_an_erased_person_are_rejected_as_suppressed() {
    let (app, store, _) = privacy_app();
    let (status, _, _) = send(
        &app,
        privacy_request("DELETE", "/v1/profiles/anon-1", Some("privacy-token-1")),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // A late batch of the erased visitor: page views, one without consent, and an
    // identify, which goes to a user profile that was not erased.
    let mut identify = event(4, wire::EventKind::Identify, wire::Purpose::Analytics);
    identify.user_id = Some("user-42".into());
    let b = batch(vec![
        page(1),
        event(2, wire::EventKind::Page, wire::Purpose::Marketing),
        page(3),
        identify,
    ]);
    let (status, body, _) = send(&app, post(wire::encode(&b))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"accepted": 1, "rejected": [
            {"index": 0, "reason": "suppressed: the person was erased"},
            {"index": 1, "reason": "consent: marketing not granted"},
            {"index": 2, "reason": "suppressed: the person was erased"},
        ]})
    );
    let applied = store.applied();
    let profiles: Vec<&str> = applied.iter().map(|u| u.profile.as_str()).collect();
    assert_eq!(profiles, ["u:user-42"]);
}
