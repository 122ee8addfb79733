//! The bounded queue. Events, encoded when they are recorded ([`Piece`]), first wait
//! unsealed, in segments that share a context, a consent mask and the purposes they need;
//! the timer seals segments into batches, which wait until the collector acknowledges them.
//! When the queue is over its cap, the oldest events are dropped and counted.

use alloc::rc::Rc;
use alloc::vec::Vec;

/// One event, encoded as a piece of the batch it will join (`wire::encode::event`).
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    /// Its message id.
    pub id: [u8; 16],
    /// When it happened (Unix ms).
    pub ts: f64,
    /// The encoded event.
    pub bytes: Vec<u8>,
}

#[cfg(test)]
impl Piece {
    /// Encodes `ev`.
    pub(crate) fn of(ev: &wire::Event) -> Piece {
        Piece {
            id: ev.message_id,
            ts: ev.timestamp_ms as f64,
            bytes: wire::encode::event(ev),
        }
    }
}

/// The encoded page context events happened in (`wire::encode::context`), shared by the
/// events of one page state.
pub type Ctx = Rc<Vec<u8>>;

/// Unsealed events that can share a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    /// The page context they happened in.
    pub ctx: Ctx,
    /// Purposes granted when they were queued: the batch's consent mask.
    pub mask: u8,
    /// Purposes they need (each event's declared purpose and its kind's least purpose).
    pub need: u8,
    /// The events, oldest first.
    pub events: Vec<Piece>,
}

/// An encoded batch waiting for an acknowledgement.
#[derive(Debug, Clone, PartialEq)]
pub struct Sealed {
    /// The `wire` bytes (`sent_at_ms` is rewritten before each try).
    pub body: Vec<u8>,
    /// Purposes its events need.
    pub need: u8,
    /// How many events it holds.
    pub count: u32,
    /// The request carrying it now (0: none).
    pub seq: u32,
    /// Not to be sent before this time (Unix ms): set after a beacon, whose fate is unknown.
    pub hold_until: f64,
}

impl Sealed {
    /// A batch read back from storage or just sealed: not in flight, not held.
    pub fn new(body: Vec<u8>, need: u8, count: u32) -> Sealed {
        Sealed {
            body,
            need,
            count,
            seq: 0,
            hold_until: 0.0,
        }
    }

    /// Whether it may be sent at `now`.
    pub fn sendable(&self, now: f64) -> bool {
        self.seq == 0 && self.hold_until <= now
    }
}

/// Unsealed segments and sealed batches, each bounded in events.
#[derive(Debug, Clone, Default)]
pub struct Queue {
    /// Unsealed events, oldest segment first.
    pub segments: Vec<Segment>,
    /// Sealed batches, oldest first.
    pub sealed: Vec<Sealed>,
    /// Events dropped because the queue was full (or purged for lack of consent).
    pub dropped: u32,
    cap: usize,
}

impl Queue {
    /// An empty queue holding at most `cap` sealed and `cap` unsealed events.
    pub fn new(cap: usize) -> Queue {
        Queue {
            cap,
            ..Queue::default()
        }
    }

    /// Unsealed events.
    pub fn unsealed(&self) -> usize {
        self.segments.iter().map(|s| s.events.len()).sum()
    }

    /// All events, sealed or not.
    pub fn len(&self) -> usize {
        self.unsealed() + self.sealed.iter().map(|b| b.count as usize).sum::<usize>()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty() && self.sealed.is_empty()
    }

    /// Appends `ev` to the last segment when it shares `ctx` (the same allocation), `mask`
    /// and `need`, else to a new one; then drops the oldest events while over the cap.
    pub fn push(&mut self, ev: Piece, ctx: &Ctx, mask: u8, need: u8) {
        append(&mut self.segments, ev, ctx, mask, need);
        self.trim();
    }

    /// Adds batches (adopted from storage) after the ones already sealed.
    pub fn extend_sealed(&mut self, batches: Vec<Sealed>) {
        self.sealed.extend(batches);
        self.trim();
    }

    /// Drops the oldest events while over the cap, which applies to sealed and unsealed
    /// events separately (a sealed batch is dropped whole, and one new event must not cost
    /// a whole batch): sealed batches not in flight first, then unsealed events.
    fn trim(&mut self) {
        while self.sealed.iter().map(|b| b.count as usize).sum::<usize>() > self.cap {
            let Some(i) = self.sealed.iter().position(|b| b.seq == 0) else {
                break;
            };
            self.dropped += self.sealed.remove(i).count;
        }
        while self.unsealed() > self.cap {
            let Some(s) = self.segments.first_mut() else {
                break;
            };
            s.events.remove(0);
            self.dropped += 1;
            if s.events.is_empty() {
                self.segments.remove(0);
            }
        }
    }

    /// The timestamp of the oldest unsealed event.
    pub fn oldest_unsealed(&self) -> Option<f64> {
        self.segments
            .iter()
            .filter_map(|s| s.events.first())
            .map(|e| e.ts)
            .reduce(|a, b| if a < b { a } else { b })
    }

    /// The first sealed batch that may be sent at `now`.
    pub fn next_sendable(&mut self, now: f64) -> Option<&mut Sealed> {
        self.sealed.iter_mut().find(|b| b.sendable(now))
    }

    /// The earliest time a held batch may be sent again.
    pub fn next_hold(&self, now: f64) -> Option<f64> {
        self.sealed
            .iter()
            .filter(|b| b.seq == 0 && b.hold_until > now)
            .map(|b| b.hold_until)
            .reduce(|a, b| if a < b { a } else { b })
    }

    /// Forgets the batch carried by request `seq`; returns its event count.
    pub fn finish(&mut self, seq: u32) -> u32 {
        self.remove_sealed(seq, 0)
    }

    /// Removes the sealed batches carried by request `seq` (not 0) or needing a purpose in
    /// `need`; returns their event count.
    fn remove_sealed(&mut self, seq: u32, need: u8) -> u32 {
        let mut n = 0;
        self.sealed.retain(|b| {
            let gone = (seq != 0 && b.seq == seq) || b.need & need != 0;
            if gone {
                n += b.count;
            }
            !gone
        });
        n
    }

    /// Puts the batch of failed request `seq` back in line.
    pub fn release(&mut self, seq: u32) {
        for b in self.sealed.iter_mut().filter(|b| b.seq == seq) {
            b.seq = 0;
        }
    }

    /// Removes every event that needs a purpose in `denied`; returns how many.
    pub fn purge(&mut self, denied: u8) -> u32 {
        let mut n = self.remove_sealed(0, denied);
        self.segments.retain(|s| {
            let gone = s.need & denied != 0;
            if gone {
                n += s.events.len() as u32;
            }
            !gone
        });
        n
    }
}

/// Appends `ev` to the last of `segments` when it shares `ctx` (the same allocation),
/// `mask` and `need`, else to a new segment.
pub fn append(segments: &mut Vec<Segment>, ev: Piece, ctx: &Ctx, mask: u8, need: u8) {
    match segments.last_mut() {
        Some(s) if Rc::ptr_eq(&s.ctx, ctx) && s.mask == mask && s.need == need => s.events.push(ev),
        _ => segments.push(Segment {
            ctx: ctx.clone(),
            mask,
            need,
            events: alloc::vec![ev],
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::Context;

    fn ev(ts: i64) -> Piece {
        Piece::of(&wire::Event {
            message_id: [ts as u8; 16],
            timestamp_ms: ts,
            ..wire::Event::default()
        })
    }

    fn ctx() -> Ctx {
        Rc::new(wire::encode::context(&Context::default()))
    }

    fn stamps(q: &Queue) -> Vec<Vec<i64>> {
        q.segments
            .iter()
            .map(|s| s.events.iter().map(|e| e.ts as i64).collect())
            .collect()
    }

    #[test]
    fn events_share_a_segment_only_with_the_same_context_mask_and_need() {
        let a = ctx();
        let b = ctx();
        let mut q = Queue::new(100);
        q.push(ev(1), &a, 3, 2);
        q.push(ev(2), &a, 3, 2);
        q.push(ev(3), &b, 3, 2);
        q.push(ev(4), &b, 7, 2);
        q.push(ev(5), &b, 7, 1);
        q.push(ev(6), &b, 7, 1);
        assert_eq!(stamps(&q), [vec![1, 2], vec![3], vec![4], vec![5, 6]]);
        assert_eq!(q.len(), 6);
        assert_eq!(q.oldest_unsealed(), Some(1.0));
    }

    #[test]
    fn a_full_queue_drops_the_oldest_events_and_counts_them() {
        let ctx = ctx();
        let mut q = Queue::new(3);
        for ts in 1..=5 {
            q.push(ev(ts), &ctx, 3, 2);
        }
        assert_eq!(stamps(&q), [vec![3, 4, 5]]);
        assert_eq!(q.dropped, 2);
        // Sealed batches count on their own, and go whole.
        q.extend_sealed(alloc::vec![
            Sealed::new(alloc::vec![1], 2, 2),
            Sealed::new(alloc::vec![2], 2, 2)
        ]);
        assert_eq!(q.sealed.len(), 1);
        assert_eq!(q.sealed[0].body, [2]);
        assert_eq!(q.dropped, 4);
        assert_eq!(q.len(), 5);
    }

    #[test]
    fn batches_in_flight_are_not_dropped_for_space() {
        let mut q = Queue::new(2);
        q.extend_sealed(alloc::vec![Sealed::new(alloc::vec![1], 2, 2)]);
        q.sealed[0].seq = 9;
        q.extend_sealed(alloc::vec![Sealed::new(alloc::vec![2], 2, 1)]);
        assert_eq!(q.sealed.len(), 1);
        assert_eq!(q.sealed[0].seq, 9);
        assert_eq!(q.dropped, 1);
        assert_eq!(q.finish(9), 2);
        assert!(q.is_empty());
    }

    #[test]
    fn sendable_batches_skip_those_in_flight_or_held() {
        let mut q = Queue::new(100);
        q.extend_sealed(alloc::vec![
            Sealed::new(alloc::vec![1], 2, 1),
            Sealed::new(alloc::vec![2], 2, 1),
            Sealed::new(alloc::vec![3], 2, 1),
        ]);
        q.sealed[0].seq = 1;
        q.sealed[1].hold_until = 500.0;
        assert_eq!(q.next_sendable(100.0).map(|b| b.body[0]), Some(3));
        assert_eq!(q.next_hold(100.0), Some(500.0));
        q.release(1);
        assert_eq!(q.next_sendable(100.0).map(|b| b.body[0]), Some(1));
    }

    #[test]
    fn purge_removes_what_needs_a_denied_purpose() {
        let ctx = ctx();
        let mut q = Queue::new(100);
        q.extend_sealed(alloc::vec![
            Sealed::new(alloc::vec![1], 2, 4),
            Sealed::new(alloc::vec![2], 1, 1)
        ]);
        q.push(ev(1), &ctx, 3, 2);
        q.push(ev(2), &ctx, 3, 1);
        assert_eq!(q.purge(2), 5);
        assert_eq!(q.len(), 2);
        assert_eq!(q.sealed[0].need, 1);
        assert_eq!(q.segments[0].need, 1);
    }
}
