//! Batches to FlatBuffers bytes (schema `schema/events.fbs`), by a small writer for exactly
//! this schema.
//!
//! It writes front to back: a table's vtable, then the table, then its children, each
//! `uoffset` patched once its target is placed. That needs no generic builder state and
//! keeps the browser tracker small (the `flatbuffers` builder and its generated code cost
//! about 10 KB of wasm, this writer about 2 KB); [`decode`](crate::decode) reads everything
//! back through the generated code and the verifier, and the tests check the round trip.
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
    let mut w = Writer(Vec::with_capacity(128));
    w.0.extend_from_slice(&[0; 4]);
    w.event(0, e);
    w.0
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

/// A borrowed context as a piece for [`assemble`]: the same bytes as [`context`] for the
/// [`Context`] it mirrors.
pub fn context_ref(c: &ContextRef<'_>) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(128));
    w.0.extend_from_slice(&[0; 4]);
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
    let mut w = Writer(Vec::with_capacity(256 + context.len()));
    w.0.extend_from_slice(&[0, 0, 0, 0, b'P', b'E', b'B', b'1']);
    let at = w.table(
        0,
        &[
            (0, Slot::Str(write_key)),
            (1, Slot::I64(sent_at_ms)),
            (2, Slot::U8(consent)),
            (3, Slot::Offset),
            (4, Slot::Offset),
        ],
    );
    w.place(at[3], context);
    let first = w.vector(at[4], events.len());
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

/// One field of a table.
#[derive(Clone, Copy)]
enum Slot<'a> {
    /// An absent field (an empty optional): not written, 0 in the vtable.
    Skip,
    /// A string, written right after the table.
    Str(&'a [u8]),
    /// A `uoffset` to a child the caller writes later.
    Offset,
    I64(i64),
    U32(u32),
    U16(u16),
    U8(u8),
    /// The 16-byte `MessageId` struct.
    Id(&'a [u8; 16]),
}

impl<'a> Slot<'a> {
    fn size(self) -> usize {
        match self {
            Slot::Skip => 0,
            Slot::I64(_) => 8,
            Slot::Str(_) | Slot::Offset | Slot::U32(_) => 4,
            Slot::U16(_) => 2,
            Slot::U8(_) => 1,
            Slot::Id(_) => 16,
        }
    }

    fn str(s: Option<&'a [u8]>) -> Slot<'a> {
        s.map_or(Slot::Skip, Slot::Str)
    }

    fn list(n: usize) -> Slot<'a> {
        if n > 0 { Slot::Offset } else { Slot::Skip }
    }
}

struct Writer(Vec<u8>);

impl Writer {
    fn pad(&mut self, align: usize) {
        while !self.0.len().is_multiple_of(align) {
            self.0.push(0);
        }
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

    /// Writes a vtable and a table with `fields` (`(field id, value)`, ids below 16), points
    /// `parent` at the table, writes its strings, and returns the position of each
    /// [`Slot::Offset`] by field id, for the caller to write those children. Fields are laid
    /// out largest first, so each is aligned: 8-byte ones start right after the 4-byte
    /// vtable offset of a table placed at 4 mod 8.
    fn table(&mut self, parent: usize, fields: &[(usize, Slot<'_>)]) -> [usize; 16] {
        // Ids are masked to 0..16 (they all are), so that no index can panic.
        let mut at = [0usize; 16];
        let mut size = 4;
        for width in [8, 4, 16, 2, 1] {
            for &(id, f) in fields {
                if f.size() == width {
                    at[id & 15] = size;
                    size += width;
                }
            }
        }
        let mut count = 0;
        let mut wide = false;
        for &(id, f) in fields {
            if f.size() > 0 && id >= count {
                count = id + 1;
            }
            wide |= f.size() == 8;
        }
        self.pad(2);
        let vtable = self.0.len();
        for v in [(4 + 2 * count) as u16, size as u16] {
            self.0.extend_from_slice(&v.to_le_bytes());
        }
        for v in at.iter().take(count) {
            self.0.extend_from_slice(&(*v as u16).to_le_bytes());
        }
        while !self.0.len().is_multiple_of(4) || (wide && self.0.len() % 8 != 4) {
            self.0.push(0);
        }
        let table = self.0.len();
        self.patch(parent);
        self.0.resize(table + size, 0);
        self.put(table, &((table - vtable) as i32).to_le_bytes());
        for &(id, f) in fields {
            let p = table + at[id & 15];
            match f {
                Slot::Skip => {}
                Slot::Str(_) | Slot::Offset => at[id & 15] = p,
                Slot::I64(v) => self.put(p, &v.to_le_bytes()),
                Slot::U32(v) => self.put(p, &v.to_le_bytes()),
                Slot::U16(v) => self.put(p, &v.to_le_bytes()),
                Slot::U8(v) => self.put(p, &[v]),
                Slot::Id(v) => self.put(p, v),
            }
        }
        for &(id, f) in fields {
            if let Slot::Str(s) = f {
                self.string(at[id & 15], s);
            }
        }
        at
    }

    /// Copies a piece (see the module docs) and points `parent` at its table.
    fn place(&mut self, parent: usize, piece: &[u8]) {
        while self.0.len() % 8 != 4 {
            self.0.push(0);
        }
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
        self.0.push(0);
    }

    /// Writes a vector of `n` offsets (to be patched) and returns its first slot.
    fn vector(&mut self, parent: usize, n: usize) -> usize {
        self.pad(4);
        self.patch(parent);
        self.0.extend_from_slice(&(n as u32).to_le_bytes());
        let first = self.0.len();
        self.0.resize(first + 4 * n, 0);
        first
    }

    fn context(&mut self, parent: usize, c: &ContextRef<'_>) {
        let [s0, s1, s2, s3, s4] = c.utm;
        let o = Slot::str;
        self.table(
            parent,
            &[
                (0, o(c.page_url)),
                (1, o(c.referrer)),
                (2, o(s0)),
                (3, o(s1)),
                (4, o(s2)),
                (5, o(s3)),
                (6, o(s4)),
                (7, o(c.locale)),
                (8, o(c.timezone)),
                (9, Slot::U16(c.screen_width)),
                (10, Slot::U16(c.screen_height)),
                (11, o(c.session_id)),
                (12, o(c.anonymous_id)),
                (13, o(c.user_id)),
            ],
        );
    }

    fn event(&mut self, parent: usize, e: &EventRef<'_>) {
        let o = Slot::str;
        let at = self.table(
            parent,
            &[
                (0, Slot::Id(&e.message_id)),
                (1, Slot::I64(e.timestamp_ms)),
                (2, Slot::U8(e.kind as u8)),
                (3, o(e.name)),
                (4, Slot::list(e.properties.len())),
                (5, Slot::list(e.items.len())),
                (6, o(e.user_id)),
                (7, o(e.previous_id)),
                (8, o(e.order_id)),
                (9, Slot::I64(e.revenue)),
                (10, o(e.currency)),
                (11, Slot::U8(e.consent_granted)),
                (12, Slot::U8(e.consent_denied)),
                (13, Slot::U8(e.purpose as u8)),
            ],
        );
        if !e.properties.is_empty() {
            let first = self.vector(at[4], e.properties.len());
            for (i, (key, value)) in e.properties.iter().enumerate() {
                self.property(first + 4 * i, key, *value);
            }
        }
        if !e.items.is_empty() {
            let first = self.vector(at[5], e.items.len());
            for (i, item) in e.items.iter().enumerate() {
                self.item(first + 4 * i, item);
            }
        }
    }

    fn property(&mut self, parent: usize, key: &[u8], value: ValueRef<'_>) {
        // The union `value` takes two field ids: its type (1) and the table (2).
        let (tag, value) = match value {
            ValueRef::String(text) => (1, Slot::Str(text)),
            ValueRef::Int(i) => (2, Slot::I64(i)),
            ValueRef::Float(f) => (3, Slot::I64(f.to_bits() as i64)),
            ValueRef::Bool(b) => (4, Slot::U8(u8::from(b))),
        };
        let at = self.table(
            parent,
            &[(0, Slot::Str(key)), (1, Slot::U8(tag)), (2, Slot::Offset)],
        );
        self.table(at[2], &[(0, value)]);
    }

    fn item(&mut self, parent: usize, i: &ItemRef<'_>) {
        self.table(
            parent,
            &[
                (0, Slot::Str(i.product_id)),
                (1, Slot::str(i.category)),
                (2, Slot::I64(i.price)),
                (3, Slot::U32(i.quantity)),
                (4, Slot::str(i.name)),
            ],
        );
    }
}
