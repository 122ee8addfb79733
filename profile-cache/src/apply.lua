-- Applies the events of one batch to one profile, atomically and idempotently.
--
-- KEYS: 1 profile, 2 traits, 3 counts, 4 ids, 5 viewed, 6 cat_viewed, 7 cat_bought, 8 cart,
--       9 dedupe, 10 the event stream (names: keys.rs).
-- ARGV: 1 now (Unix ms), 2 dedupe window (ms), 3 dedupe max ids, 4 recently viewed max,
--       5 event stream max length, 6 lifecycle new_for (ms), 7 profile id, 8 anonymous id,
--       9 user id, 10 session id ('' when unknown), then one JSON object per event, in the
--       client's order (script.rs, `ScriptEvent`): id (32 hex), kind, count (counts field),
--       ts and received (Unix ms), items [{product, category?, price, quantity}],
--       traits [[name, text]], revenue, currency, granted / denied [purpose], and event (the
--       stream entry, stored as is).
-- Returns {applied, duplicates}.
--
-- Redis does not roll back a script that fails halfway, so everything that can fail (key
-- types, stored numbers and cart lines this call reads) is checked before the first write;
-- bad data gets the error reply CORRUPT {"key":..,"field":..,"detail":..} and no change.
-- Numbers from cjson are doubles: exact for integers up to 2^53, which script.rs ensures.

local P, TRAITS, COUNTS, IDS, VIEWED, CAT_VIEWED, CAT_BOUGHT, CART, DEDUPE, STREAM =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local dedupe_max = tonumber(ARGV[3])
local viewed_max = tonumber(ARGV[4])
local stream_max = ARGV[5]
local new_for = tonumber(ARGV[6])
local profile_id, anonymous_id, user_id, session_id = ARGV[7], ARGV[8], ARGV[9], ARGV[10]

-- Lua's tostring would print large integers in exponent form.
local function int(n)
  return string.format('%d', n)
end

local function corrupt(key, field, detail)
  return redis.error_reply('CORRUPT ' .. cjson.encode({ key = key, field = field, detail = detail }))
end

-- Commands take a bounded number of unpacked arguments; long lists go in chunks.
local CHUNK = 500
local function hmget(key, fields)
  local values = {}
  for i = 1, #fields, CHUNK do
    local last = math.min(i + CHUNK - 1, #fields)
    local part = redis.call('HMGET', key, unpack(fields, i, last))
    for j = 1, #part do values[i + j - 1] = part[j] end
  end
  return values
end

---------------------------------------------------------------- checks, no writes

local expected = {
  [P] = 'hash', [TRAITS] = 'hash', [COUNTS] = 'hash', [IDS] = 'set', [VIEWED] = 'zset',
  [CAT_VIEWED] = 'zset', [CAT_BOUGHT] = 'zset', [CART] = 'hash', [DEDUPE] = 'zset',
  [STREAM] = 'stream',
}
for _, key in ipairs(KEYS) do
  local t = redis.call('TYPE', key)['ok']
  if t ~= 'none' and t ~= expected[key] then
    return corrupt(key, '-', 'is a ' .. t .. ', expected a ' .. expected[key])
  end
end

local PURPOSES = { 'necessary', 'analytics', 'personalization', 'marketing' }
local numeric = { 'first_seen', 'last_seen', 'events', 'page_views', 'sessions', 'orders',
  'revenue', 'email_opens', 'email_clicks', 'last_order_at', 'last_engaged_at',
  'cart_updated_at' }
for _, purpose in ipairs(PURPOSES) do numeric[#numeric + 1] = 'consent:' .. purpose .. ':at' end
local stored = redis.call('HMGET', P, unpack(numeric))
local cur = {}
for i, field in ipairs(numeric) do
  local v = stored[i]
  if v then
    if not string.match(v, '^%-?%d+$') then
      return corrupt(P, field, string.format('%q is not an integer', v))
    end
    cur[field] = tonumber(v)
  end
end

local events, names, seen_names, cart_products = {}, {}, {}, {}
for i = 11, #ARGV do
  local ok, e = pcall(cjson.decode, ARGV[i])
  if not ok or type(e) ~= 'table' then
    return redis.error_reply('ERR apply.lua: event ' .. (i - 10) .. ' is not a JSON object')
  end
  events[#events + 1] = e
  if not seen_names[e.count] then
    seen_names[e.count] = true
    names[#names + 1] = e.count
  end
  if e.kind == 'cart_add' or e.kind == 'cart_remove' then
    for _, it in ipairs(e.items or {}) do cart_products[#cart_products + 1] = it.product end
  end
end

local counts_now = hmget(COUNTS, names)
for i, name in ipairs(names) do
  local v = counts_now[i]
  if v and not string.match(v, '^%d+$') then
    return corrupt(COUNTS, name, string.format('%q is not a count', v))
  end
end

-- Only the lines this call changes are read; profile reads report any other bad line.
local cart = {}
local lines = hmget(CART, cart_products)
for i, product in ipairs(cart_products) do
  local raw = lines[i]
  if raw then
    local ok, line = pcall(cjson.decode, raw)
    if not ok or type(line) ~= 'table' or type(line.quantity) ~= 'number'
      or type(line.price) ~= 'number' then
      return corrupt(CART, product, 'is not a cart line {"quantity":n,"price":p,"category":c}')
    end
    if type(line.category) ~= 'string' then line.category = nil end
    cart[product] = line
  end
end

---------------------------------------------------------------- apply

-- Forget message ids received before the window.
redis.call('ZREMRANGEBYSCORE', DEDUPE, '-inf', '(' .. int(now - window))

local applied, duplicates = 0, 0
local first_seen, last_seen = cur.first_seen, cur.last_seen
local incr, latest = {}, {}           -- profile hash: counters; times that keep the latest
local counts, cat_viewed, cat_bought, viewed, traits = {}, {}, {}, {}, {}
local consent, currency = {}, nil
local cart_cleared, cart_changed = false, {}

local function add(t, k, n) t[k] = (t[k] or 0) + n end
local function newer(field, ts)
  local prev = latest[field] or cur[field]
  return not prev or ts >= prev
end
local function touch(field, ts)
  if newer(field, ts) then latest[field] = ts end
end
local function answer(purpose, status, ts)
  local field = 'consent:' .. purpose .. ':at'
  if newer(field, ts) then
    latest[field] = ts
    consent[purpose] = status
  end
end

for _, e in ipairs(events) do
  if redis.call('ZSCORE', DEDUPE, e.id) then
    duplicates = duplicates + 1
  else
    applied = applied + 1
    redis.call('ZADD', DEDUPE, int(e.received), e.id)
    local ts, kind = e.ts, e.kind
    if not first_seen or ts < first_seen then first_seen = ts end
    if not last_seen or ts > last_seen then last_seen = ts end
    add(incr, 'events', 1)
    add(counts, e.count, 1)
    if kind == 'page' then
      add(incr, 'page_views', 1)
    elseif kind == 'identify' then
      for _, t in ipairs(e.traits or {}) do traits[t[1]] = t[2] end
    elseif kind == 'product_viewed' then
      for _, it in ipairs(e.items or {}) do
        if not viewed[it.product] or ts > viewed[it.product] then viewed[it.product] = ts end
        if it.category then add(cat_viewed, it.category, 1) end
      end
    elseif kind == 'cart_add' or kind == 'cart_remove' then
      for _, it in ipairs(e.items or {}) do
        local line = cart[it.product] or { quantity = 0, price = it.price }
        if kind == 'cart_add' then
          line.quantity = line.quantity + it.quantity
          line.price = it.price
          if it.category then line.category = it.category end
        else
          line.quantity = math.max(0, line.quantity - it.quantity)
        end
        cart[it.product] = line
        cart_changed[it.product] = true
      end
      touch('cart_updated_at', ts)
    elseif kind == 'order_completed' then
      add(incr, 'orders', 1)
      add(incr, 'revenue', e.revenue or 0)
      if e.currency and newer('last_order_at', ts) then currency = e.currency end
      touch('last_order_at', ts)
      for _, it in ipairs(e.items or {}) do
        if it.category then add(cat_bought, it.category, it.quantity) end
      end
      cart, cart_changed, cart_cleared = {}, {}, true
      touch('cart_updated_at', ts)
    elseif kind == 'email_opened' then
      add(incr, 'email_opens', 1)
      touch('last_engaged_at', ts)
    elseif kind == 'email_clicked' then
      add(incr, 'email_clicks', 1)
      touch('last_engaged_at', ts)
    elseif kind == 'consent_change' then
      for _, purpose in ipairs(e.granted or {}) do answer(purpose, 'granted', ts) end
      for _, purpose in ipairs(e.denied or {}) do answer(purpose, 'denied', ts) end
    end
    redis.call('XADD', STREAM, 'MAXLEN', '~', stream_max, '*',
      'profile', profile_id, 'kind', kind, 'event', e.event)
  end
end

if applied == 0 then
  return { 0, duplicates }
end

for field, n in pairs(incr) do redis.call('HINCRBY', P, field, int(n)) end
for name, n in pairs(counts) do redis.call('HINCRBY', COUNTS, name, int(n)) end
for category, n in pairs(cat_viewed) do redis.call('ZINCRBY', CAT_VIEWED, int(n), category) end
for category, n in pairs(cat_bought) do redis.call('ZINCRBY', CAT_BOUGHT, int(n), category) end
for name, text in pairs(traits) do redis.call('HSET', TRAITS, name, text) end

local set = { 'id', profile_id, 'first_seen', int(first_seen), 'last_seen', int(last_seen),
  'lifecycle', (now - first_seen < new_for) and 'new' or 'active' }
local function put(field, value)
  set[#set + 1] = field
  set[#set + 1] = value
end
for field, ts in pairs(latest) do put(field, int(ts)) end
for purpose, status in pairs(consent) do put('consent:' .. purpose, status) end
if currency then put('currency', currency) end
if user_id ~= '' then put('user_id', user_id) end
if session_id ~= '' and redis.call('HGET', P, 'last_session_id') ~= session_id then
  redis.call('HINCRBY', P, 'sessions', 1)
  put('last_session_id', session_id)
end
redis.call('HSET', P, unpack(set))

if user_id ~= '' then redis.call('SADD', IDS, 'user:' .. user_id) end
if anonymous_id ~= '' then redis.call('SADD', IDS, 'anon:' .. anonymous_id) end

for product, ts in pairs(viewed) do
  local before = redis.call('ZSCORE', VIEWED, product)
  if not before or ts > tonumber(before) then redis.call('ZADD', VIEWED, int(ts), product) end
end
redis.call('ZREMRANGEBYRANK', VIEWED, 0, -(viewed_max + 1))

if cart_cleared then redis.call('DEL', CART) end
for product in pairs(cart_changed) do
  local line = cart[product]
  if line.quantity > 0 then
    local category = line.category and cjson.encode(line.category) or 'null'
    redis.call('HSET', CART, product, '{"quantity":' .. int(line.quantity) .. ',"price":'
      .. int(line.price) .. ',"category":' .. category .. '}')
  else
    redis.call('HDEL', CART, product)
  end
end

local kept = redis.call('ZCARD', DEDUPE)
if kept > dedupe_max then redis.call('ZREMRANGEBYRANK', DEDUPE, 0, kept - dedupe_max - 1) end

return { applied, duplicates }
