//! End-to-end privacy rights: the real collector binary and a private redis-server. A
//! visitor browses, logs in (their history merges into the user profile), is exported by an
//! anonymous id and erased by the user id; a scan of the whole Redis then finds nothing of
//! them but hashed suppression keys, and late batches under either id are rejected as
//! `suppressed`, also after the collector restarts.
//!
//! `support::Ingest` writes `api_tokens` in the old shape, so this file starts the collector
//! itself (`Collector`, as in `access.rs`) with the helpers of `support` that still apply.

mod support;

use std::time::Duration;

use profile_cache::privacy::hash_id;
use reqwest::StatusCode;
use reqwest::blocking::Client;
use serde_json::{Value, json};
use support::{Ingest, RedisServer, free_port, now_ms, redis_json};

const WRITE_KEY: &str = "privacy-key";
const DPO_TOKEN: &str = "dpo-token-0123456789";
const CRM_TOKEN: &str = "crm-token-0123456789";
const USER: &str = "ada-e2e-51f0";
const PHONE: &str = "phone-e2e-8c2d";
const EMAIL: &str = "ada.e2e@example.com";

fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
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

    fn send(&self, batch: &wire::Batch) -> (StatusCode, Value) {
        let res = client()
            .post(self.url("/v1/fb"))
            .body(wire::encode(batch))
            .send()
            .unwrap();
        (res.status(), res.json().unwrap_or(Value::Null))
    }

    fn call(&self, method: reqwest::Method, path: &str, token: &str) -> (StatusCode, Value) {
        let res = client()
            .request(method, self.url(path))
            .bearer_auth(token)
            .send()
            .unwrap();
        (res.status(), res.json().unwrap_or(Value::Null))
    }
}

fn config(redis_url: &str) -> String {
    format!(
        r#"
redis_url = "{redis_url}"
shutdown_timeout = "5s"

[[api_tokens]]
name = "dpo"
sha256 = "{}"
scopes = ["privacy:write"]

[[api_tokens]]
name = "crm"
sha256 = "{}"
scopes = ["profiles:read"]

[[write_keys]]
key = "{WRITE_KEY}"

[[segments]]
name = "visitors"
condition = {{ metric = {{ field = "page_views", at_least = 1 }} }}
"#,
        hash_id(DPO_TOKEN),
        hash_id(CRM_TOKEN),
    )
}

/// A batch from the phone, after login when `user` is given; events numbered from `first`.
fn batch(user: Option<&str>, first: u8, kinds: &[wire::EventKind]) -> wire::Batch {
    wire::Batch {
        write_key: WRITE_KEY.into(),
        sent_at_ms: now_ms(),
        consent: 0b0011,
        context: wire::Context {
            anonymous_id: Some(PHONE.into()),
            user_id: user.map(String::from),
            session_id: Some("s-1".into()),
            ..Default::default()
        },
        events: kinds
            .iter()
            .zip(first..)
            .map(|(kind, n)| {
                let mut e = wire::Event {
                    message_id: [n; 16],
                    timestamp_ms: now_ms(),
                    kind: *kind,
                    purpose: wire::Purpose::Analytics,
                    ..Default::default()
                };
                if *kind == wire::EventKind::Identify {
                    e.user_id = user.map(String::from);
                    e.properties = vec![wire::Property {
                        key: "email".into(),
                        value: wire::Value::String(EMAIL.into()),
                    }];
                }
                e
            })
            .collect(),
    }
}

/// Everything in the whole Redis (a `SCAN 0 MATCH *` walk, then every key read by its
/// type, streams with `XRANGE`) that contains one of the person's ids or their email:
/// `key: what`.
fn traces(redis: &RedisServer) -> Vec<String> {
    let script = format!(
        r#"
local needles = {{ '{USER}', '{PHONE}', '{EMAIL}' }}
local found = {{}}
local function check(key, text)
  for _, n in ipairs(needles) do
    if string.find(text, n, 1, true) then
      table.insert(found, key .. ': ' .. text)
      return
    end
  end
end
local cursor = '0'
repeat
  local page = redis.call('SCAN', cursor, 'MATCH', '*', 'COUNT', 1000)
  cursor = page[1]
  for _, key in ipairs(page[2]) do
    check(key, key)
    local t = redis.call('TYPE', key)['ok']
    local texts = {{}}
    if t == 'hash' then texts = redis.call('HGETALL', key)
    elseif t == 'set' then texts = redis.call('SMEMBERS', key)
    elseif t == 'zset' then texts = redis.call('ZRANGE', key, 0, -1)
    elseif t == 'string' then texts = {{ redis.call('GET', key) }}
    elseif t == 'list' then texts = redis.call('LRANGE', key, 0, -1)
    elseif t == 'stream' then
      for _, e in ipairs(redis.call('XRANGE', key, '-', '+')) do
        for _, v in ipairs(e[2]) do table.insert(texts, v) end
      end
    end
    for _, text in ipairs(texts) do check(key, text) end
  end
until cursor == '0'
table.sort(found)
if #found == 0 then return '[]' end
return cjson.encode(found)
"#
    );
    redis_json(redis.port(), &script)
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// The suppression keys in Redis, sorted.
fn suppression_keys(redis: &RedisServer) -> Vec<String> {
    let found = redis_json(
        redis.port(),
        "local keys = redis.call('KEYS', 'suppressed:*') table.sort(keys) \
         if #keys == 0 then return '[]' end return cjson.encode(keys)",
    );
    found
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn an_erased_person_leaves_no_trace_and_cannot_come_back() {
    use wire::EventKind::{Identify, Page, ProductViewed};
    let redis = RedisServer::start().unwrap();
    let collector = Collector::start(&config(&redis.url()));

    // Browsing, then logging in on the same phone.
    let (status, body) = collector.send(&batch(None, 1, &[Page, ProductViewed]));
    assert_eq!(
        (status, body),
        (StatusCode::OK, json!({"accepted": 2, "rejected": []}))
    );
    let (status, body) = collector.send(&batch(Some(USER), 3, &[Identify, Page]));
    assert_eq!(
        (status, body),
        (StatusCode::OK, json!({"accepted": 2, "rejected": []}))
    );
    assert!(!traces(&redis).is_empty());

    // The export, by the phone's id: the user profile with the phone's history.
    let export_path = format!("/v1/profiles/{PHONE}/export");
    let (status, body) = collector.call(reqwest::Method::GET, &export_path, CRM_TOKEN);
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body["scope"], "privacy:write");
    let (status, export) = collector.call(reqwest::Method::GET, &export_path, DPO_TOKEN);
    assert_eq!(status, StatusCode::OK);
    assert_eq!(export["profile_id"], format!("u:{USER}"));
    assert_eq!(export["user_id"], USER);
    assert_eq!(export["anonymous_ids"], json!([PHONE]));
    assert_eq!(export["profile"]["page_views"], 2);
    assert_eq!(export["profile"]["traits"]["email"], EMAIL);
    let events: Vec<(String, String)> = export["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["fields"]["profile"].as_str().unwrap().to_string(),
                e["fields"]["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let phone = format!("a:{PHONE}");
    let user = format!("u:{USER}");
    assert_eq!(
        events,
        [
            (phone.clone(), "page".to_string()),
            (phone.clone(), "product_viewed".into()),
            (user.clone(), "identify".into()),
            (user.clone(), "page".into()),
        ]
    );
    assert_eq!(
        export["keys"][format!("profile:{{{phone}}}")]["value"]["merged_into"],
        user
    );
    assert_eq!(export["segments"][0]["segment"], "visitors");

    // The erasure, by the user id.
    let delete_path = format!("/v1/profiles/{USER}");
    let (status, body) = collector.call(reqwest::Method::DELETE, &delete_path, CRM_TOKEN);
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body["scope"], "privacy:write");
    let (status, erased) = collector.call(reqwest::Method::DELETE, &delete_path, DPO_TOKEN);
    assert_eq!(status, StatusCode::OK);
    assert_eq!(erased["status"], "erased");
    assert_eq!(erased["profile_id"], user);
    assert_eq!(erased["profiles"], 2);
    assert_eq!(erased["events"], 4);
    assert_eq!(erased["segment_memberships"], 1);
    assert_eq!(traces(&redis), Vec::<String>::new());
    assert_eq!(suppression_keys(&redis).len(), 2);
    let (status, _) = collector.call(reqwest::Method::GET, &export_path, DPO_TOKEN);
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Late events under either id are dropped, and said to be.
    let suppressed = |indices: &[usize]| {
        json!({"accepted": 0, "rejected": indices.iter()
            .map(|i| json!({"index": i, "reason": "suppressed: the person was erased"}))
            .collect::<Vec<_>>()})
    };
    let (status, body) = collector.send(&batch(None, 20, &[Page, Page]));
    assert_eq!((status, body), (StatusCode::OK, suppressed(&[0, 1])));
    let (status, body) = collector.send(&batch(Some(USER), 22, &[Page]));
    assert_eq!((status, body), (StatusCode::OK, suppressed(&[0])));
    assert_eq!(traces(&redis), Vec::<String>::new());

    // The collector restarts: still suppressed; deleting again finds nothing left.
    drop(collector);
    let collector = Collector::start(&config(&redis.url()));
    let (status, body) = collector.send(&batch(Some(USER), 23, &[Page, Identify]));
    assert_eq!((status, body), (StatusCode::OK, suppressed(&[0, 1])));
    let (status, body) = collector.call(reqwest::Method::DELETE, &delete_path, DPO_TOKEN);
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "already_erased");
    let (status, body) = collector.call(
        reqwest::Method::DELETE,
        "/v1/profiles/never-seen-e2e",
        DPO_TOKEN,
    );
    assert_eq!(
        (status, body["error"].clone()),
        (StatusCode::NOT_FOUND, json!("not_found"))
    );
    assert_eq!(traces(&redis), Vec::<String>::new());

    // The audit trail: who exported and erased whom (hashed), with what result.
    let entries = redis_json(
        redis.port(),
        "local out = {} \
         for _, e in ipairs(redis.call('XRANGE', 'stream:audit', '-', '+')) do \
           local f = {} \
           for i = 1, #e[2], 2 do f[e[2][i]] = e[2][i + 1] end \
           f['at'] = nil \
           table.insert(out, f) \
         end \
         return cjson.encode(out)",
    );
    let entry = |actor: &str, operation: &str, id: &str, result: &str| {
        json!({"actor": actor, "operation": operation, "subject": hash_id(id).to_string(),
               "result": result})
    };
    assert_eq!(
        entries,
        json!([
            entry("crm", "profile_export", PHONE, "forbidden"),
            entry("dpo", "profile_export", PHONE, "ok"),
            entry("crm", "profile_delete", USER, "forbidden"),
            entry("dpo", "profile_delete", USER, "ok"),
            entry("dpo", "profile_export", PHONE, "not_found"),
            entry("dpo", "profile_delete", USER, "ok"),
            entry("dpo", "profile_delete", "never-seen-e2e", "not_found"),
        ])
    );
}
