//! The Rust side of `apply.lua`: the script with the configured segments written in, the
//! `KEYS` and `ARGV` of one profile update or of one evaluation at a deadline, the JSON each
//! event travels in, and the event stream entry (a public format, see docs/KEY_SCHEMA.md).

use std::collections::BTreeSet;
use std::fmt::Write as _;

use serde::{Serialize, Serializer};
use time::OffsetDateTime;

use crate::keys::{self, DEADLINES, EVENT_STREAM, ProfileKeys, TRANSITION_STREAM};
use crate::model::{ConsentMask, Event, EventKind, Item, ProfileId, ProfileUpdate, Purpose, Value};
use crate::schedule::Reason;
use crate::segments::{Predicate, Segment};
use crate::store::ProfileConfig;

/// The script's source, without segments.
const SOURCE: &str = include_str!("apply.lua");

/// The line of [`SOURCE`] that [`ScriptSegments`] replaces.
const PLAN_LINE: &str = "local plan = nil\n";

/// Integers travel as JSON numbers, which the script's cjson decodes as doubles: exact up to
/// 2^53. Times are far below; money beyond it (90 trillion in minor units) can only come from
/// a broken or hostile client, and is clamped so the script's arithmetic stays exact.
const MAX_EXACT: i64 = (1 << 53) - 1;

fn exact(n: i64) -> i64 {
    n.clamp(-MAX_EXACT, MAX_EXACT)
}

/// Unix milliseconds.
pub(crate) fn millis(t: OffsetDateTime) -> i64 {
    // Any OffsetDateTime is within ±10^4 years: its milliseconds fit an i64 and 2^53.
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

/// The apply script for a set of segments, built once per store: the segments are written
/// into its text as a Lua table (`local plan = {...}`), so that no call sends or decodes
/// them; a call only names their member sets among its keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ScriptSegments {
    /// The script's source.
    pub(crate) source: String,
    /// `segment:{name}:members` of each segment, in the order of the plan's `segments`: the
    /// script's `KEYS` after the fixed ones.
    pub(crate) member_keys: Vec<String>,
}

/// The plan: each segment's name and condition, and what the conditions read, so that the
/// script reads nothing else (see `apply.lua`).
#[derive(Serialize)]
struct Plan<'a> {
    segments: Vec<Named<'a>>,
    /// The windowed (event, category) pairs.
    windows: Vec<Window<'a>>,
    /// Hours of window buckets to keep: the longest window.
    retention: i64,
    /// The `counts` fields that `count` conditions read.
    counts: BTreeSet<&'a str>,
    /// The traits that trait conditions read.
    traits: BTreeSet<&'a str>,
    /// Whether a condition reads the cart.
    cart: bool,
}

#[derive(Serialize)]
struct Named<'a> {
    name: &'a str,
    condition: &'a Predicate,
}

#[derive(Serialize)]
struct Window<'a> {
    event: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    category: Option<&'a str>,
    /// What follows the hour in the pair's bucket fields ([`keys::window_field`]).
    tail: String,
}

impl ScriptSegments {
    /// The script for `segments`.
    ///
    /// # Errors
    /// A segment cannot be serialized (not expected for these types).
    pub(crate) fn new(segments: &[Segment]) -> Result<Self, serde_json::Error> {
        if segments.is_empty() {
            return Ok(Self {
                source: SOURCE.into(),
                member_keys: Vec::new(),
            });
        }
        let mut plan = Plan {
            segments: Vec::with_capacity(segments.len()),
            windows: Vec::new(),
            retention: 0,
            counts: BTreeSet::new(),
            traits: BTreeSet::new(),
            cart: false,
        };
        let mut windows = BTreeSet::new();
        for s in segments {
            plan.segments.push(Named {
                name: &s.name,
                condition: &s.condition,
            });
            reads(&s.condition, &mut plan, &mut windows);
        }
        plan.windows = windows
            .into_iter()
            .map(|(event, category)| Window {
                event,
                category,
                tail: keys::window_field_tail(event, category),
            })
            .collect();
        let mut line = String::from("local plan = ");
        lua(&serde_json::to_value(&plan)?, &mut line);
        line.push('\n');
        Ok(Self {
            source: SOURCE.replacen(PLAN_LINE, &line, 1),
            member_keys: segments
                .iter()
                .map(|s| keys::segment_members(&s.name))
                .collect(),
        })
    }
}

/// Writes `value` as a Lua expression: arrays and objects as table constructors, strings
/// with every byte but letters, digits and a few safe marks escaped as `\ddd`. The plan has
/// no nulls and its numbers are integers below 2^53.
fn lua(value: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match value {
        Value::Null => out.push_str("nil"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => lua_string(s, out),
        Value::Array(items) => {
            out.push('{');
            for item in items {
                lua(item, out);
                out.push(',');
            }
            out.push('}');
        }
        Value::Object(fields) => {
            out.push('{');
            for (key, item) in fields {
                out.push('[');
                lua_string(key, out);
                out.push_str("]=");
                lua(item, out);
                out.push(',');
            }
            out.push('}');
        }
    }
}

fn lua_string(s: &str, out: &mut String) {
    out.push('"');
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b" _-:,.".contains(&b) {
            out.push(char::from(b));
        } else {
            // Three digits, so that a digit after the escape cannot extend it.
            let _ = write!(out, "\\{b:03}");
        }
    }
    out.push('"');
}

/// Adds what `p` reads to `plan`, and its windowed pairs to `windows`.
fn reads<'a>(
    p: &'a Predicate,
    plan: &mut Plan<'a>,
    windows: &mut BTreeSet<(&'a str, Option<&'a str>)>,
) {
    match p {
        Predicate::All { of } | Predicate::Any { of } => {
            for c in of {
                reads(c, plan, windows);
            }
        }
        Predicate::Not { of } => reads(of, plan, windows),
        Predicate::Count { event, .. } => {
            plan.counts.insert(event);
        }
        Predicate::WindowCount {
            event,
            category,
            hours,
            ..
        } => {
            windows.insert((event, category.as_deref()));
            plan.retention = plan.retention.max(*hours);
        }
        Predicate::TraitIn { name, .. } | Predicate::TraitExists { name } => {
            plan.traits.insert(name);
        }
        Predicate::CartNotEmpty => plan.cart = true,
        Predicate::Metric { .. }
        | Predicate::Within { .. }
        | Predicate::OlderThan { .. }
        | Predicate::NoOrderSince { .. }
        | Predicate::ConsentGranted { .. } => {}
    }
}

/// The `EVALSHA` of one update: keys (the segments' member sets last), settings and one
/// JSON argument per event.
///
/// # Errors
/// An event cannot be serialized (not expected for these types).
pub(crate) fn invocation<'s>(
    script: &'s redis::Script,
    member_keys: &[String],
    update: &ProfileUpdate,
    config: &ProfileConfig,
) -> Result<redis::ScriptInvocation<'s>, serde_json::Error> {
    // The update's clock: dedupe ages and the lifecycle at write are measured from the last
    // time the collector received one of its events, so replays behave like the original.
    let now = update
        .events
        .iter()
        .map(|e| e.received_at)
        .max()
        .unwrap_or_else(OffsetDateTime::now_utc);
    // The anonymous id was checked by the collector; one that is no profile id has no
    // suppression key, and the profile's own stands in.
    let anonymous = update
        .anonymous_id
        .as_deref()
        .and_then(|a| ProfileId::anonymous(a).ok());
    let mut inv = prepare(
        script,
        member_keys,
        &update.profile,
        anonymous.as_ref(),
        now,
        config,
    );
    inv.arg(update.anonymous_id.as_deref().unwrap_or(""))
        .arg(update.user_id.as_deref().unwrap_or(""))
        .arg(update.context.session_id.as_deref().unwrap_or(""))
        // No claim and no reason: an update.
        .arg("")
        .arg("")
        .arg(config.max_anonymous_ids);
    let context = context_json(update);
    for event in &update.events {
        inv.arg(script_event(update, &context, event)?);
    }
    Ok(inv)
}

/// The `EVALSHA` that re-evaluates the segments of a profile the caller claimed in the
/// schedule, with the claim's score (Unix ms), at `now`, for `reason`: no events, and no
/// ids or session.
pub(crate) fn evaluation<'s>(
    script: &'s redis::Script,
    member_keys: &[String],
    profile: &ProfileId,
    claim: i64,
    reason: Reason,
    now: OffsetDateTime,
    config: &ProfileConfig,
) -> redis::ScriptInvocation<'s> {
    let mut inv = prepare(script, member_keys, profile, None, now, config);
    inv.arg("")
        .arg("")
        .arg("")
        .arg(claim)
        .arg(reason.as_str())
        .arg(config.max_anonymous_ids);
    inv
}

/// The keys and the arguments up to the profile id, which updates and evaluations share.
/// `anonymous`: the update's anonymous profile, whose suppression the script checks too.
fn prepare<'s>(
    script: &'s redis::Script,
    member_keys: &[String],
    profile: &ProfileId,
    anonymous: Option<&ProfileId>,
    now: OffsetDateTime,
    config: &ProfileConfig,
) -> redis::ScriptInvocation<'s> {
    let mut inv = script.prepare_invoke();
    for key in ProfileKeys::new(profile).all() {
        inv.key(key);
    }
    inv.key(EVENT_STREAM).key(TRANSITION_STREAM).key(DEADLINES);
    inv.key(keys::suppressed(profile))
        .key(keys::suppressed(anonymous.unwrap_or(profile)));
    for key in member_keys {
        inv.key(key);
    }
    inv.arg(millis(now))
        .arg(duration_millis(config.dedupe_window))
        .arg(config.dedupe_max_ids)
        .arg(config.recently_viewed_max)
        .arg(config.event_stream_max_len)
        .arg(duration_millis(config.lifecycle.new_for))
        .arg(config.transition_stream_max_len)
        .arg(profile.as_str());
    inv
}

/// The `EVALSHA` that folds the data of anonymous profile `source` (merge.lua's snapshot)
/// into user profile `profile`, at `now`.
pub(crate) fn fold<'s>(
    script: &'s redis::Script,
    member_keys: &[String],
    profile: &ProfileId,
    source: &ProfileId,
    snapshot: &str,
    now: OffsetDateTime,
    config: &ProfileConfig,
) -> redis::ScriptInvocation<'s> {
    let mut inv = prepare(script, member_keys, profile, None, now, config);
    let user_id = profile.as_str().strip_prefix("u:").unwrap_or_default();
    inv.arg("")
        .arg(user_id)
        .arg("")
        .arg("")
        .arg("merged")
        .arg(config.max_anonymous_ids)
        .arg(source.as_str())
        .arg(snapshot);
    inv
}

fn duration_millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The batch context without its empty fields.
fn context_json(update: &ProfileUpdate) -> serde_json::Value {
    match serde_json::to_value(&update.context) {
        Ok(serde_json::Value::Object(mut fields)) => {
            fields.retain(|_, v| !v.is_null());
            serde_json::Value::Object(fields)
        }
        _ => serde_json::Value::Null,
    }
}

/// What the script reads of one event (see the header of `apply.lua`).
#[derive(Serialize)]
struct ScriptEvent<'a> {
    /// Message id, 32 hex digits: the dedupe member.
    id: &'a str,
    kind: &'static str,
    /// The `counts` field: the kind, or a track event's name.
    count: &'a str,
    /// Event time, Unix ms.
    ts: i64,
    /// Received time, Unix ms: the dedupe score.
    received: i64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    items: Vec<ScriptItem<'a>>,
    /// Identify: trait name and text, in order (the last of a name wins).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    traits: Vec<(&'a str, String)>,
    /// Order: revenue, or the items' total when the event has none.
    #[serde(skip_serializing_if = "is_zero")]
    revenue: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    currency: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    granted: Vec<&'static str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    denied: Vec<&'static str>,
    /// Consent change: where the answer came from (its `source` property, e.g. `api`,
    /// `tcf`, `gcm`).
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<&'a str>,
    /// The stream entry, stored as is.
    event: String,
}

#[derive(Serialize)]
struct ScriptItem<'a> {
    product: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    category: Option<&'a str>,
    price: i64,
    quantity: u32,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

fn script_event(
    update: &ProfileUpdate,
    context: &serde_json::Value,
    e: &Event,
) -> Result<String, serde_json::Error> {
    let id = e.message_id.simple().to_string();
    let count = match (e.kind, e.name.as_deref()) {
        (EventKind::Track, Some(name)) if !name.is_empty() => name,
        _ => e.kind.as_str(),
    };
    let commerce = matches!(
        e.kind,
        EventKind::ProductViewed
            | EventKind::CartAdd
            | EventKind::CartRemove
            | EventKind::OrderCompleted
    );
    let items = if commerce {
        e.items
            .iter()
            .map(|i| ScriptItem {
                product: &i.product_id,
                category: i.category.as_deref().filter(|c| !c.is_empty()),
                price: exact(i.price),
                quantity: i.quantity,
            })
            .collect()
    } else {
        Vec::new()
    };
    let traits = if e.kind == EventKind::Identify {
        e.properties
            .iter()
            .map(|(name, value)| (name.as_str(), value.to_string()))
            .collect()
    } else {
        Vec::new()
    };
    let order = e.kind == EventKind::OrderCompleted;
    let revenue = match e.revenue {
        _ if !order => 0,
        0 => e
            .items
            .iter()
            .map(|i| i.price.saturating_mul(i64::from(i.quantity)))
            .fold(0i64, i64::saturating_add),
        r => r,
    };
    let consent = e
        .consent
        .filter(|_| e.kind == EventKind::ConsentChange)
        .unwrap_or_default();
    let stream = StreamEvent {
        message_id: &id,
        profile: update.profile.as_str(),
        anonymous_id: update.anonymous_id.as_deref(),
        kind: e.kind.as_str(),
        name: e.name.as_deref(),
        timestamp: millis(e.timestamp),
        received_at: millis(e.received_at),
        purpose: e.purpose.as_str(),
        properties: Properties(&e.properties),
        items: &e.items,
        user_id: e.user_id.as_deref(),
        previous_id: e.previous_id.as_deref(),
        order_id: e.order_id.as_deref(),
        revenue: e.revenue,
        currency: e.currency.as_deref(),
        consent: e.consent.map(|c| StreamConsent {
            granted: purposes(c.granted),
            denied: purposes(c.denied),
        }),
        context,
    };
    serde_json::to_string(&ScriptEvent {
        id: &id,
        kind: e.kind.as_str(),
        count,
        ts: millis(e.timestamp),
        received: millis(e.received_at),
        items,
        traits,
        revenue: exact(revenue),
        currency: e.currency.as_deref().filter(|_| order),
        granted: purposes(consent.granted),
        denied: purposes(consent.denied),
        source: consent_source(e),
        event: serde_json::to_string(&stream)?,
    })
}

/// The most bytes of a consent answer's source that are kept.
const MAX_SOURCE_BYTES: usize = 64;

/// A consent change's `source` property, when it is a short string.
fn consent_source(e: &Event) -> Option<&str> {
    if e.kind != EventKind::ConsentChange {
        return None;
    }
    e.properties.iter().find_map(|(k, v)| match v {
        Value::String(s) if k == "source" && !s.is_empty() && s.len() <= MAX_SOURCE_BYTES => {
            Some(s.as_str())
        }
        _ => None,
    })
}

/// The line of [`SOURCE`] that [`with_settings`] replaces.
const MARKETING_LINE: &str = "local MARKETING_TRAITS = {}\n";

/// The script text with the settings it is built with: the traits that need marketing
/// consent.
pub(crate) fn with_settings(source: &str, config: &ProfileConfig) -> String {
    let mut line = String::from("local MARKETING_TRAITS = {");
    for t in &config.marketing_traits {
        line.push('[');
        lua_string(t, &mut line);
        line.push_str("] = true, ");
    }
    line.push_str("}\n");
    source.replacen(MARKETING_LINE, &line, 1)
}

fn purposes(mask: ConsentMask) -> Vec<&'static str> {
    Purpose::ALL
        .into_iter()
        .filter(|p| mask.contains(*p))
        .map(Purpose::as_str)
        .collect()
}

/// The `event` field of a `stream:events` entry: the event as the collector accepted it,
/// with the batch's ids and context. Documented in docs/KEY_SCHEMA.md; absent fields are
/// unknown or empty.
#[derive(Serialize)]
struct StreamEvent<'a> {
    message_id: &'a str,
    profile: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    anonymous_id: Option<&'a str>,
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    timestamp: i64,
    received_at: i64,
    purpose: &'static str,
    #[serde(skip_serializing_if = "Properties::is_empty")]
    properties: Properties<'a>,
    #[serde(skip_serializing_if = "<[Item]>::is_empty")]
    items: &'a [Item],
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    previous_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    order_id: Option<&'a str>,
    #[serde(skip_serializing_if = "is_zero")]
    revenue: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    currency: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    consent: Option<StreamConsent>,
    #[serde(skip_serializing_if = "is_empty_object")]
    context: &'a serde_json::Value,
}

#[derive(Serialize)]
struct StreamConsent {
    granted: Vec<&'static str>,
    denied: Vec<&'static str>,
}

/// Properties as a JSON object, in the order sent.
struct Properties<'a>(&'a [(String, Value)]);

impl Properties<'_> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for Properties<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

fn is_empty_object(v: &&serde_json::Value) -> bool {
    v.as_object().is_none_or(|o| o.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ConsentChange, Context, ProfileId};
    use time::macros::datetime;
    use uuid::Uuid;

    fn event(kind: EventKind) -> Event {
        Event {
            message_id: Uuid::from_u128(0xabc),
            kind,
            name: None,
            timestamp: datetime!(2026-01-02 03:04:05.678 UTC),
            received_at: datetime!(2026-01-02 03:04:06 UTC),
            properties: vec![],
            items: vec![],
            user_id: None,
            previous_id: None,
            order_id: None,
            revenue: 0,
            currency: None,
            consent: None,
            purpose: Purpose::Analytics,
        }
    }

    fn update(events: Vec<Event>) -> ProfileUpdate {
        ProfileUpdate {
            profile: ProfileId::anonymous("v1").unwrap(),
            anonymous_id: Some("v1".into()),
            user_id: None,
            context: Context {
                session_id: Some("s1".into()),
                screen: Some((390, 844)),
                ..Context::default()
            },
            events,
        }
    }

    fn encode(e: Event) -> serde_json::Value {
        let u = update(vec![e]);
        let text = script_event(&u, &context_json(&u), &u.events[0]).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn segments_are_written_into_the_script_with_what_they_read() {
        let tables = [
            serde_json::json!({"name": "a", "description": "not written", "condition": {"all": [
                {"cart": "not_empty"},
                {"trait": {"name": "plan", "equals": "pro"}},
                {"event_count": {"event": "Signed Up", "at_least": 1}},
                {"event_count": {"event": "product_viewed", "category": "shoes", "within": "24h", "at_least": 3}},
            ]}}),
            serde_json::json!({"name": "b", "condition": {"any": [
                {"event_count": {"event": "product_viewed", "category": "shoes", "within": "2d", "at_least": 1}},
                {"event_count": {"event": "email_clicked", "within": "1h", "at_most": 0}},
            ]}}),
        ];
        let segments = crate::segments::compile(&tables, &Default::default()).unwrap();
        let s = ScriptSegments::new(&segments).unwrap();
        assert_eq!(
            s.member_keys,
            ["segment:{a}:members", "segment:{b}:members"]
        );
        assert_eq!(SOURCE.matches(PLAN_LINE).count(), 1);
        let (head, tail) = SOURCE.split_once(PLAN_LINE).unwrap();
        let line = s
            .source
            .strip_prefix(head)
            .unwrap()
            .strip_suffix(tail)
            .unwrap();
        let q = |s: &str| {
            s.replace('"', "\\034")
                .replace('[', "\\091")
                .replace(']', "\\093")
        };
        assert_eq!(
            line,
            [
                r#"local plan = {["cart"]=true,["counts"]={"Signed Up",},"#,
                r#"["retention"]=48,["segments"]={{["condition"]={["of"]={"#,
                r#"{["op"]="cart_not_empty",},"#,
                r#"{["name"]="plan",["op"]="trait_in",["values"]={"pro",},},"#,
                r#"{["event"]="Signed Up",["min"]=1,["op"]="count",},"#,
                r#"{["category"]="shoes",["event"]="product_viewed",["hours"]=24,["min"]=3,["op"]="window_count",},"#,
                r#"},["op"]="all",},["name"]="a",},{["condition"]={["of"]={"#,
                r#"{["category"]="shoes",["event"]="product_viewed",["hours"]=48,["min"]=1,["op"]="window_count",},"#,
                r#"{["event"]="email_clicked",["hours"]=1,["max"]=0,["op"]="window_count",},"#,
                r#"},["op"]="any",},["name"]="b",},},["traits"]={"plan",},["windows"]={"#,
                &format!(
                    r#"{{["event"]="email_clicked",["tail"]="{}",}},"#,
                    q(r#","email_clicked"]"#)
                ),
                &format!(
                    r#"{{["category"]="shoes",["event"]="product_viewed",["tail"]="{}",}},"#,
                    q(r#","product_viewed","shoes"]"#)
                ),
                "},}\n",
            ]
            .concat()
        );
        assert_eq!(ScriptSegments::new(&[]).unwrap().source, SOURCE);
    }

    #[test]
    fn lua_strings_escape_every_byte_that_could_end_them() {
        let mut out = String::new();
        lua_string("a\"b\\c]]\n1é", &mut out);
        assert_eq!(out, r#""a\034b\092c\093\093\0101\195\169""#);
    }

    #[test]
    fn an_order_travels_with_its_stream_entry() {
        let mut e = event(EventKind::OrderCompleted);
        e.order_id = Some("o-1".into());
        e.currency = Some("EUR".into());
        e.items = vec![Item {
            product_id: "sku-1".into(),
            category: Some("shoes".into()),
            price: 5_000,
            quantity: 2,
            name: Some("Runner".into()),
        }];
        let json = encode(e);
        let stream = json["event"].as_str().unwrap().to_string();
        let mut script = json;
        script.as_object_mut().unwrap().remove("event");
        assert_eq!(
            script,
            serde_json::json!({
                "id": "00000000000000000000000000000abc",
                "kind": "order_completed",
                "count": "order_completed",
                "ts": 1_767_323_045_678_i64,
                "received": 1_767_323_046_000_i64,
                "items": [{"product": "sku-1", "category": "shoes", "price": 5000, "quantity": 2}],
                "revenue": 10_000,
                "currency": "EUR",
            })
        );
        assert_eq!(
            stream,
            concat!(
                r#"{"message_id":"00000000000000000000000000000abc","profile":"a:v1","#,
                r#""anonymous_id":"v1","kind":"order_completed","timestamp":1767323045678,"#,
                r#""received_at":1767323046000,"purpose":"analytics","items":[{"product_id":"sku-1","#,
                r#""category":"shoes","price":5000,"quantity":2,"name":"Runner"}],"order_id":"o-1","#,
                r#""currency":"EUR","context":{"screen":[390,844],"session_id":"s1"}}"#
            )
        );
    }

    #[test]
    fn identify_sends_traits_as_text_in_order() {
        let mut e = event(EventKind::Identify);
        e.properties = vec![
            ("plan".into(), Value::String("pro".into())),
            ("score".into(), Value::Float(0.1 + 0.2)),
            ("seats".into(), Value::Int(1 << 60)),
            ("vip".into(), Value::Bool(false)),
        ];
        let json = encode(e);
        assert_eq!(
            json["traits"],
            serde_json::json!([
                ["plan", "pro"],
                ["score", "0.30000000000000004"],
                ["seats", "1152921504606846976"],
                ["vip", "false"]
            ])
        );
        let stream: serde_json::Value =
            serde_json::from_str(json["event"].as_str().unwrap()).unwrap();
        assert_eq!(
            stream["properties"],
            serde_json::json!({"plan": "pro", "score": 0.30000000000000004, "seats": 1_152_921_504_606_846_976_i64, "vip": false})
        );
    }

    #[test]
    fn track_counts_by_name_and_consent_by_purpose() {
        let mut e = event(EventKind::Track);
        e.name = Some("Signed Up".into());
        assert_eq!(encode(e)["count"], "Signed Up");
        let mut e = event(EventKind::Track);
        e.name = Some(String::new());
        assert_eq!(encode(e)["count"], "track");

        let mut e = event(EventKind::ConsentChange);
        e.consent = Some(ConsentChange {
            granted: ConsentMask(Purpose::Analytics.bit() | Purpose::Marketing.bit()),
            denied: ConsentMask(Purpose::Personalization.bit()),
        });
        let json = encode(e);
        assert_eq!(
            json["granted"],
            serde_json::json!(["analytics", "marketing"])
        );
        assert_eq!(json["denied"], serde_json::json!(["personalization"]));
        let stream: serde_json::Value =
            serde_json::from_str(json["event"].as_str().unwrap()).unwrap();
        assert_eq!(
            stream["consent"],
            serde_json::json!({"granted": ["analytics", "marketing"], "denied": ["personalization"]})
        );
    }

    #[test]
    fn amounts_beyond_2_pow_53_are_clamped_for_the_script_only() {
        let mut e = event(EventKind::OrderCompleted);
        e.revenue = i64::MAX;
        let json = encode(e);
        assert_eq!(json["revenue"], MAX_EXACT);
        let stream: serde_json::Value =
            serde_json::from_str(json["event"].as_str().unwrap()).unwrap();
        assert_eq!(stream["revenue"], i64::MAX);

        let mut e = event(EventKind::OrderCompleted);
        e.items = vec![Item {
            product_id: "p".into(),
            category: None,
            price: i64::MAX / 2,
            quantity: 3,
            name: None,
        }];
        let json = encode(e);
        assert_eq!(json["revenue"], MAX_EXACT);
        assert_eq!(json["items"][0]["price"], MAX_EXACT);
    }
}
