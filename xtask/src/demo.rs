//! `demo`: the tracker built into `www/t/`, then the release collector with the demo config
//! and a private persistent Redis, until Ctrl-C; then the collector is stopped (SIGTERM,
//! in-flight requests finish) before Redis.

use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use profile_cache::testing::RedisServer;

use crate::build_tracker;
use crate::process::{self, Interrupt, Service};
use crate::tools;
use crate::workspace::Workspace;

/// Where `ingest/demo.toml` listens (unless `INGEST_LISTEN` says otherwise).
const DEMO_LISTEN: &str = "127.0.0.1:8080";
/// How long the collector may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longer than the collector's own shutdown timeout (10 s), so it can finish in-flight work.
const STOP_GRACE: Duration = Duration::from_secs(15);

/// Runs the demo until Ctrl-C (or SIGTERM).
///
/// # Errors
/// A tool is missing, the port is busy, the build fails, or a process fails to start.
pub fn run() -> anyhow::Result<()> {
    let ws = Workspace::locate()?;
    let external_redis = std::env::var("REDIS_URL").ok().filter(|u| !u.is_empty());
    if external_redis.is_none() {
        tools::require_redis_server()?;
    }
    let listen: SocketAddr = match std::env::var("INGEST_LISTEN") {
        Ok(addr) => addr.parse().with_context(|| {
            format!("INGEST_LISTEN={addr:?} is not an address like 127.0.0.1:8080")
        })?,
        Err(_) => DEMO_LISTEN.parse()?,
    };
    // Checked before the (long) release build; the collector reports it too if the port is
    // taken in between.
    if let Err(err) = TcpListener::bind(listen) {
        bail!(
            "{listen} is not free ({err}): stop whatever listens there (another `cargo xtask demo`?) \
             or set INGEST_LISTEN to another loopback address"
        );
    }

    let tracker = build_tracker::build(&ws)?;
    build_tracker::print_sizes(&tracker);
    process::run(
        ws.cargo()
            .args(["build", "--release", "-p", "ingest", "--bin", "ingest"]),
    )?;
    let interrupt = Interrupt::install()?;

    let (redis_url, redis) = match external_redis {
        Some(url) => (url, None),
        None => {
            let dir = ws.target_dir.join("demo").join("redis");
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let port = process::free_port()?;
            let server = RedisServer::start_with_dir(&dir, port)
                .with_context(|| format!("starting redis-server with data in {}", dir.display()))?;
            (server.url(), Some((server, dir)))
        }
    };

    let mut ingest = Service::spawn(
        "ingest",
        Command::new(ws.bin("release", "ingest"))
            .args(["--config", "ingest/demo.toml"])
            .env("INGEST_REDIS_URL", &redis_url)
            .current_dir(&ws.root)
            .stdin(Stdio::null()),
        None,
    )?;
    ingest.wait_ready(listen, "/readyz", READY_TIMEOUT, Some(&interrupt))?;

    let url = format!("http://{listen}");
    println!();
    println!("demo shop:     {url}");
    println!("write key:     demo");
    println!("API token:     demo-secret");
    println!(
        "profile API:   curl -H 'Authorization: Bearer demo-secret' {url}/v1/profiles/<user id or anonymous id>"
    );
    match &redis {
        Some((_, dir)) => println!("redis:         {redis_url} (data in {})", dir.display()),
        None => println!("redis:         {redis_url} (REDIS_URL)"),
    }
    println!("Press Ctrl-C to stop.");
    println!();

    let crashed = loop {
        if interrupt.is_set() {
            break None;
        }
        if let Some(status) = ingest.exited()? {
            break Some(status);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if let Some(status) = crashed {
        drop(redis);
        bail!("ingest exited unexpectedly ({status})");
    }

    eprintln!("stopping ingest");
    let status = ingest.stop(STOP_GRACE)?;
    if let Some((server, _)) = redis {
        eprintln!("stopping redis-server");
        shutdown_redis(&redis_url);
        drop(server);
    }
    // A collector stopped by SIGTERM exits 0 after its graceful shutdown.
    if !status.success() {
        bail!("ingest did not shut down cleanly ({status})");
    }
    eprintln!("demo stopped");
    Ok(())
}

/// Asks Redis to shut down (it flushes its append-only file first) and waits until it has,
/// for at most 5 s. Dropping the server handle kills the process, which could lose the
/// last second of writes. Redis may already be gone: Ctrl-C in a terminal reaches it too.
fn shutdown_redis(url: &str) {
    let Ok(client) = redis::Client::open(url) else {
        return;
    };
    let Ok(mut con) = client.get_connection_with_timeout(Duration::from_secs(1)) else {
        return;
    };
    // On success Redis closes the connection instead of answering.
    let _ = redis::cmd("SHUTDOWN").query::<()>(&mut con);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline
        && client
            .get_connection_with_timeout(Duration::from_millis(200))
            .is_ok()
    {
        std::thread::sleep(Duration::from_millis(50));
    }
}
