//! `bench`: two benchmarks, each printing its JSON lines and ratios against a baseline
//! measured in the same run.
//!
//! - collector: the release collector on a throwaway Redis under `loadgen`; then the same
//!   events applied by `loadgen --store` (the collector's code and script, no HTTP) and
//!   written by `loadgen --raw-redis` (plain pipelined commands, the baseline) into the
//!   same, flushed Redis.
//! - tracker: the collector in demo mode serving `www/`, and `tests/browser/bench-track.mjs`
//!   timing `pz.track()` in a demo page in headless Chromium against `dataLayer.push()`.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use profile_cache::testing::RedisServer;

use crate::browser;
use crate::build_tracker;
use crate::process::{self, Service};
use crate::tools;
use crate::workspace::Workspace;

/// The write key in the collector bench's config.
const WRITE_KEY: &str = "bench";
/// The API token demo mode adds (the tracker bench reads the profile with it).
const DEMO_API_TOKEN: &str = "demo-secret";
/// How long the collector may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longer than the collector's own shutdown timeout (10 s), so it can finish in-flight work.
const STOP_GRACE: Duration = Duration::from_secs(15);

/// A benchmark that `cargo xtask bench --only` selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Only {
    /// The collector, the store and raw Redis under loadgen.
    Collector,
    /// `pz.track()` in a demo page in headless Chromium, against `dataLayer.push()`.
    Tracker,
}

/// Runs the benchmarks (`only` one of them, if given) and prints their JSON lines and ratios.
/// Redis runs without persistence, or with the configuration file `redis_conf` (its data in a
/// temporary directory). `loadgen_args` go to every loadgen run (loadgen's own defaults suit
/// a 2-core machine).
///
/// # Errors
/// A tool is missing, a build fails, a process fails, loadgen reports errors, or the tracker
/// bench loses an event.
pub fn run(
    only: Option<Only>,
    redis_conf: Option<&Path>,
    loadgen_args: &[OsString],
) -> anyhow::Result<()> {
    let collector = only != Some(Only::Tracker);
    let tracker = only != Some(Only::Collector);
    if !collector && !loadgen_args.is_empty() {
        bail!("arguments after `--` go to loadgen, which `--only tracker` does not run");
    }
    let ws = Workspace::locate()?;
    tools::require_redis_server()?;
    // The tracker's tools and build first: a missing one fails before the long collector run.
    // The demo pages are left alone: their inline snippet only queues calls until pz.js has
    // loaded, and `cargo xtask test` checks that it is current.
    if tracker {
        browser::prepare_if_stale(&ws)?;
        build_tracker::build_files(&ws)?;
    }
    process::run(
        ws.cargo()
            .args(["build", "--release", "-p", "ingest", "--bins"]),
    )?;
    let scratch = tempfile::tempdir().context("creating a temporary directory")?;
    let redis = match redis_conf {
        None => RedisServer::start(),
        Some(conf) => {
            let conf = std::path::absolute(conf)
                .with_context(|| format!("redis configuration {}", conf.display()))?;
            eprintln!("redis-server with {}", conf.display());
            let port = process::free_port()?;
            RedisServer::start_with_config(&conf, &scratch.path().join("redis"), port)
        }
    }
    .context("starting a throwaway redis-server")?;
    let redis_url = redis.url();
    if collector {
        collector_bench(&ws, &redis_url, scratch.path(), loadgen_args)?;
    }
    if tracker {
        flush_all(&redis_url)?;
        tracker_bench(&ws, &redis_url, scratch.path())?;
    }
    drop(redis);
    Ok(())
}

/// The collector, store and raw Redis runs, with the same seed, and their ratios.
fn collector_bench(
    ws: &Workspace,
    redis_url: &str,
    scratch: &Path,
    loadgen_args: &[OsString],
) -> anyhow::Result<()> {
    // All runs send the same events: one seed for all, unless the arguments name one
    // (loadgen lets a later flag override an earlier one).
    let mut args: Vec<OsString> = vec!["--seed".into(), seed().to_string().into()];
    args.extend(loadgen_args.iter().cloned());
    let loadgen_args = &args;
    let loadgen = ws.bin("release", "loadgen");

    let listen = SocketAddr::from(([127, 0, 0, 1], process::free_port()?));
    let mut ingest = start_ingest(
        ws,
        scratch,
        "bench",
        &bench_config(listen, redis_url),
        listen,
    )?;

    eprintln!("\n== collector: loadgen -> ingest -> redis ==");
    let collector = run_loadgen(
        Command::new(&loadgen)
            .arg("--url")
            .arg(format!("http://{listen}/v1/fb"))
            .args(["--write-key", WRITE_KEY])
            .args(loadgen_args),
    );
    let collector = match collector {
        Ok(result) => result,
        Err(err) => return Err(err.context(format!("collector run{}", ingest.log_tail()))),
    };
    // The collector must not compete for the CPU during the baseline.
    stop_ingest(&mut ingest)?;

    flush_all(redis_url)?;
    eprintln!("\n== store: loadgen -> profile-cache script -> redis (no HTTP) ==");
    let store = run_loadgen(
        Command::new(&loadgen)
            .arg("--store")
            .arg(redis_url)
            .args(loadgen_args),
    )
    .context("store run")?;

    flush_all(redis_url)?;
    eprintln!("\n== baseline: loadgen -> redis, plain pipelined commands ==");
    let raw = run_loadgen(
        Command::new(&loadgen)
            .arg("--raw-redis")
            .arg(redis_url)
            .args(loadgen_args),
    )
    .context("raw redis run")?;

    println!("collector: {}", collector.line);
    println!("store:     {}", store.line);
    println!("raw redis: {}", raw.line);
    let ratio = |a: &LoadgenResult, b: &LoadgenResult| {
        format!(
            "{:.0} / {:.0} = {:.2}",
            a.events_per_sec,
            b.events_per_sec,
            a.events_per_sec / b.events_per_sec.max(f64::MIN_POSITIVE)
        )
    };
    println!(
        "collector / raw redis events per second: {}",
        ratio(&collector, &raw)
    );
    println!(
        "store (script) / raw redis events per second: {}",
        ratio(&store, &raw)
    );
    println!(
        "collector / store events per second: {}",
        ratio(&collector, &store)
    );
    Ok(())
}

/// The collector in demo mode serving `www/`, and `bench-track.mjs` against it.
fn tracker_bench(ws: &Workspace, redis_url: &str, scratch: &Path) -> anyhow::Result<()> {
    let node = tools::require("node", browser::NODE_INSTALL)?;
    let listen = SocketAddr::from(([127, 0, 0, 1], process::free_port()?));
    let www = ws.root.join("www");
    let config = demo_config(listen, redis_url, &www);
    let mut ingest = start_ingest(ws, scratch, "demo", &config, listen)?;

    eprintln!("\n== tracker: pz.track() in a demo page in headless Chromium ==");
    let mut cmd = Command::new(node);
    cmd.arg("bench-track.mjs")
        .current_dir(ws.root.join("tests/browser"))
        .env("BASE_URL", format!("http://{listen}"))
        .env("API_TOKEN", DEMO_API_TOKEN);
    if std::env::var_os("CHROMIUM").is_none() {
        cmd.env(
            "CHROMIUM",
            tools::require("chromium", browser::CHROMIUM_INSTALL)?,
        );
    }
    let tracker = match run_json(&mut cmd) {
        Ok(result) => result,
        Err(err) => return Err(err.context(format!("tracker run{}", ingest.log_tail()))),
    };
    stop_ingest(&mut ingest)?;

    let field = |name: &str| -> anyhow::Result<f64> {
        tracker.value[name]
            .as_f64()
            .with_context(|| format!("bench-track's JSON has no {name}"))
    };
    println!("tracker:   {}", tracker.line);
    // track() counts the call and the work it leaves to a timer: both are the page's time.
    println!(
        "track() / dataLayer.push() one call after idle, ms (means of the fastest 95%): {} / {} = {}",
        field("alone_total_mean95_ms")?,
        field("alone_push_mean95_ms")?,
        field("alone_ratio")?
    );
    println!(
        "track() / dataLayer.push() in a burst, ms per call (medians): {} / {} = {}",
        field("burst_total_p50_ms")?,
        field("burst_push_p50_ms")?,
        field("burst_ratio")?
    );
    Ok(())
}

/// Starts the release collector with `config` (written to `{name}.toml` in `dir`, its log to
/// `{name}.log`) and waits until it answers on `listen`.
fn start_ingest(
    ws: &Workspace,
    dir: &Path,
    name: &str,
    config: &str,
    listen: SocketAddr,
) -> anyhow::Result<Service> {
    let config_path = dir.join(format!("{name}.toml"));
    std::fs::write(&config_path, config)
        .with_context(|| format!("writing {}", config_path.display()))?;
    let log_path = dir.join(format!("{name}.log"));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;

    let mut cmd = Command::new(ws.bin("release", "ingest"));
    cmd.arg("--config")
        .arg(&config_path)
        .current_dir(&ws.root)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // The config is the whole configuration: no INGEST_* overrides from the shell.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("INGEST_") {
            cmd.env_remove(key);
        }
    }
    let mut ingest = Service::spawn("ingest", &mut cmd, Some(log_path))?;
    ingest.wait_ready(listen, "/readyz", READY_TIMEOUT, None)?;
    Ok(ingest)
}

/// Stops the collector and fails unless it shut down cleanly.
fn stop_ingest(ingest: &mut Service) -> anyhow::Result<()> {
    let status = ingest.stop(STOP_GRACE)?;
    if !status.success() {
        bail!(
            "ingest did not shut down cleanly ({status}){}",
            ingest.log_tail()
        );
    }
    Ok(())
}

/// A seed that differs between runs.
fn seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ u64::from(std::process::id()).rotate_left(32)
}

/// The collector configuration for the bench: the demo's settings, but not in demo mode, on
/// `listen`, with one write key that any origin may use.
fn bench_config(listen: SocketAddr, redis_url: &str) -> String {
    format!(
        "listen = \"{listen}\"\n\
         redis_url = \"{redis_url}\"\n\
         demo = false\n\
         \n\
         # The benchmark measures the collector, not its per-key rate limit.\n\
         [rate_limits]\n\
         write_key = {{ per_second = 0 }}\n\
         \n\
         [[write_keys]]\n\
         key = \"{WRITE_KEY}\"\n\
         origins = [\"*\"]\n"
    )
}

/// The collector configuration for the tracker bench: demo mode (the write key `demo` for
/// pages served from `listen`, the API token [`DEMO_API_TOKEN`]) serving `www`.
fn demo_config(listen: SocketAddr, redis_url: &str, www: &Path) -> String {
    // Debug formatting quotes and escapes the path as a TOML basic string needs.
    let www = www.display().to_string();
    format!(
        "listen = \"{listen}\"\n\
         redis_url = \"{redis_url}\"\n\
         demo = true\n\
         www_dir = {www:?}\n"
    )
}

/// One loadgen result: its JSON line and the throughput in it.
struct LoadgenResult {
    line: String,
    events_per_sec: f64,
}

/// Runs loadgen (progress on the terminal) and reads the one JSON line it prints.
fn run_loadgen(cmd: &mut Command) -> anyhow::Result<LoadgenResult> {
    let result = run_json(cmd)?;
    let events_per_sec = result.value["events_per_sec"]
        .as_f64()
        .context("loadgen's JSON has no events_per_sec")?;
    Ok(LoadgenResult {
        line: result.line,
        events_per_sec,
    })
}

/// The one JSON line a benchmark program printed, as printed and parsed.
struct JsonLine {
    line: String,
    value: serde_json::Value,
}

/// Runs a benchmark program that reports progress on stderr (passed through to the
/// terminal) and prints one JSON line on stdout, and reads that line.
fn run_json(cmd: &mut Command) -> anyhow::Result<JsonLine> {
    let line = process::describe(cmd);
    eprintln!("$ {line}");
    let output = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("starting `{line}`"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let json = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    if !output.status.success() {
        bail!("`{line}` failed ({}): {json}", output.status);
    }
    let value: serde_json::Value = serde_json::from_str(json)
        .with_context(|| format!("`{line}` printed {json:?}, not one JSON line"))?;
    Ok(JsonLine {
        line: json.to_string(),
        value,
    })
}

/// Empties the throwaway Redis so the baseline writes into fresh keys, as the collector did.
fn flush_all(url: &str) -> anyhow::Result<()> {
    let client = redis::Client::open(url).with_context(|| format!("redis url {url}"))?;
    let mut con = client.get_connection().context("connecting to redis")?;
    redis::cmd("FLUSHALL")
        .query::<()>(&mut con)
        .context("FLUSHALL")?;
    Ok(())
}
