//! The real Segment client libraries against the real collector and a private redis-server:
//! `@segment/analytics-node` (tests/segment-node) and `segment-analytics-python`
//! (tests/segment-python) send identify, page, commerce events, alias, group and a track
//! with a consent context; the profiles are then read back through the API.
//!
//! `cargo xtask test` installs both (`npm ci`, a virtualenv under `target/`); run alone,
//! these tests stop with the command that installs what is missing.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{Ingest, RedisServer, TOKEN, WRITE_KEY};

/// The source's lawful basis for messages without a consent context, and the category
/// the clients send for marketing.
const SOURCE: &str = r#"
[sources.e2e-key]
default_purposes = ["necessary", "analytics"]
consent_categories = { Advertising = "marketing" }
"#;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// How `cargo xtask test` installs the Node client, for a run without it.
const NODE_SETUP: &str = "cd tests/segment-node && npm ci";
/// How `cargo xtask test` installs the Python client, for a run without it.
const PYTHON_SETUP: &str = "python3 -m venv target/segment-python && target/segment-python/bin/pip install -r tests/segment-python/requirements.txt";

fn require(program: &str, install: &str) {
    let found = Command::new(program).arg("--version").output().is_ok();
    assert!(found, "{program} not found: install it with `{install}`");
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("start the client");
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn profile(ingest: &Ingest, id: &str) -> Value {
    let res = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
        .get(ingest.url(&format!("/v1/profiles/{id}")))
        .bearer_auth(TOKEN)
        .send()
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK, "profile {id}");
    res.json().unwrap()
}

/// The fields of a profile that do not depend on when the test ran.
fn stable(p: &Value) -> Value {
    let keep = [
        "id",
        "user_id",
        "anonymous_ids",
        "traits",
        "events",
        "page_views",
        "orders",
        "revenue",
        "event_counts",
        "categories_viewed",
        "categories_bought",
        "cart",
    ];
    let mut out = serde_json::Map::new();
    for k in keep {
        out.insert(k.into(), p[k].clone());
    }
    let viewed: Vec<Value> = p["recently_viewed"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| v["product_id"].clone())
        .collect();
    out.insert("recently_viewed".into(), viewed.into());
    Value::Object(out)
}

#[test]
fn analytics_node_calls_become_exact_profiles() {
    require("node", "sudo apt-get install -y nodejs npm");
    let suite = root().join("tests/segment-node");
    assert!(
        suite.join("node_modules/@segment/analytics-node").exists(),
        "@segment/analytics-node is not installed: run `cargo xtask test` or `{NODE_SETUP}`"
    );
    let redis = RedisServer::start().unwrap();
    let ingest = Ingest::start_with(&redis.url(), SOURCE);
    run(Command::new("node")
        .arg(suite.join("send.mjs"))
        .arg(ingest.url(""))
        .arg(WRITE_KEY));
    let p = profile(&ingest, "node-ada");
    assert_eq!(
        stable(&p),
        json!({
            "id": "u:node-ada",
            "user_id": "node-ada",
            // node-v2 through the alias.
            "anonymous_ids": ["node-v1", "node-v2"],
            // The group's id and traits are traits.
            "traits": {"email": "ada@example.com", "plan": "pro", "group_id": "acme", "group.name": "Acme Ltd"},
            // "Newsletter Signup" had analytics refused in its consent context.
            "events": 8,
            "page_views": 2,
            "orders": 1,
            // 39.98 EUR.
            "revenue": 3998,
            "event_counts": {"alias": 1, "cart_add": 1, "identify": 2, "order_completed": 1, "page": 2, "product_viewed": 1},
            "categories_viewed": [["shoes", 1]],
            "categories_bought": [["shoes", 2]],
            // The order emptied the cart.
            "cart": [],
            "recently_viewed": ["sku-1"],
        }),
        "{p:#}"
    );
    // The aliased visitor's profile was merged into the user's.
    assert_eq!(profile(&ingest, "node-v2")["id"], "u:node-ada");
}

#[test]
fn analytics_python_calls_become_exact_profiles() {
    require("python3", "sudo apt-get install -y python3 python3-venv");
    // `cargo xtask test` names the virtualenv it installed into.
    let python = std::env::var_os("SEGMENT_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/segment-python/bin/python"));
    assert!(
        python.exists(),
        "segment-analytics-python is not installed: run `cargo xtask test` or `{PYTHON_SETUP}`"
    );
    let redis = RedisServer::start().unwrap();
    let ingest = Ingest::start_with(&redis.url(), SOURCE);
    run(Command::new(&python)
        .arg(root().join("tests/segment-python/send.py"))
        .arg(ingest.url(""))
        .arg(WRITE_KEY));
    let p = profile(&ingest, "py-bo");
    assert_eq!(
        stable(&p),
        json!({
            "id": "u:py-bo",
            "user_id": "py-bo",
            "anonymous_ids": ["py-v1", "py-v2"],
            "traits": {"email": "bo@example.com", "plan": "free", "group_id": "initech", "group.name": "Initech"},
            // "Newsletter Signup" granted analytics and, as "Advertising", marketing.
            "events": 9,
            "page_views": 2,
            "orders": 1,
            // total 16.50 USD, without a revenue.
            "revenue": 1650,
            "event_counts": {"Newsletter Signup": 1, "alias": 1, "cart_add": 1, "identify": 2, "order_completed": 1, "page": 2, "product_viewed": 1},
            "categories_viewed": [["hats", 1]],
            "categories_bought": [["hats", 3]],
            "cart": [],
            "recently_viewed": ["sku-2"],
        }),
        "{p:#}"
    );
    assert_eq!(profile(&ingest, "py-v2")["id"], "u:py-bo");
}
