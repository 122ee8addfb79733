//! One Segment message (JSON) to one wire event with its context and consent mask: ids,
//! message id, times, properties and traits, e-commerce events, consent categories.

use profile_cache::Purpose;
use profile_cache::model::{MAX_ID_BYTES, check_id, check_person_id};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::money;
use crate::config::{DEFAULT_SEGMENT_PURPOSES, LimitsConfig, SourceConfig};
use crate::error::ApiError;

/// A Segment call: the message's `type`, or the route's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// `track`: a named event; e-commerce names become commerce kinds.
    Track,
    /// `identify`: traits of a user.
    Identify,
    /// `page`: a page view.
    Page,
    /// `screen`: a mobile screen view, kept as a page view.
    Screen,
    /// `group`: the group a user belongs to, kept as traits.
    Group,
    /// `alias`: another id of the same user.
    Alias,
}

impl Call {
    /// The call named `name` (a message's `type`, case-insensitive).
    pub fn from_type(name: &str) -> Option<Call> {
        [
            Call::Track,
            Call::Identify,
            Call::Page,
            Call::Screen,
            Call::Group,
            Call::Alias,
        ]
        .into_iter()
        .find(|c| c.as_str().eq_ignore_ascii_case(name))
    }

    /// The name Segment gives the call.
    pub fn as_str(self) -> &'static str {
        match self {
            Call::Track => "track",
            Call::Identify => "identify",
            Call::Page => "page",
            Call::Screen => "screen",
            Call::Group => "group",
            Call::Alias => "alias",
        }
    }
}

/// Segment's e-commerce spec names and the kinds they map onto.
pub const COMMERCE_EVENTS: [(&str, wire::EventKind); 5] = [
    ("Product Viewed", wire::EventKind::ProductViewed),
    ("Product Added", wire::EventKind::CartAdd),
    ("Product Removed", wire::EventKind::CartRemove),
    ("Checkout Started", wire::EventKind::CheckoutStarted),
    ("Order Completed", wire::EventKind::OrderCompleted),
];

/// The track event Segment's consent tools send when a person's choices change; with a
/// consent context it becomes a consent change.
pub const CONSENT_EVENT: &str = "Segment Consent Preference Updated";

/// Properties the commerce kinds read into items, order fields and currency, and so do
/// not keep as properties.
const COMMERCE_FIELDS: [&str; 11] = [
    "product_id",
    "sku",
    "category",
    "price",
    "quantity",
    "name",
    "products",
    "order_id",
    "revenue",
    "total",
    "currency",
];

/// What every message of one request shares.
#[derive(Debug, Clone, Copy)]
pub struct Settings<'a> {
    /// The request's write key.
    pub write_key: &'a str,
    /// `sources.<write key>`, when configured.
    pub source: Option<&'a SourceConfig>,
    /// Lengths and counts.
    pub limits: &'a LimitsConfig,
    /// The request's `sentAt` (Unix ms, 0 when absent); a message's own wins.
    pub sent_at_ms: i64,
    /// The batch's `context`, for messages without one.
    pub context: Option<&'a Map<String, Value>>,
}

/// A message ready for a wire batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Ids, page, campaign, locale.
    pub context: wire::Context,
    /// The purposes granted (a wire consent mask).
    pub consent: u8,
    /// When the client sent it, Unix ms (0: unknown).
    pub sent_at_ms: i64,
    /// The event.
    pub event: wire::Event,
}

/// Reads fields of one message and names them in errors (`batch[3].properties.price`).
struct Fields<'a> {
    prefix: &'a str,
    limits: &'a LimitsConfig,
}

impl Fields<'_> {
    fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    fn bad(&self, name: &str, problem: impl Into<String>, limit: Option<usize>) -> ApiError {
        ApiError::BadMessage {
            field: self.path(name),
            problem: problem.into(),
            limit,
        }
    }

    fn checked(&self, name: &str, text: String, limit: usize) -> Result<String, ApiError> {
        if text.len() > limit {
            return Err(self.bad(
                name,
                format!("is {} bytes, limit {limit}", text.len()),
                Some(limit),
            ));
        }
        Ok(text)
    }

    /// A string (numbers are taken as their text); absent, null or empty is `None`.
    fn text(&self, o: &Map<String, Value>, name: &str) -> Result<Option<String>, ApiError> {
        self.text_at(o.get(name), name, self.limits.max_string_bytes)
    }

    fn text_at(
        &self,
        v: Option<&Value>,
        name: &str,
        limit: usize,
    ) -> Result<Option<String>, ApiError> {
        let text = match v {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            Some(_) => return Err(self.bad(name, "is not a string", None)),
        };
        if text.is_empty() {
            return Ok(None);
        }
        self.checked(name, text, limit).map(Some)
    }

    /// A user id, anonymous id or previous id.
    fn person(&self, o: &Map<String, Value>, name: &str) -> Result<Option<String>, ApiError> {
        let Some(id) = self.text_at(o.get(name), name, usize::MAX)? else {
            return Ok(None);
        };
        check_person_id(&id).map_err(|e| {
            let limit = matches!(e, profile_cache::IdError::TooLong { .. }).then_some(MAX_ID_BYTES);
            self.bad(name, e.to_string(), limit)
        })?;
        Ok(Some(id))
    }

    fn object<'o>(
        &self,
        v: Option<&'o Value>,
        name: &str,
    ) -> Result<Option<&'o Map<String, Value>>, ApiError> {
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(o)) => Ok(Some(o)),
            Some(_) => Err(self.bad(name, "is not an object", None)),
        }
    }

    /// An ISO 8601 time as Unix ms; absent is 0.
    fn time(&self, o: &Map<String, Value>, name: &str) -> Result<i64, ApiError> {
        match o.get(name) {
            None | Some(Value::Null) => Ok(0),
            Some(Value::String(s)) => OffsetDateTime::parse(s, &Rfc3339)
                .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
                .map_err(|_| {
                    self.bad(
                        name,
                        format!("{s:?} is not an ISO 8601 time such as 2026-11-29T12:00:00.000Z"),
                        None,
                    )
                }),
            Some(_) => Err(self.bad(name, "is not an ISO 8601 time string", None)),
        }
    }

    /// The properties (or traits) of `o[name]`, nested objects flattened to dotted names
    /// (`address.city`), arrays kept as their JSON text, nulls left out; `skip` names are
    /// not kept. Keys start with `key_prefix`.
    fn properties(
        &self,
        o: &Map<String, Value>,
        name: &str,
        key_prefix: &str,
        skip: &[&str],
        out: &mut Vec<wire::Property>,
    ) -> Result<(), ApiError> {
        let Some(props) = self.object(o.get(name), name)? else {
            return Ok(());
        };
        for (k, v) in props {
            if skip.contains(&k.as_str()) {
                continue;
            }
            self.property(&format!("{name}.{k}"), format!("{key_prefix}{k}"), v, out)?;
        }
        let limit = self.limits.max_properties;
        if out.len() > limit {
            return Err(self.bad(
                name,
                format!("has {} values once flattened, limit {limit}", out.len()),
                Some(limit),
            ));
        }
        Ok(())
    }

    fn property(
        &self,
        field: &str,
        key: String,
        v: &Value,
        out: &mut Vec<wire::Property>,
    ) -> Result<(), ApiError> {
        let limit = self.limits.max_string_bytes;
        let value = match v {
            Value::Null => return Ok(()),
            Value::Bool(b) => wire::Value::Bool(*b),
            Value::Number(n) => match n.as_i64() {
                Some(i) => wire::Value::Int(i),
                None => wire::Value::Float(n.as_f64().unwrap_or_default()),
            },
            Value::String(s) => wire::Value::String(self.checked(field, s.clone(), limit)?),
            Value::Array(_) => wire::Value::String(self.checked(field, v.to_string(), limit)?),
            Value::Object(o) => {
                for (k, v) in o {
                    self.property(&format!("{field}.{k}"), format!("{key}.{k}"), v, out)?;
                }
                return Ok(());
            }
        };
        if key.is_empty() || key.ends_with('.') {
            return Err(self.bad(field, "has an empty name", None));
        }
        let key = self.checked(field, key, limit)?;
        out.push(wire::Property { key, value });
        Ok(())
    }

    /// An amount in minor units.
    fn money(&self, o: &Map<String, Value>, name: &str, digits: u32) -> Result<i64, ApiError> {
        let text = match o.get(name) {
            None | Some(Value::Null) => return Ok(0),
            Some(Value::Number(n)) => n.to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(self.bad(name, "is not a number", None)),
        };
        money::to_minor(&text, digits).map_err(|e| self.bad(name, e, None))
    }

    /// A product of a commerce event: `product_id` (or `sku`), category, price, quantity
    /// (default 1), name.
    fn item(&self, o: &Map<String, Value>, digits: u32) -> Result<wire::Item, ApiError> {
        let product_id = match self.text(o, "product_id")? {
            Some(id) => id,
            None => self
                .text(o, "sku")?
                .ok_or_else(|| self.bad("product_id", "a product needs product_id or sku", None))?,
        };
        check_id(&product_id).map_err(|e| self.bad("product_id", e.to_string(), None))?;
        let quantity = match o.get("quantity") {
            None | Some(Value::Null) => 1,
            Some(v) => v
                .as_u64()
                .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
                .or_else(|| {
                    v.as_f64()
                        .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                        .map(|f| f as u64)
                })
                .and_then(|q| u32::try_from(q).ok())
                .ok_or_else(|| {
                    self.bad(
                        "quantity",
                        "is not a whole number from 0 to 4294967295",
                        None,
                    )
                })?,
        };
        Ok(wire::Item {
            product_id,
            category: self.text(o, "category")?,
            price: self.money(o, "price", digits)?,
            quantity,
            name: self.text(o, "name")?,
        })
    }
}

/// The message id's 16 bytes: a UUID's own bytes; for any other string the first 16 bytes
/// of SHA-256 over the write key, a zero byte and the string, so that a retry dedupes and
/// two sources cannot collide. A message without one gets a random id (it cannot be
/// deduplicated).
pub fn message_id(write_key: &str, message_id: Option<&str>) -> [u8; 16] {
    let Some(id) = message_id else {
        return *uuid::Uuid::new_v4().as_bytes();
    };
    if let Ok(uuid) = uuid::Uuid::parse_str(id) {
        return *uuid.as_bytes();
    }
    let digest = Sha256::new()
        .chain_update(write_key.as_bytes())
        .chain_update([0])
        .chain_update(id.as_bytes())
        .finalize();
    let mut bytes = [0; 16];
    bytes.copy_from_slice(&digest[..16]);
    bytes
}

/// The purpose a Segment consent category names: a purpose name (case-insensitive), or
/// the source's `consent_categories`.
pub fn purpose_of(category: &str, source: Option<&SourceConfig>) -> Option<Purpose> {
    Purpose::ALL
        .into_iter()
        .find(|p| p.as_str().eq_ignore_ascii_case(category))
        .or_else(|| {
            source?
                .consent_categories
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(category))
                .map(|(_, p)| *p)
        })
}

/// The purposes granted and denied by `context.consent.categoryPreferences`, as wire
/// masks; `None` without one. `necessary` is always granted.
fn consent(
    f: &Fields<'_>,
    context: Option<&Map<String, Value>>,
    source: Option<&SourceConfig>,
) -> Result<Option<(u8, u8)>, ApiError> {
    let consent = f.object(context.and_then(|c| c.get("consent")), "context.consent")?;
    let name = "context.consent.categoryPreferences";
    let Some(prefs) = f.object(consent.and_then(|c| c.get("categoryPreferences")), name)? else {
        return Ok(None);
    };
    let (mut granted, mut denied) = (Purpose::Necessary.bit(), 0u8);
    for (category, choice) in prefs {
        let Some(choice) = choice.as_bool() else {
            return Err(f.bad(&format!("{name}.{category}"), "is not true or false", None));
        };
        if let Some(p) = purpose_of(category, source) {
            if choice {
                granted |= p.bit();
            } else {
                denied |= p.bit();
            }
        }
    }
    Ok(Some((granted, denied & !granted)))
}

/// The consent mask of a message without a consent context: its source's
/// `default_purposes`, or [`DEFAULT_SEGMENT_PURPOSES`].
pub fn default_mask(source: Option<&SourceConfig>) -> u8 {
    let purposes = source
        .and_then(|s| s.default_purposes.as_deref())
        .unwrap_or(&DEFAULT_SEGMENT_PURPOSES);
    purposes
        .iter()
        .fold(Purpose::Necessary.bit(), |m, p| m | p.bit())
}

/// `message` (the body of a `call`, or one element of a batch, named `prefix` in errors)
/// as a wire event with its context and consent.
///
/// # Errors
/// [`ApiError::BadMessage`] naming the first field that is missing, of the wrong type, or
/// over a limit.
pub fn convert(
    call: Call,
    message: &Map<String, Value>,
    prefix: &str,
    s: &Settings<'_>,
) -> Result<Message, ApiError> {
    let f = Fields {
        prefix,
        limits: s.limits,
    };
    let user_id = f.person(message, "userId")?;
    let mut anonymous_id = f.person(message, "anonymousId")?;
    let context = match f.object(message.get("context"), "context")? {
        Some(c) => Some(c),
        None => s.context,
    };
    let mut event = wire::Event {
        message_id: message_id(
            s.write_key,
            f.text_at(message.get("messageId"), "messageId", usize::MAX)?
                .as_deref(),
        ),
        timestamp_ms: match f.time(message, "timestamp")? {
            0 => f.time(message, "originalTimestamp")?,
            t => t,
        },
        ..wire::Event::default()
    };
    let consent = consent(&f, context, s.source)?;
    let mut page_url = None;
    match call {
        Call::Track => {
            let name = f
                .text(message, "event")?
                .ok_or_else(|| f.bad("event", "a track call needs an event name", None))?;
            let commerce = COMMERCE_EVENTS.iter().find(|(n, _)| *n == name);
            if let Some((_, kind)) = commerce {
                event.kind = *kind;
                commerce_event(&f, message, &mut event)?;
            } else if let (CONSENT_EVENT, Some((granted, denied))) = (name.as_str(), consent) {
                event.kind = wire::EventKind::ConsentChange;
                event.consent_granted = granted;
                event.consent_denied = denied;
            } else {
                event.kind = wire::EventKind::Track;
                f.properties(message, "properties", "", &[], &mut event.properties)?;
            }
            event.name = Some(name);
        }
        Call::Identify => {
            event.kind = wire::EventKind::Identify;
            event.user_id = user_id.clone();
            f.properties(message, "traits", "", &[], &mut event.properties)?;
        }
        Call::Page | Call::Screen => {
            event.kind = wire::EventKind::Page;
            event.name = f.text(message, "name")?;
            let props = f.object(message.get("properties"), "properties")?;
            if let Some(props) = props {
                page_url = f.text_at(props.get("url"), "properties.url", s.limits.max_url_bytes)?;
            }
            f.properties(message, "properties", "", &[], &mut event.properties)?;
        }
        Call::Group => {
            // Kept on the profile as traits (`group_id`, `group.<trait>`): what an email is
            // personalised with, and what segments can test.
            event.kind = wire::EventKind::Identify;
            event.name = Some("Group".into());
            event.user_id = user_id.clone();
            let group_id = f
                .text(message, "groupId")?
                .ok_or_else(|| f.bad("groupId", "a group call needs a groupId", None))?;
            event.properties.push(wire::Property {
                key: "group_id".into(),
                value: wire::Value::String(group_id),
            });
            f.properties(message, "traits", "group.", &[], &mut event.properties)?;
        }
        Call::Alias => {
            let (Some(user), Some(previous)) = (&user_id, f.person(message, "previousId")?) else {
                let missing = if user_id.is_none() {
                    "userId"
                } else {
                    "previousId"
                };
                return Err(f.bad(missing, "an alias call needs userId and previousId", None));
            };
            event.kind = wire::EventKind::Alias;
            event.user_id = Some(user.clone());
            // The previous id is taken as the anonymous id: the user profile's update then
            // carries it, and the identity code merges that visitor's profile (two user
            // profiles are never merged).
            anonymous_id = Some(previous.clone());
            event.previous_id = Some(previous);
        }
    }
    if user_id.is_none() && anonymous_id.is_none() {
        return Err(f.bad("userId", "a message needs userId or anonymousId", None));
    }
    event.purpose = event.kind.least_purpose();
    Ok(Message {
        context: wire_context(&f, context, page_url, user_id, anonymous_id)?,
        consent: consent.map_or_else(|| default_mask(s.source), |(granted, _)| granted),
        sent_at_ms: match f.time(message, "sentAt")? {
            0 => s.sent_at_ms,
            t => t,
        },
        event,
    })
}

/// Items, order id, revenue and currency of an e-commerce event. Product events describe
/// one product in their properties; checkout and order events list them in `products`.
fn commerce_event(
    f: &Fields<'_>,
    message: &Map<String, Value>,
    event: &mut wire::Event,
) -> Result<(), ApiError> {
    let empty = Map::new();
    let props = f
        .object(message.get("properties"), "properties")?
        .unwrap_or(&empty);
    let p = Fields {
        prefix: &f.path("properties"),
        limits: f.limits,
    };
    event.currency = p
        .text(props, "currency")?
        .map(|c| c.trim().to_ascii_uppercase());
    let digits = money::minor_digits(event.currency.as_deref());
    match event.kind {
        wire::EventKind::ProductViewed | wire::EventKind::CartAdd | wire::EventKind::CartRemove => {
            event.items.push(p.item(props, digits)?);
        }
        _ => {
            let products = match props.get("products") {
                None | Some(Value::Null) => &[][..],
                Some(Value::Array(list)) => list.as_slice(),
                Some(_) => return Err(p.bad("products", "is not an array", None)),
            };
            let limit = f.limits.max_items;
            if products.len() > limit {
                return Err(p.bad(
                    "products",
                    format!("has {} products, limit {limit}", products.len()),
                    Some(limit),
                ));
            }
            for (i, product) in products.iter().enumerate() {
                let at = format!("{}[{i}]", p.path("products"));
                let Value::Object(product) = product else {
                    return Err(f.bad(
                        &format!("properties.products[{i}]"),
                        "is not an object",
                        None,
                    ));
                };
                let item = Fields {
                    prefix: &at,
                    limits: f.limits,
                };
                event.items.push(item.item(product, digits)?);
            }
            event.order_id = p.text(props, "order_id")?;
            event.revenue = match props.get("revenue") {
                Some(v) if !v.is_null() => p.money(props, "revenue", digits)?,
                _ => p.money(props, "total", digits)?,
            };
        }
    }
    f.properties(
        message,
        "properties",
        "",
        &COMMERCE_FIELDS,
        &mut event.properties,
    )
}

/// The wire context: ids, page URL and referrer, campaign (UTM), locale, timezone, screen.
/// Addresses and user agents are not kept.
fn wire_context(
    f: &Fields<'_>,
    context: Option<&Map<String, Value>>,
    page_url: Option<String>,
    user_id: Option<String>,
    anonymous_id: Option<String>,
) -> Result<wire::Context, ApiError> {
    let empty = Map::new();
    let c = context.unwrap_or(&empty);
    let at = |name: &str| format!("context.{name}");
    let url_limit = f.limits.max_url_bytes;
    let page = f.object(c.get("page"), "context.page")?.unwrap_or(&empty);
    let campaign = f
        .object(c.get("campaign"), "context.campaign")?
        .unwrap_or(&empty);
    let screen = f
        .object(c.get("screen"), "context.screen")?
        .unwrap_or(&empty);
    let campaign_text = |name: &str| {
        f.text_at(
            campaign.get(name),
            &at(&format!("campaign.{name}")),
            f.limits.max_string_bytes,
        )
    };
    let dimension = |name: &str| {
        screen
            .get(name)
            .and_then(Value::as_u64)
            .map_or(0, |n| u16::try_from(n).unwrap_or(u16::MAX))
    };
    let page_url = match page_url {
        Some(url) => Some(url),
        None => f.text_at(page.get("url"), "context.page.url", url_limit)?,
    };
    Ok(wire::Context {
        page_url,
        referrer: f.text_at(page.get("referrer"), "context.page.referrer", url_limit)?,
        utm_source: campaign_text("source")?,
        utm_medium: campaign_text("medium")?,
        utm_campaign: campaign_text("name")?,
        utm_term: campaign_text("term")?,
        utm_content: campaign_text("content")?,
        locale: f.text_at(c.get("locale"), "context.locale", f.limits.max_string_bytes)?,
        timezone: f.text_at(
            c.get("timezone"),
            "context.timezone",
            f.limits.max_string_bytes,
        )?,
        screen_width: dimension("width"),
        screen_height: dimension("height"),
        session_id: None,
        anonymous_id,
        user_id,
    })
}
