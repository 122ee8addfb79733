//! Segments: named conditions over a profile ("cart abandoners", "loyal customers"), written
//! in the collector's TOML config, checked all at once at start, compiled to plain data, and
//! evaluated here from scratch: whether a profile is a member at a given time, and the next
//! time that answer can change without a new event (its deadline).
//!
//! # Writing segments
//!
//! Each `[[segments]]` table has a `name`, an optional `description` and a `condition`:
//!
//! ```toml
//! [[segments]]
//! name = "cart_abandoners_30m"
//! description = "Left items in the cart for 30 minutes without ordering"
//! condition = { all = [
//!   { cart = "not_empty" },
//!   { older_than = { field = "cart_updated_at", duration = "30m" } },
//!   { no_order_since = "cart_updated_at" },
//! ] }
//!
//! [[segments]]
//! name = "shoe_browsers"
//! condition = { event_count = { event = "product_viewed", category = "shoes", within = "24h", at_least = 3 } }
//! ```
//!
//! TOML keeps an inline table on one line unless a value inside it (an array) spans lines,
//! hence the layout above; a `[segments.condition]` table works too. `segments.demo.toml`
//! ([`DEMO_SEGMENTS`]) holds the segments of the product brief.
//!
//! A name is 1 to 64 lowercase letters, digits, `_` or `-`, starting with a letter: it will
//! be part of Redis keys, stream entries and API paths, where the looser profile id rules
//! ([`crate::model::check_id`] allows spaces, `:` and `/`) would be ambiguous.
//!
//! A condition is a table with one key, which names the test:
//!
//! | condition | true when |
//! | --- | --- |
//! | `{ all = [c, ...] }` | every listed condition is |
//! | `{ any = [c, ...] }` | at least one listed condition is |
//! | `{ not = c }` | `c` is not |
//! | `{ metric = { field = "orders", at_least = 3 } }` | a profile counter is within the bounds: `at_least`, `at_most` or both, inclusive. Fields: `events`, `page_views`, `sessions`, `orders`, `revenue` (minor units), `email_opens`, `email_clicks` |
//! | `{ event_count = { event = "Signed Up", at_least = 1 } }` | the events of that name ever applied (the `counts` hash: a kind such as `product_viewed`, or a track event's name) are within the bounds |
//! | `{ event_count = { event = "product_viewed", category = "shoes", within = "24h", at_least = 3 } }` | the same, counting only recent events ([windowed counts](#windowed-event-counts): whole hours, at most `7d`); with `category`, only events with an item in that category (needs `within`) |
//! | `{ trait = { name = "plan", equals = "pro" } }` | the trait is set to that value, compared as stored text (`equals = 36` and `equals = true` work too) |
//! | `{ trait = { name = "plan", in = ["pro", "team"] } }` | the trait is one of the values |
//! | `{ trait = { name = "email", exists = true } }` | the trait is set (`false`: is not) |
//! | `{ lifecycle = "dormant" }` | the stage is `new`, `active`, `dormant` or `churned` ([`crate::lifecycle`]) |
//! | `{ within = { field = "last_order_at", duration = "7d" } }` | the time is set and less than `duration` ago (a time ahead of now counts as just now) |
//! | `{ older_than = { field = "last_seen", duration = "30d" } }` | the time is set and at least `duration` ago |
//! | `{ cart = "not_empty" }`, `{ cart = "empty" }` | the cart has a line, or has none |
//! | `{ no_order_since = "cart_updated_at" }` | the time is set and no order was placed at or after it |
//! | `{ consent_granted = "marketing" }` | the purpose is granted (`necessary` always is); denied or unanswered: not |
//!
//! Time fields: `first_seen`, `last_seen`, `last_order_at`, `last_engaged_at`,
//! `cart_updated_at` (docs/KEY_SCHEMA.md). A time that was never set satisfies neither
//! `within` nor `older_than`, so "not in the last 90 days, or never" is
//! `{ not = { within = { field = "last_engaged_at", duration = "90d" } } }`. Durations are
//! written like `30m`, `24h`, `7d` or `1h 30m`: greater than zero, whole milliseconds, at
//! most `36500d`. Bounds are whole numbers within ±(2^53 − 1), what the apply script counts
//! exactly.
//!
//! # Checking
//!
//! [`compile`] checks every definition and returns every problem it finds, each naming the
//! segment, the path of the field and what is wrong ([`SegmentErrors`]):
//!
//! ```text
//! segment "cart_abandoners": condition.all[1].older_than.duration: "30x" is not a duration like "30m", "24h" or "7d": unknown time unit "x", ...
//! segment "loyal": condition.metric: needs at_least, at_most or both
//! segment "Big Spenders": name: "Big Spenders" is not a segment name: use 1 to 64 lowercase letters, digits, _ or -, starting with a letter
//! segments[4]: missing field `name`
//! ```
//!
//! A definition that does not fit the shape above (an unknown field or condition, a value of
//! the wrong type, a bad duration) reports the first such problem in it; a definition that
//! fits reports every rule it breaks. Other definitions are checked either way.
//!
//! # The compiled form
//!
//! A [`Segment`] holds a [`Predicate`]: plain data that the evaluator here and the apply
//! script (`apply.lua`, which gets it written into its text as a Lua table when the store
//! is built) walk. As JSON (`serde_json`) every node is an object whose `op` names it:
//!
//! ```json
//! {"name":"cart_abandoners_30m","description":"...","condition":{"op":"all","of":[
//!   {"op":"cart_not_empty"},
//!   {"op":"older_than","field":"cart_updated_at","ms":1800000},
//!   {"op":"no_order_since","field":"cart_updated_at"}]}}
//! ```
//!
//! Compiling lowers the written form to fewer, simpler nodes: durations become
//! milliseconds (`ms`, the unit of every time in Redis); bounds become `min` / `max`, left out
//! when absent; `equals` becomes `trait_in` with one value and `exists = false` a `not`;
//! `cart = "empty"` is `not cart_not_empty`; an `event_count` with `within` becomes
//! `window_count` with `hours`; and a lifecycle stage becomes the recency tests it stands for,
//! with the configured thresholds:
//!
//! | stage | compiled to |
//! | --- | --- |
//! | `new` | `last_seen` within `dormant_after`, and `first_seen` within `new_for` |
//! | `active` | `last_seen` within `dormant_after`, and `first_seen` older than `new_for` |
//! | `dormant` | `last_seen` older than `dormant_after`, and within `churned_after` |
//! | `churned` | `last_seen` older than `churned_after` |
//!
//! which is [`LifecycleThresholds::stage`] to the millisecond, so lifecycle segments get
//! exact deadlines like any recency test.
//!
//! # Fingerprints
//!
//! [`Segment::fingerprint`] hashes the compiled condition's JSON (above) with 128-bit
//! FNV-1a: the same condition gives the same 32 hex digits in every build, and any change
//! that can move a profile in or out (a bound, a duration, a lifecycle threshold, since
//! stages compile to durations) gives others. The description does not count, nor does
//! the order of the `[[segments]]` tables; a list written in another order (`in`, `all`)
//! does, and costs a needless rebuild at worst. The collector records the fingerprints of
//! the definitions it runs in Redis and rebuilds a segment whose fingerprint changed
//! ([`crate::rebuild`]).
//!
//! # Windowed event counts
//!
//! Rolling-window counts come from hourly buckets. Bucket `h` of `(event, category)` holds
//! the number of events of that name whose event time falls in hour `h` (Unix ms divided by
//! 3,600,000, rounded down); an event counts once under `(event, no category)` and once under
//! each distinct category among its items ([`SegmentInput::record`]). A window of `k` hours
//! at time `now` sums the buckets from hour `floor(now / 1h) - k + 1` on: the current,
//! partial hour and the `k - 1` full hours before it. So a count "within 24h" covers between
//! 23 and 24 hours of history, never more, and bucket `h` leaves it at exactly
//! `(h + k) × 1h`. No window is longer than [`WINDOW_MAX`], so a bucket before the current
//! hour and the 167 before it counts nowhere and may be dropped.
//!
//! # Deadlines
//!
//! [`Predicate::evaluate`] returns the membership at `now` and the deadline: the first time
//! after `now` at which the membership differs, if nothing but time passes; `None` when it
//! never does. The deadline is exact for every condition, through `all`, `any` and `not`:
//!
//! - Every test is constant over time except three, which change only at instants the
//!   profile determines: `within` turns false and `older_than` turns true at `time +
//!   duration`; a windowed count loses bucket `h` at `(h + k) × 1h`. Lifecycle stages compile
//!   to `within` and `older_than`, and cart age is `older_than` on `cart_updated_at`.
//! - `all`, `any` and `not` are functions of their children at the same instant, so a tree
//!   can change only at one of its tests' instants, and is constant between two of them.
//! - The evaluator lists the instants after `now`, in order, and evaluates the tree at each
//!   until the result differs from the one at `now`: that instant is the deadline.
//!
//! Combining the children's own deadlines instead is exact only in part: `not` keeps its
//! child's deadline, `all` that is true ends at the earliest deadline of its children, and
//! `any` that is false at the earliest of theirs. But `all` that is false can turn true no
//! earlier than the latest deadline among its false children, and perhaps later, since a
//! child may turn true and back before another turns; likewise `any` that is true. That
//! bound is safe for a scheduler (it wakes up early, finds no change, and asks again) but not
//! exact, so the evaluator does not use it. The apply script does, with each test's own next
//! change as the leaves, since listing and re-evaluating a windowed count's up to 168
//! instants in Lua would cost every update; for the segments of `segments.demo.toml` the
//! bound is the exact deadline. A deadline beyond the year 9999 is `None`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};
use time::OffsetDateTime;

use crate::lifecycle::LifecycleThresholds;
use crate::model::{ConsentStatus, Lifecycle, Purpose};

/// The segments of the product brief, as written in `profile-cache/segments.demo.toml`:
/// engagement levels, recent buyers, loyal customers, cart abandoners (30 minutes and 24
/// hours), lifecycle stages, high value, and shoe browsers.
pub const DEMO_SEGMENTS: &str = include_str!("../segments.demo.toml");

/// The longest name of a segment, in bytes.
pub const MAX_NAME_BYTES: usize = 64;

/// The width of one bucket of windowed event counts.
pub const BUCKET: Duration = Duration::from_secs(3_600);

/// How far back windowed event counts reach: the longest `within` of an `event_count`.
pub const WINDOW_MAX: Duration = Duration::from_secs(7 * 86_400);

/// The longest duration of a `within` or `older_than`.
pub const MAX_DURATION: Duration = Duration::from_secs(36_500 * 86_400);

/// The largest bound magnitude: what the apply script's numbers (doubles) hold exactly.
pub const MAX_BOUND: i64 = (1 << 53) - 1;

const BUCKET_MS: i64 = 3_600_000;

// ------------------------------------------------------------------ the written form

/// One `[[segments]]` table as written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentDefinition {
    /// The segment's name.
    pub name: String,
    /// What the segment is for, for people.
    #[serde(default)]
    pub description: String,
    /// Who is in it.
    pub condition: Condition,
}

/// A condition as written: a table with one key, which names the test. See the module docs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    /// Every condition holds.
    All(Vec<Condition>),
    /// At least one condition holds.
    Any(Vec<Condition>),
    /// The condition does not hold.
    Not(Box<Condition>),
    /// A profile counter is within bounds.
    Metric(MetricTest),
    /// An event count, all time or in a recent window, is within bounds.
    EventCount(EventCountTest),
    /// A trait equals a value, is one of several, or is set.
    Trait(TraitTest),
    /// The profile is at this lifecycle stage.
    Lifecycle(Lifecycle),
    /// A time is set and less than a duration ago.
    Within(TimeTest),
    /// A time is set and at least a duration ago.
    OlderThan(TimeTest),
    /// The cart is empty or not.
    Cart(CartState),
    /// The time is set and no order was placed at or after it.
    NoOrderSince(TimeField),
    /// The person granted this consent purpose.
    ConsentGranted(Purpose),
}

/// `{ field = "orders", at_least = 3, at_most = 10 }`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricTest {
    /// Which counter.
    pub field: Metric,
    /// The least value that passes.
    pub at_least: Option<i64>,
    /// The greatest value that passes.
    pub at_most: Option<i64>,
}

/// `{ event = "product_viewed", category = "shoes", within = "24h", at_least = 3 }`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventCountTest {
    /// The event name: a kind, or a track event's name.
    pub event: String,
    /// Count only events with an item in this category (needs `within`).
    pub category: Option<String>,
    /// Count only events this recent: whole hours, at most [`WINDOW_MAX`].
    pub within: Option<Span>,
    /// The least count that passes.
    pub at_least: Option<i64>,
    /// The greatest count that passes.
    pub at_most: Option<i64>,
}

/// `{ name = "plan", equals = "pro" }`, `in = [...]` or `exists = true`: exactly one test.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraitTest {
    /// The trait's name.
    pub name: String,
    /// The trait is set to this value.
    pub equals: Option<TraitText>,
    /// The trait is set to one of these values.
    #[serde(rename = "in")]
    pub one_of: Option<Vec<TraitText>>,
    /// The trait is set (`true`) or not (`false`).
    pub exists: Option<bool>,
}

/// `{ field = "last_order_at", duration = "7d" }`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeTest {
    /// Which time.
    pub field: TimeField,
    /// How long ago.
    pub duration: Span,
}

/// `"empty"` or `"not_empty"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CartState {
    /// No line in the cart.
    Empty,
    /// At least one line in the cart.
    NotEmpty,
}

/// A duration as written (`"30m"`, `"7d"`), kept with its text so messages quote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    /// What was written.
    pub text: String,
    /// Its value.
    pub duration: Duration,
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Span;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a duration like "30m", "24h" or "7d""#)
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Span, E> {
                match humantime_serde::re::humantime::parse_duration(text) {
                    Ok(duration) => Ok(Span {
                        text: text.into(),
                        duration,
                    }),
                    Err(e) => Err(E::custom(format!(
                        r#"{text:?} is not a duration like "30m", "24h" or "7d": {e}"#
                    ))),
                }
            }
        }
        d.deserialize_str(Visitor)
    }
}

/// A trait value as written: a string, number or boolean, kept as the text Redis stores
/// (docs/KEY_SCHEMA.md: integers in decimal, floats in their shortest exact form,
/// `true` / `false`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraitText(pub String);

impl<'de> Deserialize<'de> for TraitText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = TraitText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E>(self, v: &str) -> Result<TraitText, E> {
                Ok(TraitText(v.into()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<TraitText, E> {
                Ok(TraitText(v.to_string()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<TraitText, E> {
                Ok(TraitText(v.to_string()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<TraitText, E> {
                // The same formatting as the traits the apply script stores (`Value`'s Display).
                Ok(TraitText(v.to_string()))
            }
            fn visit_bool<E>(self, v: bool) -> Result<TraitText, E> {
                Ok(TraitText(v.to_string()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A counter of the profile hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Events applied in all.
    Events,
    /// Page views.
    PageViews,
    /// Distinct sessions.
    Sessions,
    /// Orders placed.
    Orders,
    /// Sum of order revenue, minor units.
    Revenue,
    /// Marketing emails opened.
    EmailOpens,
    /// Marketing email links clicked.
    EmailClicks,
}

/// A time of the profile hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeField {
    /// The earliest event time.
    FirstSeen,
    /// The latest event time.
    LastSeen,
    /// The latest order's time.
    LastOrderAt,
    /// The latest email open or click.
    LastEngagedAt,
    /// The latest cart change (an order emptying it included).
    CartUpdatedAt,
}

impl TimeField {
    /// The field's name in the profile hash.
    pub fn as_str(self) -> &'static str {
        match self {
            TimeField::FirstSeen => "first_seen",
            TimeField::LastSeen => "last_seen",
            TimeField::LastOrderAt => "last_order_at",
            TimeField::LastEngagedAt => "last_engaged_at",
            TimeField::CartUpdatedAt => "cart_updated_at",
        }
    }
}

// ------------------------------------------------------------------ problems

/// What is wrong with a definition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// The text does not fit the definition language: an unknown field or condition, a
    /// value of the wrong type, a bad duration. The words are the parser's.
    #[error("{0}")]
    Invalid(String),
    /// The name cannot be a segment name.
    #[error(
        "{0:?} is not a segment name: use 1 to {MAX_NAME_BYTES} lowercase letters, digits, _ or -, starting with a letter"
    )]
    BadName(String),
    /// Another segment has the name.
    #[error("{name:?} is already the name of segments[{first}]")]
    DuplicateName {
        /// The name.
        name: String,
        /// The index of the segment that has it.
        first: usize,
    },
    /// A text that must say something is empty.
    #[error("is empty")]
    Empty,
    /// `all`, `any` or `in` lists nothing.
    #[error("is an empty list, expected at least one {0}")]
    EmptyList(&'static str),
    /// A count or metric test without bounds.
    #[error("needs at_least, at_most or both")]
    NoBound,
    /// Bounds that no value fits.
    #[error("at_least ({at_least}) is greater than at_most ({at_most})")]
    EmptyRange {
        /// The lower bound.
        at_least: i64,
        /// The upper bound.
        at_most: i64,
    },
    /// A bound beyond what the apply script counts exactly.
    #[error("{0} is beyond ±{MAX_BOUND}, the largest exact count")]
    BoundTooLarge(i64),
    /// A zero duration.
    #[error("{0:?} must be greater than zero")]
    ZeroDuration(String),
    /// A duration with a part below a millisecond.
    #[error("{0:?} is not a whole number of milliseconds")]
    NotWholeMillis(String),
    /// A duration beyond [`MAX_DURATION`].
    #[error("{0:?} is longer than 36500d")]
    DurationTooLong(String),
    /// A window that is not whole hours.
    #[error("{0:?} is not a whole number of hours (event counts are kept in hourly buckets)")]
    WindowNotWholeHours(String),
    /// A window beyond [`WINDOW_MAX`].
    #[error("{0:?} is longer than 7d, the longest window kept")]
    WindowTooLong(String),
    /// `category` without `within`.
    #[error("needs within: counts by category are kept for the last 7 days only")]
    CategoryWithoutWindow,
    /// A trait test with none or several of `equals`, `in`, `exists`.
    #[error("needs exactly one of equals, in or exists")]
    TraitTest,
    /// `no_order_since = "last_order_at"`, which can never hold.
    #[error("last_order_at cannot be compared with itself")]
    OrderSinceOrder,
}

/// One problem of one definition: `segment "<name>": <field>: <problem>`, or
/// `segments[<index>]: ...` for a definition without a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentError {
    /// The definition's position among the `[[segments]]` tables.
    pub index: usize,
    /// The definition's name, when it has one.
    pub name: Option<String>,
    /// The path of the field to blame, e.g. `condition.all[1].older_than.duration`; empty
    /// when the table as a whole is (a missing field).
    pub field: String,
    /// What is wrong.
    pub problem: Problem,
}

impl fmt::Display for SegmentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(name) => write!(f, "segment {name:?}: ")?,
            None => write!(f, "segments[{}]: ", self.index)?,
        }
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        write!(f, "{}", self.problem)
    }
}

impl std::error::Error for SegmentError {}

/// Every problem found in a set of definitions, in order; shown one per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", lines(.0))]
pub struct SegmentErrors(pub Vec<SegmentError>);

fn lines(errors: &[SegmentError]) -> String {
    let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
    lines.join("\n")
}

// ------------------------------------------------------------------ the compiled form

/// A checked segment, ready to evaluate; serializable to JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// The segment's name.
    pub name: String,
    /// What the segment is for.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Who is in it.
    pub condition: Predicate,
}

/// A compiled condition: one JSON object per node, tagged by `op`. Times and durations are
/// Unix milliseconds, as in Redis; absent bounds are left out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Predicate {
    /// Every child holds.
    All {
        /// The children.
        of: Vec<Predicate>,
    },
    /// At least one child holds.
    Any {
        /// The children.
        of: Vec<Predicate>,
    },
    /// The child does not hold.
    Not {
        /// The child.
        of: Box<Predicate>,
    },
    /// `min <= counter <= max`.
    Metric {
        /// Which counter.
        field: Metric,
        /// Lower bound, inclusive.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        min: Option<i64>,
        /// Upper bound, inclusive.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max: Option<i64>,
    },
    /// `min <= counts[event] <= max`.
    Count {
        /// The `counts` field.
        event: String,
        /// Lower bound, inclusive.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        min: Option<i64>,
        /// Upper bound, inclusive.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max: Option<i64>,
    },
    /// `min <= (events in the last `hours` hourly buckets) <= max`.
    WindowCount {
        /// The event name.
        event: String,
        /// Only events with an item in this category.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        category: Option<String>,
        /// The window, in buckets.
        hours: i64,
        /// Lower bound, inclusive.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        min: Option<i64>,
        /// Upper bound, inclusive.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max: Option<i64>,
    },
    /// The trait's text is one of `values`.
    TraitIn {
        /// The trait.
        name: String,
        /// The accepted texts.
        values: Vec<String>,
    },
    /// The trait is set.
    TraitExists {
        /// The trait.
        name: String,
    },
    /// The time is set and `now < time + ms`.
    Within {
        /// Which time.
        field: TimeField,
        /// The duration.
        ms: i64,
    },
    /// The time is set and `now >= time + ms`.
    OlderThan {
        /// Which time.
        field: TimeField,
        /// The duration.
        ms: i64,
    },
    /// The cart has a line.
    CartNotEmpty,
    /// The time is set and `last_order_at` is unset or before it.
    NoOrderSince {
        /// Which time.
        field: TimeField,
    },
    /// The purpose is granted.
    ConsentGranted {
        /// The purpose.
        purpose: Purpose,
    },
}

// ------------------------------------------------------------------ compiling

/// Checks `[[segments]]` tables, each as parsed from TOML into a tree (the collector reads
/// its config with figment), and compiles them. Lifecycle stages compile with `lifecycle`.
///
/// The tables arrive as trees rather than [`SegmentDefinition`]s so that one table that
/// does not parse cannot hide the problems of the others, and every message can name its
/// segment.
///
/// # Errors
/// Every problem of every definition (see the module docs).
pub fn compile(
    tables: &[serde_json::Value],
    lifecycle: &LifecycleThresholds,
) -> Result<Vec<Segment>, SegmentErrors> {
    let mut segments = Vec::new();
    let mut errors = Vec::new();
    let mut names = BTreeMap::new();
    for (index, table) in tables.iter().enumerate() {
        let name = table.get("name").and_then(serde_json::Value::as_str);
        let mut c = Compiler {
            lifecycle,
            problems: Vec::new(),
        };
        if let Some(name) = name {
            if !is_segment_name(name) {
                c.problem("name", Problem::BadName(name.into()));
            } else if let Some(&first) = names.get(name) {
                c.problem(
                    "name",
                    Problem::DuplicateName {
                        name: name.into(),
                        first,
                    },
                );
            } else {
                names.insert(name, index);
            }
        }
        match serde_path_to_error::deserialize::<_, SegmentDefinition>(table) {
            Err(e) => {
                // The path of the table itself prints as ".".
                let path = e.path().to_string();
                let field = if path == "." { String::new() } else { path };
                c.problems
                    .push((field, Problem::Invalid(e.into_inner().to_string())));
            }
            Ok(def) => {
                let condition = c.condition(&def.condition, "condition");
                if c.problems.is_empty() {
                    segments.push(Segment {
                        name: def.name,
                        description: def.description,
                        condition,
                    });
                }
            }
        }
        errors.extend(c.problems.into_iter().map(|(field, problem)| SegmentError {
            index,
            name: name.map(String::from),
            field,
            problem,
        }));
    }
    if errors.is_empty() {
        Ok(segments)
    } else {
        Err(SegmentErrors(errors))
    }
}

/// 1 to [`MAX_NAME_BYTES`] of `a-z`, `0-9`, `_`, `-`, starting with a letter.
fn is_segment_name(name: &str) -> bool {
    name.len() <= MAX_NAME_BYTES
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Lowers the written form of one definition, collecting its problems. It always returns a
/// predicate; the caller drops it when there were problems.
struct Compiler<'a> {
    lifecycle: &'a LifecycleThresholds,
    problems: Vec<(String, Problem)>,
}

impl Compiler<'_> {
    fn problem(&mut self, field: &str, problem: Problem) {
        self.problems.push((field.into(), problem));
    }

    fn condition(&mut self, c: &Condition, path: &str) -> Predicate {
        match c {
            Condition::All(list) => Predicate::All {
                of: self.list(list, &format!("{path}.all")),
            },
            Condition::Any(list) => Predicate::Any {
                of: self.list(list, &format!("{path}.any")),
            },
            Condition::Not(c) => not(self.condition(c, &format!("{path}.not"))),
            Condition::Metric(t) => {
                let (min, max) = self.bounds(t.at_least, t.at_most, &format!("{path}.metric"));
                Predicate::Metric {
                    field: t.field,
                    min,
                    max,
                }
            }
            Condition::EventCount(t) => self.event_count(t, &format!("{path}.event_count")),
            Condition::Trait(t) => self.trait_test(t, &format!("{path}.trait")),
            Condition::Lifecycle(stage) => self.stage(*stage),
            Condition::Within(t) => Predicate::Within {
                field: t.field,
                ms: self.duration(&t.duration, &format!("{path}.within.duration")),
            },
            Condition::OlderThan(t) => Predicate::OlderThan {
                field: t.field,
                ms: self.duration(&t.duration, &format!("{path}.older_than.duration")),
            },
            Condition::Cart(CartState::NotEmpty) => Predicate::CartNotEmpty,
            Condition::Cart(CartState::Empty) => not(Predicate::CartNotEmpty),
            Condition::NoOrderSince(field) => {
                if *field == TimeField::LastOrderAt {
                    self.problem(&format!("{path}.no_order_since"), Problem::OrderSinceOrder);
                }
                Predicate::NoOrderSince { field: *field }
            }
            Condition::ConsentGranted(purpose) => Predicate::ConsentGranted { purpose: *purpose },
        }
    }

    fn list(&mut self, list: &[Condition], path: &str) -> Vec<Predicate> {
        if list.is_empty() {
            self.problem(path, Problem::EmptyList("condition"));
        }
        list.iter()
            .enumerate()
            .map(|(i, c)| self.condition(c, &format!("{path}[{i}]")))
            .collect()
    }

    fn bounds(
        &mut self,
        at_least: Option<i64>,
        at_most: Option<i64>,
        path: &str,
    ) -> (Option<i64>, Option<i64>) {
        for (name, bound) in [("at_least", at_least), ("at_most", at_most)] {
            if let Some(n) = bound.filter(|n| n.unsigned_abs() > MAX_BOUND.unsigned_abs()) {
                self.problem(&format!("{path}.{name}"), Problem::BoundTooLarge(n));
            }
        }
        match (at_least, at_most) {
            (None, None) => self.problem(path, Problem::NoBound),
            (Some(at_least), Some(at_most)) if at_least > at_most => {
                self.problem(path, Problem::EmptyRange { at_least, at_most });
            }
            _ => {}
        }
        (at_least, at_most)
    }

    fn event_count(&mut self, t: &EventCountTest, path: &str) -> Predicate {
        if t.event.is_empty() {
            self.problem(&format!("{path}.event"), Problem::Empty);
        }
        if t.category.as_ref().is_some_and(String::is_empty) {
            self.problem(&format!("{path}.category"), Problem::Empty);
        }
        let (min, max) = self.bounds(t.at_least, t.at_most, path);
        let Some(within) = &t.within else {
            if t.category.is_some() {
                self.problem(&format!("{path}.category"), Problem::CategoryWithoutWindow);
            }
            return Predicate::Count {
                event: t.event.clone(),
                min,
                max,
            };
        };
        let field = format!("{path}.within");
        let ms = self.duration(within, &field);
        if ms % BUCKET_MS != 0 {
            self.problem(&field, Problem::WindowNotWholeHours(within.text.clone()));
        }
        if within.duration > WINDOW_MAX {
            self.problem(&field, Problem::WindowTooLong(within.text.clone()));
        }
        Predicate::WindowCount {
            event: t.event.clone(),
            category: t.category.clone(),
            hours: ms / BUCKET_MS,
            min,
            max,
        }
    }

    fn trait_test(&mut self, t: &TraitTest, path: &str) -> Predicate {
        if t.name.is_empty() {
            self.problem(&format!("{path}.name"), Problem::Empty);
        }
        let name = t.name.clone();
        match (&t.equals, &t.one_of, t.exists) {
            (Some(value), None, None) => Predicate::TraitIn {
                name,
                values: vec![value.0.clone()],
            },
            (None, Some(values), None) => {
                if values.is_empty() {
                    self.problem(&format!("{path}.in"), Problem::EmptyList("value"));
                }
                Predicate::TraitIn {
                    name,
                    values: values.iter().map(|v| v.0.clone()).collect(),
                }
            }
            (None, None, Some(true)) => Predicate::TraitExists { name },
            (None, None, Some(false)) => not(Predicate::TraitExists { name }),
            _ => {
                self.problem(path, Problem::TraitTest);
                Predicate::TraitExists { name }
            }
        }
    }

    /// Milliseconds of a `within` / `older_than` duration.
    fn duration(&mut self, span: &Span, path: &str) -> i64 {
        let d = span.duration;
        if d.is_zero() {
            self.problem(path, Problem::ZeroDuration(span.text.clone()));
        } else if !d.subsec_nanos().is_multiple_of(1_000_000) {
            self.problem(path, Problem::NotWholeMillis(span.text.clone()));
        } else if d > MAX_DURATION {
            self.problem(path, Problem::DurationTooLong(span.text.clone()));
        }
        duration_ms(d.min(MAX_DURATION))
    }

    /// A lifecycle stage as the recency tests it stands for (the module docs show why).
    fn stage(&self, stage: Lifecycle) -> Predicate {
        let t = self.lifecycle;
        let within = |field, d| Predicate::Within {
            field,
            ms: duration_ms(d),
        };
        let older_than = |field, d| Predicate::OlderThan {
            field,
            ms: duration_ms(d),
        };
        let (last, first) = (TimeField::LastSeen, TimeField::FirstSeen);
        let of = match stage {
            Lifecycle::New => vec![within(last, t.dormant_after), within(first, t.new_for)],
            Lifecycle::Active => vec![within(last, t.dormant_after), older_than(first, t.new_for)],
            Lifecycle::Dormant => vec![
                older_than(last, t.dormant_after),
                within(last, t.churned_after),
            ],
            Lifecycle::Churned => return older_than(last, t.churned_after),
        };
        Predicate::All { of }
    }
}

fn not(p: Predicate) -> Predicate {
    Predicate::Not { of: Box::new(p) }
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

// ------------------------------------------------------------------ evaluating

/// What segments read of a profile: a snapshot of its counters, traits, times, cart,
/// consent and windowed event counts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SegmentInput {
    /// The earliest event time.
    pub first_seen: Option<OffsetDateTime>,
    /// The latest event time.
    pub last_seen: Option<OffsetDateTime>,
    /// The latest order's time.
    pub last_order_at: Option<OffsetDateTime>,
    /// The latest email open or click.
    pub last_engaged_at: Option<OffsetDateTime>,
    /// The latest cart change.
    pub cart_updated_at: Option<OffsetDateTime>,
    /// Events applied in all.
    pub events: u64,
    /// Page views.
    pub page_views: u64,
    /// Distinct sessions.
    pub sessions: u64,
    /// Orders placed.
    pub orders: u64,
    /// Revenue, minor units.
    pub revenue: i64,
    /// Marketing emails opened.
    pub email_opens: u64,
    /// Marketing email links clicked.
    pub email_clicks: u64,
    /// Applied events by name (the `counts` hash).
    pub counts: BTreeMap<String, u64>,
    /// Traits as stored text.
    pub traits: BTreeMap<String, String>,
    /// Lines in the cart; 0 is an empty cart.
    pub cart_lines: usize,
    /// Consent answers by purpose.
    pub consent: BTreeMap<Purpose, ConsentStatus>,
    /// Windowed event counts: bucket (Unix hour) to count, per event name and category.
    pub windows: BTreeMap<WindowKey, BTreeMap<i64, u64>>,
}

/// Which events a windowed counter counts.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WindowKey {
    /// The event name: a kind, or a track event's name.
    pub event: String,
    /// Only events with an item in this category; `None`: all events of the name.
    pub category: Option<String>,
}

impl SegmentInput {
    /// Counts one event at time `at` in the windowed counters: once under `(event, None)`,
    /// and once under `(event, category)` for each distinct category of its items.
    pub fn record(&mut self, event: &str, categories: &[&str], at: OffsetDateTime) {
        let hour = millis(at).div_euclid(BUCKET_MS);
        let distinct: BTreeSet<&str> = categories.iter().copied().collect();
        let keys = std::iter::once(None).chain(distinct.into_iter().map(Some));
        for category in keys {
            let key = WindowKey {
                event: event.into(),
                category: category.map(String::from),
            };
            *self
                .windows
                .entry(key)
                .or_default()
                .entry(hour)
                .or_default() += 1;
        }
    }

    fn metric(&self, m: Metric) -> i128 {
        match m {
            Metric::Events => self.events.into(),
            Metric::PageViews => self.page_views.into(),
            Metric::Sessions => self.sessions.into(),
            Metric::Orders => self.orders.into(),
            Metric::Revenue => self.revenue.into(),
            Metric::EmailOpens => self.email_opens.into(),
            Metric::EmailClicks => self.email_clicks.into(),
        }
    }

    /// The time in Unix milliseconds.
    fn time(&self, field: TimeField) -> Option<i64> {
        let t = match field {
            TimeField::FirstSeen => self.first_seen,
            TimeField::LastSeen => self.last_seen,
            TimeField::LastOrderAt => self.last_order_at,
            TimeField::LastEngagedAt => self.last_engaged_at,
            TimeField::CartUpdatedAt => self.cart_updated_at,
        };
        t.map(millis)
    }

    fn buckets(&self, event: &str, category: Option<&str>) -> Option<&BTreeMap<i64, u64>> {
        let key = WindowKey {
            event: event.into(),
            category: category.map(String::from),
        };
        self.windows.get(&key)
    }
}

/// When bucket `hour` leaves a window of `hours` buckets: `(hour + hours) × 1h`.
fn bucket_leaves(hour: i64, hours: i64) -> i64 {
    hour.saturating_add(hours).saturating_mul(BUCKET_MS)
}

/// A membership and how long it lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evaluation {
    /// Whether the profile is in the segment.
    pub member: bool,
    /// The first time after `now` at which `member` differs if only time passes; `None`:
    /// never.
    pub deadline: Option<OffsetDateTime>,
}

impl Segment {
    /// The profile's membership at `now` and its deadline ([`Predicate::evaluate`]).
    pub fn evaluate(&self, input: &SegmentInput, now: OffsetDateTime) -> Evaluation {
        self.condition.evaluate(input, now)
    }

    /// A stable fingerprint of the compiled condition (see "Fingerprints" in the module
    /// docs): 32 lowercase hex digits.
    ///
    /// # Errors
    /// The condition cannot be serialized (not expected for these types).
    pub fn fingerprint(&self) -> Result<String, serde_json::Error> {
        let mut hash = Fnv128::default();
        serde_json::to_writer(&mut hash, &self.condition)?;
        Ok(format!("{:032x}", hash.0))
    }
}

/// The fingerprint of a whole set of definitions: of each segment's name and
/// [`Segment::fingerprint`], in name order, so the order of the `[[segments]]` tables and
/// their descriptions do not count. `definitions` are (name, fingerprint) pairs.
pub fn fingerprint_all<'a>(definitions: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let sorted: BTreeMap<&str, &str> = definitions.into_iter().collect();
    let mut hash = Fnv128::default();
    for (name, fingerprint) in sorted {
        // Names are [a-z0-9_-] and fingerprints hex: the separators cannot occur in them.
        hash.update(name.as_bytes());
        hash.update(b"=");
        hash.update(fingerprint.as_bytes());
        hash.update(b"\n");
    }
    format!("{:032x}", hash.0)
}

/// 128-bit FNV-1a: small, stable across builds and platforms (unlike std's `Hasher`s,
/// whose output may change between Rust releases), and plenty against accidental
/// collisions among a few hundred definitions. Not meant to resist a crafted collision:
/// definitions come from the collector's own config.
struct Fnv128(u128);

impl Default for Fnv128 {
    fn default() -> Self {
        Self(0x6c62_272e_07bb_0142_62b8_2175_6295_c58d)
    }
}

impl Fnv128 {
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;

    fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u128::from(b);
            self.0 = self.0.wrapping_mul(Self::PRIME);
        }
    }
}

impl std::io::Write for Fnv128 {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Predicate {
    /// Whether the predicate holds for `input` at `now`, to the millisecond.
    pub fn holds(&self, input: &SegmentInput, now: OffsetDateTime) -> bool {
        self.holds_at(input, millis(now))
    }

    /// Whether it holds at `now` and the exact deadline: the first instant after `now` at
    /// which it would differ (see "Deadlines" in the module docs).
    pub fn evaluate(&self, input: &SegmentInput, now: OffsetDateTime) -> Evaluation {
        let now = millis(now);
        let member = self.holds_at(input, now);
        let mut instants = Vec::new();
        self.instants(input, &mut instants);
        instants.retain(|&t| t > now);
        instants.sort_unstable();
        instants.dedup();
        let deadline = instants
            .into_iter()
            .find(|&t| self.holds_at(input, t) != member)
            .and_then(from_millis);
        Evaluation { member, deadline }
    }

    fn holds_at(&self, p: &SegmentInput, now: i64) -> bool {
        match self {
            Predicate::All { of } => of.iter().all(|c| c.holds_at(p, now)),
            Predicate::Any { of } => of.iter().any(|c| c.holds_at(p, now)),
            Predicate::Not { of } => !of.holds_at(p, now),
            Predicate::Metric { field, min, max } => in_range(p.metric(*field), *min, *max),
            Predicate::Count { event, min, max } => {
                let n = p.counts.get(event).copied().unwrap_or(0);
                in_range(n.into(), *min, *max)
            }
            Predicate::WindowCount {
                event,
                category,
                hours,
                min,
                max,
            } => {
                let n: u64 = p
                    .buckets(event, category.as_deref())
                    .into_iter()
                    .flatten()
                    .filter(|&(&hour, _)| bucket_leaves(hour, *hours) > now)
                    .fold(0, |sum, (_, &n)| sum.saturating_add(n));
                in_range(n.into(), *min, *max)
            }
            Predicate::TraitIn { name, values } => p
                .traits
                .get(name)
                .is_some_and(|v| values.iter().any(|value| value == v)),
            Predicate::TraitExists { name } => p.traits.contains_key(name),
            Predicate::Within { field, ms } => {
                p.time(*field).is_some_and(|t| now < t.saturating_add(*ms))
            }
            Predicate::OlderThan { field, ms } => {
                p.time(*field).is_some_and(|t| now >= t.saturating_add(*ms))
            }
            Predicate::CartNotEmpty => p.cart_lines > 0,
            Predicate::NoOrderSince { field } => match (p.time(*field), p.last_order_at) {
                (None, _) => false,
                (Some(_), None) => true,
                (Some(since), Some(order)) => millis(order) < since,
            },
            Predicate::ConsentGranted { purpose } => {
                *purpose == Purpose::Necessary
                    || p.consent.get(purpose) == Some(&ConsentStatus::Granted)
            }
        }
    }

    /// Pushes the instants at which a test of this tree changes by time alone (some may be
    /// past).
    fn instants(&self, p: &SegmentInput, out: &mut Vec<i64>) {
        match self {
            Predicate::All { of } | Predicate::Any { of } => {
                for c in of {
                    c.instants(p, out);
                }
            }
            Predicate::Not { of } => of.instants(p, out),
            Predicate::Within { field, ms } | Predicate::OlderThan { field, ms } => {
                if let Some(t) = p.time(*field) {
                    out.push(t.saturating_add(*ms));
                }
            }
            Predicate::WindowCount {
                event,
                category,
                hours,
                ..
            } => {
                let buckets = p.buckets(event, category.as_deref()).into_iter().flatten();
                out.extend(
                    buckets
                        .filter(|&(_, &n)| n > 0)
                        .map(|(&hour, _)| bucket_leaves(hour, *hours)),
                );
            }
            Predicate::Metric { .. }
            | Predicate::Count { .. }
            | Predicate::TraitIn { .. }
            | Predicate::TraitExists { .. }
            | Predicate::CartNotEmpty
            | Predicate::NoOrderSince { .. }
            | Predicate::ConsentGranted { .. } => {}
        }
    }
}

fn in_range(n: i128, min: Option<i64>, max: Option<i64>) -> bool {
    min.is_none_or(|min| n >= min.into()) && max.is_none_or(|max| n <= max.into())
}

/// Unix milliseconds, rounded down.
fn millis(t: OffsetDateTime) -> i64 {
    // Any OffsetDateTime is within ±10^4 years: its milliseconds fit an i64.
    t.unix_timestamp_nanos().div_euclid(1_000_000) as i64
}

fn from_millis(ms: i64) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(name: &str, description: &str, condition: serde_json::Value) -> Segment {
        let table =
            serde_json::json!({"name": name, "description": description, "condition": condition});
        compile(&[table], &LifecycleThresholds::default())
            .unwrap()
            .remove(0)
    }

    #[test]
    fn fingerprints_are_stable_and_follow_the_compiled_condition_only() {
        let orders = serde_json::json!({"metric": {"field": "orders", "at_least": 3}});
        let loyal = segment("loyal", "", orders.clone());
        // FNV-1a 128 of that JSON, as an independent implementation computes it. It must
        // never change between builds, or every collector would rebuild every segment after
        // an upgrade.
        assert_eq!(
            serde_json::to_string(&loyal.condition).unwrap(),
            r#"{"op":"metric","field":"orders","min":3}"#
        );
        assert_eq!(
            loyal.fingerprint().unwrap(),
            "9fb592b53cfcf2af15895fa2c5fe24de"
        );
        let renamed = segment("regulars", "Ordered three times", orders);
        assert_eq!(renamed.fingerprint().unwrap(), loyal.fingerprint().unwrap());
        let stricter = segment(
            "loyal",
            "",
            serde_json::json!({"metric": {"field": "orders", "at_least": 4}}),
        );
        assert_ne!(
            stricter.fingerprint().unwrap(),
            loyal.fingerprint().unwrap()
        );

        // Lifecycle stages compile to durations: other thresholds, another fingerprint.
        let dormant = serde_json::json!({"name": "d", "condition": {"lifecycle": "dormant"}});
        let mut thresholds = LifecycleThresholds::default();
        let before = compile(std::slice::from_ref(&dormant), &thresholds).unwrap();
        thresholds.dormant_after = Duration::from_secs(20 * 86_400);
        let after = compile(&[dormant], &thresholds).unwrap();
        assert_ne!(
            before[0].fingerprint().unwrap(),
            after[0].fingerprint().unwrap()
        );
    }

    #[test]
    fn the_fingerprint_of_a_set_ignores_order_but_not_names() {
        let a = fingerprint_all([("a", "01"), ("b", "02")]);
        assert_eq!(a, fingerprint_all([("b", "02"), ("a", "01")]));
        assert_ne!(a, fingerprint_all([("a", "02"), ("b", "01")]));
        assert_ne!(a, fingerprint_all([("a", "01")]));
        assert_ne!(fingerprint_all([]), a);
        assert_eq!(fingerprint_all([]).len(), 32);
    }
}
