//! Handler tests through `router(..).oneshot(..)` with the in-memory store: status codes,
//! JSON error shapes, consent filtering, clock-skew correction, auth and CORS.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use ingest::config::{Config, WriteKey};
use ingest::store::MemoryStore;
use ingest::{AppState, Clock, router};
use profile_cache::EventKind;
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
    let store = Arc::new(MemoryStore::default());
    let config = Config {
        write_keys: vec![WriteKey {
            key: "site-key".into(),
            origins: vec!["https://shop.example".into()],
        }],
        api_tokens: vec!["reader-token-1".into()],
        ..Config::default()
    };
    let state = AppState {
        store: store.clone(),
        clock: Arc::new(Fixed),
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
    let (status, _, _) = send(&app, get(Some("Bearer wrong-token"))).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body, _) = send(&app, get(Some("Bearer reader-token-1"))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"], "not_found");
}
