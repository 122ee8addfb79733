// Benchmark: what pz.track() costs the calling page, in headless Chromium, on a demo shop
// page served by the real collector, next to a baseline measured in the same page and run:
// window.dataLayer.push() of the same data, which a page using Google Tag Manager pays for
// every event anyway. Run by `cargo xtask bench` (this one only: `--only tracker`), which
// starts the collector in demo mode and passes BASE_URL and API_TOKEN. (Not named
// *.test.mjs: `node --test` leaves it alone.)
//
// What the page pays is main-thread time: the call itself, plus whatever the call leaves for
// later, "deferred" below: the microtasks it queued (the loader hands events to the wasm in
// one), timed by awaiting right after the call, since a continuation queued then runs after
// them; and the callbacks of timers set during the call, which are wrapped to be timed.
//
// Two situations, both measured in every round:
// - alone: one dataLayer.push(), then one track(), each after the page has been idle with an
//   empty queue; what a page pays on a click, with whatever ran in between having left the
//   CPU caches cold.
// - in a burst: track() calls back to back, caches warm; then a block of dataLayer.push()
//   calls.
// Plus the first track() after the tracker loaded (one call, compiles the loader's paths).
//
// Timer: Chromium coarsens performance.now() to 100 µs, or to 5 µs on a cross-origin
// isolated page, and puts each step's boundary at a random point, so a mean over many
// intervals is not biased by the step. The collector serves the shop without COOP/COEP
// headers, so this script adds them to the page's own response; the tracker's requests are
// all same-origin and unaffected. A lone call spans a few 5 µs steps or more and is timed
// on its own; a lone dataLayer.push() takes about one step, so the lone ratio compares means
// (of the fastest 95% of calls, so that one interrupt does not move it). In a burst, calls
// take a step or less: each round's burst is timed as a block (the median per call is the
// median of the blocks' per-call means; the p99 comes from the calls timed one by one), its
// deferred work is one timer callback divided by the calls, and dataLayer.push() is timed in
// blocks only; the burst ratio compares medians.
//
// Between rounds the tracker's timer delivers what was queued and the next round waits
// until the queue is empty, so the queue stays far below its cap (1,000 events). Afterwards
// the collector's profile must count every Bench event.
//
// Progress and figures go to stderr; stdout gets exactly one JSON line. The exit status is
// non-zero when an event was dropped, refused or not counted, or the page is not isolated.

import { BASE_URL, launch, profile, waitFor } from './harness.mjs';

const PAGE_PATH = '/product.html';
const PAGE = `${BASE_URL}${PAGE_PATH}?id=sku-shoes-001`;
/** Measured rounds. */
const ROUNDS = 200;
/** Unmeasured rounds first, so that every path is compiled by the optimising tiers. */
const WARMUP_ROUNDS = 5;
/** How long the page idles before each lone call. */
const IDLE_MS = 10;
/** track() calls in a round's burst. */
const BURST_CALLS = 10;
/** dataLayer.push() calls in a round's block: enough for the block to span many timer steps. */
const BLOCK_CALLS = 10_000;
const CONSENT_ALL = { necessary: true, analytics: true, personalization: true, marketing: true };
const ISOLATION = {
  'cross-origin-opener-policy': 'same-origin',
  'cross-origin-embedder-policy': 'require-corp',
};

function log(line) {
  process.stderr.write(`bench-track: ${line}\n`);
}

/** Nearest-rank percentile of an ascending array (as loadgen computes its latencies). */
function percentile(sorted, q) {
  if (sorted.length === 0) return 0;
  const rank = Math.ceil(q * sorted.length);
  return sorted[Math.min(Math.max(rank, 1), sorted.length) - 1];
}

/** Three significant digits. */
function sig(x) {
  return Number(x.toPrecision(3));
}

/** Median, p99 and the mean of the fastest 95% of `samples`. */
function stats(samples) {
  const sorted = [...samples].sort((a, b) => a - b);
  const fastest = sorted.slice(0, Math.max(1, Math.floor(sorted.length * 0.95)));
  return {
    n: sorted.length,
    p50: percentile(sorted, 0.5),
    p99: percentile(sorted, 0.99),
    mean95: fastest.reduce((sum, x) => sum + x, 0) / fastest.length,
  };
}

/** Runs in the page: the first call, the warm-up and the measured rounds. */
async function measure({ rounds, warmupRounds, idleMs, burstCalls, blockCalls }) {
  const sleep = (t) => new Promise((r) => setTimeout(r, t));

  // The time from `t` until the microtasks queued before this call have run.
  async function microtasks(t) {
    await null;
    return performance.now() - t;
  }
  // Timers set while `watch` is a slot run wrapped: the slot sums their callbacks' time.
  const realSetTimeout = window.setTimeout;
  let watch = null;
  window.setTimeout = function (fn, ms) {
    const slot = watch;
    if (!slot || typeof fn !== 'function' || arguments.length > 2) {
      return realSetTimeout.apply(window, arguments);
    }
    slot.pending += 1;
    return realSetTimeout(() => {
      const s0 = performance.now();
      try {
        fn();
      } finally {
        slot.ms += performance.now() - s0;
        slot.pending -= 1;
      }
    }, ms);
  };
  const watching = () => (watch = { pending: 0, ms: 0 });
  // The time of the watched callbacks, once they have all run.
  async function deferred(slot) {
    while (slot.pending > 0) await sleep(1);
    return slot.ms;
  }
  // pz.flush() seals whatever waits, then the timer sends it; one batch is in flight at a
  // time, so the queue is empty once the collector has acknowledged everything.
  async function drain() {
    pz.flush();
    const deadline = performance.now() + 10_000;
    for (;;) {
      const state = pz.debug();
      if (state.queued === 0) return;
      if (performance.now() > deadline) throw new Error(`the queue did not drain: ${JSON.stringify(state)}`);
      await sleep(2);
    }
  }

  try {
    // The smallest step performance.now() moves by, watched for 20 ms.
    let step = Infinity;
    for (let last = performance.now(), end = last + 20; last < end;) {
      const now = performance.now();
      if (now > last) step = Math.min(step, now - last);
      last = now;
    }

    const firstSlot = watching();
    const f0 = performance.now();
    pz.track('Bench', { sku: 'A-1', price: 19.99, qty: 2 });
    const f1 = performance.now();
    watch = null;
    const firstDeferred = (await microtasks(f1)) + (await deferred(firstSlot));
    const first = f1 - f0;

    const layer = window.dataLayer;
    const kept = layer.length;
    const t = new Float64Array(burstCalls + 1);
    const alone = { call: [], deferred: [], total: [], push: [] };
    const burst = { call: [], callBlocks: [], deferred: [], total: [], pushBlocks: [] };
    for (let r = -warmupRounds; r < rounds; r++) {
      // One call of each after the page has been idle, with an empty queue: what a page
      // pays on a click.
      await drain();
      await sleep(idleMs);
      const p0 = performance.now();
      layer.push({ event: 'Bench', sku: 'A-1', price: 19.99, qty: 2 });
      const p1 = performance.now();
      await sleep(idleMs);
      const loneSlot = watching();
      const a0 = performance.now();
      pz.track('Bench', { sku: 'A-1', price: 19.99, qty: 2 });
      const a1 = performance.now();
      watch = null;
      const loneDeferred = (await microtasks(a1)) + (await deferred(loneSlot));

      // A burst, caches warm: each track() call timed, and the block of them; then a block
      // of dataLayer.push() calls.
      const burstSlot = watching();
      t[0] = performance.now();
      for (let i = 1; i <= burstCalls; i++) {
        pz.track('Bench', { sku: 'A-1', price: 19.99, qty: 2 });
        t[i] = performance.now();
      }
      watch = null;
      const burstMicrotasks = await microtasks(t[burstCalls]);
      const b0 = performance.now();
      for (let i = 0; i < blockCalls; i++) {
        layer.push({ event: 'Bench', sku: 'A-1', price: 19.99, qty: 2 });
      }
      const b1 = performance.now();
      layer.length = kept;
      const burstDeferred = (burstMicrotasks + (await deferred(burstSlot))) / burstCalls;
      if (r >= 0) {
        alone.push.push(p1 - p0);
        alone.call.push(a1 - a0);
        alone.deferred.push(loneDeferred);
        alone.total.push(a1 - a0 + loneDeferred);
        for (let i = 1; i <= burstCalls; i++) burst.call.push(t[i] - t[i - 1]);
        const block = (t[burstCalls] - t[0]) / burstCalls;
        burst.callBlocks.push(block);
        burst.deferred.push(burstDeferred);
        burst.total.push(block + burstDeferred);
        burst.pushBlocks.push((b1 - b0) / blockCalls);
      }
    }
    await drain();
    return {
      isolated: self.crossOriginIsolated,
      step,
      first,
      firstDeferred,
      alone,
      burst,
      tracked: 1 + (warmupRounds + rounds) * (1 + burstCalls),
      state: pz.debug(),
    };
  } finally {
    window.setTimeout = realSetTimeout;
  }
}

async function main() {
  const browser = await launch();
  try {
    const chromium = browser.version();
    const ctx = await browser.newContext();
    // The shop's stored consent choice (www/README.md): all purposes granted, no banner.
    await ctx.addInitScript((c) => {
      localStorage.setItem('shop.consent', JSON.stringify({ v: 1, ...c, at: new Date().toISOString() }));
    }, CONSENT_ALL);
    const page = await ctx.newPage();
    await page.route((url) => url.pathname === PAGE_PATH, async (route) => {
      const response = await route.fetch();
      await route.fulfill({ response, headers: { ...response.headers(), ...ISOLATION } });
    });
    log(`Chromium ${chromium}, ${PAGE}`);
    await page.goto(PAGE);
    const anonymousId = await waitFor(
      () => page.evaluate(() => window.pz && typeof pz.debug === 'function' && pz.anonymousId()),
      { what: 'the tracker to load and report an anonymous id' },
    );
    log(`${WARMUP_ROUNDS} warm-up and ${ROUNDS} measured rounds: one dataLayer.push() and one track() ` +
      `after ${IDLE_MS} ms idle, then ${BURST_CALLS} track() and ${BLOCK_CALLS} dataLayer.push() calls in a row`);
    const m = await page.evaluate(measure, {
      rounds: ROUNDS,
      warmupRounds: WARMUP_ROUNDS,
      idleMs: IDLE_MS,
      burstCalls: BURST_CALLS,
      blockCalls: BLOCK_CALLS,
    });
    if (!m.isolated) {
      throw new Error(`${PAGE} is not cross-origin isolated: performance.now() moves in ${m.step} ms steps`);
    }
    const counted = await waitFor(async () => {
      const p = await profile(anonymousId);
      const n = p?.event_counts?.Bench ?? 0;
      return n >= m.tracked ? n : null;
    }, { timeoutMs: 15_000, what: `the profile to count ${m.tracked} Bench events` }).catch((err) => {
      log(err.message);
      return null;
    });
    await ctx.close();

    const alone = {};
    for (const k of Object.keys(m.alone)) alone[k] = stats(m.alone[k]);
    const burst = {};
    for (const k of Object.keys(m.burst)) burst[k] = stats(m.burst[k]);
    const aloneRatio = alone.total.mean95 / alone.push.mean95;
    const aloneCallRatio = alone.call.mean95 / alone.push.mean95;
    const burstRatio = burst.total.p50 / burst.pushBlocks.p50;
    const burstCallRatio = burst.callBlocks.p50 / burst.pushBlocks.p50;
    const { state } = m;
    const f = (x) => `${sig(x)} ms`;
    const row = (name, s) => log(`  ${name.padEnd(24)} median ${f(s.p50)}, p99 ${f(s.p99)}`);
    log(`performance.now() steps: ${f(m.step)} (page cross-origin isolated)`);
    log(`first track() after load: ${f(m.first)} in the call + ${f(m.firstDeferred)} deferred`);
    log(`one call after ${IDLE_MS} ms idle (${alone.call.n} calls each):`);
    row('track(), in the call', alone.call);
    row('track(), deferred', alone.deferred);
    row('track(), total', alone.total);
    row('dataLayer.push()', alone.push);
    log(`  track() / dataLayer.push(), means of the fastest 95%: ${f(alone.total.mean95)} / ` +
      `${f(alone.push.mean95)} = ${sig(aloneRatio)} (in the call only: ${sig(aloneCallRatio)})`);
    log(`in bursts of ${BURST_CALLS} (${ROUNDS} bursts), per call:`);
    log(`  ${'track(), in the call'.padEnd(24)} median ${f(burst.callBlocks.p50)} (blocks), ` +
      `p99 ${f(burst.call.p99)} (${burst.call.n} calls timed one by one)`);
    log(`  ${'track(), deferred'.padEnd(24)} median ${f(burst.deferred.p50)}`);
    log(`  ${'track(), total'.padEnd(24)} median ${f(burst.total.p50)}`);
    log(`  ${'dataLayer.push()'.padEnd(24)} median ${f(burst.pushBlocks.p50)} (blocks of ${BLOCK_CALLS})`);
    log(`  track() / dataLayer.push(), medians: ${f(burst.total.p50)} / ${f(burst.pushBlocks.p50)} = ` +
      `${sig(burstRatio)} (in the call only: ${sig(burstCallRatio)})`);
    log(`delivery: ${m.tracked} Bench events tracked, ${counted ?? 'not all'} counted in the profile; ` +
      `tracker sent ${state.sent}, dropped ${state.dropped}, queued ${state.queued}, last error ${state.lastError}`);

    console.log(JSON.stringify({
      chromium,
      timer_step_ms: sig(m.step),
      first_call_ms: sig(m.first),
      first_deferred_ms: sig(m.firstDeferred),
      idle_ms: IDLE_MS,
      alone_calls: alone.call.n,
      alone_call_p50_ms: sig(alone.call.p50),
      alone_call_p99_ms: sig(alone.call.p99),
      alone_deferred_p50_ms: sig(alone.deferred.p50),
      alone_deferred_p99_ms: sig(alone.deferred.p99),
      alone_total_p50_ms: sig(alone.total.p50),
      alone_total_p99_ms: sig(alone.total.p99),
      alone_push_p50_ms: sig(alone.push.p50),
      alone_push_p99_ms: sig(alone.push.p99),
      alone_total_mean95_ms: sig(alone.total.mean95),
      alone_push_mean95_ms: sig(alone.push.mean95),
      alone_ratio: sig(aloneRatio),
      alone_call_ratio: sig(aloneCallRatio),
      burst_calls: burst.call.n,
      burst_call_p50_ms: sig(burst.callBlocks.p50),
      burst_call_p99_ms: sig(burst.call.p99),
      burst_deferred_p50_ms: sig(burst.deferred.p50),
      burst_total_p50_ms: sig(burst.total.p50),
      burst_push_p50_ms: sig(burst.pushBlocks.p50),
      burst_ratio: sig(burstRatio),
      burst_call_ratio: sig(burstCallRatio),
      events_tracked: m.tracked,
      events_counted: counted ?? 0,
      dropped: state.dropped,
      last_error: state.lastError,
    }));
    const problems = [];
    if (counted === null) problems.push(`the profile did not count all ${m.tracked} Bench events`);
    if (state.dropped !== 0) problems.push(`the tracker dropped ${state.dropped} events`);
    if (state.lastError !== null) problems.push(`the tracker's last error is ${state.lastError}`);
    if (problems.length > 0) throw new Error(problems.join('; '));
  } finally {
    await browser.close();
  }
}

main().catch((err) => {
  process.stderr.write(`bench-track: error: ${err.stack || err}\n`);
  process.exitCode = 1;
});
