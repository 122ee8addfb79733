//! The plain Rust form of an event batch, shared by encoder and decoder.

use alloc::string::String;
use alloc::vec::Vec;

/// What happened (mirrors `EventKind` in the schema).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum EventKind {
    /// A page view.
    #[default]
    Page = 0,
    /// A custom, named event.
    Track = 1,
    /// Traits in `properties`, the user id in `user_id`.
    Identify = 2,
    /// Links `previous_id` to `user_id`.
    Alias = 3,
    /// New consent state in `consent_granted` / `consent_denied`.
    ConsentChange = 4,
    /// A product page was seen; the product in `items`.
    ProductViewed = 5,
    /// Items added to the cart.
    CartAdd = 6,
    /// Items removed from the cart.
    CartRemove = 7,
    /// Checkout started, with the cart in `items`.
    CheckoutStarted = 8,
    /// An order: `order_id`, `revenue`, `currency`, `items`.
    OrderCompleted = 9,
    /// A marketing email was opened.
    EmailOpened = 10,
    /// A link in a marketing email was clicked.
    EmailClicked = 11,
}

impl EventKind {
    /// The kind with wire value `v`, if known.
    pub const fn from_u8(v: u8) -> Option<Self> {
        use EventKind::*;
        Some(match v {
            0 => Page,
            1 => Track,
            2 => Identify,
            3 => Alias,
            4 => ConsentChange,
            5 => ProductViewed,
            6 => CartAdd,
            7 => CartRemove,
            8 => CheckoutStarted,
            9 => OrderCompleted,
            10 => EmailOpened,
            11 => EmailClicked,
            _ => return None,
        })
    }
}

impl EventKind {
    /// The least consent purpose this kind needs, whatever an event declares: the tracker
    /// holds events back until it is granted and the collector rejects events whose batch
    /// lacks it. Consent changes need only `necessary`, email engagement `marketing`,
    /// everything else `analytics`.
    pub const fn least_purpose(self) -> Purpose {
        match self {
            EventKind::ConsentChange => Purpose::Necessary,
            EventKind::EmailOpened | EventKind::EmailClicked => Purpose::Marketing,
            EventKind::Page
            | EventKind::Track
            | EventKind::Identify
            | EventKind::Alias
            | EventKind::ProductViewed
            | EventKind::CartAdd
            | EventKind::CartRemove
            | EventKind::CheckoutStarted
            | EventKind::OrderCompleted => Purpose::Analytics,
        }
    }
}

/// A consent purpose; the batch's consent mask has bit `1 << (purpose as u8)` when granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum Purpose {
    /// Needed to run the site.
    #[default]
    Necessary = 0,
    /// Measuring behaviour.
    Analytics = 1,
    /// Tailoring content.
    Personalization = 2,
    /// Marketing email and ads.
    Marketing = 3,
}

impl Purpose {
    /// The purpose with wire value `v`, if known.
    pub const fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Purpose::Necessary,
            1 => Purpose::Analytics,
            2 => Purpose::Personalization,
            3 => Purpose::Marketing,
            _ => return None,
        })
    }

    /// The purpose's bit in a consent mask.
    pub const fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A typed property value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Text.
    String(String),
    /// A whole number.
    Int(i64),
    /// A finite floating point number.
    Float(f64),
    /// True or false.
    Bool(bool),
}

/// A named property (a trait, for identify).
#[derive(Debug, Clone, PartialEq)]
pub struct Property {
    /// The name.
    pub key: String,
    /// The value.
    pub value: Value,
}

/// A product line.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Item {
    /// The shop's product id (required, non-empty).
    pub product_id: String,
    /// Category, if known.
    pub category: Option<String>,
    /// Unit price in minor currency units.
    pub price: i64,
    /// How many.
    pub quantity: u32,
    /// Display name, if known.
    pub name: Option<String>,
}

/// One event.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Event {
    /// 16 random bytes (a UUID); never all zero.
    pub message_id: [u8; 16],
    /// Client clock, Unix milliseconds (0: unknown).
    pub timestamp_ms: i64,
    /// What happened.
    pub kind: EventKind,
    /// Track event name or page name.
    pub name: Option<String>,
    /// Properties, or traits for identify.
    pub properties: Vec<Property>,
    /// Commerce items.
    pub items: Vec<Item>,
    /// Identify: the user id. Alias: the new id.
    pub user_id: Option<String>,
    /// Alias: the previous id.
    pub previous_id: Option<String>,
    /// Order id.
    pub order_id: Option<String>,
    /// Order revenue in minor currency units.
    pub revenue: i64,
    /// ISO 4217 currency code.
    pub currency: Option<String>,
    /// Consent change: purposes now granted (mask).
    pub consent_granted: u8,
    /// Consent change: purposes now denied (mask).
    pub consent_denied: u8,
    /// The purpose this event needs.
    pub purpose: Purpose,
}

/// Context shared by every event of a batch.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Context {
    /// Page URL.
    pub page_url: Option<String>,
    /// Referrer URL.
    pub referrer: Option<String>,
    /// `utm_source`.
    pub utm_source: Option<String>,
    /// `utm_medium`.
    pub utm_medium: Option<String>,
    /// `utm_campaign`.
    pub utm_campaign: Option<String>,
    /// `utm_term`.
    pub utm_term: Option<String>,
    /// `utm_content`.
    pub utm_content: Option<String>,
    /// BCP 47 locale.
    pub locale: Option<String>,
    /// IANA time zone.
    pub timezone: Option<String>,
    /// Screen width in CSS pixels (0: unknown).
    pub screen_width: u16,
    /// Screen height in CSS pixels (0: unknown).
    pub screen_height: u16,
    /// The tracker's session id.
    pub session_id: Option<String>,
    /// The visitor's anonymous id.
    pub anonymous_id: Option<String>,
    /// The user id, once identified.
    pub user_id: Option<String>,
}

/// One POST body: events collected under one consent state.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Batch {
    /// Identifies the site (sendBeacon cannot send headers, so it travels in the body).
    pub write_key: String,
    /// Client clock when sent, Unix milliseconds.
    pub sent_at_ms: i64,
    /// Purposes granted when the events were collected.
    pub consent: u8,
    /// Shared context.
    pub context: Context,
    /// The events, oldest first.
    pub events: Vec<Event>,
}
