// The pz loader. `cargo xtask build-tracker` appends it to the wasm-bindgen glue (target
// no-modules, which defines `wasm_bindgen`), wraps both in one function and minifies them
// into www/t/pz.js.
//
// It loads the wasm, replays the snippet's queue in order and replaces the stub methods;
// checks the page's arguments (one console.warn per distinct problem, never an exception
// into the page); installs the page listeners (visibility, pagehide, SPA navigation, clicks
// on [data-track], consent changes in other tabs); reads the consent signals of a TCF CMP
// and Google Consent Mode; runs the timer; and delivers batches. Everything else happens in
// Rust: each call becomes one binary message for the wasm export `m` (format: src/msg.rs).
// The host functions the wasm imports (src/shell.rs); the glue finds `H` by name in the
// function scope that build-tracker wraps around glue and loader.
var H = {};
(function (w, d, nav) {
  var pz = w.pz = w.pz || {};
  var W = wasm_bindgen;
  var ready = 0;
  var seen = {};
  var early = [];
  var due = 1 / 0;
  var timer;
  var now;
  var current;
  var PURPOSES = 'necessary analytics personalization marketing'.split(' ');
  // Index = the event kind's wire value (4, consent_change, cannot be remapped).
  var KINDS = ('page track identify alias - product_viewed cart_add cart_remove checkout_started ' +
    'order_completed').split(' ');
  var COUNTS = 'queued held inFlight dropped heldDropped consentDropped sent retries'.split(' ');
  var UTM = 'source medium campaign term content'.split(' ');
  var GCM = 'analytics_storage personalization_storage ad_user_data ad_personalization'.split(' ');
  var own = {}.hasOwnProperty;
  // Messages (src/msg.rs) are written one after another into `out`: the events waiting
  // for the microtask (see `pending`), then the message being written, which starts at
  // `start`; the next byte goes at `at`. One buffer for all: copying each event out would
  // allocate a buffer per event inside the page's call.
  var out = new Uint8Array(65536);
  var view = new DataView(out.buffer);
  var at = 0;
  var start;
  var utf8 = new TextEncoder();
  // Bytes set aside for the wasm, which pulls them with H.c.
  var aside;

  function warn(problem) {
    if (!seen[problem]) {
      seen[problem] = 1;
      try { console.warn('pz: ' + problem); } catch (e) { /* no console */ }
    }
  }

  // A problem with the arguments of the call being made.
  function bad(problem) { warn(current + ': ' + problem); }

  function isString(v) { return typeof v == 'string'; }

  // Makes room for n more bytes.
  function room(n) {
    if (at + n > out.length) {
      var old = out;
      out = new Uint8Array(2 * old.length + n);
      out.set(old);
      view = new DataView(out.buffer);
    }
  }

  // A number field: the double's 8 bytes (NaN for anything but a number).
  function N(x) {
    room(8);
    view.setFloat64(at, typeof x == 'number' ? x : NaN, true);
    at += 8;
  }

  // A text field: its length, then its UTF-8, cut at a character boundary to the
  // collector's limit (1024 bytes, or max). ASCII is copied by the loop; encodeInto, which
  // needs a view of its own for each call, takes over at the first other character: that
  // halves the cost of an event in the page's call.
  function S(x, max) {
    var i = 0;
    var c;
    x = x == null ? '' : '' + x;
    room(2 + (max = max || 1024));
    for (; i < x.length && i < max && (c = x.charCodeAt(i)) < 128; i++) out[at + 2 + i] = c;
    if (i < x.length && i < max) i += utf8.encodeInto(x.slice(i), out.subarray(at + 2 + i, at + 2 + max)).written;
    view.setUint16(at, i, true);
    at += 2 + i;
  }

  // Starts a message of this type.
  function M(type) {
    start = at;
    N(type);
  }

  // An id the collector accepts (1-256 UTF-8 bytes, no braces or control characters), from
  // a string or a whole number; undefined otherwise.
  function id(v) {
    if (typeof v == 'number' && v % 1 == 0) v = '' + v;
    try {
      if (isString(v) && v && !/[{}\x00-\x1f\x7f-\x9f]/.test(v) &&
          unescape(encodeURIComponent(v)).length <= 256) return v;
    } catch (e) { /* lone surrogate */ }
  }

  // A user id the collector accepts for a person: an id, and not a placeholder that code
  // sends when it has none (the list is profile_cache::model::PLACEHOLDER_IDS); undefined
  // otherwise, with a warning.
  var PLACEHOLDER = /^\s*(|0|-1|\[object object\]|anon|anonymous|distinct_id|distinctid|email|false|guest|id|n\/a|nan|nil|none|not_authenticated|null|true|undefined|unknown|user_id|userid)\s*$/i;
  function person(v) {
    var p = id(v);
    if (!p) bad('needs a user id');
    else if (PLACEHOLDER.test(p)) bad('"' + p.slice(0, 40) + '" is a placeholder');
    else return p;
  }

  // Events wait here until a microtask hands them to Rust, so recording and encoding never
  // run inside the page's call; any other message (the page going away included) hands them
  // over first, in order. A microtask, not a zero-delay timer: it runs as soon as the page's
  // own code returns, and queueing one costs the call a fraction of what setting a timer does.
  // Where each waiting event starts and ends in `out`.
  var pending = [];
  var resolved = Promise.resolve();

  // Hands the message from s to e over to the wasm.
  function deliver(s, e) {
    aside = out.subarray(s, e);
    try { schedule(W.m(e - s)); } catch (x) { /* a bug must not break the page */ }
  }

  function drain() {
    for (var i = 0; i < pending.length; i += 2) deliver(pending[i], pending[i + 1]);
    pending.length = at = 0;
  }

  // Sends the message written: events first, in order.
  function post() {
    var s = start;
    var e = at;
    if (ready) {
      drain();
      deliver(s, e);
    }
    at = 0;
  }

  // Any message but an event, with up to three numbers.
  function send(type, a, b, c) {
    M(type);
    N(a);
    N(b);
    N(c);
    post();
  }

  function schedule(ms) {
    var when = Date.now() + ms;
    if (ms >= 0 && when < due) {
      clearTimeout(timer);
      due = when;
      timer = setTimeout(function () { due = 1 / 0; send(10); }, ms);
    }
  }

  // The usable properties of o: [key, value, key, value, ...]. Read before the message is
  // written: a getter of the page's object may call the tracker.
  function properties(o) {
    var list = [];
    if (o == null) return list;
    if (typeof o != 'object') return bad('properties must be an object'), list;
    for (var k in o) {
      var v = o[k];
      var t = typeof v;
      if (!own.call(o, k) || v == null || !k) continue;
      if (t != 'string' && t != 'boolean' && !(t == 'number' && isFinite(v))) {
        bad('property values: strings, finite numbers, booleans');
        continue;
      }
      if (list.length == 128) { bad('over 64 properties'); break; }
      list.push(k, v);
    }
    return list;
  }

  // The items of a list that are usable (a warning for each problem), written as a count and
  // the items; list: an array, or one item.
  function items(list) {
    var ok = [];
    if (!Array.isArray(list)) bad('items must be an array');
    else if (list.length > 100) bad('over 100 items');
    (Array.isArray(list) ? list.slice(0, 100) : []).forEach(function (o) {
      var p = o && id(o.productId);
      if (!p) bad('item without productId');
      else if (typeof o.price != 'number' || o.price % 1) bad('item.price: whole minor units');
      else if (o.quantity != null && !(o.quantity >= 1 && o.quantity % 1 == 0)) bad('item.quantity: whole, at least 1');
      else ok.push([p, o.category, o.price, o.quantity || 1, o.name]);
    });
    return ok;
  }

  // kind: the wire value of the event kind; list: checked items (see items).
  function event(kind, name, props, list, user, order, revenue, currency) {
    if (name != null && !isString(name)) { bad('name: a string'); name = null; }
    props = properties(props);
    M(2);
    N(kind);
    N(now);
    S(name);
    S(user);
    S(order);
    N(revenue);
    S(isString(currency) ? currency : '');
    N(props.length / 2);
    for (var i = 0; i < props.length; i += 2) {
      var v = props[i + 1];
      S(props[i]);
      // Types: 1 string, 2 whole number (exact in a double), 3 other number, 4 boolean.
      if (isString(v)) { N(1); S(v); } else {
        N(typeof v == 'boolean' ? 4 : v % 1 || Math.abs(v) > 9007199254740992 ? 3 : 2);
        N(+v);
      }
    }
    N((list = list || []).length);
    list.forEach(function (i) {
      S(i[0]);
      S(isString(i[1]) ? i[1] : '');
      N(i[2]);
      N(i[3]);
      S(isString(i[4]) ? i[4] : '');
    });
    if (pending.push(start, at) == 2) resolved.then(drain);
  }

  function commerce(kind) {
    return function (i) {
      var list = items([i]);
      if (list.length) event(kind, null, null, list);
    };
  }

  function location_() {
    var q;
    try { q = new URLSearchParams(w.location.search); } catch (e) { q = { get: function () {} }; }
    M(3);
    S(w.location.href, 4096);
    UTM.forEach(function (k) { S(q.get('utm_' + k)); });
    post();
  }

  var api = {
    init: function (o) {
      if (ready) return bad('called twice');
      if (!o || !isString(o.writeKey) || !o.writeKey || !isString(o.endpoint) || !o.endpoint) {
        return bad('needs {writeKey, endpoint}');
      }
      var granted = 0;
      var denied = 0;
      var defaults = o.consentDefaults || {};
      var purposes = o.purposes || {};
      var map = [];
      var tz;
      PURPOSES.forEach(function (p, i) {
        var v = defaults[p];
        if (v === true || v == 'granted') granted |= 1 << i;
        else if (v === false || v == 'denied') denied |= 1 << i;
        else if (v != null && v != 'pending') bad('bad consentDefaults.' + p);
      });
      for (var k in purposes) {
        var i = KINDS.indexOf(k);
        var j = PURPOSES.indexOf(purposes[k]);
        if (i < 0 || j < 0) bad('bad purposes.' + k);
        else map[i] = j;
      }
      try { tz = Intl.DateTimeFormat().resolvedOptions().timeZone; } catch (e) { /* old browser */ }
      endpoint = o.endpoint;
      M(1);
      S(o.writeKey);
      S(d.referrer, 4096);
      S(nav.language);
      S(tz);
      [o.flushAt, o.flushIntervalMs, o.sessionTimeoutMin, o.trackClicks ? 1 : 0, granted, denied,
        nav.globalPrivacyControl === true ? 1 : 0, d.visibilityState == 'visible' ? 1 : 0,
        w.screen && w.screen.width, w.screen && w.screen.height].forEach(N);
      KINDS.forEach(function (k, i) { N(map[i]); });
      ready = 1;
      post();
      location_();
      listen();
      consentSignals();
      early.splice(0).forEach(function (c) { call(c[0], c[1], c[2]); });
    },
    page: function (name, props) { location_(); event(0, name, props); },
    track: function (name, props) {
      if (!isString(name) || !name) return bad('needs a name');
      event(1, name, props);
    },
    identify: function (user, traits) {
      user = person(user);
      if (user) event(2, null, traits, '', user);
    },
    alias: function (user) {
      user = person(user);
      if (user) event(3, null, null, '', user);
    },
    productViewed: commerce(5),
    cartAdd: commerce(6),
    cartRemove: commerce(7),
    checkoutStarted: function (a) { event(8, null, null, items(a)); },
    orderCompleted: function (o) {
      var order = o && id(o.orderId);
      if (!order) return bad('needs {orderId, revenue, currency, items}');
      if (typeof o.revenue != 'number' || o.revenue % 1) {
        return bad('revenue: whole minor units');
      }
      event(9, null, null, o.items == null ? [] : items(o.items), '', order, o.revenue, o.currency);
    },
    consent: function (o) {
      var granted = 0;
      var denied = 0;
      if (!o || typeof o != 'object') return bad('needs an object');
      PURPOSES.forEach(function (p, i) {
        if (o[p] === true) granted |= 1 << i;
        else if (o[p] === false) denied |= 1 << i;
        else if (o[p] != null) bad('values: true or false');
      });
      send(4, granted, denied);
    },
    flush: function () { send(15); },
    reset: function () { send(16); }
  };

  function call(name, args, ts) {
    if (!own.call(api, name)) return warn('unknown call ' + String(name).slice(0, 40));
    if (!ready && name != 'init') return early.push([name, args, ts]);
    now = ts || Date.now();
    current = name;
    try { api[name].apply(0, args); } catch (e) { warn(name + ': failed'); }
  }

  function listen() {
    function on(target, type, f) { target.addEventListener(type, f, true); }
    on(d, 'visibilitychange', function () { send(d.visibilityState == 'hidden' ? 11 : 12); });
    on(w, 'pagehide', function () { send(13); });
    on(w, 'pageshow', function (e) { if (e.persisted) send(12); });
    on(w, 'popstate', location_);
    on(w, 'hashchange', location_);
    ['pushState', 'replaceState'].forEach(function (k) {
      var original = history[k];
      history[k] = function () {
        var r = original.apply(this, arguments);
        location_();
        return r;
      };
    });
    on(d, 'click', function (e) {
      var t = e.target;
      t = t && t.closest && t.closest('[data-track]');
      if (t) {
        M(8);
        S(t.getAttribute('data-track'));
        post();
      }
    });
    on(w, 'storage', function (e) { if (e.key == 'pz_c') send(14); });
  }

  function consentSignals() {
    try {
      if (w.__tcfapi) {
        w.__tcfapi('addEventListener', 2, function (t, ok) {
          if (ok && t && t.gdprApplies !== false &&
              (t.eventStatus == 'tcloaded' || t.eventStatus == 'useractioncomplete')) {
            var bits = 0;
            var c = (t.purpose && t.purpose.consents) || {};
            for (var i = 1; i < 12; i++) if (c[i]) bits |= 1 << i;
            send(5, bits);
          }
        });
      }
    } catch (e) { /* a broken CMP */ }
    var layer = w.dataLayer = w.dataLayer || [];
    var push = layer.push;
    function command(a) {
      if (a && a[0] == 'consent' && a[2] && typeof a[2] == 'object') {
        var granted = 0;
        var denied = 0;
        GCM.forEach(function (k, i) {
          if (a[2][k] == 'granted') granted |= 1 << i;
          if (a[2][k] == 'denied') denied |= 1 << i;
        });
        send(a[1] == 'update' ? 7 : 6, granted, denied);
      }
    }
    for (var i = 0; i < layer.length; i++) command(layer[i]);
    layer.push = function () {
      for (var i = 0; i < arguments.length; i++) command(arguments[i]);
      return push.apply(layer, arguments);
    };
  }

  var storage;
  var endpoint;
  try { storage = w.localStorage; } catch (e) { /* storage disabled: memory only */ }
  // Stored values are bytes, one character per byte: x-user-defined decodes 0x00-0x7f as
  // ASCII and 0x80-0xff as U+F780-U+F7FF, and the low byte of each character is the byte.
  var chars = new TextDecoder('x-user-defined');
  // Sets bytes aside for the wasm (see H.c) and returns how many.
  function give(s) {
    aside = new Uint8Array(s.length);
    for (var i = 0; i < s.length; i++) aside[i] = s.charCodeAt(i);
    return s.length;
  }
  // Storage that throws (disabled, quota, private mode) behaves as absent or refusing: -1.
  function store(f) {
    return function (k, v) {
      try { return f(chars.decode(k), v && chars.decode(v)); } catch (e) { return -1; }
    };
  }
  H.c = function (b) { b.set(aside); };
  H.g = store(function (k) {
    var v = storage.getItem(k);
    return v == null ? -1 : give(v);
  });
  H.p = store(function (k, v) { storage.setItem(k, v); return 1; });
  H.x = store(function (k) { storage.removeItem(k); });
  H.k = function () {
    try {
      return give(Object.keys(storage).filter(function (k) { return k.slice(0, 3) == 'pz_'; }).join('\x1f'));
    } catch (e) {
      return -1;
    }
  };
  H.r = function (b) { w.crypto.getRandomValues(b); };
  H.n = Date.now;
  // Delivers a batch: n == 0 means the page is going away (sendBeacon, no answer).
  H.s = function (body, n) {
    body = body.slice();
    if (!n) {
      try { if (nav.sendBeacon(endpoint, body)) return true; } catch (e) { /* fall back to fetch */ }
    }
    try {
      fetch(endpoint, { method: 'POST', body: body, keepalive: body.length < 65000 }).then(function (r) {
        if (n) send(9, n, r.status, +(r.headers.get('Retry-After') || NaN));
      }, function () {
        if (n) send(9, n, 0);
      });
      return true;
    } catch (e) {
      return false;
    }
  };

  W().then(function () {
    var queued = pz.q || [];
    pz.q = { push: function (c) { call(c[0], c[1], c[2]); } };
    Object.keys(api).forEach(function (k) {
      // No method takes more than two arguments.
      pz[k] = function (a, b) { call(k, [a, b]); };
    });
    // For tests and debugging: the tracker's state as a plain object (null before init).
    pz.debug = function () {
      var o = null;
      H.d = function (b) {
        var f = new TextDecoder().decode(b).split('\x1f');
        var i = 0;
        var e = f[9];
        o = {
          consent: {},
          persistent: f[8][4] == 1,
          lastError: e ? e == 0 ? 'network error' : e == 1 ? 'send failed' : 'HTTP ' + e : null
        };
        COUNTS.forEach(function (k) { o[k] = +f[i++]; });
        PURPOSES.forEach(function (p, j) {
          o.consent[p] = { g: 'granted', d: 'denied', p: 'pending' }[f[8][j]];
        });
        'anonymousId userId sessionId'.split(' ').forEach(function (k, j) { o[k] = f[10 + j] || null; });
      };
      drain();
      M(17);
      post();
      return o;
    };
    // The visitor's ids, for the page (the demo's profile inspector): null until known.
    pz.anonymousId = function () { var d = pz.debug(); return d && d.anonymousId; };
    pz.userId = function () { var d = pz.debug(); return d && d.userId; };
    for (var i = 0; i < queued.length; i++) pz.q.push(queued[i]);
  }, function () {
    warn('could not load');
  });
})(window, document, navigator);
