//! Browser end-to-end tests: the real collector (demo mode, serving `www/`) and a private
//! Redis, driven by headless Chromium through the Node tests in `tests/browser/`.

mod support;

use std::path::PathBuf;
use std::process::Command;

use support::{Ingest, RedisServer};

const CHROMIUM_INSTALL: &str = "sudo apt-get install -y chromium chromium-driver";

#[test]
fn browser_suite_passes_against_the_real_collector() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let suite = root.join("tests/browser");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "{chromium} not found; install it with: {CHROMIUM_INSTALL}"
    );
    assert!(
        suite.join("node_modules/playwright-core").exists(),
        "playwright-core is not installed: run `cargo xtask test` (it runs `npm ci` in tests/browser)"
    );
    let redis = RedisServer::start().unwrap();
    let www = root.join("www").canonicalize().unwrap();
    let ingest = Ingest::start_with(
        &redis.url(),
        &format!("demo = true\nwww_dir = {:?}\n", www.display().to_string()),
    );
    let status = Command::new("node")
        .args(["--test", "--test-concurrency=1"])
        .current_dir(&suite)
        .env("BASE_URL", ingest.url(""))
        .env("API_TOKEN", "demo-secret")
        .env("CHROMIUM", &chromium)
        .status()
        .expect("node runs (install Node.js 20 or later)");
    assert!(status.success(), "browser tests failed ({status})");
}
