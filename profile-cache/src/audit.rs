//! The audit stream ([`keys::AUDIT_STREAM`]): who read, exported or deleted which profile,
//! when, and with what result, one entry per access.
//!
//! The profile is recorded only as the SHA-256 of its id ([`Subject`]), so erasing a person
//! leaves no readable id behind in the audit trail, while an auditor who knows an id can
//! still find its entries by hashing it. The stream is written with one single-key `XADD`,
//! never inside a script with other keys, so it can live in any Redis Cluster slot.

use std::fmt;

use redis::aio::ConnectionManager;
use time::OffsetDateTime;

use crate::keys;
use crate::store::{RedisProfiles, StoreError};

/// What was done to a profile (the entry's `operation` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// The profile was read (`GET /v1/profiles/{id}`): `profile_read`.
    ProfileRead,
    /// Everything stored about the person was exported: `profile_export`.
    ProfileExport,
    /// The person was erased: `profile_delete`.
    ProfileDelete,
}

impl Operation {
    /// The value written to the stream.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::ProfileRead => "profile_read",
            Operation::ProfileExport => "profile_export",
            Operation::ProfileDelete => "profile_delete",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the access ended (the entry's `result` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuditResult {
    /// Done: `ok`.
    Ok,
    /// No profile has the id: `not_found`.
    NotFound,
    /// The caller is known but its token lacks the scope the operation needs: `forbidden`.
    Forbidden,
}

impl AuditResult {
    /// The value written to the stream.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditResult::Ok => "ok",
            AuditResult::NotFound => "not_found",
            AuditResult::Forbidden => "forbidden",
        }
    }
}

impl fmt::Display for AuditResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The profile an entry is about: the SHA-256 of the id as the caller named it (`alice` in
/// `GET /v1/profiles/alice`), never the id itself. Written as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Subject([u8; 32]);

impl Subject {
    /// The subject whose id hashes to `digest` (SHA-256 of the id's UTF-8 bytes; this crate
    /// has no hash function of its own, so the caller computes it).
    pub fn from_sha256(digest: [u8; 32]) -> Self {
        Self(digest)
    }

    /// The digest.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Subject({self})")
    }
}

/// One access to a profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    /// Who: the name of the API token used (`actor`).
    pub actor: String,
    /// What (`operation`).
    pub operation: Operation,
    /// Which profile (`subject`).
    pub subject: Subject,
    /// When (`at`, Unix ms).
    pub at: OffsetDateTime,
    /// How it ended (`result`).
    pub result: AuditResult,
}

impl AuditEntry {
    /// The stream entry's field-value pairs, in the order written.
    pub fn fields(&self) -> [(&'static str, String); 5] {
        // Milliseconds within ±10^4 years fit an i64.
        let at_ms = self.at.unix_timestamp_nanos().div_euclid(1_000_000) as i64;
        [
            ("actor", self.actor.clone()),
            ("operation", self.operation.as_str().to_string()),
            ("subject", self.subject.to_string()),
            ("at", at_ms.to_string()),
            ("result", self.result.as_str().to_string()),
        ]
    }
}

/// Appends entries to the audit stream, capped at about `max_len` entries. Cheap to clone;
/// clones share the store's connection.
#[derive(Clone)]
pub struct AuditStream {
    conn: ConnectionManager,
    max_len: u64,
}

impl fmt::Debug for AuditStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditStream")
            .field("max_len", &self.max_len)
            .finish_non_exhaustive()
    }
}

impl RedisProfiles {
    /// The audit stream on this store's Redis, capped with `XADD MAXLEN ~ max_len`: Redis
    /// trims whole internal nodes, so the length stays at or a little above the cap, and
    /// entries past it are lost unless a consumer has shipped them elsewhere.
    pub fn audit_stream(&self, max_len: u64) -> AuditStream {
        AuditStream {
            conn: self.conn.clone(),
            max_len,
        }
    }
}

impl AuditStream {
    /// Appends `entry` in one round trip and returns the stream entry's id.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when Redis does not answer, or another Redis error (the
    /// key holds something that is not a stream).
    pub async fn append(&self, entry: &AuditEntry) -> Result<String, StoreError> {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(keys::AUDIT_STREAM)
            .arg("MAXLEN")
            .arg("~")
            .arg(self.max_len)
            .arg("*");
        for (field, value) in entry.fields() {
            cmd.arg(field).arg(value);
        }
        let mut conn = self.conn.clone();
        let id: String = cmd.query_async(&mut conn).await?;
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn entries_carry_the_hash_never_the_id() {
        let entry = AuditEntry {
            actor: "crm-sync".into(),
            operation: Operation::ProfileRead,
            subject: Subject::from_sha256([0xab; 32]),
            at: datetime!(2026-11-29 12:00:00.123 UTC),
            result: AuditResult::NotFound,
        };
        assert_eq!(
            entry.fields(),
            [
                ("actor", "crm-sync".to_string()),
                ("operation", "profile_read".to_string()),
                ("subject", "ab".repeat(32)),
                ("at", "1795953600123".to_string()),
                ("result", "not_found".to_string()),
            ]
        );
        assert_eq!(Operation::ProfileExport.as_str(), "profile_export");
        assert_eq!(Operation::ProfileDelete.as_str(), "profile_delete");
        assert_eq!(AuditResult::Forbidden.to_string(), "forbidden");
        assert_eq!(AuditResult::Ok.to_string(), "ok");
    }
}
