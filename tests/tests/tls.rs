//! TLS end to end: the real collector serving HTTPS with a certificate from a private CA,
//! talking to a redis-server that speaks TLS only, as a Redis ACL user. A batch posted over
//! HTTPS lands in Redis; a client that stalls its handshake holds up nobody; a bad
//! certificate or a wrong Redis password stops the collector at start with a clear error.

// Only the binary and port helpers are used here.
#[allow(unused_imports)]
mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use support::{free_port, ingest_command, now_ms};

struct Certs {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    ca_der: Vec<u8>,
}

/// A private CA, and a certificate it signed for 127.0.0.1 and localhost, in `dir`.
fn certs(dir: &Path) -> Certs {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let params = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    let write = |name: &str, pem: String| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    Certs {
        ca: write("ca.pem", ca.pem()),
        cert: write("server.pem", cert.pem()),
        key: write("server.key", key.serialize_pem()),
        ca_der: ca.der().to_vec(),
    }
}

fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// redis-server with TLS only, the default user off and user `collector` / `s3cret`.
fn tls_redis(dir: &Path, certs: &Certs) -> (Killed, u16) {
    let port = free_port();
    let conf = dir.join("redis.conf");
    std::fs::write(
        &conf,
        format!(
            "port 0\ntls-port {port}\nbind 127.0.0.1\nsave \"\"\nappendonly no\n\
             tls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\ntls-auth-clients no\n\
             user default off\nuser collector on >s3cret ~* &* +@all\n",
            certs.cert.display(),
            certs.key.display(),
            certs.ca.display()
        ),
    )
    .unwrap();
    let child = Command::new("redis-server")
        .arg(&conf)
        .current_dir(dir)
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server starts");
    wait_for_port(port);
    (Killed(child), port)
}

fn config(port: u16, redis_port: u16, password: &str, certs: &Certs) -> String {
    format!(
        r#"
listen = "127.0.0.1:{port}"
redis_url = "rediss://collector:{password}@127.0.0.1:{redis_port}"
shutdown_timeout = "2s"
[tls]
cert = "{}"
key = "{}"
handshake_timeout = "1s"
[profiles.redis_tls]
ca_file = "{}"
[[write_keys]]
key = "tls-key"
"#,
        certs.cert.display(),
        certs.key.display(),
        certs.ca.display()
    )
}

/// One HTTP/1.1 request over TLS, trusting only the test CA; the status and the body.
fn https(port: u16, ca_der: &[u8], request: &[u8]) -> (u16, String) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_der.to_vec().into()).unwrap();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = "localhost".try_into().unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(request).unwrap();
    let mut response = Vec::new();
    let _ = tls.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

fn batch() -> Vec<u8> {
    let now = now_ms();
    wire::encode(&wire::Batch {
        write_key: "tls-key".into(),
        sent_at_ms: now,
        consent: 0b0011,
        context: wire::Context {
            anonymous_id: Some("tls-visitor".into()),
            ..Default::default()
        },
        events: vec![wire::Event {
            message_id: [7; 16],
            timestamp_ms: now,
            kind: wire::EventKind::Page,
            purpose: wire::Purpose::Analytics,
            ..Default::default()
        }],
    })
}

#[test]
fn batches_arrive_over_https_and_redis_over_tls_as_an_acl_user() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let (_redis, redis_port) = tls_redis(dir.path(), &certs);
    let port = free_port();
    let conf = dir.path().join("ingest.toml");
    std::fs::write(&conf, config(port, redis_port, "s3cret", &certs)).unwrap();
    let _ingest = Killed(
        ingest_command()
            .arg("--config")
            .arg(&conf)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_port(port);

    // A client that connects and never says hello holds up nobody.
    let _stalled = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let body = batch();
    let mut request = format!(
        "POST /v1/fb HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    let (status, answer) = https(port, &certs.ca_der, &request);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer, r#"{"accepted":1,"rejected":[]}"#);
    let (status, _) = https(
        port,
        &certs.ca_der,
        b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200);
    // Plain HTTP on the HTTPS port gets no answer.
    let mut plain = TcpStream::connect(("127.0.0.1", port)).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    plain
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 64];
    let n = plain.read(&mut buf).unwrap_or(0);
    assert!(!buf[..n].starts_with(b"HTTP/1.1 200"));
}

#[test]
fn a_bad_certificate_or_a_wrong_redis_password_stops_the_collector_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let (_redis, redis_port) = tls_redis(dir.path(), &certs);
    let run = |toml: String| {
        let conf = dir.path().join("bad.toml");
        std::fs::write(&conf, toml).unwrap();
        let out = ingest_command()
            .arg("--config")
            .arg(&conf)
            .env("RUST_LOG", "error")
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(config(free_port(), redis_port, "wrong", &certs));
    assert!(err.contains("Password authentication failed"), "{err}");
    let not_a_cert = dir.path().join("empty.pem");
    std::fs::write(&not_a_cert, "nothing here\n").unwrap();
    let toml = config(free_port(), redis_port, "s3cret", &certs).replace(
        &format!("cert = \"{}\"", certs.cert.display()),
        &format!("cert = \"{}\"", not_a_cert.display()),
    );
    let err = run(toml);
    assert!(
        err.contains(&format!(
            "tls.cert: no certificate in {}",
            not_a_cert.display()
        )),
        "{err}"
    );
}
