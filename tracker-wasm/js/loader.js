// The pz loader. `cargo xtask build-tracker` appends it to the wasm-bindgen glue (target
// no-modules, which defines `wasm_bindgen`), wraps both in one function and minifies them
// into www/t/pz.js.
//
// It loads the wasm, replays the snippet's queue in order and replaces the stub methods;
// checks the page's arguments (one console.warn per distinct problem, never an exception
// into the page); installs the page listeners (visibility, pagehide, SPA navigation, clicks
// on [data-track], consent changes in other tabs); reads the consent signals of a TCF CMP
// and Google Consent Mode; runs the timer; and delivers batches. Everything else happens in
// Rust: each call becomes one text message for the wasm export `m` (format: src/msg.rs).
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
  var double = new DataView(new ArrayBuffer(8));

  function warn(problem) {
    if (!seen[problem]) {
      seen[problem] = 1;
      try { console.warn('pz: ' + problem); } catch (e) { /* no console */ }
    }
  }

  // A problem with the arguments of the call being made.
  function bad(problem) { warn(current + ': ' + problem); }

  function isString(v) { return typeof v == 'string'; }

  // Page text without the message separators (U+001D..U+001F).
  function text(v) { return v == null ? '' : String(v).replace(/[\x1d-\x1f]/g, ' '); }

  // A number field: decimal for whole numbers, else 'h' + the double's 16 hex digits.
  function num(x) {
    if (typeof x != 'number' || x != x) return '';
    if (x % 1 == 0 && Math.abs(x) < 9e15) return '' + x;
    double.setFloat64(0, x);
    return 'h' + hex(0) + hex(2) + hex(4) + hex(6);
  }

  // The 4 hex digits of 16 of its bits: adding 2^16 makes a leading 1 that keeps the zeros,
  // and keeps the number small (a larger one is converted by a slower path).
  function hex(i) { return (double.getUint16(i) + 65536).toString(16).slice(1); }

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
    if (!p) bad('needs a user id (1-256 bytes, no braces or control characters)');
    else if (PLACEHOLDER.test(p)) bad('"' + p.slice(0, 40) + '" is a placeholder, not a user id');
    else return p;
  }

  // Events wait here until a microtask hands them to Rust, so recording and encoding never
  // run inside the page's call; any other message (the page going away included) hands them
  // over first, in order. A microtask, not a zero-delay timer: it runs as soon as the page's
  // own code returns, and queueing one costs the call a fraction of what setting a timer does.
  var pending = [];
  var resolved = Promise.resolve();

  function deliver(message) {
    try { schedule(W.m(message)); } catch (e) { /* a bug must not break the page */ }
  }

  function drain() {
    while (pending.length) deliver(pending.shift());
  }

  // Any message but an event; its fields are the arguments.
  function send() {
    if (ready) {
      drain();
      deliver([].join.call(arguments, '\x1f'));
    }
  }

  function schedule(ms) {
    var at = Date.now() + ms;
    if (ms >= 0 && at < due) {
      clearTimeout(timer);
      due = at;
      timer = setTimeout(function () { due = 1 / 0; send('t'); }, ms);
    }
  }

  function properties(o) {
    var out = [];
    if (o == null) return '';
    if (typeof o != 'object') { bad('properties must be an object'); return ''; }
    for (var k in o) {
      if (!own.call(o, k) || o[k] == null) continue;
      var v = o[k];
      var t = typeof v;
      if (t == 'string') v = 's\x1d' + text(v);
      else if (t == 'number' && isFinite(v)) v = 'n\x1d' + num(v);
      else if (t == 'boolean') v = 'b\x1d' + +v;
      else { bad('property values must be strings, finite numbers or booleans'); continue; }
      if (out.length == 64) { bad('only the first 64 properties are kept'); break; }
      out.push(text(k) + '\x1d' + v);
    }
    return out.join('\x1e');
  }

  function item(o) {
    var p = o && id(o.productId);
    if (!p) return bad('an item needs a productId (a string or a whole number)');
    if (typeof o.price != 'number' || o.price % 1) {
      return bad('item.price must be a whole number of minor units (cents)');
    }
    if (o.quantity != null && !(o.quantity >= 1 && o.quantity % 1 == 0)) {
      return bad('item.quantity must be a whole number of at least 1');
    }
    return [text(p), isString(o.category) ? text(o.category) : '', num(o.price),
      num(o.quantity || 1), isString(o.name) ? text(o.name) : ''].join('\x1d');
  }

  function items(a) {
    if (!Array.isArray(a)) { bad('items must be an array'); return ''; }
    if (a.length > 100) bad('only the first 100 items are kept');
    return a.slice(0, 100).map(item).filter(Boolean).join('\x1e');
  }

  // kind: the wire value of the event kind.
  function event(kind, name, props, list, user, order, revenue, currency) {
    if (name != null && !isString(name)) { bad('the name must be a string'); name = null; }
    if (pending.push(['e', kind, num(now), text(name), user || '', order || '', num(revenue), text(currency),
      properties(props), list || ''].join('\x1f')) == 1) resolved.then(drain);
  }

  function commerce(kind) {
    return function (i) {
      var line = item(i);
      if (line) event(kind, null, null, line);
    };
  }

  function location_() {
    var q;
    try { q = new URLSearchParams(w.location.search); } catch (e) { q = { get: function () {} }; }
    send.apply(0, ['n', text(w.location.href)].concat(UTM.map(function (k) {
      return text(q.get('utm_' + k));
    })));
  }

  var api = {
    init: function (o) {
      if (ready) return bad('already initialised; later calls are ignored');
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
        else if (v != null && v != 'pending') bad('consentDefaults values are true, false, "granted", "denied" or "pending"');
      });
      for (var k in purposes) {
        var i = KINDS.indexOf(k);
        var j = PURPOSES.indexOf(purposes[k]);
        if (i < 0 || j < 0) bad('purposes maps event kinds (' + KINDS.join(', ') + ') to purposes (' + PURPOSES.join(', ') + ')');
        else map[i] = j;
      }
      try { tz = Intl.DateTimeFormat().resolvedOptions().timeZone; } catch (e) { /* old browser */ }
      var fields = ['i', text(o.writeKey), text(o.endpoint), text(d.referrer), text(nav.language), text(tz),
        num(o.flushAt), num(o.flushIntervalMs), num(o.sessionTimeoutMin), o.trackClicks ? 1 : 0, granted, denied,
        nav.globalPrivacyControl === true ? 1 : 0, d.visibilityState == 'visible' ? 1 : 0,
        num(w.screen && w.screen.width), num(w.screen && w.screen.height)];
      for (var n = 0; n < 12; n++) fields.push(map[n] == null ? -1 : map[n]);
      ready = 1;
      if (W.m(fields.join('\x1f')) < 0) { ready = 0; return bad('unusable settings'); }
      location_();
      listen();
      consentSignals();
      early.splice(0).forEach(function (c) { call(c[0], c[1], c[2]); });
    },
    page: function (name, props) { location_(); event(0, name, props); },
    track: function (name, props) {
      if (!isString(name) || !name) return bad('needs an event name (a string)');
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
        return bad('revenue must be a whole number of minor units (cents)');
      }
      event(9, null, null, o.items == null ? '' : items(o.items),
        '', order, o.revenue, isString(o.currency) ? o.currency : '');
    },
    consent: function (o) {
      var granted = 0;
      var denied = 0;
      if (!o || typeof o != 'object') return bad('takes an object like {analytics: true}');
      PURPOSES.forEach(function (p, i) {
        if (o[p] === true) granted |= 1 << i;
        else if (o[p] === false) denied |= 1 << i;
        else if (o[p] != null) bad('values are true (granted) or false (denied)');
      });
      send('c', granted, denied);
    },
    flush: function () { send('f'); },
    reset: function () { send('r'); }
  };

  function call(name, args, ts) {
    if (!own.call(api, name)) return warn('unknown call ' + text(name).slice(0, 40));
    if (!ready && name != 'init') return early.push([name, args, ts]);
    now = ts || Date.now();
    current = name;
    try { api[name].apply(0, args); } catch (e) { warn(name + ': could not be recorded'); }
  }

  function listen() {
    function on(target, type, f) { target.addEventListener(type, f, true); }
    on(d, 'visibilitychange', function () { send(d.visibilityState == 'hidden' ? 'h' : 'v'); });
    on(w, 'pagehide', function () { send('x'); });
    on(w, 'pageshow', function (e) { if (e.persisted) send('v'); });
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
      if (t) send('k', text(t.getAttribute('data-track')));
    });
    on(w, 'storage', function (e) { if (e.key == 'pz_c') send('s'); });
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
            send('T', bits);
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
        send(a[1] == 'update' ? 'G' : 'g', granted, denied);
      }
    }
    for (var i = 0; i < layer.length; i++) command(layer[i]);
    layer.push = function () {
      for (var i = 0; i < arguments.length; i++) command(arguments[i]);
      return push.apply(layer, arguments);
    };
  }

  var storage;
  try { storage = w.localStorage; } catch (e) { /* storage disabled: memory only */ }
  // Storage that throws (disabled, quota, private mode) behaves as absent or refusing.
  function store(f) {
    return function (k, v) {
      try { return storage ? f(k, v) : null; } catch (e) { return null; }
    };
  }
  H.g = store(function (k) { return storage.getItem(k); });
  H.p = store(function (k, v) { storage.setItem(k, v); return true; });
  H.x = store(function (k) { storage.removeItem(k); });
  var keys = store(function () {
    return Object.keys(storage).filter(function (k) { return k.slice(0, 3) == 'pz_'; }).join('\x1f');
  });
  H.k = function () { return keys() || ''; };
  H.r = function (b) { w.crypto.getRandomValues(b); };
  H.n = Date.now;
  // Delivers a batch: n == 0 means the page is going away (sendBeacon, no answer).
  H.s = function (url, body, n) {
    body = body.slice();
    if (!n) {
      try { if (nav.sendBeacon(url, body)) return true; } catch (e) { /* fall back to fetch */ }
    }
    try {
      fetch(url, { method: 'POST', body: body, keepalive: body.length < 65000 }).then(function (r) {
        if (n) send('d', n, r.status, text(r.headers.get('Retry-After')));
      }, function () {
        if (n) send('d', n, 0);
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
      H.d = function (t) {
        var f = t.split('\x1f');
        var i = 0;
        o = { consent: {}, persistent: f[8][4] == 1 };
        COUNTS.forEach(function (k) { o[k] = +f[i++]; });
        PURPOSES.forEach(function (p, j) {
          o.consent[p] = { g: 'granted', d: 'denied', p: 'pending' }[f[8][j]];
        });
        'anonymousId userId sessionId lastError'.split(' ').forEach(function (k) { o[k] = f[++i] || null; });
      };
      drain();
      try { W.m('D'); } catch (e) { /* null */ }
      return o;
    };
    // The visitor's ids, for the page (the demo's profile inspector): null until known.
    pz.anonymousId = function () { var d = pz.debug(); return d && d.anonymousId; };
    pz.userId = function () { var d = pz.debug(); return d && d.userId; };
    for (var i = 0; i < queued.length; i++) pz.q.push(queued[i]);
  }, function () {
    warn('the tracker could not be loaded');
  });
})(window, document, navigator);
