// The collector serves the demo site to a real browser, and pages run their scripts.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BASE_URL, withBrowser } from './harness.mjs';

test('the demo site loads in headless chromium without script errors', async () => {
  await withBrowser(async (browser) => {
    const page = await browser.newPage();
    const errors = [];
    page.on('pageerror', (e) => errors.push(String(e)));
    const res = await page.goto(`${BASE_URL}/`);
    assert.equal(res.status(), 200);
    assert.ok((await page.title()).length > 0, 'the page has a title');
    assert.deepEqual(errors, []);
  });
});
