//! Private `redis-server` processes for tests and developer tools: started on a free port,
//! waited for until they answer, stopped on drop. Blocking (std only), so sync tools and
//! async tests can both use them.
//!
//! Also the setup tests share: [`segments`] compiles `[[segments]]` tables written as TOML,
//! [`RedisServer::profiles`] connects a store, [`RedisServer::connection`] a plain client.
//!
//! They never talk to a Redis they did not start: the port must be free before the server
//! starts, the server that answers must report our child's process id, and port 6379 (where
//! a developer's own Redis lives) is refused outright.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use figment::Figment;
use figment::providers::{Format, Toml};
use redis::aio::MultiplexedConnection;

use crate::LifecycleThresholds;
use crate::segments::{Segment, compile};
use crate::store::{ProfileConfig, RedisProfiles};

/// The command that installs `redis-server` on Debian and Ubuntu.
pub const INSTALL_HINT: &str = "sudo apt-get install -y redis-server";

/// The port of a developer's own Redis, never used here.
pub const DEFAULT_REDIS_PORT: u16 = 6379;

/// How long a server may take to answer `PING` (loading an append-only file included).
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a persistent server may take to write its data and exit on drop.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// `redis-server` is not installed.
    #[error("redis-server not found; install it with: {INSTALL_HINT}")]
    NotInstalled,
    /// The port is taken (or is 6379, which belongs to a developer's own Redis).
    #[error("port {port} is not free for a private redis-server: {detail}")]
    PortTaken {
        /// The port.
        port: u16,
        /// Why.
        detail: String,
    },
    /// Starting or reaching the process failed.
    #[error("redis-server on port {port}: {detail}")]
    Start {
        /// The port it was to listen on.
        port: u16,
        /// What went wrong, with the server's last log lines when there are any.
        detail: String,
    },
}

/// A running `redis-server` on 127.0.0.1, stopped (and reaped) on drop.
#[derive(Debug)]
pub struct RedisServer {
    child: Child,
    port: u16,
    dir: PathBuf,
    persistent: bool,
    /// Set once the server on `port` proved to be our child: only then is it sent SHUTDOWN.
    verified: bool,
    /// Stopped with SIGSTOP ([`RedisServer::pause`]) and not resumed yet.
    paused: bool,
    _temp: Option<tempfile::TempDir>,
}

impl RedisServer {
    /// Starts a throwaway server on a free port, in a temporary directory, persisting nothing
    /// (`--save '' --appendonly no`). Killed and its directory removed on drop.
    ///
    /// # Errors
    /// [`ServerError::NotInstalled`], or the server did not answer within 10 s.
    pub fn start() -> Result<Self, ServerError> {
        Self::start_program("redis-server")
    }

    fn start_program(program: &str) -> Result<Self, ServerError> {
        // Another process may take the free port before redis-server binds it: then try
        // another one.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let temp = tempfile::tempdir().map_err(|e| start_error(0, &e))?;
            let port = free_port().map_err(|e| start_error(0, &e))?;
            let args = ["--save", "", "--appendonly", "no"];
            match Self::spawn(program, None, temp.path(), port, &args, false) {
                Ok(mut server) => {
                    server._temp = Some(temp);
                    return Ok(server);
                }
                Err(ServerError::PortTaken { .. }) if attempts < 5 => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Starts a server on `port` configured by the file `config` (as `redis-server <config>`,
    /// with port, bind address, data directory `dir` and log file set here), keeping its
    /// data in `dir` as that configuration says. On drop it is asked to `SHUTDOWN`, like
    /// [`RedisServer::start_with_dir`]; [`RedisServer::crash`] kills it instead.
    ///
    /// # Errors
    /// As [`RedisServer::start_with_dir`].
    pub fn start_with_config(config: &Path, dir: &Path, port: u16) -> Result<Self, ServerError> {
        std::fs::create_dir_all(dir).map_err(|e| start_error(port, &e))?;
        Self::spawn("redis-server", Some(config), dir, port, &[], true)
    }

    /// Starts a server on `port` that keeps its data (append-only file) in `dir`, so a
    /// restart on the same directory finds it again. Used by `cargo xtask demo` and restart
    /// tests. On drop it is asked to `SHUTDOWN` (writing its data), then killed if it has
    /// not exited within 5 s.
    ///
    /// # Errors
    /// [`ServerError::PortTaken`] when `port` is in use or is 6379, otherwise as
    /// [`RedisServer::start`].
    pub fn start_with_dir(dir: &Path, port: u16) -> Result<Self, ServerError> {
        std::fs::create_dir_all(dir).map_err(|e| start_error(port, &e))?;
        let args = ["--save", "", "--appendonly", "yes"];
        Self::spawn("redis-server", None, dir, port, &args, true)
    }

    fn spawn(
        program: &str,
        config: Option<&Path>,
        dir: &Path,
        port: u16,
        extra: &[&str],
        persistent: bool,
    ) -> Result<Self, ServerError> {
        if port == DEFAULT_REDIS_PORT {
            return Err(ServerError::PortTaken {
                port,
                detail: "6379 is left to the developer's own Redis".into(),
            });
        }
        // Checked first, so nothing below ever talks to a server someone else runs.
        if let Err(e) = TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
            return Err(ServerError::PortTaken {
                port,
                detail: e.to_string(),
            });
        }
        let log = dir.join("redis.log");
        let mut cmd = Command::new(program);
        // A configuration file must be the first argument; the options after it override it.
        cmd.args(config)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
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
            Err(e) => return Err(start_error(port, &e)),
        };
        let mut server = RedisServer {
            child,
            port,
            dir: dir.to_path_buf(),
            persistent,
            verified: false,
            paused: false,
            _temp: None,
        };
        // On error `server` drops here, which kills the child.
        server.wait_ready(&log)?;
        Ok(server)
    }

    fn wait_ready(&mut self, log: &Path) -> Result<(), ServerError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let pid = self.child.id();
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                let tail = tail(log);
                // Someone bound the port between our check and the server's start.
                if tail.contains("Address already in use") {
                    return Err(ServerError::PortTaken {
                        port: self.port,
                        detail: tail,
                    });
                }
                return Err(ServerError::Start {
                    port: self.port,
                    detail: format!("exited with {status}: {tail}"),
                });
            }
            if !self.verified {
                // Not answering yet, or still loading its data.
                let info = request(self.port, "INFO server").unwrap_or_default();
                match info_pid(&info) {
                    Some(p) if p == pid => self.verified = true,
                    Some(p) => {
                        return Err(ServerError::PortTaken {
                            port: self.port,
                            detail: format!("answered by another redis-server (pid {p})"),
                        });
                    }
                    None => {}
                }
            }
            if self.verified && request(self.port, "PING").is_ok_and(|r| r == "+PONG") {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(ServerError::Start {
            port: self.port,
            detail: format!(
                "did not answer PING within {} s: {}",
                READY_TIMEOUT.as_secs(),
                tail(log)
            ),
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

    /// The directory holding its data and `redis.log`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A store on this server with the default settings, evaluating `segments`.
    ///
    /// # Panics
    /// The server does not answer.
    pub async fn profiles(&self, segments: &[Segment]) -> RedisProfiles {
        RedisProfiles::connect(&self.url(), ProfileConfig::default())
            .await
            .expect("connect to the test redis-server")
            .with_segments(segments)
            .await
            .expect("load the apply script")
    }

    /// A plain client connection, to read and write keys directly.
    ///
    /// # Panics
    /// The server does not answer.
    pub async fn connection(&self) -> MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("a redis URL")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to the test redis-server")
    }

    /// Kills the server with SIGKILL, as a crash would: nothing is written on the way out.
    pub fn crash(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Freezes the server with SIGSTOP, as a stalled host or a long fork would: it keeps
    /// its connections and the kernel still accepts new ones, but nothing is read or
    /// answered until [`RedisServer::resume`]. Dropping a paused server resumes it first.
    ///
    /// # Errors
    /// The signal could not be sent.
    pub fn pause(&mut self) -> std::io::Result<()> {
        self.signal("STOP")?;
        self.paused = true;
        Ok(())
    }

    /// Lets a paused server run again (SIGCONT); it then answers what was sent meanwhile.
    ///
    /// # Errors
    /// The signal could not be sent.
    pub fn resume(&mut self) -> std::io::Result<()> {
        self.signal("CONT")?;
        self.paused = false;
        Ok(())
    }

    /// Sends `SIG<name>` through kill(1): std has no way to send a signal but SIGKILL, and
    /// calling kill(2) through libc would take unsafe code, which the workspace forbids.
    fn signal(&self, name: &str) -> std::io::Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        if status.success() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!(
                "kill -{name} {} exited with {status}",
                self.child.id()
            )))
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if self.paused {
            let _ = self.resume();
        }
        if self.persistent && self.verified && matches!(self.child.try_wait(), Ok(None)) {
            // SHUTDOWN writes the append-only file; the connection closes without a reply.
            let _ = request(self.port, "SHUTDOWN");
            let deadline = Instant::now() + SHUTDOWN_TIMEOUT;
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Compiles `[[segments]]` tables written as TOML, read the way the collector reads its
/// configuration, with the default lifecycle thresholds.
///
/// # Panics
/// The TOML or a definition is bad (the message says which).
pub fn segments(toml: &str) -> Vec<Segment> {
    #[derive(serde::Deserialize)]
    struct Tables {
        segments: Vec<serde_json::Value>,
    }
    let tables: Tables = Figment::from(Toml::string(toml))
        .extract()
        .unwrap_or_else(|e| panic!("{e}"));
    compile(&tables.segments, &LifecycleThresholds::default()).unwrap_or_else(|e| panic!("{e}"))
}

/// A port on 127.0.0.1 that was free a moment ago.
///
/// # Errors
/// The OS gave no port.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// Sends one inline command and reads one reply: a status or error line, or the text of a
/// bulk string.
fn request(port: u16, command: &str) -> std::io::Result<String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let timeout = Duration::from_millis(500);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(format!("{command}\r\n").as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let line = line.trim_end();
    let Some(len) = line.strip_prefix('$') else {
        return Ok(line.to_string());
    };
    let len: usize = len
        .parse()
        .map_err(|_| std::io::Error::other(format!("bad bulk length {len:?}")))?;
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// `process_id` from an `INFO server` reply.
fn info_pid(info: &str) -> Option<u32> {
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|p| p.trim().parse().ok())
}

/// The last lines of the server's log, for error messages.
fn tail(log: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(log) {
        let _ = f.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().rev().take(3).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

fn start_error(port: u16, e: &std::io::Error) -> ServerError {
    ServerError::Start {
        port,
        detail: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_redis_server_says_how_to_install_it() {
        let err = RedisServer::start_program("redis-server-not-installed-here").unwrap_err();
        assert_eq!(
            err.to_string(),
            "redis-server not found; install it with: sudo apt-get install -y redis-server"
        );
    }

    #[test]
    fn port_6379_and_taken_ports_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = RedisServer::start_with_dir(dir.path(), 6379).unwrap_err();
        assert!(
            matches!(err, ServerError::PortTaken { port: 6379, .. }),
            "{err}"
        );
        let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = taken.local_addr().unwrap().port();
        let err = RedisServer::start_with_dir(dir.path(), port).unwrap_err();
        assert!(matches!(err, ServerError::PortTaken { .. }), "{err}");
    }

    #[test]
    fn a_paused_server_answers_nothing_until_resumed() {
        let mut server = RedisServer::start().unwrap();
        server.pause().unwrap();
        let err = request(server.port(), "PING").unwrap_err();
        assert!(
            matches!(
                err.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{err}"
        );
        server.resume().unwrap();
        assert_eq!(request(server.port(), "PING").unwrap(), "+PONG");
        // A paused persistent server is resumed on drop, so that it takes SHUTDOWN (and
        // writes its data) instead of being killed after SHUTDOWN_TIMEOUT.
        drop(server);
        let dir = tempfile::tempdir().unwrap();
        let mut server = RedisServer::start_with_dir(dir.path(), free_port().unwrap()).unwrap();
        server.pause().unwrap();
        let pid = server.pid();
        let started = Instant::now();
        drop(server);
        assert!(
            started.elapsed() < SHUTDOWN_TIMEOUT,
            "drop took {:?}",
            started.elapsed()
        );
        let status = Command::new("kill")
            .args(["-0", &pid.to_string()])
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(!status.success(), "process {pid} still exists");
    }

    #[test]
    fn info_names_the_process() {
        assert_eq!(
            info_pid("# Server\r\nredis_version:7.0.15\r\nprocess_id:4242\r\n"),
            Some(4242)
        );
        assert_eq!(info_pid("-LOADING Redis is loading"), None);
    }
}
