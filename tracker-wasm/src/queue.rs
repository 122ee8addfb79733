//! Events waiting to be sent, as byte records in one buffer: the queue, the events held for
//! consent, and what localStorage keeps are all a [`Queue`].
//!
//! A record is a fixed header ([`Head`]), the encoded context the event happened in
//! (`wire::encode::context_ref`) and the encoded event (`wire::encode::event_ref`). Events
//! are encoded once, when recorded; a batch is their pieces copied behind a batch header
//! ([`crate::batch`]). One `Vec<u8>` instead of vectors of events, segments and batches keeps
//! the shipped wasm small (each vector type brings its own code), and the stored form is the
//! buffer itself.
//!
//! An event is *unsealed* (its `hold` is infinite) until the batching policy says its time
//! has come; then it is *sealed* and goes out with the next request. A record in flight
//! carries the request's number; after a beacon, whose fate is unknown, it is held back for
//! a while and sent again.

use alloc::vec::Vec;
use core::mem;

/// The size of a record's header.
pub const HEAD: usize = 48;

/// A record's header. Stored little-endian: `len` (4 bytes), `ctx` (4), `seq` (4), `need`,
/// `mask`, 2 bytes of padding, `ts` (8), `hold` (8), `id` (16).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Head {
    /// The record's length: header, context and event.
    pub len: usize,
    /// The length of the context, which follows the header.
    pub ctx: usize,
    /// The request carrying it now (0: none).
    pub seq: u32,
    /// Purposes it needs (its declared purpose and its kind's least purpose).
    pub need: u8,
    /// Purposes granted when it was queued: its batch's consent mask (0 while held).
    pub mask: u8,
    /// When it happened (Unix ms).
    pub ts: f64,
    /// Not to be sent before this time (Unix ms); infinite while unsealed.
    pub hold: f64,
    /// Its message id.
    pub id: [u8; 16],
}

impl Head {
    /// A new, unsealed event's header.
    pub fn new(id: [u8; 16], ts: f64, need: u8, mask: u8) -> Head {
        Head {
            len: 0,
            ctx: 0,
            seq: 0,
            need,
            mask,
            ts,
            hold: f64::INFINITY,
            id,
        }
    }

    /// Whether it may be sent at `now`.
    pub fn sendable(&self, now: f64) -> bool {
        self.seq == 0 && self.hold <= now
    }

    /// The header of the record at `at`; `None` past the end or when it does not fit.
    fn read(buf: &[u8], at: usize) -> Option<Head> {
        let h: &[u8; HEAD] = buf.get(at..)?.first_chunk()?;
        let len = u32::from_le_bytes(chunk(h, 0)) as usize;
        let ctx = u32::from_le_bytes(chunk(h, 4)) as usize;
        if len < HEAD + ctx || buf.len() - at < len {
            return None;
        }
        Some(Head {
            len,
            ctx,
            seq: u32::from_le_bytes(chunk(h, 8)),
            need: h[12],
            mask: h[13],
            ts: f64::from_le_bytes(chunk(h, 16)),
            hold: f64::from_le_bytes(chunk(h, 24)),
            id: chunk(h, 32),
        })
    }

    fn bytes(&self) -> [u8; HEAD] {
        let mut h = [0; HEAD];
        put(&mut h, 0, &(self.len as u32).to_le_bytes());
        put(&mut h, 4, &(self.ctx as u32).to_le_bytes());
        put(&mut h, 8, &self.seq.to_le_bytes());
        h[12] = self.need;
        h[13] = self.mask;
        put(&mut h, 16, &self.ts.to_le_bytes());
        put(&mut h, 24, &self.hold.to_le_bytes());
        put(&mut h, 32, &self.id);
        h
    }
}

/// `N` bytes of `b` from `at` (zeros past the end).
fn chunk<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    b.get(at..)
        .and_then(|s| s.first_chunk::<N>())
        .copied()
        .unwrap_or([0; N])
}

/// Copies `bytes` into `b` at `at`, as far as it fits.
fn put(b: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(dst) = b.get_mut(at..) {
        for (d, s) in dst.iter_mut().zip(bytes) {
            *d = *s;
        }
    }
}

/// A change to every header ([`Queue::reset`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reset {
    /// The events of this (failed) request are in flight no more.
    Request(u32),
    /// Unsealed events are sealed: they go out with the next request.
    Seal,
    /// Read back from storage: nothing is in flight or held back (requests and beacons
    /// belong to the tab that made them).
    Stored,
}

/// What a queue holds, from one pass over it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    /// Events.
    pub events: u32,
    /// Unsealed events.
    pub unsealed: u32,
    /// The bytes of the unsealed events.
    pub unsealed_bytes: usize,
    /// When the oldest unsealed event happened (infinite: none).
    pub oldest: f64,
    /// Events in flight.
    pub in_flight: u32,
    /// Whether an event may be sent now.
    pub sendable: bool,
    /// The earliest time a held-back event may be sent again (infinite: none).
    pub next_hold: f64,
}

/// Which records [`Queue::update`] removes. An enum rather than a callback: the loop then
/// exists once, and no function in the wasm is called indirectly (see the crate docs).
#[derive(Debug)]
pub enum Filter<'a> {
    /// Those carried by request `seq` (not 0), or needing a purpose in `need`.
    Remove {
        /// The request.
        seq: u32,
        /// The purposes.
        need: u8,
    },
    /// The unsealed event with this id; its time goes to the second field.
    Take([u8; 16], &'a mut Option<f64>),
    /// The oldest this many events not in flight.
    Oldest(u32),
    /// Those whose purposes are all in `granted`: they move to `into`, with `granted` as
    /// their consent mask (events held for consent, released).
    Release {
        /// The purposes granted.
        granted: u8,
        /// Where they go.
        into: &'a mut Queue,
    },
}

/// Byte records, oldest first (see the module documentation).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Queue(pub Vec<u8>);

impl Queue {
    /// Whether it holds no record.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Rewrites each header in place as `what` says; returns whether the bytes are whole
    /// records, nothing else (for a stored queue: whether it can be used). One walk for
    /// every change that removes nothing, instead of a callback each.
    pub fn reset(&mut self, what: Reset) -> bool {
        let mut at = 0;
        while let Some(mut h) = self.head(at) {
            match what {
                Reset::Request(seq) if h.seq == seq => h.seq = 0,
                Reset::Seal if h.hold == f64::INFINITY => h.hold = 0.0,
                Reset::Stored => {
                    h.seq = 0;
                    h.hold = 0.0;
                }
                _ => {}
            }
            self.set(at, &h);
            at += h.len;
        }
        at == self.0.len()
    }

    /// The header of the record at `at`.
    pub fn head(&self, at: usize) -> Option<Head> {
        Head::read(&self.0, at)
    }

    /// The context and the event of the record at `at`.
    pub fn parts(&self, at: usize, h: &Head) -> (&[u8], &[u8]) {
        let body = self.0.get(at + HEAD..at + h.len).unwrap_or_default();
        body.split_at_checked(h.ctx).unwrap_or_default()
    }

    /// Appends a record: `h` (its lengths set here) then `ctx` and `event`.
    pub fn push(&mut self, mut h: Head, ctx: &[u8], event: &[u8]) {
        h.ctx = ctx.len();
        h.len = HEAD + ctx.len() + event.len();
        self.0.extend_from_slice(&h.bytes());
        self.0.extend_from_slice(ctx);
        self.0.extend_from_slice(event);
    }

    /// Rewrites the header of the record at `at`.
    pub fn set(&mut self, at: usize, h: &Head) {
        put(&mut self.0, at, &h.bytes());
    }

    /// Removes the records `filter` names; returns how many.
    pub fn update(&mut self, mut filter: Filter<'_>) -> u32 {
        // Rebuilt rather than moved in place: no index can go wrong, so no panic path.
        let old = Queue(mem::take(&mut self.0));
        let (mut at, mut removed) = (0, 0);
        while let Some(mut h) = old.head(at) {
            let (ctx, event) = old.parts(at, &h);
            let gone = match &mut filter {
                Filter::Remove { seq, need } => (*seq != 0 && h.seq == *seq) || h.need & *need != 0,
                Filter::Take(id, found) => {
                    let hit = h.id == *id && h.seq == 0 && h.hold == f64::INFINITY;
                    if hit {
                        **found = Some(h.ts);
                    }
                    hit
                }
                Filter::Oldest(n) => {
                    let drop = *n > 0 && h.seq == 0;
                    *n -= u32::from(drop);
                    drop
                }
                Filter::Release { granted, into } => {
                    let go = h.need & *granted == h.need;
                    if go {
                        h.mask = *granted;
                        into.push(h, ctx, event);
                    }
                    go
                }
            };
            if gone {
                removed += 1;
            } else {
                self.push(h, ctx, event);
            }
            at += h.len;
        }
        removed
    }

    /// Removes the records carried by request `seq` (not 0) or needing a purpose in `need`;
    /// returns how many.
    pub fn remove(&mut self, seq: u32, need: u8) -> u32 {
        self.update(Filter::Remove { seq, need })
    }

    /// Puts the records of failed request `seq` back in line.
    pub fn release(&mut self, seq: u32) {
        self.reset(Reset::Request(seq));
    }

    /// Seals every unsealed event: it goes out with the next request.
    pub fn seal(&mut self) {
        self.reset(Reset::Seal);
    }

    /// Removes the unsealed event `id`, if there is one, and returns its time.
    pub fn take(&mut self, id: [u8; 16]) -> Option<f64> {
        let mut found = None;
        self.update(Filter::Take(id, &mut found));
        found
    }

    /// Drops the oldest events not in flight while more than `cap` are queued; returns how
    /// many.
    pub fn trim(&mut self, cap: u32) -> u32 {
        let over = self.stats(0.0).events.saturating_sub(cap);
        if over == 0 {
            return 0;
        }
        self.update(Filter::Oldest(over))
    }

    /// Counts what it holds, at `now`.
    pub fn stats(&self, now: f64) -> Stats {
        let mut s = Stats {
            events: 0,
            unsealed: 0,
            unsealed_bytes: 0,
            oldest: f64::INFINITY,
            in_flight: 0,
            sendable: false,
            next_hold: f64::INFINITY,
        };
        let mut at = 0;
        while let Some(h) = self.head(at) {
            s.events += 1;
            if h.hold == f64::INFINITY {
                s.unsealed += 1;
                s.unsealed_bytes += h.len - HEAD - h.ctx;
                s.oldest = s.oldest.min(h.ts);
            } else if h.seq != 0 {
                s.in_flight += 1;
            } else if h.hold <= now {
                s.sendable = true;
            } else {
                s.next_hold = s.next_hold.min(h.hold);
            }
            at += h.len;
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A queue of events with times `ts`, each `(ts, need)`, in context `ctx`.
    fn queue(events: &[(u8, u8)], ctx: &[u8]) -> Queue {
        let mut q = Queue::default();
        for &(ts, need) in events {
            q.push(Head::new([ts; 16], f64::from(ts), need, 3), ctx, &[ts; 5]);
        }
        q
    }

    fn stamps(q: &Queue) -> Vec<u8> {
        let mut out = Vec::new();
        let mut at = 0;
        while let Some(h) = q.head(at) {
            out.push(h.ts as u8);
            at += h.len;
        }
        out
    }

    #[test]
    fn records_keep_their_header_context_and_event() {
        let q = queue(&[(1, 2), (2, 4)], b"ctx");
        let h = q.head(0).unwrap();
        assert_eq!(
            (h.len, h.ctx, h.need, h.mask, h.ts),
            (HEAD + 8, 3, 2, 3, 1.0)
        );
        assert_eq!(q.parts(0, &h), (&b"ctx"[..], &[1; 5][..]));
        assert_eq!(q.head(h.len).unwrap().id, [2; 16]);
        assert_eq!(q.head(2 * h.len), None);
        let valid = |b: &[u8]| Queue(b.to_vec()).reset(Reset::Stored);
        assert!(valid(&q.0));
        assert!(!valid(&q.0[..q.0.len() - 1]));
        assert!(!valid(&[1]));
        assert!(valid(&[]));
    }

    #[test]
    fn a_full_queue_drops_the_oldest_events_not_in_flight_and_counts_them() {
        let mut q = queue(&[(1, 2), (2, 2), (3, 2), (4, 2), (5, 2)], b"c");
        let mut first = q.head(0).unwrap();
        first.seq = 7;
        q.set(0, &first);
        assert_eq!(q.trim(5), 0);
        assert_eq!(q.trim(3), 2);
        assert_eq!(stamps(&q), [1, 4, 5]);
        assert_eq!(q.stats(0.0).events, 3);
    }

    #[test]
    fn sealing_requests_and_answers_move_events_along() {
        let mut q = queue(&[(1, 2), (2, 2), (3, 1)], b"c");
        let s = q.stats(100.0);
        assert_eq!(
            (s.events, s.unsealed, s.unsealed_bytes, s.oldest),
            (3, 3, 15, 1.0)
        );
        assert!(!s.sendable);
        q.seal();
        assert!(q.stats(100.0).sendable);
        let mut h = q.head(0).unwrap();
        h.seq = 9;
        q.set(0, &h);
        let mut h = q.head(h.len).unwrap();
        h.hold = 500.0;
        q.set(h.len, &h);
        let s = q.stats(100.0);
        assert_eq!((s.in_flight, s.sendable, s.next_hold), (1, true, 500.0));
        q.release(9);
        assert_eq!(q.stats(100.0).in_flight, 0);
        assert_eq!(q.remove(0, 1), 1, "purged for a denied purpose");
        assert_eq!(stamps(&q), [1, 2]);
        let mut h = q.head(0).unwrap();
        h.seq = 4;
        q.set(0, &h);
        assert_eq!(q.remove(4, 0), 1, "acknowledged");
        assert_eq!(stamps(&q), [2]);
    }

    #[test]
    fn only_an_unsealed_event_can_be_taken_back() {
        let mut q = queue(&[(1, 2), (2, 2)], b"c");
        assert_eq!(q.take([1; 16]), Some(1.0));
        assert_eq!(q.take([1; 16]), None);
        q.seal();
        assert_eq!(q.take([2; 16]), None);
        assert_eq!(stamps(&q), [2]);
    }
}
