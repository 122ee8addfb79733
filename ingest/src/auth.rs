//! Who may read what: API tokens with scopes, kept in the configuration as SHA-256 hashes and
//! checked in constant time, and the audit log every access to a profile is written to.
//!
//! Write keys are not here: they sit in web pages, are public, and only let a site send
//! events (see [`crate::config::WriteKey`]).

use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use axum::http::{HeaderMap, header};
use profile_cache::StoreError;
use profile_cache::audit::{AuditEntry, AuditResult, AuditStream, Operation, Subject};
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;
use tracing::info;

use crate::error::ApiError;

/// What a token allows. [`Scope::Admin`] allows everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Scope {
    /// Read profiles: `GET /v1/profiles/{id}`.
    #[serde(rename = "profiles:read")]
    ProfilesRead,
    /// Read segments and their members: `GET /v1/segments`, `GET /v1/segments/{name}/members`.
    #[serde(rename = "segments:read")]
    SegmentsRead,
    /// Export and erase people (privacy requests).
    #[serde(rename = "privacy:write")]
    PrivacyWrite,
    /// Every scope.
    #[serde(rename = "admin")]
    Admin,
}

impl Scope {
    /// Every scope, as written in the configuration.
    pub const ALL: [Scope; 4] = [
        Scope::ProfilesRead,
        Scope::SegmentsRead,
        Scope::PrivacyWrite,
        Scope::Admin,
    ];

    /// The name used in the configuration and in error bodies, e.g. `profiles:read`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::ProfilesRead => "profiles:read",
            Scope::SegmentsRead => "segments:read",
            Scope::PrivacyWrite => "privacy:write",
            Scope::Admin => "admin",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The shortest token [`TokenHash::of_token`] accepts.
pub const MIN_TOKEN_CHARS: usize = 8;

/// The SHA-256 of an API token: what the configuration holds instead of the token. A
/// leaked configuration then does not leak read access.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenHash([u8; 32]);

/// A token that [`TokenHash::of_token`] refuses to hash.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Shorter than [`MIN_TOKEN_CHARS`] once surrounding whitespace is removed.
    #[error(
        "the token is {chars} characters, at least {MIN_TOKEN_CHARS} are needed; make one with e.g. `openssl rand -hex 32`"
    )]
    TooShort {
        /// Its length in characters.
        chars: usize,
    },
}

impl TokenHash {
    /// The hash of `token` as a client sends it in `Authorization: Bearer <token>`.
    /// Surrounding whitespace is not part of a token (the collector trims it from the
    /// header too), so a token file with a final newline hashes like the token.
    pub fn of(token: &str) -> Self {
        Self(Sha256::digest(token.trim().as_bytes()).into())
    }

    /// As [`TokenHash::of`], for a new token: refuses one too short to be secret.
    ///
    /// # Errors
    /// [`TokenError::TooShort`].
    pub fn of_token(token: &str) -> Result<Self, TokenError> {
        let chars = token.trim().chars().count();
        if chars < MIN_TOKEN_CHARS {
            return Err(TokenError::TooShort { chars });
        }
        Ok(Self::of(token))
    }

    /// The digest.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for TokenHash {
    /// 64 lowercase hex digits, as written in the configuration.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({self})")
    }
}

impl FromStr for TokenHash {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut digest = [0; 32];
        match hex::decode_to_slice(s, &mut digest) {
            Ok(()) => Ok(Self(digest)),
            Err(_) => Err(format!(
                "{s:?} is not a SHA-256 (64 hex digits); `ingest hash-token` prints the hash of a token read from stdin"
            )),
        }
    }
}

impl Serialize for TokenHash {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TokenHash {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(de::Error::custom)
    }
}

/// What to write instead of a plain-text token, for errors about the old `api_tokens`
/// shape.
pub const TOKEN_TABLE_HELP: &str = r#"list each token as a table with a name, the SHA-256 of the token and its scopes:

    [[api_tokens]]
    name = "crm-sync"
    sha256 = "<64 hex digits>"
    scopes = ["profiles:read", "segments:read"]

print the sha256 with `ingest hash-token < token-file` (it reads the token from stdin); scopes are profiles:read, segments:read, privacy:write and admin (admin allows everything)"#;

/// A configured API token: `[[api_tokens]]` with `name`, `sha256` and `scopes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiToken {
    /// Who uses it, e.g. `crm-sync`: what the audit stream and the logs record. Letters,
    /// digits, `.`, `_` and `-`, at most [`MAX_TOKEN_NAME`] characters, unique.
    pub name: String,
    /// The SHA-256 of the token.
    pub sha256: TokenHash,
    /// What it allows.
    pub scopes: Vec<Scope>,
}

/// The longest token name.
pub const MAX_TOKEN_NAME: usize = 64;

impl ApiToken {
    /// Whether the token allows `scope` (`admin` allows every scope).
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes
            .iter()
            .any(|s| *s == scope || *s == Scope::Admin)
    }

    /// Succeeds when the token allows `scope`.
    ///
    /// # Errors
    /// [`ApiError::MissingScope`] naming `scope`.
    pub fn require(&self, scope: Scope) -> Result<(), ApiError> {
        if self.allows(scope) {
            Ok(())
        } else {
            Err(ApiError::MissingScope { scope })
        }
    }
}

impl<'de> Deserialize<'de> for ApiToken {
    /// A table; a plain string (the shape before tokens were hashed) is refused with the
    /// new shape spelled out.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            name: String,
            sha256: TokenHash,
            scopes: Vec<Scope>,
        }

        struct TokenVisitor;

        impl<'de> Visitor<'de> for TokenVisitor {
            type Value = ApiToken;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table with name, sha256 and scopes")
            }

            fn visit_str<E: de::Error>(self, _token: &str) -> Result<ApiToken, E> {
                Err(E::custom(format!(
                    "plain-text API tokens are no longer accepted; {TOKEN_TABLE_HELP}"
                )))
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ApiToken, A::Error> {
                let t = Table::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(ApiToken {
                    name: t.name,
                    sha256: t.sha256,
                    scopes: t.scopes,
                })
            }
        }

        deserializer.deserialize_any(TokenVisitor)
    }
}

/// The configured token that the request's `Authorization: Bearer <token>` names. Every
/// configured hash is compared, in constant time, whatever matches: response timing says
/// nothing about which token, or how much of one, matched.
///
/// # Errors
/// [`ApiError::MissingToken`] without a bearer token, [`ApiError::InvalidToken`] with one
/// that is not configured.
pub fn authenticate<'t>(
    tokens: &'t [ApiToken],
    headers: &HeaderMap,
) -> Result<&'t ApiToken, ApiError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(ApiError::MissingToken)?;
    let presented = TokenHash::of(token);
    let mut found = None;
    for t in tokens {
        if bool::from(t.sha256.0.ct_eq(&presented.0)) {
            found = Some(t);
        }
    }
    found.ok_or(ApiError::InvalidToken)
}

/// The [`Subject`] of an id: SHA-256 of the id as the caller named it.
pub fn subject(id: &str) -> Subject {
    Subject::from_sha256(Sha256::digest(id.as_bytes()).into())
}

/// Where audit entries go: the Redis stream ([`AuditStream`]), or [`MemoryAuditLog`] in
/// handler tests.
#[async_trait]
pub trait AuditLog: Send + Sync + 'static {
    /// Appends one entry.
    async fn append(&self, entry: &AuditEntry) -> Result<(), StoreError>;
}

#[async_trait]
impl AuditLog for AuditStream {
    async fn append(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        AuditStream::append(self, entry).await.map(|_| ())
    }
}

/// Records `actor`'s `operation` on the profile named `id` with its `result`: appends it to
/// the audit log, and logs it without personal data (the token's name, the operation, the
/// result; neither the id nor its hash). Every read, export and deletion of a profile calls
/// this before it answers.
///
/// # Errors
/// The audit log's, when the entry could not be appended.
pub async fn record(
    log: &dyn AuditLog,
    actor: &ApiToken,
    operation: Operation,
    id: &str,
    at: OffsetDateTime,
    result: AuditResult,
) -> Result<(), StoreError> {
    info!(actor = %actor.name, %operation, %result, "profile access");
    log.append(&AuditEntry {
        actor: actor.name.clone(),
        operation,
        subject: subject(id),
        at,
        result,
    })
    .await
}

/// An in-memory audit log for handler tests: keeps every entry, and can be made to fail.
#[derive(Default)]
pub struct MemoryAuditLog {
    entries: Mutex<Vec<AuditEntry>>,
    down: AtomicBool,
}

impl MemoryAuditLog {
    /// Every entry appended so far, oldest first.
    pub fn entries(&self) -> Vec<AuditEntry> {
        self.lock().clone()
    }

    /// Makes `append` fail as an unreachable Redis would.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<AuditEntry>> {
        // A poisoned lock only means a test panicked mid-append; the entries are usable.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl AuditLog for MemoryAuditLog {
    async fn append(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        if self.down.load(Ordering::Relaxed) {
            return Err(StoreError::Unavailable(redis::RedisError::from((
                redis::ErrorKind::Io,
                "memory audit log is down",
            ))));
        }
        self.lock().push(entry.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_hashes_are_the_sha256_of_the_trimmed_token() {
        // `printf %s abc | sha256sum`
        let hash = TokenHash::of("abc");
        assert_eq!(
            hash.to_string(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(TokenHash::of(" abc\n"), hash);
        assert_eq!(hash.to_string().parse::<TokenHash>(), Ok(hash));
        assert_eq!(
            hash.to_string().to_uppercase().parse::<TokenHash>(),
            Ok(hash)
        );
        assert!("ba7816bf".parse::<TokenHash>().is_err());
        assert_eq!(
            TokenHash::of_token("short\n"),
            Err(TokenError::TooShort { chars: 5 })
        );
    }

    #[test]
    fn admin_allows_every_scope() {
        let token = |scopes: Vec<Scope>| ApiToken {
            name: "t".into(),
            sha256: TokenHash::of("t"),
            scopes,
        };
        let admin = token(vec![Scope::Admin]);
        assert!(Scope::ALL.iter().all(|s| admin.allows(*s)));
        let reader = token(vec![Scope::ProfilesRead]);
        let allowed: Vec<Scope> = Scope::ALL
            .into_iter()
            .filter(|s| reader.allows(*s))
            .collect();
        assert_eq!(allowed, [Scope::ProfilesRead]);
    }
}
