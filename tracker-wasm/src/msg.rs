//! The loader's messages: one binary record per call, so a single wasm export taking one
//! number (the message's length) carries the whole API with the least JavaScript glue.
//!
//! A message is a sequence of fields of two kinds, written by the loader (`js/loader.js`):
//! a *number* is the 8 bytes of a little-endian IEEE 754 double (NaN for none); a *text* is
//! a 2-byte little-endian length, then that many bytes of UTF-8. The loader encodes text with
//! `TextEncoder.encodeInto` into at most 1,024 bytes (4,096 for URLs), which cuts it at a
//! character boundary to the collector's limit, so the Rust side neither validates UTF-8 nor
//! cuts anything. The first field is the message type, a number:
//!
//! | type | fields |
//! | --- | --- |
//! | 1 init | texts writeKey, referrer, locale, timezone; numbers flushAt, flushIntervalMs, sessionTimeoutMin, trackClicks (1: yes), granted purposes, denied purposes, Global Privacy Control (1: on), visible (1: yes), screen width, screen height, then the purpose of each event kind by wire value (NaN: the kind's default) |
//! | 2 event | numbers kind (wire value), time (Unix ms); texts name, userId, orderId; number revenue; text currency; number of properties, each a text key, a number type (1 string, 2 whole number, 3 other number, 4 boolean) and the value (text for a string, number otherwise); number of items, each texts productId, category, numbers price, quantity, text name |
//! | 3 navigation | texts href, utm_source, utm_medium, utm_campaign, utm_term, utm_content |
//! | 4 `pz.consent` | numbers granted bits, denied bits |
//! | 5 TCF | number: bit `n` set when TCF purpose `n` has consent |
//! | 6 / 7 Consent Mode default / update | numbers granted key bits, denied key bits |
//! | 8 click | text: the `data-track` name |
//! | 9 answer | numbers seq, HTTP status (0: network error), Retry-After in seconds (NaN: none) |
//! | 10 timer, 11 hidden, 12 visible, 13 pagehide, 14 consent changed in another tab, 15 flush, 16 reset, 17 state for `pz.debug()` | none |
//!
//! Missing fields read as NaN or empty text. The loader checks every argument of the page
//! once (types, ids, whole numbers, at most 64 properties and 100 items) and leaves out what
//! is unusable, with a warning; nothing here checks them again.
//!
//! This module knows the format: the type numbers and, for the messages with more than a
//! field or two, a function that reads them. [`crate::Tracker::handle`] reads each message
//! straight into the call that applies it, without an enum of messages in between: a parsed
//! event is over a hundred bytes, and moving it through such an enum cost about 0.35 KB of
//! gzipped wasm in copies.

use alloc::vec::Vec;
use wire::decode::{MAX_EVENTS, MAX_ITEMS, MAX_PROPERTIES};
use wire::encode::{EventPiece, EventRef, ItemRef, ValueRef};
use wire::{EventKind, Purpose};

use crate::batch::Policy;
use crate::consent::Update;
use crate::session;

/// `pz.init`: [`init`].
pub const INIT: u32 = 1;
/// An event from the page: [`event`].
pub const EVENT: u32 = 2;
/// Start, `pushState`, `replaceState`, `popstate`, `hashchange` or `pz.page()`: the URL and
/// its UTM parameters, which may have changed ([`navigation`]).
pub const NAVIGATION: u32 = 3;
/// `pz.consent(...)`: the visitor's decision ([`update`]).
pub const CONSENT: u32 = 4;
/// A TCF decision: bit `n` set when TCF purpose `n` has consent.
pub const TCF: u32 = 5;
/// A Consent Mode `default` command: the granted and denied key bits ([`bits`]; see
/// [`crate::signals::GCM_KEYS`]).
pub const GCM_DEFAULT: u32 = 6;
/// A Consent Mode `update` command, as [`GCM_DEFAULT`].
pub const GCM_UPDATE: u32 = 7;
/// A click on an element with `data-track="<name>"`.
pub const CLICK: u32 = 8;
/// The collector answered a request ([`answer`]).
pub const ANSWER: u32 = 9;
/// The timer fired.
pub const TICK: u32 = 10;
/// `visibilitychange` to hidden.
pub const HIDDEN: u32 = 11;
/// `visibilitychange` to visible, or `pageshow` from the back-forward cache.
pub const VISIBLE: u32 = 12;
/// `pagehide`: the page is going away.
pub const PAGEHIDE: u32 = 13;
/// Another tab changed the stored consent decisions.
pub const CONSENT_SYNC: u32 = 14;
/// `pz.flush()`.
pub const FLUSH: u32 = 15;
/// `pz.reset()`: a new anonymous id and session, no user id.
pub const RESET: u32 = 16;
/// `pz.debug()` asks for the state.
pub const DEBUG: u32 = 17;

/// A message being read, front to back.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Reader<'a>(pub &'a [u8]);

impl<'a> Reader<'a> {
    /// The next number; NaN past the end.
    pub fn num(&mut self) -> f64 {
        match self.0.split_first_chunk::<8>() {
            Some((n, rest)) => {
                self.0 = rest;
                f64::from_le_bytes(*n)
            }
            None => {
                self.0 = &[];
                f64::NAN
            }
        }
    }

    /// The next number as a small whole number (saturating; NaN: 0). Not inlined: each
    /// float-to-integer conversion is a dozen instructions.
    #[inline(never)]
    pub fn int(&mut self) -> u32 {
        self.num() as u32
    }

    /// The next number as a whole number (saturating; NaN: 0), not inlined either.
    #[inline(never)]
    pub fn i64(&mut self) -> i64 {
        self.num() as i64
    }

    /// The next number, if it is from `lo` to `hi`.
    pub fn within(&mut self, lo: f64, hi: f64) -> Option<f64> {
        let v = self.num();
        (v >= lo && v <= hi).then_some(v)
    }

    /// The next text; empty past the end.
    pub fn text(&mut self) -> &'a [u8] {
        let (text, rest) = self
            .0
            .split_first_chunk::<2>()
            .and_then(|(n, rest)| rest.split_at_checked(usize::from(u16::from_le_bytes(*n))))
            .unwrap_or_default();
        self.0 = rest;
        text
    }

    /// The next text, `None` when empty.
    pub fn opt(&mut self) -> Option<&'a [u8]> {
        let t = self.text();
        (!t.is_empty()).then_some(t)
    }
}

/// Settings from `pz.init` and facts about the page.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The site's write key.
    pub write_key: Vec<u8>,
    /// Batching thresholds.
    pub policy: Policy,
    /// Session idle timeout (ms).
    pub session_timeout: f64,
    /// Whether clicks on `[data-track]` elements are events.
    pub track_clicks: bool,
    /// Declared purpose per event kind (indexed by the kind's wire value).
    pub purposes: [Purpose; 12],
    /// The site's consent defaults.
    pub defaults: Update,
    /// `navigator.globalPrivacyControl === true`.
    pub gpc: bool,
    /// `document.visibilityState === 'visible'`.
    pub visible: bool,
    /// `document.referrer`.
    pub referrer: Vec<u8>,
    /// `navigator.language`.
    pub locale: Vec<u8>,
    /// `Intl.DateTimeFormat().resolvedOptions().timeZone`.
    pub timezone: Vec<u8>,
    /// `screen.width`, `screen.height`.
    pub screen: (u16, u16),
}

impl Config {
    /// The defaults, before `init` is read.
    pub const DEFAULT: Config = Config {
        write_key: Vec::new(),
        policy: Policy::DEFAULT,
        session_timeout: session::DEFAULT_TIMEOUT_MS,
        track_clicks: false,
        purposes: LEAST_PURPOSES,
        defaults: Update { grant: 0, deny: 0 },
        gpc: false,
        visible: false,
        referrer: Vec::new(),
        locale: Vec::new(),
        timezone: Vec::new(),
        screen: (0, 0),
    };
}

impl Default for Config {
    fn default() -> Config {
        Config::DEFAULT
    }
}

/// An event as the loader sends it: the fields borrowed, the lists still in message form,
/// so nothing is copied before [`Ev::piece`] encodes it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Ev<'a> {
    /// The event (the tracker sets id, time and purpose). Its properties are used when
    /// `lists` is empty: the tracker's own events; its items never.
    pub head: EventRef<'a>,
    /// The properties and items, in message form.
    pub lists: &'a [u8],
}

impl Ev<'_> {
    /// The event encoded (`wire::encode::EventPiece`), its lists streamed from the message
    /// (or taken from `head` for the tracker's own events).
    pub fn piece(&self) -> Vec<u8> {
        let mut r = Reader(self.lists);
        let e = &self.head;
        let from_message = !self.lists.is_empty();
        let n = if from_message {
            (r.int() as usize).min(MAX_PROPERTIES)
        } else {
            e.properties.len()
        };
        let mut p = EventPiece::new(e, n);
        for (key, value) in e.properties {
            p.property(key, *value);
        }
        for _ in 0..n * usize::from(from_message) {
            let key = r.text();
            let value = match r.int() {
                1 => ValueRef::String(r.text()),
                2 => ValueRef::Int(r.i64()),
                3 => ValueRef::Float(r.num()),
                _ => ValueRef::Bool(r.num() != 0.0),
            };
            p.property(key, value);
        }
        let m = (r.int() as usize).min(MAX_ITEMS);
        p.items(m);
        for _ in 0..m {
            // Struct fields are evaluated in the order written: the message's order.
            p.item(&ItemRef {
                product_id: r.text(),
                category: r.opt(),
                price: r.i64(),
                quantity: r.int(),
                name: r.opt(),
            });
        }
        p.finish()
    }
}

/// The type of a message, read first.
pub fn kind(r: &mut Reader<'_>) -> u32 {
    r.int()
}

/// A navigation: the URL (`location.href`) and its UTM parameters (empty: none).
pub fn navigation<'a>(r: &mut Reader<'a>) -> (&'a [u8], [&'a [u8]; 5]) {
    (r.text(), [r.text(), r.text(), r.text(), r.text(), r.text()])
}

/// A consent decision: purposes granted, then denied (a purpose in both is granted).
pub fn update(r: &mut Reader<'_>) -> Update {
    let (grant, deny) = bits(r);
    Update {
        grant,
        deny: deny & !grant,
    }
}

/// Two bit masks.
pub fn bits(r: &mut Reader<'_>) -> (u8, u8) {
    (r.int() as u8, r.int() as u8)
}

/// An answer: the request's number, the HTTP status (0: network error) and `Retry-After`
/// in seconds (NaN: none).
pub fn answer(r: &mut Reader<'_>) -> (u32, u16, f64) {
    (r.int(), r.int() as u16, r.num())
}

/// The settings, read into `c` (which holds the defaults): numbers out of range keep them.
/// In place, because moving a `Config` around costs more code than reading it.
pub fn init(r: &mut Reader<'_>, c: &mut Config) {
    c.write_key.extend_from_slice(r.text());
    c.referrer.extend_from_slice(r.text());
    c.locale.extend_from_slice(r.text());
    c.timezone.extend_from_slice(r.text());
    if let Some(v) = r.within(1.0, MAX_EVENTS as f64) {
        c.policy.flush_at = v as usize;
    }
    if let Some(v) = r.within(0.0, 3.6e6) {
        c.policy.interval_ms = v;
    }
    if let Some(v) = r.within(0.01, 1e6) {
        c.session_timeout = v * 60_000.0;
    }
    c.track_clicks = r.num() == 1.0;
    let grant = r.int() as u8 & 15;
    c.defaults = Update {
        grant,
        deny: r.int() as u8 & 15 & !grant,
    };
    c.gpc = r.num() == 1.0;
    c.visible = r.num() == 1.0;
    c.screen = (r.int().min(65535) as u16, r.int().min(65535) as u16);
    for (i, p) in c.purposes.iter_mut().enumerate() {
        let v = r.num();
        if v >= 0.0
            && i != EventKind::ConsentChange as usize
            && let Some(set) = Purpose::from_u8(v as u8)
        {
            *p = set;
        }
    }
}

/// Each event kind's least purpose, by wire value: the default declared purposes.
const LEAST_PURPOSES: [Purpose; 12] = {
    let mut p = [Purpose::Necessary; 12];
    let mut i = 0;
    while i < 12 {
        if let Some(kind) = EventKind::from_u8(i as u8) {
            p[i] = kind.least_purpose();
        }
        i += 1;
    }
    p
};

/// An event from the page (without id and purpose; time 0: now); `None` for an unknown kind.
pub fn event<'a>(r: &mut Reader<'a>) -> Option<Ev<'a>> {
    let kind = EventKind::from_u8(r.int() as u8)?;
    let ts = r.num();
    // Struct fields are evaluated in the order written: the message's order.
    let head = EventRef {
        kind,
        timestamp_ms: if ts > 0.0 { ts as i64 } else { 0 },
        name: r.opt(),
        user_id: r.opt(),
        order_id: r.opt(),
        revenue: r.i64(),
        currency: r.opt(),
        ..EventRef::EMPTY
    };
    Some(Ev { head, lists: r.0 })
}

/// Writes messages as the loader does, for tests.
#[cfg(test)]
pub(crate) mod write {
    use alloc::vec::Vec;

    /// A message under construction.
    #[derive(Default)]
    pub struct W(pub Vec<u8>);

    impl W {
        /// A message of type `kind`.
        pub fn new(kind: u32) -> W {
            W::default().num(f64::from(kind))
        }
        /// Adds a number.
        pub fn num(mut self, n: f64) -> W {
            self.0.extend_from_slice(&n.to_le_bytes());
            self
        }
        /// Adds a text.
        pub fn text(mut self, t: &str) -> W {
            self.0.extend_from_slice(&(t.len() as u16).to_le_bytes());
            self.0.extend_from_slice(t.as_bytes());
            self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::write::W;
    use super::*;
    use alloc::string::String;
    use wire::{Item, Property, Value};

    /// What the collector reads from `ev`'s piece.
    fn decoded(ev: &Ev<'_>) -> wire::Event {
        let mut ev = *ev;
        ev.head.message_id = [1; 16];
        let ctx = wire::encode::context(&wire::Context::default());
        let body = wire::encode::assemble(b"k", 1, 0, &ctx, [ev.piece().as_slice()].into_iter());
        let mut batch = wire::decode(&body, &wire::Limits::default()).unwrap();
        batch.events.remove(0)
    }

    fn event_of(w: &W) -> Ev<'_> {
        let mut r = Reader(&w.0);
        assert_eq!(kind(&mut r), EVENT);
        event(&mut r).expect("an event")
    }

    #[test]
    fn missing_fields_read_as_nan_or_empty() {
        let mut r = Reader(&[1, 2, 3]);
        assert!(r.num().is_nan());
        assert_eq!(r.text(), b"");
        let mut r = Reader(&[5, 0, b'a', b'b']);
        assert_eq!(r.text(), b"", "a text longer than the message");
        assert_eq!(r.opt(), None);
    }

    #[test]
    fn events_carry_properties_and_items() {
        let w = W::new(EVENT)
            .num(9.0)
            .num(1_700_000_000_000.0)
            .text("")
            .text("")
            .text("o-1")
            .num(5998.0)
            .text("EUR")
            .num(4.0)
            .text("coupon")
            .num(1.0)
            .text("SPRING")
            .text("gift")
            .num(4.0)
            .num(1.0)
            .text("rate")
            .num(3.0)
            .num(1.5)
            .text("n")
            .num(2.0)
            .num(-3.0)
            .num(1.0)
            .text("sku-1")
            .text("shoes")
            .num(2999.0)
            .num(2.0)
            .text("Runner");
        let e = decoded(&event_of(&w));
        assert_eq!(e.kind, EventKind::OrderCompleted);
        assert_eq!(e.timestamp_ms, 1_700_000_000_000);
        assert_eq!((e.name, e.user_id), (None, None));
        assert_eq!(e.order_id.as_deref(), Some("o-1"));
        assert_eq!((e.revenue, e.currency.as_deref()), (5998, Some("EUR")));
        let prop = |key: &str, value| Property {
            key: key.into(),
            value,
        };
        assert_eq!(
            e.properties,
            [
                prop("coupon", Value::String("SPRING".into())),
                prop("gift", Value::Bool(true)),
                prop("rate", Value::Float(1.5)),
                prop("n", Value::Int(-3)),
            ]
        );
        assert_eq!(
            e.items,
            [Item {
                product_id: "sku-1".into(),
                category: Some("shoes".into()),
                price: 2999,
                quantity: 2,
                name: Some("Runner".into())
            }]
        );
    }

    #[test]
    fn lists_stop_at_the_collector_limits() {
        let mut w = W::new(EVENT)
            .num(1.0)
            .num(0.0)
            .text("x")
            .text("")
            .text("")
            .num(0.0);
        w = w.text("").num(70.0);
        let keys: alloc::vec::Vec<String> = (0..70).map(|i| alloc::format!("p{i}")).collect();
        for (i, k) in keys.iter().enumerate() {
            w = w.text(k).num(2.0).num(i as f64);
        }
        let e = decoded(&event_of(&w));
        assert_eq!(e.properties.len(), MAX_PROPERTIES);
        assert_eq!(e.properties[63].key, "p63");
    }

    #[test]
    fn messages_are_read_field_by_field() {
        fn read<T>(w: W, f: impl FnOnce(&mut Reader<'_>) -> T) -> (u32, T) {
            let mut r = Reader(&w.0);
            (kind(&mut r), f(&mut r))
        }
        assert_eq!(
            read(W::new(CONSENT).num(6.0).num(10.0), update),
            (CONSENT, Update { grant: 6, deny: 8 })
        );
        assert_eq!(
            read(W::new(GCM_UPDATE).num(1.0).num(4.0), bits),
            (GCM_UPDATE, (1, 4))
        );
        let href = "https://shop.example/?utm_source=x";
        let nav = W::new(NAVIGATION).text(href).text("x");
        let mut r = Reader(&nav.0);
        assert_eq!(kind(&mut r), NAVIGATION);
        assert_eq!(
            navigation(&mut r),
            (href.as_bytes(), [&b"x"[..], b"", b"", b"", b""])
        );
        assert_eq!(
            read(W::new(ANSWER).num(3.0).num(503.0).num(30.0), answer),
            (ANSWER, (3, 503, 30.0))
        );
        let (_, (seq, status, retry_after)) = read(W::new(ANSWER).num(3.0).num(0.0), answer);
        assert!((seq, status) == (3, 0) && retry_after.is_nan());
        assert_eq!(kind(&mut Reader(&[])), 0, "no type");
        let unknown = W::new(EVENT).num(99.0);
        assert_eq!(
            event(&mut Reader(&unknown.0[8..])),
            None,
            "an unknown event kind"
        );
    }

    #[test]
    fn settings_are_read_with_defaults_for_bad_values() {
        let mut w = W::new(INIT)
            .text("demo")
            .text("https://ref.example/")
            .text("de-DE")
            .text("");
        for n in [5.0, -1.0, f64::NAN, 1.0, 2.0, 10.0, 1.0, 0.0, 1920.0, 1e9] {
            w = w.num(n);
        }
        for n in [f64::NAN, 3.0, -1.0, f64::NAN, 1.0, 0.0, f64::NAN] {
            w = w.num(n);
        }
        let mut r = Reader(&w.0);
        assert_eq!(kind(&mut r), INIT);
        let mut cfg = Config::DEFAULT;
        init(&mut r, &mut cfg);
        assert_eq!(cfg.write_key, b"demo");
        assert_eq!(cfg.referrer, b"https://ref.example/");
        assert_eq!(
            (cfg.locale.as_slice(), cfg.timezone.as_slice()),
            (&b"de-DE"[..], &b""[..])
        );
        assert_eq!(cfg.policy.flush_at, 5);
        assert_eq!(cfg.policy.interval_ms, 1000.0);
        assert_eq!(cfg.session_timeout, session::DEFAULT_TIMEOUT_MS);
        assert!(cfg.track_clicks && cfg.gpc && !cfg.visible);
        assert_eq!(cfg.defaults, Update { grant: 2, deny: 8 });
        // Screen sizes saturate.
        assert_eq!(cfg.screen, (1920, 65535));
        assert_eq!(cfg.purposes[EventKind::Page as usize], Purpose::Analytics);
        assert_eq!(cfg.purposes[EventKind::Track as usize], Purpose::Marketing);
        assert_eq!(
            cfg.purposes[EventKind::Identify as usize],
            Purpose::Analytics
        );
        // A consent change always needs only `necessary`.
        assert_eq!(
            cfg.purposes[EventKind::ConsentChange as usize],
            Purpose::Necessary
        );
        assert_eq!(
            cfg.purposes[EventKind::ProductViewed as usize],
            Purpose::Necessary
        );
        // Kinds the message does not name keep their defaults.
        assert_eq!(
            cfg.purposes[EventKind::EmailOpened as usize],
            Purpose::Marketing
        );
    }
}
