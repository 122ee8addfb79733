//! The real collector binary under overload: at twice the rate it sustains it sheds with
//! `503 overloaded`, its memory stays under a stated bound and it serves normally again as
//! soon as the load drops; and at SIGTERM a batch waiting on a frozen Redis is still
//! spooled and acknowledged, and replayed after the restart.
//!
//! Self-contained (the shared `support` module is not used): a small blocking HTTP/1.1
//! client on std sockets keeps the load generator's own CPU cost low, since it shares the
//! machine's two cores with the collector and Redis.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use profile_cache::testing::RedisServer;
use serde_json::{Value, json};

const WRITE_KEY: &str = "overload-key";
const TOKEN: &str = "overload-reader-token";
/// The SHA-256 of [`TOKEN`] (`printf %s overload-reader-token | sha256sum`).
const TOKEN_SHA256: &str = "5a89c07225e871db465ec311cf47270294630d4b2ce8ab5d47a765ebd9167297";

/// Events per batch in the load test: with their properties, a body of about 5 KB, like
/// the tracker's batches.
const EVENTS_PER_BATCH: usize = 20;

/// The most resident memory (VmHWM) the collector may reach in the load test, with the
/// default `[overload]` settings (64 batches in flight) and 600 clients. Measured: about
/// 44 MiB for the debug build and 34 MiB for the release build; with the in-flight limit
/// lifted, 80 MiB for either, and growing with the number of clients (docs/BENCHMARKS.md).
const MEMORY_BOUND_KIB: u64 = 64 * 1024;

/// The ingest binary: `INGEST_BIN` (set by `cargo xtask test`) or `target/debug/ingest`.
fn ingest_bin() -> PathBuf {
    let path = std::env::var_os("INGEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/ingest")
        });
    assert!(
        path.exists(),
        "{} not found: run `cargo xtask test` or `cargo build -p ingest`",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The collector started from `toml` (listen address added), its log in a file; killed
/// on drop.
struct Collector {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Collector {
    fn start(toml: &str) -> Collector {
        let dir = tempfile::tempdir().unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let config = dir.path().join("ingest.toml");
        std::fs::write(&config, format!("listen = \"{addr}\"\n{toml}")).unwrap();
        let log = std::fs::File::create(dir.path().join("ingest.log")).unwrap();
        let mut cmd = Command::new(ingest_bin());
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("INGEST_") {
                cmd.env_remove(key);
            }
        }
        let child = cmd
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn ingest");
        let mut collector = Collector { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = collector.child.try_wait() {
                panic!("ingest exited with {status}: {}", collector.log());
            }
            let mut conn = Conn::new(addr);
            if conn
                .request("GET", "/readyz", None, &[])
                .is_ok_and(|a| a.status == 200)
            {
                return collector;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("ingest did not become ready: {}", collector.log());
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ingest.log")).unwrap_or_default()
    }

    /// A field of /proc/<pid>/status in KiB (`VmRSS`, `VmHWM`).
    fn memory_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/{}/status", self.pid()))
    }

    /// CPU time the process has used (user and system), from /proc/<pid>/stat.
    fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // The fields after the command name, which is in parentheses; utime and stime are
        // fields 14 and 15 of the line, in clock ticks (100 per second on Linux).
        let fields: Vec<u64> = stat[stat.rfind(')').unwrap() + 2..]
            .split(' ')
            .skip(11)
            .take(2)
            .map(|f| f.parse().unwrap())
            .collect();
        Duration::from_millis((fields[0] + fields[1]) * 10)
    }

    fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit, at most `limit`.
    fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "still running: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// A keep-alive connection that reconnects when the server closed it.
struct Conn {
    addr: SocketAddr,
    stream: Option<TcpStream>,
}

impl Conn {
    fn new(addr: SocketAddr) -> Conn {
        Conn { addr, stream: None }
    }

    fn request(
        &mut self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &[u8],
    ) -> std::io::Result<Answer> {
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nhost: {}\r\ncontent-length: {}\r\n",
            self.addr,
            body.len()
        );
        if let Some(token) = token {
            head.push_str(&format!("authorization: Bearer {token}\r\n"));
        }
        head.push_str("\r\n");
        let mut request = head.into_bytes();
        request.extend_from_slice(body);
        // A kept-alive connection may have been closed since: one fresh attempt.
        let reused = self.stream.is_some();
        match self.exchange(&request) {
            Err(_) if reused => {
                self.stream = None;
                self.exchange(&request)
            }
            result => result,
        }
    }

    fn exchange(&mut self, request: &[u8]) -> std::io::Result<Answer> {
        if self.stream.is_none() {
            let stream = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))?;
            stream.set_read_timeout(Some(Duration::from_secs(15)))?;
            stream.set_nodelay(true)?;
            self.stream = Some(stream);
        }
        let stream = self.stream.as_mut().expect("connected");
        let result = write_and_read(stream, request);
        match &result {
            Ok(answer)
                if !answer
                    .header("connection")
                    .is_some_and(|v| v.eq_ignore_ascii_case("close")) => {}
            _ => self.stream = None,
        }
        result
    }
}

fn write_and_read(stream: &mut TcpStream, request: &[u8]) -> std::io::Result<Answer> {
    stream.write_all(request)?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line: {head:?}")))?;
    let mut answer = Answer {
        status,
        head,
        body: buf[head_end..].to_vec(),
    };
    let length: usize = answer
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while answer.body.len() < length {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        answer.body.extend_from_slice(&chunk[..n]);
    }
    Ok(answer)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A batch of `events` page views with four properties for `anon`, each with a fresh
/// message id.
fn batch(anon: &str, events: usize) -> Vec<u8> {
    wire::encode(&wire::Batch {
        write_key: WRITE_KEY.into(),
        sent_at_ms: now_ms(),
        consent: 0b0011,
        context: wire::Context {
            anonymous_id: Some(anon.into()),
            page_url: Some("https://shop.example/products/overload".into()),
            ..Default::default()
        },
        events: (0..events)
            .map(|_| wire::Event {
                message_id: uuid::Uuid::new_v4().into_bytes(),
                timestamp_ms: now_ms(),
                kind: wire::EventKind::Page,
                purpose: wire::Purpose::Analytics,
                properties: ["title", "section", "variant", "campaign"]
                    .map(|key| wire::Property {
                        key: key.into(),
                        value: wire::Value::String(format!("{key} of an overloaded page")),
                    })
                    .into(),
                ..Default::default()
            })
            .collect(),
    })
}

/// What one phase of load saw.
#[derive(Debug, Default, Clone)]
struct Tally {
    accepted: u64,
    overloaded: u64,
    /// Any other answer or failure, for the message.
    other: Vec<String>,
    /// The first `503 overloaded`, as sent.
    first_refusal: Option<(Option<String>, Value)>,
    /// How long the longest-running client sent.
    active: Duration,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.accepted += other.accepted;
        self.overloaded += other.overloaded;
        self.other.extend(other.other);
        if self.first_refusal.is_none() {
            self.first_refusal = other.first_refusal;
        }
        self.active = self.active.max(other.active);
    }

    fn record(&mut self, result: std::io::Result<Answer>) {
        match result {
            Ok(a) if a.status == 200 && a.json()["accepted"] == EVENTS_PER_BATCH => {
                self.accepted += 1;
            }
            Ok(a) if a.status == 503 && a.json()["error"] == "overloaded" => {
                self.overloaded += 1;
                if self.first_refusal.is_none() {
                    let retry_after = a.header("retry-after").map(str::to_string);
                    self.first_refusal = Some((retry_after, a.json()));
                }
            }
            Ok(a) => self.other.push(format!("{} {}", a.status, a.json())),
            Err(e) => self.other.push(e.to_string()),
        }
    }
}

/// `threads` clients, each sending a batch every `interval` (as soon as the previous one is
/// answered when that takes longer), under their own anonymous ids, for `duration` or until
/// it has sent `most` batches. The batches are encoded before the clock starts, so that the
/// clients take as little as possible of the CPU the collector and Redis share with them.
fn load(
    addr: SocketAddr,
    phase: &str,
    threads: usize,
    interval: Duration,
    duration: Duration,
    most: usize,
) -> Tally {
    let per_thread = if interval.is_zero() {
        most
    } else {
        most.min((duration.as_secs_f64() / interval.as_secs_f64()).ceil() as usize + 1)
    };
    let ready = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let anon = format!("ovl-{phase}-{t}");
            let ready = ready.clone();
            // Spread the clients' first sends over one interval.
            let offset = interval.mul_f64(t as f64 / threads as f64);
            std::thread::spawn(move || {
                let bodies: Vec<Vec<u8>> = (0..per_thread)
                    .map(|_| batch(&anon, EVENTS_PER_BATCH))
                    .collect();
                let mut conn = Conn::new(addr);
                let mut tally = Tally::default();
                ready.wait();
                let start = Instant::now();
                let end = start + duration;
                let mut next = start + offset;
                for body in bodies {
                    if next >= end || Instant::now() >= end {
                        break;
                    }
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    next += interval;
                    tally.record(conn.request("POST", "/v1/fb", None, &body));
                }
                tally.active = start.elapsed();
                tally
            })
        })
        .collect();
    ready.wait();
    let mut tally = Tally::default();
    for h in handles {
        tally.add(h.join().unwrap());
    }
    tally
}

/// The sum of the `events` counters of the load test's profiles.
fn events_in_redis(redis: &RedisServer) -> u64 {
    let script = "local n = 0 \
        for _, k in ipairs(redis.call('KEYS', 'profile:{a:ovl-*}')) do \
          n = n + tonumber(redis.call('HGET', k, 'events') or '0') \
        end \
        return tostring(n)";
    let mut conn = TcpStream::connect(("127.0.0.1", redis.port())).unwrap();
    let args = ["EVAL", script, "0"];
    let mut request = format!("*{}\r\n", args.len());
    for a in args {
        request.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    conn.write_all(request.as_bytes()).unwrap();
    let mut reply = String::new();
    let mut chunk = [0u8; 256];
    while !reply.ends_with("\r\n") || reply.matches("\r\n").count() < 2 {
        let n = conn.read(&mut chunk).unwrap();
        assert!(n > 0, "redis closed: {reply:?}");
        reply.push_str(std::str::from_utf8(&chunk[..n]).unwrap());
    }
    reply
        .lines()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("redis answered {reply:?}"))
}

#[test]
fn at_twice_the_sustainable_rate_the_collector_sheds_with_503_stays_under_its_memory_bound_and_recovers()
 {
    let redis = RedisServer::start().unwrap();
    // Default [overload] settings; only the write key's rate limit is off, so that what
    // refuses batches here is the in-flight limit.
    let collector = Collector::start(&format!(
        r#"
redis_url = "{}"
[scheduler]
enabled = false
[rate_limits]
write_key = {{ per_second = 0 }}
[[write_keys]]
key = "{WRITE_KEY}"
origins = ["*"]
"#,
        redis.url()
    ));
    let addr = collector.addr;

    // 1. The sustainable rate: a few clients, each sending as soon as it is answered (for
    // 1.5 s, or less when they run out of the batches encoded beforehand).
    let cpu = collector.cpu_time();
    let calm = load(
        addr,
        "measure",
        4,
        Duration::ZERO,
        Duration::from_millis(1500),
        800,
    );
    let calm_cpu = collector.cpu_time() - cpu;
    let measure = calm.active;
    assert!(
        calm.overloaded == 0 && calm.other.is_empty(),
        "{calm:?}\n{}",
        collector.log()
    );
    let sustainable = calm.accepted as f64 / measure.as_secs_f64();
    assert!(sustainable > 20.0, "{sustainable} batches/s");

    // 2. Twice that, from 600 clients (far more than the 64 batches allowed in flight),
    // each on its own connection and sending on its own schedule whatever the answers.
    let threads = 600;
    let overload_for = Duration::from_secs(4);
    let interval = Duration::from_secs_f64(threads as f64 / (2.0 * sustainable));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        let pid = collector.pid();
        std::thread::spawn(move || {
            let mut max_rss = 0;
            while !stop.load(Ordering::Relaxed) {
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
                let rss: u64 = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
                    .unwrap();
                max_rss = max_rss.max(rss);
                std::thread::sleep(Duration::from_millis(50));
            }
            max_rss
        })
    };
    let cpu = collector.cpu_time();
    let busy = load(
        addr,
        "overload",
        threads,
        interval,
        overload_for,
        usize::MAX,
    );
    let busy_cpu = collector.cpu_time() - cpu;
    stop.store(true, Ordering::Relaxed);
    let max_rss = sampler.join().unwrap();
    let hwm = collector.memory_kib("VmHWM");
    let served = busy.accepted as f64 / busy.active.as_secs_f64();
    println!(
        "sustainable {sustainable:.0} batches/s ({} events/s), collector CPU {:.0}%; \
         at {:.0} batches/s offered: {} accepted ({served:.0}/s), {} refused with 503, \
         collector CPU {:.0}%; collector VmRSS max {} KiB, VmHWM {hwm} KiB",
        sustainable as u64 * EVENTS_PER_BATCH as u64,
        100.0 * calm_cpu.as_secs_f64() / measure.as_secs_f64(),
        2.0 * sustainable,
        busy.accepted,
        busy.overloaded,
        100.0 * busy_cpu.as_secs_f64() / busy.active.as_secs_f64(),
        max_rss,
    );
    assert!(
        busy.other.is_empty(),
        "{:?}",
        &busy.other[..busy.other.len().min(5)]
    );
    assert!(busy.overloaded > 0, "nothing was shed: {busy:?}");
    let (retry_after, body) = busy.first_refusal.clone().unwrap();
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert_eq!(
        body,
        json!({
            "error": "overloaded",
            "message": "too many batches in flight: limit 64 per collector; retry in 1s",
            "field": "overload.max_batches_in_flight",
            "limit": 64,
        })
    );
    // Shedding keeps the collector working rather than collapsing; it may run below its
    // sustainable rate here because the 600 clients sending twice as much take more of the
    // two cores.
    assert!(
        served >= 0.25 * sustainable,
        "served {served:.0}/s of a sustainable {sustainable:.0}/s"
    );
    assert!(
        hwm <= MEMORY_BOUND_KIB,
        "VmHWM {hwm} KiB over the bound of {MEMORY_BOUND_KIB} KiB"
    );

    // 3. Back to half the sustainable rate: everything is accepted again, at once.
    let recovered = load(
        addr,
        "recovered",
        2,
        Duration::from_secs_f64(2.0 / (0.5 * sustainable)),
        Duration::from_secs(3),
        usize::MAX,
    );
    assert!(
        recovered.overloaded == 0 && recovered.other.is_empty() && recovered.accepted > 0,
        "{recovered:?}"
    );

    // Every acknowledged batch is applied, once; no refused one is.
    let acknowledged =
        (calm.accepted + busy.accepted + recovered.accepted) * EVENTS_PER_BATCH as u64;
    assert_eq!(events_in_redis(&redis), acknowledged);
}

fn spool_config(redis: &RedisServer, spool: &Path) -> String {
    format!(
        r#"
redis_url = "{}"
shutdown_timeout = "10s"
[profiles]
redis_timeout = "2s"
[scheduler]
enabled = false
[spool]
enabled = true
dir = "{}"
fsync = "always"
[[write_keys]]
key = "{WRITE_KEY}"
origins = ["*"]
[[api_tokens]]
name = "reader"
sha256 = "{TOKEN_SHA256}"
scopes = ["profiles:read"]
"#,
        redis.url(),
        spool.display()
    )
}

#[test]
fn a_batch_waiting_on_a_frozen_redis_at_sigterm_is_spooled_acknowledged_and_replayed_after_restart()
{
    let mut redis = RedisServer::start().unwrap();
    let spool = tempfile::tempdir().unwrap();
    let config = spool_config(&redis, spool.path());
    let mut collector = Collector::start(&config);
    let addr = collector.addr;
    let post = |anon: &str| Conn::new(addr).request("POST", "/v1/fb", None, &batch(anon, 1));
    let first = post("drain-1").unwrap();
    assert_eq!(
        (first.status, first.json()),
        (200, json!({"accepted": 1, "rejected": []}))
    );

    redis.pause().unwrap();
    let in_flight = std::thread::spawn(move || {
        Conn::new(addr).request("POST", "/v1/fb", None, &batch("drain-1", 1))
    });
    // The batch now waits for Redis (up to profiles.redis_timeout, 2 s).
    std::thread::sleep(Duration::from_millis(500));
    let terminated = Instant::now();
    collector.sigterm();
    std::thread::sleep(Duration::from_millis(300));
    // The collector stopped accepting, but the batch in flight goes on.
    assert!(
        post("drain-2").is_err(),
        "a connection was accepted after SIGTERM"
    );
    let answer = in_flight.join().unwrap().unwrap();
    assert_eq!(
        (answer.status, answer.json()),
        (200, json!({"accepted": 1, "rejected": [], "spooled": true}))
    );
    let status = collector.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status}: {}", collector.log());
    println!(
        "acknowledged from the spool and stopped {:?} after SIGTERM",
        terminated.elapsed()
    );

    // Redis answers again; the restarted collector replays what the spool holds.
    redis.resume().unwrap();
    drop(collector);
    let collector = Collector::start(&config);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let answer = Conn::new(collector.addr)
            .request("GET", "/v1/profiles/drain-1", Some(TOKEN), &[])
            .unwrap();
        if answer.status == 200 && answer.json()["events"] == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not replayed: {} {}",
            answer.status,
            answer.json()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
