//! The Segment-compatible API through `router(..).oneshot(..)` with the in-memory store:
//! every route, auth, limits, errors, dedupe, clock skew, commerce and consent mapping.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use ingest::auth::MemoryAuditLog;
use ingest::config::{Config, SourceConfig, WriteKey};
use ingest::ratelimit::Rate;
use ingest::store::MemoryStore;
use ingest::{AppState, Clock, RateLimits, router};
use profile_cache::{ConsentMask, Event, EventKind, Item, Purpose, Value as PValue};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::macros::datetime;
use tower::ServiceExt;

const NOW: OffsetDateTime = datetime!(2026-11-29 12:00:00 UTC);
const KEY: &str = "shop-backend";

struct Fixed;
impl Clock for Fixed {
    fn now(&self) -> OffsetDateTime {
        NOW
    }
}

fn config() -> Config {
    let mut config = Config {
        write_keys: vec![WriteKey {
            key: KEY.into(),
            origins: vec!["https://shop.example".into()],
        }],
        ..Config::default()
    };
    config.sources.insert(
        KEY.into(),
        SourceConfig {
            default_purposes: Some(vec![Purpose::Necessary, Purpose::Analytics]),
            consent_categories: [("Advertising".to_string(), Purpose::Marketing)].into(),
            ..SourceConfig::default()
        },
    );
    config
}

fn app() -> (Router, Arc<MemoryStore>) {
    app_with(config())
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
        segments: config.segments().expect("segments").into(),
        spool: None,
        config: Arc::new(config),
    };
    (router(state), store)
}

/// `Basic base64("<key>:")`.
fn basic(key: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = format!("{key}:").into_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    format!("Basic {out}")
}

fn request(path: &str, body: &Value) -> Request<Body> {
    Request::post(path)
        .header(header::AUTHORIZATION, basic(KEY))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

async fn send(app: &Router, req: Request<Body>) -> (StatusCode, Value) {
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let bytes = axum::body::to_bytes(res.into_body(), usize::MAX)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn post(app: &Router, path: &str, body: Value) -> (StatusCode, Value) {
    send(app, request(path, &body)).await
}

/// Every event applied, in order.
fn events(store: &MemoryStore) -> Vec<Event> {
    store.applied().into_iter().flat_map(|u| u.events).collect()
}

fn ok() -> Value {
    json!({ "success": true })
}

#[tokio::test]
async fn every_route_maps_its_call_onto_the_collectors_events() {
    let (app, store) = app();
    let calls = [
        (
            "/v1/identify",
            json!({"userId": "ada", "anonymousId": "v1", "traits": {"plan": "pro", "address": {"city": "London"}, "tags": ["a", "b"], "gone": null}}),
        ),
        (
            "/v1/track",
            json!({"userId": "ada", "event": "Newsletter Signup", "properties": {"source": "footer", "n": 3, "ok": true, "x": 1.5}}),
        ),
        (
            "/v1/page",
            json!({"anonymousId": "v1", "name": "Home", "properties": {"url": "https://shop.example/", "title": "Shop"}}),
        ),
        ("/v1/screen", json!({"anonymousId": "v1", "name": "Cart"})),
        (
            "/v1/group",
            json!({"userId": "ada", "groupId": "acme", "traits": {"name": "Acme Ltd", "employees": 40}}),
        ),
        ("/v1/alias", json!({"userId": "ada", "previousId": "v2"})),
    ];
    for (path, body) in calls {
        assert_eq!(
            post(&app, path, body).await,
            (StatusCode::OK, ok()),
            "{path}"
        );
    }
    let applied = store.applied();
    let owners: Vec<(&str, Option<&str>)> = applied
        .iter()
        .map(|u| (u.profile.as_str(), u.anonymous_id.as_deref()))
        .collect();
    assert_eq!(
        owners,
        [
            ("u:ada", Some("v1")),
            ("u:ada", None),
            ("a:v1", Some("v1")),
            ("a:v1", Some("v1")),
            ("u:ada", None),
            // The alias carries the previous id as the anonymous id: the identity code
            // merges that visitor's profile into the user's.
            ("u:ada", Some("v2")),
        ]
    );
    let e = events(&store);
    let kinds: Vec<EventKind> = e.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            EventKind::Identify,
            EventKind::Track,
            EventKind::Page,
            EventKind::Page,
            EventKind::Identify,
            EventKind::Alias
        ]
    );
    let s = |v: &str| PValue::String(v.into());
    assert_eq!(
        e[0].properties,
        [
            ("address.city".to_string(), s("London")),
            ("plan".to_string(), s("pro")),
            ("tags".to_string(), s(r#"["a","b"]"#)),
        ]
    );
    assert_eq!(e[0].user_id.as_deref(), Some("ada"));
    assert_eq!(e[1].name.as_deref(), Some("Newsletter Signup"));
    assert_eq!(
        e[1].properties,
        [
            ("n".to_string(), PValue::Int(3)),
            ("ok".to_string(), PValue::Bool(true)),
            ("source".to_string(), s("footer")),
            ("x".to_string(), PValue::Float(1.5)),
        ]
    );
    assert_eq!(e[2].name.as_deref(), Some("Home"));
    assert_eq!(
        applied[2].context.page_url.as_deref(),
        Some("https://shop.example/")
    );
    assert_eq!(e[3].name.as_deref(), Some("Cart"));
    assert_eq!(e[4].name.as_deref(), Some("Group"));
    assert_eq!(
        e[4].properties,
        [
            ("group_id".to_string(), s("acme")),
            ("group.employees".to_string(), PValue::Int(40)),
            ("group.name".to_string(), s("Acme Ltd")),
        ]
    );
    assert_eq!(e[5].user_id.as_deref(), Some("ada"));
    assert_eq!(e[5].previous_id.as_deref(), Some("v2"));
}

#[tokio::test]
async fn a_batch_takes_each_messages_type_and_import_is_the_same() {
    let (app, store) = app();
    for path in ["/v1/batch", "/v1/import"] {
        let body = json!({"batch": [
            {"type": "identify", "userId": "bo", "traits": {"email": "bo@example.com"}},
            {"type": "track", "userId": "bo", "event": "Signed Up"},
            {"type": "page", "anonymousId": "v9"},
            {"type": "screen", "userId": "bo", "name": "Home"},
            {"type": "group", "userId": "bo", "groupId": "g1"},
            {"type": "alias", "userId": "bo", "previousId": "v9"},
        ]});
        assert_eq!(post(&app, path, body).await, (StatusCode::OK, ok()));
    }
    let kinds: Vec<EventKind> = events(&store).iter().map(|e| e.kind).collect();
    let one = [
        EventKind::Identify,
        EventKind::Track,
        EventKind::Page,
        EventKind::Page,
        EventKind::Identify,
        EventKind::Alias,
    ];
    // Without message ids each delivery is new.
    assert_eq!(kinds, [one, one].concat());
    // An empty batch is accepted.
    let (status, body) = post(&app, "/v1/batch", json!({"batch": []})).await;
    assert_eq!((status, body), (StatusCode::OK, ok()));
}

#[tokio::test]
async fn the_write_key_comes_from_basic_auth_or_the_body() {
    let (app, store) = app();
    let track = json!({"userId": "ada", "event": "A"});
    // Basic auth, as the client libraries send it.
    assert_eq!(
        post(&app, "/v1/track", track.clone()).await.0,
        StatusCode::OK
    );
    // `writeKey` in the body.
    let req = Request::post("/v1/track")
        .body(Body::from(
            json!({"writeKey": KEY, "userId": "ada", "event": "B"}).to_string(),
        ))
        .unwrap();
    assert_eq!(send(&app, req).await, (StatusCode::OK, ok()));
    // Neither.
    let req = Request::post("/v1/track")
        .body(Body::from(track.to_string()))
        .unwrap();
    let (status, body) = send(&app, req).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"], "missing_write_key");
    // An unknown key, either way.
    for req in [
        Request::post("/v1/track")
            .header(header::AUTHORIZATION, basic("nope"))
            .body(Body::from(track.to_string()))
            .unwrap(),
        Request::post("/v1/batch")
            .body(Body::from(
                json!({"writeKey": "nope", "batch": []}).to_string(),
            ))
            .unwrap(),
    ] {
        let (status, body) = send(&app, req).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(
            body,
            json!({"error": "unknown_write_key", "message": "unknown write key"})
        );
    }
    // A browser origin the key does not allow.
    let req = Request::post("/v1/track")
        .header(header::AUTHORIZATION, basic(KEY))
        .header(header::ORIGIN, "https://evil.example")
        .body(Body::from(track.to_string()))
        .unwrap();
    assert_eq!(send(&app, req).await.0, StatusCode::FORBIDDEN);
    assert_eq!(events(&store).len(), 2);
}

#[tokio::test]
async fn the_write_keys_rate_limit_applies() {
    let mut config = config();
    config.rate_limits.write_key = Rate::new(1, 2);
    let (app, _) = app_with(config);
    let track = json!({"userId": "ada", "event": "A"});
    for _ in 0..2 {
        assert_eq!(
            post(&app, "/v1/track", track.clone()).await.0,
            StatusCode::OK
        );
    }
    let (status, body) = post(&app, "/v1/batch", json!({"batch": []})).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(body["rate_limit"], "write_key");
}

#[tokio::test]
async fn segments_limits_and_malformed_requests_are_400_naming_the_field_and_limit() {
    let (app, store) = app();
    let big = "x".repeat(33 * 1024);
    let cases = [
        (
            "/v1/batch",
            json!({"batch": [{"type": "track", "userId": "a", "event": "A"}, {"type": "track", "userId": "a", "event": "B", "properties": {"blob": big}}]}),
            json!({"error": "bad_message", "field": "batch[1]", "limit": 32768, "message": "batch[1]: the message is 33858 bytes, limit 32768"}),
        ),
        (
            "/v1/track",
            json!({"userId": "a", "event": "B", "properties": {"blob": big}}),
            json!({"error": "bad_message", "field": "body", "limit": 32768, "message": "body: the message is 33843 bytes, limit 32768"}),
        ),
        (
            "/v1/track",
            json!({"userId": "a", "event": "B", "properties": {"note": "y".repeat(1025)}}),
            json!({"error": "bad_message", "field": "properties.note", "limit": 1024, "message": "properties.note: is 1025 bytes, limit 1024"}),
        ),
        (
            "/v1/batch",
            json!({"batch": [{"type": "track", "event": "A"}]}),
            json!({"error": "bad_message", "field": "batch[0].userId", "message": "batch[0].userId: a message needs userId or anonymousId"}),
        ),
        (
            "/v1/batch",
            json!({"batch": [{"type": "boom", "userId": "a"}]}),
            json!({"error": "bad_message", "field": "batch[0].type", "message": "batch[0].type: is not one of track, identify, page, screen, group, alias"}),
        ),
        (
            "/v1/batch",
            json!({"messages": []}),
            json!({"error": "bad_message", "field": "batch", "message": "batch: is missing or not an array; send {\"batch\": [messages]}"}),
        ),
        (
            "/v1/track",
            json!({"userId": "a"}),
            json!({"error": "bad_message", "field": "event", "message": "event: a track call needs an event name"}),
        ),
        (
            "/v1/alias",
            json!({"userId": "a"}),
            json!({"error": "bad_message", "field": "previousId", "message": "previousId: an alias call needs userId and previousId"}),
        ),
        (
            "/v1/track",
            json!({"userId": "a", "event": "A", "timestamp": "yesterday"}),
            json!({"error": "bad_message", "field": "timestamp", "message": "timestamp: \"yesterday\" is not an ISO 8601 time such as 2026-11-29T12:00:00.000Z"}),
        ),
        (
            "/v1/track",
            json!({"userId": "a", "event": "Product Added", "properties": {"sku": "s1", "price": "cheap"}}),
            json!({"error": "bad_message", "field": "properties.price", "message": "properties.price: \"cheap\" is not a decimal amount such as 19.99"}),
        ),
    ];
    for (path, body, expected) in cases {
        let (status, answer) = post(&app, path, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{expected}");
        assert_eq!(answer, expected);
    }
    // Not JSON.
    let req = Request::post("/v1/track")
        .header(header::AUTHORIZATION, basic(KEY))
        .body(Body::from("{\"userId\": "))
        .unwrap();
    let (status, body) = send(&app, req).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "malformed_json");
    // A request over 500 KB, whatever its messages.
    let messages: Vec<Value> = (0..20)
        .map(|_| json!({"type": "track", "userId": "a", "event": "A", "properties": {"p": "z".repeat(30 * 1024)}}))
        .collect();
    let (status, body) = post(&app, "/v1/batch", json!({ "batch": messages })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["field"], "body");
    assert_eq!(body["limit"], 512_000);
    assert!(store.applied().is_empty());
}

#[tokio::test]
async fn a_retried_message_id_is_applied_once() {
    let (app, store) = app();
    let uuid = "0b9f1f2e-4c1a-4d8e-9a41-1c2b3d4e5f60";
    let body = json!({"batch": [
        {"type": "track", "userId": "ada", "event": "A", "messageId": uuid},
        {"type": "track", "userId": "ada", "event": "B", "messageId": "node-1700000000-42"},
    ]});
    for _ in 0..2 {
        assert_eq!(
            post(&app, "/v1/batch", body.clone()).await.0,
            StatusCode::OK
        );
    }
    let ids: Vec<uuid::Uuid> = events(&store).iter().map(|e| e.message_id).collect();
    let digest = Sha256::digest(format!("{KEY}\0node-1700000000-42"));
    let hashed = uuid::Uuid::from_slice(&digest[..16]).unwrap();
    assert_eq!(ids, [uuid.parse().unwrap(), hashed]);
}

#[tokio::test]
async fn client_clocks_are_corrected_from_sent_at() {
    let (app, store) = app();
    // The client's clock is 1 h ahead: sent at 13:00:05 its time, an event 5 s earlier.
    let body = json!({
        "sentAt": "2026-11-29T13:00:05.000Z",
        "batch": [
            {"type": "track", "userId": "ada", "event": "A", "timestamp": "2026-11-29T13:00:00.000Z"},
            // A message's own sentAt wins over the request's.
            {"type": "track", "userId": "ada", "event": "B", "timestamp": "2026-11-29T11:00:00Z", "sentAt": "2026-11-29T11:00:02+00:00"},
            // Never later than the time of receipt.
            {"type": "track", "userId": "ada", "event": "D", "timestamp": "2026-11-29T13:00:10Z"},
        ]
    });
    assert_eq!(post(&app, "/v1/batch", body).await.0, StatusCode::OK);
    let times: Vec<OffsetDateTime> = events(&store).iter().map(|e| e.timestamp).collect();
    assert_eq!(
        times,
        [
            datetime!(2026-11-29 11:59:55 UTC),
            datetime!(2026-11-29 11:59:58 UTC),
            NOW
        ]
    );
    // Without sentAt, as the pipeline does: the time of receipt.
    let body = json!({"userId": "ada", "event": "C", "timestamp": "2020-01-01T00:00:00Z"});
    assert_eq!(post(&app, "/v1/track", body).await.0, StatusCode::OK);
    assert_eq!(events(&store)[3].timestamp, NOW);
    // A single call reads its own sentAt.
    let body = json!({"userId": "ada", "event": "E", "timestamp": "2026-11-29T12:30:00Z", "sentAt": "2026-11-29T12:30:01Z"});
    assert_eq!(post(&app, "/v1/track", body).await.0, StatusCode::OK);
    assert_eq!(
        events(&store)[4].timestamp,
        datetime!(2026-11-29 11:59:59 UTC)
    );
}

#[tokio::test]
async fn e_commerce_events_map_onto_the_commerce_kinds_in_minor_units() {
    let (app, store) = app();
    let product = json!({"product_id": "p1", "sku": "s1", "category": "Shoes", "name": "Runner", "price": 19.99, "quantity": 2, "brand": "Acme"});
    let body = json!({"batch": [
        {"type": "track", "userId": "ada", "event": "Product Viewed", "properties": product},
        {"type": "track", "userId": "ada", "event": "Product Added", "properties": {"sku": "s2", "price": "0.29"}},
        {"type": "track", "userId": "ada", "event": "Product Removed", "properties": {"sku": "s2", "price": 0.29}},
        {"type": "track", "userId": "ada", "event": "Checkout Started", "properties": {"order_id": "o1", "value": 39.98, "currency": "usd", "products": [product]}},
        {"type": "track", "userId": "ada", "event": "Order Completed", "properties": {"order_id": "o1", "total": 45.5, "revenue": 39.98, "currency": "EUR", "products": [product, {"sku": "s3", "price": 1.005}]}},
        {"type": "track", "userId": "ada", "event": "Order Completed", "properties": {"order_id": "o2", "total": 1500, "currency": "JPY", "products": [{"product_id": "j1", "price": 1500}]}},
        {"type": "track", "userId": "ada", "event": "Product Shared", "properties": {"product_id": "p1"}},
    ]});
    assert_eq!(post(&app, "/v1/batch", body).await.0, StatusCode::OK);
    let e = events(&store);
    let kinds: Vec<EventKind> = e.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            EventKind::ProductViewed,
            EventKind::CartAdd,
            EventKind::CartRemove,
            EventKind::CheckoutStarted,
            EventKind::OrderCompleted,
            EventKind::OrderCompleted,
            EventKind::Track,
        ]
    );
    let runner = Item {
        product_id: "p1".into(),
        category: Some("Shoes".into()),
        price: 1999,
        quantity: 2,
        name: Some("Runner".into()),
    };
    let plain = |id: &str, price| Item {
        product_id: id.into(),
        category: None,
        price,
        quantity: 1,
        name: None,
    };
    assert_eq!(e[0].items, std::slice::from_ref(&runner));
    // What the items do not hold stays a property.
    assert_eq!(
        e[0].properties,
        [("brand".to_string(), PValue::String("Acme".into()))]
    );
    assert_eq!(e[1].items, [plain("s2", 29)]);
    assert_eq!(e[2].items, [plain("s2", 29)]);
    assert_eq!(e[3].items, std::slice::from_ref(&runner));
    assert_eq!(e[3].currency.as_deref(), Some("USD"));
    assert_eq!(e[3].order_id.as_deref(), Some("o1"));
    // revenue before total; 1.005 rounds half away from zero to 101.
    assert_eq!(e[4].items, [runner, plain("s3", 101)]);
    assert_eq!(
        (e[4].revenue, e[4].currency.as_deref()),
        (3998, Some("EUR"))
    );
    assert_eq!(e[4].order_id.as_deref(), Some("o1"));
    // Yen have no minor unit; total stands in for a missing revenue.
    assert_eq!(e[5].items, [plain("j1", 1500)]);
    assert_eq!(e[5].revenue, 1500);
    assert_eq!(e[6].name.as_deref(), Some("Product Shared"));
    assert!(e[6].items.is_empty());
}

#[tokio::test]
async fn consent_categories_map_onto_purposes_and_a_missing_context_takes_the_defaults() {
    let (app, store) = app();
    let consent = |prefs: Value| json!({"consent": {"categoryPreferences": prefs}});
    let body = json!({"batch": [
        // The source's default purposes (necessary, analytics): kept.
        {"type": "track", "userId": "ada", "event": "A"},
        // Analytics refused: dropped.
        {"type": "track", "userId": "ada", "event": "B", "context": consent(json!({"Analytics": false}))},
        // Purpose names in any case; "Advertising" through the source's categories; unknown
        // categories are ignored.
        {"type": "track", "userId": "ada", "event": "C", "context": consent(json!({"ANALYTICS": true, "Advertising": true, "Functional": true}))},
        // Segment's consent event records the change on the profile.
        {"type": "track", "userId": "ada", "event": "Segment Consent Preference Updated", "context": consent(json!({"analytics": true, "advertising": false, "personalization": true}))},
    ]});
    assert_eq!(post(&app, "/v1/batch", body).await.0, StatusCode::OK);
    let e = events(&store);
    let names: Vec<&str> = e.iter().filter_map(|e| e.name.as_deref()).collect();
    assert_eq!(names, ["A", "C", "Segment Consent Preference Updated"]);
    let change = e[2].consent.expect("a consent change");
    assert_eq!(e[2].kind, EventKind::ConsentChange);
    let bits = |ps: &[Purpose]| ConsentMask(ps.iter().fold(0, |m, p| m | p.bit()));
    assert_eq!(
        change.granted,
        bits(&[
            Purpose::Necessary,
            Purpose::Analytics,
            Purpose::Personalization
        ])
    );
    assert_eq!(change.denied, bits(&[Purpose::Marketing]));
    // Marketing needed for track events: only "C" had it.
    let mut config = config();
    config.consent.purposes = [(EventKind::Track, Purpose::Marketing)].into();
    let (app, store) = app_with(config);
    let body = json!({"batch": [
        {"type": "track", "userId": "ada", "event": "A"},
        {"type": "track", "userId": "ada", "event": "C", "context": consent(json!({"analytics": true, "Advertising": true}))},
    ]});
    assert_eq!(post(&app, "/v1/batch", body).await.0, StatusCode::OK);
    let names: Vec<String> = events(&store).into_iter().filter_map(|e| e.name).collect();
    assert_eq!(names, ["C"]);
}

#[tokio::test]
async fn a_source_without_default_purposes_keeps_only_messages_with_consent() {
    let mut config = config();
    config.sources.clear();
    let (app, store) = app_with(config);
    let body = json!({"batch": [
        {"type": "identify", "userId": "ada", "traits": {"plan": "pro"}},
        {"type": "identify", "userId": "bo", "traits": {"plan": "pro"}, "context": {"consent": {"categoryPreferences": {"analytics": true}}}},
    ]});
    assert_eq!(post(&app, "/v1/batch", body).await, (StatusCode::OK, ok()));
    let owners: Vec<String> = store
        .applied()
        .iter()
        .map(|u| u.profile.to_string())
        .collect();
    assert_eq!(owners, ["u:bo"]);
}

#[tokio::test]
async fn the_demo_write_key_defaults_to_necessary_analytics_and_personalization() {
    let config = Config::load(None, &[("INGEST_DEMO".into(), "true".into())]).unwrap();
    assert_eq!(
        config.sources["demo"].default_purposes.as_deref(),
        Some(
            &[
                Purpose::Necessary,
                Purpose::Analytics,
                Purpose::Personalization
            ][..]
        )
    );
}
