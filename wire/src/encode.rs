//! Batches to FlatBuffers bytes (schema `schema/events.fbs`), by a small writer for exactly
//! this schema.
//!
//! It writes front to back: a table's vtable, then the table, then its children, each
//! `uoffset` patched once its target is placed, every table in a fixed layout. That needs
//! no generic builder state and keeps the browser tracker small (the `flatbuffers` builder
//! and its generated code cost about 10 KB of wasm, this writer about 1.5 KB);
//! [`decode`](crate::decode) reads everything back through the generated code and the
//! verifier, and the tests check the round trip.
//!
//! Offsets in FlatBuffers are relative, so an event or a context can be encoded on its own
//! ([`event`], [`context`]) into a *piece* that is copied into a batch later
//! ([`assemble`]): the tracker encodes each event once, when it is recorded, and seals a
//! batch by copying bytes. A piece is `[u32: position of its table][its bytes]`, laid out
//! as if it started at a multiple of 8; [`assemble`] keeps that alignment.

use alloc::string::String;
use alloc::vec::Vec;

use crate::model::{Batch, Context, Event, EventKind, Purpose, Value};

/// Encodes a batch as one FlatBuffers `EventBatch` with the `PEB1` file identifier.
///
/// Encoding does not check [`Limits`](crate::Limits): the tracker keeps its batches within
/// them, and the collector checks them anyway.
pub fn encode(batch: &Batch) -> Vec<u8> {
    let events: Vec<Vec<u8>> = batch.events.iter().map(event).collect();
    assemble(
        batch.write_key.as_bytes(),
        batch.sent_at_ms,
        batch.consent,
        &context(&batch.context),
        events.iter().map(Vec::as_slice),
    )
}

/// One event as a piece for [`assemble`].
pub fn event(e: &Event) -> Vec<u8> {
    let properties: Vec<(&[u8], ValueRef<'_>)> = e
        .properties
        .iter()
        .map(|p| {
            let v = match &p.value {
                Value::String(s) => ValueRef::String(s.as_bytes()),
                Value::Int(i) => ValueRef::Int(*i),
                Value::Float(f) => ValueRef::Float(*f),
                Value::Bool(b) => ValueRef::Bool(*b),
            };
            (p.key.as_bytes(), v)
        })
        .collect();
    let items: Vec<ItemRef<'_>> = e
        .items
        .iter()
        .map(|i| ItemRef {
            product_id: i.product_id.as_bytes(),
            category: bytes(&i.category),
            price: i.price,
            quantity: i.quantity,
            name: bytes(&i.name),
        })
        .collect();
    event_ref(&EventRef {
        message_id: e.message_id,
        timestamp_ms: e.timestamp_ms,
        kind: e.kind,
        name: bytes(&e.name),
        properties: &properties,
        items: &items,
        user_id: bytes(&e.user_id),
        previous_id: bytes(&e.previous_id),
        order_id: bytes(&e.order_id),
        revenue: e.revenue,
        currency: bytes(&e.currency),
        consent_granted: e.consent_granted,
        consent_denied: e.consent_denied,
        purpose: e.purpose,
    })
}

fn bytes(s: &Option<String>) -> Option<&[u8]> {
    s.as_deref().map(str::as_bytes)
}

/// One event, borrowed, as a piece for [`assemble`]: the same bytes as [`event`] for the
/// [`Event`] it mirrors.
pub fn event_ref(e: &EventRef<'_>) -> Vec<u8> {
    let mut p = EventPiece::new(e, e.properties.len());
    for (key, value) in e.properties {
        p.property(key, *value);
    }
    p.items(e.items.len());
    for item in e.items {
        p.item(item);
    }
    p.finish()
}

/// An event piece written in parts, for a caller that reads the properties and items one at
/// a time (the browser tracker reads them from the loader's message): [`EventPiece::new`]
/// with the event and the number of properties, that many [`property`](EventPiece::property)
/// calls, then [`items`](EventPiece::items) with the number of items and that many
/// [`item`](EventPiece::item) calls. The same bytes as [`event_ref`] with those lists.
pub struct EventPiece {
    w: Writer,
    t: Table,
    /// The next property's or item's slot.
    next: usize,
    items: bool,
}

impl EventPiece {
    /// Writes the event's fields but its lists (`e.properties` and `e.items` are not used),
    /// and room for `properties` properties.
    pub fn new(e: &EventRef<'_>, properties: usize) -> EventPiece {
        let mut w = Writer::piece();
        let t = w.event(0, e);
        let next = w.list(t, 4, properties);
        EventPiece {
            w,
            t,
            next,
            items: false,
        }
    }

    /// Writes the next property.
    pub fn property(&mut self, key: &[u8], value: ValueRef<'_>) {
        self.w.property(self.next, key, value);
        self.next += 4;
    }

    /// Makes room for `n` items, after the last property.
    pub fn items(&mut self, n: usize) {
        self.next = self.w.list(self.t, 5, n);
        self.items = true;
    }

    /// Writes the next item.
    pub fn item(&mut self, item: &ItemRef<'_>) {
        self.w.item(self.next, item);
        self.next += 4;
    }

    /// The piece.
    pub fn finish(mut self) -> Vec<u8> {
        if !self.items {
            self.w.absent(self.t, 5);
        }
        self.w.0
    }
}

/// A property value to encode, borrowing its text (UTF-8 bytes: the encoder copies them as
/// they are, so a caller that passes anything else gets a batch the collector refuses).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValueRef<'a> {
    /// Text (UTF-8).
    String(&'a [u8]),
    /// A whole number.
    Int(i64),
    /// A finite floating point number.
    Float(f64),
    /// True or false.
    Bool(bool),
}

/// A product line to encode, borrowing its text as UTF-8 bytes (see [`crate::Item`]).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ItemRef<'a> {
    /// The shop's product id (required, non-empty).
    pub product_id: &'a [u8],
    /// Category, if known.
    pub category: Option<&'a [u8]>,
    /// Unit price in minor currency units.
    pub price: i64,
    /// How many.
    pub quantity: u32,
    /// Display name, if known.
    pub name: Option<&'a [u8]>,
}

/// An event to encode, borrowing its text (UTF-8 bytes) and lists (see [`Event`] for the
/// fields): the browser tracker fills one straight from a page's call, without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct EventRef<'a> {
    /// 16 random bytes; never all zero.
    pub message_id: [u8; 16],
    /// Client clock, Unix milliseconds.
    pub timestamp_ms: i64,
    /// What happened.
    pub kind: EventKind,
    /// Track event name or page name.
    pub name: Option<&'a [u8]>,
    /// Properties (key, value), or traits for identify.
    pub properties: &'a [(&'a [u8], ValueRef<'a>)],
    /// Commerce items.
    pub items: &'a [ItemRef<'a>],
    /// Identify: the user id. Alias: the new id.
    pub user_id: Option<&'a [u8]>,
    /// Alias: the previous id.
    pub previous_id: Option<&'a [u8]>,
    /// Order id.
    pub order_id: Option<&'a [u8]>,
    /// Order revenue in minor currency units.
    pub revenue: i64,
    /// ISO 4217 currency code.
    pub currency: Option<&'a [u8]>,
    /// Consent change: purposes now granted (mask).
    pub consent_granted: u8,
    /// Consent change: purposes now denied (mask).
    pub consent_denied: u8,
    /// The purpose this event needs.
    pub purpose: Purpose,
}

impl EventRef<'_> {
    /// A page view with every field empty or zero (the [`Default`]), as a constant: copying
    /// it costs less code than filling each field.
    pub const EMPTY: EventRef<'static> = EventRef {
        message_id: [0; 16],
        timestamp_ms: 0,
        kind: EventKind::Page,
        name: None,
        properties: &[],
        items: &[],
        user_id: None,
        previous_id: None,
        order_id: None,
        revenue: 0,
        currency: None,
        consent_granted: 0,
        consent_denied: 0,
        purpose: Purpose::Necessary,
    };
}

/// A context to encode, borrowing its text as UTF-8 bytes (see [`Context`] for the fields).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ContextRef<'a> {
    /// Full page URL.
    pub page_url: Option<&'a [u8]>,
    /// `document.referrer`.
    pub referrer: Option<&'a [u8]>,
    /// UTM parameters: source, medium, campaign, term, content.
    pub utm: [Option<&'a [u8]>; 5],
    /// `navigator.language`.
    pub locale: Option<&'a [u8]>,
    /// IANA time zone.
    pub timezone: Option<&'a [u8]>,
    /// Screen width in CSS pixels.
    pub screen_width: u16,
    /// Screen height in CSS pixels.
    pub screen_height: u16,
    /// Session id.
    pub session_id: Option<&'a [u8]>,
    /// The visitor's anonymous id.
    pub anonymous_id: Option<&'a [u8]>,
    /// The user id, once known.
    pub user_id: Option<&'a [u8]>,
}

/// A context as a piece for [`assemble`].
pub fn context(c: &Context) -> Vec<u8> {
    context_ref(&ContextRef {
        page_url: bytes(&c.page_url),
        referrer: bytes(&c.referrer),
        utm: [
            bytes(&c.utm_source),
            bytes(&c.utm_medium),
            bytes(&c.utm_campaign),
            bytes(&c.utm_term),
            bytes(&c.utm_content),
        ],
        locale: bytes(&c.locale),
        timezone: bytes(&c.timezone),
        screen_width: c.screen_width,
        screen_height: c.screen_height,
        session_id: bytes(&c.session_id),
        anonymous_id: bytes(&c.anonymous_id),
        user_id: bytes(&c.user_id),
    })
}

/// A context as a piece from its strings by field id: `texts[i]` is `Context` field `i`
/// (page_url, referrer, utm_source, utm_medium, utm_campaign, utm_term, utm_content, locale,
/// timezone, then 9 and 10, which are the screen size and ignored here, then session_id,
/// anonymous_id, user_id); an empty string is absent. The same bytes as [`context`] for a
/// [`Context`] without empty strings. A caller that keeps the strings in such an array (the
/// browser tracker) encodes them in one loop.
pub fn context_texts<T: AsRef<[u8]>>(
    texts: &[T; 14],
    screen_width: u16,
    screen_height: u16,
) -> Vec<u8> {
    let mut w = Writer::piece();
    let t = w.table(0, &CONTEXT);
    for (f, s) in texts.iter().enumerate() {
        let s = s.as_ref();
        if f != 9 && f != 10 {
            w.opt(t, f, (!s.is_empty()).then_some(s));
        }
    }
    w.set(t, 9, &screen_width.to_le_bytes());
    w.set(t, 10, &screen_height.to_le_bytes());
    w.0
}

/// A borrowed context as a piece for [`assemble`]: the same bytes as [`context`] for the
/// [`Context`] it mirrors.
pub fn context_ref(c: &ContextRef<'_>) -> Vec<u8> {
    let mut w = Writer::piece();
    w.context(0, c);
    w.0
}

/// A batch from pieces made by [`context`] and [`event`]: the same bytes [`encode`] writes
/// for the batch they came from.
pub fn assemble<'a>(
    write_key: &[u8],
    sent_at_ms: i64,
    consent: u8,
    context: &[u8],
    events: impl ExactSizeIterator<Item = &'a [u8]>,
) -> Vec<u8> {
    let mut w = Writer(Vec::new());
    w.0.extend_from_slice(&[0, 0, 0, 0, b'P', b'E', b'B', b'1']);
    let t = w.table(0, &BATCH);
    w.opt(t, 0, Some(write_key));
    w.set(t, 1, &sent_at_ms.to_le_bytes());
    w.set(t, 2, &[consent]);
    let at = w.slot(t, 3);
    w.place(at, context);
    let first = w.list(t, 4, events.len());
    for (i, piece) in events.enumerate() {
        w.place(first + 4 * i, piece);
    }
    w.0
}

/// Rewrites the `sent_at_ms` field of an encoded batch, so the collector's clock-skew
/// correction holds for a batch retried later. Returns `false` when the bytes have no such
/// field where the layout says (never for [`encode`] or [`assemble`] output with a non-zero
/// time); nothing is written then.
pub fn set_sent_at(body: &mut [u8], sent_at_ms: i64) -> bool {
    let field = || -> Option<usize> {
        let table = u32_at(body, 0)? as usize;
        let vtable = table.checked_sub(u32_at(body, table)? as i32 as isize as usize)?;
        // A vtable: its size, the table's size, then one offset per field; sent_at_ms is
        // field 1 of EventBatch.
        if u16_at(body, vtable)? < 6 {
            return None;
        }
        let offset = u16_at(body, vtable + 6)?;
        (offset != 0).then_some(table + offset)
    };
    match field().and_then(|at| body.get_mut(at..at.checked_add(8)?)) {
        Some(slot) => {
            for (d, b) in slot.iter_mut().zip(sent_at_ms.to_le_bytes()) {
                *d = b;
            }
            true
        }
        None => false,
    }
}

fn u32_at(b: &[u8], i: usize) -> Option<u32> {
    let s = b.get(i..i.checked_add(4)?)?;
    Some(u32::from_le_bytes(s.try_into().ok()?))
}

fn u16_at(b: &[u8], i: usize) -> Option<usize> {
    let s = b.get(i..i.checked_add(2)?)?;
    Some(usize::from(u16::from_le_bytes(s.try_into().ok()?)))
}

// Every table has a fixed layout: its size, then the offset of each field from the table's
// start, by field id. A table starts at 4 mod 8 (after its offset to the vtable), so the
// 8-byte fields, at 4 mod 8 in the table, are aligned; strings and vectors (4-byte offsets)
// come next, then the small scalars. An absent optional field gets 0 in the vtable and
// leaves its slot unused. Fixed layouts need far less code than laying out each table from
// the fields present, which matters in the browser tracker's wasm.

/// `EventBatch`: write_key, sent_at_ms, consent, context, events.
const BATCH: [u8; 6] = [25, 12, 4, 24, 16, 20];
/// `Context`: page_url, referrer, utm_source, utm_medium, utm_campaign, utm_term,
/// utm_content, locale, timezone, screen_width, screen_height, session_id, anonymous_id,
/// user_id.
const CONTEXT: [u8; 15] = [56, 4, 8, 12, 16, 20, 24, 28, 32, 36, 52, 54, 40, 44, 48];
/// `Event`: message_id, timestamp_ms, kind, name, properties, items, user_id, previous_id,
/// order_id, revenue, currency, consent_granted, consent_denied, purpose (the last three
/// adjacent).
const EVENT: [u8; 15] = [68, 20, 4, 64, 36, 40, 44, 48, 52, 56, 12, 60, 65, 66, 67];
/// `Property`: key, value_type, value.
const PROPERTY: [u8; 4] = [13, 4, 12, 8];
/// `StringValue`: value.
const STRING_VALUE: [u8; 2] = [8, 4];
/// `IntValue`, `FloatValue` and `BoolValue`: value (8 bytes; a bool reads the first).
const SCALAR_VALUE: [u8; 2] = [12, 4];
/// `Item`: product_id, category, price, quantity, name.
const ITEM: [u8; 6] = [28, 12, 16, 4, 24, 20];

/// A table being written: where its vtable and the table start.
#[derive(Clone, Copy)]
struct Table {
    vtable: usize,
    at: usize,
}

struct Writer(Vec<u8>);

impl Writer {
    /// A piece (see the module docs): its first 4 bytes will point at its table.
    fn piece() -> Writer {
        let mut w = Writer(Vec::new());
        w.0.extend_from_slice(&[0; 4]);
        w
    }

    // Zeros are added with `resize` and bytes with `extend_from_slice` only, never `push`:
    // each way of growing a vector is its own code in the browser tracker's wasm.

    fn pad(&mut self, align: usize) {
        self.0.resize(self.0.len().next_multiple_of(align), 0);
    }

    /// Pads to 4 mod 8, where a table (or a piece's table) starts.
    fn pad_table(&mut self) {
        self.0.resize((self.0.len() + 4).next_multiple_of(8) - 4, 0);
    }

    fn put(&mut self, at: usize, bytes: &[u8]) {
        if let Some(dst) = self.0.get_mut(at..) {
            for (d, b) in dst.iter_mut().zip(bytes) {
                *d = *b;
            }
        }
    }

    /// Points the `uoffset` at `slot` to the current end, where its target starts.
    fn patch(&mut self, slot: usize) {
        let offset = (self.0.len() - slot) as u32;
        self.put(slot, &offset.to_le_bytes());
    }

    /// Writes a vtable for `layout` (every field present), then the table, zeroed, with its
    /// offset to the vtable, and points `parent` at it.
    fn table(&mut self, parent: usize, layout: &[u8]) -> Table {
        let (size, fields) = layout.split_first().unwrap_or((&0, &[]));
        self.pad(2);
        let vtable = self.0.len();
        self.0
            .extend_from_slice(&(4 + 2 * fields.len() as u16).to_le_bytes());
        self.0.extend_from_slice(&u16::from(*size).to_le_bytes());
        for &f in fields {
            self.0.extend_from_slice(&[f, 0]);
        }
        self.pad_table();
        let at = self.0.len();
        self.patch(parent);
        self.0.resize(at + usize::from(*size), 0);
        self.put(at, &((at - vtable) as u32).to_le_bytes());
        Table { vtable, at }
    }

    /// Where field `f` of table `t` sits.
    fn slot(&self, t: Table, f: usize) -> usize {
        t.at + u16_at(&self.0, t.vtable + 4 + 2 * f).unwrap_or(0)
    }

    /// Writes field `f` of table `t`: a scalar or a struct, little-endian.
    fn set(&mut self, t: Table, f: usize, bytes: &[u8]) {
        let at = self.slot(t, f);
        self.put(at, bytes);
    }

    /// Marks field `f` of table `t` absent.
    fn absent(&mut self, t: Table, f: usize) {
        self.put(t.vtable + 4 + 2 * f, &[0, 0]);
    }

    /// Writes string field `f` of table `t`, or marks it absent.
    fn opt(&mut self, t: Table, f: usize, s: Option<&[u8]>) {
        match s {
            Some(s) => {
                let at = self.slot(t, f);
                self.string(at, s);
            }
            None => self.absent(t, f),
        }
    }

    /// Writes vector field `f` of table `t` with `n` offsets (to be patched) and returns its
    /// first slot; marks the field absent when `n` is 0.
    fn list(&mut self, t: Table, f: usize, n: usize) -> usize {
        if n == 0 {
            self.absent(t, f);
            return 0;
        }
        let at = self.slot(t, f);
        self.pad(4);
        self.patch(at);
        self.0.extend_from_slice(&(n as u32).to_le_bytes());
        let first = self.0.len();
        self.0.resize(first + 4 * n, 0);
        first
    }

    /// Copies a piece (see the module docs) and points `parent` at its table.
    fn place(&mut self, parent: usize, piece: &[u8]) {
        self.pad_table();
        // Where the piece's first byte would be: a multiple of 8, as when it was written.
        let base = self.0.len() - 4;
        let table = u32_at(piece, 0).unwrap_or(0) as usize;
        self.0.extend_from_slice(piece.get(4..).unwrap_or(&[]));
        let offset = (base + table - parent) as u32;
        self.put(parent, &offset.to_le_bytes());
    }

    fn string(&mut self, parent: usize, s: &[u8]) {
        self.pad(4);
        self.patch(parent);
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s);
        self.0.extend_from_slice(&[0]);
    }

    fn context(&mut self, parent: usize, c: &ContextRef<'_>) {
        let t = self.table(parent, &CONTEXT);
        let [s0, s1, s2, s3, s4] = c.utm;
        for (f, s) in [
            (0, c.page_url),
            (1, c.referrer),
            (2, s0),
            (3, s1),
            (4, s2),
            (5, s3),
            (6, s4),
            (7, c.locale),
            (8, c.timezone),
            (11, c.session_id),
            (12, c.anonymous_id),
            (13, c.user_id),
        ] {
            self.opt(t, f, s);
        }
        self.set(t, 9, &c.screen_width.to_le_bytes());
        self.set(t, 10, &c.screen_height.to_le_bytes());
    }

    /// Writes an event's table and strings; its lists are for the caller.
    fn event(&mut self, parent: usize, e: &EventRef<'_>) -> Table {
        let t = self.table(parent, &EVENT);
        self.set(t, 0, &e.message_id);
        self.set(t, 1, &e.timestamp_ms.to_le_bytes());
        self.set(t, 2, &[e.kind as u8]);
        self.set(t, 9, &e.revenue.to_le_bytes());
        // Fields 11, 12 and 13 are adjacent.
        self.set(
            t,
            11,
            &[e.consent_granted, e.consent_denied, e.purpose as u8],
        );
        for &(f, s) in &[
            (3, e.name),
            (6, e.user_id),
            (7, e.previous_id),
            (8, e.order_id),
            (10, e.currency),
        ] {
            self.opt(t, f, s);
        }
        t
    }

    fn property(&mut self, parent: usize, key: &[u8], value: ValueRef<'_>) {
        let t = self.table(parent, &PROPERTY);
        self.opt(t, 0, Some(key));
        // The union `value` takes two field ids: its type (1) and the table (2).
        let (tag, scalar) = match value {
            ValueRef::String(_) => (1, 0),
            ValueRef::Int(i) => (2, i as u64),
            ValueRef::Float(f) => (3, f.to_bits()),
            ValueRef::Bool(b) => (4, u64::from(b)),
        };
        self.set(t, 1, &[tag]);
        let at = self.slot(t, 2);
        if let ValueRef::String(s) = value {
            let v = self.table(at, &STRING_VALUE);
            self.opt(v, 0, Some(s));
        } else {
            let v = self.table(at, &SCALAR_VALUE);
            self.set(v, 0, &scalar.to_le_bytes());
        }
    }

    fn item(&mut self, parent: usize, i: &ItemRef<'_>) {
        let t = self.table(parent, &ITEM);
        self.opt(t, 0, Some(i.product_id));
        self.opt(t, 1, i.category);
        self.set(t, 2, &i.price.to_le_bytes());
        self.set(t, 3, &i.quantity.to_le_bytes());
        self.opt(t, 4, i.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_texts_encode_as_the_context() {
        let c = Context {
            page_url: Some("https://shop.example/p".into()),
            utm_campaign: Some("spring".into()),
            timezone: Some("Europe/Berlin".into()),
            screen_width: 1280,
            screen_height: 800,
            anonymous_id: Some("a-1".into()),
            ..Context::default()
        };
        let mut texts: [&[u8]; 14] = [b""; 14];
        texts[0] = b"https://shop.example/p";
        texts[4] = b"spring";
        texts[8] = b"Europe/Berlin";
        texts[12] = b"a-1";
        assert_eq!(context_texts(&texts, 1280, 800), context(&c));
    }

    #[test]
    fn the_empty_event_is_the_default() {
        assert_eq!(EventRef::EMPTY, EventRef::default());
    }
}
