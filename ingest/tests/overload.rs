//! Overload protection in process: batches and API reads beyond their in-flight limits get
//! `503 overloaded` at once; slow heads, idle connections, slow bodies and oversized heads
//! are cut off by the HTTP server (`serve_http`) over real sockets; and a Redis frozen with
//! SIGSTOP costs a request at most `profiles.redis_timeout` before it is spooled or
//! answered with 503.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{Request, StatusCode, header};
use futures::SinkExt as _;
use ingest::auth::{ApiToken, MemoryAuditLog, Scope, TokenHash};
use ingest::config::{Config, WriteKey};
use ingest::overload::{MAX_HEAD_BYTES, OverloadConfig, serve_http};
use ingest::ratelimit::Rate;
use ingest::store::{MemoryStore, ProfileStore};
use ingest::{AppState, RateLimits, SystemClock, router};
use profile_cache::testing::RedisServer;
use profile_cache::{ProfileConfig, RedisProfiles, StoreError};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tower::ServiceExt as _;

const WRITE_KEY: &str = "site-key";
const TOKEN: &str = "reader-token-1";

fn nz(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).unwrap()
}

fn config(overload: OverloadConfig) -> Config {
    let mut config = Config {
        write_keys: vec![WriteKey {
            key: WRITE_KEY.into(),
            origins: vec!["*".into()],
        }],
        api_tokens: vec![ApiToken {
            name: "reader".into(),
            sha256: TokenHash::of(TOKEN),
            scopes: vec![Scope::ProfilesRead, Scope::SegmentsRead],
        }],
        overload,
        ..Config::default()
    };
    config.rate_limits.write_key = Rate::OFF;
    config
}

fn app(config: Config) -> Router {
    let store: Arc<dyn ProfileStore> = Arc::new(MemoryStore::default());
    router(AppState {
        store,
        clock: Arc::new(SystemClock),
        audit: Arc::new(MemoryAuditLog::default()),
        limits: Arc::new(RateLimits::new(
            &config.rate_limits,
            &config.trusted_proxies,
        )),
        segments: config.segments().unwrap().into(),
        spool: None,
        config: Arc::new(config),
    })
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A batch of one page event for `anon`, message id `[n; 16]`.
fn batch(anon: &str, n: u8) -> Vec<u8> {
    wire::encode(&wire::Batch {
        write_key: WRITE_KEY.into(),
        sent_at_ms: now_ms(),
        consent: 0b0011,
        context: wire::Context {
            anonymous_id: Some(anon.into()),
            ..Default::default()
        },
        events: vec![wire::Event {
            message_id: [n; 16],
            timestamp_ms: now_ms(),
            kind: wire::EventKind::Page,
            purpose: wire::Purpose::Analytics,
            ..Default::default()
        }],
    })
}

type BodySender = futures::channel::mpsc::Sender<Result<Bytes, std::io::Error>>;

/// A request body that arrives when the test sends it.
fn held_body() -> (BodySender, Body) {
    let (tx, rx) = futures::channel::mpsc::channel(4);
    (tx, Body::from_stream(rx))
}

fn post(body: Body) -> Request<Body> {
    Request::post("/v1/fb").body(body).unwrap()
}

async fn answer(res: axum::response::Response) -> (StatusCode, Value, axum::http::HeaderMap) {
    let status = res.status();
    let headers = res.headers().clone();
    let bytes = axum::body::to_bytes(res.into_body(), usize::MAX)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        headers,
    )
}

#[tokio::test]
async fn batches_beyond_the_in_flight_limit_get_503_at_once_until_one_finishes() {
    let app = app(config(OverloadConfig {
        max_batches_in_flight: nz(2),
        ..OverloadConfig::default()
    }));
    // Two batches whose bodies have not arrived yet hold both places.
    let (mut tx1, body1) = held_body();
    let (tx2, body2) = held_body();
    let first = tokio::spawn(app.clone().oneshot(post(body1)));
    let second = tokio::spawn(app.clone().oneshot(post(body2)));
    tokio::time::sleep(Duration::from_millis(100)).await;

    // A third is refused without waiting for its body (it never sends one).
    let (_tx3, body3) = held_body();
    let started = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(1), app.clone().oneshot(post(body3)))
        .await
        .expect("the refusal does not wait")
        .unwrap();
    assert!(started.elapsed() < Duration::from_millis(500));
    let (status, body, headers) = answer(res).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers[header::RETRY_AFTER], "1");
    assert_eq!(
        body,
        json!({
            "error": "overloaded",
            "message": "too many batches in flight: limit 2 per collector; retry in 1s",
            "field": "overload.max_batches_in_flight",
            "limit": 2,
        })
    );

    // Health checks and API reads count against other limits.
    let health = app
        .clone()
        .oneshot(Request::get("/healthz").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let read = app
        .clone()
        .oneshot(
            Request::get("/v1/segments")
                .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(read.status(), StatusCode::OK);

    // The first batch arrives and is applied; its place is free again.
    tx1.send(Ok(Bytes::from(batch("anon-1", 1)))).await.unwrap();
    drop(tx1);
    let (status, body, _) = answer(first.await.unwrap().unwrap()).await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, json!({"accepted": 1, "rejected": []}))
    );
    let res = app
        .clone()
        .oneshot(post(Body::from(batch("anon-2", 2))))
        .await
        .unwrap();
    assert_eq!(answer(res).await.0, StatusCode::OK);

    // A client that gives up frees its place too.
    drop(tx2);
    let (status, body, _) = answer(second.await.unwrap().unwrap()).await;
    assert_eq!(
        (status, &body["error"]),
        (StatusCode::BAD_REQUEST, &json!("malformed_batch"))
    );
    for n in 3..5 {
        let res = app
            .clone()
            .oneshot(post(Body::from(batch("anon-3", n))))
            .await
            .unwrap();
        assert_eq!(answer(res).await.0, StatusCode::OK);
    }
}

#[tokio::test]
async fn a_body_that_misses_the_body_read_timeout_gets_408_with_the_json_error() {
    let app = app(config(OverloadConfig {
        body_read_timeout: Duration::from_millis(300),
        ..OverloadConfig::default()
    }));
    let (mut tx, body) = held_body();
    let started = Instant::now();
    let pending = tokio::spawn(app.clone().oneshot(post(body)));
    // Bytes keep coming, but the deadline is for the whole body.
    for _ in 0..10 {
        if tx.send(Ok(Bytes::from_static(b"x"))).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body, headers) = answer(pending.await.unwrap().unwrap()).await;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(2),
        "{elapsed:?}"
    );
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT);
    assert_eq!(headers[header::CONNECTION], "close");
    assert_eq!(
        body,
        json!({
            "error": "request_timeout",
            "message": "the request body did not arrive within 300ms",
        })
    );
    // A body in time is unaffected.
    let res = app
        .oneshot(post(Body::from(batch("anon-1", 1))))
        .await
        .unwrap();
    assert_eq!(answer(res).await.0, StatusCode::OK);
}

#[test]
fn overload_settings_load_from_toml_and_the_environment_and_zero_limits_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ingest.toml");
    std::fs::write(
        &path,
        "[overload]\nmax_batches_in_flight = 8\nheader_read_timeout = \"2s\"\n",
    )
    .unwrap();
    let env = vec![(
        "INGEST_OVERLOAD__BODY_READ_TIMEOUT".to_string(),
        "750ms".to_string(),
    )];
    let loaded = Config::load(Some(&path), &env).unwrap();
    assert_eq!(
        loaded.overload,
        OverloadConfig {
            max_batches_in_flight: nz(8),
            max_api_requests_in_flight: nz(32),
            max_connections: nz(10_000),
            header_read_timeout: Duration::from_secs(2),
            body_read_timeout: Duration::from_millis(750),
        }
    );
    assert_eq!(OverloadConfig::default(), Config::default().overload);

    std::fs::write(&path, "[overload]\nmax_batches_in_flight = 0\n").unwrap();
    let err = Config::load(Some(&path), &[]).unwrap_err().to_string();
    assert!(
        err.contains("overload.max_batches_in_flight") && err.contains("nonzero"),
        "{err}"
    );
    std::fs::write(&path, "[overload]\nmax_requests = 5\n").unwrap();
    let err = Config::load(Some(&path), &[]).unwrap_err().to_string();
    assert!(err.contains("unknown field: found `max_requests`"), "{err}");
}

#[tokio::test]
async fn a_zero_timeout_stops_the_collector_naming_the_setting() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = Config {
        // Never reached: the settings are checked first.
        redis_url: "redis://127.0.0.1:1".into(),
        overload: OverloadConfig {
            body_read_timeout: Duration::ZERO,
            ..OverloadConfig::default()
        },
        ..Config::default()
    };
    let err = ingest::serve(config, listener, std::future::pending())
        .await
        .unwrap_err();
    assert_eq!(
        format!("{err:#}"),
        "configuration: overload.body_read_timeout: 0ns is shorter than 1ms"
    );
}

// ---- The HTTP server over real sockets ----

/// `serve_http` on a free port with the in-memory store; stopped when `stop` is called or
/// on drop.
struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(config: Config) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let overload = config.overload;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_http(listener, app(config), overload, async move {
            let _ = stopped.await;
        }));
        Server {
            addr,
            stop: Some(stop),
            task,
        }
    }

    async fn connect(&self) -> TcpStream {
        TcpStream::connect(self.addr).await.unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One HTTP/1.1 response as read off a socket.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// Reads one response (head and `Content-Length` body); `None` when the connection closes
/// before a whole head arrives.
async fn read_answer(stream: &mut TcpStream) -> Option<Answer> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
    let status = head[9..12].parse().unwrap();
    let mut answer = Answer {
        status,
        head,
        body: buf[head_end..].to_vec(),
    };
    let length: usize = answer
        .header("content-length")
        .map_or(0, |v| v.parse().unwrap());
    while answer.body.len() < length {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.body.extend_from_slice(&chunk[..n]),
        }
    }
    Some(answer)
}

/// Waits until the server closes `stream` (end of file or reset), for at most `limit`;
/// returns how long that took, and any bytes that came before.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> (Duration, Vec<u8>) {
    let started = Instant::now();
    let mut received = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        match tokio::time::timeout_at((started + limit).into(), stream.read(&mut chunk)).await {
            Err(_) => panic!("still open after {limit:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return (started.elapsed(), received),
            Ok(Ok(n)) => received.extend_from_slice(&chunk[..n]),
        }
    }
}

fn timeouts(header: Duration, body: Duration) -> Config {
    config(OverloadConfig {
        header_read_timeout: header,
        body_read_timeout: body,
        ..OverloadConfig::default()
    })
}

#[tokio::test]
async fn a_request_head_trickled_slower_than_the_header_read_timeout_is_cut_off() {
    let server = Server::start(timeouts(
        Duration::from_millis(300),
        Duration::from_secs(10),
    ))
    .await;
    let mut stream = server.connect().await;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    // One header byte every 50 ms: the deadline is for the whole head.
    let (mut read, mut write) = stream.split();
    let trickle = async {
        for b in b"x-slow: 0123456789abcdef" {
            if write.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let mut received = Vec::new();
    let closed = async {
        let _ = read.read_to_end(&mut received).await;
        started.elapsed()
    };
    let (elapsed, ()) = tokio::join!(closed, trickle);
    assert!(
        elapsed >= Duration::from_millis(250) && elapsed < Duration::from_secs(2),
        "{elapsed:?}"
    );
    // Closed without an answer: the request was never read.
    assert_eq!(String::from_utf8_lossy(&received), "");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_read_timeout() {
    let server = Server::start(timeouts(
        Duration::from_millis(400),
        Duration::from_secs(10),
    ))
    .await;
    let mut stream = server.connect().await;
    for _ in 0..2 {
        // Requests within the timeout keep the connection.
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let answer = read_answer(&mut stream).await.unwrap();
        assert_eq!(
            (answer.status, answer.json()),
            (200, json!({"status": "ok"}))
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (elapsed, received) = closed_within(&mut stream, Duration::from_secs(3)).await;
    // 200 ms of the 400 had passed already.
    assert!(
        elapsed >= Duration::from_millis(150) && elapsed < Duration::from_secs(2),
        "{elapsed:?}"
    );
    assert!(received.is_empty());
}

#[tokio::test]
async fn a_body_trickled_past_the_body_read_timeout_gets_408_and_the_connection_closes() {
    let server = Server::start(timeouts(
        Duration::from_secs(10),
        Duration::from_millis(300),
    ))
    .await;
    let mut stream = server.connect().await;
    stream
        .write_all(b"POST /v1/fb HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n0123456789")
        .await
        .unwrap();
    let started = Instant::now();
    let (mut read, mut write) = stream.split();
    let trickle = async {
        for _ in 0..100 {
            if write.write_all(b"x").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let answered = async {
        let mut buf = Vec::new();
        let _ = read.read_to_end(&mut buf).await;
        (started.elapsed(), buf)
    };
    let ((elapsed, received), ()) = tokio::select! {
        answered = answered => (answered, ()),
        () = trickle => panic!("the trickle ran to its end without an answer"),
    };
    assert!(
        elapsed >= Duration::from_millis(250) && elapsed < Duration::from_secs(2),
        "{elapsed:?}"
    );
    let text = String::from_utf8(received).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase().contains("\r\nconnection: close"),
        "{head}"
    );
    assert_eq!(
        serde_json::from_str::<Value>(body).unwrap(),
        json!({
            "error": "request_timeout",
            "message": "the request body did not arrive within 300ms",
        })
    );
}

#[tokio::test]
async fn a_request_head_larger_than_the_limit_gets_431() {
    let server = Server::start(config(OverloadConfig::default())).await;
    // A request whose head (request line, headers, blank line) is `len` bytes.
    let request = |len: usize| {
        let start = "GET /healthz HTTP/1.1\r\nhost: x\r\nx-filler: ";
        let filler = "a".repeat(len - start.len() - 4);
        format!("{start}{filler}\r\n\r\n")
    };
    let mut stream = server.connect().await;
    stream
        .write_all(request(MAX_HEAD_BYTES).as_bytes())
        .await
        .unwrap();
    assert_eq!(read_answer(&mut stream).await.unwrap().status, 200);
    let mut stream = server.connect().await;
    // The server may answer and close before it has read everything.
    let _ = stream
        .write_all(request(MAX_HEAD_BYTES + 1).as_bytes())
        .await;
    let answer = read_answer(&mut stream).await.unwrap();
    assert_eq!(answer.status, 431);
    closed_within(&mut stream, Duration::from_secs(2)).await;
}

#[tokio::test]
async fn beyond_max_connections_a_connection_waits_until_another_closes() {
    let server = Server::start(config(OverloadConfig {
        max_connections: nz(2),
        ..OverloadConfig::default()
    }))
    .await;
    let get = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n";
    let mut first = server.connect().await;
    let mut second = server.connect().await;
    for stream in [&mut first, &mut second] {
        stream.write_all(get).await.unwrap();
        assert_eq!(read_answer(stream).await.unwrap().status, 200);
    }
    // The kernel completes the handshake, but the server does not take the connection.
    let mut third = server.connect().await;
    third.write_all(get).await.unwrap();
    let waiting = tokio::time::timeout(Duration::from_millis(500), read_answer(&mut third)).await;
    assert!(waiting.is_err(), "answered beyond max_connections");
    drop(first);
    let answer = tokio::time::timeout(Duration::from_secs(3), read_answer(&mut third))
        .await
        .expect("answered once a connection closed")
        .unwrap();
    assert_eq!(answer.status, 200);
}

#[tokio::test]
async fn the_client_address_reaches_the_per_client_rate_limit() {
    let mut config = config(OverloadConfig::default());
    config.rate_limits.client_ip = Rate::new(1, 1);
    let server = Server::start(config).await;
    let mut stream = server.connect().await;
    let mut statuses = Vec::new();
    let mut last = None;
    for n in 1..3 {
        let body = batch("anon-1", n);
        let head = format!(
            "POST /v1/fb HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&body).await.unwrap();
        let answer = read_answer(&mut stream).await.unwrap();
        statuses.push(answer.status);
        last = Some(answer);
    }
    assert_eq!(statuses, [200, 429]);
    assert_eq!(last.unwrap().json()["rate_limit"], "client_ip");
}

#[tokio::test]
async fn shutdown_closes_idle_connections_and_finishes_the_request_in_flight() {
    let mut server = Server::start(config(OverloadConfig::default())).await;
    let mut idle = server.connect().await;
    idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_answer(&mut idle).await.unwrap().status, 200);
    let body = batch("anon-1", 1);
    let mut busy = server.connect().await;
    let head = format!(
        "POST /v1/fb HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    busy.write_all(head.as_bytes()).await.unwrap();
    busy.write_all(&body[..10]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    server.stop.take().unwrap().send(()).unwrap();
    let (elapsed, received) = closed_within(&mut idle, Duration::from_secs(2)).await;
    assert!(received.is_empty(), "{elapsed:?}");
    // No new connections.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(TcpStream::connect(server.addr).await.is_err());
    assert!(!server.task.is_finished());

    busy.write_all(&body[10..]).await.unwrap();
    let answer = read_answer(&mut busy).await.unwrap();
    assert_eq!(
        (answer.status, answer.json()),
        (200, json!({"accepted": 1, "rejected": []}))
    );
    tokio::time::timeout(Duration::from_secs(3), &mut server.task)
        .await
        .expect("serve_http returns once the last request is answered")
        .unwrap();
}

// ---- A Redis frozen with SIGSTOP ----

const REDIS_TIMEOUT: Duration = Duration::from_millis(500);

/// How much later than `profiles.redis_timeout` a request may be answered on a loaded
/// 2-core machine.
const SLACK: Duration = Duration::from_millis(1500);

fn assert_bounded(elapsed: Duration) {
    assert!(
        elapsed >= REDIS_TIMEOUT - Duration::from_millis(50) && elapsed < REDIS_TIMEOUT + SLACK,
        "{elapsed:?}, redis_timeout {REDIS_TIMEOUT:?}"
    );
}

#[tokio::test]
async fn an_evalsha_pipeline_to_a_paused_redis_fails_as_unavailable_within_the_redis_timeout() {
    let mut redis = RedisServer::start().unwrap();
    let profiles = RedisProfiles::connect(
        &redis.url(),
        ProfileConfig {
            redis_timeout: REDIS_TIMEOUT,
            ..ProfileConfig::default()
        },
    )
    .await
    .unwrap();
    let updates = |n: u8| {
        let batch = wire::decode(&batch("paused-1", n), &wire::Limits::default()).unwrap();
        ingest::pipeline::prepare(
            batch,
            time::OffsetDateTime::now_utc(),
            &ingest::pipeline::Rules::default(),
        )
        .unwrap()
        .updates
    };
    assert_eq!(profiles.apply(&updates(1)).await.unwrap().applied, 1);

    redis.pause().unwrap();
    for n in [2, 3] {
        let started = Instant::now();
        let err = profiles.apply(&updates(n)).await.unwrap_err();
        assert_bounded(started.elapsed());
        assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
    }
    let started = Instant::now();
    assert!(matches!(
        profiles.ping().await,
        Err(StoreError::Unavailable(_))
    ));
    assert_bounded(started.elapsed());

    // Redis runs the calls that timed out once it is resumed: retrying them counts nothing
    // twice.
    redis.resume().unwrap();
    let report = profiles.apply(&updates(2)).await.unwrap();
    assert_eq!((report.applied, report.duplicates), (0, 1));
    let report = profiles.apply(&updates(4)).await.unwrap();
    assert_eq!((report.applied, report.duplicates), (1, 0));
    let profile = profiles
        .find("paused-1", time::OffsetDateTime::now_utc())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(profile.events, 4);
}

/// `ingest::serve` on a free port; stopped on drop.
struct Collector {
    base: String,
    _stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Collector {
    async fn start(mut config: Config, redis: &RedisServer) -> Collector {
        config.redis_url = redis.url();
        config.profiles.redis_timeout = REDIS_TIMEOUT;
        config.scheduler.enabled = false;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(ingest::serve(config, listener, async move {
            let _ = stopped.await;
        }));
        Collector {
            base,
            _stop: stop,
            task,
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Status, JSON body, `Retry-After`, and how long the answer took.
async fn timed(request: reqwest::RequestBuilder) -> (u16, Value, Option<String>, Duration) {
    let started = Instant::now();
    let res = request.send().await.unwrap();
    let status = res.status().as_u16();
    let retry_after = res
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let bytes = res.bytes().await.unwrap();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, body, retry_after, started.elapsed())
}

fn post_batch(c: &Collector, anon: &str, n: u8) -> reqwest::RequestBuilder {
    client()
        .post(format!("{}/v1/fb", c.base))
        .body(batch(anon, n))
}

fn get_profile(c: &Collector, id: &str) -> reqwest::RequestBuilder {
    client()
        .get(format!("{}/v1/profiles/{id}", c.base))
        .bearer_auth(TOKEN)
}

#[tokio::test]
async fn with_the_spool_a_batch_for_a_paused_redis_is_spooled_within_the_redis_timeout() {
    let mut redis = RedisServer::start().unwrap();
    let spool = tempfile::tempdir().unwrap();
    let mut config = config(OverloadConfig::default());
    config.spool.enabled = true;
    config.spool.dir = spool.path().to_path_buf();
    let collector = Collector::start(config, &redis).await;
    let (status, body, _, _) = timed(post_batch(&collector, "paused-1", 1)).await;
    assert_eq!(
        (status, body),
        (200, json!({"accepted": 1, "rejected": []}))
    );

    redis.pause().unwrap();
    let (status, body, _, elapsed) = timed(post_batch(&collector, "paused-1", 2)).await;
    assert_eq!(
        (status, body),
        (200, json!({"accepted": 1, "rejected": [], "spooled": true}))
    );
    assert_bounded(elapsed);
    // Later batches queue behind it in the spool without asking Redis.
    let (status, body, _, elapsed) = timed(post_batch(&collector, "paused-1", 3)).await;
    assert_eq!(
        (status, body),
        (200, json!({"accepted": 1, "rejected": [], "spooled": true}))
    );
    assert!(
        elapsed < REDIS_TIMEOUT - Duration::from_millis(100),
        "{elapsed:?}"
    );
    // Reads and the readiness check have the same bound.
    let (status, body, retry_after, elapsed) = timed(get_profile(&collector, "paused-1")).await;
    assert_eq!((status, &body["error"]), (503, &json!("unavailable")));
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert_bounded(elapsed);
    let (status, _, _, elapsed) = timed(client().get(format!("{}/readyz", collector.base))).await;
    assert_eq!(status, 503);
    assert_bounded(elapsed);

    redis.resume().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body, _, _) = timed(get_profile(&collector, "paused-1")).await;
        if status == 200 && body["events"] == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "not replayed: {status} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn without_the_spool_a_paused_redis_costs_at_most_the_redis_timeout_and_reads_beyond_the_limit_are_shed()
 {
    let mut redis = RedisServer::start().unwrap();
    let collector = Collector::start(
        config(OverloadConfig {
            max_api_requests_in_flight: nz(2),
            ..OverloadConfig::default()
        }),
        &redis,
    )
    .await;
    let (status, _, _, _) = timed(post_batch(&collector, "paused-2", 1)).await;
    assert_eq!(status, 200);

    redis.pause().unwrap();
    // Two reads wait for Redis and hold both API places...
    let reads: Vec<_> = (0..2)
        .map(|_| tokio::spawn(timed(get_profile(&collector, "paused-2"))))
        .collect();
    tokio::time::sleep(Duration::from_millis(150)).await;
    // ...so a third is refused at once, while batches have places of their own.
    let batch = tokio::spawn(timed(post_batch(&collector, "paused-2", 2)));
    let (status, body, retry_after, elapsed) = timed(get_profile(&collector, "paused-2")).await;
    assert_eq!(
        (status, body, retry_after.as_deref()),
        (
            503,
            json!({
                "error": "overloaded",
                "message": "too many API requests in flight: limit 2 per collector; retry in 1s",
                "field": "overload.max_api_requests_in_flight",
                "limit": 2,
            }),
            Some("1")
        )
    );
    assert!(elapsed < Duration::from_millis(300), "{elapsed:?}");
    let (status, _, _, elapsed) = timed(client().get(format!("{}/healthz", collector.base))).await;
    assert_eq!(status, 200);
    assert!(elapsed < Duration::from_millis(300), "{elapsed:?}");

    for read in reads {
        let (status, body, retry_after, elapsed) = read.await.unwrap();
        assert_eq!(
            (status, &body["error"], retry_after.as_deref()),
            (503, &json!("unavailable"), Some("1"))
        );
        assert_bounded(elapsed);
    }
    let (status, body, retry_after, elapsed) = batch.await.unwrap();
    assert_eq!(
        (status, &body["error"], retry_after.as_deref()),
        (503, &json!("unavailable"), Some("1"))
    );
    assert_bounded(elapsed);

    redis.resume().unwrap();
    let (status, _, _, _) = timed(post_batch(&collector, "paused-2", 2)).await;
    assert_eq!(status, 200);
    let (status, body, _, _) = timed(get_profile(&collector, "paused-2")).await;
    assert_eq!((status, &body["events"]), (200, &json!(2)));
}

#[tokio::test]
async fn a_refused_batch_whose_body_came_with_its_head_keeps_the_connection_open() {
    let server = Server::start(config(OverloadConfig {
        max_batches_in_flight: nz(1),
        ..OverloadConfig::default()
    }))
    .await;
    // A batch whose body has not arrived holds the only place.
    let mut holder = server.connect().await;
    holder
        .write_all(b"POST /v1/fb HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let body = batch("anon-1", 1);
    let request = [
        format!(
            "POST /v1/fb HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes(),
        body,
    ]
    .concat();
    let mut stream = server.connect().await;
    stream.write_all(&request).await.unwrap();
    let refused = read_answer(&mut stream).await.unwrap();
    assert_eq!(
        (refused.status, refused.header("retry-after")),
        (503, Some("1"))
    );
    assert_eq!(refused.json()["error"], "overloaded");
    // The same connection serves the next request: a refusal costs no reconnection.
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_answer(&mut stream).await.unwrap().status, 200);
    drop(holder);
    tokio::time::sleep(Duration::from_millis(100)).await;
    stream.write_all(&request).await.unwrap();
    assert_eq!(read_answer(&mut stream).await.unwrap().status, 200);
}
