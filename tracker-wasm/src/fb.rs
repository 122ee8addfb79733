//! A small FlatBuffers writer for exactly one schema, `wire/schema/events.fbs`: the bytes of
//! one [`Batch`], which `wire::decode` reads back unchanged.
//!
//! Why not `wire::encode`: the `flatbuffers` builder and the generated code cost about
//! 10 KB of wasm (4 KB gzip), a quarter of the tracker's budget; this writer is about
//! 2 KB. It writes front to back (a table's vtable, then the table, then its children, each
//! offset patched once its target is placed), which needs no generic builder state. The
//! tests decode its output with `wire::decode` (verifier included) for batches covering
//! every field, and compare it with what `wire::encode` produces.

use alloc::vec::Vec;

use wire::{Batch, Context, Event, Item, Property, Value};

/// Encodes `batch` as one `EventBatch` buffer with the `PEB1` file identifier.
pub fn encode(batch: &Batch) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(256 + 160 * batch.events.len()));
    w.0.extend_from_slice(&[0, 0, 0, 0, b'P', b'E', b'B', b'1']);
    let s = w.table(
        0,
        &[
            (0, Slot::Offset),
            (1, Slot::I64(batch.sent_at_ms)),
            (2, Slot::U8(batch.consent)),
            (3, Slot::Offset),
            (4, Slot::Offset),
        ],
    );
    w.string(s[0], &batch.write_key);
    w.context(s[1], &batch.context);
    let first = w.vector(s[2], batch.events.len());
    for (i, e) in batch.events.iter().enumerate() {
        w.event(first + 4 * i, e);
    }
    w.0
}

/// One field of a table.
#[derive(Clone, Copy)]
enum Slot<'a> {
    /// A `uoffset` to a child written later.
    Offset,
    I64(i64),
    U32(u32),
    U16(u16),
    U8(u8),
    /// The 16-byte `MessageId` struct.
    Id(&'a [u8; 16]),
}

impl Slot<'_> {
    fn size(self) -> usize {
        match self {
            Slot::I64(_) => 8,
            Slot::Offset | Slot::U32(_) => 4,
            Slot::U16(_) => 2,
            Slot::U8(_) => 1,
            Slot::Id(_) => 16,
        }
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
        self.0[at..at + bytes.len()].copy_from_slice(bytes);
    }

    /// Points the `uoffset` at `slot` to the current end, where its target starts.
    fn patch(&mut self, slot: usize) {
        let offset = (self.0.len() - slot) as u32;
        self.put(slot, &offset.to_le_bytes());
    }

    /// Writes a vtable and a table with `fields` (`(field id, value)`, ids ascending or
    /// not), points `parent` at the table, and returns the positions of its `Offset` slots
    /// in the order given. Fields are laid out largest first, so each is aligned: 8-byte
    /// ones start right after the 4-byte vtable offset of a table placed at 4 mod 8.
    fn table(&mut self, parent: usize, fields: &[(usize, Slot<'_>)]) -> Vec<usize> {
        let count = fields.iter().map(|f| f.0 + 1).max().unwrap_or(0);
        let mut at = [0usize; 16];
        let mut size = 4;
        for width in [8, 4, 16, 2, 1] {
            for (i, f) in fields.iter().enumerate() {
                if f.1.size() == width {
                    at[i] = size;
                    size += width;
                }
            }
        }
        self.pad(2);
        let vtable = self.0.len();
        let mut entries = [0u16; 16];
        for (i, f) in fields.iter().enumerate() {
            entries[f.0] = at[i] as u16;
        }
        for v in [(4 + 2 * count) as u16, size as u16]
            .iter()
            .chain(&entries[..count])
        {
            self.0.extend_from_slice(&v.to_le_bytes());
        }
        let wide = fields.iter().any(|f| f.1.size() == 8);
        while !self.0.len().is_multiple_of(4) || (wide && self.0.len() % 8 != 4) {
            self.0.push(0);
        }
        let table = self.0.len();
        self.patch(parent);
        self.0.resize(table + size, 0);
        self.put(table, &((table - vtable) as i32).to_le_bytes());
        let mut offsets = Vec::new();
        for (i, f) in fields.iter().enumerate() {
            let p = table + at[i];
            match f.1 {
                Slot::Offset => offsets.push(p),
                Slot::I64(v) => self.put(p, &v.to_le_bytes()),
                Slot::U32(v) => self.put(p, &v.to_le_bytes()),
                Slot::U16(v) => self.put(p, &v.to_le_bytes()),
                Slot::U8(v) => self.0[p] = v,
                Slot::Id(v) => self.put(p, v),
            }
        }
        offsets
    }

    fn string(&mut self, parent: usize, s: &str) {
        self.pad(4);
        self.patch(parent);
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
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

    /// A table whose fields are optional strings (and the given scalars), then the strings.
    fn strings_table(
        &mut self,
        parent: usize,
        strings: &[(usize, &Option<alloc::string::String>)],
        scalars: &[(usize, Slot<'_>)],
    ) {
        let mut fields: Vec<(usize, Slot<'_>)> = strings
            .iter()
            .filter(|s| s.1.is_some())
            .map(|s| (s.0, Slot::Offset))
            .collect();
        fields.extend_from_slice(scalars);
        let slots = self.table(parent, &fields);
        for (slot, s) in slots
            .iter()
            .zip(strings.iter().filter_map(|s| s.1.as_deref()))
        {
            self.string(*slot, s);
        }
    }

    fn context(&mut self, parent: usize, c: &Context) {
        self.strings_table(
            parent,
            &[
                (0, &c.page_url),
                (1, &c.referrer),
                (2, &c.utm_source),
                (3, &c.utm_medium),
                (4, &c.utm_campaign),
                (5, &c.utm_term),
                (6, &c.utm_content),
                (7, &c.locale),
                (8, &c.timezone),
                (11, &c.session_id),
                (12, &c.anonymous_id),
                (13, &c.user_id),
            ],
            &[
                (9, Slot::U16(c.screen_width)),
                (10, Slot::U16(c.screen_height)),
            ],
        );
    }

    fn event(&mut self, parent: usize, e: &Event) {
        let mut fields = alloc::vec![
            (0, Slot::Id(&e.message_id)),
            (1, Slot::I64(e.timestamp_ms)),
            (2, Slot::U8(e.kind as u8)),
            (9, Slot::I64(e.revenue)),
            (11, Slot::U8(e.consent_granted)),
            (12, Slot::U8(e.consent_denied)),
            (13, Slot::U8(e.purpose as u8)),
        ];
        let strings = [
            (3, &e.name),
            (6, &e.user_id),
            (7, &e.previous_id),
            (8, &e.order_id),
            (10, &e.currency),
        ];
        for (id, s) in strings {
            if s.is_some() {
                fields.push((id, Slot::Offset));
            }
        }
        let lists = [(4, e.properties.len()), (5, e.items.len())];
        for (id, n) in lists {
            if n > 0 {
                fields.push((id, Slot::Offset));
            }
        }
        let slots = self.table(parent, &fields);
        let mut slots = slots.into_iter();
        for s in strings.iter().filter_map(|s| s.1.as_deref()) {
            if let Some(slot) = slots.next() {
                self.string(slot, s);
            }
        }
        if !e.properties.is_empty()
            && let Some(slot) = slots.next()
        {
            let first = self.vector(slot, e.properties.len());
            for (i, p) in e.properties.iter().enumerate() {
                self.property(first + 4 * i, p);
            }
        }
        if !e.items.is_empty()
            && let Some(slot) = slots.next()
        {
            let first = self.vector(slot, e.items.len());
            for (i, item) in e.items.iter().enumerate() {
                self.item(first + 4 * i, item);
            }
        }
    }

    fn property(&mut self, parent: usize, p: &Property) {
        // The union `value` takes two field ids: its type (1) and the table (2).
        let tag = match p.value {
            Value::String(_) => 1,
            Value::Int(_) => 2,
            Value::Float(_) => 3,
            Value::Bool(_) => 4,
        };
        let s = self.table(
            parent,
            &[(0, Slot::Offset), (1, Slot::U8(tag)), (2, Slot::Offset)],
        );
        self.string(s[0], &p.key);
        let value = match &p.value {
            Value::String(text) => {
                let v = self.table(s[1], &[(0, Slot::Offset)]);
                self.string(v[0], text);
                return;
            }
            Value::Int(i) => Slot::I64(*i),
            Value::Float(f) => Slot::I64(f.to_bits() as i64),
            Value::Bool(b) => Slot::U8(u8::from(*b)),
        };
        self.table(s[1], &[(0, value)]);
    }

    fn item(&mut self, parent: usize, i: &Item) {
        self.strings_table(
            parent,
            &[
                (0, &Some(i.product_id.clone())),
                (1, &i.category),
                (4, &i.name),
            ],
            &[(2, Slot::I64(i.price)), (3, Slot::U32(i.quantity))],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::String;
    use alloc::vec;
    use wire::{EventKind, Purpose};

    /// A deterministic stream of pseudo-random numbers (xorshift).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn text(&mut self) -> String {
            let len = self.below(12) as usize;
            (0..len)
                .map(|_| ['a', 'é', '€', '"', '\0', 'z'][self.below(6) as usize])
                .collect()
        }
        fn opt(&mut self) -> Option<String> {
            (self.below(3) > 0).then(|| self.text())
        }
        fn id(&mut self) -> String {
            let mut s = self.text();
            s.push('x');
            s
        }
    }

    fn random_batch(r: &mut Rng) -> Batch {
        let events = (0..r.below(6))
            .map(|_| Event {
                message_id: core::array::from_fn(|i| r.next() as u8 | u8::from(i == 0)),
                timestamp_ms: r.next() as i64,
                kind: EventKind::from_u8(r.below(12) as u8).unwrap(),
                name: r.opt(),
                properties: (0..r.below(5))
                    .map(|_| Property {
                        key: r.id(),
                        value: match r.below(4) {
                            0 => Value::String(r.text()),
                            1 => Value::Int(r.next() as i64),
                            2 => Value::Float(f64::from_bits(r.next() >> 2)),
                            _ => Value::Bool(r.below(2) == 0),
                        },
                    })
                    .collect(),
                items: (0..r.below(4))
                    .map(|_| Item {
                        product_id: r.id(),
                        category: r.opt(),
                        price: r.next() as i64,
                        quantity: r.next() as u32,
                        name: r.opt(),
                    })
                    .collect(),
                user_id: r.opt(),
                previous_id: r.opt(),
                order_id: r.opt(),
                revenue: r.next() as i64,
                currency: r.opt(),
                consent_granted: r.next() as u8,
                consent_denied: r.next() as u8,
                purpose: Purpose::from_u8(r.below(4) as u8).unwrap(),
            })
            .collect();
        Batch {
            write_key: r.id(),
            sent_at_ms: r.next() as i64,
            consent: r.next() as u8,
            context: Context {
                page_url: r.opt(),
                referrer: r.opt(),
                utm_source: r.opt(),
                utm_medium: r.opt(),
                utm_campaign: r.opt(),
                utm_term: r.opt(),
                utm_content: r.opt(),
                locale: r.opt(),
                timezone: r.opt(),
                screen_width: r.next() as u16,
                screen_height: r.next() as u16,
                session_id: r.opt(),
                anonymous_id: r.opt(),
                user_id: r.opt(),
            },
            events,
        }
    }

    #[test]
    fn random_batches_decode_to_themselves() {
        let mut r = Rng(0x2545_f491_4f6c_dd1d);
        for n in 0..2000 {
            let batch = random_batch(&mut r);
            let bytes = encode(&batch);
            let back = wire::decode(&bytes, &wire::Limits::default())
                .unwrap_or_else(|e| panic!("batch {n}: {e}"));
            assert_eq!(back, batch, "batch {n}");
            // wire::encode's output decodes to the same batch: both write the same contract.
            assert_eq!(
                wire::decode(&wire::encode(&batch), &wire::Limits::default()).unwrap(),
                back
            );
        }
    }

    #[test]
    fn an_empty_batch_and_a_full_one_decode() {
        let empty = Batch {
            write_key: "k".into(),
            ..Batch::default()
        };
        assert_eq!(
            wire::decode(&encode(&empty), &wire::Limits::default()).unwrap(),
            empty
        );
        let full = Batch {
            write_key: "demo".into(),
            events: vec![
                Event {
                    message_id: [7; 16],
                    ..Event::default()
                };
                wire::decode::MAX_EVENTS
            ],
            ..Batch::default()
        };
        assert_eq!(
            wire::decode(&encode(&full), &wire::Limits::default()).unwrap(),
            full
        );
    }
}
