//! The browser shell (wasm32 only): the function the loader calls, and [`Env`] on top of
//! the loader's host functions (localStorage, Web Crypto, the clock, delivery).
//!
//! Listeners, timers, `fetch` promises and checking the page's arguments live in the
//! loader (`js/loader.js`): Rust closures handed to JavaScript, and reading arbitrary
//! objects through reflection, cost far more wasm and glue than the few lines of script
//! they replace.
//!
//! Export: `m(message)` (every API call and page event, as text: see [`msg`]; `D` asks for
//! the state, which goes to `H.d`). A single text export
//! needs far less glue than one export per call or reading JavaScript objects from Rust, and
//! handing text to the host is cheaper than returning it.

use alloc::string::String;
use alloc::vec::Vec;
use core::cell::RefCell;

use wasm_bindgen::prelude::*;

use crate::msg::{self, Msg};
use crate::persist::Storage;
use crate::text;
use crate::tracker::{Env, NO_TICK, Tracker};

// wasm32-unknown-unknown without the atomics feature runs on one thread, which makes both
// `unsafe` items below sound: nothing can observe the allocator or the state concurrently.
#[global_allocator]
#[allow(unsafe_code)]
static ALLOC: lol_alloc::AssumeSingleThreaded<lol_alloc::FreeListAllocator> =
    unsafe { lol_alloc::AssumeSingleThreaded::new(lol_alloc::FreeListAllocator::new()) };

/// Traps. The loader catches the exception, so a bug never breaks the page; no message is
/// formatted, which keeps `core::fmt` out of the binary.
#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    core::arch::wasm32::unreachable()
}

/// The browser side; the tracker, from the `init` message.
struct Global(RefCell<(Browser, Option<Tracker>)>);

// SAFETY: see ALLOC: one thread.
#[allow(unsafe_code)]
unsafe impl Sync for Global {}

static STATE: Global = Global(RefCell::new((
    Browser {
        pool: [0; 256],
        used: 256,
    },
    None,
)));

// The loader's host functions: `H` is declared in the function scope that `cargo xtask
// build-tracker` wraps around this glue and the loader, so the glue finds it by name. Plain
// functions taking strings and bytes need no JavaScript objects held in Rust (no externref
// table) and less glue than web-sys's `Storage` and `Crypto` bindings.
#[wasm_bindgen]
extern "C" {
    /// Starts a POST (see [`Env::send`]).
    #[wasm_bindgen(js_namespace = H, js_name = s)]
    fn send(url: &str, body: &[u8], seq: u32) -> bool;

    /// Takes the tracker's state for `pz.debug()` (see [`crate::tracker::Debug::encode`]).
    #[wasm_bindgen(js_namespace = H, js_name = d)]
    fn debug(state: &str);

    /// `localStorage.getItem`; `None` when absent or storage is unavailable.
    #[wasm_bindgen(js_namespace = H, js_name = g)]
    fn get(key: &str) -> Option<String>;

    /// `localStorage.setItem`; `false` when the browser refused.
    #[wasm_bindgen(js_namespace = H, js_name = p)]
    fn put(key: &str, value: &str) -> bool;

    /// `localStorage.removeItem`.
    #[wasm_bindgen(js_namespace = H, js_name = x)]
    fn remove(key: &str);

    /// The `localStorage` keys that start with `pz_`, separated by U+001F.
    #[wasm_bindgen(js_namespace = H, js_name = k)]
    fn keys() -> String;

    /// `crypto.getRandomValues`.
    #[wasm_bindgen(js_namespace = H, js_name = r)]
    fn random(buf: &mut [u8]);

    /// `Date.now()`.
    #[wasm_bindgen(js_namespace = H, js_name = n)]
    fn now() -> f64;
}

/// The browser side of [`Env`].
struct Browser {
    /// Random bytes fetched ahead: one `getRandomValues` call per 16 message ids instead of
    /// one per event, on the page's time.
    pool: [u8; 256],
    used: usize,
}

impl Storage for Browser {
    fn get(&self, key: &str) -> Option<String> {
        get(key)
    }

    fn set(&mut self, key: &str, value: &str) -> bool {
        put(key, value)
    }

    fn remove(&mut self, key: &str) {
        remove(key);
    }

    fn keys(&self) -> Vec<String> {
        let keys = keys();
        text::fields(&keys, 0x1f)
            .filter(|k| !k.is_empty())
            .map(String::from)
            .collect()
    }
}

impl Env for Browser {
    fn now(&self) -> f64 {
        now()
    }

    fn random(&mut self, buf: &mut [u8]) {
        for b in buf {
            if self.used >= self.pool.len() {
                random(&mut self.pool);
                self.used = 0;
            }
            *b = self.pool[self.used];
            self.used += 1;
        }
    }

    fn send(&mut self, url: &str, body: &[u8], seq: u32) -> bool {
        send(url, body, seq)
    }
}

/// Handles one loader message (see [`msg`]); returns when the timer should fire next (ms),
/// or -1 for no timer. Messages before `start`, other than `init` before `init`, and
/// re-entrant ones (which the loader never sends) are ignored.
#[wasm_bindgen]
pub fn m(message: &str) -> f64 {
    let Ok(mut state) = STATE.0.try_borrow_mut() else {
        return NO_TICK;
    };
    let (browser, tracker) = &mut *state;
    if message == "D" {
        if let Some(t) = tracker {
            debug(&t.debug().encode());
        }
        return NO_TICK;
    }
    match (msg::parse(message), tracker.as_mut()) {
        (Some(Msg::Init(cfg)), None) => {
            *tracker = Some(Tracker::new(cfg, browser));
            0.0
        }
        (Some(Msg::Signal(s)), Some(t)) => t.signal(browser, s),
        (Some(Msg::Done(seq, status, retry_after)), Some(t)) => {
            t.done(browser, seq, status, retry_after)
        }
        _ => NO_TICK,
    }
}
