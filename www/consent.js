/*
 * Granular consent banner for the demo shop, exposed as `window.ShopConsent`.
 *
 * Loaded in <head> right after the tracker snippet, so that a stored choice reaches the
 * tracker (`pz.consent({...})`) straight after `pz.init`, before anything else the page does.
 * The banner itself is built once the DOM is ready and shown until the visitor chooses.
 *
 * The choice is shop state: localStorage key `shop.consent`,
 *   {"v":1, "necessary":true, "analytics":bool, "personalization":bool, "marketing":bool, "at":"<ISO time>"}
 * It is sent with pz.consent on every page load after the choice, and again whenever it changes.
 * A change is also announced as a `shop:consent` DOM event on `document` (detail: the choice).
 */
(function () {
  'use strict';

  var KEY = 'shop.consent';
  var VERSION = 1;
  var PURPOSES = [
    { id: 'necessary', name: 'Necessary', always: true,
      text: 'Keeps the shop working: your cart, your sign-in and this privacy choice. Always on.' },
    { id: 'analytics', name: 'Analytics',
      text: 'Counts page views and what you do in the shop, so we can see what works and fix what does not.' },
    { id: 'personalization', name: 'Personalization',
      text: 'Uses what you browse and buy to tailor products and offers to you on this site.' },
    { id: 'marketing', name: 'Marketing',
      text: 'Lets us tailor our emails and newsletter to you and see whether they are opened.' }
  ];

  var memory = null; // used when localStorage is unavailable

  function read() {
    var raw;
    try { raw = window.localStorage.getItem(KEY); } catch (e) { raw = memory; }
    if (!raw) return null;
    try {
      var c = JSON.parse(raw);
      if (!c || c.v !== VERSION) return null;
      return {
        necessary: true,
        analytics: c.analytics === true,
        personalization: c.personalization === true,
        marketing: c.marketing === true,
        at: typeof c.at === 'string' ? c.at : null
      };
    } catch (e) {
      return null;
    }
  }

  function write(choice) {
    var raw = JSON.stringify({
      v: VERSION, necessary: true, analytics: choice.analytics, personalization: choice.personalization,
      marketing: choice.marketing, at: choice.at
    });
    try { window.localStorage.setItem(KEY, raw); } catch (e) { memory = raw; }
  }

  /** Tells the tracker; never throws into the page. */
  function send(choice) {
    try {
      if (window.pz && typeof window.pz.consent === 'function') {
        window.pz.consent({
          necessary: true,
          analytics: choice.analytics,
          personalization: choice.personalization,
          marketing: choice.marketing
        });
      }
    } catch (e) {
      if (window.console) console.warn('[shop] pz.consent failed:', e);
    }
  }

  var current = read();
  if (current) send(current);
  document.documentElement.setAttribute('data-consent', current ? 'chosen' : 'pending');

  /** Records a choice (missing purposes count as denied), tells the tracker, closes the banner. */
  function set(update) {
    var choice = {
      necessary: true,
      analytics: !!(update && update.analytics),
      personalization: !!(update && update.personalization),
      marketing: !!(update && update.marketing),
      at: new Date().toISOString()
    };
    current = choice;
    write(choice);
    send(choice);
    document.documentElement.setAttribute('data-consent', 'chosen');
    hide();
    try {
      document.dispatchEvent(new CustomEvent('shop:consent', { detail: get() }));
    } catch (e) { /* very old browsers */ }
    return get();
  }

  /** The current choice {necessary, analytics, personalization, marketing, at}, or null. */
  function get() {
    return current ? {
      necessary: true, analytics: current.analytics, personalization: current.personalization,
      marketing: current.marketing, at: current.at
    } : null;
  }

  // ---------------------------------------------------------------- banner

  var banner = null;
  var lastFocus = null;

  function el(id) { return document.getElementById(id); }

  function build() {
    if (banner) return banner;
    banner = document.createElement('section');
    banner.id = 'consent-banner';
    banner.className = 'consent';
    banner.setAttribute('data-testid', 'consent-banner');
    banner.setAttribute('role', 'dialog');
    banner.setAttribute('aria-modal', 'false');
    banner.setAttribute('aria-labelledby', 'consent-title');
    banner.setAttribute('aria-describedby', 'consent-desc');
    banner.hidden = true;

    var purposes = PURPOSES.map(function (p) {
      var id = 'consent-' + p.id;
      return '<li class="consent__purpose">' +
        '<div class="consent__purpose-text"><label for="' + id + '">' + p.name + '</label>' +
        '<p id="' + id + '-desc">' + p.text + '</p></div>' +
        '<span class="consent__switch"><input type="checkbox" role="switch" id="' + id + '" data-testid="' + id + '"' +
        ' data-purpose="' + p.id + '" aria-describedby="' + id + '-desc"' + (p.always ? ' checked disabled' : '') + '>' +
        '<span class="consent__slider" aria-hidden="true"></span></span></li>';
    }).join('');

    banner.innerHTML = '<div class="consent__inner">' +
      '<button type="button" class="consent__close" id="consent-close" data-testid="consent-close" aria-label="Close without changes" hidden>×</button>' +
      '<h2 id="consent-title">Your privacy choices</h2>' +
      '<p id="consent-desc">We would like to record how you use this shop to improve it and tailor it to you. ' +
      'Nothing beyond what keeps the shop working is collected unless you say yes, and you can change your mind ' +
      'any time under “Privacy settings” at the bottom of every page.</p>' +
      '<div id="consent-preferences" class="consent__prefs" data-testid="consent-preferences" hidden>' +
      '<ul class="consent__purposes">' + purposes + '</ul></div>' +
      '<div class="consent__actions">' +
      '<button type="button" class="consent__btn" id="consent-reject-all" data-testid="consent-reject-all">Reject all</button>' +
      '<button type="button" class="consent__btn" id="consent-choose" data-testid="consent-choose" aria-controls="consent-preferences" aria-expanded="false">Choose</button>' +
      '<button type="button" class="consent__btn" id="consent-save" data-testid="consent-save" hidden>Save my choices</button>' +
      '<button type="button" class="consent__btn" id="consent-accept-all" data-testid="consent-accept-all">Accept all</button>' +
      '</div></div>';
    document.body.appendChild(banner);

    el('consent-accept-all').addEventListener('click', function () {
      set({ analytics: true, personalization: true, marketing: true });
    });
    el('consent-reject-all').addEventListener('click', function () {
      set({ analytics: false, personalization: false, marketing: false });
    });
    el('consent-choose').addEventListener('click', function () { showPreferences(true); });
    el('consent-save').addEventListener('click', function () {
      set({
        analytics: el('consent-analytics').checked,
        personalization: el('consent-personalization').checked,
        marketing: el('consent-marketing').checked
      });
    });
    el('consent-close').addEventListener('click', hide);
    banner.addEventListener('keydown', function (e) {
      if (e.key === 'Escape' && current) hide();
    });
    return banner;
  }

  function syncToggles() {
    PURPOSES.forEach(function (p) {
      if (p.always) return;
      el('consent-' + p.id).checked = !!(current && current[p.id]);
    });
  }

  function showPreferences(focus) {
    syncToggles();
    el('consent-preferences').hidden = false;
    el('consent-choose').hidden = true;
    el('consent-choose').setAttribute('aria-expanded', 'true');
    el('consent-save').hidden = false;
    banner.classList.add('is-expanded');
    if (focus) el('consent-analytics').focus();
  }

  function show(expanded) {
    build();
    syncToggles();
    el('consent-preferences').hidden = true;
    el('consent-choose').hidden = false;
    el('consent-choose').setAttribute('aria-expanded', 'false');
    el('consent-save').hidden = true;
    el('consent-close').hidden = !current;
    banner.classList.remove('is-expanded');
    if (expanded) showPreferences(false);
    banner.hidden = false;
    document.documentElement.classList.add('consent-open');
  }

  function hide() {
    if (!banner) return;
    banner.hidden = true;
    document.documentElement.classList.remove('consent-open');
    if (lastFocus && document.contains(lastFocus)) {
      try { lastFocus.focus(); } catch (e) { /* ignore */ }
    }
    lastFocus = null;
  }

  /** Reopens the banner with the purposes listed and the current choice ticked ("Privacy settings"). */
  function open() {
    lastFocus = document.activeElement;
    show(true);
    var first = el('consent-analytics');
    if (first) first.focus();
  }

  function onReady() {
    build();
    if (!current) show(false);
  }

  // A choice made in another tab applies here too.
  window.addEventListener('storage', function (e) {
    if (e.key !== KEY) return;
    var next = read();
    if (!next || (current && next.at === current.at)) return;
    current = next;
    send(current);
    document.documentElement.setAttribute('data-consent', 'chosen');
    hide();
  });

  if (document.readyState === 'loading') {
    document.addEventListener('DOMContentLoaded', onReady);
  } else {
    onReady();
  }

  window.ShopConsent = { get: get, set: set, open: open, close: hide, purposes: PURPOSES.map(function (p) { return p.id; }) };
})();
