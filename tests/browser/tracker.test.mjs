// The tracker in a real browser, through the real demo pages, against the real collector:
// consent gating, exact counts in the profile, beacons at page close, two tabs, SPA
// navigation, and calls made before the tracker loaded.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BASE_URL, profile, startProxy, waitFor, withBrowser } from './harness.mjs';

/** A fresh browser context (empty storage) with the consent banner already answered. */
async function context(browser, consent) {
  const ctx = await browser.newContext();
  if (consent) {
    // The shop's stored choice (www/README.md): the banner stays closed and the shop
    // passes the choice to pz.consent on every page load.
    await ctx.addInitScript((c) => {
      localStorage.setItem('shop.consent', JSON.stringify({ v: 1, ...c, at: new Date().toISOString() }));
    }, consent);
  }
  return ctx;
}

const ALL = { necessary: true, analytics: true, personalization: true, marketing: true };
const NONE = { necessary: true, analytics: false, personalization: false, marketing: false };

async function anonymousId(page) {
  return waitFor(() => page.evaluate(() => window.pz && typeof pz.anonymousId === 'function' && pz.anonymousId()), {
    what: 'the tracker to load and report an anonymous id',
  });
}

async function profileWhere(id, check, what) {
  return waitFor(async () => {
    const p = await profile(id);
    return p && check(p) ? p : null;
  }, { what });
}

test('consent denied: no request leaves the page', async () => {
  // Counted at a proxy in front of the collector, not by watching the browser's requests:
  // beacons sent while a page unloads do not show up in its request events.
  const proxy = await startProxy();
  try {
    await withBrowser(async (browser) => {
      const ctx = await context(browser, NONE);
      const page = await ctx.newPage();
      await page.goto(`${proxy.url}/`);
      const first = await anonymousId(page);
      await page.click('a[data-product-id]');
      await page.waitForSelector('#add-to-cart');
      const second = await anonymousId(page);
      assert.notEqual(second, first, 'without consent every page gets its own id, nothing is stored');
      await page.click('#add-to-cart');
      await page.evaluate(() => { pz.track('Should Not Arrive'); pz.flush(); });
      await page.waitForTimeout(1500);
      const state = await page.evaluate(() => pz.debug());
      assert.equal(state.persistent, false);
      assert.ok(state.consentDropped >= 3, JSON.stringify(state));
      assert.deepEqual(await page.evaluate(() => Object.keys(localStorage).filter((k) => k.startsWith('pz_')).sort()),
        ['pz_c'], 'only the refusal itself is remembered');
      await page.close({ runBeforeUnload: true });
      await new Promise((r) => setTimeout(r, 1000));
      assert.equal(proxy.state.batches + proxy.state.refused, 0, 'no batch was sent');
      assert.equal(await profile(first), null);
      assert.equal(await profile(second), null);
    });
  } finally {
    await proxy.close();
  }
});

test('consent withdrawn after a grant is sent, and nothing after it', async () => {
  await withBrowser(async (browser) => {
    const ctx = await context(browser, ALL);
    const page = await ctx.newPage();
    await page.goto(`${BASE_URL}/`);
    const id = await anonymousId(page);
    await page.evaluate(() => pz.flush());
    await profileWhere(id, (p) => p.page_views === 1, 'the first page view');
    await page.evaluate(() => {
      pz.consent({ analytics: false, personalization: false, marketing: false });
      pz.track('After Withdrawal');
      pz.flush();
    });
    const p = await profileWhere(id, (p) => p.consent?.analytics?.status === 'denied', 'the withdrawal');
    await new Promise((r) => setTimeout(r, 1000));
    const settled = await profile(id);
    assert.equal(settled.event_counts['After Withdrawal'], undefined);
    assert.equal(settled.consent.marketing.status, 'denied');
    assert.equal(p.page_views, 1);
  });
});

test('consent granted: page views and commerce arrive with exact counts', async () => {
  await withBrowser(async (browser) => {
    const ctx = await context(browser, ALL);
    const page = await ctx.newPage();
    await page.goto(`${BASE_URL}/`);
    const id = await anonymousId(page);
    await page.click('a[data-product-id]');
    await page.waitForSelector('#add-to-cart');
    await page.click('#add-to-cart');
    await page.evaluate(() => pz.flush());
    const p = await profileWhere(id, (p) => p.page_views === 2 && p.cart.length === 1, 'two page views and a cart line');
    assert.equal(p.event_counts.product_viewed, 1);
    assert.equal(p.event_counts.cart_add, 1);
    assert.equal(p.sessions, 1);
  });
});

test('an action right before the page closes is delivered by the beacon', async () => {
  await withBrowser(async (browser) => {
    const ctx = await context(browser, ALL);
    const page = await ctx.newPage();
    await page.goto(`${BASE_URL}/`);
    const id = await anonymousId(page);
    await page.evaluate(() => pz.track('Closed Right Away', { n: 1 }));
    await page.close({ runBeforeUnload: true });
    const p = await profileWhere(id, (p) => p.event_counts['Closed Right Away'] === 1, 'the last event');
    assert.equal(p.page_views, 1);
  });
});

test('collector down: events stay stored and the next page load delivers them once', async () => {
  const proxy = await startProxy();
  try {
    await withBrowser(async (browser) => {
      const ctx = await context(browser, ALL);
      let page = await ctx.newPage();
      proxy.setDown(true);
      await page.goto(`${proxy.url}/`);
      const id = await anonymousId(page);
      await page.evaluate(() => { pz.track('While Down', { n: 1 }); pz.flush(); });
      await waitFor(() => page.evaluate(() => pz.debug().retries >= 2), { what: 'two refused tries' });
      const stored = await page.evaluate(() => Object.keys(localStorage).filter((k) => k.startsWith('pz_q_')).length);
      assert.ok(stored >= 1, 'the unsent batch is stored');
      await page.close({ runBeforeUnload: true });
      await new Promise((r) => setTimeout(r, 500));
      assert.equal(await profile(id), null, 'nothing got through while the collector was down');
      proxy.setDown(false);
      page = await ctx.newPage();
      await page.goto(`${proxy.url}/cart.html`);
      const p = await profileWhere(id, (p) => p.event_counts['While Down'] === 1 && p.page_views === 2,
        'the stored events and the new page view');
      assert.equal(p.page_views, 2);
      // Retries and the beacons sent at close carried the same message ids: counted once.
      await page.evaluate(() => pz.flush());
      await new Promise((r) => setTimeout(r, 1500));
      const settled = await profile(id);
      assert.equal(settled.event_counts['While Down'], 1);
      assert.equal(settled.page_views, 2);
      assert.ok(proxy.state.refused >= 2, `refused ${proxy.state.refused}`);
    });
  } finally {
    await proxy.close();
  }
});

test('two tabs of one visitor share the profile and count each event once', async () => {
  await withBrowser(async (browser) => {
    const ctx = await context(browser, ALL);
    const a = await ctx.newPage();
    await a.goto(`${BASE_URL}/`);
    const id = await anonymousId(a);
    const b = await ctx.newPage();
    await b.goto(`${BASE_URL}/`);
    assert.equal(await anonymousId(b), id, 'one anonymous id per visitor');
    await a.evaluate(() => { pz.track('Tab A'); pz.flush(); });
    await b.evaluate(() => { pz.track('Tab B'); pz.flush(); });
    await profileWhere(id, (p) => p.page_views === 2 && p.event_counts['Tab A'] === 1 && p.event_counts['Tab B'] === 1, 'both tabs');
    await a.close({ runBeforeUnload: true });
    await b.close({ runBeforeUnload: true });
    await new Promise((r) => setTimeout(r, 1000));
    const p = await profile(id);
    assert.equal(p.event_counts['Tab A'], 1);
    assert.equal(p.event_counts['Tab B'], 1);
    assert.equal(p.page_views, 2);
  });
});

test('single-page navigation counts each new URL once', async () => {
  await withBrowser(async (browser) => {
    const ctx = await context(browser, ALL);
    const page = await ctx.newPage();
    await page.goto(`${BASE_URL}/`);
    const id = await anonymousId(page);
    await page.evaluate(() => {
      history.pushState({}, '', '/spa/one');
      history.replaceState({}, '', '/spa/one'); // same URL: not a new page
      history.pushState({}, '', '/spa/two');
      location.hash = '#details';
      pz.flush();
    });
    await page.goBack(); // popstate back to /spa/two
    await page.evaluate(() => pz.flush());
    const p = await profileWhere(id, (p) => p.page_views >= 4, 'the SPA page views');
    await new Promise((r) => setTimeout(r, 1000));
    const settled = await profile(id);
    // Landing, /spa/one, /spa/two, #details, back to /spa/two.
    assert.equal(settled.page_views, 5, JSON.stringify(settled.event_counts));
    assert.ok(p.page_views <= 5);
  });
});

test('calls made before the tracker loaded arrive in order', async () => {
  await withBrowser(async (browser) => {
    const ctx = await context(browser, ALL);
    // Hold the tracker's script back so the page's calls queue in the snippet.
    let release;
    const held = new Promise((r) => { release = r; });
    await ctx.route('**/t/pz*.js', async (route) => { await held; await route.continue(); });
    const page = await ctx.newPage();
    await page.goto(`${BASE_URL}/`, { waitUntil: 'domcontentloaded' });
    await page.evaluate(() => { pz.track('Early One'); pz.track('Early Two'); });
    release();
    const id = await anonymousId(page);
    await page.evaluate(() => pz.flush());
    const p = await profileWhere(id, (p) => p.event_counts['Early Two'] === 1, 'the early calls');
    assert.equal(p.event_counts['Early One'], 1);
  });
});
