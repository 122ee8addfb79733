//! The tracker: the loader's messages in, events through the consent gate into the queue,
//! batches out, answers back. The browser is behind [`Env`], so the whole flow runs in
//! native tests.
//!
//! Recording an event only queues it; sealing, storage writes and sending happen in
//! [`Tracker::tick`], which the loader runs from a timer. Every entry point returns when the
//! next tick is due ([`NO_TICK`] for none).

use alloc::vec::Vec;
use core::mem;

use wire::EventKind;
use wire::encode::{EventRef, ValueRef};

use crate::backoff::{self, Backoff, Outcome};
use crate::batch;
use crate::consent::{Consent, Gate, NECESSARY, State, Update};
use crate::msg::{self, Config, Ev, Reader};
use crate::persist::{self, Storage, Stored};
use crate::queue::{Filter, Head, Queue};
use crate::session::Session;
use crate::signals::{self, Gcm};
use crate::text;

/// Returned when no tick is needed.
pub const NO_TICK: f64 = -1.0;
/// The most events waiting to be sent (memory, and each tab's stored queue).
pub const QUEUE_CAP: u32 = 1000;
/// The most events waiting for consent (memory only).
pub const HELD_CAP: u32 = 200;
/// After a beacon, whose fate is unknown, its events are kept and sent again (the collector
/// drops duplicates by message id) after this long (ms), or by the next page.
pub const BEACON_HOLD_MS: f64 = 60_000.0;
/// What one page may send by `sendBeacon` as it goes away (bytes): the browser's budget is
/// 64 KiB for all keepalive requests in flight.
pub const BEACON_BUDGET: usize = 60 * 1024;
/// The name of the event that reports visible time on a page (property `engaged_ms`).
pub const ENGAGED_EVENT: &[u8] = b"page_engaged";
/// The last delivery error when a request could not even start (else it is the HTTP
/// status, 0 for a network error).
pub const SEND_FAILED: u16 = 1;

// Where each string of the page context is kept in `Tracker::text`: its field id in
// wire's `Context` (see `wire::encode::context_texts`).
const URL: usize = 0;
const REFERRER: usize = 1;
/// The five UTM parameters, from here on.
const UTM: usize = 2;
const LOCALE: usize = 7;
const TIMEZONE: usize = 8;
const SESSION: usize = 11;
const ANON: usize = 12;
/// Right after [`ANON`]: `start` reads both stored ids in one loop.
const USER: usize = 13;
const _: () = assert!(USER == ANON + 1);

/// What the tracker needs from the browser.
pub trait Env: Storage {
    /// The time, Unix ms (`Date.now()`).
    fn now(&self) -> f64;
    /// Fills `buf` with random bytes (`crypto.getRandomValues`).
    fn random(&mut self, buf: &mut [u8]);
    /// Starts a POST of `body` to the collector. `seq` 0 means "the page is going away":
    /// use `sendBeacon` (falling back to `fetch` with `keepalive`) and report nothing.
    /// Otherwise use `fetch` with `keepalive` and report the answer with
    /// [`Tracker::done`]`(seq, ..)`. Returns `false` when the request could not start.
    fn send(&mut self, body: &[u8], seq: u32) -> bool;
}

/// The tracker's whole state.
#[derive(Debug)]
pub struct Tracker {
    cfg: Config,
    consent: Consent,
    gcm: Gcm,
    /// This tab's queue key (`pz_q_` and 16 random hex digits), also its name in the lease.
    key: Vec<u8>,
    session: Session,
    /// The strings of the page context, by field id: the page URL (`URL`), the referrer,
    /// the UTM parameters, locale, time zone, session id, anonymous id and user id (empty:
    /// none). One array, so that the context is encoded by one loop.
    text: [Vec<u8>; 14],
    /// The automatic page view of this URL, which `pz.page()` names while it is unsealed.
    last_view: Option<[u8; 16]>,
    visible_since: Option<f64>,
    engaged_ms: f64,
    /// The encoded context of events recorded now.
    ctx: Vec<u8>,
    queue: Queue,
    /// Events waiting for consent (memory only); their mask is set when they are released.
    held: Queue,
    dropped: u32,
    held_dropped: u32,
    consent_dropped: u32,
    sent: u32,
    seq: u32,
    in_flight: u32,
    backoff: Backoff,
    retry_at: f64,
    forced: bool,
    dirty: bool,
    closed: bool,
    saved_at: f64,
    error: Option<u16>,
}

impl Tracker {
    /// A tracker before `init`: every setting at its default, nothing recorded. A
    /// constant, so that it is copied into place rather than built field by field.
    pub const EMPTY: Tracker = Tracker {
        cfg: Config::DEFAULT,
        consent: Consent::NONE,
        gcm: Gcm::NONE,
        key: Vec::new(),
        session: Session {
            start: 0.0,
            last: 0.0,
        },
        text: [const { Vec::new() }; 14],
        last_view: None,
        visible_since: None,
        engaged_ms: 0.0,
        ctx: Vec::new(),
        queue: Queue(Vec::new()),
        held: Queue(Vec::new()),
        dropped: 0,
        held_dropped: 0,
        consent_dropped: 0,
        sent: 0,
        seq: 0,
        in_flight: 0,
        backoff: Backoff::NONE,
        retry_at: 0.0,
        forced: false,
        dirty: false,
        closed: false,
        saved_at: 0.0,
        error: None,
    };

    /// Starts an [`EMPTY`](Self::EMPTY) tracker with the settings of an `init` message
    /// (`r` is past its type): restores consent decisions and, where storage is allowed,
    /// the ids, the session and the queues that closed tabs left. The first navigation
    /// message records the first page view.
    pub fn start(&mut self, r: &mut Reader<'_>, env: &mut impl Env) {
        msg::init(r, &mut self.cfg);
        let now = env.now();
        let c = &mut self.consent;
        if let Some(stored) = env.get(persist::CONSENT_KEY) {
            c.load_decisions(&stored);
        }
        c.set_default(self.cfg.defaults);
        c.set_default(signals::gpc(self.cfg.gpc));
        self.key.extend_from_slice(persist::QUEUE_PREFIX);
        text::push_hex(&mut self.key, &random::<8>(env));
        self.text[ANON] = text::uuid(random(env));
        let (c, t) = (&mut self.cfg, &mut self.text);
        mem::swap(&mut t[REFERRER], &mut c.referrer);
        mem::swap(&mut t[LOCALE], &mut c.locale);
        mem::swap(&mut t[TIMEZONE], &mut c.timezone);
        self.visible_since = self.cfg.visible.then_some(now);
        if self.consent.storage_allowed() {
            for (id, key) in self.text[ANON..]
                .iter_mut()
                .zip(&[persist::ANON_KEY, persist::USER_KEY])
            {
                if let Some(stored) = env.get(key).filter(|s| text::is_id(s)) {
                    *id = stored;
                }
            }
            self.sync_session(env);
            self.store_ids(env);
            self.adopt(env, now);
        }
        self.refresh_ctx();
    }

    /// Handles a message from the loader (see [`msg`]; `init` and `debug` are for the
    /// caller). Returns when the next tick is due.
    pub fn handle(&mut self, env: &mut impl Env, message: &[u8]) -> f64 {
        let now = env.now();
        let mut r = Reader(message);
        match msg::kind(&mut r) {
            msg::EVENT => {
                if let Some(e) = msg::event(&mut r) {
                    self.api_event(env, e, now);
                }
            }
            msg::NAVIGATION => {
                let (url, utm) = msg::navigation(&mut r);
                self.navigate(env, url, utm, now);
            }
            msg::CONSENT => self.apply_consent(env, msg::update(&mut r), true, b"api", now),
            msg::TCF => {
                let u = signals::tcf(r.int() as u16);
                self.apply_consent(env, u, true, b"tcf", now);
            }
            kind @ (msg::GCM_DEFAULT | msg::GCM_UPDATE) => {
                let (granted, denied) = msg::bits(&mut r);
                let u = self.gcm.command(granted, denied);
                self.apply_consent(env, u, kind == msg::GCM_UPDATE, b"gcm", now);
            }
            msg::CLICK => {
                let name = r.text();
                if self.cfg.track_clicks && !name.is_empty() {
                    let mut ev = self.event(env, EventKind::Track, now);
                    ev.head.name = Some(name);
                    self.record(&ev);
                }
            }
            msg::ANSWER => {
                let (seq, status, retry_after) = msg::answer(&mut r);
                return self.done(env, seq, status, retry_after);
            }
            msg::TICK => return self.tick(env),
            msg::HIDDEN => self.hide(env, now, false),
            msg::VISIBLE => {
                if self.visible_since.is_none() {
                    self.visible_since = Some(now);
                }
                self.closed = false;
                self.dirty = true;
                self.sync_session(env);
            }
            msg::PAGEHIDE => self.hide(env, now, true),
            msg::CONSENT_SYNC => {
                let before = self.consent;
                if let Some(stored) = env.get(persist::CONSENT_KEY) {
                    self.consent.load_decisions(&stored);
                }
                self.consent_moved(env, before, now);
            }
            msg::FLUSH => self.forced = true,
            msg::RESET => {
                self.text[ANON] = text::uuid(random(env));
                self.session = Session::default();
                self.text[USER].clear();
                self.store_ids(env);
                self.session.touch(now, self.cfg.session_timeout);
                self.refresh_ctx();
                self.dirty = true;
            }
            _ => return NO_TICK,
        }
        self.next_tick(now)
    }

    /// The timer: seals due events, stores what changed, and sends the next batch unless
    /// one is in flight or a retry is waiting.
    pub fn tick(&mut self, env: &mut impl Env) -> f64 {
        let now = env.now();
        let s = self.queue.stats(now);
        let policy = self.cfg.policy;
        if policy.due(s.unsealed, s.unsealed_bytes, s.oldest, now, self.forced) == Some(0.0) {
            self.queue.seal();
            self.dirty = true;
        }
        self.forced = false;
        let refresh = s.events > 0 && now - self.saved_at >= persist::REFRESH_MS;
        if self.dirty || refresh {
            self.save(env, now);
        }
        if self.in_flight == 0
            && now >= self.retry_at
            && let Some(b) = batch::next(&self.queue, now, &policy, &self.cfg.write_key)
        {
            self.seq = self.seq.wrapping_add(1).max(1);
            let body = batch::body(&self.queue, &b, &self.cfg.write_key, now);
            if env.send(&body, self.seq) {
                batch::mark(&mut self.queue, &b, self.seq, 0.0);
                self.in_flight = self.seq;
            } else {
                self.fail(env, now, None, SEND_FAILED);
            }
        }
        self.next_tick(now)
    }

    /// The collector answered request `seq` with `status` (0: network error) and maybe a
    /// `Retry-After` header (seconds; NaN: none).
    pub fn done(&mut self, env: &mut impl Env, seq: u32, status: u16, retry_after: f64) -> f64 {
        let now = env.now();
        if seq != 0 && seq == self.in_flight {
            self.in_flight = 0;
            self.dirty = true;
            match backoff::outcome(status) {
                Outcome::Ack => {
                    self.sent += self.queue.remove(seq, 0);
                    self.backoff.reset();
                    self.retry_at = 0.0;
                }
                Outcome::Drop => {
                    self.queue.remove(seq, 0);
                    self.error = Some(status);
                }
                Outcome::Retry => {
                    self.queue.release(seq);
                    let retry_after = backoff::retry_after_ms(retry_after);
                    self.fail(env, now, retry_after, status);
                }
            }
        }
        self.next_tick(now)
    }

    /// The state for tests and debugging (`pz.debug()`), as text: the counts in decimal
    /// (events queued, held for consent, in flight, dropped from the full queue, dropped
    /// from the full held list, dropped for lack of consent, sent, failed tries since the
    /// last success), one letter per purpose (`g`ranted, `d`enied, `p`ending) and `1` or
    /// `0` for persistent, the last delivery error (empty: none; [`SEND_FAILED`], else the
    /// HTTP status, 0 for a network error), then the anonymous id, the user id and the
    /// session id; fields separated by U+001F. Text, not JSON: escaping JSON in Rust costs
    /// more wasm than the few lines of script that build the object.
    pub fn debug(&self) -> Vec<u8> {
        let s = self.queue.stats(0.0);
        let mut out = Vec::new();
        for &n in &[
            s.events,
            self.held.stats(0.0).events,
            s.in_flight,
            self.dropped,
            self.held_dropped,
            self.consent_dropped,
            self.sent,
            self.backoff.attempts(),
        ] {
            text::push_u64(&mut out, u64::from(n));
            out.extend_from_slice(b"\x1f");
        }
        for i in 0..4 {
            out.extend_from_slice(match self.consent.state(1 << i) {
                State::Granted => b"g",
                State::Denied => b"d",
                State::Pending => b"p",
            });
        }
        let persistent = self.consent.storage_allowed();
        out.extend_from_slice(if persistent { b"1\x1f" } else { b"0\x1f" });
        if let Some(e) = self.error {
            text::push_u64(&mut out, u64::from(e));
        }
        for id in &[&self.text[ANON], &self.text[USER], &self.text[SESSION]] {
            out.extend_from_slice(b"\x1f");
            out.extend_from_slice(id);
        }
        out
    }

    fn api_event(&mut self, env: &mut impl Env, ev: Ev<'_>, now: f64) {
        // Declared before `ev`, which may borrow it (an alias's previous id).
        let previous: Vec<u8>;
        let mut ev = ev;
        let ts = if ev.head.timestamp_ms > 0 {
            ev.head.timestamp_ms as f64
        } else {
            now
        };
        self.stamp(env, &mut ev, ts);
        match ev.head.kind {
            EventKind::Page => {
                // The automatic view of this URL, while unsealed, takes the name and
                // properties instead of a second view being counted.
                if let Some(id) = self.last_view.take()
                    && let Some(ts) = self.queue.take(id).or_else(|| self.held.take(id))
                {
                    ev.head.message_id = id;
                    ev.head.timestamp_ms = ts as i64;
                }
            }
            EventKind::Identify | EventKind::Alias => {
                let Some(user) = ev.head.user_id else {
                    return;
                };
                let before = mem::replace(&mut self.text[USER], text::copied(user));
                previous = if before.is_empty() {
                    self.text[ANON].clone()
                } else {
                    before
                };
                self.store_ids(env);
                self.refresh_ctx();
                if ev.head.kind == EventKind::Alias {
                    ev.head.previous_id = Some(&previous);
                }
            }
            EventKind::ConsentChange => return,
            _ => {}
        }
        self.record(&ev);
    }

    fn apply_consent(
        &mut self,
        env: &mut impl Env,
        u: Update,
        decision: bool,
        source: &[u8],
        now: f64,
    ) {
        let before = self.consent;
        let decided = if decision {
            self.consent.decide(u)
        } else {
            self.consent.set_default(u);
            false
        };
        if decided {
            env.set(persist::CONSENT_KEY, &self.consent.encode_decisions());
        }
        self.consent_moved(env, before, now);
        // A visitor who has granted nothing beyond `necessary`, before or now, has no
        // profile: a refusal then sends nothing at all (the site's consent banner keeps its
        // own proof). From the first grant on, every change is sent, carrying the whole
        // state, so the profile's audit trail is complete from the moment it exists.
        let optional = (before.granted() | self.consent.granted()) & !NECESSARY;
        if decided && optional != 0 {
            let props = [(&b"source"[..], ValueRef::String(source))];
            let mut ev = self.event(env, EventKind::ConsentChange, now);
            ev.head.consent_granted = self.consent.granted();
            ev.head.consent_denied = self.consent.denied();
            ev.head.properties = &props;
            self.record(&ev);
        }
    }

    /// Applies a change of the effective consent state from `before`: drops and purges what
    /// a denial forbids, releases what a grant allows, starts or stops storing.
    fn consent_moved(&mut self, env: &mut impl Env, before: Consent, now: f64) {
        let newly_denied = self.consent.denied() & !before.denied();
        let granted = self.consent.granted();
        if newly_denied != 0 {
            self.consent_dropped += self.queue.remove(0, newly_denied);
            persist::purge(env, &self.key, newly_denied);
            self.dirty = true;
        }
        // Held events that need a newly denied purpose go; those now allowed are queued.
        self.consent_dropped += self.held.remove(0, newly_denied);
        self.held.update(Filter::Release {
            granted,
            into: &mut self.queue,
        });
        self.dropped += self.queue.trim(QUEUE_CAP);
        match (before.storage_allowed(), self.consent.storage_allowed()) {
            (false, true) => {
                self.store_ids(env);
                self.adopt(env, now);
                self.dirty = true;
            }
            (true, false) => {
                for key in &[persist::ANON_KEY, persist::USER_KEY, persist::SESSION_KEY] {
                    env.remove(key);
                }
                env.remove(&self.key);
            }
            _ => {}
        }
    }

    fn navigate(&mut self, env: &mut impl Env, url: &[u8], utm: [&[u8]; 5], now: f64) {
        // pushState, replaceState, popstate and hashchange often fire together or repeat:
        // a page view is counted once per URL change.
        if url == self.text[URL] {
            return;
        }
        if let Some(since) = self.visible_since {
            self.engaged_ms += now - since;
            self.visible_since = Some(now);
        }
        self.report_engaged(env, now);
        // The previous URL is the referrer; buffers are reused, not replaced.
        let [url_text, referrer, ..] = &mut self.text;
        if !url_text.is_empty() {
            mem::swap(referrer, url_text);
        }
        copy(url_text, url);
        if utm.iter().any(|u| !u.is_empty()) {
            for (d, s) in self.text[UTM..].iter_mut().zip(&utm) {
                copy(d, s);
            }
        }
        self.refresh_ctx();
        let ev = self.event(env, EventKind::Page, now);
        self.last_view = Some(ev.head.message_id);
        self.record(&ev);
    }

    fn hide(&mut self, env: &mut impl Env, now: f64, closed: bool) {
        if let Some(since) = self.visible_since.take() {
            self.engaged_ms += now - since;
        }
        self.report_engaged(env, now);
        // Everything goes out now, within the beacon budget, and stays queued (and stored)
        // until an answer confirms it, which a beacon never gives.
        self.queue.seal();
        let mut budget = BEACON_BUDGET;
        let key = &self.cfg.write_key;
        while let Some(b) = batch::next(&self.queue, now, &self.cfg.policy, key) {
            let body = batch::body(&self.queue, &b, key, now);
            if body.len() > budget || !env.send(&body, 0) {
                break;
            }
            batch::mark(&mut self.queue, &b, 0, now + BEACON_HOLD_MS);
            budget -= body.len();
        }
        // Browsers fire `pagehide` before the last `visibilitychange`: a page that has gone
        // stays gone until `pageshow` (a visible message) brings it back.
        self.closed |= closed;
        self.save(env, now);
    }

    fn report_engaged(&mut self, env: &mut impl Env, now: f64) {
        let ms = self.engaged_ms as i64;
        self.engaged_ms = 0.0;
        if ms > 0 {
            let props = [(&b"engaged_ms"[..], ValueRef::Int(ms))];
            let mut ev = self.event(env, EventKind::Track, now);
            ev.head.name = Some(ENGAGED_EVENT);
            ev.head.properties = &props;
            self.record(&ev);
        }
    }

    fn event<'a>(&mut self, env: &mut impl Env, kind: EventKind, ts: f64) -> Ev<'a> {
        let mut ev = Ev {
            head: EventRef::EMPTY,
            lists: &[],
        };
        ev.head.kind = kind;
        self.stamp(env, &mut ev, ts);
        ev
    }

    /// Gives `ev` a new message id, the time `ts` and its kind's declared purpose.
    fn stamp(&mut self, env: &mut impl Env, ev: &mut Ev<'_>, ts: f64) {
        let e = &mut ev.head;
        e.message_id = random(env);
        e.message_id[6] |= 1; // never all zero
        e.timestamp_ms = ts as i64;
        e.purpose = self.cfg.purposes[e.kind as usize];
    }

    /// Puts `ev` through the consent gate, encoded.
    fn record(&mut self, ev: &Ev<'_>) {
        let e = &ev.head;
        let ts = e.timestamp_ms as f64;
        if self.session.touch(ts, self.cfg.session_timeout) {
            self.refresh_ctx();
        }
        let need = e.purpose.bit() | e.kind.least_purpose().bit();
        let (queue, mask) = match self.consent.gate(need) {
            Gate::Drop => {
                self.consent_dropped += 1;
                return;
            }
            Gate::Send => (&mut self.queue, self.consent.granted()),
            Gate::Hold => (&mut self.held, 0),
        };
        queue.push(
            Head::new(e.message_id, ts, need, mask),
            &self.ctx,
            &ev.piece(),
        );
        self.dropped += self.queue.trim(QUEUE_CAP);
        self.held_dropped += self.held.trim(HELD_CAP);
    }

    fn sync_session(&mut self, env: &mut impl Env) {
        if !self.consent.storage_allowed() {
            return;
        }
        if let Some(stored) = env
            .get(persist::SESSION_KEY)
            .as_deref()
            .and_then(Session::decode)
            && stored.last > self.session.last
        {
            // Another tab saw activity more recently: its session is this one.
            self.session = stored;
            self.refresh_ctx();
        }
    }

    fn store_ids(&mut self, env: &mut impl Env) {
        if self.consent.storage_allowed() {
            env.set(persist::ANON_KEY, &self.text[ANON]);
            let user = &self.text[USER];
            if user.is_empty() {
                env.remove(persist::USER_KEY);
            } else {
                env.set(persist::USER_KEY, user);
            }
        }
    }

    fn adopt(&mut self, env: &mut impl Env, now: f64) {
        let mut adopted = persist::adopt(env, &self.key, now);
        // What needs a denied purpose is dropped (what a pending one, sent: it was collected
        // with consent).
        self.consent_dropped += adopted.remove(0, self.consent.denied());
        if !adopted.is_empty() {
            self.queue.0.extend_from_slice(&adopted.0);
            self.dropped += self.queue.trim(QUEUE_CAP);
            self.dirty = true;
        }
    }

    fn save(&mut self, env: &mut impl Env, now: f64) {
        self.dirty = false;
        if !self.consent.storage_allowed() {
            return;
        }
        self.saved_at = now;
        let stored = Stored {
            closed: self.closed,
            written: now,
            queue: mem::take(&mut self.queue),
        };
        persist::save(env, &self.key, &stored);
        self.queue = stored.queue;
        if self.session.start > 0.0 {
            env.set(persist::SESSION_KEY, &self.session.encode());
        }
    }

    fn refresh_ctx(&mut self) {
        self.text[SESSION] = self.session.id();
        let (w, h) = self.cfg.screen;
        self.ctx = wire::encode::context_texts(&self.text, w, h);
    }

    fn fail(&mut self, env: &mut impl Env, now: f64, retry_after: Option<f64>, error: u16) {
        let random = f64::from(u32::from_le_bytes(random(env))) / 4_294_967_296.0;
        self.retry_at = now + self.backoff.fail(retry_after, random);
        self.error = Some(error);
    }

    fn next_tick(&self, now: f64) -> f64 {
        if self.dirty {
            return 0.0;
        }
        let s = self.queue.stats(now);
        let policy = &self.cfg.policy;
        let mut next = policy
            .due(s.unsealed, s.unsealed_bytes, s.oldest, now, self.forced)
            .unwrap_or(f64::INFINITY);
        if self.in_flight == 0 {
            if s.sendable {
                next = next.min(self.retry_at - now);
            }
            next = next.min(s.next_hold - now);
        }
        if self.consent.storage_allowed() && s.events > 0 {
            next = next.min(self.saved_at + persist::REFRESH_MS - now);
        }
        if next == f64::INFINITY {
            NO_TICK
        } else {
            next.max(0.0)
        }
    }
}

/// Makes `to` a copy of `from`, in its own buffer.
fn copy(to: &mut Vec<u8>, from: &[u8]) {
    to.clear();
    to.extend_from_slice(from);
}

/// `N` random bytes.
fn random<const N: usize>(env: &mut impl Env) -> [u8; N] {
    let mut b = [0; N];
    env.random(&mut b);
    b
}
