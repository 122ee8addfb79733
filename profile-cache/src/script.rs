//! The Rust side of `apply.lua`: the `KEYS` and `ARGV` of one profile update, the JSON each
//! event travels in, and the event stream entry (a public format, see docs/KEY_SCHEMA.md).

use serde::{Serialize, Serializer};
use time::OffsetDateTime;

use crate::keys::{EVENT_STREAM, ProfileKeys};
use crate::model::{ConsentMask, Event, EventKind, Item, ProfileUpdate, Purpose, Value};
use crate::store::ProfileConfig;

/// The script's source.
pub(crate) const SOURCE: &str = include_str!("apply.lua");

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

/// The `EVALSHA` of one update: keys, settings and one JSON argument per event.
///
/// # Errors
/// An event cannot be serialized (not expected for these types).
pub(crate) fn invocation<'s>(
    script: &'s redis::Script,
    update: &ProfileUpdate,
    config: &ProfileConfig,
) -> Result<redis::ScriptInvocation<'s>, serde_json::Error> {
    let mut inv = script.prepare_invoke();
    for key in ProfileKeys::new(&update.profile).all() {
        inv.key(key);
    }
    inv.key(EVENT_STREAM);
    // The update's clock: dedupe ages and the lifecycle at write are measured from the last
    // time the collector received one of its events, so replays behave like the original.
    let now = update
        .events
        .iter()
        .map(|e| e.received_at)
        .max()
        .unwrap_or_else(OffsetDateTime::now_utc);
    inv.arg(millis(now))
        .arg(duration_millis(config.dedupe_window))
        .arg(config.dedupe_max_ids)
        .arg(config.recently_viewed_max)
        .arg(config.event_stream_max_len)
        .arg(duration_millis(config.lifecycle.new_for))
        .arg(update.profile.as_str())
        .arg(update.anonymous_id.as_deref().unwrap_or(""))
        .arg(update.user_id.as_deref().unwrap_or(""))
        .arg(update.context.session_id.as_deref().unwrap_or(""));
    let context = context_json(update);
    for event in &update.events {
        inv.arg(script_event(update, &context, event)?);
    }
    Ok(inv)
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
        event: serde_json::to_string(&stream)?,
    })
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
