//! Fault tests: the real collector under load from the real load generator while Redis is
//! killed, the collector is killed, or Redis is frozen. After each, every event the
//! collector acknowledged is in the profiles exactly once.
//!
//! How a run is judged:
//! - `loadgen` sends a fixed set of batches (`--seed`) at a fixed rate and retries every
//!   batch that is not acknowledged (503, a refused connection, an answer lost to a killed
//!   collector) with the same bytes, hence the same message ids, until it is. It reports
//!   the events acknowledged per profile, grouped by the collector's own code.
//! - The spool has drained when a probe batch is applied directly again (`"spooled"` is
//!   absent): while the spool holds a batch, newer ones are spooled behind it.
//! - Then the `events` counter of every profile hash in Redis must equal the acknowledged
//!   events of that profile, and there must be no other profile: nothing lost, nothing
//!   counted twice, whatever was retried. Most visitors log in, and an anonymous profile
//!   is then merged into the user profile (`merged_into`): its acknowledged events count
//!   there.
//!
//! The tests run one at a time: each drives the collector at a fixed share of what a debug
//! build sustains on two cores, and timing faults against a run needs the machine to itself.
//! Each prints one line of figures on stderr, past libtest's capture.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::blocking::Client;
use serde_json::Value;
use support::{
    CuttingProxy, Ingest, ORIGIN, RedisServer, WRITE_KEY, free_port, loadgen_bin, redis_json,
};

/// Events per run, at [`RATE`]: a 10 s run.
const EVENTS: u64 = 20_000;
/// Events per second the load generator starts: about a third of what a debug collector
/// takes with `appendfsync always` on two cores, so a run keeps its pace and the backlog
/// of a fault is worked off within the run.
const RATE: u64 = 2_000;
/// Distinct visitors (profiles: a visitor who identifies has a user profile too).
const VISITORS: u32 = 200;
/// Requests in flight at once.
const CONCURRENCY: u32 = 8;
/// When the fault starts, into the run.
const FAULT_AFTER: Duration = Duration::from_secs(3);
/// The collector's `profiles.redis_timeout`: how long it waits for Redis before it spools
/// a batch (or answers 503 without a spool).
const REDIS_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest a batch may go unacknowledged before the load generator gives up on it.
const RETRY_FOR: &str = "40s";
/// The longest a load generator run may take, retries included.
const LOAD_DEADLINE: Duration = Duration::from_secs(60);
/// The longest the spool may take to drain once Redis answers again.
const DRAIN_DEADLINE: Duration = Duration::from_secs(30);
/// What an answer may take beyond [`REDIS_TIMEOUT`] while Redis is frozen (spool fsync,
/// a loaded debug build on two cores).
const ANSWER_SLACK: Duration = Duration::from_millis(1500);

/// The anonymous id of the drain probe; its one event always has the same message id.
const PROBE: &str = "drain-probe";
/// The message id of the batch posted while Redis is frozen.
const FROZEN_PROBE_ID: u128 = 0xf502_0000;

static SERIAL: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    // A failed test poisons the lock; the next one can still run.
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The shipped production Redis configuration (ingest/redis.conf).
fn production_redis_conf() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ingest/redis.conf")
}

/// A Redis configuration in `dir`: the production one with `appendfsync always`, so that
/// a write Redis has answered is on disk before a SIGKILL. With the production `everysec`
/// Redis may still hold acknowledged writes in memory when killed (while a slow fsync
/// makes it postpone writing the AOF, for up to 2 s), and a crash test could not demand
/// that nothing is lost.
fn fsync_always_redis_conf(dir: &Path) -> PathBuf {
    let path = dir.join("redis-fsync-always.conf");
    let production = production_redis_conf()
        .canonicalize()
        .expect("ingest/redis.conf");
    std::fs::write(
        &path,
        format!("include {}\nappendfsync always\n", production.display()),
    )
    .unwrap();
    path
}

/// `CONFIG GET <name>` on the Redis at `port`, through redis-cli (scripts may not call
/// CONFIG).
fn redis_setting(port: u16, name: &str) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "--raw", "CONFIG", "GET", name])
        .output()
        .expect("redis-cli runs");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().nth(1).unwrap_or_default().to_string()
}

/// The collector's configuration: write keys only (no read token: profiles are read
/// straight from Redis), the spool in `spool` if given (fsync always, the default), a short
/// Redis timeout.
fn collector_config(port: u16, redis_url: &str, spool: Option<&Path>) -> String {
    let spool = spool.map_or(String::new(), |dir| {
        format!(
            "[spool]\nenabled = true\nfsync = \"always\"\ndir = \"{}\"\n",
            dir.display()
        )
    });
    format!(
        r#"listen = "127.0.0.1:{port}"
redis_url = "{redis_url}"
shutdown_timeout = "5s"
retry_after = "1s"
{spool}
[profiles]
redis_timeout = "{}ms"

[[write_keys]]
key = "{WRITE_KEY}"
origins = ["{ORIGIN}"]
"#,
        REDIS_TIMEOUT.as_millis()
    )
}

fn client() -> Client {
    Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// A load generator run against a collector.
struct Load {
    child: Option<Child>,
    started: Instant,
    by_profile: PathBuf,
    stderr: PathBuf,
}

/// What a finished run reported.
struct LoadReport {
    /// loadgen's JSON line.
    summary: Value,
    /// Acknowledged events per profile id.
    by_profile: BTreeMap<String, u64>,
    took: Duration,
}

impl LoadReport {
    fn get(&self, field: &str) -> u64 {
        self.summary[field]
            .as_u64()
            .unwrap_or_else(|| panic!("loadgen's summary has no {field}: {}", self.summary))
    }

    fn ms(&self, field: &str) -> f64 {
        self.summary[field]
            .as_f64()
            .unwrap_or_else(|| panic!("loadgen's summary has no {field}: {}", self.summary))
    }
}

impl Load {
    /// Starts [`EVENTS`] events from [`VISITORS`] visitors at [`RATE`], files in `dir`.
    fn start(ingest: &Ingest, seed: u64, dir: &Path) -> Load {
        let by_profile = dir.join("acked-by-profile.json");
        let stderr = dir.join("loadgen.log");
        let child = Command::new(loadgen_bin())
            .arg("--url")
            .arg(ingest.url("/v1/fb"))
            .args(["--write-key", WRITE_KEY])
            .args(["--seed", &seed.to_string()])
            .args(["--events", &EVENTS.to_string()])
            .args(["--visitors", &VISITORS.to_string()])
            .args(["--concurrency", &CONCURRENCY.to_string()])
            .args(["--rate", &RATE.to_string()])
            .args(["--retry-for", RETRY_FOR])
            .args(["--timeout", "10s"])
            .arg("--acked-by-profile")
            .arg(&by_profile)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("spawn loadgen");
        Load {
            child: Some(child),
            started: Instant::now(),
            by_profile,
            stderr,
        }
    }

    /// Sleeps until `at` into the run.
    fn sleep_until(&self, at: Duration) {
        if let Some(left) = at.checked_sub(self.started.elapsed()) {
            std::thread::sleep(left);
        }
    }

    /// Waits for the run to end (at most [`LOAD_DEADLINE`]) and reads its report.
    fn finish(mut self) -> LoadReport {
        let mut child = self.child.take().expect("running");
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if self.started.elapsed() > LOAD_DEADLINE {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "loadgen ran longer than {LOAD_DEADLINE:?}:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let took = self.started.elapsed();
        let mut stdout = String::new();
        child
            .stdout
            .take()
            .expect("piped")
            .read_to_string(&mut stdout)
            .unwrap();
        assert!(
            status.success(),
            "loadgen failed ({status}): {stdout}\n{}",
            self.log_tail()
        );
        let summary: Value = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("loadgen's summary {stdout:?}: {e}"));
        let by_profile = std::fs::read(&self.by_profile).expect("loadgen wrote its report");
        let by_profile = serde_json::from_slice(&by_profile).expect("a JSON object of counts");
        LoadReport {
            summary,
            by_profile,
            took,
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let lines: Vec<&str> = log.lines().rev().take(20).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A batch of one page view for `anonymous_id`, always with the same message id.
fn one_event(anonymous_id: &str, message_id: u128) -> Vec<u8> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    wire::encode(&wire::Batch {
        write_key: WRITE_KEY.into(),
        sent_at_ms: now,
        consent: 0b1111,
        context: wire::Context {
            anonymous_id: Some(anonymous_id.into()),
            ..Default::default()
        },
        events: vec![wire::Event {
            message_id: *uuid::Uuid::from_u128(message_id).as_bytes(),
            timestamp_ms: now,
            kind: wire::EventKind::Page,
            purpose: wire::Purpose::Analytics,
            ..Default::default()
        }],
    })
}

/// How the collector answered one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Applied,
    Spooled,
    Refused,
}

/// Posts `body`; `None` when no answer came.
fn post(ingest: &Ingest, body: &[u8]) -> Option<Answer> {
    post_to(&ingest.url("/v1/fb"), body)
}

/// Posts `body` to the batch endpoint `url`; `None` when no answer came.
fn post_to(url: &str, body: &[u8]) -> Option<Answer> {
    let response = client().post(url).body(body.to_vec()).send().ok()?;
    let status = response.status();
    let json: Value = response.json().unwrap_or(Value::Null);
    match status {
        StatusCode::OK if json["spooled"] == true => Some(Answer::Spooled),
        StatusCode::OK => {
            assert_eq!(json["rejected"], serde_json::json!([]), "{json}");
            Some(Answer::Applied)
        }
        StatusCode::SERVICE_UNAVAILABLE => Some(Answer::Refused),
        other => panic!("the collector answered {other}: {json}"),
    }
}

/// Posts the drain probe until the collector applies it directly, which it does only
/// once its spool holds nothing; returns how long that took.
fn wait_drained(ingest: &Ingest) -> Duration {
    let started = Instant::now();
    let probe = one_event(PROBE, 0xd4a1_0000);
    loop {
        if post(ingest, &probe) == Some(Answer::Applied) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < DRAIN_DEADLINE,
            "the spool did not drain within {DRAIN_DEADLINE:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The profiles in a Redis: the `events` counter of each live profile hash, and the
/// anonymous profiles merged into a user profile (their hash keeps `merged_into`; their
/// events, and the later batches naming only them, are on the user profile).
#[derive(Debug, Default)]
struct Profiles {
    events: BTreeMap<String, u64>,
    merged_into: BTreeMap<String, String>,
    /// Merged profiles whose merge stopped after its fold: the user profile has their data
    /// (its `merges` hash records them), but their own keys, counters and segment
    /// memberships are still there (`merge_state` = `sealed`). See
    /// [`a_merge_cut_off_after_its_fold_is_finished_by_the_retried_batch`].
    unfinished: BTreeSet<String>,
}

impl Profiles {
    /// Reads every profile hash of the Redis at `port`, once nothing is being applied.
    ///
    /// # Panics
    /// A merge is done but its profile still counts events, or a merge stopped before its
    /// fold (its events would be in no live profile).
    fn read(port: u16) -> Profiles {
        let script = format!(
            "local events, merged, cursor = {{}}, {{}}, '0'
             repeat
               local page = redis.call('SCAN', cursor, 'MATCH', '{}', 'COUNT', 1000)
               cursor = page[1]
               for _, key in ipairs(page[2]) do
                 local f = redis.call('HMGET', key, 'events', 'merged_into', 'merge_state')
                 if f[2] then merged[key] = {{f[2], f[3], f[1]}}
                 else events[key] = tonumber(f[1] or '0') end
               end
             until cursor == '0'
             return cjson.encode({{events, merged}})",
            profile_cache::keys::PROFILE_PATTERN
        );
        let found = redis_json(port, &script);
        let id = |key: &str| {
            profile_cache::keys::profile_of_key(key)
                .expect("a profile key")
                .to_string()
        };
        let mut profiles = Profiles::default();
        // cjson encodes an empty table as an object: both halves are objects.
        for (key, events) in found[0].as_object().expect("an object") {
            let events = events.as_u64().expect("a count");
            profiles.events.insert(id(key), events);
        }
        for (key, merge) in found[1].as_object().expect("an object") {
            let (source, target) = (id(key), merge[0].as_str().expect("a profile id"));
            // HMGET answers a missing field as nil, which cjson writes as false.
            if merge[1] == "done" {
                assert_eq!(merge[2], false, "merged profile {key} still counts events");
            } else {
                assert!(
                    merged_in(port, target, &source),
                    "{key} is sealed ({merge}) but not folded into {target}"
                );
                profiles.unfinished.insert(source.clone());
            }
            profiles.merged_into.insert(source, target.to_string());
        }
        profiles
    }

    /// Removes the live profile `id`, returning its events.
    fn take(&mut self, id: &str) -> Option<u64> {
        self.events.remove(id)
    }

    /// Where the events sent to `id` are: the user profile it was merged into, or itself.
    fn holder<'a>(&'a self, id: &'a str) -> &'a str {
        self.merged_into.get(id).map_or(id, String::as_str)
    }
}

/// The `events` counter of anonymous profile `anonymous_id`, read while the load runs
/// (when [`Profiles::read`] would find merges half done).
fn events_of(port: u16, anonymous_id: &str) -> Option<u64> {
    let key =
        profile_cache::keys::profile(&profile_cache::ProfileId::anonymous(anonymous_id).unwrap());
    let events = redis_json(
        port,
        &format!("return cjson.encode(redis.call('HGET', '{key}', 'events'))"),
    );
    events.as_str().and_then(|n| n.parse().ok())
}

/// Whether the `merges` hash of user profile `target` records anonymous profile `source`
/// as merged (a time, not `refused` or `limit`).
fn merged_in(port: u16, target: &str, source: &str) -> bool {
    let user = target.strip_prefix("u:").expect("a user profile");
    let key = profile_cache::keys::merges(&profile_cache::ProfileId::user(user).unwrap());
    let at = redis_json(
        port,
        &format!("return cjson.encode(redis.call('HGET', '{key}', '{source}'))"),
    );
    at.as_str().is_some_and(|at| at.parse::<u64>().is_ok())
}

/// What one fault test measured.
struct Figures<'a> {
    fault: &'a str,
    ingest: &'a Ingest,
    report: LoadReport,
    /// From the end of the fault (restart, resume) until the spool was empty.
    drained_after: Duration,
    in_redis: Profiles,
}

impl Figures<'_> {
    /// Prints the figures, then checks that the profiles hold exactly what was
    /// acknowledged: every batch acknowledged in the end, nothing lost, nothing twice.
    fn check(mut self) -> LoadReport {
        let probe = self.in_redis.take(&format!("a:{PROBE}"));
        let found: u64 = self.in_redis.events.values().sum();
        let r = &self.report;
        let line = format!(
            "faults: {}: sent {}, acknowledged {} (spooled {}), refused {}, retried {}, \
             answers lost {}, found in redis {found} in {} profiles ({} anonymous ones merged \
             into them, {} of those merges stopped after the fold), spool drained {:.2} s \
             after the fault; run {:.1} s, p99 {} ms, slowest {} ms\n",
            self.fault,
            r.get("events_sent"),
            r.get("events_acked"),
            r.get("events_spooled"),
            r.get("events_refused"),
            r.get("retries"),
            r.get("answers_lost"),
            self.in_redis.events.len(),
            self.in_redis.merged_into.len(),
            self.in_redis.unfinished.len(),
            self.drained_after.as_secs_f64(),
            r.took.as_secs_f64(),
            r.ms("p99_ms"),
            r.ms("max_ms"),
        );
        // Straight to stderr: libtest captures only the print macros.
        let _ = std::io::stderr().write_all(line.as_bytes());

        assert_eq!(
            r.get("errors"),
            0,
            "every batch is acknowledged in the end; the collector's log:\n{}",
            self.ingest.log_tail(30)
        );
        assert_eq!(r.get("events_sent"), EVENTS);
        assert_eq!(r.get("events_acked"), EVENTS);
        assert_eq!(
            r.by_profile.values().sum::<u64>(),
            EVENTS,
            "the per-profile report adds up"
        );
        assert_eq!(
            probe,
            Some(1),
            "the drain probe, posted many times with one message id, counts once"
        );
        assert_eq!(found, EVENTS, "acknowledged events in the profiles");
        let mut expected: BTreeMap<String, u64> = BTreeMap::new();
        for (id, n) in &r.by_profile {
            *expected
                .entry(self.in_redis.holder(id).to_string())
                .or_default() += n;
        }
        assert_eq!(
            self.in_redis.events, expected,
            "each profile holds exactly its acknowledged events"
        );
        self.report
    }
}

/// Redis with AOF (`appendfsync always`) is killed with SIGKILL 3 s into the run and
/// started again on the same files 2 s later. Meanwhile the collector spools every batch
/// (none is refused); once Redis is back the spool drains, and batches whose reply the
/// crash cut off (applied or not) count once.
#[test]
fn redis_killed_and_restarted_mid_load_loses_nothing_and_counts_nothing_twice() {
    let _serial = one_at_a_time();
    let scratch = tempfile::tempdir().unwrap();
    let conf = fsync_always_redis_conf(scratch.path());
    let redis_dir = scratch.path().join("redis");
    let redis_port = free_port();
    let redis = RedisServer::start_with_config(&conf, &redis_dir, redis_port).unwrap();
    assert_eq!(redis_setting(redis_port, "appendonly"), "yes");
    assert_eq!(redis_setting(redis_port, "appendfsync"), "always");
    let port = free_port();
    let spool = scratch.path().join("spool");
    let ingest = Ingest::start_config(port, &collector_config(port, &redis.url(), Some(&spool)));

    let load = Load::start(&ingest, 11, scratch.path());
    load.sleep_until(FAULT_AFTER);
    redis.crash();
    std::thread::sleep(Duration::from_secs(2));
    let redis = RedisServer::start_with_config(&conf, &redis_dir, redis_port).unwrap();
    let drained_after = wait_drained(&ingest);
    let report = load.finish();
    wait_drained(&ingest);

    let report = Figures {
        fault: "redis SIGKILL for 2 s",
        ingest: &ingest,
        report,
        drained_after,
        in_redis: Profiles::read(redis.port()),
    }
    .check();
    assert!(
        report.get("events_spooled") > 0,
        "the spool took batches while Redis was down"
    );
    assert_eq!(
        report.get("events_refused"),
        0,
        "the spool took every batch"
    );
    assert_eq!(
        report.get("answers_lost"),
        0,
        "the collector answered every request"
    );
}

/// The collector (spool on, fsync always) is killed with SIGKILL 3 s into the run and
/// started again on the same port 1 s later; Redis answers throughout, so nothing is
/// spooled or refused. Requests in flight lose their answers and are retried, with the
/// rest, against the new process.
///
/// The kill is timed so that some of those requests were applied: Redis is frozen for a
/// moment (requests wait inside the collector, their commands sent), then the collector is
/// frozen, then Redis resumes and runs those commands, and only then is the collector
/// killed: their answers are lost although their events are in Redis. A probe batch sent
/// at that moment shows it: applied before the kill, unanswered, and counted once after
/// its retry.
#[test]
fn collector_killed_mid_load_loses_nothing_and_counts_applied_but_unanswered_batches_once() {
    let _serial = one_at_a_time();
    let scratch = tempfile::tempdir().unwrap();
    let redis_port = free_port();
    let mut redis = RedisServer::start_with_config(
        &production_redis_conf(),
        &scratch.path().join("redis"),
        redis_port,
    )
    .unwrap();
    let port = free_port();
    let spool = scratch.path().join("spool");
    let mut ingest =
        Ingest::start_config(port, &collector_config(port, &redis.url(), Some(&spool)));
    let probe = one_event("lost-answer-probe", 0x1057_0000);

    let load = Load::start(&ingest, 12, scratch.path());
    load.sleep_until(FAULT_AFTER);
    redis.pause().unwrap();
    let unanswered = {
        let (url, probe) = (ingest.url("/v1/fb"), probe.clone());
        std::thread::spawn(move || post_to(&url, &probe))
    };
    // Long enough for the probe to reach Redis's socket, well inside the collector's
    // Redis timeout: nothing has been spooled or answered yet.
    std::thread::sleep(REDIS_TIMEOUT * 3 / 10);
    ingest.freeze();
    redis.resume().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while events_of(redis.port(), "lost-answer-probe") != Some(1) {
        assert!(
            Instant::now() < deadline,
            "Redis never ran the probe the frozen collector had sent"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    ingest.kill();
    assert_eq!(
        unanswered.join().unwrap(),
        None,
        "the probe's answer died with the collector"
    );
    std::thread::sleep(Duration::from_secs(1));
    ingest.restart();
    // The tracker's retry of the unanswered batch: acknowledged, not counted again.
    assert_eq!(post(&ingest, &probe), Some(Answer::Applied));
    let drained_after = wait_drained(&ingest);
    let report = load.finish();
    wait_drained(&ingest);

    let mut in_redis = Profiles::read(redis.port());
    assert_eq!(in_redis.take("a:lost-answer-probe"), Some(1));
    let report = Figures {
        fault: "collector SIGKILL with applied requests unanswered, down 1 s",
        ingest: &ingest,
        report,
        drained_after,
        in_redis,
    }
    .check();
    assert!(
        report.get("answers_lost") > 0,
        "requests were in flight when the collector was killed"
    );
    assert!(
        report.get("retries") > report.get("answers_lost"),
        "batches were retried while the collector was down"
    );
    assert_eq!(report.get("events_refused"), 0, "Redis answered throughout");
    assert_eq!(report.get("events_spooled"), 0, "Redis answered throughout");
}

/// Freezes Redis for 3 s, checking on the way that the collector neither hangs nor
/// waits longer than its Redis timeout: a batch and `/readyz` are answered within
/// [`REDIS_TIMEOUT`] + [`ANSWER_SLACK`]. Returns what the probe batch got.
fn freeze_redis(redis: &mut RedisServer, ingest: &Ingest) -> Answer {
    let frozen = Instant::now();
    redis.pause().unwrap();
    let bound = REDIS_TIMEOUT + ANSWER_SLACK;
    let t = Instant::now();
    let answer = post(ingest, &one_event("frozen-probe", FROZEN_PROBE_ID));
    let batch_took = t.elapsed();
    let t = Instant::now();
    let ready = client()
        .get(ingest.url("/readyz"))
        .send()
        .map(|r| r.status());
    let ready_took = t.elapsed();
    std::thread::sleep(Duration::from_secs(3).saturating_sub(frozen.elapsed()));
    redis.resume().unwrap();
    assert!(
        batch_took < bound,
        "a batch took {batch_took:?} to be answered while Redis was frozen"
    );
    assert_eq!(
        ready.ok(),
        Some(StatusCode::SERVICE_UNAVAILABLE),
        "/readyz while Redis is frozen"
    );
    assert!(
        ready_took < bound,
        "/readyz took {ready_took:?} while Redis was frozen"
    );
    answer.expect("an answer while Redis was frozen")
}

/// Redis is frozen with SIGSTOP 3 s into the run and resumed (SIGCONT) 3 s later. The
/// collector stops waiting for it after its Redis timeout and spools; the commands that
/// timed out still run when Redis resumes, and the replay of the same batches counts
/// nothing twice.
#[test]
fn redis_frozen_mid_load_is_spooled_within_the_timeout_and_counted_once() {
    let _serial = one_at_a_time();
    let scratch = tempfile::tempdir().unwrap();
    let redis_port = free_port();
    let mut redis = RedisServer::start_with_config(
        &production_redis_conf(),
        &scratch.path().join("redis"),
        redis_port,
    )
    .unwrap();
    let port = free_port();
    let spool = scratch.path().join("spool");
    let ingest = Ingest::start_config(port, &collector_config(port, &redis.url(), Some(&spool)));

    let load = Load::start(&ingest, 13, scratch.path());
    load.sleep_until(FAULT_AFTER);
    let probe = freeze_redis(&mut redis, &ingest);
    let drained_after = wait_drained(&ingest);
    let report = load.finish();
    wait_drained(&ingest);

    let mut in_redis = Profiles::read(redis.port());
    assert_eq!(in_redis.take("a:frozen-probe"), Some(1));
    assert_eq!(probe, Answer::Spooled);
    let report = Figures {
        fault: "redis SIGSTOP for 3 s, spool on",
        ingest: &ingest,
        report,
        drained_after,
        in_redis,
    }
    .check();
    assert!(
        report.get("events_spooled") > 0,
        "the spool took batches while Redis was frozen"
    );
    assert_eq!(
        report.get("events_refused"),
        0,
        "the spool took every batch"
    );
    assert_eq!(
        report.get("answers_lost"),
        0,
        "the collector answered every request"
    );
}

/// The same freeze without a spool: the collector answers 503 after its Redis timeout,
/// the load generator retries, and the batches Redis runs late (after it resumes) and then
/// receives again count once.
#[test]
fn redis_frozen_mid_load_without_a_spool_is_refused_within_the_timeout_and_counted_once() {
    let _serial = one_at_a_time();
    let scratch = tempfile::tempdir().unwrap();
    let redis_port = free_port();
    let mut redis = RedisServer::start_with_config(
        &production_redis_conf(),
        &scratch.path().join("redis"),
        redis_port,
    )
    .unwrap();
    let port = free_port();
    let ingest = Ingest::start_config(port, &collector_config(port, &redis.url(), None));

    let load = Load::start(&ingest, 14, scratch.path());
    load.sleep_until(FAULT_AFTER);
    let probe = freeze_redis(&mut redis, &ingest);
    let drained_after = wait_drained(&ingest);
    // As a tracker would, the refused probe is sent again until it is acknowledged; Redis
    // may also have run the first attempt late, when it resumed.
    let retried = one_event("frozen-probe", FROZEN_PROBE_ID);
    let deadline = Instant::now() + DRAIN_DEADLINE;
    while post(&ingest, &retried) != Some(Answer::Applied) {
        assert!(
            Instant::now() < deadline,
            "the refused probe was never applied"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let report = load.finish();
    wait_drained(&ingest);

    let mut in_redis = Profiles::read(redis.port());
    assert_eq!(in_redis.take("a:frozen-probe"), Some(1));
    assert_eq!(probe, Answer::Refused);
    let report = Figures {
        fault: "redis SIGSTOP for 3 s, no spool",
        ingest: &ingest,
        report,
        drained_after,
        in_redis,
    }
    .check();
    assert!(
        report.get("events_refused") > 0,
        "batches were refused while Redis was frozen"
    );
    assert_eq!(report.get("events_spooled"), 0, "no spool");
    assert_eq!(
        report.get("answers_lost"),
        0,
        "the collector answered every request"
    );
}

/// A visitor logs in; the collector merges their anonymous profile into the user profile in
/// three steps (seal, fold, finish), and the connection to Redis is cut just before the
/// last. The batch is answered 503 and the tracker sends it again. The retry must finish the
/// merge: until it is finished the anonymous profile keeps its keys, counters, segment
/// memberships and deadlines next to the user profile that already holds its data.
///
/// The fold records the merge as `folded`, so the retry still asks for it and finishes it.
#[test]
fn a_merge_cut_off_after_its_fold_is_finished_by_the_retried_batch() {
    let _serial = one_at_a_time();
    let redis = RedisServer::start().unwrap();
    let proxy = CuttingProxy::start(redis.port(), "finish");
    let port = free_port();
    let ingest = Ingest::start_config(port, &collector_config(port, &proxy.url(), None));
    let page = |n: u128| wire::Event {
        message_id: *uuid::Uuid::from_u128(0x3e12_0000 + n).as_bytes(),
        timestamp_ms: 1,
        kind: wire::EventKind::Page,
        purpose: wire::Purpose::Analytics,
        ..Default::default()
    };
    let batch = |user: Option<&str>, events: Vec<wire::Event>| {
        wire::encode(&wire::Batch {
            write_key: WRITE_KEY.into(),
            sent_at_ms: 1,
            consent: 0b1111,
            context: wire::Context {
                anonymous_id: Some("visitor-cut".into()),
                user_id: user.map(Into::into),
                ..Default::default()
            },
            events,
        })
    };
    assert_eq!(
        post(&ingest, &batch(None, vec![page(1), page(2)])),
        Some(Answer::Applied)
    );

    proxy.arm();
    let mut identify = page(3);
    identify.kind = wire::EventKind::Identify;
    identify.user_id = Some("ada".into());
    let login = batch(Some("ada"), vec![identify, page(4)]);
    assert_eq!(post(&ingest, &login), Some(Answer::Refused));
    assert!(
        proxy.has_cut(),
        "the connection was cut before the finish step"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while post(&ingest, &login) != Some(Answer::Applied) {
        assert!(
            Instant::now() < deadline,
            "the retried login was never applied"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let profiles = Profiles::read(redis.port());
    assert_eq!(
        profiles.events.get("u:ada"),
        Some(&4),
        "the visitor's 4 events"
    );
    assert_eq!(
        profiles
            .merged_into
            .get("a:visitor-cut")
            .map(String::as_str),
        Some("u:ada")
    );
    assert_eq!(
        profiles.unfinished,
        BTreeSet::new(),
        "the retried batch finished the merge"
    );
}
