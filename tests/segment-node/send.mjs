// Sends Segment calls with the real @segment/analytics-node to the collector at
// process.argv[2] with write key process.argv[3]; exits non-zero when a request fails.
import { Analytics } from '@segment/analytics-node'

const [host, writeKey] = process.argv.slice(2)
const analytics = new Analytics({ writeKey, host, maxRetries: 0, flushAt: 50, flushInterval: 100 })
let failed = false
analytics.on('error', (err) => {
  console.error('segment error:', err)
  failed = true
})

const userId = 'node-ada'
const runner = { product_id: 'sku-1', category: 'shoes', name: 'Runner', price: 19.99 }
analytics.identify({ userId, anonymousId: 'node-v1', traits: { email: 'ada@example.com', plan: 'pro' } })
analytics.page({ userId, name: 'Home', properties: { url: 'https://shop.example/' } })
analytics.track({ userId, event: 'Product Viewed', properties: runner })
analytics.track({ userId, event: 'Product Added', properties: { ...runner, quantity: 2 } })
analytics.track({
  userId,
  event: 'Order Completed',
  properties: { order_id: 'node-o1', revenue: 39.98, currency: 'EUR', products: [{ ...runner, quantity: 2 }] },
})
analytics.page({ anonymousId: 'node-v2', name: 'Landing' })
analytics.alias({ userId, previousId: 'node-v2' })
// Analytics refused in the message's consent context: dropped.
analytics.track({
  userId,
  event: 'Newsletter Signup',
  context: { consent: { categoryPreferences: { Analytics: false } } },
})
analytics.group({ userId, groupId: 'acme', traits: { name: 'Acme Ltd' } })
await analytics.closeAndFlush({ timeout: 10000 })
if (failed) process.exit(1)
