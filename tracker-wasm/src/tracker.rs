//! The tracker: the loader's messages in, events through the consent gate into the queue,
//! batches out, answers back. The browser is behind [`Env`], so the whole flow runs in
//! native tests.
//!
//! Recording an event only queues it; sealing (encoding), storage writes and sending happen
//! in [`Tracker::tick`], which the loader runs from a timer. Every entry point returns when
//! the next tick is due ([`NO_TICK`] for none).

use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;

use wire::{Context, EventKind};

use crate::api::{self, Config};
use crate::backoff::{self, Backoff, Outcome};
use crate::batch;
use crate::consent::{ANALYTICS, Consent, Gate, NECESSARY, PERSONALIZATION, State, Update};
use crate::msg::Ev;
use crate::page::PageViews;
use crate::persist::{self, Header, Storage};
use crate::queue::{self, Ctx, Piece, Queue, Segment};
use crate::session::Session;
use crate::signals::{self, Gcm};
use crate::text;

/// Returned when no tick is needed.
pub const NO_TICK: f64 = -1.0;
/// The most events waiting to be sent (memory, and each tab's stored queue).
pub const QUEUE_CAP: usize = 1000;
/// The most events waiting for consent (memory only).
pub const HELD_CAP: usize = 200;
/// After a beacon, whose fate is unknown, its batch is kept and sent again (the collector
/// drops duplicates by message id) after this long (ms), or by the next page.
pub const BEACON_HOLD_MS: f64 = 60_000.0;
/// What one page may send by `sendBeacon` as it goes away (bytes): the browser's budget is
/// 64 KiB for all keepalive requests in flight.
pub const BEACON_BUDGET: usize = 60 * 1024;
/// The name of the event that reports visible time on a page (property `engaged_ms`).
pub const ENGAGED_EVENT: &str = "page_engaged";
/// The `source` property of a consent change (in message form, see [`Ev`]): `pz.consent`,
/// a TCF CMP, or Google Consent Mode.
const FROM_API: &str = "source\u{1d}s\u{1d}api";
const FROM_TCF: &str = "source\u{1d}s\u{1d}tcf";
const FROM_GCM: &str = "source\u{1d}s\u{1d}gcm";

/// What the tracker needs from the browser.
pub trait Env: Storage {
    /// The time, Unix ms (`Date.now()`).
    fn now(&self) -> f64;
    /// Fills `buf` with random bytes (`crypto.getRandomValues`).
    fn random(&mut self, buf: &mut [u8]);
    /// Starts a POST of `body` to `url`. `seq` 0 means "the page is going away": use
    /// `sendBeacon` (falling back to `fetch` with `keepalive`) and report nothing.
    /// Otherwise use `fetch` with `keepalive` and report the answer with
    /// [`Tracker::done`]`(seq, ..)`. Returns `false` when the request could not start.
    fn send(&mut self, url: &str, body: &[u8], seq: u32) -> bool;
}

/// A message from the loader, borrowing its text.
#[derive(Debug, Clone, PartialEq)]
pub enum Signal<'a> {
    /// The timer fired.
    Tick,
    /// An event from the page (without id and purpose; time 0: now).
    Event(Ev<'a>),
    /// `pz.consent(...)`: the visitor's decision.
    Consent(Update),
    /// `visibilitychange` to hidden.
    Hidden,
    /// `visibilitychange` to visible, or `pageshow` from the back-forward cache.
    Visible,
    /// `pagehide`: the page is going away.
    PageHide,
    /// Start, `pushState`, `replaceState`, `popstate`, `hashchange` or `pz.page()`: the URL
    /// (`location.href`) and its UTM parameters, which may have changed.
    Navigate(&'a str, [Option<&'a str>; 5]),
    /// A click on an element with `data-track="<name>"`.
    Click(&'a str),
    /// Another tab changed the stored consent decisions.
    ConsentSync,
    /// A TCF decision: bit `n` set when TCF purpose `n` has consent.
    Tcf(u16),
    /// A Consent Mode command: `update` (else `default`) and the granted / denied key bits
    /// (see [`signals::GCM_KEYS`]).
    Gcm(bool, u8, u8),
    /// `pz.flush()`.
    Flush,
    /// `pz.reset()`: a new anonymous id and session, no user id.
    Reset,
}

/// The tracker's whole state.
pub struct Tracker {
    cfg: Config,
    consent: Consent,
    gcm: Gcm,
    tab: String,
    anonymous_id: String,
    user_id: Option<String>,
    session: Session,
    url: String,
    referrer: String,
    utm: [Option<String>; 5],
    views: PageViews,
    last_view: Option<[u8; 16]>,
    visible_since: Option<f64>,
    engaged_ms: f64,
    ctx: Ctx,
    queue: Queue,
    /// Events waiting for consent (memory only), in segments; their mask is set when they
    /// are released.
    held: Vec<Segment>,
    held_dropped: u32,
    seq: u32,
    in_flight: u32,
    backoff: Backoff,
    retry_at: f64,
    forced: bool,
    dirty: bool,
    closed: bool,
    saved_at: f64,
    sent: u32,
    consent_dropped: u32,
    last_error: String,
}

impl Tracker {
    /// Starts tracking with `cfg`: restores consent decisions and, where storage is allowed,
    /// the ids, the session and the queues that closed tabs left. The first
    /// [`Signal::Navigate`] records the first page view.
    pub fn new(cfg: Config, env: &mut impl Env) -> Tracker {
        let now = env.now();
        let mut consent = Consent::default();
        if let Some(stored) = env.get(persist::CONSENT_KEY) {
            consent.load_decisions(&stored);
        }
        consent.set_default(cfg.defaults);
        consent.set_default(signals::gpc(cfg.gpc));
        let mut t = Tracker {
            consent,
            gcm: Gcm::default(),
            tab: random_hex(env),
            anonymous_id: new_id(env),
            user_id: None,
            session: Session::default(),
            url: String::new(),
            referrer: cfg.referrer.clone(),
            utm: Default::default(),
            views: PageViews::default(),
            last_view: None,
            visible_since: cfg.visible.then_some(now),
            engaged_ms: 0.0,
            ctx: Rc::new(Vec::new()),
            queue: Queue::new(QUEUE_CAP),
            held: Vec::new(),
            held_dropped: 0,
            seq: 0,
            in_flight: 0,
            backoff: Backoff::default(),
            retry_at: 0.0,
            forced: false,
            dirty: false,
            closed: false,
            saved_at: 0.0,
            sent: 0,
            consent_dropped: 0,
            last_error: String::new(),
            cfg,
        };
        if t.consent.storage_allowed() {
            if let Some(id) = env.get(persist::ANON_KEY).filter(|s| api::id(s).is_some()) {
                t.anonymous_id = id;
            }
            t.user_id = env.get(persist::USER_KEY).filter(|s| api::id(s).is_some());
            t.sync_session(env);
            t.store_ids(env);
            t.adopt(env, now);
        }
        t.refresh_ctx();
        t
    }

    /// Handles a message from the loader.
    pub fn signal(&mut self, env: &mut impl Env, signal: Signal<'_>) -> f64 {
        let now = env.now();
        match signal {
            Signal::Tick => return self.tick(env),
            Signal::Event(e) => self.api_event(env, e, now),
            Signal::Consent(u) => self.apply_consent(env, u, true, FROM_API, now),
            Signal::Hidden => self.hide(env, now, false),
            Signal::PageHide => self.hide(env, now, true),
            Signal::Visible => {
                if self.visible_since.is_none() {
                    self.visible_since = Some(now);
                }
                self.closed = false;
                self.dirty = true;
                self.sync_session(env);
            }
            Signal::Navigate(url, utm) => self.navigate(env, url, utm, now),
            Signal::Click(name) => {
                if self.cfg.track_clicks
                    && let Some(name) = api::text(name)
                {
                    let mut ev = self.event(env, EventKind::Track, now);
                    ev.head.name = Some(name);
                    self.record(&ev);
                }
            }
            Signal::ConsentSync => {
                let before = self.consent;
                if let Some(stored) = env.get(persist::CONSENT_KEY) {
                    self.consent.load_decisions(&stored);
                }
                self.consent_moved(env, before, now);
            }
            Signal::Tcf(bits) => self.apply_consent(env, signals::tcf(bits), true, FROM_TCF, now),
            Signal::Gcm(update, granted, denied) => {
                let u = self.gcm.command(granted, denied);
                self.apply_consent(env, u, update, FROM_GCM, now);
            }
            Signal::Flush => self.forced = true,
            Signal::Reset => {
                self.anonymous_id = new_id(env);
                self.session = Session::default();
                self.user_id = None;
                self.store_ids(env);
                self.touch_session(now);
                self.refresh_ctx();
                self.dirty = true;
            }
        }
        self.next_tick(now)
    }

    /// The timer: seals due events into batches, stores what changed, and sends the oldest
    /// batch unless one is in flight or a retry is waiting.
    pub fn tick(&mut self, env: &mut impl Env) -> f64 {
        let now = env.now();
        let q = &self.queue;
        let due = self.cfg.policy.due(
            q.unsealed(),
            batch::unsealed_bytes(q),
            q.oldest_unsealed(),
            now,
            self.forced,
        );
        if due == Some(0.0) {
            batch::seal(&mut self.queue, &self.cfg.write_key, now, &self.cfg.policy);
            self.dirty = true;
        }
        self.forced = false;
        let refresh = self.consent.storage_allowed()
            && !self.queue.sealed.is_empty()
            && now - self.saved_at >= persist::REFRESH_MS;
        if self.dirty || refresh {
            self.save(env, now);
        }
        if self.in_flight == 0 && now >= self.retry_at {
            self.seq = self.seq.wrapping_add(1).max(1);
            let seq = self.seq;
            if let Some(b) = self.queue.next_sendable(now) {
                wire::encode::set_sent_at(&mut b.body, now as i64);
                b.seq = seq;
                self.in_flight = seq;
                if !env.send(&self.cfg.endpoint, &b.body, seq) {
                    self.in_flight = 0;
                    self.queue.release(seq);
                    self.fail(env, now, None, "send failed");
                }
            }
        }
        self.next_tick(now)
    }

    /// The collector answered request `seq` with `status` (0: network error) and maybe a
    /// `Retry-After` header.
    pub fn done(
        &mut self,
        env: &mut impl Env,
        seq: u32,
        status: u16,
        retry_after: Option<&str>,
    ) -> f64 {
        let now = env.now();
        if seq != 0 && seq == self.in_flight {
            self.in_flight = 0;
            self.dirty = true;
            match backoff::outcome(status) {
                Outcome::Ack => {
                    self.sent += self.queue.finish(seq);
                    self.backoff.reset();
                    self.retry_at = 0.0;
                }
                Outcome::Drop => {
                    self.queue.finish(seq);
                    self.last_error = status_text(status);
                }
                Outcome::Retry => {
                    self.queue.release(seq);
                    let error = status_text(status);
                    self.fail(env, now, backoff::retry_after_ms(retry_after), &error);
                }
            }
        }
        self.next_tick(now)
    }

    /// The state for tests and debugging (`pz.debug()`).
    pub fn debug(&self) -> Debug<'_> {
        let in_flight = self
            .queue
            .sealed
            .iter()
            .filter(|b| b.seq != 0)
            .map(|b| b.count)
            .sum();
        let mut consent = [State::Pending; 4];
        for (i, c) in consent.iter_mut().enumerate() {
            *c = self.consent.state(1 << i);
        }
        Debug {
            counts: [
                self.queue.len() as u32,
                held(&self.held) as u32,
                in_flight,
                self.queue.dropped,
                self.held_dropped,
                self.consent_dropped,
                self.sent,
                self.backoff.attempts(),
            ],
            consent,
            persistent: self.consent.storage_allowed(),
            ids: [
                &self.anonymous_id,
                self.user_id.as_deref().unwrap_or(""),
                &self.session.id,
                &self.last_error,
            ],
        }
    }

    fn api_event(&mut self, env: &mut impl Env, ev: Ev<'_>, now: f64) {
        // Declared before `ev`, which may borrow it (an alias's previous id).
        let previous: String;
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
                if let Some(id) = self.last_view.take() {
                    let segments = self.queue.segments.iter_mut().chain(self.held.iter_mut());
                    for s in segments {
                        for view in s.events.iter_mut() {
                            if view.id == id {
                                ev.head.message_id = id;
                                ev.head.timestamp_ms = view.ts as i64;
                                view.bytes = ev.piece();
                                return;
                            }
                        }
                    }
                }
            }
            EventKind::Identify | EventKind::Alias => {
                let Some(user) = ev.head.user_id else {
                    return;
                };
                previous = self
                    .user_id
                    .replace(user.into())
                    .unwrap_or(self.anonymous_id.clone());
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
        source: &str,
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
            let mut ev = self.event(env, EventKind::ConsentChange, now);
            ev.head.consent_granted = self.consent.granted();
            ev.head.consent_denied = self.consent.denied();
            ev.properties = source;
            self.record(&ev);
        }
    }

    /// Applies a change of the effective consent state from `before`: drops and purges what
    /// a denial forbids, releases what a grant allows, starts or stops storing.
    fn consent_moved(&mut self, env: &mut impl Env, before: Consent, now: f64) {
        let newly_denied = self.consent.denied() & !before.denied();
        let granted = self.consent.granted();
        if newly_denied != 0 {
            self.consent_dropped += self.queue.purge(newly_denied);
            persist::purge(env, newly_denied);
            self.dirty = true;
        }
        for s in core::mem::take(&mut self.held) {
            if s.need & newly_denied != 0 {
                self.consent_dropped += s.events.len() as u32;
            } else if self.consent.gate(s.need) == Gate::Send {
                for ev in s.events {
                    self.queue.push(ev, &s.ctx, granted, s.need);
                }
            } else {
                self.held.push(s);
            }
        }
        let could_store = before.granted() & (ANALYTICS | PERSONALIZATION) != 0;
        match (could_store, self.consent.storage_allowed()) {
            (false, true) => {
                self.store_ids(env);
                self.adopt(env, now);
                self.dirty = true;
            }
            (true, false) => {
                for key in [persist::ANON_KEY, persist::USER_KEY, persist::SESSION_KEY] {
                    env.remove(key);
                }
                env.remove(&persist::queue_key(&self.tab));
            }
            _ => {}
        }
    }

    fn navigate(&mut self, env: &mut impl Env, url: &str, utm: [Option<&str>; 5], now: f64) {
        if url == self.url {
            return;
        }
        if let Some(since) = self.visible_since {
            self.engaged_ms += now - since;
            self.visible_since = Some(now);
        }
        self.report_engaged(env, now);
        let previous = core::mem::replace(&mut self.url, url.into());
        if !previous.is_empty() {
            self.referrer = previous;
        }
        if utm.iter().any(Option::is_some) {
            self.utm = utm.map(|u| u.map(String::from));
        }
        self.refresh_ctx();
        if self.views.count(&self.url) {
            let ev = self.event(env, EventKind::Page, now);
            self.last_view = Some(ev.head.message_id);
            self.record(&ev);
        }
    }

    fn hide(&mut self, env: &mut impl Env, now: f64, closed: bool) {
        if let Some(since) = self.visible_since.take() {
            self.engaged_ms += now - since;
        }
        self.report_engaged(env, now);
        // Everything goes out now, within the beacon budget, and stays queued (and stored)
        // until an answer confirms it, which a beacon never gives.
        batch::seal(&mut self.queue, &self.cfg.write_key, now, &self.cfg.policy);
        let mut budget = BEACON_BUDGET;
        while let Some(b) = self.queue.next_sendable(now) {
            if b.body.len() > budget {
                break;
            }
            wire::encode::set_sent_at(&mut b.body, now as i64);
            if !env.send(&self.cfg.endpoint, &b.body, 0) {
                break;
            }
            b.hold_until = now + BEACON_HOLD_MS;
            budget -= b.body.len();
        }
        // Browsers fire `pagehide` before the last `visibilitychange`: a page that has gone
        // stays gone until `pageshow` (Signal::Visible) brings it back.
        self.closed |= closed;
        self.save(env, now);
    }

    fn report_engaged(&mut self, env: &mut impl Env, now: f64) {
        let ms = self.engaged_ms as i64;
        self.engaged_ms = 0.0;
        if ms > 0 {
            let mut props = String::from("engaged_ms\u{1d}n\u{1d}");
            text::push_u64(&mut props, ms as u64);
            let mut ev = self.event(env, EventKind::Track, now);
            ev.head.name = Some(ENGAGED_EVENT);
            ev.properties = &props;
            self.record(&ev);
        }
    }

    fn event(&mut self, env: &mut impl Env, kind: EventKind, ts: f64) -> Ev<'static> {
        let mut ev = Ev::default();
        ev.head.kind = kind;
        self.stamp(env, &mut ev, ts);
        ev
    }

    /// Gives `ev` a new message id, the time `ts` and its kind's declared purpose.
    fn stamp(&mut self, env: &mut impl Env, ev: &mut Ev<'_>, ts: f64) {
        let e = &mut ev.head;
        env.random(&mut e.message_id);
        e.message_id[6] |= 1; // never all zero
        e.timestamp_ms = ts as i64;
        e.purpose = self.cfg.purposes[e.kind as usize];
    }

    /// Puts `ev` through the consent gate, encoded.
    fn record(&mut self, ev: &Ev<'_>) {
        let e = &ev.head;
        if self.touch_session(e.timestamp_ms as f64) {
            self.refresh_ctx();
        }
        let need = e.purpose.bit() | e.kind.least_purpose().bit();
        let gate = self.consent.gate(need);
        if gate == Gate::Drop {
            self.consent_dropped += 1;
            return;
        }
        let piece = Piece {
            id: e.message_id,
            ts: e.timestamp_ms as f64,
            bytes: ev.piece(),
        };
        match gate {
            Gate::Send => self
                .queue
                .push(piece, &self.ctx, self.consent.granted(), need),
            Gate::Hold => {
                if held(&self.held) >= HELD_CAP
                    && let Some(first) = self.held.first_mut()
                {
                    first.events.remove(0);
                    if first.events.is_empty() {
                        self.held.remove(0);
                    }
                    self.held_dropped += 1;
                }
                queue::append(&mut self.held, piece, &self.ctx, 0, need);
            }
            Gate::Drop => {}
        }
    }

    /// Records activity; returns whether a new session started.
    fn touch_session(&mut self, ts: f64) -> bool {
        self.session.touch(ts, self.cfg.session_timeout)
    }

    fn sync_session(&mut self, env: &mut impl Env) {
        if !self.consent.storage_allowed() {
            return;
        }
        if let Some(stored) = env
            .get(persist::SESSION_KEY)
            .as_deref()
            .and_then(Session::decode)
        {
            let id = self.session.id.clone();
            self.session.merge(stored);
            if self.session.id != id {
                self.refresh_ctx();
            }
        }
    }

    fn store_ids(&mut self, env: &mut impl Env) {
        if self.consent.storage_allowed() {
            env.set(persist::ANON_KEY, &self.anonymous_id);
            match &self.user_id {
                Some(u) => env.set(persist::USER_KEY, u),
                None => {
                    env.remove(persist::USER_KEY);
                    true
                }
            };
        }
    }

    fn adopt(&mut self, env: &mut impl Env, now: f64) {
        let consent = self.consent;
        let mut adopted = persist::adopt(env, &self.tab, now);
        let before = adopted.len();
        adopted.retain(|b| consent.gate(b.need) != Gate::Drop);
        self.consent_dropped += (before - adopted.len()) as u32;
        if !adopted.is_empty() {
            self.queue.extend_sealed(adopted);
            self.dirty = true;
        }
    }

    fn save(&mut self, env: &mut impl Env, now: f64) {
        self.dirty = false;
        if !self.consent.storage_allowed() {
            return;
        }
        self.saved_at = now;
        let header = Header {
            closed: self.closed,
            written: now,
        };
        persist::save(env, &self.tab, &self.queue.sealed, header);
        if !self.session.id.is_empty() {
            env.set(persist::SESSION_KEY, &self.session.encode());
        }
    }

    fn refresh_ctx(&mut self) {
        let opt = |s: &str, max| {
            let s = text::clip(s, max);
            (!s.is_empty()).then(|| String::from(s))
        };
        let utm = |i: usize| {
            self.utm[i]
                .as_deref()
                .and_then(|u| opt(u, wire::decode::MAX_STRING_BYTES))
        };
        self.ctx = Rc::new(wire::encode::context(&Context {
            page_url: opt(&self.url, wire::decode::MAX_URL_BYTES),
            referrer: opt(&self.referrer, wire::decode::MAX_URL_BYTES),
            utm_source: utm(0),
            utm_medium: utm(1),
            utm_campaign: utm(2),
            utm_term: utm(3),
            utm_content: utm(4),
            locale: self.cfg.locale.clone(),
            timezone: self.cfg.timezone.clone(),
            screen_width: self.cfg.screen.0,
            screen_height: self.cfg.screen.1,
            session_id: opt(&self.session.id, 64),
            anonymous_id: opt(&self.anonymous_id, api::MAX_ID_BYTES),
            user_id: self.user_id.clone(),
        }));
    }

    fn fail(&mut self, env: &mut impl Env, now: f64, retry_after: Option<f64>, error: &str) {
        let mut r = [0u8; 4];
        env.random(&mut r);
        let random = f64::from(u32::from_le_bytes(r)) / 4_294_967_296.0;
        self.retry_at = now + self.backoff.fail(retry_after, random);
        self.last_error = error.into();
    }

    fn next_tick(&self, now: f64) -> f64 {
        if self.dirty {
            return 0.0;
        }
        let mut next = f64::INFINITY;
        let mut at = |t: f64| {
            if t < next {
                next = t;
            }
        };
        let q = &self.queue;
        let policy = &self.cfg.policy;
        if let Some(wait) = policy.due(
            q.unsealed(),
            batch::unsealed_bytes(q),
            q.oldest_unsealed(),
            now,
            self.forced,
        ) {
            at(wait);
        }
        if self.in_flight == 0 {
            if q.sealed.iter().any(|b| b.sendable(now)) {
                at(self.retry_at - now);
            }
            if let Some(h) = q.next_hold(now) {
                at(h - now);
            }
        }
        if self.consent.storage_allowed() && !q.sealed.is_empty() {
            at(self.saved_at + persist::REFRESH_MS - now);
        }
        if next == f64::INFINITY {
            NO_TICK
        } else if next < 0.0 {
            0.0
        } else {
            next
        }
    }
}

/// A snapshot of the tracker's state, for tests and debugging.
#[derive(Debug, Clone, PartialEq)]
pub struct Debug<'a> {
    /// Events queued, held for consent, in flight, dropped from the full queue, dropped
    /// from the full held list, dropped for lack of consent, and sent (acknowledged); then
    /// failed tries since the last success. In the order of [`Debug::COUNTS`].
    pub counts: [u32; 8],
    /// The state of each purpose, by wire value.
    pub consent: [State; 4],
    /// Whether ids and queue are kept in localStorage.
    pub persistent: bool,
    /// Anonymous id, user id, session id, last delivery error; empty when none.
    pub ids: [&'a str; 4],
}

impl Debug<'_> {
    /// The names of [`Debug::counts`], as `pz.debug()` shows them.
    pub const COUNTS: [&'static str; 8] = [
        "queued",
        "held",
        "inFlight",
        "dropped",
        "heldDropped",
        "consentDropped",
        "sent",
        "retries",
    ];

    /// The count named `name` (one of [`Debug::COUNTS`]).
    pub fn count(&self, name: &str) -> Option<u32> {
        let i = Self::COUNTS.iter().position(|n| *n == name)?;
        Some(self.counts[i])
    }

    /// The text the loader turns into `pz.debug()`'s object: the counts, one letter per
    /// purpose (`g`ranted, `d`enied, `p`ending), `1` or `0` for persistent, then the ids,
    /// separated by U+001F. Text, not JSON: escaping JSON in Rust costs more wasm than the
    /// few lines of script that build the object.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        for n in self.counts {
            text::push_u64(&mut s, u64::from(n));
            s.push('\u{1f}');
        }
        for c in self.consent {
            s.push(match c {
                State::Granted => 'g',
                State::Denied => 'd',
                State::Pending => 'p',
            });
        }
        s.push(if self.persistent { '1' } else { '0' });
        for id in self.ids {
            s.push('\u{1f}');
            s.push_str(id);
        }
        s
    }
}

/// How many events wait in `segments`.
fn held(segments: &[Segment]) -> usize {
    segments.iter().map(|s| s.events.len()).sum()
}

fn new_id(env: &mut impl Env) -> String {
    let mut b = [0u8; 16];
    env.random(&mut b);
    text::uuid(b)
}

fn random_hex(env: &mut impl Env) -> String {
    let mut b = [0u8; 8];
    env.random(&mut b);
    let mut s = String::new();
    text::push_hex(&mut s, &b);
    s
}

fn status_text(status: u16) -> String {
    if status == 0 {
        "network error".into()
    } else {
        let mut s = String::from("HTTP ");
        text::push_u64(&mut s, u64::from(status));
        s
    }
}
