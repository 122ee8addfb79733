//! Configuration: file + environment, demo mode, and errors that name the setting.

use std::io::Write;
use std::time::Duration;

use ingest::Config;
use ingest::auth::{ApiToken, Scope, TokenHash};
use ingest::config::ConfigError;
use ingest::ratelimit::{Rate, RateLimitsConfig};

fn file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn file_values_and_env_overrides_combine() {
    let f = file(
        r#"
listen = "127.0.0.1:9000"
redis_url = "redis://127.0.0.1:7000"
[[api_tokens]]
name = "crm-sync"
sha256 = "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD"
scopes = ["profiles:read", "admin"]
[[write_keys]]
key = "shop"
origins = ["https://shop.example"]
[profiles]
dedupe_window = "2d"
"#,
    );
    let config = Config::load(
        Some(f.path()),
        &env(&[
            ("INGEST_REDIS_URL", "redis://127.0.0.1:7001"),
            ("INGEST_PROFILES__DEDUPE_WINDOW", "3d"),
            ("INGEST_LIMITS__MAX_EVENTS", "50"),
            ("UNRELATED", "x"),
        ]),
    )
    .unwrap();
    assert_eq!(config.listen.port(), 9000);
    assert_eq!(config.redis_url, "redis://127.0.0.1:7001");
    assert_eq!(
        config.profiles.dedupe_window,
        Duration::from_secs(3 * 86_400)
    );
    assert_eq!(config.limits.max_events, 50);
    assert_eq!(config.write_keys[0].origins, ["https://shop.example"]);
    assert_eq!(
        config.api_tokens,
        [ApiToken {
            name: "crm-sync".into(),
            sha256: TokenHash::of("abc"),
            scopes: vec![Scope::ProfilesRead, Scope::Admin],
        }]
    );
}

#[test]
fn demo_mode_adds_credentials_for_loopback_only() {
    let config = Config::load(None, &env(&[("INGEST_DEMO", "true")])).unwrap();
    assert_eq!(config.write_keys[0].key, "demo");
    assert_eq!(
        config.write_keys[0].origins,
        ["http://127.0.0.1:8080", "http://localhost:8080"]
    );
    assert_eq!(
        config.api_tokens,
        [ApiToken {
            name: "demo".into(),
            sha256: TokenHash::of("demo-secret"),
            scopes: vec![Scope::ProfilesRead, Scope::SegmentsRead],
        }]
    );

    let err = Config::load(
        None,
        &env(&[("INGEST_DEMO", "true"), ("INGEST_LISTEN", "0.0.0.0:8080")]),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("listen: 0.0.0.0:8080 is not a loopback address"),
        "{err}"
    );
    // The demo token is refused off loopback even without demo mode.
    let f = file(&format!(
        "listen = \"0.0.0.0:80\"\n[[api_tokens]]\nname = \"mine\"\nsha256 = \"{}\"\nscopes = [\"admin\"]\n",
        TokenHash::of("demo-secret")
    ));
    assert!(matches!(
        Config::load(Some(f.path()), &[]),
        Err(ConfigError::Invalid { field, .. }) if field == "listen"
    ));
}

#[test]
fn errors_name_the_setting() {
    let f = file("[[write_keys]]\nkey = \"shop\"\norigins = [\"shop.example\"]\n");
    let err = Config::load(Some(f.path()), &[]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "write_keys[0].origins[0]: \"shop.example\" is not an origin like https://shop.example or *"
    );

    let f = file("lisen = \"127.0.0.1:1\"\n");
    let err = Config::load(Some(f.path()), &[]).unwrap_err().to_string();
    assert!(err.contains("lisen"), "{err}");

    let err = Config::load(None, &env(&[("INGEST_LISTEN", "not-an-address")]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("listen"), "{err}");

    let f = file("[profiles]\ndedupe_window = \"soon\"\n");
    let err = Config::load(Some(f.path()), &[]).unwrap_err().to_string();
    assert!(err.contains("dedupe_window"), "{err}");

    let missing = std::path::Path::new("/nonexistent/ingest.toml");
    let err = Config::load(Some(missing), &[]).unwrap_err().to_string();
    assert_eq!(err, "config: file /nonexistent/ingest.toml does not exist");
}

#[test]
fn the_shipped_demo_config_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/demo.toml");
    let config = Config::load(Some(std::path::Path::new(path)), &[]).unwrap();
    assert!(config.demo);
    assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
    let segments = config.segments().unwrap();
    assert_eq!(segments.len(), 13);
    assert_eq!(segments[6].name, "cart_abandoners_30m");
}

#[test]
fn segments_come_from_the_config_or_a_file_beside_it() {
    let inline = file(
        r#"
[[segments]]
name = "loyal"
condition = { metric = { field = "orders", at_least = 3 } }
"#,
    );
    let config = Config::load(Some(inline.path()), &[]).unwrap();
    let names: Vec<String> = config
        .segments()
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["loyal"]);

    // A relative segments_file is found next to the config file, wherever the collector runs.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("segments.toml"),
        "[[segments]]\nname = \"new\"\ncondition = { lifecycle = \"new\" }\n",
    )
    .unwrap();
    let config_path = dir.path().join("ingest.toml");
    std::fs::write(
        &config_path,
        "segments_file = \"segments.toml\"\n[profiles.lifecycle]\nnew_for = \"3d\"\n",
    )
    .unwrap();
    let config = Config::load(Some(&config_path), &[]).unwrap();
    let segments = config.segments().unwrap();
    assert_eq!(segments[0].name, "new");
    // Compiled with the configured thresholds: first seen within 3 days.
    assert_eq!(
        serde_json::to_value(&segments[0].condition).unwrap()["of"][1]["ms"],
        3 * 86_400_000_i64
    );
    // An environment variable names a path from the working directory.
    let env_path = dir.path().join("segments.toml").display().to_string();
    let config = Config::load(None, &env(&[("INGEST_SEGMENTS_FILE", &env_path)])).unwrap();
    assert_eq!(config.segments().unwrap().len(), 1);
    let err = Config::load(
        None,
        &env(&[("INGEST_SEGMENTS_FILE", "/nonexistent/s.toml")]),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "segments_file: file /nonexistent/s.toml does not exist"
    );

    std::fs::write(
        &config_path,
        "segments_file = \"segments.toml\"\n[[segments]]\nname = \"x\"\ncondition = { cart = \"empty\" }\n",
    )
    .unwrap();
    let err = Config::load(Some(&config_path), &[]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "segments_file: is set together with segments; define segments in one of them"
    );
}

#[test]
fn every_problem_of_every_segment_is_listed() {
    let f = file(
        r#"
[[segments]]
name = "cart_abandoners"
condition = { all = [
  { cart = "not_empty" },
  { older_than = { field = "cart_updated_at", duration = "30x" } },
] }

[[segments]]
name = "Loyal"
condition = { metric = { field = "orders" } }
"#,
    );
    let err = Config::load(Some(f.path()), &[]).unwrap_err();
    assert!(matches!(err, ConfigError::Segments { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        concat!(
            "segments: 3 problems in the segment definitions:\n",
            r#"  segment "cart_abandoners": condition.all[1].older_than.duration: "30x" is not a duration like "30m", "24h" or "7d": unknown time unit "x", supported units: ns, us/µs, ms, sec, min, hours, days, weeks, months, years (and few variations)"#,
            "\n",
            r#"  segment "Loyal": name: "Loyal" is not a segment name: use 1 to 64 lowercase letters, digits, _ or -, starting with a letter"#,
            "\n",
            r#"  segment "Loyal": condition.metric: needs at_least, at_most or both"#,
        )
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("segments.toml");
    std::fs::write(
        &path,
        "[[segments]]\nname = \"s\"\ncondition = { cart = \"full\" }\n",
    )
    .unwrap();
    let err = Config::load(
        None,
        &env(&[("INGEST_SEGMENTS_FILE", &path.display().to_string())]),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "segments_file {}: 1 problem in the segment definitions:\n  segment \"s\": condition.cart: unknown variant `full`, expected `empty` or `not_empty`",
            path.display()
        )
    );
}

#[test]
fn the_scheduler_runs_by_default_and_its_settings_take_durations() {
    let config = Config::load(None, &[]).unwrap();
    assert!(config.scheduler.enabled);
    assert_eq!(config.scheduler.poll_interval, Duration::from_millis(250));
    assert_eq!(config.scheduler.lease, Duration::from_secs(30));
    assert_eq!(config.scheduler.batch_size, 100);

    let f = file("[scheduler]\npoll_interval = \"50ms\"\nlease = \"1m\"\nbatch_size = 500\n");
    let config = Config::load(
        Some(f.path()),
        &env(&[("INGEST_SCHEDULER__ENABLED", "false")]),
    )
    .unwrap();
    assert!(!config.scheduler.enabled);
    assert_eq!(config.scheduler.poll_interval, Duration::from_millis(50));
    assert_eq!(config.scheduler.lease, Duration::from_secs(60));
    assert_eq!(config.scheduler.batch_size, 500);
}

#[test]
fn scheduler_settings_that_cannot_work_are_refused_by_name() {
    let cases = [
        (
            "[scheduler]\npoll_interval = \"0s\"\n",
            "scheduler.poll_interval: must be at least 1ms",
        ),
        (
            "[scheduler]\nlease = \"2s\"\n",
            "scheduler.lease: 2s must be longer than profiles.redis_timeout (2s), so a claim outlives a slow Redis call",
        ),
        (
            "[scheduler]\nlease = \"1s\"\n[profiles]\nredis_timeout = \"1500ms\"\n",
            "scheduler.lease: 1s must be longer than profiles.redis_timeout (1s 500ms), so a claim outlives a slow Redis call",
        ),
        (
            "[scheduler]\nbatch_size = 0\n",
            "scheduler.batch_size: 0 is not between 1 and 10000",
        ),
        (
            "[scheduler]\nbatch_size = 10001\n",
            "scheduler.batch_size: 10001 is not between 1 and 10000",
        ),
    ];
    for (toml, expected) in cases {
        let f = file(toml);
        let err = Config::load(Some(f.path()), &[]).unwrap_err();
        assert_eq!(err.to_string(), expected, "{toml}");
    }
    let f = file("[scheduler]\nlease_time = \"1m\"\n");
    let err = Config::load(Some(f.path()), &[]).unwrap_err().to_string();
    assert!(err.contains("unknown field: found `lease_time`"), "{err}");
}

#[test]
fn spool_settings_take_sizes_and_must_hold_the_largest_body() {
    let f = file(
        "[spool]\nenabled = true\ndir = \"/var/spool/pz\"\nsegment_size = \"8MiB\"\nmax_size = \"1 GiB\"\nfsync = \"interval\"\nfsync_interval = \"50ms\"\n",
    );
    let config = Config::load(Some(f.path()), &[]).unwrap();
    assert!(config.spool.enabled);
    assert_eq!(config.spool.dir, std::path::Path::new("/var/spool/pz"));
    assert_eq!(config.spool.segment_size.as_u64(), 8 * 1024 * 1024);
    assert_eq!(config.spool.max_size.as_u64(), 1 << 30);
    assert_eq!(config.spool.fsync_interval, Duration::from_millis(50));
    // The default body limit is 512 KiB: a 256 KiB segment cannot hold the largest batch.
    let f = file("[spool]\nenabled = true\nsegment_size = \"256KiB\"\nmax_size = \"1MiB\"\n");
    let err = Config::load(Some(f.path()), &[]).unwrap_err().to_string();
    assert!(
        err.starts_with("spool.segment_size: 256KiB holds batch bodies up to 260996 bytes,")
            && err.ends_with("less than limits.max_body_bytes (524288)"),
        "{err}"
    );
    let f = file("[spool]\nenabled = true\nmax_size = \"64MiB\"\n");
    let err = Config::load(Some(f.path()), &[]).unwrap_err().to_string();
    assert!(err.starts_with("spool.max_size:"), "{err}");
    // Off, its settings are not checked against each other.
    let f = file("[spool]\nsegment_size = \"256KiB\"\n");
    assert!(!Config::load(Some(f.path()), &[]).unwrap().spool.enabled);
}

#[test]
fn plain_text_api_tokens_are_refused_with_the_new_shape_spelled_out() {
    let f = file("api_tokens = [\"reader-token-1\"]\n");
    let err = Config::load(Some(f.path()), &[]).unwrap_err();
    assert!(matches!(err, ConfigError::PlainApiTokens { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            r#"api_tokens in {}: plain-text tokens are no longer accepted; list each token as a table with a name, the SHA-256 of the token and its scopes:

    [[api_tokens]]
    name = "crm-sync"
    sha256 = "<64 hex digits>"
    scopes = ["profiles:read", "segments:read"]

print the sha256 with `ingest hash-token < token-file` (it reads the token from stdin); scopes are profiles:read, segments:read, privacy:write and admin (admin allows everything)"#,
            f.path().display()
        )
    );
    // The same from the environment, which names the variable.
    let err = Config::load(None, &env(&[("INGEST_API_TOKENS", "[\"reader-token-1\"]")]))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("api_tokens in INGEST_API_TOKENS: plain-text tokens"),
        "{err}"
    );
    // An empty list is the new shape too.
    let f = file("api_tokens = []\n");
    assert!(
        Config::load(Some(f.path()), &[])
            .unwrap()
            .api_tokens
            .is_empty()
    );
}

#[test]
fn api_token_entries_that_cannot_work_are_refused_by_name() {
    let hash = |t: &str| TokenHash::of(t).to_string();
    let entry = |name: &str, sha256: &str, scopes: &str| {
        format!("[[api_tokens]]\nname = \"{name}\"\nsha256 = \"{sha256}\"\nscopes = {scopes}\n")
    };
    let cases = [
        (
            entry("crm sync", &hash("token-one"), r#"["admin"]"#),
            r#"api_tokens[0].name: "crm sync" is not 1 to 64 letters, digits, '.', '_' or '-'"#
                .to_string(),
        ),
        (
            entry("a", &hash("token-one"), r#"["admin"]"#)
                + &entry("a", &hash("token-two"), r#"["admin"]"#),
            r#"api_tokens[1].name: "a" is also the name of api_tokens[0]"#.to_string(),
        ),
        (
            entry("a", &hash("token-one"), r#"["admin"]"#)
                + &entry("b", &hash("token-one"), r#"["admin"]"#),
            "api_tokens[1].sha256: is the same token as api_tokens[0]".to_string(),
        ),
        (
            entry("a", &hash("token-one"), "[]"),
            "api_tokens[0].scopes: is empty; give one or more of profiles:read, segments:read, privacy:write, admin"
                .to_string(),
        ),
    ];
    for (toml, expected) in cases {
        let f = file(&toml);
        let err = Config::load(Some(f.path()), &[]).unwrap_err();
        assert_eq!(err.to_string(), expected, "{toml}");
    }
    // Parse errors name the key.
    let f = file(&entry("a", "abc123", r#"["admin"]"#));
    let err = Config::load(Some(f.path()), &[]).unwrap_err().to_string();
    assert!(
        err.starts_with(r#""abc123" is not a SHA-256 (64 hex digits); `ingest hash-token` prints the hash of a token read from stdin for key "default.api_tokens.0.sha256""#),
        "{err}"
    );
    let f = file(&entry("a", &hash("token-one"), r#"["profile:read"]"#));
    let err = Config::load(Some(f.path()), &[]).unwrap_err().to_string();
    assert!(
        err.starts_with("unknown variant: found `profile:read`, expected `one of `profiles:read`, `segments:read`, `privacy:write`, `admin``"),
        "{err}"
    );
}

#[test]
fn rate_limits_default_to_per_key_and_per_token_and_take_a_burst() {
    let config = Config::load(None, &[]).unwrap();
    assert_eq!(
        config.rate_limits,
        RateLimitsConfig {
            write_key: Rate::new(5_000, 0),
            client_ip: Rate::OFF,
            token: Rate::new(100, 0),
        }
    );
    assert!(config.trusted_proxies.is_empty());
    assert_eq!(config.audit.stream_max_len, 1_000_000);
    let f = file(
        r#"
trusted_proxies = ["10.0.0.0/8", "::1"]
[rate_limits]
client_ip = { per_second = 20, burst = 100 }
write_key = { per_second = 300 }
token = { per_second = 0 }
[audit]
stream_max_len = 5000
"#,
    );
    let config = Config::load(Some(f.path()), &[]).unwrap();
    assert_eq!(config.rate_limits.client_ip, Rate::new(20, 100));
    assert_eq!(config.rate_limits.token, Rate::OFF);
    assert_eq!(config.rate_limits.write_key, Rate::new(300, 0));
    assert_eq!(config.rate_limits.write_key.effective_burst(), 300);
    let proxies: Vec<String> = config
        .trusted_proxies
        .iter()
        .map(|p| p.to_string())
        .collect();
    assert_eq!(proxies, ["10.0.0.0/8", "::1/128"]);
    assert_eq!(config.audit.stream_max_len, 5000);

    let f = file("trusted_proxies = [\"lb.internal\"]\n");
    let err = Config::load(Some(f.path()), &[]).unwrap_err().to_string();
    assert!(
        err.starts_with(r#""lb.internal" is not an address or a network such as 10.0.0.0/8 for key "default.trusted_proxies.0""#),
        "{err}"
    );
    let f = file("[audit]\nstream_max_len = 0\n");
    let err = Config::load(Some(f.path()), &[]).unwrap_err().to_string();
    assert_eq!(err, "audit.stream_max_len: must be greater than zero");
}

#[test]
fn sources_and_consent_purposes_are_read_and_checked() {
    let f = file(
        r#"
[[write_keys]]
key = "shop"
[consent]
purposes = { track = "marketing", product_viewed = "personalization" }
[sources.shop]
properties = { deny = ["email", "phone"] }
traits = { allow = ["plan", "first_name"] }
"#,
    );
    let config = Config::load(Some(f.path()), &[]).unwrap();
    use profile_cache::{EventKind, Purpose};
    assert_eq!(
        config.consent.purposes,
        [
            (EventKind::Track, Purpose::Marketing),
            (EventKind::ProductViewed, Purpose::Personalization)
        ]
        .into()
    );
    let shop = &config.sources["shop"];
    assert!(!shop.properties.keeps("email") && shop.properties.keeps("path"));
    assert!(shop.traits.keeps("plan") && !shop.traits.keeps("email"));

    let f =
        file("[[write_keys]]\nkey = \"shop\"\n[sources.blog]\ntraits = { deny = [\"email\"] }\n");
    let err = Config::load(Some(f.path()), &[]).unwrap_err().to_string();
    assert!(
        err.contains("sources.blog") && err.contains("names no configured write key"),
        "{err}"
    );
    let f = file("[consent]\npurposes = { track = \"ads\" }\n");
    let err = Config::load(Some(f.path()), &[]).unwrap_err().to_string();
    assert!(
        err.starts_with("unknown variant: found `ads`, expected `one of `necessary`, `analytics`, `personalization`, `marketing`` for key \"default.consent.purposes.track\""),
        "{err}"
    );
}
