//! Batching: when unsealed events are due (count, size, age), how big a batch may be,
//! sealing segments into `wire` bytes, and stamping the send time into a sealed batch.

use alloc::rc::Rc;
use alloc::vec::Vec;
use core::mem;

use wire::{Batch, Event, Value};

use crate::queue::{Queue, Sealed};

/// Batching settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Seal as soon as this many events wait (`flushAt`, default 20).
    pub flush_at: usize,
    /// Seal as soon as the waiting events are estimated at this many bytes.
    pub flush_bytes: usize,
    /// Seal when the oldest waiting event is this old (ms; `flushIntervalMs`, default 1000).
    pub interval_ms: f64,
    /// The most events in one batch (the collector's limit is 500).
    pub max_events: usize,
    /// The largest batch body (estimated): `sendBeacon` and `fetch(..., {keepalive: true})`
    /// share a 64 KiB budget per page for requests in flight, so a batch takes well under
    /// half of it.
    pub max_bytes: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            flush_at: 20,
            flush_bytes: 12 * 1024,
            interval_ms: 1000.0,
            max_events: 500,
            max_bytes: 24 * 1024,
        }
    }
}

impl Policy {
    /// How long until the unsealed events are due (ms, 0: now), or `None` with none
    /// waiting. `forced` (`pz.flush()`, the page going away) makes them due now.
    pub fn due(
        &self,
        count: usize,
        bytes: usize,
        oldest: Option<f64>,
        now: f64,
        forced: bool,
    ) -> Option<f64> {
        let oldest = oldest?;
        if forced || count >= self.flush_at || bytes >= self.flush_bytes {
            return Some(0.0);
        }
        let wait = oldest + self.interval_ms - now;
        Some(if wait > 0.0 { wait } else { 0.0 })
    }
}

/// A size estimate for `ev` in a batch, in bytes; generous (vtables, alignment), so that
/// batches stay under [`Policy::max_bytes`].
pub fn estimate(ev: &Event) -> usize {
    let opt = |s: &Option<alloc::string::String>| s.as_ref().map_or(0, |s| s.len() + 8);
    let mut n = 128 + opt(&ev.name) + opt(&ev.user_id) + opt(&ev.previous_id);
    n += opt(&ev.order_id) + opt(&ev.currency);
    for p in &ev.properties {
        n += 64 + p.key.len();
        if let Value::String(s) = &p.value {
            n += s.len() + 24;
        }
    }
    for i in &ev.items {
        n += 80 + i.product_id.len() + opt(&i.category) + opt(&i.name);
    }
    n
}

/// The estimated size of every unsealed event.
pub fn unsealed_bytes(q: &Queue) -> usize {
    q.segments
        .iter()
        .flat_map(|s| &s.events)
        .map(estimate)
        .sum()
}

/// Seals every segment into batches within the policy's limits, sent (for now) at `now`.
pub fn seal(q: &mut Queue, write_key: &str, now: f64, policy: &Policy) {
    for seg in mem::take(&mut q.segments) {
        let context = Rc::try_unwrap(seg.ctx).unwrap_or_else(|rc| (*rc).clone());
        let mut events = seg.events.into_iter().peekable();
        while events.peek().is_some() {
            let mut batch = Batch {
                write_key: write_key.into(),
                sent_at_ms: now as i64,
                consent: seg.mask,
                context: context.clone(),
                events: Vec::new(),
            };
            let mut bytes = 0;
            while let Some(ev) = events.next_if(|ev| {
                batch.events.is_empty()
                    || (batch.events.len() < policy.max_events
                        && bytes + estimate(ev) <= policy.max_bytes)
            }) {
                bytes += estimate(&ev);
                batch.events.push(ev);
            }
            let count = batch.events.len() as u32;
            q.sealed
                .push(Sealed::new(crate::fb::encode(&batch), seg.need, count));
        }
    }
}

/// Rewrites the `sent_at_ms` field of an encoded batch, so the collector's clock-skew
/// correction holds for a batch retried later. Returns `false` when the field is not there
/// (it always is in sealed batches: sealing writes a non-zero time).
///
/// This reads the FlatBuffers layout directly (root offset, vtable, field 1 of
/// `EventBatch`); the tests check it against `wire::decode`.
pub fn stamp_sent_at(body: &mut [u8], sent_at_ms: f64) -> bool {
    let u32_at = |b: &[u8], i: usize| {
        b.get(i..i + 4)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    };
    let u16_at = |b: &[u8], i: usize| {
        b.get(i..i + 2)
            .map(|s| usize::from(u16::from_le_bytes([s[0], s[1]])))
    };
    let field = || -> Option<usize> {
        let table = u32_at(body, 0)? as usize;
        let vtable = usize::try_from(table as isize - u32_at(body, table)? as i32 as isize).ok()?;
        // vtable: its size, the table's size, then one offset per field; sent_at_ms is
        // field 1 of EventBatch.
        if u16_at(body, vtable)? < 6 {
            return None;
        }
        let offset = u16_at(body, vtable + 6)?;
        (offset != 0).then_some(table + offset)
    };
    match field() {
        Some(at) if at + 8 <= body.len() => {
            body[at..at + 8].copy_from_slice(&(sent_at_ms as i64).to_le_bytes());
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::String;
    use alloc::vec;
    use wire::{Context, EventKind, Item, Property};

    fn rich(i: u8) -> Event {
        Event {
            message_id: [i + 1; 16],
            timestamp_ms: 1_700_000_000_000 + i64::from(i),
            kind: EventKind::OrderCompleted,
            name: Some("order".into()),
            properties: (0..10)
                .map(|i| Property {
                    key: alloc::format!("key{i}"),
                    value: if i % 2 == 0 {
                        Value::String("a value".into())
                    } else {
                        Value::Float(1.5)
                    },
                })
                .collect(),
            items: (0..5)
                .map(|i| Item {
                    product_id: alloc::format!("sku-{i}"),
                    category: Some("shoes".into()),
                    price: 1999,
                    quantity: 2,
                    name: Some("Runner".into()),
                })
                .collect(),
            order_id: Some("o-1".into()),
            revenue: 9995,
            currency: Some("EUR".into()),
            ..Event::default()
        }
    }

    #[test]
    fn a_batch_is_due_on_count_size_age_or_flush() {
        let p = Policy::default();
        assert_eq!(p.due(0, 0, None, 0.0, true), None);
        assert_eq!(p.due(19, 1000, Some(1000.0), 1200.0, false), Some(800.0));
        assert_eq!(p.due(20, 1000, Some(1000.0), 1200.0, false), Some(0.0));
        assert_eq!(p.due(2, 12 * 1024, Some(1000.0), 1200.0, false), Some(0.0));
        assert_eq!(p.due(1, 10, Some(1000.0), 2000.0, false), Some(0.0));
        assert_eq!(p.due(1, 10, Some(1000.0), 1001.0, true), Some(0.0));
    }

    #[test]
    fn estimates_bound_the_encoded_size() {
        let small = Event {
            message_id: [1; 16],
            kind: EventKind::Track,
            name: Some("perf".into()),
            properties: vec![Property {
                key: "i".into(),
                value: Value::Int(7),
            }],
            ..Event::default()
        };
        for ev in [small, rich(1)] {
            let one = crate::fb::encode(&Batch {
                events: vec![ev.clone()],
                ..Batch::default()
            });
            let many = crate::fb::encode(&Batch {
                events: vec![ev.clone(); 50],
                ..Batch::default()
            });
            let per_event = (many.len() - one.len()) / 49;
            assert!(
                estimate(&ev) >= per_event,
                "estimate {} < actual {per_event}",
                estimate(&ev)
            );
        }
    }

    #[test]
    fn estimates_bound_wire_encode_too() {
        let ev = rich(1);
        let one = wire::encode(&Batch {
            events: vec![ev.clone()],
            ..Batch::default()
        });
        let many = wire::encode(&Batch {
            events: vec![ev.clone(); 50],
            ..Batch::default()
        });
        let per_event = (many.len() - one.len()) / 49;
        assert!(
            estimate(&ev) >= per_event,
            "estimate {} < actual {per_event}",
            estimate(&ev)
        );
    }

    #[test]
    fn sealing_splits_at_the_limits_and_keeps_everything() {
        let ctx = Rc::new(Context {
            page_url: Some("https://shop.example/".into()),
            anonymous_id: Some("a1".into()),
            ..Context::default()
        });
        let mut q = Queue::new(1000);
        for i in 0..7 {
            q.push(rich(i), &ctx, 3, 2);
        }
        q.push(rich(7), &ctx, 1, 1);
        let policy = Policy {
            max_events: 3,
            ..Policy::default()
        };
        seal(&mut q, "demo", 5000.0, &policy);
        assert!(q.segments.is_empty());
        let counts: Vec<u32> = q.sealed.iter().map(|b| b.count).collect();
        assert_eq!(counts, [3, 3, 1, 1]);
        let mut seen = Vec::new();
        for b in &q.sealed {
            let batch = wire::decode(&b.body, &wire::Limits::default()).unwrap();
            assert_eq!(batch.write_key, "demo");
            assert_eq!(batch.sent_at_ms, 5000);
            assert_eq!(batch.context, *ctx);
            assert_eq!(batch.consent, if b.need == 1 { 1 } else { 3 });
            seen.extend(batch.events);
        }
        assert_eq!(seen, (0..8).map(rich).collect::<Vec<_>>());

        // A byte limit splits too: each of these events is estimated near 1 KB.
        let mut q = Queue::new(1000);
        for i in 0..4 {
            q.push(rich(i), &ctx, 3, 2);
        }
        let small = Policy {
            max_bytes: 2 * estimate(&rich(0)),
            ..Policy::default()
        };
        seal(&mut q, "demo", 5000.0, &small);
        assert_eq!(q.sealed.iter().map(|b| b.count).collect::<Vec<_>>(), [2, 2]);
    }

    #[test]
    fn the_send_time_is_rewritten_in_place() {
        let mut body = wire::encode(&Batch {
            write_key: String::from("demo"),
            sent_at_ms: 1,
            events: vec![rich(1)],
            ..Batch::default()
        });
        assert!(stamp_sent_at(&mut body, 1_700_000_123_456.0));
        let batch = wire::decode(&body, &wire::Limits::default()).unwrap();
        assert_eq!(batch.sent_at_ms, 1_700_000_123_456);
        assert_eq!(batch.events, [rich(1)]);
        // Without the field (default 0 is not written) nothing changes.
        let mut body = wire::encode(&Batch::default());
        let before = body.clone();
        assert!(!stamp_sent_at(&mut body, 5.0));
        assert_eq!(body, before);
        assert!(!stamp_sent_at(&mut [1, 0], 5.0));
    }
}
