//! TLS termination: the collector serving HTTPS itself (rustls), for deployments without a
//! terminating proxy in front of it.
//!
//! [`TlsListener`] accepts TCP connections and runs each handshake in its own task, bounded
//! by `tls.handshake_timeout`, so a client that connects and stalls holds up nobody; the
//! finished streams reach the server in the order they complete. It is an
//! [`axum::serve::Listener`], so the server, graceful shutdown and the peer address
//! (`ConnectInfo`, through [`axum::serve::ListenerExt::tap_io`]) work as over plain TCP.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use figment::value::magic::RelativePathBuf;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::debug;

/// `[tls]`: serve HTTPS with this certificate chain and key (PEM files; relative paths are
/// relative to the configuration file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain, leaf first.
    pub cert: RelativePathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: RelativePathBuf,
    /// How long a client may take to complete the handshake. Default 10 s.
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}

/// How many finished handshakes may wait for the server to take them.
const BACKLOG: usize = 128;

/// The acceptor for `config`: the certificate chain and key read and checked now, so a
/// bad file stops the collector at start, HTTP/1.1 offered.
///
/// # Errors
/// A file cannot be read, holds no certificate or no key, or the key does not match.
pub fn acceptor(config: &TlsConfig) -> anyhow::Result<TlsAcceptor> {
    // The first provider installed stays (Redis's TLS may have installed it already).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cert_path = config.cert.relative();
    let key_path = config.key.relative();
    let chain = read_chain(&cert_path)?;
    let key = PrivateKeyDer::from_pem_file(&key_path).with_context(|| {
        format!(
            "tls.key: no private key in {} (PKCS#8, PKCS#1 or SEC1 PEM)",
            key_path.display()
        )
    })?;
    let mut server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("tls: the key does not fit the certificate")?;
    // The server loop (`overload::serve_http`) speaks HTTP/1.1 only: offering h2 would make
    // clients that pick it fail.
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(server)))
}

fn read_chain(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let chain = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("tls.cert: cannot read {}", path.display()))?;
    anyhow::ensure!(
        !chain.is_empty(),
        "tls.cert: no certificate in {}",
        path.display()
    );
    Ok(chain)
}

/// A listener that hands out TLS streams whose handshake has completed.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    accepting: JoinHandle<()>,
}

impl TlsListener {
    /// Accepts on `tcp` and completes handshakes with `acceptor`, each within `timeout`.
    ///
    /// # Errors
    /// The listener has no local address.
    pub fn new(tcp: TcpListener, acceptor: TlsAcceptor, timeout: Duration) -> io::Result<Self> {
        let local = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(BACKLOG);
        let accepting = tokio::spawn(async move {
            loop {
                let (stream, peer) = match tcp.accept().await {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Out of file descriptors, say: wait rather than spin.
                        debug!(cause = %err, "tls: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    return;
                }
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(err)) => debug!(cause = %err, "tls: handshake failed"),
                        Err(_) => debug!("tls: handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener {
            ready,
            local,
            accepting,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(ready) => ready,
            // The accepting task ended, which it does only when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}
