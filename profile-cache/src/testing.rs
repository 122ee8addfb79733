//! Private `redis-server` processes for tests and developer tools: started on a free port,
//! waited for until they answer, killed on drop. They never touch a Redis they did not start.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The command that installs `redis-server` on Debian and Ubuntu.
pub const INSTALL_HINT: &str = "sudo apt-get install -y redis-server";

/// Why a server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// `redis-server` is not installed.
    #[error("redis-server not found; install it with: {INSTALL_HINT}")]
    NotInstalled,
    /// Starting or reaching the process failed.
    #[error("redis-server on port {port}: {detail}")]
    Start {
        /// The port it was to listen on.
        port: u16,
        /// What went wrong, with the server's last log lines when there are any.
        detail: String,
    },
}

/// A running `redis-server`, killed (and reaped) on drop.
pub struct RedisServer {
    child: Child,
    port: u16,
    _dir: Option<tempfile::TempDir>,
}

impl RedisServer {
    /// Starts a throwaway server on a free port, in a temporary directory, persisting nothing.
    ///
    /// # Errors
    /// [`ServerError::NotInstalled`], or the server did not answer within 10 s.
    pub fn start() -> Result<Self, ServerError> {
        let dir = tempfile::tempdir().map_err(|e| start_error(0, e))?;
        let port = free_port().map_err(|e| start_error(0, e))?;
        let args = ["--save", "", "--appendonly", "no"];
        let mut server = Self::spawn(dir.path(), port, &args)?;
        server._dir = Some(dir);
        Ok(server)
    }

    /// Starts a server on `port` that keeps its data (append-only file) in `dir`, so a
    /// restart finds it again. Used by `cargo xtask demo` and by restart tests.
    ///
    /// # Errors
    /// As [`RedisServer::start`].
    pub fn start_with_dir(dir: &Path, port: u16) -> Result<Self, ServerError> {
        std::fs::create_dir_all(dir).map_err(|e| start_error(port, e))?;
        Self::spawn(dir, port, &["--save", "", "--appendonly", "yes"])
    }

    fn spawn(dir: &Path, port: u16, extra: &[&str]) -> Result<Self, ServerError> {
        let log = dir.join("redis.log");
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(&log)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ServerError::NotInstalled);
            }
            Err(e) => return Err(start_error(port, e)),
        };
        let mut server = RedisServer {
            child,
            port,
            _dir: None,
        };
        server.wait_ready(&log)?;
        Ok(server)
    }

    fn wait_ready(&mut self, log: &PathBuf) -> Result<(), ServerError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(ServerError::Start {
                    port: self.port,
                    detail: format!("exited with {status}: {}", tail(log)),
                });
            }
            if ping(self.port) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(ServerError::Start {
            port: self.port,
            detail: format!("did not answer PING within 10 s: {}", tail(log)),
        })
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port that was free a moment ago.
///
/// # Errors
/// The OS gave no port.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).is_ok() && line.starts_with("+PONG")
}

fn tail(log: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(log) {
        let _ = f.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().rev().take(3).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

fn start_error(port: u16, e: std::io::Error) -> ServerError {
    ServerError::Start {
        port,
        detail: e.to_string(),
    }
}
