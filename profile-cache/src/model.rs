//! Domain types: what happened (events), under which consent, to whom (profile ids), and
//! what we know about a person (profiles). No Redis, no FlatBuffers, no HTTP here.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

/// The longest id (user, anonymous, session, product) accepted, in bytes.
pub const MAX_ID_BYTES: usize = 256;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A page view.
    Page,
    /// A custom, named event.
    Track,
    /// Traits about the person; links the visitor to a user id.
    Identify,
    /// Links a previous id to a new one.
    Alias,
    /// The visitor changed consent.
    ConsentChange,
    /// A product page was seen.
    ProductViewed,
    /// Items were added to the cart.
    CartAdd,
    /// Items were removed from the cart.
    CartRemove,
    /// The visitor started checkout.
    CheckoutStarted,
    /// An order was placed.
    OrderCompleted,
    /// A marketing email was opened.
    EmailOpened,
    /// A link in a marketing email was clicked.
    EmailClicked,
}

impl EventKind {
    /// Every kind, in wire order.
    pub const ALL: [EventKind; 12] = [
        EventKind::Page,
        EventKind::Track,
        EventKind::Identify,
        EventKind::Alias,
        EventKind::ConsentChange,
        EventKind::ProductViewed,
        EventKind::CartAdd,
        EventKind::CartRemove,
        EventKind::CheckoutStarted,
        EventKind::OrderCompleted,
        EventKind::EmailOpened,
        EventKind::EmailClicked,
    ];

    /// The snake_case name used in Redis and JSON (`"cart_add"`).
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Page => "page",
            EventKind::Track => "track",
            EventKind::Identify => "identify",
            EventKind::Alias => "alias",
            EventKind::ConsentChange => "consent_change",
            EventKind::ProductViewed => "product_viewed",
            EventKind::CartAdd => "cart_add",
            EventKind::CartRemove => "cart_remove",
            EventKind::CheckoutStarted => "checkout_started",
            EventKind::OrderCompleted => "order_completed",
            EventKind::EmailOpened => "email_opened",
            EventKind::EmailClicked => "email_clicked",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A consent purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    /// Needed to run the site; always granted.
    Necessary,
    /// Measuring behaviour.
    Analytics,
    /// Tailoring content to the person.
    Personalization,
    /// Marketing email and advertising.
    Marketing,
}

impl Purpose {
    /// Every purpose, in bit order.
    pub const ALL: [Purpose; 4] = [
        Purpose::Necessary,
        Purpose::Analytics,
        Purpose::Personalization,
        Purpose::Marketing,
    ];

    /// The purpose's bit in a [`ConsentMask`].
    pub fn bit(self) -> u8 {
        1 << (self as u8)
    }

    /// The snake_case name used in Redis and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Necessary => "necessary",
            Purpose::Analytics => "analytics",
            Purpose::Personalization => "personalization",
            Purpose::Marketing => "marketing",
        }
    }
}

impl fmt::Display for Purpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of purposes, bit `1 << purpose` each. `necessary` is always granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ConsentMask(pub u8);

impl ConsentMask {
    /// Whether `purpose` is in the set (`necessary` always is).
    pub fn allows(self, purpose: Purpose) -> bool {
        purpose == Purpose::Necessary || self.0 & purpose.bit() != 0
    }

    /// Whether the bit of `purpose` is set, without the `necessary` rule.
    pub fn contains(self, purpose: Purpose) -> bool {
        self.0 & purpose.bit() != 0
    }
}

/// A typed property or trait value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    /// Text.
    String(String),
    /// A whole number.
    Int(i64),
    /// A floating point number (never NaN or infinite once accepted).
    Float(f64),
    /// True or false.
    Bool(bool),
}

impl fmt::Display for Value {
    /// The form stored in Redis hashes: strings as is, numbers in decimal, `true`/`false`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::String(s) => f.write_str(s),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// A product line of a commerce event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    /// The shop's product id.
    pub product_id: String,
    /// The product's category, if known.
    pub category: Option<String>,
    /// Unit price in minor currency units.
    pub price: i64,
    /// How many.
    pub quantity: u32,
    /// Display name, if known.
    pub name: Option<String>,
}

/// A consent change: purposes now granted and now denied; a purpose in neither is pending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ConsentChange {
    /// Purposes granted.
    pub granted: ConsentMask,
    /// Purposes denied.
    pub denied: ConsentMask,
}

/// Context shared by the events of one batch.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Context {
    /// Page URL.
    pub page_url: Option<String>,
    /// Referring URL.
    pub referrer: Option<String>,
    /// `utm_source`.
    pub utm_source: Option<String>,
    /// `utm_medium`.
    pub utm_medium: Option<String>,
    /// `utm_campaign`.
    pub utm_campaign: Option<String>,
    /// `utm_term`.
    pub utm_term: Option<String>,
    /// `utm_content`.
    pub utm_content: Option<String>,
    /// BCP 47 locale, e.g. `de-DE`.
    pub locale: Option<String>,
    /// IANA time zone, e.g. `Europe/Berlin`.
    pub timezone: Option<String>,
    /// Screen width and height in CSS pixels.
    pub screen: Option<(u16, u16)>,
    /// The tracker's session id.
    pub session_id: Option<String>,
}

/// One accepted, enriched event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The client's message id; applying the same id twice to a profile is a no-op.
    pub message_id: Uuid,
    /// What happened.
    pub kind: EventKind,
    /// Track event name or page name.
    pub name: Option<String>,
    /// When it happened, corrected for client clock skew.
    #[serde(with = "time::serde::rfc3339")]
    pub timestamp: OffsetDateTime,
    /// When the collector received it.
    #[serde(with = "time::serde::rfc3339")]
    pub received_at: OffsetDateTime,
    /// Properties (traits for identify), in the order sent.
    pub properties: Vec<(String, Value)>,
    /// Commerce items.
    pub items: Vec<Item>,
    /// Identify: the user id. Alias: the new id.
    pub user_id: Option<String>,
    /// Alias: the previous id.
    pub previous_id: Option<String>,
    /// Order id of an order.
    pub order_id: Option<String>,
    /// Order revenue in minor currency units.
    pub revenue: i64,
    /// ISO 4217 currency code.
    pub currency: Option<String>,
    /// The new consent state of a consent change.
    pub consent: Option<ConsentChange>,
    /// The purpose the event needs.
    pub purpose: Purpose,
}

/// Why a string cannot be a profile id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// Empty ids would merge unrelated people.
    #[error("id is empty")]
    Empty,
    /// Longer than [`MAX_ID_BYTES`].
    #[error("id is {len} bytes, limit {MAX_ID_BYTES}")]
    TooLong {
        /// The id's length in bytes.
        len: usize,
    },
    /// Braces would break the Redis Cluster hash tag; control characters break logs.
    #[error("id contains {0:?}, which is not allowed")]
    BadChar(char),
    /// A value that stands for "no id" in someone's code ([`PLACEHOLDER_IDS`]): taken as a
    /// person's id, it would merge everyone whose code sends it into one profile.
    #[error("id {0:?} is a placeholder, not an id")]
    Placeholder(String),
}

/// Ids refused for people (users and anonymous visitors), compared without case and
/// surrounding whitespace: what code sends when it has no id (`null`, `undefined`,
/// `[object Object]`, `0`), or generic words a form or a test left in (`anonymous`, `guest`,
/// `email`, `user_id`). The tracker refuses the same list (`js/loader.js`).
pub const PLACEHOLDER_IDS: &[&str] = &[
    "0",
    "-1",
    "[object object]",
    "anon",
    "anonymous",
    "distinct_id",
    "distinctid",
    "email",
    "false",
    "guest",
    "id",
    "n/a",
    "nan",
    "nil",
    "none",
    "not_authenticated",
    "null",
    "true",
    "undefined",
    "unknown",
    "user_id",
    "userid",
];

/// Who a profile belongs to: a known user (`u:<user id>`) or an anonymous visitor
/// (`a:<anonymous id>`). The string form is the `{...}` hash tag of every key of the profile.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ProfileId(String);

impl ProfileId {
    /// The profile of a known user.
    ///
    /// # Errors
    /// The id is empty, longer than [`MAX_ID_BYTES`], holds `{`, `}` or a control character,
    /// or is a placeholder ([`check_person_id`]).
    pub fn user(id: &str) -> Result<Self, IdError> {
        check_person_id(id)?;
        Ok(Self(format!("u:{id}")))
    }

    /// The profile of an anonymous visitor.
    ///
    /// # Errors
    /// As [`ProfileId::user`].
    pub fn anonymous(id: &str) -> Result<Self, IdError> {
        check_person_id(id)?;
        Ok(Self(format!("a:{id}")))
    }

    /// The string form, `u:<id>` or `a:<id>`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProfileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks an id that names a person (user or anonymous visitor): [`check_id`], and not one
/// of the [`PLACEHOLDER_IDS`].
///
/// # Errors
/// See [`IdError`].
pub fn check_person_id(id: &str) -> Result<(), IdError> {
    check_id(id)?;
    let trimmed = id.trim();
    if trimmed.is_empty() {
        return Err(IdError::Empty);
    }
    if PLACEHOLDER_IDS
        .iter()
        .any(|p| p.eq_ignore_ascii_case(trimmed))
    {
        return Err(IdError::Placeholder(id.into()));
    }
    Ok(())
}

/// Checks an externally supplied id (user, anonymous, session, product).
///
/// # Errors
/// See [`IdError`].
pub fn check_id(id: &str) -> Result<(), IdError> {
    if id.is_empty() {
        return Err(IdError::Empty);
    }
    if id.len() > MAX_ID_BYTES {
        return Err(IdError::TooLong { len: id.len() });
    }
    if let Some(c) = id
        .chars()
        .find(|c| matches!(c, '{' | '}') || c.is_control())
    {
        return Err(IdError::BadChar(c));
    }
    Ok(())
}

/// The events of one batch that belong to one profile: applied atomically, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileUpdate {
    /// Whose profile.
    pub profile: ProfileId,
    /// The visitor's anonymous id, if the batch had one.
    pub anonymous_id: Option<String>,
    /// The user id, if known.
    pub user_id: Option<String>,
    /// Context shared by the events (copied into the event stream).
    pub context: Context,
    /// The events, in the order the client sent them.
    pub events: Vec<Event>,
}

/// What applying updates did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct ApplyReport {
    /// Events applied now.
    pub applied: u64,
    /// Events skipped because their message id was already applied to the profile.
    pub duplicates: u64,
    /// Anonymous profiles merged into user profiles (see `identity`).
    pub merged: u64,
    /// Anonymous profiles not merged because another user profile had taken them in.
    pub merges_refused: u64,
    /// Anonymous ids not linked because their user profile had as many as it may take.
    pub ids_over_limit: u64,
}

/// Where a customer is in their life with the shop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lifecycle {
    /// First seen recently.
    New,
    /// Seen recently, no longer new.
    Active,
    /// Not seen for a while.
    Dormant,
    /// Not seen for a long time.
    Churned,
}

/// One product the person looked at.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ViewedProduct {
    /// The product id.
    pub product_id: String,
    /// When it was last viewed.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// A line of the person's cart.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CartLine {
    /// The product id.
    pub product_id: String,
    /// How many.
    pub quantity: u32,
    /// Unit price in minor currency units, as last seen.
    pub price: i64,
    /// The product's category, if known.
    pub category: Option<String>,
}

/// The person's recorded answer for one purpose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConsentState {
    /// `granted` or `denied`.
    pub status: ConsentStatus,
    /// When the answer was given.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Where it came from (the consent event's `source`: `api`, `tcf`, `gcm`, ...), when
    /// known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// One consent answer in a profile's history (`consent_log`), as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsentRecord {
    /// The purpose answered.
    pub purpose: Purpose,
    /// `granted` or `denied`.
    pub status: ConsentStatus,
    /// When the answer was given (Unix ms).
    pub at: i64,
    /// Where it came from, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// An answer for one purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsentStatus {
    /// The person said yes.
    Granted,
    /// The person said no.
    Denied,
}

/// Everything a profile holds, as read back for the API and connectors.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Profile {
    /// The profile id (`u:<user id>` or `a:<anonymous id>`).
    pub id: ProfileId,
    /// The user id, once known.
    pub user_id: Option<String>,
    /// Anonymous ids seen on this profile.
    pub anonymous_ids: Vec<String>,
    /// Traits from identify calls, stored as text.
    pub traits: BTreeMap<String, String>,
    /// The earliest event time.
    #[serde(with = "time::serde::rfc3339")]
    pub first_seen: OffsetDateTime,
    /// The latest event time.
    #[serde(with = "time::serde::rfc3339")]
    pub last_seen: OffsetDateTime,
    /// Events applied in all.
    pub events: u64,
    /// Page views.
    pub page_views: u64,
    /// Distinct sessions.
    pub sessions: u64,
    /// Applied events by name: the kind, or the event name for `track`.
    pub event_counts: BTreeMap<String, u64>,
    /// Recently viewed products, newest first.
    pub recently_viewed: Vec<ViewedProduct>,
    /// Categories browsed, with view counts, most first.
    pub categories_viewed: Vec<(String, u64)>,
    /// Categories bought, with item counts, most first.
    pub categories_bought: Vec<(String, u64)>,
    /// Cart contents.
    pub cart: Vec<CartLine>,
    /// When the cart last changed.
    #[serde(with = "time::serde::rfc3339::option")]
    pub cart_updated_at: Option<OffsetDateTime>,
    /// Orders placed.
    pub orders: u64,
    /// Revenue in minor currency units.
    pub revenue: i64,
    /// When the last order was placed.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_order_at: Option<OffsetDateTime>,
    /// Marketing emails opened.
    pub email_opens: u64,
    /// Marketing email links clicked.
    pub email_clicks: u64,
    /// The last email open or click.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_engaged_at: Option<OffsetDateTime>,
    /// Lifecycle stage, as of the read.
    pub lifecycle: Lifecycle,
    /// Consent answers by purpose.
    pub consent: BTreeMap<Purpose, ConsentState>,
    /// Every consent answer recorded, oldest first (at most the latest 50).
    pub consent_log: Vec<ConsentRecord>,
    /// The segments the profile is in, by name, as of its last evaluation.
    pub segments: Vec<SegmentMembership>,
}

/// A segment the profile is in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SegmentMembership {
    /// The segment's name.
    pub name: String,
    /// When the profile entered it.
    #[serde(with = "time::serde::rfc3339")]
    pub entered_at: OffsetDateTime,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholder_ids_are_refused_for_people_only() {
        for id in [
            "null",
            "NULL",
            " undefined ",
            "[object Object]",
            "0",
            "Anonymous",
            "guest",
        ] {
            assert_eq!(
                check_person_id(id),
                Err(IdError::Placeholder(id.into())),
                "{id:?}"
            );
            assert!(ProfileId::user(id).is_err() && ProfileId::anonymous(id).is_err());
            // A product or order may well be called "0".
            assert_eq!(check_id(id), Ok(()), "{id:?}");
        }
        assert_eq!(check_person_id("   "), Err(IdError::Empty));
        for id in ["nullable", "user-0", "00", "ada@example.com", "guest-42"] {
            assert_eq!(check_person_id(id), Ok(()), "{id:?}");
        }
    }

    /// The tracker refuses the same placeholders before they reach the collector, which
    /// would otherwise refuse every later batch of a visitor identified as one.
    #[test]
    fn the_tracker_refuses_the_same_placeholders() {
        let loader = include_str!("../../tracker-wasm/js/loader.js");
        let regex = loader
            .lines()
            .find_map(|l| l.trim().strip_prefix("var PLACEHOLDER = /^\\s*(|"))
            .and_then(|l| l.strip_suffix(")\\s*$/i;"))
            .expect("js/loader.js defines PLACEHOLDER");
        let listed: Vec<String> = regex.split('|').map(|a| a.replace('\\', "")).collect();
        assert_eq!(listed, PLACEHOLDER_IDS);
    }
}
