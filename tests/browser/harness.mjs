// Shared helpers for the browser tests: a headless Chromium driven by playwright-core, and
// reads of the collector's profile API. The collector and Redis are started by
// tests/tests/browser.rs, which passes BASE_URL and API_TOKEN.

import { chromium } from 'playwright-core';

export const BASE_URL = required('BASE_URL');
export const API_TOKEN = required('API_TOKEN');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

function required(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: run the browser tests through cargo xtask test`);
  return value;
}

/** Launches headless Chromium with the flags this machine needs (no sandbox as root, no
 *  background networking: the network is closed). */
export async function launch() {
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
}

/** Runs `fn(browser)` with a fresh headless Chromium, closed afterwards whatever happens. */
export async function withBrowser(fn) {
  const browser = await launch();
  try {
    return await fn(browser);
  } finally {
    await browser.close();
  }
}

/** GET /v1/profiles/{id}: the profile JSON, or null on 404. */
export async function profile(id) {
  const res = await fetch(`${BASE_URL}/v1/profiles/${encodeURIComponent(id)}`, {
    headers: { Authorization: `Bearer ${API_TOKEN}` },
  });
  if (res.status === 404) return null;
  if (res.status !== 200) throw new Error(`profile ${id}: HTTP ${res.status} ${await res.text()}`);
  return res.json();
}

/** Polls `check` until it returns a truthy value or `timeoutMs` passes; returns the value. */
export async function waitFor(check, { timeoutMs = 10_000, intervalMs = 100, what = 'condition' } = {}) {
  const deadline = Date.now() + timeoutMs;
  let last;
  while (Date.now() < deadline) {
    last = await check();
    if (last) return last;
    await new Promise((r) => setTimeout(r, intervalMs));
  }
  throw new Error(`timed out after ${timeoutMs} ms waiting for ${what} (last: ${JSON.stringify(last)})`);
}

