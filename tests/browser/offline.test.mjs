// The tracker when the browser loses the network mid-session and gets it back: what was
// tracked meanwhile arrives once, with nothing counted twice.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BASE_URL, profile, waitFor, withBrowser } from './harness.mjs';

const ALL = { necessary: true, analytics: true, personalization: true, marketing: true };

test('the network lost mid-session and regained: every event arrives exactly once', async () => {
  await withBrowser(async (browser) => {
    const ctx = await browser.newContext();
    await ctx.addInitScript((c) => {
      localStorage.setItem('shop.consent', JSON.stringify({ v: 1, ...c, at: new Date().toISOString() }));
    }, ALL);
    const page = await ctx.newPage();
    await page.goto(`${BASE_URL}/`);
    const id = await waitFor(() => page.evaluate(() => window.pz && pz.anonymousId && pz.anonymousId()), {
      what: 'the tracker to report an anonymous id',
    });
    await waitFor(async () => (await profile(id))?.page_views === 1, { what: 'the first page view' });

    await ctx.setOffline(true);
    for (let n = 1; n <= 5; n++) {
      await page.evaluate((n) => pz.track('Offline Click', { n }), n);
    }
    await page.evaluate(() => pz.flush());
    await waitFor(() => page.evaluate(() => pz.debug().retries >= 2), { what: 'two failed tries while offline' });
    const during = await page.evaluate(() => pz.debug());
    assert.equal(during.lastError, 'network error');
    assert.equal((await profile(id)).event_counts['Offline Click'], undefined, 'nothing got through offline');

    await ctx.setOffline(false);
    await page.evaluate(() => pz.track('Online Again'));
    const p = await waitFor(async () => {
      const p = await profile(id);
      return p && p.event_counts['Offline Click'] === 5 && p.event_counts['Online Again'] === 1 ? p : null;
    }, { timeoutMs: 30_000, what: 'the events tracked offline, and the one after' });
    assert.equal(p.page_views, 1);

    // Settled: the queue is empty and a further flush changes nothing.
    await waitFor(() => page.evaluate(() => pz.debug().queued === 0 && pz.debug().inFlight === 0), {
      what: 'an empty queue',
    });
    await page.evaluate(() => pz.flush());
    await new Promise((r) => setTimeout(r, 1500));
    const settled = await profile(id);
    assert.equal(settled.event_counts['Offline Click'], 5);
    assert.equal(settled.event_counts['Online Again'], 1);
    assert.equal(settled.events, p.events);
  });
});
