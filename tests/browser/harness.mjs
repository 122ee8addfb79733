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


/** A reverse proxy in front of the collector, so a test can take the collector "down" for
 *  the browser (503 with Retry-After for POST /v1/fb) while pages keep loading. The only
 *  faithful way: request interception and offline emulation both miss beacons sent while a
 *  page unloads. Host and Origin are rewritten to the collector's, so the demo write key's
 *  origin check sees its own address. `refused` counts batches answered 503; `batches`
 *  counts those forwarded. */
export async function startProxy() {
  const http = await import('node:http');
  const upstream = new URL(BASE_URL);
  const state = { down: false, refused: 0, batches: 0 };
  const server = http.createServer((req, res) => {
    const isBatch = req.method === 'POST' && req.url.startsWith('/v1/fb');
    if (isBatch && state.down) {
      state.refused += 1;
      req.resume();
      res.writeHead(503, { 'content-type': 'application/json', 'retry-after': '1' });
      res.end('{"error":"unavailable"}');
      return;
    }
    if (isBatch) state.batches += 1;
    const headers = { ...req.headers, host: upstream.host };
    if (headers.origin) headers.origin = upstream.origin;
    const out = http.request(
      { host: upstream.hostname, port: upstream.port, method: req.method, path: req.url, headers },
      (up) => {
        const back = { ...up.headers };
        // The browser checks CORS against its own origin, the proxy's.
        if (back['access-control-allow-origin']) back['access-control-allow-origin'] = req.headers.origin;
        res.writeHead(up.statusCode, back);
        up.pipe(res);
      },
    );
    out.on('error', () => { res.writeHead(502); res.end(); });
    req.pipe(out);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const url = `http://127.0.0.1:${server.address().port}`;
  return {
    url,
    state,
    setDown(down) { state.down = down; },
    close: () => new Promise((r) => { server.closeAllConnections(); server.close(r); }),
  };
}
