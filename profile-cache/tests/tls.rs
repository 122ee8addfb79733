//! `rediss://` against a real redis-server that speaks TLS only, with certificates made for
//! the test by a private CA and a Redis ACL user: the store connects with the CA file and
//! the user's password, and refuses a wrong password, an unknown CA and plain text.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use profile_cache::testing::free_port;
use profile_cache::{
    Context, Event, EventKind, ProfileConfig, ProfileId, ProfileUpdate, Purpose, RedisProfiles,
    RedisTls, StoreError,
};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// A private CA and a server certificate for 127.0.0.1 and localhost, as PEM files in `dir`.
struct Certs {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

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
    }
}

/// redis-server with TLS only (`port 0`), the default user off and user `collector`.
struct TlsRedis {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
    certs: Certs,
}

impl TlsRedis {
    fn start() -> TlsRedis {
        let dir = tempfile::tempdir().unwrap();
        let certs = certs(dir.path());
        let port = free_port().unwrap();
        let conf = dir.path().join("redis.conf");
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
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        TlsRedis {
            child,
            port,
            _dir: dir,
            certs,
        }
    }

    fn url(&self, password: &str) -> String {
        format!("rediss://collector:{password}@127.0.0.1:{}", self.port)
    }

    fn config(&self) -> ProfileConfig {
        ProfileConfig {
            redis_tls: RedisTls {
                ca_file: Some(self.certs.ca.clone()),
                ..RedisTls::default()
            },
            redis_timeout: Duration::from_secs(2),
            ..ProfileConfig::default()
        }
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn page_view() -> ProfileUpdate {
    let now = time::OffsetDateTime::now_utc();
    ProfileUpdate {
        profile: ProfileId::anonymous("v1").unwrap(),
        anonymous_id: Some("v1".into()),
        user_id: None,
        context: Context::default(),
        events: vec![Event {
            message_id: uuid::Uuid::from_u128(1),
            kind: EventKind::Page,
            name: None,
            timestamp: now,
            received_at: now,
            properties: vec![],
            items: vec![],
            user_id: None,
            previous_id: None,
            order_id: None,
            revenue: 0,
            currency: None,
            consent: None,
            purpose: Purpose::Analytics,
        }],
    }
}

#[tokio::test]
async fn the_store_works_over_tls_as_an_acl_user() {
    let redis = TlsRedis::start();
    let store = RedisProfiles::connect(&redis.url("s3cret"), redis.config())
        .await
        .unwrap();
    let report = store.apply(&[page_view()]).await.unwrap();
    assert_eq!(report.applied, 1);
    let p = store
        .profile(
            &ProfileId::anonymous("v1").unwrap(),
            time::OffsetDateTime::now_utc(),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(p.page_views, 1);
}

#[tokio::test]
async fn a_wrong_password_an_unknown_ca_or_plain_text_is_refused() {
    let redis = TlsRedis::start();
    let err = RedisProfiles::connect(&redis.url("wrong"), redis.config())
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "redis error: Password authentication failed - AuthenticationFailed"
    );

    // The system's roots do not know the private CA.
    let err = RedisProfiles::connect(&redis.url("s3cret"), ProfileConfig::default())
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Unavailable(_) | StoreError::Redis(_)),
        "{err}"
    );

    let plain = format!("redis://collector:s3cret@127.0.0.1:{}", redis.port);
    assert!(
        RedisProfiles::connect(&plain, redis.config())
            .await
            .is_err()
    );

    let missing = ProfileConfig {
        redis_tls: RedisTls {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..RedisTls::default()
        },
        ..ProfileConfig::default()
    };
    let err = RedisProfiles::connect(&redis.url("s3cret"), missing)
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "redis tls: /nonexistent/ca.pem: No such file or directory (os error 2)"
    );
}
