//! Batching: when unsealed events are due (count, size, age), and the next batch: the first
//! sendable events that share a context, a consent mask and the purposes they need, within
//! the batch limits, copied behind a `wire` batch header.

use alloc::vec::Vec;

use crate::queue::{HEAD, Head, Queue};

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

impl Policy {
    /// The defaults.
    pub const DEFAULT: Policy = Policy {
        flush_at: 20,
        flush_bytes: 12 * 1024,
        interval_ms: 1000.0,
        max_events: 500,
        max_bytes: 24 * 1024,
    };
}

impl Default for Policy {
    fn default() -> Self {
        Policy::DEFAULT
    }
}

impl Policy {
    /// How long until the unsealed events are due (ms, 0: now), or `None` with none
    /// waiting: `count` events of `bytes` bytes, the oldest at `oldest`. `forced`
    /// (`pz.flush()`, the page going away) makes them due now.
    pub fn due(
        &self,
        count: u32,
        bytes: usize,
        oldest: f64,
        now: f64,
        forced: bool,
    ) -> Option<f64> {
        if count == 0 {
            return None;
        }
        if forced || count as usize >= self.flush_at || bytes >= self.flush_bytes {
            return Some(0.0);
        }
        Some((oldest + self.interval_ms - now).max(0.0))
    }
}

/// The next batch that may go at `now`: a run of records of the queue.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Next {
    /// Where its first record starts.
    pub start: usize,
    /// Where the record after its last one starts.
    pub end: usize,
    /// How many events.
    pub count: usize,
    /// The header of its first record.
    pub first: Head,
}

/// The first sendable event at `now` and those right after it that are sendable and share
/// its context, mask and need, within the policy's limits (the first one always: an event
/// is never larger than a batch may be).
pub fn next(q: &Queue, now: f64, policy: &Policy, write_key: &[u8]) -> Option<Next> {
    let mut start = 0;
    let first = loop {
        let h = q.head(start)?;
        if h.sendable(now) {
            break h;
        }
        start += h.len;
    };
    let (ctx, _) = q.parts(start, &first);
    // The header, the write key and the context, plus alignment padding (at most 7 bytes
    // per piece, counted generously).
    let mut bytes = 64 + write_key.len() + ctx.len();
    let mut b = Next {
        start,
        end: start,
        count: 0,
        first,
    };
    while let Some(h) = q.head(b.end) {
        let size = h.len - HEAD - h.ctx + 8;
        if !h.sendable(now)
            || (h.mask, h.need) != (first.mask, first.need)
            || q.parts(b.end, &h).0 != ctx
            || (b.count > 0 && (b.count >= policy.max_events || bytes + size > policy.max_bytes))
        {
            break;
        }
        bytes += size;
        b.count += 1;
        b.end += h.len;
    }
    Some(b)
}

/// The `wire` body of batch `b`, sent (for now) at `now`.
pub fn body(q: &Queue, b: &Next, write_key: &[u8], now: f64) -> Vec<u8> {
    let (ctx, _) = q.parts(b.start, &b.first);
    wire::encode::assemble(
        write_key,
        now as i64,
        b.first.mask,
        ctx,
        Pieces {
            q,
            at: b.start,
            left: b.count,
        },
    )
}

/// Marks the events of batch `b` as carried by request `seq` (0: none) and held back until
/// `hold`.
pub fn mark(q: &mut Queue, b: &Next, seq: u32, hold: f64) {
    let mut at = b.start;
    while at < b.end
        && let Some(mut h) = q.head(at)
    {
        h.seq = seq;
        h.hold = hold;
        q.set(at, &h);
        at += h.len;
    }
}

/// The encoded events of a batch.
struct Pieces<'a> {
    q: &'a Queue,
    at: usize,
    left: usize,
}

impl<'a> Iterator for Pieces<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.left == 0 {
            return None;
        }
        let h = self.q.head(self.at)?;
        let (_, event) = self.q.parts(self.at, &h);
        self.at += h.len;
        self.left -= 1;
        Some(event)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for Pieces<'_> {}

#[cfg(test)]
mod tests {
    use super::*;
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

    fn push(q: &mut Queue, e: &Event, ctx: &[u8], mask: u8, need: u8) {
        let h = Head::new(e.message_id, e.timestamp_ms as f64, need, mask);
        q.push(h, ctx, &wire::encode::event(e));
    }

    /// Sends every batch: their event counts and decoded bodies.
    fn send_all(q: &mut Queue, policy: &Policy) -> Vec<(usize, wire::Batch)> {
        let mut out = Vec::new();
        let mut seq = 0;
        while let Some(b) = next(q, 5000.0, policy, b"demo") {
            seq += 1;
            let body = body(q, &b, b"demo", 5000.0);
            assert!(
                body.len() <= policy.max_bytes,
                "{} > {}",
                body.len(),
                policy.max_bytes
            );
            mark(q, &b, seq, 0.0);
            out.push((
                b.count,
                wire::decode(&body, &wire::Limits::default()).unwrap(),
            ));
        }
        out
    }

    #[test]
    fn a_batch_is_due_on_count_size_age_or_flush() {
        let p = Policy::default();
        assert_eq!(p.due(0, 0, f64::INFINITY, 0.0, true), None);
        assert_eq!(p.due(19, 1000, 1000.0, 1200.0, false), Some(800.0));
        assert_eq!(p.due(20, 1000, 1000.0, 1200.0, false), Some(0.0));
        assert_eq!(p.due(2, 12 * 1024, 1000.0, 1200.0, false), Some(0.0));
        assert_eq!(p.due(1, 10, 1000.0, 2000.0, false), Some(0.0));
        assert_eq!(p.due(1, 10, 1000.0, 1001.0, true), Some(0.0));
    }

    #[test]
    fn batches_split_at_the_limits_and_keep_everything() {
        let context = Context {
            page_url: Some("https://shop.example/".into()),
            anonymous_id: Some("a1".into()),
            ..Context::default()
        };
        let ctx = wire::encode::context(&context);
        let mut q = Queue::default();
        for i in 0..7 {
            push(&mut q, &rich(i), &ctx, 3, 2);
        }
        push(&mut q, &rich(7), &ctx, 1, 1);
        let policy = Policy {
            max_events: 3,
            ..Policy::default()
        };
        assert_eq!(
            next(&q, 5000.0, &policy, b"demo"),
            None,
            "nothing is sealed"
        );
        q.seal();
        let sent = send_all(&mut q, &policy);
        let counts: Vec<usize> = sent.iter().map(|(n, _)| *n).collect();
        assert_eq!(counts, [3, 3, 1, 1]);
        let mut seen = Vec::new();
        for (_, batch) in &sent {
            assert_eq!(batch.write_key, "demo");
            assert_eq!(batch.sent_at_ms, 5000);
            assert_eq!(batch.context, context);
            seen.extend(batch.events.iter().cloned());
        }
        assert_eq!(sent[3].1.consent, 1);
        assert_eq!(sent[0].1.consent, 3);
        assert_eq!(seen, (0..8).map(rich).collect::<Vec<_>>());
        assert_eq!(q.stats(5000.0).in_flight, 8);

        // A byte limit splits too, and every batch stays within it.
        let mut q = Queue::default();
        for i in 0..4 {
            push(&mut q, &rich(i), &ctx, 3, 2);
        }
        q.seal();
        let one = wire::encode::event(&rich(0)).len();
        let small = Policy {
            max_bytes: 2 * one + 200 + ctx.len(),
            ..Policy::default()
        };
        let counts: Vec<usize> = send_all(&mut q, &small).iter().map(|(n, _)| *n).collect();
        assert_eq!(counts, [2, 2]);
    }

    #[test]
    fn a_batch_keeps_to_one_context() {
        let mut q = Queue::default();
        let a = wire::encode::context(&Context::default());
        let b = wire::encode::context(&Context {
            page_url: Some("/b".into()),
            ..Context::default()
        });
        push(&mut q, &rich(0), &a, 3, 2);
        push(&mut q, &rich(1), &b, 3, 2);
        push(&mut q, &rich(2), &b, 3, 2);
        q.seal();
        let sent = send_all(&mut q, &Policy::default());
        let urls: Vec<(usize, Option<String>)> = sent
            .into_iter()
            .map(|(n, b)| (n, b.context.page_url))
            .collect();
        assert_eq!(urls, [(1, None), (2, Some("/b".into()))]);
    }
}
