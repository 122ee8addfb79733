//! The `profiles` binary against real, throwaway redis-server processes: profiles looked up
//! in each id form, the recorded segments listed with their sizes, exports as CSV and JSON
//! lines (quoting, the email column first, more members than a page, a member whose profile
//! is gone, an unknown segment, a closed output), and `watch` printing transitions through a
//! consumer group: acknowledged once printed, not printed again to the same group, printed
//! again after a run killed before acknowledging, not acknowledged when the output closed,
//! acknowledged with a warning when the stream dropped them, stopped cleanly by signals and
//! by a closed output, and carried through a Redis restart.
//!
//! Profiles and memberships come from `apply` with fixed event times, so entered-at and
//! transition times are exact; the segments are recorded the way a collector does, by a
//! rebuild.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use profile_cache::rebuild::Step;
use profile_cache::testing::{RedisServer, segments};
use profile_cache::{
    Context, Event, EventKind, ProfileId, ProfileUpdate, Purpose, RedisProfiles, Value,
};
use redis::aio::MultiplexedConnection;
use rustix::process::{Pid, Signal, kill_process};
use time::OffsetDateTime;
use time::macros::datetime;
use uuid::Uuid;

const T0: OffsetDateTime = datetime!(2026-11-29 12:00:00 UTC);

const SEGMENTS: &str = r#"
[[segments]]
name = "subscribers"
description = "Gave an email address"
condition = { trait = { name = "email", exists = true } }

[[segments]]
name = "visitors"
condition = { metric = { field = "page_views", at_least = 1 } }
"#;

/// How long a test waits for the binary to print or stop.
const PATIENCE: Duration = Duration::from_secs(15);

fn at(second: i64) -> OffsetDateTime {
    T0 + time::Duration::seconds(second)
}

fn ms(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

fn anon(id: &str) -> ProfileId {
    ProfileId::anonymous(id).unwrap()
}

fn user(id: &str) -> ProfileId {
    ProfileId::user(id).unwrap()
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

/// An `identify` setting string traits.
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
        user_id: profile.as_str().strip_prefix("u:").map(String::from),
        context: Context::default(),
        events,
    }
}

/// A store evaluating [`SEGMENTS`], recorded in `meta:{segments}:definitions` by a rebuild,
/// as a collector starting on this Redis would.
async fn store(redis: &RedisServer) -> RedisProfiles {
    let store = redis.profiles(&segments(SEGMENTS)).await;
    let mut rebuild = store.rebuild();
    while rebuild.step(T0).await.unwrap() != Step::Current {}
    store
}

/// Visitors with traits, in the order they entered `visitors` (one a second) and, for
/// those with an email, `subscribers` (at their identify, 100 s later):
/// - `a:v1`: email and a first name with a comma and quotes,
/// - `u:ada`: email and first name,
/// - `a:v3`: a first name only (in `visitors`, not `subscribers`).
async fn three_visitors(store: &RedisProfiles) {
    let people = [
        (
            anon("v1"),
            vec![("email", "v1@example.com"), ("first_name", "Smith, \"Jo\"")],
        ),
        (
            user("ada"),
            vec![("email", "ada@example.com"), ("first_name", "Ada")],
        ),
        (anon("v3"), vec![("first_name", "Vee")]),
    ];
    for (i, (id, traits)) in people.iter().enumerate() {
        let n = i as u128 * 10;
        let i = i as i64;
        store
            .apply(&[update(id, vec![event(n + 1, EventKind::Page, at(i))])])
            .await
            .unwrap();
        store
            .apply(&[update(id, vec![identify(n + 2, at(100 + i), traits)])])
            .await
            .unwrap();
    }
}

fn profiles(redis: &RedisServer) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_profiles"));
    cmd.arg("--redis-url")
        .arg(redis.url())
        .env_remove("REDIS_URL");
    cmd
}

/// Runs `profiles ARGS` to the end.
fn run(redis: &RedisServer, args: &[&str]) -> Output {
    profiles(redis).args(args).output().expect("run profiles")
}

fn stdout(output: &Output) -> &str {
    std::str::from_utf8(&output.stdout).unwrap()
}

fn stderr(output: &Output) -> &str {
    std::str::from_utf8(&output.stderr).unwrap()
}

fn assert_success(output: &Output) {
    assert!(
        output.status.success(),
        "{:?}: {}",
        output.status,
        stderr(output)
    );
}

// ------------------------------------------------------------------------- get

#[tokio::test]
async fn get_prints_a_profile_found_by_user_anonymous_or_profile_id() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis).await;
    three_visitors(&store).await;

    let output = run(&redis, &["get", "ada"]);
    assert_success(&output);
    let printed: serde_json::Value = serde_json::from_str(stdout(&output)).unwrap();
    let expected = store
        .find("ada", OffsetDateTime::now_utc())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(printed, serde_json::to_value(&expected).unwrap());
    assert_eq!(printed["id"], "u:ada");
    assert_eq!(printed["user_id"], "ada");
    assert_eq!(
        printed["traits"],
        serde_json::json!({"email": "ada@example.com", "first_name": "Ada"})
    );
    assert_eq!(printed["events"], 2);
    assert_eq!(
        printed["segments"],
        serde_json::json!([
            {"name": "subscribers", "entered_at": "2026-11-29T12:01:41Z"},
            {"name": "visitors", "entered_at": "2026-11-29T12:00:01Z"},
        ])
    );
    // Pretty-printed, one trailing newline.
    assert!(stdout(&output).starts_with("{\n  \"id\": \"u:ada\",\n"));
    assert!(stdout(&output).ends_with("}\n"));

    // The same profile as a profile id; an anonymous visitor by its anonymous id and its
    // profile id.
    assert_eq!(run(&redis, &["get", "u:ada"]).stdout, output.stdout);
    let v1 = run(&redis, &["get", "v1"]);
    assert_success(&v1);
    let v1: serde_json::Value = serde_json::from_slice(&v1.stdout).unwrap();
    assert_eq!(v1["id"], "a:v1");
    assert_eq!(v1["traits"]["first_name"], "Smith, \"Jo\"");
    let v1_by_profile_id: serde_json::Value =
        serde_json::from_slice(&run(&redis, &["get", "a:v1"]).stdout).unwrap();
    assert_eq!(v1_by_profile_id, v1);
}

#[tokio::test]
async fn get_of_an_unknown_id_fails() {
    let redis = RedisServer::start().unwrap();
    store(&redis).await;
    let output = run(&redis, &["get", "nobody"]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(stdout(&output), "");
    assert_eq!(
        stderr(&output),
        "error: no profile \"nobody\": looked up as a user id, an anonymous id and a profile id\n"
    );
}

#[test]
fn an_unreachable_redis_is_an_error_naming_the_setting() {
    let port = profile_cache::testing::free_port().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_profiles"))
        .args(["segment", "list"])
        .env("REDIS_URL", format!("redis://127.0.0.1:{port}"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).starts_with(
            "error: connecting to Redis (--redis-url, REDIS_URL): redis unavailable: "
        ),
        "{}",
        stderr(&output)
    );
}

// ------------------------------------------------------------------------ list

#[tokio::test]
async fn segment_list_shows_the_recorded_segments_with_their_sizes() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis).await;
    three_visitors(&store).await;

    let output = run(&redis, &["segment", "list"]);
    assert_success(&output);
    assert_eq!(
        stdout(&output),
        "SEGMENT      MEMBERS\n\
         subscribers        2\n\
         visitors           3\n"
    );
    assert_eq!(stderr(&output), "");

    let output = run(&redis, &["segment", "list", "--json"]);
    assert_success(&output);
    let fingerprints: Vec<String> = segments(SEGMENTS)
        .iter()
        .map(|s| s.fingerprint().unwrap())
        .collect();
    assert_eq!(
        stdout(&output),
        format!(
            "{{\"fingerprint\":\"{}\",\"members\":2,\"name\":\"subscribers\"}}\n\
             {{\"fingerprint\":\"{}\",\"members\":3,\"name\":\"visitors\"}}\n",
            fingerprints[0], fingerprints[1]
        )
    );

    // While a rebuild runs, a note says that the list may lag the configuration.
    let mut conn = redis.connection().await;
    let _: () = redis::cmd("HSET")
        .arg("meta:{segments}:rebuild")
        .arg("target")
        .arg("0")
        .query_async(&mut conn)
        .await
        .unwrap();
    let output = run(&redis, &["segment", "list"]);
    assert_success(&output);
    assert!(
        stderr(&output).starts_with("note: a rebuild of the segment memberships is running"),
        "{}",
        stderr(&output)
    );
}

#[tokio::test]
async fn segment_list_of_a_redis_without_segments_says_so() {
    let redis = RedisServer::start().unwrap();
    let output = run(&redis, &["segment", "list"]);
    assert_success(&output);
    assert_eq!(stdout(&output), "");
    assert_eq!(
        stderr(&output),
        "note: no segments are recorded in this Redis (meta:{segments}:definitions is empty): \
         no collector with segments has finished a rebuild against it\n"
    );
    // A reader writes nothing, not even the schema version a collector would.
    let mut conn = redis.connection().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys, Vec::<String>::new());
}

// ---------------------------------------------------------------------- export

#[tokio::test]
async fn export_csv_puts_the_email_column_first_and_quotes_values() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis).await;
    three_visitors(&store).await;

    let output = run(
        &redis,
        &[
            "segment",
            "export",
            "visitors",
            "--format",
            "csv",
            "--traits",
            "first_name,email",
        ],
    );
    assert_success(&output);
    assert_eq!(
        stdout(&output),
        "Email Address,first_name\r\n\
         v1@example.com,\"Smith, \"\"Jo\"\"\"\r\n\
         ada@example.com,Ada\r\n\
         ,Vee\r\n"
    );
    assert_eq!(stderr(&output), "exported 3 members of segment visitors\n");

    // Members without an email left out on request, under another header.
    let output = run(
        &redis,
        &[
            "segment",
            "export",
            "visitors",
            "--traits",
            "email",
            "--skip-incomplete",
            "--email-header",
            "email",
        ],
    );
    assert_success(&output);
    assert_eq!(
        stdout(&output),
        "email\r\nv1@example.com\r\nada@example.com\r\n"
    );
    assert_eq!(
        stderr(&output),
        "exported 2 members of segment visitors; left out 1 lacking a trait (--skip-incomplete)\n"
    );
}

#[tokio::test]
async fn export_jsonl_prints_one_member_per_line() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis).await;
    three_visitors(&store).await;

    let output = run(
        &redis,
        &[
            "segment",
            "export",
            "subscribers",
            "--format",
            "jsonl",
            "--traits",
            "email,first_name,plan",
        ],
    );
    assert_success(&output);
    assert_eq!(
        stdout(&output),
        format!(
            "{{\"id\":\"a:v1\",\"entered_at\":\"2026-11-29T12:01:40Z\",\"entered_at_ms\":{},\
             \"traits\":{{\"email\":\"v1@example.com\",\"first_name\":\"Smith, \\\"Jo\\\"\"}}}}\n\
             {{\"id\":\"u:ada\",\"entered_at\":\"2026-11-29T12:01:41Z\",\"entered_at_ms\":{},\
             \"traits\":{{\"email\":\"ada@example.com\",\"first_name\":\"Ada\"}}}}\n",
            ms(at(100)),
            ms(at(101))
        )
    );
    assert_eq!(
        stderr(&output),
        "exported 2 members of segment subscribers\n"
    );
}

#[tokio::test]
async fn export_walks_every_page_of_a_segment_larger_than_one() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis).await;
    // 11 visitors; 4 of them enter at the same millisecond, so pages end inside a tie.
    let mut expected = Vec::new();
    for i in 0..11_i64 {
        let second = if (3..7).contains(&i) { 3 } else { i };
        let id = anon(&format!("p{i:02}"));
        store
            .apply(&[update(
                &id,
                vec![
                    event(i as u128 * 2 + 1, EventKind::Page, at(second)),
                    identify(
                        i as u128 * 2 + 2,
                        at(second),
                        &[("email", &format!("p{i:02}@example.com"))],
                    ),
                ],
            )])
            .await
            .unwrap();
        expected.push(format!("p{i:02}@example.com\r\n"));
    }
    let output = run(
        &redis,
        &["segment", "export", "visitors", "--page-size", "2"],
    );
    assert_success(&output);
    assert_eq!(
        stdout(&output),
        format!("Email Address\r\n{}", expected.concat())
    );
    assert_eq!(stderr(&output), "exported 11 members of segment visitors\n");
}

#[tokio::test]
async fn export_leaves_out_a_member_whose_profile_is_gone() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis).await;
    three_visitors(&store).await;
    // The profile of u:ada deleted (an erasure) after its membership was read: its member
    // entry is still there.
    let mut conn = redis.connection().await;
    let _: () = redis::cmd("DEL")
        .arg("profile:{u:ada}")
        .arg("profile:{u:ada}:traits")
        .query_async(&mut conn)
        .await
        .unwrap();
    let output = run(
        &redis,
        &[
            "segment", "export", "visitors", "--format", "jsonl", "--traits", "email",
        ],
    );
    assert_success(&output);
    let ids: Vec<String> = stdout(&output)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].to_string())
        .collect();
    assert_eq!(ids, ["\"a:v1\"", "\"a:v3\""]);
    assert_eq!(
        stderr(&output),
        "exported 2 members of segment visitors; left out 1 whose profile was deleted meanwhile\n"
    );
}

#[tokio::test]
async fn export_of_an_unknown_segment_fails_naming_the_known_ones() {
    let redis = RedisServer::start().unwrap();
    store(&redis).await;
    let output = run(&redis, &["segment", "export", "subscriber"]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(stdout(&output), "");
    assert_eq!(
        stderr(&output),
        "error: unknown segment \"subscriber\"; the segments are: subscribers, visitors\n"
    );
}

#[tokio::test]
async fn export_to_a_reader_that_went_away_stops_quietly() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis).await;
    three_visitors(&store).await;
    let mut child = profiles(&redis)
        .args(["segment", "export", "visitors", "--page-size", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // As `| head -0` would: the reader is gone before the first row.
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(stderr(&output), "");
}

// ----------------------------------------------------------------------- watch

/// A running `profiles watch`, killed on drop if still running.
struct Watch {
    child: Child,
}

impl Watch {
    fn start(redis: &RedisServer, args: &[&str]) -> (Self, Option<ChildStdout>) {
        let mut child = profiles(redis)
            .arg("watch")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start profiles watch");
        let stdout = child.stdout.take();
        (Self { child }, stdout)
    }

    fn signal(&self, signal: Signal) {
        let pid = Pid::from_child(&self.child);
        kill_process(pid, signal).expect("signal profiles watch");
    }

    /// Waits for the process to end, and gives its status code and standard error.
    fn wait(mut self) -> (Option<i32>, String) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                std::io::Read::read_to_string(self.child.stderr.as_mut().unwrap(), &mut err)
                    .unwrap();
                return (status.code(), err);
            }
            assert!(Instant::now() < deadline, "profiles watch did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The lines a process prints, read on a thread of their own.
struct Lines(mpsc::Receiver<String>);

impl Lines {
    fn new(stdout: ChildStdout) -> Self {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self(rx)
    }

    fn next(&self) -> String {
        self.0
            .recv_timeout(PATIENCE)
            .expect("profiles watch printed a line")
    }

    fn take(&self, n: usize) -> Vec<String> {
        (0..n).map(|_| self.next()).collect()
    }
}

/// The entries of `stream:transitions` after id `after` (exclusive; `-` for all), as
/// `profiles watch` prints them.
async fn expected_lines(conn: &mut MultiplexedConnection, after: &str) -> Vec<String> {
    let start = if after == "-" {
        "-".to_string()
    } else {
        format!("({after}")
    };
    let entries: Vec<(String, BTreeMap<String, String>)> = redis::cmd("XRANGE")
        .arg("stream:transitions")
        .arg(start)
        .arg("+")
        .query_async(conn)
        .await
        .unwrap();
    entries
        .into_iter()
        .map(|(id, f)| {
            let at_ms: i64 = f["at"].parse().unwrap();
            let at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(at_ms) * 1_000_000)
                .unwrap()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap();
            format!(
                r#"{{"id":"{id}","profile":"{}","segment":"{}","change":"{}","at":"{at}","at_ms":{at_ms},"reason":"{}"}}"#,
                f["profile"], f["segment"], f["change"], f["reason"]
            )
        })
        .collect()
}

/// The ids of the entries group `group` delivered and nobody acknowledged yet; `None`
/// while the group does not exist.
async fn pending(conn: &mut MultiplexedConnection, group: &str) -> Option<Vec<String>> {
    let reply: redis::RedisResult<Vec<(String, String, u64, u64)>> = redis::cmd("XPENDING")
        .arg("stream:transitions")
        .arg(group)
        .arg("-")
        .arg("+")
        .arg(100_000)
        .query_async(conn)
        .await;
    reply
        .ok()
        .map(|entries| entries.into_iter().map(|(id, ..)| id).collect())
}

/// Waits until `done` holds for what [`pending`] answers.
async fn wait_pending(
    conn: &mut MultiplexedConnection,
    group: &str,
    done: impl Fn(&Option<Vec<String>>) -> bool,
) -> Option<Vec<String>> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let now = pending(conn, group).await;
        if done(&now) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "pending entries of {group}: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn watch_prints_transitions_and_acknowledges_them() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis).await;
    let mut conn = redis.connection().await;
    // Before the group exists: not printed (a new group starts at new entries).
    store
        .apply(&[update(
            &anon("early"),
            vec![event(1, EventKind::Page, at(0))],
        )])
        .await
        .unwrap();

    let (watch, out) = Watch::start(&redis, &["--group", "esp", "--consumer", "w1"]);
    let lines = Lines::new(out.unwrap());
    wait_pending(&mut conn, "esp", Option::is_some).await;
    let before = expected_lines(&mut conn, "-").await;
    let last_old = serde_json::from_str::<serde_json::Value>(&before[0]).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    three_visitors(&store).await;
    let expected = expected_lines(&mut conn, &last_old).await;
    assert_eq!(
        expected.len(),
        5,
        "3 visitors entries and 2 subscribers entries"
    );
    assert_eq!(lines.take(5), expected);
    assert!(expected[0].contains(r#""profile":"a:v1","segment":"visitors","change":"enter","at":"2026-11-29T12:00:00Z","at_ms":1795953600000,"reason":"event"}"#), "{}", expected[0]);
    wait_pending(&mut conn, "esp", |p| p.as_deref() == Some(&[])).await;
    watch.signal(Signal::INT);
    assert_eq!(watch.wait(), (Some(0), String::new()));

    // The same group again: nothing already acknowledged, only what comes next.
    let (watch, out) = Watch::start(&redis, &["--group", "esp", "--consumer", "w1"]);
    let lines = Lines::new(out.unwrap());
    let last = serde_json::from_str::<serde_json::Value>(expected.last().unwrap()).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    store
        .apply(&[update(
            &anon("v3"),
            vec![identify(99, at(300), &[("email", "v3@example.com")])],
        )])
        .await
        .unwrap();
    let next = expected_lines(&mut conn, &last).await;
    assert_eq!(next.len(), 1);
    assert!(next[0].contains(r#""profile":"a:v3","segment":"subscribers","change":"enter""#));
    assert_eq!(lines.next(), next[0]);
    wait_pending(&mut conn, "esp", |p| p.as_deref() == Some(&[])).await;
    watch.signal(Signal::TERM);
    assert_eq!(watch.wait(), (Some(0), String::new()));
}

#[tokio::test]
async fn watch_prints_again_first_what_a_killed_run_did_not_acknowledge() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis).await;
    let mut conn = redis.connection().await;
    // 1,000 transitions: far more than a pipe holds (64 KiB), so a run whose output is not
    // read blocks in the middle of writing a batch, which it has not acknowledged.
    let updates: Vec<ProfileUpdate> = (0..1_000)
        .map(|i| {
            update(
                &anon(&format!("visitor-{i:04}")),
                vec![event(i, EventKind::Page, at(0))],
            )
        })
        .collect();
    for chunk in updates.chunks(100) {
        store.apply(chunk).await.unwrap();
    }
    let all = expected_lines(&mut conn, "-").await;
    assert_eq!(all.len(), 1_000);

    let (watch, _unread) = Watch::start(
        &redis,
        &["--group", "esp", "--consumer", "w1", "--from-start"],
    );
    // Stuck writing: entries pending, and no more read for a while.
    let mut stuck = Vec::new();
    loop {
        let now = wait_pending(&mut conn, "esp", |p| {
            p.as_ref().is_some_and(|p| !p.is_empty())
        })
        .await
        .unwrap();
        if now == stuck {
            break;
        }
        stuck = now;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Killed as a crash would: no chance to acknowledge.
    drop(watch);
    let unacknowledged = pending(&mut conn, "esp").await.unwrap();
    assert!(!unacknowledged.is_empty());
    let first_unacknowledged = all
        .iter()
        .position(|line| line.contains(&format!("\"id\":\"{}\"", unacknowledged[0])))
        .unwrap();

    // The next run under the same name prints them first, then the rest, each once.
    let (watch, out) = Watch::start(&redis, &["--group", "esp", "--consumer", "w1"]);
    let lines = Lines::new(out.unwrap());
    assert_eq!(
        lines.take(all.len() - first_unacknowledged),
        all[first_unacknowledged..]
    );
    wait_pending(&mut conn, "esp", |p| p.as_deref() == Some(&[])).await;
    watch.signal(Signal::TERM);
    let (code, err) = watch.wait();
    assert_eq!(code, Some(0));
    assert_eq!(err, "", "no note without --from-start");
}

#[tokio::test]
async fn watch_stops_cleanly_when_its_reader_goes_away_while_it_waits() {
    let redis = RedisServer::start().unwrap();
    store(&redis).await;
    let mut conn = redis.connection().await;
    let (watch, out) = Watch::start(&redis, &["--group", "esp"]);
    wait_pending(&mut conn, "esp", Option::is_some).await;
    // No transition comes: noticed between two waits for one.
    drop(out);
    assert_eq!(watch.wait(), (Some(0), String::new()));
}

#[tokio::test]
async fn watch_does_not_acknowledge_what_a_closed_output_did_not_take() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis).await;
    let mut conn = redis.connection().await;
    store
        .apply(&[update(&anon("v1"), vec![event(1, EventKind::Page, at(0))])])
        .await
        .unwrap();
    // Its reader is gone before the first batch is written: a broken pipe, a clean stop.
    let (watch, out) = Watch::start(&redis, &["--group", "esp", "--from-start"]);
    drop(out);
    assert_eq!(watch.wait(), (Some(0), String::new()));
    let entries: Vec<(String, BTreeMap<String, String>)> = redis::cmd("XRANGE")
        .arg("stream:transitions")
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(
        pending(&mut conn, "esp").await,
        Some(vec![entries[0].0.clone()])
    );
}

#[tokio::test]
async fn watch_acknowledges_with_a_warning_what_the_stream_dropped_before_it_was_printed() {
    let redis = RedisServer::start().unwrap();
    let store = store(&redis).await;
    let mut conn = redis.connection().await;
    store
        .apply(&[update(&anon("v1"), vec![event(1, EventKind::Page, at(0))])])
        .await
        .unwrap();
    // A consumer w1 read the entry and died; the stream's cap dropped it since.
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg("stream:transitions")
        .arg("esp")
        .arg("0")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("esp")
        .arg("w1")
        .arg("STREAMS")
        .arg("stream:transitions")
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    let dropped = pending(&mut conn, "esp").await.unwrap();
    assert_eq!(dropped.len(), 1);
    let _: u64 = redis::cmd("XTRIM")
        .arg("stream:transitions")
        .arg("MAXLEN")
        .arg(0)
        .query_async(&mut conn)
        .await
        .unwrap();
    store
        .apply(&[update(&anon("v2"), vec![event(2, EventKind::Page, at(1))])])
        .await
        .unwrap();
    let expected = expected_lines(&mut conn, "-").await;
    assert_eq!(expected.len(), 1);
    assert!(expected[0].contains(r#""profile":"a:v2""#));

    let (watch, out) = Watch::start(&redis, &["--group", "esp", "--consumer", "w1"]);
    let lines = Lines::new(out.unwrap());
    assert_eq!(lines.next(), expected[0]);
    wait_pending(&mut conn, "esp", |p| p.as_deref() == Some(&[])).await;
    watch.signal(Signal::TERM);
    assert_eq!(
        watch.wait(),
        (
            Some(0),
            format!(
                "warning: 1 entry read earlier but not acknowledged left the stream (its length \
                 cap) before it could be printed again: {}\n",
                dropped[0]
            )
        )
    );
}

#[tokio::test]
async fn watch_waits_out_a_redis_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = profile_cache::testing::free_port().unwrap();
    let redis = RedisServer::start_with_dir(dir.path(), port).unwrap();
    store(&redis).await;
    let mut conn = redis.connection().await;
    let (watch, out) = Watch::start(&redis, &["--group", "esp"]);
    let lines = Lines::new(out.unwrap());
    wait_pending(&mut conn, "esp", Option::is_some).await;
    drop(conn);
    // Stopped (its data written) while the watcher waits for entries, then started again.
    drop(redis);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let redis = RedisServer::start_with_dir(dir.path(), port).unwrap();
    let store = store(&redis).await;
    let mut conn = redis.connection().await;
    store
        .apply(&[update(&anon("v1"), vec![event(1, EventKind::Page, at(0))])])
        .await
        .unwrap();
    let expected = expected_lines(&mut conn, "-").await;
    assert_eq!(expected.len(), 1);
    assert_eq!(lines.next(), expected[0]);
    wait_pending(&mut conn, "esp", |p| p.as_deref() == Some(&[])).await;
    watch.signal(Signal::TERM);
    let (code, err) = watch.wait();
    assert_eq!(code, Some(0));
    assert!(
        err.starts_with("warning: Redis does not answer (")
            && err.ends_with("); trying again every second\nnote: Redis answers again\n"),
        "{err}"
    );
}
