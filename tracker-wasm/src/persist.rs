//! localStorage: the keys, the stored form of a queue of sealed batches, and how tabs share
//! them.
//!
//! Each tab stores its unsent events under its own key (`pz_q_<tab id>`), so two tabs never
//! overwrite each other's queue and never send each other's events. A tab's key says when it
//! was last written and whether the tab has gone (`pagehide`). A page that starts adopts the
//! keys of tabs that have gone, or have not written for [`STALE_MS`] (a crashed or discarded
//! tab), under a lease (`pz_l`, expiring after [`LOCK_MS`]) so that two pages starting at
//! once do not adopt, and send, the same events.

use alloc::string::String;
use alloc::vec::Vec;

use crate::queue::Sealed;
use crate::text;

/// The anonymous id (only while analytics or personalization is granted).
pub const ANON_KEY: &str = "pz_a";
/// The user id (same rule).
pub const USER_KEY: &str = "pz_u";
/// The session (same rule).
pub const SESSION_KEY: &str = "pz_s";
/// The visitor's consent decisions: remembering a choice is strictly necessary.
pub const CONSENT_KEY: &str = "pz_c";
/// The prefix of each tab's queue key.
pub const QUEUE_PREFIX: &str = "pz_q_";
/// The adoption lease: `<tab id>.<expiry ms>`.
pub const LOCK_KEY: &str = "pz_l";
/// How long the lease lasts (ms).
pub const LOCK_MS: f64 = 5000.0;
/// A queue key not written for this long belongs to a tab that is gone (ms). Live tabs
/// rewrite theirs at least every [`REFRESH_MS`].
pub const STALE_MS: f64 = 10.0 * 60.0 * 1000.0;
/// How often a tab with unsent events rewrites its key, to show it is alive (ms).
pub const REFRESH_MS: f64 = 60.0 * 1000.0;

const FORMAT: u8 = 2;

/// Key-value storage with the semantics of `window.localStorage`.
pub trait Storage {
    /// The value at `key`.
    fn get(&self, key: &str) -> Option<String>;
    /// Stores `value` at `key`; `false` when the browser refused (quota, disabled).
    fn set(&mut self, key: &str, value: &str) -> bool;
    /// Removes `key`.
    fn remove(&mut self, key: &str);
    /// Every key.
    fn keys(&self) -> Vec<String>;
}

/// The queue key of tab `tab`.
pub fn queue_key(tab: &str) -> String {
    let mut k = String::from(QUEUE_PREFIX);
    k.push_str(tab);
    k
}

/// The header of a stored queue.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Header {
    /// The tab has gone (`pagehide`).
    pub closed: bool,
    /// When it was written (Unix ms).
    pub written: f64,
}

/// Writes sealed batches, but those needing a purpose in `skip`, in the stored form:
/// Latin-1 text of `[format][closed][written]` then `[need][count][length][bytes]` per
/// batch (varints).
pub fn encode_queue(batches: &[Sealed], skip: u8, header: Header) -> String {
    let mut w = Vec::new();
    w.push(FORMAT);
    w.push(u8::from(header.closed));
    varint(&mut w, header.written as u64);
    for b in batches {
        if b.need & skip != 0 {
            continue;
        }
        w.push(b.need);
        varint(&mut w, u64::from(b.count));
        varint(&mut w, b.body.len() as u64);
        w.extend_from_slice(&b.body);
    }
    text::to_latin1(&w)
}

/// Reads a stored queue; `None` when it is not one (another version, or damaged).
pub fn decode_queue(stored: &str) -> Option<(Header, Vec<Sealed>)> {
    let bytes = text::from_latin1(stored)?;
    let mut r = Reader { b: &bytes, i: 0 };
    if r.u8()? != FORMAT {
        return None;
    }
    let header = Header {
        closed: r.u8()? != 0,
        written: r.uint()? as f64,
    };
    let mut out = Vec::new();
    while r.i < bytes.len() {
        let need = r.u8()?;
        let count = u32::try_from(r.uint()?).ok()?;
        let len = usize::try_from(r.uint()?).ok()?;
        let end = r.i.checked_add(len)?;
        out.push(Sealed::new(bytes.get(r.i..end)?.to_vec(), need, count));
        r.i = end;
    }
    Some((header, out))
}

fn varint(w: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        w.push(v as u8 | 0x80);
        v >>= 7;
    }
    w.push(v as u8);
}

struct Reader<'a> {
    b: &'a [u8],
    i: usize,
}

impl Reader<'_> {
    fn u8(&mut self) -> Option<u8> {
        let v = *self.b.get(self.i)?;
        self.i += 1;
        Some(v)
    }

    fn uint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Some(v);
            }
        }
        None
    }
}

/// Stores tab `tab`'s queue (or removes the key when there is nothing to keep). Returns
/// `false` when the browser refused to store it.
pub fn save(s: &mut impl Storage, tab: &str, batches: &[Sealed], header: Header) -> bool {
    let key = queue_key(tab);
    if batches.is_empty() {
        s.remove(&key);
        return true;
    }
    s.set(&key, &encode_queue(batches, 0, header))
}

/// Takes the lease for tab `tab` unless another live tab holds it.
pub fn lock(s: &mut impl Storage, tab: &str, now: f64) -> bool {
    if let Some(held) = s.get(LOCK_KEY)
        && let Some((owner, until)) = text::cut(&held, b'.')
    {
        let until = text::parse_u64(until).unwrap_or(0) as f64;
        if owner != tab && until > now {
            return false;
        }
    }
    let mut mine = String::from(tab);
    mine.push('.');
    text::push_u64(&mut mine, (now + LOCK_MS) as u64);
    s.set(LOCK_KEY, &mine) && s.get(LOCK_KEY).as_deref() == Some(mine.as_str())
}

/// Gives the lease back if tab `tab` holds it.
pub fn unlock(s: &mut impl Storage, tab: &str) {
    if let Some(held) = s.get(LOCK_KEY)
        && text::cut(&held, b'.').map(|(o, _)| o) == Some(tab)
    {
        s.remove(LOCK_KEY);
    }
}

/// Takes over the queues of tabs that have gone: returns their batches (oldest first per
/// tab) and removes their keys. Does nothing when another tab holds the lease.
pub fn adopt(s: &mut impl Storage, tab: &str, now: f64) -> Vec<Sealed> {
    let mut out = Vec::new();
    if !lock(s, tab, now) {
        return out;
    }
    let own = queue_key(tab);
    for key in s.keys() {
        if !key.starts_with(QUEUE_PREFIX) || key == own {
            continue;
        }
        let Some(stored) = s.get(&key) else { continue };
        match decode_queue(&stored) {
            Some((h, batches)) if h.closed || now - h.written > STALE_MS => {
                out.extend(batches);
                s.remove(&key);
            }
            Some(_) => {}
            None => s.remove(&key),
        }
    }
    unlock(s, tab);
    out
}

/// Removes batches needing a purpose in `denied` from every stored queue (this tab's and
/// any other's), so a denial purges what is stored for it.
pub fn purge(s: &mut impl Storage, denied: u8) {
    for key in s.keys() {
        if !key.starts_with(QUEUE_PREFIX) {
            continue;
        }
        let Some((header, batches)) = s.get(&key).as_deref().and_then(decode_queue) else {
            s.remove(&key);
            continue;
        };
        let mut kept = 0;
        for b in &batches {
            kept += usize::from(b.need & denied == 0);
        }
        if kept == 0 {
            s.remove(&key);
        } else if kept != batches.len() {
            s.set(&key, &encode_queue(&batches, denied, header));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::BTreeMap;
    use alloc::vec;

    /// localStorage as a map.
    #[derive(Default)]
    struct Mem(BTreeMap<String, String>);

    impl Storage for Mem {
        fn get(&self, key: &str) -> Option<String> {
            self.0.get(key).cloned()
        }
        fn set(&mut self, key: &str, value: &str) -> bool {
            self.0.insert(key.into(), value.into());
            true
        }
        fn remove(&mut self, key: &str) {
            self.0.remove(key);
        }
        fn keys(&self) -> Vec<String> {
            self.0.keys().cloned().collect()
        }
    }

    fn batch(id: u8, need: u8) -> Sealed {
        // Every byte value, so the Latin-1 step is exercised.
        let mut body: Vec<u8> = (0..=255).collect();
        body[0] = id;
        Sealed::new(body, need, u32::from(id) + 300)
    }

    fn header(closed: bool, written: f64) -> Header {
        Header { closed, written }
    }

    #[test]
    fn queues_round_trip() {
        let batches = vec![batch(1, 2), batch(2, 1), Sealed::new(Vec::new(), 10, 0)];
        let h = header(true, 1_700_000_000_123.0);
        let (back_h, back) = decode_queue(&encode_queue(&batches, 0, h)).unwrap();
        assert_eq!(back_h, h);
        assert_eq!(back, batches);
    }

    #[test]
    fn damaged_queues_are_refused() {
        let stored = encode_queue(&[batch(1, 2)], 0, header(false, 0.0));
        let bytes = text::from_latin1(&stored).unwrap();
        // Byte 3 is where the header ends: an empty queue is a valid one.
        for cut in (1..bytes.len()).filter(|&cut| cut != 3) {
            assert_eq!(
                decode_queue(&text::to_latin1(&bytes[..cut])),
                None,
                "cut at {cut}"
            );
        }
        assert_eq!(decode_queue("€"), None);
        assert_eq!(decode_queue("\u{1}"), None);
    }

    #[test]
    fn the_lease_excludes_other_tabs_until_it_expires() {
        let mut s = Mem::default();
        assert!(lock(&mut s, "a", 1000.0));
        assert!(!lock(&mut s, "b", 1000.0 + LOCK_MS - 1.0));
        assert!(lock(&mut s, "a", 2000.0));
        unlock(&mut s, "b");
        assert!(s.get(LOCK_KEY).is_some());
        unlock(&mut s, "a");
        assert!(lock(&mut s, "b", 2000.0));
        assert!(lock(&mut s, "a", 2000.0 + LOCK_MS + 1.0));
    }

    #[test]
    fn only_queues_of_gone_tabs_are_adopted_and_only_once() {
        let mut s = Mem::default();
        let now = 100_000_000.0;
        save(&mut s, "live", &[batch(1, 2)], header(false, now - 1000.0));
        save(&mut s, "closed", &[batch(2, 2)], header(true, now - 1000.0));
        save(
            &mut s,
            "stale",
            &[batch(3, 2)],
            header(false, now - STALE_MS - 1.0),
        );
        s.set("pz_q_junk", "x");
        s.set("other", "kept");

        // Another page holds the lease: nothing is adopted.
        assert!(lock(&mut s, "busy", now));
        assert!(adopt(&mut s, "new", now).is_empty());
        unlock(&mut s, "busy");

        let got: Vec<u8> = adopt(&mut s, "new", now)
            .iter()
            .map(|b| b.body[0])
            .collect();
        assert_eq!(got, [2, 3]);
        assert_eq!(s.keys(), ["other", "pz_q_live"]);
        assert!(adopt(&mut s, "newer", now).is_empty());
    }

    #[test]
    fn purge_removes_denied_batches_from_every_tab() {
        let mut s = Mem::default();
        let h = header(false, 0.0);
        save(&mut s, "a", &[batch(1, 2), batch(2, 1)], h);
        save(&mut s, "b", &[batch(3, 6)], h);
        purge(&mut s, 2);
        assert_eq!(s.keys(), ["pz_q_a"]);
        let (_, left) = decode_queue(&s.get("pz_q_a").unwrap()).unwrap();
        assert_eq!(left, [batch(2, 1)]);
        assert!(save(&mut s, "a", &[], h));
        assert!(s.keys().is_empty());
    }
}
