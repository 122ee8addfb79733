/*
 * Live profile inspector: polls GET /v1/profiles/{id} every second with the demo API token
 * and renders the profile.
 *
 * Which id: `?id=` in the URL or one typed into the form (pinned), otherwise the tracker's
 * own ids, `pz.userId()` first, then `pz.anonymousId()`, re-read on every poll so that a
 * sign-in or sign-out in this tab is followed. Either function may return a value or a
 * promise; when the tracker does not offer them, enter an id by hand.
 *
 * The demo token only works against a collector listening on loopback (`cargo xtask demo`).
 */
(function () {
  'use strict';

  var S = window.Shop;
  var TOKEN = 'demo-secret';
  var INTERVAL_MS = 1000;
  var TIMEOUT_MS = 4000;
  var PURPOSES = ['necessary', 'analytics', 'personalization', 'marketing'];
  var COUNTERS = [
    { key: 'events', label: 'Events' },
    { key: 'page_views', label: 'Page views' },
    { key: 'sessions', label: 'Sessions' },
    { key: 'orders', label: 'Orders' },
    { key: 'revenue', label: 'Revenue', money: true },
    { key: 'email_opens', label: 'Email opens' },
    { key: 'email_clicks', label: 'Email clicks' }
  ];

  var $ = function (id) { return document.getElementById(id); };
  var esc = S.esc;

  var pinned = (S.param('id') || '').trim() || null;
  var paused = false;
  var currentId = null;
  var lastJson = null;
  var lastProfile = null;
  var timer = null;
  var inFlight = null;

  // ------------------------------------------------------------------ ids from the tracker

  function call(name) {
    try {
      var t = window.pz;
      if (t && typeof t[name] === 'function') return Promise.resolve(t[name]()).catch(function () { return null; });
    } catch (e) { /* fall through */ }
    return Promise.resolve(null);
  }

  function clean(v) { return typeof v === 'string' && v.trim() ? v.trim() : null; }

  function trackerIds() {
    return Promise.all([call('userId'), call('anonymousId')]).then(function (r) {
      return { user: clean(r[0]), anon: clean(r[1]) };
    });
  }

  function showIds(ids) {
    $('inspector-anon-id').textContent = ids.anon || '—';
    $('inspector-user-id').textContent = ids.user || '—';
    $('inspector-use-anon').hidden = !ids.anon || ids.anon === currentId;
    $('inspector-use-user').hidden = !ids.user || ids.user === currentId;
    $('inspector-use-anon').dataset.id = ids.anon || '';
    $('inspector-use-user').dataset.id = ids.user || '';
    $('inspector-follow').hidden = !pinned || !(ids.anon || ids.user);
  }

  // ------------------------------------------------------------------ status

  function status(state, text) {
    var el = $('inspector-status');
    el.setAttribute('data-state', state);
    $('inspector-status-text').textContent = text;
  }

  function empty(html) {
    var el = $('inspector-empty');
    el.innerHTML = html;
    el.hidden = false;
    $('inspector-profile').hidden = true;
    lastJson = null;
    lastProfile = null;
  }

  // ------------------------------------------------------------------ formatting

  function ago(iso) {
    var t = Date.parse(iso);
    if (isNaN(t)) return '—';
    var s = Math.round((Date.now() - t) / 1000);
    if (s < 2) return 'just now';
    if (s < 60) return s + ' s ago';
    if (s < 3600) return Math.floor(s / 60) + ' min ago';
    if (s < 86400) return Math.floor(s / 3600) + ' h ago';
    return new Date(t).toLocaleString(undefined, { day: 'numeric', month: 'short', hour: '2-digit', minute: '2-digit' });
  }

  function time(iso) {
    if (!iso) return '<span class="muted">—</span>';
    return '<time datetime="' + esc(iso) + '" title="' + esc(new Date(iso).toLocaleString()) + '" data-ago="' + esc(iso) + '">' +
      esc(ago(iso)) + '</time>';
  }

  function refreshTimes() {
    var els = document.querySelectorAll('[data-ago]');
    for (var i = 0; i < els.length; i++) els[i].textContent = ago(els[i].getAttribute('data-ago'));
  }

  function productName(id) {
    var p = S.product(id);
    return p ? p.name : id;
  }

  function kvTable(obj, emptyText) {
    var keys = Object.keys(obj || {});
    if (!keys.length) return '<p class="muted">' + esc(emptyText) + '</p>';
    return '<table class="insp-table"><tbody>' + keys.map(function (k) {
      return '<tr><th scope="row">' + esc(k) + '</th><td>' + esc(obj[k]) + '</td></tr>';
    }).join('') + '</tbody></table>';
  }

  function bars(pairs, emptyText) {
    if (!pairs || !pairs.length) return '<p class="muted">' + esc(emptyText) + '</p>';
    var max = pairs.reduce(function (m, p) { return Math.max(m, Number(p[1]) || 0); }, 1);
    return '<ul class="insp-bars">' + pairs.map(function (p) {
      var cat = S.category(p[0]);
      var pct = Math.max(4, Math.round(100 * (Number(p[1]) || 0) / max));
      return '<li data-category="' + esc(p[0]) + '"><span class="insp-bars__label">' + esc(cat ? cat.name : p[0]) + '</span>' +
        '<span class="insp-bars__track"><span class="insp-bars__fill" style="width:' + pct + '%"></span></span>' +
        '<span class="insp-bars__value">' + esc(p[1]) + '</span></li>';
    }).join('') + '</ul>';
  }

  // ------------------------------------------------------------------ rendering

  function render(p) {
    var prev = lastProfile;
    $('inspector-empty').hidden = true;
    $('inspector-profile').hidden = false;

    // Overview and lifecycle
    $('inspector-profile-id').textContent = p.id || '';
    var anon = Array.isArray(p.anonymous_ids) ? p.anonymous_ids : [];
    $('inspector-anonymous-ids').innerHTML =
      (p.user_id ? 'User id <code>' + esc(p.user_id) + '</code> · ' : '') +
      (anon.length ? 'Anonymous ids: ' + anon.map(function (a) { return '<code>' + esc(a) + '</code>'; }).join(', ') : 'No anonymous ids');
    $('inspector-lifecycle').innerHTML =
      '<span class="insp-badge insp-badge--' + esc(p.lifecycle) + '" data-lifecycle="' + esc(p.lifecycle) + '">' + esc(p.lifecycle || 'unknown') + '</span>' +
      '<dl class="insp-dates"><dt>First seen</dt><dd>' + time(p.first_seen) + '</dd>' +
      '<dt>Last seen</dt><dd>' + time(p.last_seen) + '</dd>' +
      '<dt>Last order</dt><dd>' + time(p.last_order_at) + '</dd>' +
      '<dt>Last email engagement</dt><dd>' + time(p.last_engaged_at) + '</dd></dl>';

    // Counters, flashing the ones that changed since the last poll
    $('inspector-counters').innerHTML = COUNTERS.map(function (c) {
      var v = Number(p[c.key]) || 0;
      var changed = prev && (Number(prev[c.key]) || 0) !== v;
      return '<div class="insp-stat' + (changed ? ' is-changed' : '') + '" data-counter="' + c.key + '" data-value="' + v + '">' +
        '<div class="insp-stat__value">' + esc(c.money ? S.money(v, p.currency || S.CURRENCY) : v) + '</div>' +
        '<div class="insp-stat__label">' + esc(c.label) + '</div></div>';
    }).join('');

    // Cart
    var cart = Array.isArray(p.cart) ? p.cart : [];
    if (!cart.length) {
      $('inspector-cart').innerHTML = '<p class="muted">Empty.</p>' +
        (p.cart_updated_at ? '<p class="small muted">Changed ' + time(p.cart_updated_at) + '</p>' : '');
    } else {
      var total = cart.reduce(function (n, l) { return n + (Number(l.price) || 0) * (Number(l.quantity) || 0); }, 0);
      $('inspector-cart').innerHTML = '<table class="insp-table"><thead><tr><th>Product</th><th class="num">Qty</th><th class="num">Price</th></tr></thead><tbody>' +
        cart.map(function (l) {
          return '<tr data-product-id="' + esc(l.product_id) + '"><td>' + esc(productName(l.product_id)) +
            '<div class="small muted">' + [S.product(l.product_id) ? l.product_id : null, l.category]
              .filter(Boolean).map(esc).join(' · ') + '</div></td>' +
            '<td class="num">' + esc(l.quantity) + '</td><td class="num">' + esc(S.money(Number(l.price) || 0)) + '</td></tr>';
        }).join('') +
        '</tbody><tfoot><tr><th colspan="2">Total</th><td class="num">' + esc(S.money(total)) + '</td></tr></tfoot></table>' +
        '<p class="small muted">Changed ' + time(p.cart_updated_at) + '</p>';
    }

    // Recently viewed
    var viewed = Array.isArray(p.recently_viewed) ? p.recently_viewed : [];
    $('inspector-viewed').innerHTML = viewed.length ? '<ol class="insp-viewed">' + viewed.map(function (v) {
      var prod = S.product(v.product_id);
      return '<li data-product-id="' + esc(v.product_id) + '">' +
        '<span class="insp-thumb media">' + (prod ? S.image(prod) : '') + '</span>' +
        '<span><a href="product.html?id=' + encodeURIComponent(v.product_id) + '">' + esc(productName(v.product_id)) + '</a>' +
        '<span class="small muted"> · ' + time(v.at) + '</span></span></li>';
    }).join('') + '</ol>' : '<p class="muted">Nothing yet.</p>';

    // Categories
    $('inspector-categories').innerHTML =
      '<h3 class="insp-sub">Browsed</h3>' + bars(p.categories_viewed, 'No product views yet.') +
      '<h3 class="insp-sub">Bought</h3>' + bars(p.categories_bought, 'No purchases yet.');

    // Consent
    var consent = p.consent || {};
    $('inspector-consent').innerHTML = '<ul class="insp-consent">' + PURPOSES.map(function (purpose) {
      var c = consent[purpose];
      var st = c && c.status ? c.status : 'unanswered';
      return '<li data-purpose="' + purpose + '" data-status="' + esc(st) + '"><span>' + esc(purpose) + '</span>' +
        '<span><span class="insp-pill insp-pill--' + esc(st) + '">' + esc(st) + '</span>' +
        (c && c.at ? ' <span class="small muted">' + time(c.at) + '</span>' : '') + '</span></li>';
    }).join('') + '</ul>';

    // Traits and event counts
    $('inspector-traits').innerHTML = kvTable(p.traits, 'No traits yet: sign in or subscribe to the newsletter.');
    $('inspector-event-counts').innerHTML = kvTable(p.event_counts, 'No events yet.');

    lastProfile = p;
  }

  // ------------------------------------------------------------------ polling

  function fetchProfile(id) {
    var ctrl = typeof AbortController === 'function' ? new AbortController() : null;
    var kill = ctrl ? setTimeout(function () { ctrl.abort(); }, TIMEOUT_MS) : null;
    return fetch('/v1/profiles/' + encodeURIComponent(id), {
      headers: { Authorization: 'Bearer ' + TOKEN, Accept: 'application/json' },
      cache: 'no-store',
      signal: ctrl ? ctrl.signal : undefined
    }).then(function (res) {
      return res.text().then(function (text) { return { status: res.status, text: text }; });
    }).finally(function () { if (kill) clearTimeout(kill); });
  }

  function switchTo(id) {
    if (id === currentId) return;
    currentId = id;
    lastJson = null;
    lastProfile = null;
    var input = $('inspector-id');
    if (document.activeElement !== input) input.value = id || '';
  }

  function tick() {
    clearTimeout(timer);
    if (paused || inFlight) { schedule(); return; }
    inFlight = trackerIds().then(function (ids) {
      var id = pinned || ids.user || ids.anon;
      switchTo(id);
      showIds(ids);
      if (!id) {
        status('idle', 'Waiting for an id');
        empty('<h2>No visitor id yet</h2><p class="muted">The tracker has not reported an anonymous id on this page' +
          (window.pz ? '' : ' (the tracker is not loaded)') + '. Enter a user id or anonymous id above, or open ' +
          '<code>inspector.html?id=…</code>.</p>');
        return;
      }
      if (document.hidden) return;
      var source = pinned ? 'entered id' : ids.user ? 'your user id' : 'your anonymous id';
      return fetchProfile(id).then(function (r) {
        if (id !== currentId) return; // switched while the request was out
        var clock = new Date().toLocaleTimeString();
        if (r.status === 200) {
          if (r.text !== lastJson) {
            var p = JSON.parse(r.text);
            render(p);
            lastJson = r.text;
            $('inspector-raw-json').textContent = JSON.stringify(p, null, 2);
          } else {
            refreshTimes();
            var flashing = document.querySelectorAll('.insp-stat.is-changed');
            for (var i = 0; i < flashing.length; i++) flashing[i].classList.remove('is-changed');
          }
          status('live', 'Live · ' + source + ' · updated ' + clock);
        } else if (r.status === 404) {
          status('waiting', 'No profile yet · ' + source + ' · checked ' + clock);
          var consent = window.ShopConsent && window.ShopConsent.get();
          empty('<h2>No profile for <code>' + esc(id) + '</code> yet</h2>' +
            '<p class="muted">Profiles appear with the first event the collector accepts. Events are sent only once you allow ' +
            '<strong>analytics</strong>' + (consent && consent.analytics ? ' (you have)' : ': open “Privacy settings” at the bottom of the page') +
            '. Then browse the shop; this page updates every second.</p>');
        } else if (r.status === 401 || r.status === 403) {
          status('error', 'HTTP ' + r.status + ' · ' + clock);
          empty('<h2>The collector refused the demo token</h2><p class="muted">The inspector uses the demo API token, which the ' +
            'collector accepts only in demo mode on a loopback address (<code>cargo xtask demo</code>).</p>');
        } else {
          var detail = '';
          try { detail = JSON.parse(r.text).message || ''; } catch (e) { detail = ''; }
          status('error', 'HTTP ' + r.status + (detail ? ' · ' + detail : '') + ' · ' + clock);
        }
      }, function () {
        status('error', 'Collector unreachable · retrying');
      });
    }).catch(function (e) {
      status('error', 'Error: ' + (e && e.message ? e.message : e));
    }).then(function () {
      inFlight = null;
      schedule();
    });
  }

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(tick, INTERVAL_MS);
  }

  function pin(id) {
    pinned = id ? id.trim() || null : null;
    try {
      var url = new URL(window.location.href);
      if (pinned) url.searchParams.set('id', pinned); else url.searchParams.delete('id');
      window.history.replaceState(null, '', url.pathname + url.search + url.hash);
    } catch (e) { /* ignore */ }
    switchTo(pinned);
    tick();
  }

  // ------------------------------------------------------------------ controls

  $('inspector-form').addEventListener('submit', function (e) {
    e.preventDefault();
    pin($('inspector-id').value);
  });
  $('inspector-use-anon').addEventListener('click', function () { pin(this.dataset.id); });
  $('inspector-use-user').addEventListener('click', function () { pin(this.dataset.id); });
  $('inspector-follow').addEventListener('click', function () { pin(null); });
  $('inspector-pause').addEventListener('click', function () {
    paused = !paused;
    this.setAttribute('aria-pressed', String(paused));
    this.textContent = paused ? 'Resume' : 'Pause';
    if (paused) status('paused', 'Paused'); else tick();
  });
  document.addEventListener('visibilitychange', function () { if (!document.hidden) tick(); });

  if (pinned) $('inspector-id').value = pinned;
  tick();
})();
