//! FlatBuffers bytes to [`Batch`]: verified, within explicit [`Limits`], or a [`DecodeError`]
//! that names the field and the limit.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use flatbuffers::{Vector, VerifierOptions};

use crate::generated::wire::fb;
use crate::model::{Batch, Context, Event, EventKind, Item, Property, Purpose, Value};

/// The largest batch body accepted, in bytes (Segment's batch limit is 500 KB).
pub const MAX_BATCH_BYTES: usize = 512 * 1024;
/// The most events in one batch.
pub const MAX_EVENTS: usize = 500;
/// The longest string (ids, names, keys, values), in bytes.
pub const MAX_STRING_BYTES: usize = 1024;
/// The longest URL (page URL, referrer), in bytes.
pub const MAX_URL_BYTES: usize = 4096;
/// The most properties (or traits) on one event.
pub const MAX_PROPERTIES: usize = 64;
/// The most items on one event.
pub const MAX_ITEMS: usize = 100;
/// The deepest table nesting the verifier follows. The schema needs 6
/// (batch, events, event, properties, property, value).
pub const MAX_DEPTH: usize = 8;

/// Limits checked by [`decode`]. [`Limits::default`] holds the documented constants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Body size, bytes.
    pub max_bytes: usize,
    /// Events per batch.
    pub max_events: usize,
    /// Any string but URLs, bytes.
    pub max_string_bytes: usize,
    /// URLs (page URL, referrer), bytes.
    pub max_url_bytes: usize,
    /// Properties per event.
    pub max_properties: usize,
    /// Items per event.
    pub max_items: usize,
    /// Table nesting depth.
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: MAX_BATCH_BYTES,
            max_events: MAX_EVENTS,
            max_string_bytes: MAX_STRING_BYTES,
            max_url_bytes: MAX_URL_BYTES,
            max_properties: MAX_PROPERTIES,
            max_items: MAX_ITEMS,
            max_depth: MAX_DEPTH,
        }
    }
}

/// Why a body is not an acceptable batch. Field paths look like `events[3].properties[2].key`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    /// The body is larger than [`Limits::max_bytes`].
    #[error("batch is {bytes} bytes, limit {limit}")]
    TooLarge {
        /// Body size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// The body does not carry the `PEB1` file identifier: not an event batch.
    #[error("not an event batch (file identifier must be \"PEB1\")")]
    NotABatch,
    /// The FlatBuffers verifier rejected the body (truncated, bad offsets, bad UTF-8, too deep).
    #[error("malformed batch: {0}")]
    Malformed(String),
    /// A vector holds more elements than allowed.
    #[error("{field} has {count} elements, limit {limit}")]
    TooMany {
        /// The vector's path.
        field: String,
        /// Its length.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// A string is longer than allowed.
    #[error("{field} is {len} bytes, limit {limit}")]
    TooLong {
        /// The string's path.
        field: String,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// A value the schema allows but the contract does not.
    #[error("{field} {problem}")]
    Invalid {
        /// The field's path.
        field: String,
        /// What is wrong, e.g. `is empty` or `has unknown value 40`.
        problem: String,
    },
}

/// Verifies `bytes` and returns the batch they hold.
///
/// # Errors
/// [`DecodeError`] naming the first field that breaks the FlatBuffers format, the schema's
/// rules or `limits`. Never panics, whatever the bytes.
///
/// # Example
/// ```
/// let batch = wire::Batch { write_key: "demo".into(), ..Default::default() };
/// let bytes = wire::encode(&batch);
/// assert_eq!(wire::decode(&bytes, &wire::Limits::default()), Ok(batch));
/// ```
pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Batch, DecodeError> {
    if bytes.len() > limits.max_bytes {
        return Err(DecodeError::TooLarge {
            bytes: bytes.len(),
            limit: limits.max_bytes,
        });
    }
    // The identifier check asserts on buffers shorter than offset + identifier (8 bytes).
    if bytes.len() < 8 || !fb::event_batch_buffer_has_identifier(bytes) {
        return Err(DecodeError::NotABatch);
    }
    let options = VerifierOptions {
        max_depth: limits.max_depth,
        // Each event is at most 1 + 2 * properties + items tables; the bound only stops
        // pathological bodies, the per-vector limits below do the real work.
        max_tables: 4 + limits.max_events * (1 + 2 * limits.max_properties + limits.max_items),
        max_apparent_size: limits.max_bytes,
        ignore_missing_null_terminator: false,
    };
    let root = fb::root_as_event_batch_with_opts(&options, bytes)
        .map_err(|e| DecodeError::Malformed(e.to_string()))?;
    Checker { limits }.batch(root)
}

struct Checker<'l> {
    limits: &'l Limits,
}

impl Checker<'_> {
    fn string(
        &self,
        field: impl FnOnce() -> String,
        s: &str,
        limit: usize,
    ) -> Result<String, DecodeError> {
        if s.len() > limit {
            return Err(DecodeError::TooLong {
                field: field(),
                len: s.len(),
                limit,
            });
        }
        Ok(s.into())
    }

    fn opt(
        &self,
        field: impl FnOnce() -> String,
        s: Option<&str>,
    ) -> Result<Option<String>, DecodeError> {
        s.map(|s| self.string(field, s, self.limits.max_string_bytes))
            .transpose()
    }

    fn opt_url(&self, field: &str, s: Option<&str>) -> Result<Option<String>, DecodeError> {
        s.map(|s| self.string(|| field.into(), s, self.limits.max_url_bytes))
            .transpose()
    }

    fn count<T>(
        &self,
        field: impl FnOnce() -> String,
        v: &Option<Vector<'_, T>>,
        limit: usize,
    ) -> Result<(), DecodeError> {
        let count = v.as_ref().map_or(0, |v| v.len());
        if count > limit {
            return Err(DecodeError::TooMany {
                field: field(),
                count,
                limit,
            });
        }
        Ok(())
    }

    fn batch(&self, b: fb::EventBatch<'_>) -> Result<Batch, DecodeError> {
        let write_key = self.string(
            || "write_key".into(),
            b.write_key(),
            self.limits.max_string_bytes,
        )?;
        if write_key.is_empty() {
            return Err(invalid("write_key".into(), "is empty"));
        }
        let context = b
            .context()
            .map(|c| self.context(c))
            .transpose()?
            .unwrap_or_default();
        let events = b.events();
        self.count(|| "events".into(), &events, self.limits.max_events)?;
        let events = events
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, e)| self.event(i, e))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Batch {
            write_key,
            sent_at_ms: b.sent_at_ms(),
            consent: b.consent(),
            context,
            events,
        })
    }

    fn context(&self, c: fb::Context<'_>) -> Result<Context, DecodeError> {
        let field = |name: &'static str| move || format!("context.{name}");
        Ok(Context {
            page_url: self.opt_url("context.page_url", c.page_url())?,
            referrer: self.opt_url("context.referrer", c.referrer())?,
            utm_source: self.opt(field("utm_source"), c.utm_source())?,
            utm_medium: self.opt(field("utm_medium"), c.utm_medium())?,
            utm_campaign: self.opt(field("utm_campaign"), c.utm_campaign())?,
            utm_term: self.opt(field("utm_term"), c.utm_term())?,
            utm_content: self.opt(field("utm_content"), c.utm_content())?,
            locale: self.opt(field("locale"), c.locale())?,
            timezone: self.opt(field("timezone"), c.timezone())?,
            screen_width: c.screen_width(),
            screen_height: c.screen_height(),
            session_id: self.opt(field("session_id"), c.session_id())?,
            anonymous_id: self.opt(field("anonymous_id"), c.anonymous_id())?,
            user_id: self.opt(field("user_id"), c.user_id())?,
        })
    }

    fn event(&self, i: usize, e: fb::Event<'_>) -> Result<Event, DecodeError> {
        let field = |name: &'static str| move || format!("events[{i}].{name}");
        let message_id: [u8; 16] = e.message_id().bytes().into();
        if message_id == [0; 16] {
            return Err(invalid(field("message_id")(), "is all zeros"));
        }
        let kind = EventKind::from_u8(e.kind().0).ok_or_else(|| {
            invalid(
                field("kind")(),
                &format!("has unknown value {}", e.kind().0),
            )
        })?;
        let purpose = Purpose::from_u8(e.purpose().0).ok_or_else(|| {
            invalid(
                field("purpose")(),
                &format!("has unknown value {}", e.purpose().0),
            )
        })?;
        let properties = e.properties();
        self.count(field("properties"), &properties, self.limits.max_properties)?;
        let properties = properties
            .iter()
            .flatten()
            .enumerate()
            .map(|(j, p)| self.property(i, j, p))
            .collect::<Result<Vec<_>, _>>()?;
        let items = e.items();
        self.count(field("items"), &items, self.limits.max_items)?;
        let items = items
            .iter()
            .flatten()
            .enumerate()
            .map(|(j, it)| self.item(i, j, it))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Event {
            message_id,
            timestamp_ms: e.timestamp_ms(),
            kind,
            name: self.opt(field("name"), e.name())?,
            properties,
            items,
            user_id: self.opt(field("user_id"), e.user_id())?,
            previous_id: self.opt(field("previous_id"), e.previous_id())?,
            order_id: self.opt(field("order_id"), e.order_id())?,
            revenue: e.revenue(),
            currency: self.opt(field("currency"), e.currency())?,
            consent_granted: e.consent_granted(),
            consent_denied: e.consent_denied(),
            purpose,
        })
    }

    fn property(&self, i: usize, j: usize, p: fb::Property<'_>) -> Result<Property, DecodeError> {
        let field = |name: &'static str| move || format!("events[{i}].properties[{j}].{name}");
        let key = self.string(field("key"), p.key(), self.limits.max_string_bytes)?;
        if key.is_empty() {
            return Err(invalid(field("key")(), "is empty"));
        }
        let value = if let Some(v) = p.value_as_string_value() {
            Value::String(self.string(field("value"), v.value(), self.limits.max_string_bytes)?)
        } else if let Some(v) = p.value_as_int_value() {
            Value::Int(v.value())
        } else if let Some(v) = p.value_as_float_value() {
            if !v.value().is_finite() {
                return Err(invalid(field("value")(), "is not a finite number"));
            }
            Value::Float(v.value())
        } else if let Some(v) = p.value_as_bool_value() {
            Value::Bool(v.value())
        } else {
            let tag = p.value_type().0;
            return Err(invalid(
                field("value")(),
                &format!("has unknown type {tag}"),
            ));
        };
        Ok(Property { key, value })
    }

    fn item(&self, i: usize, j: usize, it: fb::Item<'_>) -> Result<Item, DecodeError> {
        let field = |name: &'static str| move || format!("events[{i}].items[{j}].{name}");
        let product_id = self.string(
            field("product_id"),
            it.product_id(),
            self.limits.max_string_bytes,
        )?;
        if product_id.is_empty() {
            return Err(invalid(field("product_id")(), "is empty"));
        }
        Ok(Item {
            product_id,
            category: self.opt(field("category"), it.category())?,
            price: it.price(),
            quantity: it.quantity(),
            name: self.opt(field("name"), it.name())?,
        })
    }
}

fn invalid(field: String, problem: &str) -> DecodeError {
    DecodeError::Invalid {
        field,
        problem: problem.into(),
    }
}
