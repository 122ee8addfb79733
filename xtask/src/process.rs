//! Child processes: commands run to completion, long-running services stopped with SIGTERM,
//! readiness probes over plain HTTP, free ports, and Ctrl-C.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// The command line of `cmd`, for messages: `cargo build -p ingest`.
pub fn describe(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    if let Some(name) = Path::new(&line).file_name() {
        line = name.to_string_lossy().into_owned();
    }
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// Prints `cmd` on stderr and runs it with inherited stdio.
///
/// # Errors
/// It cannot start or exits unsuccessfully.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let line = describe(cmd);
    eprintln!("$ {line}");
    let status = cmd.status().with_context(|| format!("starting `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// A free TCP port on 127.0.0.1 (free when asked; another process may take it later).
///
/// # Errors
/// No port can be bound.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("looking for a free port")?;
    Ok(listener.local_addr()?.port())
}

/// A long-running child process that this task owns: started in its own process group (so
/// Ctrl-C in the terminal reaches only xtask, which stops children in order), stopped with
/// SIGTERM, and killed if dropped while still running.
pub struct Service {
    name: String,
    child: Child,
    log: Option<PathBuf>,
}

impl Service {
    /// Starts `cmd`. `log`, if given, is where the caller pointed its output, shown when the
    /// service fails.
    ///
    /// # Errors
    /// The program cannot be started.
    pub fn spawn(name: &str, cmd: &mut Command, log: Option<PathBuf>) -> anyhow::Result<Service> {
        let line = describe(cmd);
        eprintln!("$ {line}");
        let child = cmd
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {name} (`{line}`)"))?;
        Ok(Service {
            name: name.into(),
            child,
            log,
        })
    }

    /// Whether it has exited, and how.
    ///
    /// # Errors
    /// The exit status cannot be read.
    pub fn exited(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .with_context(|| format!("checking on {}", self.name))
    }

    /// Polls `GET http://{addr}{path}` until it answers 200. Fails if the service exits,
    /// `interrupt` is set, or `timeout` passes.
    ///
    /// # Errors
    /// As above; the message includes the end of the service's log, if it has one.
    pub fn wait_ready(
        &mut self,
        addr: SocketAddr,
        path: &str,
        timeout: Duration,
        interrupt: Option<&Interrupt>,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited()? {
                bail!(
                    "{} exited before it was ready ({status}){}",
                    self.name,
                    self.log_tail()
                );
            }
            if interrupt.is_some_and(Interrupt::is_set) {
                bail!("interrupted while waiting for {}", self.name);
            }
            let last = match http_status(addr, path) {
                Ok(200) => return Ok(()),
                Ok(status) => format!("GET {path} answered {status}"),
                Err(err) => format!("GET {path}: {err}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "{} was not ready at http://{addr} after {timeout:?} ({last}){}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends SIGTERM and waits up to `grace` for the process to exit, then kills it.
    ///
    /// # Errors
    /// The signal cannot be sent or the process cannot be waited for.
    pub fn stop(&mut self, grace: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.exited()? {
            return Ok(status);
        }
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)
            .with_context(|| format!("sending SIGTERM to {}", self.name))?;
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.exited()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("{} did not stop within {grace:?}; killing it", self.name);
        self.child.kill().ok();
        self.child
            .wait()
            .with_context(|| format!("waiting for {}", self.name))
    }

    /// The last lines of the service's log, formatted to append to an error message.
    pub fn log_tail(&self) -> String {
        let Some(log) = &self.log else {
            return String::new();
        };
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        format!("\n--- last lines of {} ---\n{tail}", log.display())
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The status code of `GET http://{addr}{path}`, over a plain HTTP/1.1 connection (all a
/// readiness probe needs; no HTTP client dependency).
///
/// # Errors
/// Connecting, writing or reading fails, or the answer is not HTTP.
pub fn http_status(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    let timeout = Duration::from_secs(2);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = [0u8; 64];
    let mut len = 0;
    // "HTTP/1.1 200 OK": the status code ends at byte 12.
    while len < 12 {
        let n = stream.read(&mut head[len..])?;
        if n == 0 {
            break;
        }
        len += n;
    }
    let head = String::from_utf8_lossy(&head[..len]);
    head.strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {head:?}")))
}

/// Set once SIGINT (Ctrl-C) or SIGTERM arrives; while installed, those signals no longer end
/// xtask, so it can stop its children in order.
#[derive(Clone)]
pub struct Interrupt(Arc<AtomicBool>);

impl Interrupt {
    /// Installs the signal handlers (on a small thread running a tokio signal listener).
    ///
    /// # Errors
    /// The handlers cannot be installed.
    pub fn install() -> anyhow::Result<Interrupt> {
        use tokio::signal::unix::{SignalKind, signal};
        let flag = Interrupt(Arc::new(AtomicBool::new(false)));
        let set = flag.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
        std::thread::spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
            {
                Ok(rt) => rt,
                Err(err) => {
                    let _ = ready_tx.send(Err(err));
                    return;
                }
            };
            runtime.block_on(async move {
                // Registered before `install` returns, so no signal is missed.
                let signals = signal(SignalKind::interrupt())
                    .and_then(|int| Ok((int, signal(SignalKind::terminate())?)));
                let (mut int, mut term) = match signals {
                    Ok(s) => s,
                    Err(err) => {
                        let _ = ready_tx.send(Err(err));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                loop {
                    tokio::select! {
                        _ = int.recv() => {},
                        _ = term.recv() => {},
                    }
                    set.0.store(true, Ordering::SeqCst);
                }
            });
        });
        ready_rx
            .recv()
            .context("signal listener thread ended")?
            .context("installing signal handlers")?;
        Ok(flag)
    }

    /// Whether a signal has arrived.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}
