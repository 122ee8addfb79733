// The tracker reads the page's consent signals (an IAB TCF v2.2 CMP, Google Consent Mode v2,
// Global Privacy Control) on a real demo page, and answers bad calls with one console warning
// per problem, never an exception into the page.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BASE_URL, profile, waitFor, withBrowser } from './harness.mjs';

/** The tracker's consent states once `check` accepts them. */
async function consentWhere(page, check, what) {
  return waitFor(async () => {
    const c = await page.evaluate(() => window.pz && typeof pz.debug === 'function' && pz.debug()?.consent);
    return c && check(c) ? c : null;
  }, { what });
}

test('a TCF CMP decides consent per purpose, and granting analytics lets events out', async () => {
  await withBrowser(async (browser) => {
    // No stored shop choice: the banner stays open and the shop says nothing, so only the
    // CMP decides. The CMP answers at once with TCF purposes 1, 8, 9 (analytics only).
    const ctx = await browser.newContext();
    await ctx.addInitScript(() => {
      window.__tcfapi = (command, version, callback) => {
        if (command !== 'addEventListener' || version !== 2) return;
        window.tcfListener = callback;
        callback({ gdprApplies: true, eventStatus: 'tcloaded', purpose: { consents: { 1: true, 8: true, 9: true } } }, true);
      };
    });
    const page = await ctx.newPage();
    await page.goto(`${BASE_URL}/`);
    const c = await consentWhere(page, (c) => c.analytics !== 'pending', 'the CMP decision');
    assert.deepEqual(c, { necessary: 'granted', analytics: 'granted', personalization: 'denied', marketing: 'denied' });
    const id = await page.evaluate(() => pz.anonymousId());
    await page.evaluate(() => pz.flush());
    const p = await waitFor(async () => {
      const p = await profile(id);
      return p && p.page_views === 1 && p.consent?.analytics ? p : null;
    }, { what: 'the page view under the CMP grant, and the CMP decision' });
    assert.equal(p.consent.analytics.status, 'granted');
    assert.equal(p.consent.marketing.status, 'denied');

    // The visitor accepts everything in the CMP.
    await page.evaluate(() => window.tcfListener({
      gdprApplies: true,
      eventStatus: 'useractioncomplete',
      purpose: { consents: Object.fromEntries(Array.from({ length: 11 }, (_, i) => [i + 1, true])) },
    }, true));
    await consentWhere(page, (c) => c.marketing === 'granted' && c.personalization === 'granted', 'the CMP update');
  });
});

test('Consent Mode defaults and updates, and Global Privacy Control, set consent', async () => {
  await withBrowser(async (browser) => {
    const ctx = await browser.newContext();
    await ctx.addInitScript(() => {
      Object.defineProperty(Navigator.prototype, 'globalPrivacyControl', { get: () => true });
      // What gtag('consent', 'default', ...) leaves in the data layer before the tracker loads.
      window.dataLayer = [['consent', 'default', { analytics_storage: 'denied', personalization_storage: 'denied' }]];
    });
    const page = await ctx.newPage();
    await page.goto(`${BASE_URL}/`);
    // Defaults are not decisions; GPC makes marketing's default denied.
    let c = await consentWhere(page, (c) => c.analytics === 'denied', 'the Consent Mode defaults');
    assert.deepEqual(c, { necessary: 'granted', analytics: 'denied', personalization: 'denied', marketing: 'denied' });
    await page.evaluate(() => dataLayer.push(['consent', 'update', { analytics_storage: 'granted' }]));
    c = await consentWhere(page, (c) => c.analytics === 'granted', 'the Consent Mode update');
    assert.equal(c.marketing, 'denied', 'GPC still holds where nothing was decided');
    // An explicit decision wins over GPC.
    await page.evaluate(() => dataLayer.push(['consent', 'update', { ad_user_data: 'granted', ad_personalization: 'granted' }]));
    await consentWhere(page, (c) => c.marketing === 'granted', 'the marketing decision');
  });
});

test('bad calls are reported once per problem on the console and never throw', async () => {
  await withBrowser(async (browser) => {
    const ctx = await browser.newContext();
    await ctx.addInitScript(() => {
      localStorage.setItem('shop.consent', JSON.stringify({
        v: 1, necessary: true, analytics: true, personalization: true, marketing: true, at: new Date().toISOString(),
      }));
    });
    const page = await ctx.newPage();
    const warnings = [];
    const errors = [];
    page.on('console', (m) => { if (m.type() === 'warning' && m.text().startsWith('pz:')) warnings.push(m.text()); });
    page.on('pageerror', (e) => errors.push(String(e)));
    await page.goto(`${BASE_URL}/`);
    const id = await waitFor(() => page.evaluate(() => window.pz && typeof pz.anonymousId === 'function' && pz.anonymousId()),
      { what: 'the tracker' });
    const thrown = await page.evaluate(() => {
      const calls = [
        () => pz.track(),
        () => pz.track(42),
        () => pz.track(''),
        () => pz.identify(null),
        () => pz.identify('{not an id}'),
        () => pz.identify('undefined'),
        () => pz.alias(' NULL '),
        () => pz.cartAdd({}),
        () => pz.orderCompleted({ orderId: 'o-1', revenue: 12.5 }),
        () => pz.consent('yes'),
        () => pz.q.push(['noSuchCall', []]),
        () => pz.track('Kept', { fn() {}, ok: 1 }),
        () => pz.track('Kept', { fn() {}, ok: 1 }),
      ];
      let n = 0;
      for (const c of calls) {
        try { c(); } catch (e) { n += 1; }
      }
      pz.flush();
      return n;
    });
    assert.equal(thrown, 0, 'no call throws into the page');
    assert.deepEqual(errors, []);
    await waitFor(async () => {
      const p = await profile(id);
      return p && p.event_counts.Kept === 2;
    }, { what: 'the valid calls, with their bad property left out' });
    assert.equal(new Set(warnings).size, warnings.length, `each problem once: ${JSON.stringify(warnings)}`);
    for (const call of ['track', 'identify', 'cartAdd', 'orderCompleted', 'consent', 'noSuchCall']) {
      assert.ok(warnings.some((w) => w.includes(call)), `a warning names ${call}: ${JSON.stringify(warnings)}`);
    }
    // Placeholders never become the visitor's user id.
    assert.ok(warnings.some((w) => w.includes('"undefined" is a placeholder')), JSON.stringify(warnings));
    assert.ok(warnings.some((w) => w.startsWith('pz: alias:') && w.includes('placeholder')), JSON.stringify(warnings));
    assert.equal(await page.evaluate(() => pz.userId()), null);
    // track() without a name, with a number and with '' are one problem.
    assert.equal(warnings.filter((w) => w.startsWith('pz: track:')).length, 2, JSON.stringify(warnings));
  });
});
