//! Starts the real `ingest` binary against a private redis-server and talks to it over HTTP.

#![allow(dead_code)]

use std::io::{Read as _, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub use profile_cache::testing::RedisServer;

pub const WRITE_KEY: &str = "e2e-key";
pub const TOKEN: &str = "e2e-reader-token";
/// The SHA-256 of [`TOKEN`], as `[[api_tokens]]` lists it (`printf %s e2e-reader-token |
/// sha256sum`).
pub const TOKEN_SHA256: &str = "2d322c4212048209849d8ae06f985be7df342a4af41b95b46a2ef5c4f54f66af";
pub const ORIGIN: &str = "https://shop.example";

/// Now, Unix ms.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The ingest binary: `INGEST_BIN` (set by `cargo xtask test`) or `target/debug/ingest`.
pub fn ingest_bin() -> PathBuf {
    let path = std::env::var_os("INGEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/ingest")
        });
    assert!(
        path.exists(),
        "{} not found: run `cargo xtask test` (it builds the binary first) or `cargo build -p ingest`",
        path.display()
    );
    path
}

/// The load generator: `LOADGEN_BIN` (set by `cargo xtask test`) or `target/debug/loadgen`.
pub fn loadgen_bin() -> PathBuf {
    let path = std::env::var_os("LOADGEN_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/loadgen")
        });
    assert!(
        path.exists(),
        "{} not found: run `cargo xtask test` (it builds the binary first) or `cargo build -p ingest`",
        path.display()
    );
    path
}

/// The ingest binary with no `INGEST_*` variables from the caller's environment (they
/// would override the test's configuration, and unknown ones are refused).
pub fn ingest_command() -> Command {
    let mut cmd = Command::new(ingest_bin());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("INGEST_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Runs a Lua script that returns a string (`cjson.encode(...)`) on the Redis at `port`,
/// and parses that string as JSON: a way to read any reply without a Redis client.
pub fn redis_json(port: u16, script: &str) -> serde_json::Value {
    use std::io::{BufRead, BufReader, Read};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to redis");
    let args = ["EVAL", script, "0"];
    let mut request = format!("*{}\r\n", args.len());
    for a in args {
        request.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    conn.write_all(request.as_bytes()).unwrap();
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let len: usize = match line.trim_end().strip_prefix('$') {
        Some(len) => len.parse().unwrap(),
        None => panic!("redis answered {line:?}"),
    };
    let mut body = vec![0; len];
    reader.read_exact(&mut body).unwrap();
    serde_json::from_slice(&body).unwrap()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A running collector; killed on drop.
pub struct Ingest {
    child: Option<Child>,
    pub port: u16,
    config: tempfile::NamedTempFile,
    /// Where its stderr goes, across restarts; the test's stderr when `None`.
    log: Option<tempfile::NamedTempFile>,
}

impl Ingest {
    /// Starts the collector on a free port against `redis_url` and waits until it is ready.
    pub fn start(redis_url: &str) -> Ingest {
        Self::start_with(redis_url, "")
    }

    /// As [`Ingest::start`], with extra TOML (top-level settings or tables) in the config.
    pub fn start_with(redis_url: &str, extra_toml: &str) -> Ingest {
        let port = free_port();
        Self::launch(
            port,
            &format!(
                r#"
listen = "127.0.0.1:{port}"
redis_url = "{redis_url}"
shutdown_timeout = "5s"
{extra_toml}
[[write_keys]]
key = "{WRITE_KEY}"
origins = ["{ORIGIN}"]

[[api_tokens]]
name = "e2e-reader"
sha256 = "{TOKEN_SHA256}"
scopes = ["profiles:read", "segments:read"]
"#
            ),
            false,
        )
    }

    /// Starts the collector with exactly the configuration `toml`, which must listen on
    /// 127.0.0.1:`port`, and waits until it is ready. Its log (warnings and errors) goes to
    /// a file, read with [`Ingest::log_tail`].
    pub fn start_config(port: u16, toml: &str) -> Ingest {
        Self::launch(port, toml, true)
    }

    fn launch(port: u16, toml: &str, log_to_file: bool) -> Ingest {
        let mut config = tempfile::NamedTempFile::new().unwrap();
        config.write_all(toml.as_bytes()).unwrap();
        let mut ingest = Ingest {
            child: None,
            port,
            config,
            log: log_to_file.then(|| tempfile::NamedTempFile::new().unwrap()),
        };
        ingest.restart();
        ingest
    }

    /// Freezes the collector with SIGSTOP: connections are still accepted by the kernel,
    /// nothing is answered. [`Ingest::kill`] still ends it.
    pub fn freeze(&self) {
        let status = Command::new("kill")
            .args(["-STOP", &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -STOP {}: {status}", self.pid());
    }

    /// Kills the collector with SIGKILL, as a crash would: nothing is flushed, open
    /// connections are dropped.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL ingest");
            child.wait().expect("reap ingest");
        }
    }

    /// Starts the collector again (after [`Ingest::kill`]) on the same port with the same
    /// configuration, and waits until it is ready.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "ingest is still running");
        let mut cmd = ingest_command();
        cmd.arg("--config")
            .arg(self.config.path())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null());
        if let Some(log) = &self.log {
            let file = std::fs::OpenOptions::new()
                .append(true)
                .open(log.path())
                .unwrap();
            cmd.stderr(file);
        }
        self.child = Some(cmd.spawn().expect("spawn ingest"));
        self.wait_ready();
    }

    /// The last lines of the collector's log (after [`Ingest::start_config`]).
    pub fn log_tail(&self, lines: usize) -> String {
        let Some(log) = &self.log else {
            return "(the log went to stderr)".into();
        };
        let text = std::fs::read_to_string(log.path()).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(lines).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if reqwest::blocking::get(self.url("/readyz")).is_ok_and(|r| r.status() == 200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "ingest on port {} did not become ready:\n{}",
            self.port,
            self.log_tail(20)
        );
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(self) -> std::process::ExitStatus {
        Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("kill");
        self.terminate_wait()
    }

    /// Waits for a process already told to stop.
    pub fn terminate_wait(mut self) -> std::process::ExitStatus {
        self.child.take().expect("running").wait().expect("wait")
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A TCP proxy in front of a Redis that, once armed, cuts the connection that carries a
/// command containing a given argument, before Redis sees that command: a network failure at
/// an exact step of a multi-step operation. It cuts once; later connections pass untouched.
pub struct CuttingProxy {
    pub port: u16,
    armed: Arc<AtomicBool>,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl CuttingProxy {
    /// Listens on a free port and forwards every connection to the Redis at
    /// `redis_port`; once armed, cuts at the first command with the bulk-string argument
    /// `argument` (e.g. `finish`).
    pub fn start(redis_port: u16, argument: &str) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().unwrap().port();
        let needle = format!("${}\r\n{argument}\r\n", argument.len()).into_bytes();
        let proxy = CuttingProxy {
            port,
            armed: Arc::new(AtomicBool::new(false)),
            cut: Arc::new(AtomicBool::new(false)),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (armed, cut, stop) = (proxy.armed.clone(), proxy.cut.clone(), proxy.stop.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", redis_port)) else {
                    continue;
                };
                let (client2, server2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut &server2, &mut &client2);
                    let _ = client2.shutdown(Shutdown::Both);
                });
                let (armed, cut, needle) = (armed.clone(), cut.clone(), needle.clone());
                std::thread::spawn(move || pump(client, server, &needle, &armed, &cut));
            }
        });
        proxy
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Cuts at the next command with the argument.
    pub fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Whether it has cut a connection.
    pub fn has_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so that it sees `stop`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Copies client bytes to the server until either side closes, or until an armed proxy
/// sees `needle` (possibly split across reads): then both connections are shut down and
/// the bytes that held it are dropped, so the server never runs that command.
fn pump(client: TcpStream, server: TcpStream, needle: &[u8], armed: &AtomicBool, cut: &AtomicBool) {
    let mut buf = [0u8; 64 * 1024];
    let mut tail: Vec<u8> = Vec::new();
    loop {
        let n = match (&client).read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        tail.extend_from_slice(&buf[..n]);
        let found = tail.windows(needle.len()).any(|w| w == needle);
        if found && armed.swap(false, Ordering::SeqCst) {
            cut.store(true, Ordering::SeqCst);
            break;
        }
        if (&server).write_all(&buf[..n]).is_err() {
            break;
        }
        let keep = tail.len().saturating_sub(needle.len());
        tail.drain(..keep);
    }
    let _ = client.shutdown(Shutdown::Both);
    let _ = server.shutdown(Shutdown::Both);
}
