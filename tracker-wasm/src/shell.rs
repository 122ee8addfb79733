//! The browser shell (wasm32 only): the functions the loader calls, and [`Env`] on top of
//! web-sys (localStorage, Web Crypto) and the loader's delivery function.
//!
//! Listeners, timers, `fetch` promises and checking the page's arguments live in the
//! loader (`js/loader.js`): Rust closures handed to JavaScript, and reading arbitrary
//! objects through reflection, cost far more wasm and glue than the few lines of script
//! they replace.
//!
//! Exports: `start(host, storage, crypto)` and `m(message)` (every API call and page event, as
//! text: see [`msg`]; `D` asks for the state, which goes to `host.d`). A single text export
//! needs far less glue than one export per call or reading JavaScript objects from Rust, and
//! handing text to the host is cheaper than returning it.

use alloc::string::String;
use alloc::vec::Vec;
use core::cell::RefCell;

use wasm_bindgen::prelude::*;

use crate::msg::{self, Msg};
use crate::persist::Storage;
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

/// The browser side, from `start`; the tracker, from the `init` message.
struct Global(RefCell<(Option<Browser>, Option<Tracker>)>);

// SAFETY: see ALLOC: one thread.
#[allow(unsafe_code)]
unsafe impl Sync for Global {}

static STATE: Global = Global(RefCell::new((None, None)));

#[wasm_bindgen]
extern "C" {
    /// The loader's delivery object.
    pub type Host;

    /// Starts a POST (see [`Env::send`]).
    #[wasm_bindgen(method, js_name = s)]
    fn send(this: &Host, url: &str, body: &[u8], seq: u32) -> bool;

    /// Takes the tracker's state for `pz.debug()` (see [`crate::tracker::Debug::encode`]).
    #[wasm_bindgen(method, js_name = d)]
    fn debug(this: &Host, state: &str);
}

/// The browser side of [`Env`].
struct Browser {
    host: Host,
    storage: Option<web_sys::Storage>,
    crypto: Option<web_sys::Crypto>,
    /// Random bytes fetched ahead: one `getRandomValues` call per 16 message ids instead of
    /// one per event, on the page's time.
    pool: [u8; 256],
    used: usize,
}

impl Storage for Browser {
    fn get(&self, key: &str) -> Option<String> {
        self.storage.as_ref()?.get_item(key).ok().flatten()
    }

    fn set(&mut self, key: &str, value: &str) -> bool {
        self.storage
            .as_ref()
            .is_some_and(|s| s.set_item(key, value).is_ok())
    }

    fn remove(&mut self, key: &str) {
        if let Some(s) = &self.storage {
            let _ = s.remove_item(key);
        }
    }

    fn keys(&self) -> Vec<String> {
        let Some(s) = &self.storage else {
            return Vec::new();
        };
        let mut keys = Vec::new();
        for i in 0..s.length().unwrap_or(0) {
            if let Ok(Some(k)) = s.key(i) {
                keys.push(k);
            }
        }
        keys
    }
}

impl Env for Browser {
    fn now(&self) -> f64 {
        js_sys::Date::now()
    }

    fn random(&mut self, buf: &mut [u8]) {
        for b in buf {
            if self.used >= self.pool.len() {
                if let Some(c) = &self.crypto {
                    let _ = c.get_random_values_with_u8_array(&mut self.pool);
                }
                self.used = 0;
            }
            *b = self.pool[self.used];
            self.used += 1;
        }
    }

    fn send(&mut self, url: &str, body: &[u8], seq: u32) -> bool {
        self.host.send(url, body, seq)
    }
}

/// Binds the tracker to the page: `host.s(url, bytes, seq)` delivers batches; `storage`
/// is `localStorage` (absent where the browser refuses it: then the tracker keeps everything
/// in memory) and `crypto` is `window.crypto`. The loader looks them up: finding the window
/// from Rust costs more glue than the lookup itself.
#[wasm_bindgen]
pub fn start(host: Host, storage: Option<web_sys::Storage>, crypto: Option<web_sys::Crypto>) {
    let browser = Browser {
        host,
        storage,
        crypto,
        pool: [0; 256],
        used: 256,
    };
    if let Ok(mut s) = STATE.0.try_borrow_mut() {
        s.0 = Some(browser);
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
    let (Some(browser), tracker) = &mut *state else {
        return NO_TICK;
    };
    if message == "D" {
        if let Some(t) = tracker {
            browser.host.debug(&t.debug().encode());
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
