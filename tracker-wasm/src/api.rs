//! The loader's messages turned into Rust values: the `init` settings and event parts.
//!
//! The loader (`js/loader.js`) checks the page's arguments, prints one warning per distinct
//! problem, and passes what is usable as plain strings and numbers. These functions still
//! enforce the collector's limits, in UTF-8 bytes (which JavaScript does not count), so no
//! value can make the collector refuse a whole batch.

use alloc::string::String;

use wire::decode::MAX_STRING_BYTES;
use wire::encode::{ItemRef, ValueRef};
use wire::{EventKind, Purpose};

use crate::batch::Policy;
use crate::consent::Update;
use crate::session;
use crate::{msg, text};

/// The longest id (user, anonymous, product, order) the collector accepts, in bytes.
pub const MAX_ID_BYTES: usize = 256;

/// Settings from `pz.init` and facts about the page.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The site's write key.
    pub write_key: String,
    /// Where batches go.
    pub endpoint: String,
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
    pub referrer: String,
    /// `navigator.language`.
    pub locale: Option<String>,
    /// `Intl.DateTimeFormat().resolvedOptions().timeZone`.
    pub timezone: Option<String>,
    /// `screen.width`, `screen.height`.
    pub screen: (u16, u16),
}

impl Config {
    /// Settings from the loader: the strings, and `n` = `[flushAt, flushIntervalMs,
    /// sessionTimeoutMin, trackClicks, grantMask, denyMask, gpc, visible, screenWidth,
    /// screenHeight, purpose of kind 0, ..., purpose of kind 11]` (booleans as 0/1; a purpose
    /// as its wire value, -1 for the default). Values out of range fall back to the
    /// defaults; `None` without a write key or endpoint.
    pub fn new(
        write_key: &str,
        endpoint: &str,
        referrer: &str,
        locale: Option<&str>,
        timezone: Option<&str>,
        n: &[f64],
    ) -> Option<Config> {
        let num = |i: usize, lo: f64, hi: f64| n.get(i).copied().filter(|v| *v >= lo && *v <= hi);
        let flag = |i| num(i, 1.0, 1.0).is_some();
        let mask = |i| num(i, 0.0, 15.0).unwrap_or(0.0) as u8;
        let dim = |i| num(i, 0.0, 65535.0).unwrap_or(0.0) as u16;
        let mut policy = Policy::default();
        if let Some(v) = num(0, 1.0, wire::decode::MAX_EVENTS as f64) {
            policy.flush_at = v as usize;
        }
        if let Some(ms) = num(1, 0.0, 3.6e6) {
            policy.interval_ms = ms;
        }
        let mut purposes = [Purpose::Analytics; 12];
        for (i, p) in purposes.iter_mut().enumerate() {
            if let Some(kind) = EventKind::from_u8(i as u8) {
                *p = kind.least_purpose();
                let set = num(10 + i, 0.0, 3.0).and_then(|v| Purpose::from_u8(v as u8));
                if let (Some(purpose), false) = (set, kind == EventKind::ConsentChange) {
                    *p = purpose;
                }
            }
        }
        Some(Config {
            write_key: string(write_key)?,
            endpoint: string(endpoint)?,
            policy,
            session_timeout: num(2, 0.01, 1e6)
                .map_or(session::DEFAULT_TIMEOUT_MS, |m| m * 60_000.0),
            track_clicks: flag(3),
            purposes,
            defaults: Update {
                grant: mask(4),
                deny: mask(5) & !mask(4),
            },
            gpc: flag(6),
            visible: flag(7),
            referrer: referrer.into(),
            locale: locale.and_then(string),
            timezone: timezone.and_then(string),
            screen: (dim(8), dim(9)),
        })
    }
}

/// A non-empty string, cut to the collector's limit.
pub fn string(s: &str) -> Option<String> {
    text(s).map(String::from)
}

/// A non-empty string, cut to the collector's limit, borrowed.
pub fn text(s: &str) -> Option<&str> {
    let s = text::clip(s, MAX_STRING_BYTES);
    (!s.is_empty()).then_some(s)
}

/// An id the collector accepts: 1 to 256 bytes without `{`, `}` or control characters.
pub fn id(s: &str) -> Option<&str> {
    let ok = !s.is_empty()
        && s.len() <= MAX_ID_BYTES
        && !s.chars().any(|c| c == '{' || c == '}' || c.is_control());
    ok.then_some(s)
}

/// A whole number, if `n` is one that a double holds exactly.
pub fn int(n: f64) -> Option<i64> {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    if !(-EXACT..=EXACT).contains(&n) {
        return None;
    }
    let i = n as i64;
    (i as f64 == n).then_some(i)
}

/// A property from the loader: `key`, then `s` and a string, `n` and a number (whole
/// numbers become Int, others Float), or `b` and `1` or `0`, separated by U+001D.
pub fn property(field: &str) -> Option<(&str, ValueRef<'_>)> {
    let [key, kind, value] = msg::split(field, 0x1d);
    let value = match kind {
        "s" => ValueRef::String(text::clip(value, MAX_STRING_BYTES)),
        "n" => {
            let n = msg::number(value);
            if !n.is_finite() {
                return None;
            }
            int(n).map_or(ValueRef::Float(n), ValueRef::Int)
        }
        "b" => ValueRef::Bool(value == "1"),
        _ => return None,
    };
    Some((text(key)?, value))
}

/// An item from the loader: productId, category, price, quantity and name, separated by
/// U+001D; `None` without a valid product id. A quantity that is not a positive whole
/// number becomes 1; a price that is not whole becomes 0.
pub fn item(field: &str) -> Option<ItemRef<'_>> {
    let [product_id, category, price, quantity, name] = msg::split(field, 0x1d);
    Some(ItemRef {
        product_id: id(product_id)?,
        category: text(category),
        price: int(msg::number(price)).unwrap_or(0),
        quantity: int(msg::number(quantity))
            .filter(|q| *q > 0 && *q <= i64::from(u32::MAX))
            .unwrap_or(1) as u32,
        name: text(name),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_are_typed() {
        fn value(f: &str) -> Option<ValueRef<'_>> {
            property(f).map(|p| p.1)
        }
        assert_eq!(value("k\u{1d}s\u{1d}x"), Some(ValueRef::String("x")));
        assert_eq!(value("k\u{1d}n\u{1d}3"), Some(ValueRef::Int(3)));
        assert_eq!(
            value("k\u{1d}n\u{1d}h400c000000000000"),
            Some(ValueRef::Float(3.5))
        );
        assert_eq!(value("k\u{1d}n\u{1d}"), None, "not a number");
        assert_eq!(value("k\u{1d}b\u{1d}1"), Some(ValueRef::Bool(true)));
        assert_eq!(value("k\u{1d}b\u{1d}0"), Some(ValueRef::Bool(false)));
        assert_eq!(value("k\u{1d}x\u{1d}1"), None, "unknown type");
        assert_eq!(property("\u{1d}b\u{1d}1"), None, "no key");
    }

    #[test]
    fn strings_are_cut_to_the_collector_limit() {
        let long = alloc::format!("k\u{1d}s\u{1d}{}", "€".repeat(400));
        assert!(matches!(property(&long), Some((_, ValueRef::String(s))) if s.len() == 1023));
        assert_eq!(
            string(&"a".repeat(2000)).map(|s| s.len()),
            Some(MAX_STRING_BYTES)
        );
    }

    #[test]
    fn ids_follow_the_collector_rules() {
        assert_eq!(id("u-1"), Some("u-1"));
        assert_eq!(id(""), None);
        assert_eq!(id("a{b}"), None);
        assert_eq!(id("a\u{85}b"), None);
        assert_eq!(id(&"é".repeat(129)), None);
        let long = "é".repeat(128);
        assert_eq!(id(&long), Some(long.as_str()));
    }

    #[test]
    fn items_need_a_product_id_and_get_sane_numbers() {
        assert_eq!(
            item("sku-1\u{1d}shoes\u{1d}1999\u{1d}2\u{1d}Runner"),
            Some(ItemRef {
                product_id: "sku-1",
                category: Some("shoes"),
                price: 1999,
                quantity: 2,
                name: Some("Runner")
            })
        );
        let odd = item("sku-2\u{1d}\u{1d}h4033fd70a3d70a3d\u{1d}0").unwrap();
        assert_eq!((odd.category, odd.price, odd.quantity), (None, 0, 1));
        assert_eq!(item("\u{1d}\u{1d}1\u{1d}1"), None);
    }

    #[test]
    fn settings_are_read_with_defaults_for_bad_values() {
        let mut n = [5.0, -1.0, f64::NAN, 1.0, 2.0, 10.0, 1.0, 0.0, 1920.0, 1e9].to_vec();
        n.extend([
            -1.0, 3.0, -1.0, -1.0, 1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0,
        ]);
        let cfg = Config::new(
            "demo",
            "/v1/fb",
            "https://ref.example/",
            Some("de-DE"),
            Some(""),
            &n,
        )
        .unwrap();
        assert_eq!(cfg.write_key, "demo");
        assert_eq!(cfg.policy.flush_at, 5);
        assert_eq!(cfg.policy.interval_ms, 1000.0);
        assert_eq!(cfg.session_timeout, session::DEFAULT_TIMEOUT_MS);
        assert!(cfg.track_clicks && cfg.gpc && !cfg.visible);
        assert_eq!(cfg.defaults, Update { grant: 2, deny: 8 });
        assert_eq!(cfg.purposes[EventKind::Track as usize], Purpose::Marketing);
        assert_eq!(cfg.purposes[EventKind::Page as usize], Purpose::Analytics);
        // A consent change always needs only `necessary`.
        assert_eq!(
            cfg.purposes[EventKind::ConsentChange as usize],
            Purpose::Necessary
        );
        assert_eq!(cfg.screen, (1920, 0));
        assert_eq!((cfg.locale.as_deref(), cfg.timezone), (Some("de-DE"), None));
        assert_eq!(Config::new("", "/v1/fb", "", None, None, &[]), None);
    }
}
