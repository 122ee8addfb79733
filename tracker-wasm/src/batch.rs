//! Batching: when unsealed events are due (count, size, age), how big a batch may be, and
//! sealing segments into `wire` batches.

use core::mem;

use crate::queue::{Queue, Sealed};

/// Batching settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Seal as soon as this many events wait (`flushAt`, default 20).
    pub flush_at: usize,
    /// Seal as soon as the waiting events take this many bytes.
    pub flush_bytes: usize,
    /// Seal when the oldest waiting event is this old (ms; `flushIntervalMs`, default 1000).
    pub interval_ms: f64,
    /// The most events in one batch (the collector's limit is 500).
    pub max_events: usize,
    /// The largest batch body: `sendBeacon` and `fetch(..., {keepalive: true})`
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

/// The bytes of every unsealed event.
pub fn unsealed_bytes(q: &Queue) -> usize {
    let mut n = 0;
    for s in &q.segments {
        for e in &s.events {
            n += e.bytes.len();
        }
    }
    n
}

/// What a batch adds to its events: the header, the write key and the context, plus
/// alignment padding (at most 7 bytes per piece, counted generously).
fn overhead(write_key: &str, ctx: &[u8]) -> usize {
    64 + write_key.len() + ctx.len()
}

/// Seals every segment into batches within the policy's limits, sent (for now) at `now`.
/// A batch is the segment's pieces copied behind a header: nothing is encoded again.
pub fn seal(q: &mut Queue, write_key: &str, now: f64, policy: &Policy) {
    for seg in mem::take(&mut q.segments) {
        let events = &seg.events;
        let mut start = 0;
        while start < events.len() {
            let mut end = start;
            let mut bytes = overhead(write_key, &seg.ctx);
            while let Some(e) = events.get(end) {
                let size = e.bytes.len() + 8;
                if end > start
                    && (end - start >= policy.max_events || bytes + size > policy.max_bytes)
                {
                    break;
                }
                bytes += size;
                end += 1;
            }
            let batch = &events[start..end];
            let body = wire::encode::assemble(
                write_key,
                now as i64,
                seg.mask,
                &seg.ctx,
                batch.iter().map(|e| e.bytes.as_slice()),
            );
            q.sealed
                .push(Sealed::new(body, seg.need, (end - start) as u32));
            start = end;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::Piece;
    use alloc::rc::Rc;
    use alloc::vec::Vec;
    use wire::{Context, Event, EventKind, Item, Property, Value};

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
    fn sealing_splits_at_the_limits_and_keeps_everything() {
        let context = Context {
            page_url: Some("https://shop.example/".into()),
            anonymous_id: Some("a1".into()),
            ..Context::default()
        };
        let ctx = Rc::new(wire::encode::context(&context));
        let mut q = Queue::new(1000);
        for i in 0..7 {
            q.push(Piece::of(&rich(i)), &ctx, 3, 2);
        }
        q.push(Piece::of(&rich(7)), &ctx, 1, 1);
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
            assert_eq!(batch.context, context);
            assert_eq!(batch.consent, if b.need == 1 { 1 } else { 3 });
            seen.extend(batch.events);
        }
        assert_eq!(seen, (0..8).map(rich).collect::<Vec<_>>());

        // A byte limit splits too, and every batch stays within it.
        let mut q = Queue::new(1000);
        for i in 0..4 {
            q.push(Piece::of(&rich(i)), &ctx, 3, 2);
        }
        let one = wire::encode::event(&rich(0)).len();
        let small = Policy {
            max_bytes: 2 * one + 200 + ctx.len(),
            ..Policy::default()
        };
        seal(&mut q, "demo", 5000.0, &small);
        assert_eq!(q.sealed.iter().map(|b| b.count).collect::<Vec<_>>(), [2, 2]);
        for b in &q.sealed {
            assert!(
                b.body.len() <= small.max_bytes,
                "{} > {}",
                b.body.len(),
                small.max_bytes
            );
        }
    }
}
