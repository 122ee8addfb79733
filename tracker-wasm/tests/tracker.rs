//! The whole tracker against a fake browser: consent gate, batching, delivery and retries,
//! storage rules, tabs, page views. Every batch sent is decoded with `wire::decode`.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use tracker_wasm::msg::{self, Reader};
use tracker_wasm::{Env, Storage, Tracker};
use wire::{Batch, EventKind, Value};

type Shared = Rc<RefCell<BTreeMap<Vec<u8>, Vec<u8>>>>;

/// A browser: a clock, counting "random" bytes, localStorage (shareable between tabs) and
/// the requests started.
struct Browser {
    now: f64,
    counter: u8,
    storage: Shared,
    sent: Vec<(Batch, u32)>,
}

impl Browser {
    fn new(storage: &Shared) -> Browser {
        Browser {
            now: 1_700_000_000_000.0,
            counter: 0,
            storage: storage.clone(),
            sent: Vec::new(),
        }
    }

    fn take_sent(&mut self) -> Vec<(Batch, u32)> {
        std::mem::take(&mut self.sent)
    }
}

impl Storage for Browser {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.storage.borrow().get(key).cloned()
    }
    fn set(&mut self, key: &[u8], value: &[u8]) -> bool {
        self.storage.borrow_mut().insert(key.into(), value.into());
        true
    }
    fn remove(&mut self, key: &[u8]) {
        self.storage.borrow_mut().remove(key);
    }
    fn keys(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for k in self.storage.borrow().keys() {
            out.extend_from_slice(k);
            out.push(0x1f);
        }
        out
    }
}

impl Env for Browser {
    fn now(&self) -> f64 {
        self.now
    }
    fn random(&mut self, buf: &mut [u8]) {
        for b in buf {
            self.counter = self.counter.wrapping_add(1);
            *b = self.counter;
        }
    }
    fn send(&mut self, body: &[u8], seq: u32) -> bool {
        let batch = wire::decode(body, &wire::Limits::default()).expect("a valid batch");
        self.sent.push((batch, seq));
        true
    }
}

/// A loader message under construction (see `tracker_wasm::msg`).
struct W(Vec<u8>);

impl W {
    fn new(kind: u32) -> W {
        W(Vec::new()).num(f64::from(kind))
    }
    fn num(mut self, n: f64) -> W {
        self.0.extend_from_slice(&n.to_le_bytes());
        self
    }
    fn text(mut self, t: &str) -> W {
        self.0.extend_from_slice(&(t.len() as u16).to_le_bytes());
        self.0.extend_from_slice(t.as_bytes());
        self
    }
    /// Hands the message to the tracker.
    fn to(self, t: &mut Tracker, b: &mut Browser) -> f64 {
        t.handle(b, &self.0)
    }
}

/// An init message with `granted` and `denied` as the consent defaults.
fn init(b: &mut Browser, granted: u8, denied: u8, flush_at: u32) -> Tracker {
    let mut w = W::new(msg::INIT)
        .text("demo")
        .text("https://ref.example/")
        .text("en-GB")
        .text("Europe/Berlin");
    for n in [
        f64::from(flush_at),
        1000.0,
        f64::NAN,
        0.0,
        f64::from(granted),
        f64::from(denied),
        0.0,
        1.0,
        1280.0,
        800.0,
    ] {
        w = w.num(n);
    }
    let mut r = Reader(&w.0);
    assert_eq!(msg::kind(&mut r), msg::INIT);
    let mut t = Tracker::EMPTY;
    t.start(&mut r, b);
    t
}

fn nav(t: &mut Tracker, b: &mut Browser, url: &str) -> f64 {
    W::new(msg::NAVIGATION).text(url).to(t, b)
}

/// `pz.track(name, {n: 1})`.
fn track(t: &mut Tracker, b: &mut Browser, name: &str) -> f64 {
    W::new(msg::EVENT)
        .num(1.0)
        .num(0.0)
        .text(name)
        .text("")
        .text("")
        .num(0.0)
        .text("")
        .num(1.0)
        .text("n")
        .num(2.0)
        .num(1.0)
        .to(t, b)
}

/// The state `pz.debug()` shows, by name.
fn debug(t: &Tracker) -> BTreeMap<&'static str, String> {
    let text = String::from_utf8(t.debug()).unwrap();
    let f: Vec<&str> = text.split('\u{1f}').collect();
    let names = [
        "queued",
        "held",
        "inFlight",
        "dropped",
        "heldDropped",
        "consentDropped",
        "sent",
        "retries",
        "consent",
        "lastError",
        "anonymousId",
        "userId",
        "sessionId",
    ];
    assert_eq!(f.len(), names.len(), "{text:?}");
    names
        .into_iter()
        .zip(f.into_iter().map(String::from))
        .collect()
}

fn count(t: &Tracker, name: &str) -> u32 {
    debug(t)[name].parse().unwrap()
}

fn consent(t: &mut Tracker, b: &mut Browser, grant: u8, deny: u8) -> f64 {
    W::new(msg::CONSENT)
        .num(f64::from(grant))
        .num(f64::from(deny))
        .to(t, b)
}

/// Runs the timer at `after` ms from now.
fn tick_after(t: &mut Tracker, b: &mut Browser, after: f64) -> f64 {
    b.now += after;
    t.tick(b)
}

/// Ticks and acknowledges every request until nothing more goes out; returns the batches.
fn drain(t: &mut Tracker, b: &mut Browser) -> Vec<(Batch, u32)> {
    let mut all = Vec::new();
    loop {
        t.tick(b);
        let sent = b.take_sent();
        if sent.is_empty() {
            return all;
        }
        for (batch, seq) in sent {
            t.done(b, seq, 200, f64::NAN);
            all.push((batch, seq));
        }
    }
}

fn names(batch: &Batch) -> Vec<String> {
    batch
        .events
        .iter()
        .map(|e| match e.kind {
            EventKind::Track => e.name.clone().unwrap_or_default(),
            other => format!("{other:?}"),
        })
        .collect()
}

fn shared() -> Shared {
    Rc::new(RefCell::new(BTreeMap::new()))
}

#[test]
fn pending_events_wait_in_memory_and_go_out_once_granted() {
    let store = shared();
    let mut b = Browser::new(&store);
    let mut t = init(&mut b, 0, 0, 20);
    nav(&mut t, &mut b, "https://shop.example/");
    track(&mut t, &mut b, "early");
    tick_after(&mut t, &mut b, 5000.0);
    assert!(b.take_sent().is_empty(), "nothing leaves before consent");
    assert!(
        store.borrow().keys().all(|k| k == b"pz_c"),
        "nothing stored: {:?}",
        store.borrow().keys()
    );

    consent(&mut t, &mut b, 2 | 4, 8);
    b.now += 1000.0;
    let sent = drain(&mut t, &mut b);
    // Held events keep the context they were collected in; the consent change is its own
    // segment (it needs only `necessary`).
    let all: Vec<String> = sent.iter().flat_map(|(batch, _)| names(batch)).collect();
    assert_eq!(all, ["Page", "early", "ConsentChange"]);
    for (batch, _) in &sent {
        assert_eq!(batch.consent, 1 | 2 | 4, "the mask when released");
        assert_eq!(batch.write_key, "demo");
        assert_eq!(
            batch.context.page_url.as_deref(),
            Some("https://shop.example/")
        );
        assert_eq!(batch.context.timezone.as_deref(), Some("Europe/Berlin"));
    }
    let change = sent
        .iter()
        .flat_map(|(b, _)| &b.events)
        .find(|e| e.kind == EventKind::ConsentChange)
        .unwrap();
    assert_eq!((change.consent_granted, change.consent_denied), (7, 8));
    assert_eq!(change.purpose, wire::Purpose::Necessary);
    // Storage is allowed now: the anonymous id is kept.
    let anon = store.borrow().get(&b"pz_a"[..]).cloned();
    assert_eq!(
        anon,
        sent[0]
            .0
            .context
            .anonymous_id
            .clone()
            .map(String::into_bytes)
    );
}

#[test]
fn a_first_refusal_sends_nothing_and_a_later_grant_sends_the_whole_state() {
    let store = shared();
    let mut b = Browser::new(&store);
    let mut t = init(&mut b, 0, 0, 20);
    nav(&mut t, &mut b, "https://shop.example/");
    track(&mut t, &mut b, "refused");
    consent(&mut t, &mut b, 0, 2 | 4 | 8);
    tick_after(&mut t, &mut b, 60_000.0);
    assert!(b.take_sent().is_empty(), "no request leaves the page");
    assert_eq!(count(&t, "consentDropped"), 2);

    consent(&mut t, &mut b, 2, 0);
    b.now += 1000.0;
    let sent = drain(&mut t, &mut b);
    let changes: Vec<(u8, u8)> = sent
        .iter()
        .flat_map(|(b, _)| &b.events)
        .filter(|e| e.kind == EventKind::ConsentChange)
        .map(|e| (e.consent_granted, e.consent_denied))
        .collect();
    assert_eq!(
        changes,
        [(1 | 2, 4 | 8)],
        "one change, with the earlier refusals"
    );
}

#[test]
fn denial_discards_held_events_and_purges_storage() {
    let store = shared();
    let mut b = Browser::new(&store);
    let mut t = init(&mut b, 2, 0, 20);
    nav(&mut t, &mut b, "https://shop.example/");
    track(&mut t, &mut b, "stored");
    tick_after(&mut t, &mut b, 1000.0);
    // The collector is down: the batch stays, stored.
    let (_, seq) = b.take_sent().pop().unwrap();
    t.done(&mut b, seq, 503, 30.0);
    t.tick(&mut b);
    assert!(store.borrow().keys().any(|k| k.starts_with(b"pz_q_")));

    consent(&mut t, &mut b, 0, 2 | 4 | 8);
    tick_after(&mut t, &mut b, 31_000.0);
    let sent = b.take_sent();
    // Only the consent change (necessary) leaves, under a mask of necessary only.
    assert_eq!(sent.len(), 1);
    assert_eq!(names(&sent[0].0), ["ConsentChange"]);
    assert_eq!(sent[0].0.consent, 1);
    let keys: Vec<Vec<u8>> = store.borrow().keys().cloned().collect();
    assert_eq!(keys, [b"pz_c"], "ids and queue are gone");
    assert_eq!(count(&t, "consentDropped"), 2);
}

#[test]
fn batches_go_out_on_count_or_after_the_interval() {
    let store = shared();
    let mut b = Browser::new(&store);
    let mut t = init(&mut b, 2, 0, 5);
    nav(&mut t, &mut b, "https://shop.example/");
    t.tick(&mut b);
    // One event waiting: due a second after it happened.
    assert_eq!(tick_after(&mut t, &mut b, 400.0), 600.0);
    assert!(b.take_sent().is_empty());
    for i in 0..4 {
        track(&mut t, &mut b, &format!("t{i}"));
    }
    // Five waiting: due now; afterwards only the stored queue's refresh is on the timer.
    assert_eq!(
        tick_after(&mut t, &mut b, 0.0),
        tracker_wasm::persist::REFRESH_MS
    );
    let sent = b.take_sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(names(&sent[0].0), ["Page", "t0", "t1", "t2", "t3"]);
}

#[test]
fn retries_back_off_honour_retry_after_and_send_the_same_events() {
    let store = shared();
    let mut b = Browser::new(&store);
    let mut t = init(&mut b, 2, 0, 1);
    nav(&mut t, &mut b, "https://shop.example/");
    t.tick(&mut b);
    let (first, seq) = b.take_sent().pop().unwrap();
    // The answer only marks the queue for storing: the timer runs at once.
    assert_eq!(t.done(&mut b, seq, 503, 10.0), 0.0);
    assert_eq!(t.tick(&mut b), 10_000.0, "waits for Retry-After");
    assert_eq!(tick_after(&mut t, &mut b, 9000.0), 1000.0);
    assert!(b.take_sent().is_empty());
    tick_after(&mut t, &mut b, 1000.0);
    let (again, seq) = b.take_sent().pop().unwrap();
    assert_eq!(again.events, first.events, "same message ids");
    assert_eq!(
        again.sent_at_ms,
        first.sent_at_ms + 10_000,
        "send time restamped"
    );
    // A refusal for good (400) is not retried.
    track(&mut t, &mut b, "next");
    t.done(&mut b, seq, 200, f64::NAN);
    t.tick(&mut b);
    let (_, seq) = b.take_sent().pop().unwrap();
    t.done(&mut b, seq, 400, f64::NAN);
    tick_after(&mut t, &mut b, 600_000.0);
    assert!(b.take_sent().is_empty());
    assert_eq!(debug(&t)["lastError"], "400", "the last error");
    assert_eq!(count(&t, "sent"), 1);
}

#[test]
fn a_closed_page_beacons_and_the_next_page_sends_what_may_be_lost() {
    let store = shared();
    let mut b = Browser::new(&store);
    let mut t = init(&mut b, 2, 0, 20);
    nav(&mut t, &mut b, "https://shop.example/a");
    track(&mut t, &mut b, "clicked");
    b.now += 2000.0;
    // The order browsers use when a page unloads.
    W::new(msg::PAGEHIDE).to(&mut t, &mut b);
    W::new(msg::HIDDEN).to(&mut t, &mut b);
    let sent = b.take_sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].1, 0, "a beacon");
    assert_eq!(names(&sent[0].0), ["Page", "clicked", "page_engaged"]);
    let engaged = &sent[0].0.events[2].properties[0];
    assert_eq!(
        (engaged.key.as_str(), &engaged.value),
        ("engaged_ms", &Value::Int(2000))
    );

    // The next page (same storage) sends the beaconed batch again: the collector drops
    // duplicates by message id, so nothing is counted twice and nothing is lost.
    let mut b2 = Browser::new(&store);
    b2.counter = 100;
    let mut next = init(&mut b2, 2, 0, 20);
    next.tick(&mut b2);
    let resent = b2.take_sent();
    assert_eq!(resent[0].0.events, sent[0].0.events);
    assert_eq!(
        resent[0].0.context.anonymous_id, sent[0].0.context.anonymous_id,
        "the stored anonymous id"
    );
}

#[test]
fn an_open_tab_keeps_its_stored_events_to_itself() {
    let store = shared();
    let mut a = Browser::new(&store);
    let mut tab_a = init(&mut a, 2, 0, 20);
    nav(&mut tab_a, &mut a, "https://shop.example/a");
    tab_a.tick(&mut a);
    tick_after(&mut tab_a, &mut a, 1000.0);
    // Tab A's batch is in flight (and stored) when tab B opens.
    assert_eq!(a.take_sent().len(), 1);
    let mut b = Browser::new(&store);
    b.now = a.now;
    b.counter = 50;
    let mut tab_b = init(&mut b, 2, 0, 20);
    tick_after(&mut tab_b, &mut b, 0.0);
    assert!(
        b.take_sent().is_empty(),
        "tab B does not send tab A's events"
    );
}

#[test]
fn spa_navigation_counts_each_new_url_once_and_page_names_the_automatic_view() {
    let store = shared();
    let mut b = Browser::new(&store);
    let mut t = init(&mut b, 2, 0, 100);
    nav(&mut t, &mut b, "https://shop.example/");
    // pz.page('Home', {section: 'top'}) right after: it names the automatic view.
    W::new(msg::EVENT)
        .num(0.0)
        .num(0.0)
        .text("Home")
        .text("")
        .text("")
        .num(0.0)
        .text("")
        .num(1.0)
        .text("section")
        .num(1.0)
        .text("top")
        .to(&mut t, &mut b);
    for url in [
        "https://shop.example/p/1",
        "https://shop.example/p/1",
        "https://shop.example/p/1#reviews",
    ] {
        nav(&mut t, &mut b, url);
    }
    W::new(msg::FLUSH).to(&mut t, &mut b);
    let sent = drain(&mut t, &mut b);
    let pages: Vec<(Option<String>, Option<String>)> = sent
        .iter()
        .flat_map(|(batch, _)| batch.events.iter().map(move |e| (e, batch)))
        .filter(|(e, _)| e.kind == EventKind::Page)
        .map(|(e, batch)| (e.name.clone(), batch.context.page_url.clone()))
        .collect();
    assert_eq!(
        pages,
        [
            (Some("Home".into()), Some("https://shop.example/".into())),
            (None, Some("https://shop.example/p/1".into())),
            (None, Some("https://shop.example/p/1#reviews".into())),
        ]
    );
    // The second view's referrer is the first URL.
    let second = &sent
        .iter()
        .find(|(b, _)| b.context.page_url.as_deref() == Some("https://shop.example/p/1"))
        .unwrap()
        .0;
    assert_eq!(
        second.context.referrer.as_deref(),
        Some("https://shop.example/")
    );
}

#[test]
fn a_session_ends_after_thirty_idle_minutes() {
    let store = shared();
    let mut b = Browser::new(&store);
    let mut t = init(&mut b, 2, 0, 1);
    nav(&mut t, &mut b, "https://shop.example/");
    let mut sent = drain(&mut t, &mut b);
    b.now += 31.0 * 60_000.0;
    track(&mut t, &mut b, "later");
    sent.extend(drain(&mut t, &mut b));
    let sessions: Vec<Option<String>> = sent
        .into_iter()
        .map(|(batch, _)| batch.context.session_id)
        .collect();
    assert_eq!(sessions.len(), 2);
    assert_ne!(sessions[0], sessions[1]);
}
