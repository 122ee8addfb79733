//! End-to-end: the real collector binary and a private redis-server. Batches are built with
//! `wire`, profiles read back over HTTP, and bad inputs get their documented answers while
//! the server keeps serving.

mod support;

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::blocking::{Client, Response};
use serde_json::{Value, json};
use support::{Ingest, ORIGIN, RedisServer, TOKEN, WRITE_KEY, now_ms, redis_json};

fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn id(n: u32) -> [u8; 16] {
    *uuid::Uuid::from_u128(0xabcd_0000_0000 + u128::from(n)).as_bytes()
}

fn item(product: &str, category: &str, price: i64, quantity: u32) -> wire::Item {
    wire::Item {
        product_id: product.into(),
        category: Some(category.into()),
        price,
        quantity,
        name: None,
    }
}

fn ev(n: u32, kind: wire::EventKind) -> wire::Event {
    wire::Event {
        message_id: id(n),
        timestamp_ms: now_ms(),
        kind,
        purpose: wire::Purpose::Analytics,
        ..Default::default()
    }
}

fn batch(anon: &str, events: Vec<wire::Event>) -> wire::Batch {
    wire::Batch {
        write_key: WRITE_KEY.into(),
        sent_at_ms: now_ms(),
        consent: 0b1111,
        context: wire::Context {
            anonymous_id: Some(anon.into()),
            session_id: Some(format!("{anon}-s1")),
            page_url: Some("https://shop.example/".into()),
            ..Default::default()
        },
        events,
    }
}

fn post(ingest: &Ingest, body: Vec<u8>) -> Response {
    client()
        .post(ingest.url("/v1/fb"))
        .body(body)
        .send()
        .expect("post batch")
}

fn json(res: Response) -> (StatusCode, Value) {
    let status = res.status();
    (status, res.json().unwrap_or(Value::Null))
}

fn profile(ingest: &Ingest, id: &str) -> (StatusCode, Value) {
    json(
        client()
            .get(ingest.url(&format!("/v1/profiles/{id}")))
            .bearer_auth(TOKEN)
            .send()
            .unwrap(),
    )
}

fn shopping_session(anon: &str) -> Vec<wire::Event> {
    let mut view = ev(2, wire::EventKind::ProductViewed);
    view.items = vec![item("sku-1", "shoes", 5_000, 1)];
    let mut view2 = ev(3, wire::EventKind::ProductViewed);
    view2.items = vec![item("sku-2", "hats", 2_000, 1)];
    let mut add = ev(4, wire::EventKind::CartAdd);
    add.items = vec![item("sku-1", "shoes", 5_000, 2)];
    let mut add2 = ev(5, wire::EventKind::CartAdd);
    add2.items = vec![item("sku-2", "hats", 2_000, 1)];
    let mut order = ev(6, wire::EventKind::OrderCompleted);
    order.order_id = Some(format!("{anon}-o1"));
    order.revenue = 10_000;
    order.currency = Some("EUR".into());
    order.items = vec![item("sku-1", "shoes", 5_000, 2)];
    let mut signup = ev(7, wire::EventKind::Track);
    signup.name = Some("Newsletter Signup".into());
    vec![
        ev(1, wire::EventKind::Page),
        view,
        view2,
        add,
        add2,
        order,
        signup,
    ]
}

#[test]
fn batches_become_exact_profiles_and_retries_count_once() {
    let redis = RedisServer::start().unwrap();
    let ingest = Ingest::start(&redis.url());
    let bytes = wire::encode(&batch("visitor-1", shopping_session("visitor-1")));

    let (status, body) = json(post(&ingest, bytes.clone()));
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"accepted": 7, "rejected": []}));
    // The tracker retries after a lost response: accepted again, counted once.
    let (status, body) = json(post(&ingest, bytes));
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["accepted"], 7);

    let (status, p) = profile(&ingest, "visitor-1");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(p["id"], "a:visitor-1");
    assert_eq!(p["events"], 7);
    assert_eq!(p["page_views"], 1);
    assert_eq!(p["sessions"], 1);
    assert_eq!(p["orders"], 1);
    assert_eq!(p["revenue"], 10_000);
    assert_eq!(p["event_counts"]["product_viewed"], 2);
    assert_eq!(p["event_counts"]["Newsletter Signup"], 1);
    assert_eq!(p["recently_viewed"][0]["product_id"], "sku-2");
    assert_eq!(p["recently_viewed"][1]["product_id"], "sku-1");
    assert_eq!(p["categories_bought"], json!([["shoes", 2]]));
    // The order emptied the cart.
    assert_eq!(p["cart"], json!([]));
    assert_eq!(p["lifecycle"], "new");
    assert_eq!(p["anonymous_ids"], json!(["visitor-1"]));
}

#[test]
fn identified_user_is_readable_by_user_id() {
    let redis = RedisServer::start().unwrap();
    let ingest = Ingest::start(&redis.url());
    let mut identify = ev(1, wire::EventKind::Identify);
    identify.user_id = Some("user-7".into());
    identify.properties = vec![
        wire::Property {
            key: "email".into(),
            value: wire::Value::String("ada@example.com".into()),
        },
        wire::Property {
            key: "vip".into(),
            value: wire::Value::Bool(true),
        },
    ];
    let (status, _) = json(post(
        &ingest,
        wire::encode(&batch("visitor-2", vec![identify])),
    ));
    assert_eq!(status, StatusCode::OK);
    let (status, p) = profile(&ingest, "user-7");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(p["id"], "u:user-7");
    assert_eq!(p["user_id"], "user-7");
    assert_eq!(
        p["traits"],
        json!({"email": "ada@example.com", "vip": "true"})
    );
    assert_eq!(p["anonymous_ids"], json!(["visitor-2"]));
}

#[test]
fn a_visitor_who_logs_in_is_one_profile_under_both_ids() {
    let redis = RedisServer::start().unwrap();
    let ingest = Ingest::start(&redis.url());
    // Shopping before logging in, on the anonymous profile.
    let before = batch("visitor-4", shopping_session("visitor-4"));
    assert_eq!(json(post(&ingest, wire::encode(&before))).0, StatusCode::OK);
    // The login: the tracker's identify, then its batches carry the user id too.
    let mut identify = ev(20, wire::EventKind::Identify);
    identify.user_id = Some("user-9".into());
    let mut login = batch("visitor-4", vec![identify, ev(21, wire::EventKind::Page)]);
    login.context.user_id = Some("user-9".into());
    let (status, body) = json(post(&ingest, wire::encode(&login)));
    assert_eq!(
        (status, body["accepted"].clone()),
        (StatusCode::OK, json!(2))
    );

    let (_, by_user) = profile(&ingest, "user-9");
    let (_, by_visitor) = profile(&ingest, "visitor-4");
    assert_eq!(by_user, by_visitor);
    assert_eq!(by_user["id"], "u:user-9");
    assert_eq!(by_user["anonymous_ids"], json!(["visitor-4"]));
    assert_eq!(by_user["page_views"], 2);
    assert_eq!(by_user["events"], 9);
    assert_eq!(
        (&by_user["orders"], &by_user["revenue"]),
        (&json!(1), &json!(10_000))
    );
    // A retry of the pre-login batch, which still names only the visitor, counts nothing.
    let (_, body) = json(post(&ingest, wire::encode(&before)));
    assert_eq!(body["accepted"], 7);
    assert_eq!(profile(&ingest, "user-9").1["events"], 9);
}

#[test]
fn the_configuration_adds_purposes_per_kind_and_filters_what_a_source_keeps() {
    let redis = RedisServer::start().unwrap();
    let ingest = Ingest::start_with(
        &redis.url(),
        &format!(
            "[consent]\npurposes = {{ track = \"marketing\" }}\n\
             [sources.{WRITE_KEY}]\nproperties = {{ deny = [\"email\"] }}\n\
             traits = {{ allow = [\"plan\"] }}\n"
        ),
    );
    let mut identify = ev(1, wire::EventKind::Identify);
    identify.user_id = Some("user-5".into());
    let text = |k: &str, v: &str| wire::Property {
        key: k.into(),
        value: wire::Value::String(v.into()),
    };
    identify.properties = vec![text("plan", "pro"), text("email", "x@example.com")];
    let mut track = ev(2, wire::EventKind::Track);
    track.name = Some("Clicked Ad".into());
    let mut b = batch(
        "visitor-8",
        vec![identify, track, ev(3, wire::EventKind::Page)],
    );
    b.context.user_id = Some("user-5".into());
    b.consent = 0b0011; // necessary and analytics: no marketing
    let (status, body) = json(post(&ingest, wire::encode(&b)));
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"accepted": 2, "rejected": [{"index": 1, "reason": "consent: marketing not granted"}]})
    );
    let (_, p) = profile(&ingest, "user-5");
    assert_eq!(p["traits"], json!({"plan": "pro"}));
    assert_eq!(p["event_counts"].get("Clicked Ad"), None);
    assert_eq!(p["page_views"], 1);
}

#[test]
fn events_without_consent_are_reported_and_not_stored() {
    let redis = RedisServer::start().unwrap();
    let ingest = Ingest::start(&redis.url());
    let mut b = batch(
        "visitor-3",
        vec![ev(1, wire::EventKind::Page), ev(2, wire::EventKind::Page)],
    );
    b.consent = 0b0001; // necessary only
    let mut consent = ev(3, wire::EventKind::ConsentChange);
    consent.purpose = wire::Purpose::Necessary;
    consent.consent_denied = 0b1110;
    b.events.push(consent);
    let (status, body) = json(post(&ingest, wire::encode(&b)));
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"accepted": 1, "rejected": [
            {"index": 0, "reason": "consent: analytics not granted"},
            {"index": 1, "reason": "consent: analytics not granted"},
        ]})
    );
    let (_, p) = profile(&ingest, "visitor-3");
    assert_eq!(p["page_views"], 0);
    assert_eq!(p["events"], 1);
    assert_eq!(p["consent"]["marketing"]["status"], "denied");
}

#[test]
fn bad_inputs_get_documented_answers_and_the_server_keeps_serving() {
    let redis = RedisServer::start().unwrap();
    let ingest = Ingest::start(&redis.url());
    let good = wire::encode(&batch("visitor-4", vec![ev(1, wire::EventKind::Page)]));

    let (status, body) = json(post(&ingest, b"\x00\x01garbage\xff".repeat(10)));
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "malformed_batch");

    let (status, body) = json(post(&ingest, good[..good.len() / 2].to_vec()));
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "malformed_batch");

    let (status, body) = json(post(&ingest, vec![b'x'; 600 * 1024]));
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["limit"], 512 * 1024);

    let mut unknown = batch("visitor-4", vec![ev(1, wire::EventKind::Page)]);
    unknown.write_key = "not-a-key".into();
    let (status, body) = json(post(&ingest, wire::encode(&unknown)));
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"], "unknown_write_key");

    let res = client()
        .post(ingest.url("/v1/fb"))
        .header("Origin", "https://evil.example")
        .body(good.clone())
        .send()
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);

    let res = client()
        .get(ingest.url("/v1/profiles/visitor-4"))
        .send()
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let res = client()
        .get(ingest.url("/v1/profiles/visitor-4"))
        .bearer_auth("wrong-token")
        .send()
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);

    // Still serving, and nothing above was applied.
    let res = client()
        .post(ingest.url("/v1/fb"))
        .header("Origin", ORIGIN)
        .header("Content-Type", "text/plain")
        .body(good)
        .send()
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        ORIGIN,
        "browsers need the CORS header to read the answer"
    );
    let (_, p) = profile(&ingest, "visitor-4");
    assert_eq!(p["events"], 1);
}

#[test]
fn redis_outage_is_503_with_retry_after_then_recovers() {
    let redis = RedisServer::start().unwrap();
    let ingest = Ingest::start(&redis.url());
    let port = redis.port();
    drop(redis);
    let (status, body) = json(post(
        &ingest,
        wire::encode(&batch("visitor-5", vec![ev(1, wire::EventKind::Page)])),
    ));
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["error"], "unavailable");
    let res = client().get(ingest.url("/readyz")).send().unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let res = client()
        .post(ingest.url("/v1/fb"))
        .body(wire::encode(&batch(
            "visitor-5",
            vec![ev(1, wire::EventKind::Page)],
        )))
        .send()
        .unwrap();
    assert_eq!(res.headers()["retry-after"], "1");

    // A new Redis on the same port: the collector reconnects and the retry lands once.
    let dir = tempfile::tempdir().unwrap();
    let _redis = RedisServer::start_with_dir(dir.path(), port).unwrap();
    let bytes = wire::encode(&batch("visitor-5", vec![ev(1, wire::EventKind::Page)]));
    let mut last = StatusCode::SERVICE_UNAVAILABLE;
    for _ in 0..100 {
        last = post(&ingest, bytes.clone()).status();
        if last == StatusCode::OK {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(last, StatusCode::OK);
    let (_, p) = profile(&ingest, "visitor-5");
    assert_eq!(p["page_views"], 1);
}

#[test]
fn sigterm_stops_the_collector_cleanly() {
    let redis = RedisServer::start().unwrap();
    let ingest = Ingest::start(&redis.url());
    let url = ingest.url("/healthz");
    let status = ingest.terminate();
    assert!(status.success(), "exit status {status}");
    assert!(client().get(url).send().is_err(), "no longer listening");
}

#[test]
fn demo_credentials_are_refused_on_a_public_address() {
    let out = support::ingest_command()
        .env("INGEST_DEMO", "true")
        .env("INGEST_LISTEN", "0.0.0.0:0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("listen: 0.0.0.0:0 is not a loopback address"),
        "{stderr}"
    );
}

#[test]
fn a_batch_in_flight_at_sigterm_is_finished_and_applied() {
    use std::io::{Read, Write};
    let redis = RedisServer::start().unwrap();
    let ingest = Ingest::start(&redis.url());
    let body = wire::encode(&batch("visitor-6", vec![ev(1, wire::EventKind::Page)]));
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", ingest.port)).unwrap();
    write!(
        conn,
        "POST /v1/fb HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    let (head, tail) = body.split_at(body.len() / 2);
    conn.write_all(head).unwrap();
    conn.flush().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // SIGTERM while the request is half sent: the collector stops accepting but finishes it.
    let pid = ingest.pid().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    conn.write_all(tail).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut response = String::new();
    let _ = conn.read_to_string(&mut response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.contains(r#"{"accepted":1,"rejected":[]}"#),
        "{response}"
    );
    let status = ingest.terminate_wait();
    assert!(status.success(), "exit status {status}");
    let mut redis_conn = std::net::TcpStream::connect(("127.0.0.1", redis.port())).unwrap();
    redis_conn
        .write_all(b"HGET profile:{a:visitor-6} page_views\r\n")
        .unwrap();
    let mut reply = [0u8; 16];
    let n = redis_conn.read(&mut reply).unwrap();
    assert_eq!(&reply[..n], b"$1\r\n1\r\n");
}

/// The demo segments file, by absolute path.
fn demo_segments() -> String {
    format!(
        "segments_file = {:?}\n",
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../profile-cache/segments.demo.toml"
        )
    )
}

/// `(segment, change, at, reason)` of each `stream:transitions` entry of `profile`, in order.
fn transitions(redis: &RedisServer, profile: &str) -> Vec<(String, String, i64, String)> {
    let entries = redis_json(
        redis.port(),
        "return cjson.encode(redis.call('XRANGE', 'stream:transitions', '-', '+'))",
    );
    let mut found = Vec::new();
    // cjson encodes an empty Lua table as an object.
    if entries == json!({}) {
        return found;
    }
    for entry in entries.as_array().unwrap() {
        let fields: Vec<&str> = entry[1]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap())
            .collect();
        let [
            "profile",
            p,
            "segment",
            segment,
            "change",
            change,
            "at",
            at,
            "reason",
            reason,
        ] = fields[..]
        else {
            panic!("unexpected transition {fields:?}");
        };
        if p == profile {
            found.push((
                segment.to_string(),
                change.to_string(),
                at.parse().unwrap(),
                reason.to_string(),
            ));
        }
    }
    found
}

#[test]
fn an_abandoned_cart_enters_the_segment_and_the_transition_is_on_the_stream() {
    let redis = RedisServer::start().unwrap();
    let ingest = Ingest::start_with(&redis.url(), &demo_segments());
    // The visitor filled the cart 40 minutes before the batch was sent (a tab left open):
    // the collector dates the event 40 minutes before it received it.
    let mut add = ev(1, wire::EventKind::CartAdd);
    add.timestamp_ms -= 40 * 60_000;
    add.items = vec![item("sku-1", "shoes", 5_000, 1)];
    let before = now_ms();
    let (status, _) = json(post(&ingest, wire::encode(&batch("visitor-7", vec![add]))));
    assert_eq!(status, StatusCode::OK);
    let after = now_ms();

    let entered = transitions(&redis, "a:visitor-7");
    let names: Vec<(&str, &str, &str)> = entered
        .iter()
        .map(|(s, c, _, r)| (s.as_str(), c.as_str(), r.as_str()))
        .collect();
    assert_eq!(
        names,
        [
            ("cart_abandoners_30m", "enter", "event"),
            ("lifecycle_new", "enter", "event")
        ]
    );
    let at = entered[0].2;
    assert!(
        (before..=after).contains(&at),
        "{before} <= {at} <= {after}"
    );
    let (_, p) = profile(&ingest, "visitor-7");
    assert_eq!(p["segments"][0]["name"], "cart_abandoners_30m");
    let entered_at = p["segments"][0]["entered_at"].as_str().unwrap().to_string();
    assert!(entered_at.starts_with("20"), "{entered_at}");

    // The order takes the visitor out; a retry of it changes nothing more.
    let mut order = ev(2, wire::EventKind::OrderCompleted);
    order.items = vec![item("sku-1", "shoes", 5_000, 1)];
    let bytes = wire::encode(&batch("visitor-7", vec![order]));
    for _ in 0..2 {
        let (status, body) = json(post(&ingest, bytes.clone()));
        assert_eq!(
            (status, body["accepted"].as_u64()),
            (StatusCode::OK, Some(1))
        );
    }
    let changes: Vec<(String, String)> = transitions(&redis, "a:visitor-7")
        .into_iter()
        .map(|(s, c, _, _)| (s, c))
        .collect();
    let pairs: Vec<(&str, &str)> = changes
        .iter()
        .map(|(s, c)| (s.as_str(), c.as_str()))
        .collect();
    assert_eq!(
        pairs,
        [
            ("cart_abandoners_30m", "enter"),
            ("lifecycle_new", "enter"),
            // One update's changes come in the order of the definitions.
            ("recent_buyers", "enter"),
            ("cart_abandoners_30m", "exit"),
        ]
    );
    let (_, p) = profile(&ingest, "visitor-7");
    let listed: Vec<&str> = p["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["lifecycle_new", "recent_buyers"]);
}

#[test]
fn an_abandoned_cart_enters_the_segment_at_its_deadline_through_the_scheduler() {
    // The demo's 30 minutes, shortened to 2 seconds of real time: the collector's scheduler
    // runs on the system clock, with its default settings.
    let segments = r#"
[[segments]]
name = "cart_abandoners_2s"
condition = { all = [
  { cart = "not_empty" },
  { older_than = { field = "cart_updated_at", duration = "2s" } },
  { no_order_since = "cart_updated_at" },
] }
"#;
    let redis = RedisServer::start().unwrap();
    let ingest = Ingest::start_with(&redis.url(), segments);
    let mut add = ev(1, wire::EventKind::CartAdd);
    add.items = vec![item("sku-1", "shoes", 5_000, 1)];
    let (status, _) = json(post(&ingest, wire::encode(&batch("visitor-8", vec![add]))));
    assert_eq!(status, StatusCode::OK);
    assert_eq!(transitions(&redis, "a:visitor-8"), []);
    let cart_updated_at: i64 = redis_json(
        redis.port(),
        "return cjson.encode(redis.call('HGET', 'profile:{a:visitor-8}', 'cart_updated_at'))",
    )
    .as_str()
    .unwrap()
    .parse()
    .unwrap();
    let deadline = cart_updated_at + 2_000;

    let mut entered = Vec::new();
    while entered.is_empty() && now_ms() < deadline + 3_000 {
        std::thread::sleep(Duration::from_millis(20));
        entered = transitions(&redis, "a:visitor-8");
    }
    let [(segment, change, at, reason)] = &entered[..] else {
        panic!("expected one transition, found {entered:?}");
    };
    assert_eq!(
        (segment.as_str(), change.as_str(), reason.as_str()),
        ("cart_abandoners_2s", "enter", "deadline")
    );
    assert!(
        (deadline..deadline + 1_000).contains(at),
        "entered at {at}, {} ms after the deadline {deadline}",
        at - deadline
    );
    let (_, p) = profile(&ingest, "visitor-8");
    assert_eq!(p["segments"][0]["name"], "cart_abandoners_2s");
    let scheduled = redis_json(
        redis.port(),
        "return cjson.encode(redis.call('ZRANGE', 'schedule:deadlines', 0, -1))",
    );
    assert_eq!(scheduled, json!({}), "nothing left to wait for");
}

#[test]
fn bad_segment_definitions_stop_the_collector_with_every_problem_listed() {
    let mut config = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(
        &mut config,
        br#"
listen = "127.0.0.1:0"
[[segments]]
name = "cart_abandoners"
condition = { all = [
  { cart = "not_empty" },
  { older_than = { field = "cart_updated_at", duration = "30x" } },
] }
[[segments]]
name = "loyal"
condition = { metric = { field = "orders" } }
"#,
    )
    .unwrap();
    let out = support::ingest_command()
        .arg("--config")
        .arg(config.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = concat!(
        "error: configuration: segments: 2 problems in the segment definitions:\n",
        r#"  segment "cart_abandoners": condition.all[1].older_than.duration: "30x" is not a duration"#,
    );
    assert!(stderr.contains(expected), "{stderr}");
    assert!(
        stderr
            .contains("\n  segment \"loyal\": condition.metric: needs at_least, at_most or both\n"),
        "{stderr}"
    );
}

/// `CONFIG GET <name>` on the Redis at `port`, through redis-cli.
fn redis_config(port: u16, name: &str) -> String {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string(), "--raw", "CONFIG", "GET", name])
        .output()
        .expect("redis-cli runs");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().nth(1).unwrap_or_default().to_string()
}

/// The shipped production configuration (ingest/redis.conf) sets what it documents, and a
/// Redis run with it keeps, through SIGKILL and a restart, every event acknowledged more than
/// a second before (the AOF is fsynced every second).
#[test]
fn the_production_redis_config_keeps_acknowledged_events_through_a_crash() {
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ingest/redis.conf");
    let dir = tempfile::tempdir().unwrap();
    let port = support::free_port();
    let redis = RedisServer::start_with_config(&config, dir.path(), port).unwrap();
    for (name, value) in [
        ("appendonly", "yes"),
        ("appendfsync", "everysec"),
        ("maxmemory-policy", "noeviction"),
        ("no-appendfsync-on-rewrite", "no"),
        ("save", ""),
    ] {
        assert_eq!(redis_config(port, name), value, "{name}");
    }

    let ingest = Ingest::start(&redis.url());
    for n in 0..20 {
        let mut e = ev(n, wire::EventKind::Page);
        e.message_id = id(1000 + n);
        let (status, body) = json(post(&ingest, wire::encode(&batch("durable-1", vec![e]))));
        assert_eq!(
            (status, body["accepted"].clone()),
            (StatusCode::OK, json!(1))
        );
    }
    // Past the next once-a-second fsync of the append-only file.
    std::thread::sleep(Duration::from_millis(2500));
    redis.crash();

    let _redis = RedisServer::start_with_config(&config, dir.path(), port).unwrap();
    let p = (0..50)
        .find_map(|_| match profile(&ingest, "durable-1") {
            (StatusCode::OK, p) => Some(p),
            _ => {
                std::thread::sleep(Duration::from_millis(100));
                None
            }
        })
        .expect("the profile is readable after the restart");
    assert_eq!(p["page_views"], 20);
    assert_eq!(p["events"], 20);
}

/// With the spool on, batches that arrive while Redis is down are acknowledged from the
/// spool and applied when Redis is back, in order and once each, even when the collector is
/// killed (SIGKILL) before it could replay them.
#[test]
fn batches_spooled_while_redis_is_down_survive_a_collector_crash_and_apply_once() {
    let redis_dir = tempfile::tempdir().unwrap();
    let spool_dir = tempfile::tempdir().unwrap();
    let port = support::free_port();
    let spool = format!(
        "[spool]\nenabled = true\ndir = \"{}\"\n[profiles]\nredis_timeout = \"500ms\"\n",
        spool_dir.path().display()
    );
    let redis = RedisServer::start_with_dir(redis_dir.path(), port).unwrap();
    let ingest = Ingest::start_with(&redis.url(), &spool);
    let send = |ingest: &Ingest, first: u32, n: u32| {
        let events = (first..first + n)
            .map(|i| ev(i, wire::EventKind::Page))
            .collect();
        json(post(ingest, wire::encode(&batch("spooled-1", events))))
    };
    let (status, body) = send(&ingest, 1, 3);
    assert_eq!(
        (status, body),
        (StatusCode::OK, json!({"accepted": 3, "rejected": []}))
    );

    drop(redis);
    let (status, body) = send(&ingest, 10, 2);
    assert_eq!(
        (status, body),
        (
            StatusCode::OK,
            json!({"accepted": 2, "rejected": [], "spooled": true})
        )
    );
    // The tracker retries a batch whose answer it lost: spooled again, counted once.
    let (status, _) = send(&ingest, 10, 2);
    assert_eq!(status, StatusCode::OK);
    let (status, body) = send(&ingest, 20, 4);
    assert_eq!(
        (status, body["spooled"].clone()),
        (StatusCode::OK, json!(true))
    );
    drop(ingest); // SIGKILL, with three batches in the spool

    let _redis = RedisServer::start_with_dir(redis_dir.path(), port).unwrap();
    let ingest = Ingest::start_with(&_redis.url(), &spool);
    let p = (0..100)
        .find_map(|_| match profile(&ingest, "spooled-1") {
            (StatusCode::OK, p) if p["page_views"] == 9 => Some(p),
            _ => {
                std::thread::sleep(Duration::from_millis(100));
                None
            }
        })
        .expect("the spooled batches are applied after the restart");
    assert_eq!(
        p["events"], 9,
        "3 applied at once, 2 + 4 from the spool, the retry once"
    );
    // Nothing is left to replay.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(profile(&ingest, "spooled-1").1["events"], 9);
}
