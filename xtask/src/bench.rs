//! `bench`: the release collector on a throwaway Redis under `loadgen`; then the same events
//! applied by `loadgen --store` (the collector's code and script, no HTTP) and written by
//! `loadgen --raw-redis` (plain pipelined commands, the baseline) into the same, flushed
//! Redis; and the ratios of the throughputs.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use profile_cache::testing::RedisServer;

use crate::process::{self, Service};
use crate::tools;
use crate::workspace::Workspace;

/// The write key in the bench config.
const WRITE_KEY: &str = "bench";
/// How long the collector may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs both measurements and prints their JSON lines and the ratio. `loadgen_args` go to
/// both loadgen runs (loadgen's own defaults suit a 2-core machine).
///
/// # Errors
/// A tool is missing, the build fails, a process fails, or loadgen reports errors.
pub fn run(loadgen_args: &[OsString]) -> anyhow::Result<()> {
    let ws = Workspace::locate()?;
    tools::require_redis_server()?;
    // Both runs send the same events: one seed for both, unless the arguments name one
    // (loadgen lets a later flag override an earlier one).
    let mut args: Vec<OsString> = vec!["--seed".into(), seed().to_string().into()];
    args.extend(loadgen_args.iter().cloned());
    let loadgen_args = &args;
    process::run(
        ws.cargo()
            .args(["build", "--release", "-p", "ingest", "--bins"]),
    )?;
    let loadgen = ws.bin("release", "loadgen");

    let redis = RedisServer::start().context("starting a throwaway redis-server")?;
    let redis_url = redis.url();
    let scratch = tempfile::tempdir().context("creating a temporary directory")?;
    let port = process::free_port()?;
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    let config = scratch.path().join("bench.toml");
    std::fs::write(&config, bench_config(listen, &redis_url))
        .with_context(|| format!("writing {}", config.display()))?;
    let log_path = scratch.path().join("ingest.log");
    let log = std::fs::File::create(&log_path)?;

    let mut cmd = Command::new(ws.bin("release", "ingest"));
    cmd.arg("--config")
        .arg(&config)
        .current_dir(&ws.root)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // The bench config is the whole configuration: no INGEST_* overrides from the shell.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("INGEST_") {
            cmd.env_remove(key);
        }
    }
    let mut ingest = Service::spawn("ingest", &mut cmd, Some(log_path))?;
    ingest.wait_ready(listen, "/readyz", READY_TIMEOUT, None)?;

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
    let status = ingest.stop(Duration::from_secs(15))?;
    if !status.success() {
        bail!(
            "ingest did not shut down cleanly ({status}){}",
            ingest.log_tail()
        );
    }

    flush_all(&redis_url)?;
    eprintln!("\n== store: loadgen -> profile-cache script -> redis (no HTTP) ==");
    let store = run_loadgen(
        Command::new(&loadgen)
            .arg("--store")
            .arg(&redis_url)
            .args(loadgen_args),
    )
    .context("store run")?;

    flush_all(&redis_url)?;
    eprintln!("\n== baseline: loadgen -> redis, plain pipelined commands ==");
    let raw = run_loadgen(
        Command::new(&loadgen)
            .arg("--raw-redis")
            .arg(&redis_url)
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
    drop(redis);
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
         [[write_keys]]\n\
         key = \"{WRITE_KEY}\"\n\
         origins = [\"*\"]\n"
    )
}

/// One loadgen result: its JSON line and the throughput in it.
struct LoadgenResult {
    line: String,
    events_per_sec: f64,
}

/// Runs loadgen (progress on the terminal) and reads the one JSON line it prints.
fn run_loadgen(cmd: &mut Command) -> anyhow::Result<LoadgenResult> {
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
        .with_context(|| format!("loadgen printed {json:?}, not one JSON line"))?;
    let events_per_sec = value["events_per_sec"]
        .as_f64()
        .context("loadgen's JSON has no events_per_sec")?;
    Ok(LoadgenResult {
        line: json.to_string(),
        events_per_sec,
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
