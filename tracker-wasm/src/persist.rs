//! localStorage: the keys, the stored form of a queue, and how tabs share them.
//!
//! Each tab stores its unsent events under its own key (`pz_q_<tab id>`), so two tabs never
//! overwrite each other's queue and never send each other's events. A tab's key says when it
//! was last written and whether the tab has gone (`pagehide`). A page that starts adopts the
//! keys of tabs that have gone, or have not written for [`STALE_MS`] (a crashed or discarded
//! tab), under a lease (`pz_l`, expiring after [`LOCK_MS`]) so that two pages starting at
//! once do not adopt, and send, the same events.
//!
//! Values are bytes; the loader stores each byte as one character (U+0000 to U+00FF), which
//! localStorage keeps as it is.

use alloc::vec::Vec;

use crate::queue::{Queue, Reset};
use crate::text;

/// The anonymous id (only while analytics or personalization is granted).
pub const ANON_KEY: &[u8] = b"pz_a";
/// The user id (same rule).
pub const USER_KEY: &[u8] = b"pz_u";
/// The session (same rule).
pub const SESSION_KEY: &[u8] = b"pz_s";
/// The visitor's consent decisions: remembering a choice is strictly necessary.
pub const CONSENT_KEY: &[u8] = b"pz_c";
/// The prefix of each tab's queue key.
pub const QUEUE_PREFIX: &[u8] = b"pz_q_";
/// The adoption lease: the owner's queue key, then when the lease expires (a little-endian
/// double, Unix ms).
pub const LOCK_KEY: &[u8] = b"pz_l";
/// How long the lease lasts (ms).
pub const LOCK_MS: f64 = 5000.0;
/// A queue key not written for this long belongs to a tab that is gone (ms). Live tabs
/// rewrite theirs at least every [`REFRESH_MS`].
pub const STALE_MS: f64 = 10.0 * 60.0 * 1000.0;
/// How often a tab with unsent events rewrites its key, to show it is alive (ms).
pub const REFRESH_MS: f64 = 60.0 * 1000.0;

/// The first byte of a stored queue; another value is another format, which is dropped.
const FORMAT: u8 = 3;

/// Key-value storage with the semantics of `window.localStorage`.
pub trait Storage {
    /// The value at `key`.
    fn get(&self, key: &[u8]) -> Option<Vec<u8>>;
    /// Stores `value` at `key`; `false` when the browser refused (quota, disabled).
    fn set(&mut self, key: &[u8], value: &[u8]) -> bool;
    /// Removes `key`.
    fn remove(&mut self, key: &[u8]);
    /// The keys that start with `pz_` (others may be there too), separated by U+001F.
    fn keys(&self) -> Vec<u8>;
}

/// A stored queue.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    /// The tab has gone (`pagehide`).
    pub closed: bool,
    /// When it was written (Unix ms).
    pub written: f64,
    /// Its events.
    pub queue: Queue,
}

impl Stored {
    /// The stored form: `[format][closed][written: little-endian double]`, then the records.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = text::copied(&[FORMAT, u8::from(self.closed)]);
        v.extend_from_slice(&self.written.to_le_bytes());
        v.extend_from_slice(&self.queue.0);
        v
    }

    /// Reads a stored queue; `None` when it is not one (another format, or damaged). Its
    /// events are neither in flight nor held back: requests and beacons belong to the tab
    /// that made them, and another tab sends the events again (the collector drops
    /// duplicates by message id).
    pub fn decode(stored: &[u8]) -> Option<Stored> {
        let (&[format, closed], rest) = stored.split_first_chunk::<2>()?;
        let (written, records) = rest.split_first_chunk::<8>()?;
        let mut queue = Queue(text::copied(records));
        if format != FORMAT || !queue.reset(Reset::Stored) {
            return None;
        }
        Some(Stored {
            closed: closed != 0,
            written: f64::from_le_bytes(*written),
            queue,
        })
    }
}

/// Stores a tab's queue under `key` (or removes the key when there is nothing to keep).
/// Returns `false` when the browser refused to store it.
pub fn save(s: &mut impl Storage, key: &[u8], stored: &Stored) -> bool {
    if stored.queue.is_empty() {
        s.remove(key);
        return true;
    }
    s.set(key, &stored.encode())
}

/// Takes the lease for the tab with queue key `own` unless another live tab holds it.
pub fn lock(s: &mut impl Storage, own: &[u8], now: f64) -> bool {
    if let Some(held) = s.get(LOCK_KEY)
        && let Some((owner, until)) = lease(&held)
        && owner != own
        && until > now
    {
        return false;
    }
    let mut mine = text::copied(own);
    mine.extend_from_slice(&(now + LOCK_MS).to_le_bytes());
    s.set(LOCK_KEY, &mine) && s.get(LOCK_KEY) == Some(mine)
}

/// The owner and the expiry of a stored lease.
fn lease(v: &[u8]) -> Option<(&[u8], f64)> {
    let (owner, until) = v.split_at_checked(v.len().checked_sub(8)?)?;
    Some((owner, f64::from_le_bytes(*until.first_chunk()?)))
}

fn is_separator(b: &u8) -> bool {
    *b == 0x1f
}

/// Visits the queues of every tab but `own`: removes the keys that hold no queue; with
/// `adopt`, takes over the queues of tabs that have gone (returns their events and removes
/// their keys); removes the events needing a purpose in `denied` from the others. One loop
/// for adopting and purging, without a callback for each.
fn sweep(s: &mut impl Storage, own: &[u8], now: f64, adopt: bool, denied: u8) -> Queue {
    let mut out = Queue::default();
    let keys = s.keys();
    for key in keys.split(is_separator) {
        if !key.starts_with(QUEUE_PREFIX) || key == own {
            continue;
        }
        let Some(mut stored) = s.get(key).as_deref().and_then(Stored::decode) else {
            s.remove(key);
            continue;
        };
        if adopt && (stored.closed || now - stored.written > STALE_MS) {
            out.0.extend_from_slice(&stored.queue.0);
            s.remove(key);
        } else if stored.queue.remove(0, denied) > 0 {
            save(s, key, &stored);
        }
    }
    out
}

/// Takes over the queues of tabs that have gone: returns their events and removes their
/// keys. Does nothing when another tab holds the lease.
pub fn adopt(s: &mut impl Storage, own: &[u8], now: f64) -> Queue {
    if !lock(s, own, now) {
        return Queue::default();
    }
    let out = sweep(s, own, now, true, 0);
    // The lease is given back at once: it is held only while this call runs, which nothing
    // in this page can interrupt. (A tab whose lease was overwritten meanwhile has lost the
    // race either way.)
    s.remove(LOCK_KEY);
    out
}

/// Removes the events needing a purpose in `denied` from the queues other tabs stored, so a
/// denial purges what is stored for it (the tab's own queue is stored again from memory).
pub fn purge(s: &mut impl Storage, own: &[u8], denied: u8) {
    sweep(s, own, 0.0, false, denied);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::Head;
    use alloc::collections::BTreeMap;

    /// localStorage as a map.
    #[derive(Default)]
    pub struct Mem(pub BTreeMap<Vec<u8>, Vec<u8>>);

    impl Storage for Mem {
        fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
            self.0.get(key).cloned()
        }
        fn set(&mut self, key: &[u8], value: &[u8]) -> bool {
            self.0.insert(key.into(), value.into());
            true
        }
        fn remove(&mut self, key: &[u8]) {
            self.0.remove(key);
        }
        fn keys(&self) -> Vec<u8> {
            let mut out = Vec::new();
            for k in self.0.keys() {
                out.extend_from_slice(k);
                out.push(0x1f);
            }
            out
        }
    }

    impl Mem {
        fn keys_list(&self) -> Vec<&[u8]> {
            self.0.keys().map(Vec::as_slice).collect()
        }
    }

    /// A queue of events `ids`, each needing `need`, one of them in flight.
    fn queue(ids: &[u8], need: u8) -> Queue {
        let mut q = Queue::default();
        for &id in ids {
            let mut h = Head::new([id; 16], 1.0, need, 3);
            h.seq = u32::from(id == 1);
            q.push(h, b"ctx", &[id; 3]);
        }
        q
    }

    fn ids(q: &Queue) -> Vec<u8> {
        let mut out = Vec::new();
        let mut at = 0;
        while let Some(h) = q.head(at) {
            out.push(h.id[0]);
            at += h.len;
        }
        out
    }

    fn stored(q: Queue, closed: bool, written: f64) -> Stored {
        Stored {
            closed,
            written,
            queue: q,
        }
    }

    #[test]
    fn queues_round_trip_and_damaged_ones_are_refused() {
        let mut q = queue(&[1, 2], 2);
        // Stored events are read back neither in flight nor held back.
        q.reset(Reset::Stored);
        let s = stored(q, true, 1_700_000_000_123.0);
        let bytes = s.encode();
        let record = s.queue.head(0).unwrap().len;
        assert_eq!(Stored::decode(&bytes), Some(s));
        for cut in 0..bytes.len() {
            // The header ends at byte 10, the first record at 10 + its length: cut there, a
            // queue is a shorter one.
            if cut != 10 && cut != 10 + record {
                assert_eq!(Stored::decode(&bytes[..cut]), None, "cut at {cut}");
            }
        }
        let mut other = bytes.clone();
        other[0] = 2;
        assert_eq!(Stored::decode(&other), None, "another format");
    }

    #[test]
    fn the_lease_excludes_other_tabs_until_it_expires() {
        let mut s = Mem::default();
        assert!(lock(&mut s, b"pz_q_a", 1000.0));
        assert!(!lock(&mut s, b"pz_q_b", 1000.0 + LOCK_MS - 1.0));
        assert!(lock(&mut s, b"pz_q_a", 2000.0));
        assert!(lock(&mut s, b"pz_q_b", 2000.0 + LOCK_MS + 1.0));
        // Adopting takes the lease and gives it back.
        assert!(
            adopt(&mut s, b"pz_q_c", 2000.0).is_empty(),
            "b holds the lease"
        );
        s.remove(LOCK_KEY);
        adopt(&mut s, b"pz_q_c", 2000.0);
        assert_eq!(s.get(LOCK_KEY), None);
    }

    #[test]
    fn only_queues_of_gone_tabs_are_adopted_and_only_once() {
        let mut s = Mem::default();
        let now = 100_000_000.0;
        save(
            &mut s,
            b"pz_q_live",
            &stored(queue(&[1, 2], 2), false, now - 1000.0),
        );
        save(
            &mut s,
            b"pz_q_closed",
            &stored(queue(&[3], 2), true, now - 1000.0),
        );
        let stale = stored(queue(&[4], 2), false, now - STALE_MS - 1.0);
        save(&mut s, b"pz_q_stale", &stale);
        s.set(b"pz_q_junk", b"x");
        s.set(b"other", b"kept");

        // Another page holds the lease: nothing is adopted.
        assert!(lock(&mut s, b"pz_q_busy", now));
        assert!(adopt(&mut s, b"pz_q_new", now).is_empty());
        s.remove(LOCK_KEY);

        let got = adopt(&mut s, b"pz_q_new", now);
        assert_eq!(ids(&got), [3, 4]);
        assert_eq!(s.keys_list(), [&b"other"[..], b"pz_q_live"]);
        assert!(adopt(&mut s, b"pz_q_newer", now).is_empty());
    }

    #[test]
    fn adopted_events_are_neither_in_flight_nor_held_back() {
        let mut s = Mem::default();
        let mut q = queue(&[1, 2], 2);
        let mut h = q.head(0).unwrap();
        h.hold = 9e15;
        q.set(0, &h);
        save(&mut s, b"pz_q_gone", &stored(q, true, 0.0));
        let got = adopt(&mut s, b"pz_q_new", 1.0);
        let h = got.head(0).unwrap();
        assert_eq!((h.seq, h.hold), (0, 0.0));
        assert!(got.stats(1.0).sendable);
    }

    #[test]
    fn purge_removes_denied_events_from_other_tabs() {
        let mut s = Mem::default();
        save(&mut s, b"pz_q_a", &stored(queue(&[1, 2], 2), false, 0.0));
        let mut b = queue(&[3], 1);
        b.0.extend_from_slice(&queue(&[4], 2).0);
        save(&mut s, b"pz_q_b", &stored(b, false, 0.0));
        save(&mut s, b"pz_q_own", &stored(queue(&[5], 2), false, 0.0));
        purge(&mut s, b"pz_q_own", 2);
        assert_eq!(s.keys_list(), [&b"pz_q_b"[..], b"pz_q_own"]);
        let left = Stored::decode(&s.get(b"pz_q_b").unwrap()).unwrap();
        assert_eq!(ids(&left.queue), [3]);
        assert!(save(
            &mut s,
            b"pz_q_b",
            &stored(Queue::default(), false, 0.0)
        ));
        assert_eq!(s.keys_list(), [&b"pz_q_own"[..]]);
    }
}
