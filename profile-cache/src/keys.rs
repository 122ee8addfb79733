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
/// Stream key of segment transitions: one entry per profile entering or leaving a segment.
pub const TRANSITION_STREAM: &str = "stream:transitions";
/// Stream key of the audit trail: one entry per read, export or deletion of a profile
/// (`actor`, `operation`, `subject` = SHA-256 of the id, `at`, `result`; see
/// [`crate::audit`]). Written alone with `XADD`, never together with other keys, so it may
/// live in any Redis Cluster slot.
pub const AUDIT_STREAM: &str = "stream:audit";
/// Sorted set: profile id scored by its next deadline (Unix ms), the earliest time one of
/// its segment memberships may change without a new event.
pub const DEADLINES: &str = "schedule:deadlines";

/// Hash: the segment definitions whose memberships are complete in this Redis: segment
/// name to the fingerprint of its compiled condition
/// ([`crate::segments::Segment::fingerprint`]). Written when a rebuild finishes
/// ([`crate::rebuild`]). The keys of the rebuild share the hash tag `{segments}`, so its
/// scripts touch one slot.
pub const SEGMENT_DEFINITIONS: &str = "meta:{segments}:definitions";
/// Hash: the progress of an unfinished rebuild: `target` (the fingerprint of the
/// definitions it rebuilds for), `cursor` (the `SCAN` cursor of its walk over profiles),
/// `started_at` (ms), `profiles` and `changes` (evaluated and changed so far).
pub const REBUILD_PROGRESS: &str = "meta:{segments}:rebuild";
/// String with an expiry: the owner token of the collector running the rebuild.
pub const REBUILD_LEASE: &str = "meta:{segments}:rebuild_lease";
/// The `SCAN ... MATCH` pattern of the profile hashes ([`profile`]): a profile id never
/// contains braces, so only `profile:{ID}` itself ends with `}`.
pub const PROFILE_PATTERN: &str = "profile:{*}";

/// The `SCAN ... MATCH` pattern of the suppression keys ([`suppressed`]).
pub const SUPPRESSED_PATTERN: &str = "suppressed:*";

/// The profile id inside a [`profile`] key (`u:alice` for `profile:{u:alice}`); `None` for
/// any other key.
pub fn profile_of_key(key: &str) -> Option<&str> {
    key.strip_prefix("profile:{")?.strip_suffix('}')
}

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

/// Hash: windowed event counts, one field per hourly bucket of an (event, category) pair
/// that a segment counts ([`window_field`]) to the number of events in it.
pub fn windows(id: &ProfileId) -> String {
    format!("profile:{{{id}}}:windows")
}

/// Hash: the name of each segment the profile is in to when it entered (Unix ms).
pub fn segments(id: &ProfileId) -> String {
    format!("profile:{{{id}}}:segments")
}

/// Hash: the anonymous profiles merged into this user profile, or refused: anonymous profile
/// id (`a:<id>`) to when it was merged (Unix ms), `folded` (its data is here, its keys not yet
/// deleted), `refused` (it had been merged into another user) or `limit` (this profile had as
/// many anonymous ids as it may take).
pub fn merges(id: &ProfileId) -> String {
    format!("profile:{{{id}}}:merges")
}

/// String: set when the person whose profile `id` was is erased
/// ([`crate::privacy`]), holding when (Unix ms); the apply script then writes nothing for
/// `id` again. The key names neither the id nor its hash tag: it is
/// `suppressed:{<slot tag>}:<SHA-256 of the profile id, hex>`, where the slot tag
/// ([`slot_tag`]) puts it in the Redis Cluster slot of `{id}`, so the apply script's check
/// stays within the profile's slot.
pub fn suppressed(id: &ProfileId) -> String {
    let tag = slot_tag(slot(id.as_str()));
    format!(
        "suppressed:{{{tag}}}:{}",
        crate::privacy::hash_id(id.as_str())
    )
}

/// The Redis Cluster slot of a key whose hash tag is `tag`: CRC16 (XMODEM) of its bytes,
/// modulo 16,384.
pub fn slot(tag: &str) -> u16 {
    let mut crc: u16 = 0;
    for &b in tag.as_bytes() {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc & 0x3fff
}

/// The hash tag of [`suppressed`] keys in `slot`: the smallest non-negative integer, in
/// decimal, whose [`slot`] is `slot` (all are below 110,000). A fixed rule, so that any
/// reader can compute the key; the table is built once, from about 110,000 CRCs.
pub fn slot_tag(slot: u16) -> u32 {
    static TAGS: std::sync::LazyLock<Vec<u32>> = std::sync::LazyLock::new(|| {
        let mut tags = vec![u32::MAX; 16_384];
        let mut missing = tags.len();
        let mut n = 0u32;
        while missing > 0 {
            let entry = &mut tags[usize::from(self::slot(&n.to_string()))];
            if *entry == u32::MAX {
                *entry = n;
                missing -= 1;
            }
            n += 1;
        }
        tags
    });
    TAGS[usize::from(slot & 0x3fff)]
}

/// Sorted set: the profile ids in segment `name`, scored by when they entered (Unix ms).
/// Segment names are lowercase letters, digits, `_` and `-`, so the name is the hash tag.
pub fn segment_members(name: &str) -> String {
    format!("segment:{{{name}}}:members")
}

/// The field of the [`windows`] bucket of `hour` (Unix ms / 3,600,000, rounded down): the
/// JSON array `[hour,"event"]`, or `[hour,"event","category"]` for events with an item in
/// that category.
pub fn window_field(hour: i64, event: &str, category: Option<&str>) -> String {
    format!("[{hour}{}", window_field_tail(event, category))
}

/// What follows the hour in a [`window_field`]: `,"event"]` or `,"event","category"]`.
pub(crate) fn window_field_tail(event: &str, category: Option<&str>) -> String {
    let json = |s: &str| serde_json::Value::from(s).to_string();
    match category {
        None => format!(",{}]", json(event)),
        Some(category) => format!(",{},{}]", json(event), json(category)),
    }
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
    /// [`windows`]
    pub windows: String,
    /// [`segments`]
    pub segments: String,
    /// [`merges`]
    pub merges: String,
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
            windows: windows(id),
            segments: segments(id),
            merges: merges(id),
        }
    }

    /// All keys, `profile` first, in the script's `KEYS` order.
    pub fn all(&self) -> [&str; 12] {
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
            &self.windows,
            &self.segments,
            &self.merges,
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
                "profile:{u:alice}:windows",
                "profile:{u:alice}:segments",
                "profile:{u:alice}:merges",
            ]
        );
        let anon = ProfileId::anonymous("7f3a").unwrap();
        assert_eq!(cart(&anon), "profile:{a:7f3a}:cart");
        assert_eq!(
            segment_members("cart_abandoners_30m"),
            "segment:{cart_abandoners_30m}:members"
        );
    }

    #[test]
    fn profile_keys_give_back_their_id() {
        let id = ProfileId::user("alice").unwrap();
        assert_eq!(profile_of_key(&profile(&id)), Some("u:alice"));
        assert_eq!(profile_of_key(&cart(&id)), None);
        assert_eq!(profile_of_key("profiles:{u:alice}"), None);
        // The rebuild's keys share one slot.
        for key in [SEGMENT_DEFINITIONS, REBUILD_PROGRESS, REBUILD_LEASE] {
            assert!(key.contains("{segments}"), "{key}");
        }
    }

    #[test]
    fn slots_are_redis_cluster_slots() {
        // The CRC16 check value, and `CLUSTER KEYSLOT` of the Redis Cluster specification.
        assert_eq!(slot("123456789"), 0x31c3);
        assert_eq!(slot("foo"), 12_182);
        assert_eq!(slot("somekey"), 11_058);
        assert_eq!(slot("hello"), 866);
        for s in [0, 1, 866, 12_182, 16_383] {
            assert_eq!(slot(&slot_tag(s).to_string()), s);
        }
        assert_eq!(slot_tag(slot("0")), 0);
        assert!((0..16_384).all(|s| slot_tag(s) < 110_000));
    }

    #[test]
    fn suppression_keys_share_the_profile_slot_without_naming_it() {
        let id = ProfileId::user("alice").unwrap();
        let key = suppressed(&id);
        // `printf %s u:alice | sha256sum`
        let digest = "5f56e41a45f480f8942ca0bae83a7e0c55b9f45ee70c84e4daa1f79feae48dd3";
        let tag = slot_tag(slot("u:alice"));
        assert_eq!(key, format!("suppressed:{{{tag}}}:{digest}"));
        assert!(!key.contains("alice"));
        assert_eq!(slot(&tag.to_string()), slot("u:alice"));
        let anon = ProfileId::anonymous("alice").unwrap();
        assert_ne!(suppressed(&anon), key);
    }

    #[test]
    fn global_streams_are_spelled_as_documented() {
        assert_eq!(EVENT_STREAM, "stream:events");
        assert_eq!(TRANSITION_STREAM, "stream:transitions");
        assert_eq!(AUDIT_STREAM, "stream:audit");
    }

    #[test]
    fn window_fields_are_json_arrays() {
        assert_eq!(
            window_field(493_512, "product_viewed", Some("shoes/men")),
            r#"[493512,"product_viewed","shoes/men"]"#
        );
        assert_eq!(
            window_field(-1, "Signed \"Up\"", None),
            r#"[-1,"Signed \"Up\""]"#
        );
        let parsed: (i64, String, String) =
            serde_json::from_str(&window_field(7, "a", Some("b"))).unwrap();
        assert_eq!(parsed, (7, "a".into(), "b".into()));
    }
}
