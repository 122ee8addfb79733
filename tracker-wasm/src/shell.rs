//! The browser shell (wasm32 only): the function the loader calls, and [`Env`] on top of
//! the loader's host functions (localStorage, Web Crypto, the clock, delivery).
//!
//! Listeners, timers, `fetch` promises and checking the page's arguments live in the
//! loader (`js/loader.js`): Rust closures handed to JavaScript, and reading arbitrary
//! objects through reflection, cost far more wasm and glue than the few lines of script
//! they replace.
//!
//! Data crosses in one direction per kind of call, so that the glue wasm-bindgen writes is
//! the smallest it can be: the export takes a number, the host functions take byte views of
//! wasm memory (the glue passes them as `Uint8Array`s, no copies, no text codecs) and return
//! numbers. Bytes from the loader (a message, a stored value, the storage keys) are *pulled*:
//! the loader keeps them aside and says how many there are, the wasm allocates that much and
//! asks the loader to copy them in (`H.c`).

use alloc::vec::Vec;
use core::cell::RefCell;

use wasm_bindgen::prelude::*;

use crate::msg;
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
// build-tracker` wraps around this glue and the loader, so the glue finds it by name.
#[wasm_bindgen]
extern "C" {
    /// Copies the bytes the loader set aside (a message, a stored value, the keys) into
    /// `buf`, which is exactly as long as the loader said they are.
    #[wasm_bindgen(js_namespace = H, js_name = c)]
    fn pull(buf: &mut [u8]);

    /// `localStorage.getItem`: sets the value aside and returns its length; -1 when absent
    /// or storage is unavailable.
    #[wasm_bindgen(js_namespace = H, js_name = g)]
    fn get(key: &[u8]) -> i32;

    /// `localStorage.setItem`: 1, or -1 when the browser refused.
    #[wasm_bindgen(js_namespace = H, js_name = p)]
    fn put(key: &[u8], value: &[u8]) -> i32;

    /// `localStorage.removeItem`.
    #[wasm_bindgen(js_namespace = H, js_name = x)]
    fn remove(key: &[u8]);

    /// Sets aside the `localStorage` keys that start with `pz_`, separated by U+001F, and
    /// returns their length (-1: storage is unavailable).
    #[wasm_bindgen(js_namespace = H, js_name = k)]
    fn keys() -> i32;

    /// `crypto.getRandomValues`.
    #[wasm_bindgen(js_namespace = H, js_name = r)]
    fn random(buf: &mut [u8]);

    /// `Date.now()`.
    #[wasm_bindgen(js_namespace = H, js_name = n)]
    fn now() -> f64;

    /// Starts a POST (see [`Env::send`]).
    #[wasm_bindgen(js_namespace = H, js_name = s)]
    fn send(body: &[u8], seq: u32) -> bool;

    /// Takes the tracker's state for `pz.debug()` (see [`Tracker::debug`]).
    #[wasm_bindgen(js_namespace = H, js_name = d)]
    fn debug(state: &[u8]);
}

/// The `n` bytes the loader set aside; `None` for a negative `n`.
// `resize`, not `vec![0; n]`: one way to grow a buffer in the wasm (see `text::copied`).
#[allow(clippy::slow_vector_initialization)]
fn take(n: i32) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    buf.resize(usize::try_from(n).ok()?, 0);
    pull(&mut buf);
    Some(buf)
}

/// The browser side of [`Env`].
struct Browser {
    /// Random bytes fetched ahead: one `getRandomValues` call per 16 message ids instead of
    /// one per event, on the page's time.
    pool: [u8; 256],
    used: usize,
}

impl Storage for Browser {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        take(get(key))
    }

    fn set(&mut self, key: &[u8], value: &[u8]) -> bool {
        put(key, value) > 0
    }

    fn remove(&mut self, key: &[u8]) {
        remove(key);
    }

    fn keys(&self) -> Vec<u8> {
        take(keys()).unwrap_or_default()
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

    fn send(&mut self, body: &[u8], seq: u32) -> bool {
        send(body, seq)
    }
}

/// Handles one loader message of `len` bytes (see [`msg`]), which it pulls; returns when the
/// timer should fire next (ms), or -1 for no timer. Messages before `init`, `init` after
/// `init`, and re-entrant ones (which the loader never sends) are ignored.
#[wasm_bindgen]
pub fn m(len: u32) -> f64 {
    let Ok(mut state) = STATE.0.try_borrow_mut() else {
        return NO_TICK;
    };
    let (browser, tracker) = &mut *state;
    let Some(message) = take(len as i32) else {
        return NO_TICK;
    };
    let mut r = msg::Reader(&message);
    match (msg::kind(&mut r), tracker.as_mut()) {
        (msg::INIT, None) => {
            tracker.insert(Tracker::EMPTY).start(&mut r, browser);
            0.0
        }
        (msg::DEBUG, Some(t)) => {
            debug(&t.debug());
            NO_TICK
        }
        (_, Some(t)) => t.handle(browser, &message),
        _ => NO_TICK,
    }
}
