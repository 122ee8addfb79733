//! tracker-wasm: the browser tracker, Rust compiled to WebAssembly.
//!
//! A page embeds the snippet (`snippet.js`, under 1 KB minified), which defines `window.pz`
//! with a call queue and loads `pz.js`: the wasm-bindgen glue plus a small loader
//! (`js/loader.js`) that starts this module, replays the queue, checks the page's arguments,
//! installs the page listeners and delivers batches. Each call reaches Rust as one binary
//! message ([`msg`]). Events pass through the consent gate, encoded once
//! (`wire::encode::EventPiece`), into a bounded queue of byte records; the timer seals them
//! and sends them as `wire` batches, copied behind a batch header, with
//! `fetch(..., {keepalive: true})`, or `sendBeacon` when the page goes away, retried with
//! backoff until acknowledged.
//!
//! The pure core (no browser APIs, tested natively):
//! - [`tracker`]: the state machine behind the API, with the browser behind [`Env`].
//! - [`msg`]: the loader's messages and the `init` settings.
//! - [`consent`]: purposes, pending/granted/denied, the kind -> purpose table.
//! - [`signals`]: Global Privacy Control, TCF v2.2 and Consent Mode v2 mapped to purposes.
//! - [`queue`]: events as byte records in one buffer (the queue, the events held for
//!   consent, and what is stored); [`batch`]: when to seal, and the next batch.
//! - [`backoff`]: what an answer means and how long to wait before retrying.
//! - [`session`]: session ids.
//! - [`persist`]: localStorage keys, the stored queue format, tabs sharing storage.
//! - [`text`]: text as UTF-8 bytes, without `core::fmt`.
//!
//! On wasm32 a thin `shell` module binds it to the browser with wasm-bindgen, through a few
//! host functions of the loader (storage, randomness, clock, delivery).
//! There the crate is `no_std` with a small allocator and a panic handler that traps, so
//! neither `std`'s panic machinery nor `core::fmt` ends up in the shipped file.
//!
//! # Keeping it small
//!
//! The shipped wasm is about 10.6 KB gzip, within a budget that `cargo xtask test` enforces
//! (`docs/BENCHMARKS.md` has the figures). No single function is large: the size comes from
//! patterns, and these keep it down (each measured; the commit history has the figures):
//! - State as bytes: events, held events and stored queues are records in one `Vec<u8>`
//!   ([`queue`]), text is UTF-8 bytes ([`text`]), stored values are binary. Every buffer
//!   grows by `extend_from_slice` or `resize`, one allocation path ([`text::copied`]).
//! - Big values are not built and moved: [`Tracker::EMPTY`] and `Config::DEFAULT` are
//!   constants copied into place, settings are read into them in place, messages are read
//!   straight into the call that applies them, and an event's lists are streamed into the
//!   encoder.
//! - No panicking index paths (`get`, iterators, masked indexes) and no by-value loops over
//!   arrays (`for x in [..]` instantiates `array::IntoIter`; `for x in &[..]` does not).
//! - Float-to-integer conversions of message fields live in one out-of-line place
//!   ([`msg::Reader::int`]).
//! - No callbacks: enums and parameters say what a loop does ([`queue::Filter`],
//!   [`queue::Reset`]), so nothing is called indirectly. This matters beyond their own
//!   code: `core`'s integer formatting is reachable only from the allocation-failure
//!   message, through indirect calls (to the argument's `Display` and the formatter's
//!   `write_str`), and binaryen drops it (about 0.4 KB gzip) because no function in the wasm
//!   can be their target. A closure or trait object called through a `dyn` pointer can
//!   bring it back; the size check in `cargo xtask test` shows it.
//!
//! # Consent signals
//!
//! | source | signal | our purposes |
//! | --- | --- | --- |
//! | Global Privacy Control | `navigator.globalPrivacyControl === true` | default: marketing denied (an explicit decision still wins) |
//! | IAB TCF v2.2 (`__tcfapi('addEventListener', 2, cb)`) | `tcData.purpose.consents` when `eventStatus` is `tcloaded` or `useractioncomplete` and `gdprApplies` is not `false` | decision per purpose, granted only when every listed TCF purpose has consent: analytics = 1, 8, 9; personalization = 1, 5, 6; marketing = 1, 3, 4 |
//! | Google Consent Mode v2 (`dataLayer` `['consent', 'default' \| 'update', params]`) | `analytics_storage` | analytics |
//! | | `personalization_storage` | personalization |
//! | | `ad_user_data` and `ad_personalization` | marketing: granted when both are granted, denied when either is denied |
//! | | `default` command | sets defaults; `update` is a decision |
//!
//! Decisions (from `pz.consent`, TCF, Consent Mode `update`) are stored (`pz_c`) and each
//! change is sent as a `consent_change` event (purpose necessary, with the source in property
//! `source`, and the whole state in the event's granted / denied masks) once the visitor has
//! granted anything beyond `necessary`: a visitor who only ever refused has no profile, and
//! no request at all leaves the page for them. Defaults (`consentDefaults`, GPC, Consent Mode `default`) apply where nothing is
//! decided and are not events. `necessary` is always granted.
//!
//! # Event kinds and purposes
//!
//! Each event needs its declared purpose and its kind's least purpose (the collector checks
//! both): page, track, identify, alias, product and cart events, checkout and orders need
//! analytics; consent changes need necessary. `init({purposes: {track: 'marketing'}})`
//! declares another purpose for a kind.

#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

pub mod backoff;
pub mod batch;
pub mod consent;
pub mod msg;
pub mod persist;
pub mod queue;
pub mod session;
pub mod signals;
pub mod text;
pub mod tracker;

#[cfg(target_arch = "wasm32")]
mod shell;

pub use msg::Config;
pub use persist::Storage;
pub use tracker::{Env, NO_TICK, Tracker};
