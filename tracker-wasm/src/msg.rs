//! The loader's messages: one line of text per call, so a single wasm export (and the
//! least JavaScript glue) carries the whole API.
//!
//! A message is fields separated by U+001F; its first field is the type. Lists inside a
//! field separate their elements by U+001E and an element's parts by U+001D (the loader
//! replaces those three characters in page data by spaces). Numbers are decimal integers,
//! or `h` and the 16 hex digits of an IEEE 754 double for the rest.
//!
//! | type | fields |
//! | --- | --- |
//! | `i` init | writeKey, endpoint, referrer, locale, timezone, then the numbers of [`Config::new`] |
//! | `e` event | kind (wire value), ts, name, userId, orderId, revenue, currency, properties (`key`, `s`/`n`/`b`, value), items (productId, category, price, quantity, name) |
//! | `n` navigation | href, utm_source, utm_medium, utm_campaign, utm_term, utm_content |
//! | `c` `pz.consent` | granted bits, denied bits |
//! | `T` TCF | purpose bits |
//! | `g` / `G` Consent Mode default / update | granted key bits, denied key bits |
//! | `k` click | the `data-track` name |
//! | `d` answer | seq, HTTP status (0: network error), Retry-After |
//! | `t` timer, `h` hidden, `v` visible, `x` pagehide, `s` consent changed in another tab, `f` flush, `r` reset | none |

use alloc::vec::Vec;
use wire::EventKind;
use wire::decode::{MAX_ITEMS, MAX_PROPERTIES};
use wire::encode::{EventRef, ItemRef, ValueRef};

use crate::api::{self, Config};
use crate::consent::Update;
use crate::text;
use crate::tracker::Signal;

/// A parsed message, borrowing its text.
#[derive(Debug, Clone, PartialEq)]
pub enum Msg<'a> {
    /// `pz.init` with valid settings.
    Init(Config),
    /// Anything for [`crate::Tracker::signal`].
    Signal(Signal<'a>),
    /// The answer to request `seq`: status and `Retry-After`.
    Done(u32, u16, Option<&'a str>),
}

/// An event as the loader sends it: every field but the lists checked and borrowed, the
/// lists still in message form, so nothing is copied before [`Ev::piece`] encodes it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Ev<'a> {
    /// The event without its lists (the tracker sets id, time and purpose).
    pub head: EventRef<'a>,
    /// Properties: `key` U+001D `s` / `n` / `b` U+001D value, U+001E between them.
    pub properties: &'a str,
    /// Items: productId, category, price, quantity, name separated by U+001D, U+001E
    /// between them.
    pub items: &'a str,
}

impl Ev<'_> {
    /// The event encoded (`wire::encode::event_ref`), with the usable properties and items
    /// up to the collector's limits.
    pub fn piece(&self) -> Vec<u8> {
        let mut properties = [("", ValueRef::Bool(false)); MAX_PROPERTIES];
        let mut n = 0;
        for p in text::fields(self.properties, 0x1e).filter_map(api::property) {
            if n == MAX_PROPERTIES {
                break;
            }
            properties[n] = p;
            n += 1;
        }
        let mut items = [ItemRef::default(); MAX_ITEMS];
        let mut m = 0;
        for i in text::fields(self.items, 0x1e).filter_map(api::item) {
            if m == MAX_ITEMS {
                break;
            }
            items[m] = i;
            m += 1;
        }
        wire::encode::event_ref(&EventRef {
            properties: &properties[..n],
            items: &items[..m],
            ..self.head
        })
    }
}

/// A number field: a decimal integer or `h` + 16 hex digits of a double; NaN otherwise.
pub fn number(s: &str) -> f64 {
    let b = s.as_bytes();
    match b.first() {
        Some(b'h') if b.len() == 17 => {
            let mut bits = 0u64;
            for &c in &b[1..] {
                let d = match c {
                    b'0'..=b'9' => c - b'0',
                    b'a'..=b'f' => c - b'a' + 10,
                    _ => return f64::NAN,
                };
                bits = bits << 4 | u64::from(d);
            }
            f64::from_bits(bits)
        }
        Some(b'-') => -number_u(s.get(1..)),
        _ => number_u(Some(s)),
    }
}

fn number_u(digits: Option<&str>) -> f64 {
    digits
        .and_then(crate::text::parse_u64)
        .map_or(f64::NAN, |n| n as f64)
}

/// `None` for an empty field.
pub fn opt(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// The most fields a message has (`init`: 6 strings and 22 numbers).
const MAX_FIELDS: usize = 32;

/// Splits `s` at `sep` into at most `N` fields; missing ones are empty.
pub fn split<const N: usize>(s: &str, sep: u8) -> [&str; N] {
    let mut out = [""; N];
    for (slot, f) in out.iter_mut().zip(text::fields(s, sep)) {
        *slot = f;
    }
    out
}

/// Parses one message; `None` when it is not one.
pub fn parse(msg: &str) -> Option<Msg<'_>> {
    let f: [&str; MAX_FIELDS] = split(msg, 0x1f);
    let n = |i: usize| number(f[i]);
    let bits = |i| {
        let v = n(i);
        if (0.0..65536.0).contains(&v) {
            v as u16
        } else {
            0
        }
    };
    let signal = match f[0].as_bytes() {
        b"i" => {
            let mut numbers = [f64::NAN; MAX_FIELDS - 6];
            for (v, s) in numbers.iter_mut().zip(&f[6..]) {
                *v = number(s);
            }
            let cfg = Config::new(f[1], f[2], f[3], opt(f[4]), opt(f[5]), &numbers)?;
            return Some(Msg::Init(cfg));
        }
        b"d" => return Some(Msg::Done(n(1) as u32, n(2) as u16, opt(f[3]))),
        b"e" => Signal::Event(event(&f)?),
        b"n" => Signal::Navigate(
            f[1],
            [opt(f[2]), opt(f[3]), opt(f[4]), opt(f[5]), opt(f[6])],
        ),
        b"c" => Signal::Consent(Update {
            grant: bits(1) as u8,
            deny: bits(2) as u8 & !(bits(1) as u8),
        }),
        b"T" => Signal::Tcf(bits(1)),
        [g @ (b'g' | b'G')] => Signal::Gcm(*g == b'G', bits(1) as u8, bits(2) as u8),
        b"k" => Signal::Click(f[1]),
        b"t" => Signal::Tick,
        b"h" => Signal::Hidden,
        b"v" => Signal::Visible,
        b"x" => Signal::PageHide,
        b"s" => Signal::ConsentSync,
        b"f" => Signal::Flush,
        b"r" => Signal::Reset,
        _ => return None,
    };
    Some(Msg::Signal(signal))
}

/// An event from the page, checked; the tracker adds its id and purpose (and the time, when
/// the page gave none: 0).
fn event<'a>(f: &[&'a str; MAX_FIELDS]) -> Option<Ev<'a>> {
    Some(Ev {
        head: EventRef {
            kind: EventKind::from_u8(number(f[1]) as u8)?,
            timestamp_ms: api::int(number(f[2])).filter(|t| *t > 0).unwrap_or(0),
            name: api::text(f[3]),
            user_id: api::id(f[4]),
            order_id: api::id(f[5]),
            revenue: api::int(number(f[6])).unwrap_or(0),
            currency: api::text(f[7]),
            ..EventRef::default()
        },
        properties: f[8],
        items: f[9],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;
    use alloc::string::String;
    use wire::{Item, Property, Value};

    /// What the collector reads from `ev`'s piece.
    fn decoded(ev: &Ev<'_>) -> wire::Event {
        let mut ev = *ev;
        ev.head.message_id = [1; 16];
        let ctx = wire::encode::context(&wire::Context::default());
        let body = wire::encode::assemble("k", 1, 0, &ctx, [ev.piece().as_slice()].into_iter());
        let mut batch = wire::decode(&body, &wire::Limits::default()).unwrap();
        batch.events.remove(0)
    }

    #[test]
    fn numbers_are_integers_or_double_bits() {
        assert_eq!(number("42"), 42.0);
        assert_eq!(number("-7"), -7.0);
        assert_eq!(number("h3ff8000000000000"), 1.5);
        assert!(number("").is_nan());
        assert!(number("1.5").is_nan());
        assert!(number("hzz").is_nan());
    }

    #[test]
    fn events_carry_properties_and_items() {
        let msg = "e\u{1f}9\u{1f}1700000000000\u{1f}\u{1f}\u{1f}o-1\u{1f}5998\u{1f}EUR\u{1f}\
                   coupon\u{1d}s\u{1d}SPRING\u{1e}gift\u{1d}b\u{1d}1\u{1e}rate\u{1d}n\u{1d}h3ff8000000000000\u{1f}\
                   sku-1\u{1d}shoes\u{1d}2999\u{1d}2\u{1d}Runner\u{1e}\u{1d}\u{1d}1\u{1d}1\u{1d}";
        let Some(Msg::Signal(Signal::Event(ev))) = parse(msg) else {
            panic!("not an event");
        };
        let e = decoded(&ev);
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
            ]
        );
        // The second item has no product id and is left out.
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
        let props: Vec<String> = (0..70).map(|i| format!("p{i}\u{1d}n\u{1d}{i}")).collect();
        let items: Vec<String> = (0..120)
            .map(|i| format!("sku-{i}\u{1d}\u{1d}1\u{1d}1\u{1d}"))
            .collect();
        let ev = Ev {
            properties: &props.join("\u{1e}"),
            items: &items.join("\u{1e}"),
            ..Ev::default()
        };
        let e = decoded(&ev);
        assert_eq!(e.properties.len(), MAX_PROPERTIES);
        assert_eq!(e.properties[63].key, "p63");
        assert_eq!(e.items.len(), MAX_ITEMS);
    }

    #[test]
    fn signals_and_answers_parse() {
        fn sig(m: &str) -> Signal<'_> {
            match parse(m) {
                Some(Msg::Signal(s)) => s,
                other => panic!("{m:?}: {other:?}"),
            }
        }
        assert_eq!(
            sig("c\u{1f}6\u{1f}10"),
            Signal::Consent(Update { grant: 6, deny: 8 })
        );
        assert_eq!(sig("G\u{1f}1\u{1f}4"), Signal::Gcm(true, 1, 4));
        assert_eq!(sig("T\u{1f}898"), Signal::Tcf(898));
        assert_eq!(sig("k\u{1f}hero-cta"), Signal::Click("hero-cta"));
        assert_eq!(
            sig("n\u{1f}https://shop.example/?utm_source=x\u{1f}x\u{1f}\u{1f}\u{1f}\u{1f}"),
            Signal::Navigate(
                "https://shop.example/?utm_source=x",
                [Some("x"), None, None, None, None]
            )
        );
        assert_eq!(sig("t"), Signal::Tick);
        assert_eq!(
            parse("d\u{1f}3\u{1f}503\u{1f}30"),
            Some(Msg::Done(3, 503, Some("30")))
        );
        assert_eq!(parse("d\u{1f}3\u{1f}0\u{1f}"), Some(Msg::Done(3, 0, None)));
        assert_eq!(parse("?"), None);
        assert_eq!(parse("e\u{1f}99"), None);
    }

    #[test]
    fn init_reads_the_settings() {
        let msg = "i\u{1f}demo\u{1f}/v1/fb\u{1f}https://ref.example/\u{1f}en-GB\u{1f}Europe/Berlin\u{1f}\
                   20\u{1f}500\u{1f}30\u{1f}1\u{1f}2\u{1f}0\u{1f}0\u{1f}1\u{1f}1280\u{1f}800\u{1f}-1\u{1f}3";
        let Some(Msg::Init(cfg)) = parse(msg) else {
            panic!("not init");
        };
        assert_eq!(
            (cfg.write_key.as_str(), cfg.endpoint.as_str()),
            ("demo", "/v1/fb")
        );
        assert_eq!(cfg.referrer, "https://ref.example/");
        assert_eq!(cfg.timezone.as_deref(), Some("Europe/Berlin"));
        assert_eq!((cfg.policy.flush_at, cfg.policy.interval_ms), (20, 500.0));
        assert_eq!(cfg.session_timeout, 30.0 * 60_000.0);
        assert!(cfg.track_clicks && cfg.visible && !cfg.gpc);
        assert_eq!(cfg.defaults, Update { grant: 2, deny: 0 });
        assert_eq!(cfg.screen, (1280, 800));
        assert_eq!(cfg.purposes[1], wire::Purpose::Marketing);
        assert_eq!(parse("i\u{1f}\u{1f}/v1/fb"), None);
    }
}
