//! Access control and audit through `router(..).oneshot(..)`: token scopes, the audit log
//! of profile reads (in memory, and in a real throwaway Redis), rate limits per write key,
//! client address and token with a clock moved by hand, the client address behind trusted
//! proxies, and the `hash-token` command of the binary.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, Request, StatusCode, header};
use ingest::auth::{ApiToken, AuditLog, MemoryAuditLog, Scope, TokenHash};
use ingest::config::{Config, WriteKey};
use ingest::ratelimit::{FakeRelativeClock, LimitClock, Rate, RateLimitsConfig};
use ingest::store::MemoryStore;
use ingest::{AppState, Clock, RateLimits, router};
use profile_cache::audit::{AuditEntry, AuditResult, Operation, Subject};
use profile_cache::testing::RedisServer;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::macros::datetime;
use tower::ServiceExt;

const NOW: OffsetDateTime = datetime!(2026-11-29 12:00:00 UTC);
const NOW_MS: i64 = 1_795_953_600_000;

struct Fixed;
impl Clock for Fixed {
    fn now(&self) -> OffsetDateTime {
        NOW
    }
}

fn token(name: &str, secret: &str, scopes: &[Scope]) -> ApiToken {
    ApiToken {
        name: name.into(),
        sha256: TokenHash::of(secret),
        scopes: scopes.to_vec(),
    }
}

/// Four tokens: `profiles-token` (profiles:read), `segments-token` (segments:read),
/// `privacy-token` (privacy:write) and `admin-token` (admin).
fn tokens() -> Vec<ApiToken> {
    vec![
        token("profiles", "profiles-token", &[Scope::ProfilesRead]),
        token("segments", "segments-token", &[Scope::SegmentsRead]),
        token("privacy", "privacy-token", &[Scope::PrivacyWrite]),
        token("admin", "admin-token", &[Scope::Admin]),
    ]
}

fn config() -> Config {
    Config {
        write_keys: vec![
            WriteKey {
                key: "site-key".into(),
                origins: vec![],
            },
            WriteKey {
                key: "other-key".into(),
                origins: vec![],
            },
        ],
        api_tokens: tokens(),
        segments: vec![
            json!({"name": "vip", "condition": {"trait": {"name": "plan", "equals": "pro"}}}),
        ],
        ..Config::default()
    }
}

struct App {
    router: Router,
    audit: Arc<MemoryAuditLog>,
    clock: FakeRelativeClock,
}

fn app_with(config: Config) -> App {
    let audit = Arc::new(MemoryAuditLog::default());
    let clock = FakeRelativeClock::default();
    let limits = RateLimits::with_clock(
        &config.rate_limits,
        &config.trusted_proxies,
        &LimitClock::manual(clock.clone()),
    );
    let state = AppState {
        store: Arc::new(MemoryStore::default()),
        clock: Arc::new(Fixed),
        audit: audit.clone(),
        limits: Arc::new(limits),
        segments: config.segments().expect("test segments compile").into(),
        spool: None,
        config: Arc::new(config),
    };
    App {
        router: router(state),
        audit,
        clock,
    }
}

async fn send(app: &Router, req: Request<Body>) -> (StatusCode, Value, HeaderMap) {
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let bytes = axum::body::to_bytes(res.into_body(), usize::MAX)
        .await
        .unwrap();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, body, headers)
}

fn get(path: &str, bearer: Option<&str>) -> Request<Body> {
    let mut r = Request::get(path);
    if let Some(token) = bearer {
        r = r.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    r.body(Body::empty()).unwrap()
}

fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

fn entry(actor: &str, id: &str, result: AuditResult) -> AuditEntry {
    AuditEntry {
        actor: actor.into(),
        operation: Operation::ProfileRead,
        subject: Subject::from_sha256(Sha256::digest(id.as_bytes()).into()),
        at: NOW,
        result,
    }
}

// ------------------------------------------------------------------ tokens and scopes

#[tokio::test]
async fn each_route_answers_401_without_a_known_token_and_403_without_its_scope() {
    let app = app_with(config());
    let routes = [
        (
            "/v1/profiles/anon-1",
            Scope::ProfilesRead,
            StatusCode::NOT_FOUND,
        ),
        ("/v1/segments", Scope::SegmentsRead, StatusCode::OK),
        (
            "/v1/segments/vip/members",
            Scope::SegmentsRead,
            StatusCode::OK,
        ),
    ];
    for (path, scope, allowed) in routes {
        let (status, body, headers) = send(&app.router, get(path, None)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(
            body,
            json!({"error": "missing_token", "message": "missing bearer token"})
        );
        assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");

        let (status, body, headers) = send(&app.router, get(path, Some("guessed-token"))).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(
            body,
            json!({"error": "invalid_token", "message": "invalid bearer token"})
        );
        assert_eq!(
            headers[header::WWW_AUTHENTICATE],
            r#"Bearer error="invalid_token""#
        );

        for (secret, scopes) in [
            ("profiles-token", [Scope::ProfilesRead]),
            ("segments-token", [Scope::SegmentsRead]),
            ("privacy-token", [Scope::PrivacyWrite]),
            ("admin-token", [Scope::Admin]),
        ] {
            let (status, body, headers) = send(&app.router, get(path, Some(secret))).await;
            if scopes.contains(&scope) || scopes.contains(&Scope::Admin) {
                assert_eq!(status, allowed, "{path} with {secret}: {body}");
            } else {
                assert_eq!(status, StatusCode::FORBIDDEN, "{path} with {secret}");
                assert_eq!(
                    body,
                    json!({"error": "insufficient_scope",
                           "message": format!("this token lacks the scope {scope}"),
                           "scope": scope.as_str()})
                );
                assert_eq!(
                    headers[header::WWW_AUTHENTICATE],
                    format!(r#"Bearer error="insufficient_scope", scope="{scope}""#).as_str()
                );
            }
        }
    }
}

#[tokio::test]
async fn the_demo_token_reads_profiles_and_segments() {
    let config = Config::load(None, &[("INGEST_DEMO".into(), "true".into())]).unwrap();
    let app = app_with(config);
    let (status, _, _) = send(&app.router, get("/v1/profiles/anon-1", Some("demo-secret"))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body, _) = send(&app.router, get("/v1/segments", Some("demo-secret"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"segments": []}));
    assert_eq!(
        app.audit.entries(),
        [entry("demo", "anon-1", AuditResult::NotFound)]
    );
}

// ------------------------------------------------------------------ audit

#[tokio::test]
async fn profile_reads_and_refusals_are_audited_by_token_name_with_the_id_hashed() {
    let app = app_with(config());
    send(
        &app.router,
        get("/v1/profiles/anon-1", Some("profiles-token")),
    )
    .await;
    send(
        &app.router,
        get("/v1/profiles/user-7", Some("segments-token")),
    )
    .await;
    send(&app.router, get("/v1/profiles/anon-2", Some("admin-token"))).await;
    // Unknown callers and segment reads are not profile accesses.
    send(
        &app.router,
        get("/v1/profiles/anon-3", Some("guessed-token")),
    )
    .await;
    send(&app.router, get("/v1/profiles/anon-3", None)).await;
    send(&app.router, get("/v1/segments", Some("admin-token"))).await;
    assert_eq!(
        app.audit.entries(),
        [
            entry("profiles", "anon-1", AuditResult::NotFound),
            entry("segments", "user-7", AuditResult::Forbidden),
            entry("admin", "anon-2", AuditResult::NotFound),
        ]
    );
    // `printf %s anon-1 | sha256sum`
    assert_eq!(
        app.audit.entries()[0].subject.to_string(),
        "2e96105c29d2c92c48ffb367fa6e4b40db08207d649bcf83aa1cec30532a1e17"
    );
}

#[tokio::test]
async fn a_profile_read_that_cannot_be_audited_is_refused_with_503() {
    let app = app_with(config());
    app.audit.set_down(true);
    let (status, body, headers) = send(
        &app.router,
        get("/v1/profiles/anon-1", Some("profiles-token")),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        body,
        json!({"error": "unavailable", "message": "storage unavailable, retry later"})
    );
    assert_eq!(headers[header::RETRY_AFTER], "1");
    assert!(app.audit.entries().is_empty());
}

/// The real audit log: a read that finds the profile and one that does not, written to a
/// throwaway Redis, read back with `XRANGE` field by field.
#[tokio::test]
async fn audit_entries_reach_the_redis_stream_with_exact_fields() {
    let redis = RedisServer::start().expect("redis-server");
    let store = redis.profiles(&[]).await;
    let audit = store.audit_stream(1_000);
    let config = config();
    let state = AppState {
        store: Arc::new(store.clone()),
        clock: Arc::new(Fixed),
        audit: Arc::new(audit.clone()),
        limits: Arc::new(RateLimits::new(&config.rate_limits, &[])),
        segments: Arc::from([]),
        spool: None,
        config: Arc::new(config),
    };
    let app = router(state.clone());
    let batch = wire::Batch {
        write_key: "site-key".into(),
        sent_at_ms: NOW_MS,
        consent: 0b0011,
        context: wire::Context {
            anonymous_id: Some("anon-1".into()),
            ..Default::default()
        },
        events: vec![wire::Event {
            message_id: [1; 16],
            timestamp_ms: NOW_MS,
            kind: wire::EventKind::Page,
            purpose: wire::Purpose::Analytics,
            ..Default::default()
        }],
    };
    let post = Request::post("/v1/fb")
        .body(Body::from(wire::encode(&batch)))
        .unwrap();
    assert_eq!(send(&app, post).await.0, StatusCode::OK);
    assert!(state.store.find("anon-1", NOW).await.unwrap().is_some());

    let (status, body, _) = send(&app, get("/v1/profiles/anon-1", Some("profiles-token"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["id"], "a:anon-1");
    let (status, _, _) = send(&app, get("/v1/profiles/nobody", Some("admin-token"))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let mut conn = redis.connection().await;
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg("stream:audit")
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let fields: Vec<Vec<(String, String)>> = entries.into_iter().map(|(_, f)| f).collect();
    let expected = |actor: &str, id: &str, result: &str| {
        [
            ("actor", actor.to_string()),
            ("operation", "profile_read".to_string()),
            ("subject", sha256_hex(id)),
            ("at", NOW_MS.to_string()),
            ("result", result.to_string()),
        ]
        .map(|(k, v)| (k.to_string(), v))
        .to_vec()
    };
    assert_eq!(
        fields,
        [
            expected("profiles", "anon-1", "ok"),
            expected("admin", "nobody", "not_found"),
        ]
    );
    // No readable id anywhere in the stream.
    let raw = format!("{fields:?}");
    assert!(!raw.contains("anon-1") && !raw.contains("nobody"), "{raw}");

    // The stream is capped: 1,000 more entries leave about 1,000 (Redis trims whole
    // nodes of 100 entries with `MAXLEN ~`).
    for _ in 0..1_000 {
        AuditLog::append(&audit, &entry("admin", "anon-1", AuditResult::Ok))
            .await
            .unwrap();
    }
    let len: u64 = redis::cmd("XLEN")
        .arg("stream:audit")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((1_000..1_100).contains(&len), "{len}");
}

// ------------------------------------------------------------------ rate limits

fn batch_for(write_key: &str, n: u8) -> Vec<u8> {
    wire::encode(&wire::Batch {
        write_key: write_key.into(),
        sent_at_ms: NOW_MS,
        consent: 0b0011,
        context: wire::Context {
            anonymous_id: Some("anon-1".into()),
            ..Default::default()
        },
        events: vec![wire::Event {
            message_id: [n; 16],
            timestamp_ms: NOW_MS,
            kind: wire::EventKind::Page,
            purpose: wire::Purpose::Analytics,
            ..Default::default()
        }],
    })
}

/// A batch from the socket peer `peer`, with `X-Forwarded-For: forwarded` when given.
fn post_from(peer: &str, forwarded: Option<&str>, body: Vec<u8>) -> Request<Body> {
    let mut r = Request::post("/v1/fb");
    if let Some(xff) = forwarded {
        r = r.header("x-forwarded-for", xff);
    }
    let mut req = r.body(Body::from(body)).unwrap();
    let peer: SocketAddr = format!("{peer}:40000").parse().unwrap();
    req.extensions_mut().insert(ConnectInfo(peer));
    req
}

#[tokio::test]
async fn batches_over_the_write_key_rate_get_429_with_retry_after_until_it_refills() {
    let app = app_with(Config {
        rate_limits: RateLimitsConfig {
            write_key: Rate::new(2, 2),
            ..RateLimitsConfig::default()
        },
        ..config()
    });
    let post = |key: &str, n| post_from("192.0.2.1", None, batch_for(key, n));
    for n in 1..=2 {
        assert_eq!(
            send(&app.router, post("site-key", n)).await.0,
            StatusCode::OK
        );
    }
    let (status, body, headers) = send(&app.router, post("site-key", 3)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        body,
        json!({"error": "rate_limited",
               "message": "too many requests for this write key: limit 2 per second, bursts of 2; retry in 1s",
               "rate_limit": "write_key", "limit": 2})
    );
    // One batch comes back every 500 ms; Retry-After rounds up to whole seconds.
    assert_eq!(headers[header::RETRY_AFTER], "1");
    // Another site has a budget of its own.
    assert_eq!(
        send(&app.router, post("other-key", 4)).await.0,
        StatusCode::OK
    );
    app.clock.advance(Duration::from_millis(499));
    assert_eq!(
        send(&app.router, post("site-key", 5)).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    app.clock.advance(Duration::from_millis(1));
    assert_eq!(
        send(&app.router, post("site-key", 6)).await.0,
        StatusCode::OK
    );
    assert_eq!(
        send(&app.router, post("site-key", 7)).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Unknown write keys are refused before they are counted.
    let (status, body, _) = send(&app.router, post("nobody", 8)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"], "unknown_write_key");
}

#[tokio::test]
async fn batches_over_the_client_address_rate_get_429_before_the_body_is_read() {
    let app = app_with(Config {
        rate_limits: RateLimitsConfig {
            client_ip: Rate::new(1, 1),
            ..RateLimitsConfig::default()
        },
        ..config()
    });
    let ok = send(
        &app.router,
        post_from("198.51.100.7", None, batch_for("site-key", 1)),
    )
    .await;
    assert_eq!(ok.0, StatusCode::OK);
    // Garbage would be a 400; the limit answers first.
    let (status, body, headers) = send(
        &app.router,
        post_from("198.51.100.7", None, b"garbage".to_vec()),
    )
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        body,
        json!({"error": "rate_limited",
               "message": "too many requests for this client address: limit 1 per second, bursts of 1; retry in 1s",
               "rate_limit": "client_ip", "limit": 1})
    );
    assert_eq!(headers[header::RETRY_AFTER], "1");
    // Another address, and another IPv6 /64, have their own budget; the same /64 shares one.
    let other = send(
        &app.router,
        post_from("198.51.100.8", None, batch_for("site-key", 2)),
    )
    .await;
    assert_eq!(other.0, StatusCode::OK);
    let v6 = |host: &str| {
        post_from(
            &format!("[2001:db8:0:1::{host}]"),
            None,
            batch_for("site-key", 3),
        )
    };
    assert_eq!(send(&app.router, v6("1")).await.0, StatusCode::OK);
    assert_eq!(
        send(&app.router, v6("2")).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    app.clock.advance(Duration::from_secs(1));
    let again = send(
        &app.router,
        post_from("198.51.100.7", None, batch_for("site-key", 4)),
    )
    .await;
    assert_eq!(again.0, StatusCode::OK);
}

#[tokio::test]
async fn x_forwarded_for_names_the_client_only_when_a_trusted_proxy_sends_it() {
    let app = app_with(Config {
        rate_limits: RateLimitsConfig {
            client_ip: Rate::new(1, 1),
            ..RateLimitsConfig::default()
        },
        trusted_proxies: vec!["10.0.0.0/8".parse().unwrap()],
        ..config()
    });
    let status = |peer: &str, xff: Option<&str>| {
        let req = post_from(peer, xff, batch_for("site-key", 1));
        let router = app.router.clone();
        async move { send(&router, req).await.0 }
    };
    // Behind the proxies, the client is the first untrusted address from the right.
    assert_eq!(
        status("10.0.0.5", Some("203.0.113.1, 198.51.100.7, 10.0.0.9")).await,
        StatusCode::OK
    );
    // The same client through another proxy of the pool: over its rate.
    assert_eq!(
        status("10.0.0.6", Some("198.51.100.7")).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Another client through the same proxy: its own budget.
    assert_eq!(
        status("10.0.0.5", Some("198.51.100.8")).await,
        StatusCode::OK
    );
    // An untrusted peer cannot pick its address: its header is ignored, the peer counts.
    assert_eq!(
        status("203.0.113.50", Some("198.51.100.9")).await,
        StatusCode::OK
    );
    assert_eq!(
        status("203.0.113.50", Some("198.51.100.10")).await,
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[test]
fn the_client_address_is_read_from_the_right_of_x_forwarded_for() {
    let limits = RateLimits::new(
        &RateLimitsConfig::default(),
        &[
            "10.0.0.0/8".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ],
    );
    let client = |peer: &str, xff: &[&str]| {
        let mut headers = HeaderMap::new();
        for v in xff {
            headers.append("x-forwarded-for", v.parse().unwrap());
        }
        limits
            .client_ip(peer.parse().unwrap(), &headers)
            .to_string()
    };
    assert_eq!(client("192.0.2.1", &["198.51.100.1"]), "192.0.2.1");
    assert_eq!(client("10.0.0.1", &[]), "10.0.0.1");
    assert_eq!(client("10.0.0.1", &["198.51.100.1"]), "198.51.100.1");
    // A client cannot hide behind an address it writes itself at the left.
    assert_eq!(
        client("10.0.0.1", &["1.1.1.1, 198.51.100.1, 10.2.3.4"]),
        "198.51.100.1"
    );
    // Several headers are one list.
    assert_eq!(
        client("10.0.0.1", &["1.1.1.1", "198.51.100.2"]),
        "198.51.100.2"
    );
    // Every hop trusted: the leftmost.
    assert_eq!(client("10.0.0.1", &["10.9.9.9, 10.0.0.2"]), "10.9.9.9");
    // Ports and IPv6 proxies.
    assert_eq!(
        client(
            "2001:db8::1",
            &["[2001:db8:ffff::1]:443, 198.51.100.3:5000"]
        ),
        "198.51.100.3"
    );
    // An entry that is not an address ends the walk at the last good one.
    assert_eq!(
        client("10.0.0.1", &["198.51.100.4, unknown, 10.0.0.3"]),
        "10.0.0.3"
    );
    // An IPv4 peer seen through a dual-stack socket is still trusted.
    assert_eq!(client("::ffff:10.0.0.1", &["198.51.100.5"]), "198.51.100.5");
}

#[tokio::test]
async fn api_requests_over_the_token_rate_get_429_and_are_not_audited() {
    let app = app_with(Config {
        rate_limits: RateLimitsConfig {
            token: Rate::new(1, 1),
            ..RateLimitsConfig::default()
        },
        ..config()
    });
    let read = |secret: &str| get("/v1/profiles/anon-1", Some(secret));
    assert_eq!(
        send(&app.router, read("profiles-token")).await.0,
        StatusCode::NOT_FOUND
    );
    let (status, body, headers) = send(&app.router, read("profiles-token")).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        body,
        json!({"error": "rate_limited",
               "message": "too many requests for this API token: limit 1 per second, bursts of 1; retry in 1s",
               "rate_limit": "token", "limit": 1})
    );
    assert_eq!(headers[header::RETRY_AFTER], "1");
    // The segment routes share the token's budget; other tokens have their own.
    assert_eq!(
        send(&app.router, get("/v1/segments", Some("admin-token")))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        send(&app.router, get("/v1/segments", Some("admin-token")))
            .await
            .0,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Unknown tokens are refused before they are counted.
    assert_eq!(
        send(&app.router, read("guessed-token")).await.0,
        StatusCode::UNAUTHORIZED
    );
    app.clock.advance(Duration::from_secs(1));
    assert_eq!(
        send(&app.router, read("profiles-token")).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        app.audit.entries(),
        [
            entry("profiles", "anon-1", AuditResult::NotFound),
            entry("profiles", "anon-1", AuditResult::NotFound),
        ]
    );
}

// ------------------------------------------------------------------ the binary

fn hash_token(stdin: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ingest"))
        .arg("hash-token")
        .env_remove("INGEST_CONFIG")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run ingest hash-token");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn hash_token_prints_the_sha256_of_the_token_on_stdin() {
    let out = hash_token("s3cret-reader-token\n");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{}\n", sha256_hex("s3cret-reader-token"))
    );
    // What it prints is what a config entry needs for the token to be accepted.
    let printed = hash_token("s3cret-reader-token").stdout;
    let parsed: TokenHash = String::from_utf8(printed).unwrap().trim().parse().unwrap();
    assert_eq!(parsed, TokenHash::of("s3cret-reader-token"));

    let out = hash_token("short\n");
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert_eq!(
        String::from_utf8(out.stderr).unwrap(),
        "error: the token is 5 characters, at least 8 are needed; make one with e.g. `openssl rand -hex 32`\n"
    );
}
