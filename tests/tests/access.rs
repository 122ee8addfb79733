//! End-to-end access control: the real collector binary with hashed, scoped API tokens (the
//! hashes printed by its own `hash-token` command), a private redis-server holding the
//! audit stream, the per-client rate limit on the socket's address, and the refusal of a
//! configuration in the old plain-text token shape.
//!
//! The collector is started here (`Collector`) rather than with `support::Ingest`, because
//! each test writes its own token table and rate limits.

mod support;

use std::io::Write;
use std::process::{Output, Stdio};
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::blocking::Client;
use serde_json::{Value, json};
use support::{Ingest, RedisServer, free_port, ingest_command, now_ms, redis_json};

const WRITE_KEY: &str = "access-key";
const CRM_TOKEN: &str = "crm-token-0123456789";
const ESP_TOKEN: &str = "esp-token-0123456789";

fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// `ingest hash-token` with `token` on stdin.
fn hash_token(token: &str) -> Output {
    let mut child = ingest_command()
        .arg("hash-token")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ingest hash-token");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(token.as_bytes()).unwrap();
    drop(stdin);
    child.wait_with_output().unwrap()
}

fn sha256_of(token: &str) -> String {
    let out = hash_token(&format!("{token}\n"));
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A collector started from `toml` (listen address added); killed on drop.
struct Collector(Ingest);

impl Collector {
    fn start(toml: &str) -> Collector {
        let port = free_port();
        Collector(Ingest::start_config(
            port,
            &format!("listen = \"127.0.0.1:{port}\"\n{toml}"),
        ))
    }

    fn url(&self, path: &str) -> String {
        self.0.url(path)
    }
}

fn batch(n: u8) -> Vec<u8> {
    wire::encode(&wire::Batch {
        write_key: WRITE_KEY.into(),
        sent_at_ms: now_ms(),
        consent: 0b0011,
        context: wire::Context {
            anonymous_id: Some("anon-1".into()),
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

fn read(collector: &Collector, path: &str, token: &str) -> (StatusCode, Value) {
    let res = client()
        .get(collector.url(path))
        .bearer_auth(token)
        .send()
        .unwrap();
    (res.status(), res.json().unwrap_or(Value::Null))
}

#[test]
fn scoped_tokens_audit_and_the_client_rate_limit_work_in_the_real_collector() {
    let redis = RedisServer::start().unwrap();
    let collector = Collector::start(&format!(
        r#"
redis_url = "{}"
shutdown_timeout = "5s"

[rate_limits]
client_ip = {{ per_second = 1, burst = 3 }}

[[api_tokens]]
name = "crm"
sha256 = "{}"
scopes = ["profiles:read"]

[[api_tokens]]
name = "esp"
sha256 = "{}"
scopes = ["segments:read"]

[[write_keys]]
key = "{WRITE_KEY}"
"#,
        redis.url(),
        sha256_of(CRM_TOKEN),
        sha256_of(ESP_TOKEN),
    ));

    // The per-client limit sees the socket's address: a burst of three batches, then one
    // per second. Of 20 batches sent as fast as possible (well under 17 s), some get 429.
    let mut accepted = 0;
    let limited = (1..=20).find_map(|n| {
        let res = client()
            .post(collector.url("/v1/fb"))
            .body(batch(n))
            .send()
            .unwrap();
        if res.status() == StatusCode::TOO_MANY_REQUESTS {
            Some(res)
        } else {
            assert_eq!(res.status(), StatusCode::OK);
            accepted += 1;
            None
        }
    });
    let limited = limited.expect("a batch over the per-client rate");
    assert!(accepted >= 3, "{accepted}");
    assert_eq!(limited.headers()["retry-after"], "1");
    let body: Value = limited.json().unwrap();
    assert_eq!(
        body,
        json!({"error": "rate_limited",
               "message": "too many requests for this client address: limit 1 per second, bursts of 3; retry in 1s",
               "rate_limit": "client_ip", "limit": 1})
    );

    let before = now_ms();
    let (status, body) = read(&collector, "/v1/profiles/anon-1", ESP_TOKEN);
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        body,
        json!({"error": "insufficient_scope", "message": "this token lacks the scope profiles:read",
               "scope": "profiles:read"})
    );
    let (status, body) = read(&collector, "/v1/profiles/anon-1", CRM_TOKEN);
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["id"], "a:anon-1");
    let (status, _) = read(&collector, "/v1/profiles/nobody", CRM_TOKEN);
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = read(&collector, "/v1/profiles/anon-1", "not-a-configured-token");
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"], "invalid_token");
    let (status, _) = read(&collector, "/v1/segments", ESP_TOKEN);
    assert_eq!(status, StatusCode::OK);
    let (status, body) = read(&collector, "/v1/segments", CRM_TOKEN);
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body["scope"], "segments:read");
    let after = now_ms();

    // The audit stream in Redis: one entry per profile access, the ids hashed.
    let entries = redis_json(
        redis.port(),
        "local out = {} \
         for _, e in ipairs(redis.call('XRANGE', 'stream:audit', '-', '+')) do \
           local f = {} \
           for i = 1, #e[2], 2 do f[e[2][i]] = e[2][i + 1] end \
           table.insert(out, f) \
         end \
         return cjson.encode(out)",
    );
    let entries = entries.as_array().expect("an array of entries").clone();
    let ats: Vec<i64> = entries
        .iter()
        .map(|e| e["at"].as_str().unwrap().parse().unwrap())
        .collect();
    assert!(
        ats.iter().all(|at| (before..=after).contains(at)),
        "{ats:?}"
    );
    let without_at: Vec<Value> = entries
        .into_iter()
        .map(|mut e| {
            e.as_object_mut().unwrap().remove("at");
            e
        })
        .collect();
    // `printf %s anon-1 | sha256sum`, `printf %s nobody | sha256sum`
    let anon_1 = "2e96105c29d2c92c48ffb367fa6e4b40db08207d649bcf83aa1cec30532a1e17";
    let nobody = "6382b3cc881412b77bfcaeed026001c00d9e3025e66c20f6e7e92f079851462a";
    assert_eq!(
        without_at,
        [
            json!({"actor": "esp", "operation": "profile_read", "subject": anon_1, "result": "forbidden"}),
            json!({"actor": "crm", "operation": "profile_read", "subject": anon_1, "result": "ok"}),
            json!({"actor": "crm", "operation": "profile_read", "subject": nobody, "result": "not_found"}),
        ]
    );
}

#[test]
fn a_config_with_plain_text_tokens_does_not_start_and_says_what_to_write() {
    let mut config = tempfile::NamedTempFile::new().unwrap();
    write!(
        config,
        "listen = \"127.0.0.1:{}\"\napi_tokens = [\"e2e-reader-token\"]\n",
        free_port()
    )
    .unwrap();
    let out: Output = ingest_command()
        .arg("--config")
        .arg(config.path())
        .env("RUST_LOG", "warn")
        .output()
        .expect("run ingest");
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains(&format!(
            "error: configuration: api_tokens in {}: plain-text tokens are no longer accepted; list each token as a table",
            config.path().display()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("[[api_tokens]]"), "{stderr}");
    assert!(
        stderr.contains("`ingest hash-token < token-file`"),
        "{stderr}"
    );
}

#[test]
fn hash_token_refuses_a_token_too_short_to_be_secret() {
    let out = hash_token("abc\n");
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert_eq!(
        String::from_utf8(out.stderr).unwrap(),
        "error: the token is 3 characters, at least 8 are needed; make one with e.g. `openssl rand -hex 32`\n"
    );
    // The same token with or without a final newline hashes alike.
    assert_eq!(sha256_of(CRM_TOKEN), {
        let out = hash_token(CRM_TOKEN);
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    });
}
