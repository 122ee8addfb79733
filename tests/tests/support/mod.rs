//! Starts the real `ingest` binary against a private redis-server and talks to it over HTTP.

#![allow(dead_code)]

use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use profile_cache::testing::RedisServer;

pub const WRITE_KEY: &str = "e2e-key";
pub const TOKEN: &str = "e2e-reader-token";
/// The SHA-256 of [`TOKEN`], as `[[api_tokens]]` lists it (`printf %s e2e-reader-token |
/// sha256sum`).
pub const TOKEN_SHA256: &str = "2d322c4212048209849d8ae06f985be7df342a4af41b95b46a2ef5c4f54f66af";
pub const ORIGIN: &str = "https://shop.example";

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
    _config: tempfile::NamedTempFile,
}

impl Ingest {
    /// Starts the collector on a free port against `redis_url` and waits until it is ready.
    pub fn start(redis_url: &str) -> Ingest {
        Self::start_with(redis_url, "")
    }

    /// As [`Ingest::start`], with extra TOML (top-level settings or tables) in the config.
    pub fn start_with(redis_url: &str, extra_toml: &str) -> Ingest {
        let port = free_port();
        let mut config = tempfile::NamedTempFile::new().unwrap();
        write!(
            config,
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
        )
        .unwrap();
        let child = ingest_command()
            .arg("--config")
            .arg(config.path())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn ingest");
        let ingest = Ingest {
            child: Some(child),
            port,
            _config: config,
        };
        ingest.wait_ready();
        ingest
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
        panic!("ingest on port {} did not become ready", self.port);
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
