//! The Redis key schema (version [`SCHEMA_VERSION`]): the one place key names are spelled.
//! Connectors read these keys directly; the README documents them as a contract.
//!
//! Every key of a profile carries the profile id as Redis Cluster hash tag, so one profile's
//! keys share a slot: `profile:{u:alice}`, `profile:{u:alice}:cart`, ...

use crate::model::ProfileId;

/// The version stored in [`SCHEMA_VERSION_KEY`]; bumped on incompatible changes.
pub const SCHEMA_VERSION: &str = "1";
/// Holds the schema version of the data in this Redis.
pub const SCHEMA_VERSION_KEY: &str = "meta:schema_version";
/// The raw event log: one entry per applied event.
pub const EVENT_STREAM: &str = "stream:events";

/// The keys of one profile, in the order the apply script receives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileKeys {
    /// Hash of scalars: counters, times, ids, consent.
    pub profile: String,
    /// Hash: trait name to text.
    pub traits: String,
    /// Hash: event name to count.
    pub counts: String,
    /// Set: `anon:<id>` and `user:<id>`.
    pub ids: String,
    /// Sorted set: product id to last viewed (Unix ms).
    pub viewed: String,
    /// Sorted set: category to views.
    pub cat_viewed: String,
    /// Sorted set: category to items bought.
    pub cat_bought: String,
    /// Hash: product id to `{"quantity","price","category"}` JSON.
    pub cart: String,
    /// Sorted set: message id (32 hex digits) to received-at (Unix ms).
    pub dedupe: String,
}

impl ProfileKeys {
    /// The keys of `id`.
    pub fn new(id: &ProfileId) -> Self {
        let base = format!("profile:{{{id}}}");
        Self {
            traits: format!("{base}:traits"),
            counts: format!("{base}:counts"),
            ids: format!("{base}:ids"),
            viewed: format!("{base}:viewed"),
            cat_viewed: format!("{base}:cat_viewed"),
            cat_bought: format!("{base}:cat_bought"),
            cart: format!("{base}:cart"),
            dedupe: format!("{base}:dedupe"),
            profile: base,
        }
    }

    /// All keys, `profile` first, in the script's `KEYS` order.
    pub fn all(&self) -> [&str; 9] {
        [
            &self.profile,
            &self.traits,
            &self.counts,
            &self.ids,
            &self.viewed,
            &self.cat_viewed,
            &self.cat_bought,
            &self.cart,
            &self.dedupe,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_of_a_profile_shares_its_hash_tag() {
        let keys = ProfileKeys::new(&ProfileId::user("alice").unwrap());
        assert_eq!(keys.profile, "profile:{u:alice}");
        assert_eq!(keys.cart, "profile:{u:alice}:cart");
        for k in keys.all() {
            assert!(k.starts_with("profile:{u:alice}"), "{k}");
        }
    }
}
