//! The Redis key schema (version [`SCHEMA_VERSION`]): the one place key names are spelled.
//! Connectors read these keys directly; `docs/KEY_SCHEMA.md` documents them as a contract.
//!
//! Every key of a profile carries the profile id as Redis Cluster hash tag, so one profile's
//! keys share a slot: `profile:{u:alice}`, `profile:{u:alice}:cart`, ... Profile ids never
//! contain braces ([`crate::model::check_id`]), so the tag is always the whole id.

use crate::model::ProfileId;

/// The version stored in [`SCHEMA_VERSION_KEY`]; bumped on incompatible changes.
pub const SCHEMA_VERSION: &str = "1";
/// String key holding the schema version of the data in this Redis.
pub const SCHEMA_VERSION_KEY: &str = "meta:schema_version";
/// Stream key of the raw event log: one entry per applied event.
pub const EVENT_STREAM: &str = "stream:events";

/// Hash of a profile's scalars: ids, times, counters, consent.
pub fn profile(id: &ProfileId) -> String {
    format!("profile:{{{id}}}")
}

/// Hash: trait name to its text form.
pub fn traits(id: &ProfileId) -> String {
    format!("profile:{{{id}}}:traits")
}

/// Hash: event name (the kind, or a track event's name) to count.
pub fn counts(id: &ProfileId) -> String {
    format!("profile:{{{id}}}:counts")
}

/// Set: `anon:<anonymous id>` and `user:<user id>` seen on the profile.
pub fn ids(id: &ProfileId) -> String {
    format!("profile:{{{id}}}:ids")
}

/// Sorted set: product id scored by when it was last viewed (Unix ms), newest kept.
pub fn viewed(id: &ProfileId) -> String {
    format!("profile:{{{id}}}:viewed")
}

/// Sorted set: category scored by product views.
pub fn cat_viewed(id: &ProfileId) -> String {
    format!("profile:{{{id}}}:cat_viewed")
}

/// Sorted set: category scored by items bought.
pub fn cat_bought(id: &ProfileId) -> String {
    format!("profile:{{{id}}}:cat_bought")
}

/// Hash: product id to `{"quantity":n,"price":p,"category":c}`.
pub fn cart(id: &ProfileId) -> String {
    format!("profile:{{{id}}}:cart")
}

/// Sorted set: applied message id (32 hex digits) scored by when it was received (Unix ms).
pub fn dedupe(id: &ProfileId) -> String {
    format!("profile:{{{id}}}:dedupe")
}

/// The keys of one profile, in the order the apply script receives them as `KEYS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileKeys {
    /// [`profile`]
    pub profile: String,
    /// [`traits`]
    pub traits: String,
    /// [`counts`]
    pub counts: String,
    /// [`ids`]
    pub ids: String,
    /// [`viewed`]
    pub viewed: String,
    /// [`cat_viewed`]
    pub cat_viewed: String,
    /// [`cat_bought`]
    pub cat_bought: String,
    /// [`cart`]
    pub cart: String,
    /// [`dedupe`]
    pub dedupe: String,
}

impl ProfileKeys {
    /// The keys of `id`.
    pub fn new(id: &ProfileId) -> Self {
        Self {
            profile: profile(id),
            traits: traits(id),
            counts: counts(id),
            ids: ids(id),
            viewed: viewed(id),
            cat_viewed: cat_viewed(id),
            cat_bought: cat_bought(id),
            cart: cart(id),
            dedupe: dedupe(id),
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
        assert_eq!(
            keys.all(),
            [
                "profile:{u:alice}",
                "profile:{u:alice}:traits",
                "profile:{u:alice}:counts",
                "profile:{u:alice}:ids",
                "profile:{u:alice}:viewed",
                "profile:{u:alice}:cat_viewed",
                "profile:{u:alice}:cat_bought",
                "profile:{u:alice}:cart",
                "profile:{u:alice}:dedupe",
            ]
        );
        let anon = ProfileId::anonymous("7f3a").unwrap();
        assert_eq!(cart(&anon), "profile:{a:7f3a}:cart");
    }
}
