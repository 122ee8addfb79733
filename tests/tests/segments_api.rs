//! End-to-end: the real collector with the demo segments and a private redis-server. Events
//! put profiles into segments; `GET /v1/segments` and `GET /v1/segments/{name}/members`
//! read them back, agreeing with the profile API and with Redis itself.

mod support;

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::blocking::{Client, Response};
use serde_json::{Value, json};
use support::{Ingest, RedisServer, TOKEN, WRITE_KEY, now_ms, redis_json};

const DEMO_SEGMENTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../profile-cache/segments.demo.toml"
);

fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn ev(n: u128, kind: wire::EventKind) -> wire::Event {
    wire::Event {
        message_id: *uuid::Uuid::from_u128(0x5e6_0000 + n).as_bytes(),
        timestamp_ms: now_ms(),
        kind,
        purpose: wire::Purpose::Analytics,
        ..Default::default()
    }
}

fn order(n: u128, revenue: i64) -> wire::Event {
    let mut e = ev(n, wire::EventKind::OrderCompleted);
    e.order_id = Some(format!("o-{n}"));
    e.revenue = revenue;
    e.currency = Some("EUR".into());
    e
}

fn text(key: &str, value: &str) -> wire::Property {
    wire::Property {
        key: key.into(),
        value: wire::Value::String(value.into()),
    }
}

fn post(ingest: &Ingest, anon: &str, user: Option<&str>, events: Vec<wire::Event>) {
    let batch = wire::Batch {
        write_key: WRITE_KEY.into(),
        sent_at_ms: now_ms(),
        consent: 0b1111,
        context: wire::Context {
            anonymous_id: Some(anon.into()),
            user_id: user.map(String::from),
            session_id: Some(format!("{anon}-s1")),
            ..Default::default()
        },
        events,
    };
    let res = client()
        .post(ingest.url("/v1/fb"))
        .body(wire::encode(&batch))
        .send()
        .expect("post batch");
    assert_eq!(res.status(), StatusCode::OK);
}

fn get(ingest: &Ingest, path: &str) -> (StatusCode, Value) {
    let res: Response = client()
        .get(ingest.url(path))
        .bearer_auth(TOKEN)
        .send()
        .expect("get");
    let status = res.status();
    (status, res.json().unwrap_or(Value::Null))
}

#[test]
fn buyers_enter_demo_segments_and_read_back_through_both_endpoints() {
    let redis = RedisServer::start().unwrap();
    let ingest = Ingest::start_with(
        &redis.url(),
        &format!("segments_file = {DEMO_SEGMENTS:?}\n"),
    );

    // Ada identifies herself and places a large order; a little later an anonymous visitor
    // places a small one. Both become recent buyers; only Ada is high value.
    let mut identify = ev(1, wire::EventKind::Identify);
    identify.user_id = Some("ada".into());
    identify.properties = vec![text("email", "ada@example.com"), text("first_name", "Ada")];
    let before = now_ms();
    post(
        &ingest,
        "visitor-a",
        Some("ada"),
        vec![identify, order(2, 60_000)],
    );
    let between = now_ms();
    std::thread::sleep(Duration::from_millis(5));
    post(&ingest, "visitor-b", None, vec![order(3, 1_000)]);
    let after = now_ms();

    let (status, body) = get(&ingest, "/v1/segments");
    assert_eq!(status, StatusCode::OK);
    let segments = body["segments"].as_array().unwrap();
    let configured = std::fs::read_to_string(DEMO_SEGMENTS)
        .unwrap()
        .lines()
        .filter(|l| l.trim() == "[[segments]]")
        .count();
    assert_eq!(segments.len(), configured);
    assert_eq!(segments[0]["name"], "highly_engaged", "configuration order");
    let find = |name: &str| {
        segments
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("{name} listed"))
    };
    assert_eq!(
        *find("recent_buyers"),
        json!({"name": "recent_buyers", "description": "Placed an order in the last 7 days",
               "condition": {"op": "within", "field": "last_order_at", "ms": 604_800_000_i64},
               "size": 2})
    );
    assert_eq!(find("high_value")["size"], 1);
    assert_eq!(find("lifecycle_new")["size"], 2);
    assert_eq!(find("loyal_customers")["size"], 0);

    // One member per page: Ada first (she entered earlier), then the visitor.
    let (status, first) = get(
        &ingest,
        "/v1/segments/recent_buyers/members?limit=1&traits=email,first_name,phone",
    );
    assert_eq!(status, StatusCode::OK);
    assert_eq!(first["segment"], "recent_buyers");
    let members = first["members"].as_array().unwrap();
    assert_eq!(members.len(), 1);
    let ada = &members[0];
    assert_eq!(ada["id"], "u:ada");
    assert_eq!(
        ada["traits"],
        json!({"email": "ada@example.com", "first_name": "Ada"})
    );
    let ada_ms = ada["entered_at_ms"].as_i64().unwrap();
    assert!(
        (before..=between).contains(&ada_ms),
        "{before} <= {ada_ms} <= {between}"
    );
    // The same time as the profile API and as Redis.
    let (_, profile) = get(&ingest, "/v1/profiles/ada");
    let listed = profile["segments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "recent_buyers")
        .expect("ada's profile lists recent_buyers");
    assert_eq!(listed["entered_at"], ada["entered_at"]);
    let score = redis_json(
        redis.port(),
        "return cjson.encode(redis.call('ZSCORE', 'segment:{recent_buyers}:members', 'u:ada'))",
    );
    assert_eq!(score, json!(ada_ms.to_string()));

    let cursor = first["next_cursor"].as_str().expect("a second page");
    let (status, second) = get(
        &ingest,
        &format!("/v1/segments/recent_buyers/members?limit=1&traits=email&cursor={cursor}"),
    );
    assert_eq!(status, StatusCode::OK);
    let members = second["members"].as_array().unwrap();
    assert_eq!(members.len(), 1);
    assert_eq!(members[0]["id"], "a:visitor-b");
    assert_eq!(members[0]["traits"], json!({}));
    let visitor_ms = members[0]["entered_at_ms"].as_i64().unwrap();
    assert!((between..=after).contains(&visitor_ms));
    assert_eq!(second["next_cursor"], Value::Null);

    // What the server answers for a segment it does not run, and for a bad limit.
    let (status, body) = get(&ingest, "/v1/segments/big_spenders/members");
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"], "unknown_segment");
    let (status, body) = get(&ingest, "/v1/segments/recent_buyers/members?limit=5000");
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body,
        json!({"error": "bad_parameter", "message": "limit: 5000 is too large, limit 1000",
               "field": "limit", "limit": 1000})
    );
}
