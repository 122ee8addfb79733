-- Applies the events of one batch to one profile, atomically and idempotently.
--
-- KEYS: profile, traits, counts, ids, viewed, cat_viewed, cat_bought, cart, dedupe, stream
-- ARGV: now_ms, dedupe_window_ms, dedupe_max_ids, viewed_max, stream_max_len, new_for_ms,
--       profile_id, anonymous_id, user_id, session_id, then per event a pair:
--       ops JSON (what this script needs) and the stream entry JSON (stored as is).
-- Integers travel as strings: cjson turns numbers into doubles.
-- Returns {applied, duplicates}, or an error reply starting with CORRUPT before any write.

local P, TR, CN, IDS, VW, CV, CB, CART, DD, STREAM =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local now, window, dedupe_max, viewed_max, stream_max, new_for =
  ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local pid, anon, user, session = ARGV[7], ARGV[8], ARGV[9], ARGV[10]

local function corrupt(key, field, detail)
  return redis.error_reply('CORRUPT ' .. key .. ' ' .. field .. ' ' .. detail)
end

-- Nothing is written until every event has decoded and every value this call will
-- increment or parse has been checked: a script that fails halfway keeps its writes.
local expected = {
  [P] = 'hash', [TR] = 'hash', [CN] = 'hash', [IDS] = 'set', [VW] = 'zset',
  [CV] = 'zset', [CB] = 'zset', [CART] = 'hash', [DD] = 'zset', [STREAM] = 'stream',
}
for key, want in pairs(expected) do
  local t = redis.call('TYPE', key)['ok']
  if t ~= 'none' and t ~= want then
    return corrupt(key, '-', 'is a ' .. t .. ', expected a ' .. want)
  end
end

local numeric = { 'first_seen', 'last_seen', 'events', 'page_views', 'sessions', 'orders',
  'revenue', 'email_opens', 'email_clicks', 'last_order_at', 'last_engaged_at',
  'cart_updated_at' }
local current = redis.call('HMGET', P, unpack(numeric))
for i, field in ipairs(numeric) do
  if current[i] and not string.match(current[i], '^%-?%d+$') then
    return corrupt(P, field, 'is not an integer')
  end
end

local events, names, uses_cart = {}, {}, false
for i = 11, #ARGV, 2 do
  local ok, e = pcall(cjson.decode, ARGV[i])
  if not ok then
    return redis.error_reply('ERR event ' .. ((i - 9) / 2) .. ' is not valid JSON')
  end
  events[#events + 1] = { ops = e, raw = ARGV[i + 1] }
  names[#names + 1] = e.n
  if e.k == 'cart_add' or e.k == 'cart_remove' then uses_cart = true end
end
if #names > 0 then
  local counts = redis.call('HMGET', CN, unpack(names))
  for i, name in ipairs(names) do
    if counts[i] and not string.match(counts[i], '^%d+$') then
      return corrupt(CN, name, 'is not an integer')
    end
  end
end
local cart = {}
if uses_cart then
  local lines = redis.call('HGETALL', CART)
  for i = 1, #lines, 2 do
    local ok, line = pcall(cjson.decode, lines[i + 1])
    if not ok or type(line) ~= 'table' or type(line.quantity) ~= 'number' then
      return corrupt(CART, lines[i], 'is not a cart line')
    end
    cart[lines[i]] = line
  end
end

-- Forget message ids older than the dedupe window.
redis.call('ZREMRANGEBYSCORE', DD, '-inf', '(' .. (tonumber(now) - window))

local first_seen = current[1] and tonumber(current[1])
local last_seen = current[2] and tonumber(current[2])
local applied, duplicates, cart_dirty = 0, 0, false

for _, ev in ipairs(events) do
  local e = ev.ops
  if redis.call('ZSCORE', DD, e.id) then
    duplicates = duplicates + 1
  else
    applied = applied + 1
    redis.call('ZADD', DD, now, e.id)
    local ts = tonumber(e.ts)
    if not first_seen or ts < first_seen then first_seen = ts end
    if not last_seen or ts > last_seen then last_seen = ts end
    redis.call('HINCRBY', P, 'events', 1)
    redis.call('HINCRBY', CN, e.n, 1)
    local k = e.k
    if k == 'page' then
      redis.call('HINCRBY', P, 'page_views', 1)
    elseif k == 'identify' then
      for _, t in ipairs(e.tr or {}) do redis.call('HSET', TR, t[1], t[2]) end
    elseif k == 'product_viewed' then
      for _, it in ipairs(e.it or {}) do
        redis.call('ZADD', VW, e.ts, it[1])
        if it[2] ~= '' then redis.call('ZINCRBY', CV, 1, it[2]) end
      end
    elseif k == 'cart_add' or k == 'cart_remove' then
      local sign = (k == 'cart_add') and 1 or -1
      for _, it in ipairs(e.it or {}) do
        local line = cart[it[1]] or { quantity = 0, price = 0 }
        line.quantity = math.max(0, line.quantity + sign * tonumber(it[4]))
        if sign > 0 then
          line.price = tonumber(it[3])
          if it[2] ~= '' then line.category = it[2] end
        end
        cart[it[1]] = line
      end
      cart_dirty = true
      redis.call('HSET', P, 'cart_updated_at', e.ts)
    elseif k == 'order_completed' then
      redis.call('HINCRBY', P, 'orders', 1)
      redis.call('HINCRBY', P, 'revenue', e.rev)
      redis.call('HSET', P, 'last_order_at', e.ts)
      if e.cur and e.cur ~= '' then redis.call('HSET', P, 'currency', e.cur) end
      for _, it in ipairs(e.it or {}) do
        if it[2] ~= '' then redis.call('ZINCRBY', CB, it[4], it[2]) end
      end
      cart = {}
      cart_dirty = true
      redis.call('HSET', P, 'cart_updated_at', e.ts)
    elseif k == 'email_opened' or k == 'email_clicked' then
      redis.call('HINCRBY', P, (k == 'email_opened') and 'email_opens' or 'email_clicks', 1)
      redis.call('HSET', P, 'last_engaged_at', e.ts)
    elseif k == 'consent_change' then
      for _, purpose in ipairs(e.cg or {}) do
        redis.call('HSET', P, 'consent:' .. purpose, 'granted', 'consent:' .. purpose .. ':at', e.ts)
      end
      for _, purpose in ipairs(e.cd or {}) do
        redis.call('HSET', P, 'consent:' .. purpose, 'denied', 'consent:' .. purpose .. ':at', e.ts)
      end
    end
    redis.call('XADD', STREAM, 'MAXLEN', '~', stream_max, '*',
      'profile', pid, 'kind', k, 'event', ev.raw)
  end
end

if applied > 0 then
  if cart_dirty then
    redis.call('DEL', CART)
    for product, line in pairs(cart) do
      if line.quantity > 0 then redis.call('HSET', CART, product, cjson.encode(line)) end
    end
  end
  redis.call('HSET', P, 'id', pid,
    'first_seen', string.format('%d', first_seen), 'last_seen', string.format('%d', last_seen))
  if user ~= '' then
    redis.call('HSET', P, 'user_id', user)
    redis.call('SADD', IDS, 'user:' .. user)
  end
  if anon ~= '' then redis.call('SADD', IDS, 'anon:' .. anon) end
  if session ~= '' and redis.call('HGET', P, 'last_session_id') ~= session then
    redis.call('HINCRBY', P, 'sessions', 1)
    redis.call('HSET', P, 'last_session_id', session)
  end
  local stage = (tonumber(now) - first_seen < new_for) and 'new' or 'active'
  redis.call('HSET', P, 'lifecycle', stage)
  local kept = redis.call('ZCARD', DD)
  if kept > dedupe_max then redis.call('ZREMRANGEBYRANK', DD, 0, kept - dedupe_max - 1) end
  redis.call('ZREMRANGEBYRANK', VW, 0, -(viewed_max + 1))
end

return { applied, duplicates }
