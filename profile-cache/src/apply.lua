-- Applies the events of one batch to one profile, atomically and idempotently, and
-- re-evaluates the profile's segments in the same call. Called without events and with a
-- claim (ARGV 12), it only re-evaluates the segments: the scheduler's call for a profile
-- whose deadline has come (schedule.rs), or a rebuild's call after the segment definitions
-- changed (rebuild.rs). Called with mode 'merged' (ARGV 13), it folds the history of an
-- anonymous profile, as merge.lua read it, into this (user) profile (identity.rs).
--
-- KEYS: 1 profile, 2 traits, 3 counts, 4 ids, 5 viewed, 6 cat_viewed, 7 cat_bought, 8 cart,
--       9 dedupe, 10 windows, 11 segments, 12 merges, 13 the event stream, 14 the transition
--       stream, 15 the deadline schedule, 16 the profile's suppression key, 17 the suppression
--       key of the update's anonymous profile (16 again when there is none), then the member
--       set of each segment of `plan`, in its order (names: keys.rs).
-- ARGV: 1 now (Unix ms), 2 dedupe window (ms), 3 dedupe max ids, 4 recently viewed max,
--       5 event stream max length, 6 lifecycle new_for (ms), 7 transition stream max length,
--       8 profile id, 9 anonymous id, 10 user id, 11 session id ('' when unknown), 12 the
--       claim: '' for an update, else the score the caller's claim gave the profile in the
--       schedule; 13 why an evaluation runs, the `reason` of its transitions: 'deadline'
--       (the scheduler) or 'redefined' (a rebuild), 'merged' for a merge, '' for an update;
--       14 the most anonymous ids a user profile takes in (merges included); then for an
--       update one JSON object per event, in the client's order (script.rs, `ScriptEvent`):
--       id (32 hex), kind, count (counts field), ts and received (Unix ms), items
--       [{product, category?, price, quantity}], traits [[name, text]], revenue, currency,
--       granted / denied [purpose], and event (the stream entry, stored as is); for a merge
--       15 the anonymous profile's id and 16 its data (merge.lua's snapshot, JSON).
-- Returns {applied, duplicates, merge} for an update, where merge is the id of the
-- anonymous profile of the update's anonymous id when it still has to be merged into this
-- user profile ('a:<id>'), 'limit' when this profile already has as many anonymous ids as
-- it may take, else ''. An update or a merge for a profile that was merged into another
-- returns {'merged', target, state} and writes nothing: the caller applies it to the target
-- (after finishing the merge when state is 'sealed'). A merge returns {'folded', changes},
-- or {'already', 0} when this source was merged (or refused) before. An evaluation returns
-- {'evaluated', changes}, or {'superseded', 0} when the profile's schedule entry is no
-- longer the caller's claim (an update, a scheduler or a rebuild has re-evaluated it since:
-- nothing is written), or {'gone', 0} when the profile no longer exists or was merged into
-- another (it leaves the schedule).
--
-- Erased people (privacy.rs): while key 16 exists, the profile's person was erased and
-- nothing is written for it again: an update returns {0, 0, ''} (no event applied, none a
-- duplicate: the caller tells from the shortfall that it was suppressed), an evaluation
-- removes the profile from the schedule and returns {'gone', 0}, and a merge into it returns
-- {'erased', 0}.
-- While key 17 exists, the update's anonymous id was erased: a user profile's update is
-- applied but does not take that id in (no link, no merge), so the erased anonymous
-- profile is not recreated. Key 16 is in the profile's slot; key 17 is in the anonymous
-- profile's, like the global keys above one more key a Redis Cluster setup must route.
--
-- The configured segments are part of the script's text: script.rs (`ScriptSegments`)
-- writes them into the `local plan` line below as a Lua table when the store is built, so
-- no call sends or decodes them: {segments = {{name, condition}}, windows = {{event,
-- category?, tail}}, retention (hours), counts = {name}, traits = {name}, cart (bool)},
-- where a condition is the compiled form of segments.rs. Without segments it stays nil.
--
-- Redis does not roll back a script that fails halfway, so the script works in three
-- phases: read and check everything it will use or write (key types, stored numbers, cart
-- lines, window buckets, memberships); compute the new profile and its segment memberships
-- in Lua; then write. Bad data gets the error reply CORRUPT {"key":..,"field":..,"detail":..}
-- and no change. Numbers from cjson are doubles: exact for integers up to 2^53, which
-- script.rs and segments.rs ensure.

local P, TRAITS, COUNTS, IDS, VIEWED, CAT_VIEWED, CAT_BOUGHT, CART, DEDUPE, WINDOWS, SEGMENTS,
  MERGES, STREAM, TRANSITIONS, DEADLINES, SUPPRESSED, ANON_SUPPRESSED = unpack(KEYS, 1, 17)
local FIRST_MEMBERS = 18 -- KEYS index of the first segment's member set
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local dedupe_max = tonumber(ARGV[3])
local viewed_max = tonumber(ARGV[4])
local stream_max = ARGV[5]
local new_for = tonumber(ARGV[6])
local transitions_max = ARGV[7]
local profile_id, anonymous_id, user_id, session_id = ARGV[8], ARGV[9], ARGV[10], ARGV[11]
local claim = ARGV[12]
local max_anonymous_ids = tonumber(ARGV[14])
local plan = nil
-- The traits that need marketing consent (`profiles.marketing_traits`): script.rs writes them
-- into this line as a set.
local MARKETING_TRAITS = {}
-- The most entries the profile's consent history keeps (`consent_log`), oldest dropped.
local CONSENT_LOG_MAX = 50
local FIRST_EVENT = 15
-- Why the memberships change: the events of an update; for an evaluation, time alone
-- ('deadline') or new segment definitions ('redefined'); or a merge ('merged').
local reason = ARGV[13] == '' and 'event' or ARGV[13]
local evaluation = reason == 'deadline' or reason == 'redefined'
local folding = reason == 'merged'
if reason ~= 'event' and not evaluation and not folding then
  return redis.error_reply('ERR apply.lua: unknown evaluation reason ' .. tostring(reason))
end

local HOUR = 3600000            -- the width of a window bucket, ms
local LAST_TIME = 253402300799999 -- 9999-12-31T23:59:59.999Z: later deadlines are none

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
local function hdel(key, fields)
  for i = 1, #fields, CHUNK do
    redis.call('HDEL', key, unpack(fields, i, math.min(i + CHUNK - 1, #fields)))
  end
end

---------------------------------------------------------------- read and check, no writes

local expected = {
  [P] = 'hash', [TRAITS] = 'hash', [COUNTS] = 'hash', [IDS] = 'set', [VIEWED] = 'zset',
  [CAT_VIEWED] = 'zset', [CAT_BOUGHT] = 'zset', [CART] = 'hash', [DEDUPE] = 'zset',
  [MERGES] = 'hash', [STREAM] = 'stream',
}
if plan then
  expected[WINDOWS], expected[SEGMENTS] = 'hash', 'hash'
  expected[TRANSITIONS] = 'stream'
end
if plan or evaluation then expected[DEADLINES] = 'zset' end
local function wrong_type(key, want)
  local t = redis.call('TYPE', key)['ok']
  if t ~= 'none' and t ~= want then
    return corrupt(key, '-', 'is a ' .. t .. ', expected a ' .. want)
  end
end
for i = 1, FIRST_MEMBERS - 1 do
  local want = expected[KEYS[i]]
  local err = want and wrong_type(KEYS[i], want)
  if err then return err end
end

-- An evaluation goes ahead only while the caller's claim holds: the schedule entry still
-- has the score the claim gave it. Any update of the profile since the claim has evaluated
-- it at its own time and written the real next deadline over the claim (or removed the
-- entry); another scheduler or rebuild that claimed it since wrote its own score. Either
-- way this call is stale: evaluating at its `now`, possibly earlier than the update's,
-- could undo a change the update made, so it writes nothing. schedule.rs explains the race.
-- A profile merged into another keeps only `merged_into` (and `merge_state`) in its hash:
-- whatever arrives for it belongs to the target (identity.rs).
local merged_into = redis.call('HGET', P, 'merged_into')
local erased = redis.call('EXISTS', SUPPRESSED) == 1
if evaluation then
  local score = redis.call('ZSCORE', DEADLINES, profile_id)
  if not score or tonumber(score) ~= tonumber(claim) then return { 'superseded', 0 } end
  if erased or merged_into or redis.call('EXISTS', P) == 0 then
    redis.call('ZREM', DEADLINES, profile_id)
    return { 'gone', 0 }
  end
  if not plan then
    -- No segments configured any more: nothing changes by time.
    redis.call('ZREM', DEADLINES, profile_id)
    return { 'evaluated', 0 }
  end
end
if erased then
  if folding then
    return { 'erased', 0 }
  end
  return { 0, 0, '' }
end

local PURPOSES = { 'necessary', 'analytics', 'personalization', 'marketing' }
local numeric = { 'first_seen', 'last_seen', 'events', 'page_views', 'sessions', 'orders',
  'revenue', 'email_opens', 'email_clicks', 'last_order_at', 'last_engaged_at',
  'cart_updated_at' }
for _, purpose in ipairs(PURPOSES) do numeric[#numeric + 1] = 'consent:' .. purpose .. ':at' end
local fields = { unpack(numeric) }
fields[#fields + 1] = 'last_session_id'
for _, purpose in ipairs(PURPOSES) do fields[#fields + 1] = 'consent:' .. purpose end
fields[#fields + 1] = 'consent_log'
local stored = redis.call('HMGET', P, unpack(fields))
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
local last_session_id = stored[#numeric + 1]
local answered = {} -- purpose -> stored status (false: none)
for i, purpose in ipairs(PURPOSES) do answered[purpose] = stored[#numeric + 1 + i] end
-- The consent history: a JSON array of {purpose, status, at, source?}, oldest first.
local function consent_log(raw, key)
  if not raw then return {} end
  local ok, log = pcall(cjson.decode, raw)
  if not ok or type(log) ~= 'table' then
    return nil, corrupt(key, 'consent_log', 'is not a JSON array of consent answers')
  end
  for _, entry in ipairs(log) do
    if type(entry) ~= 'table' or type(entry.at) ~= 'number' then
      return nil, corrupt(key, 'consent_log', 'is not a JSON array of consent answers')
    end
  end
  return log
end
local log_before, log_err = consent_log(stored[#numeric + 2 + #PURPOSES], P)
if log_err then return log_err end

local events, names, seen_names, cart_products = {}, {}, {}, {}
local function read_count(n)
  if not seen_names[n] then
    seen_names[n] = true
    names[#names + 1] = n
  end
end
for i = FIRST_EVENT, folding and 0 or #ARGV do
  local ok, e = pcall(cjson.decode, ARGV[i])
  if not ok or type(e) ~= 'table' then
    return redis.error_reply('ERR apply.lua: event ' .. (i - FIRST_EVENT + 1) .. ' is not a JSON object')
  end
  events[#events + 1] = e
  read_count(e.count)
  if e.kind == 'cart_add' or e.kind == 'cart_remove' then
    for _, it in ipairs(e.items or {}) do cart_products[#cart_products + 1] = it.product end
  end
end

-- A merge: the anonymous profile's keys as merge.lua read them, flat {field, value, ...}
-- lists of strings. Checked like stored data, named by the source's keys.
local source, src = nil, nil
if merged_into then return { 'merged', merged_into, redis.call('HGET', P, 'merge_state') or '' } end
if folding then
  source = ARGV[FIRST_EVENT]
  if redis.call('HEXISTS', MERGES, source) == 1 then return { 'already', 0 } end
  local ok, s = pcall(cjson.decode, ARGV[FIRST_EVENT + 1] or '')
  if not ok or type(s) ~= 'table' then
    return redis.error_reply('ERR apply.lua: the merge snapshot is not a JSON object')
  end
  src = {}
  local source_key = 'profile:{' .. source .. '}'
  for _, part in ipairs({ 'profile', 'traits', 'counts', 'ids', 'viewed', 'cat_viewed',
    'cat_bought', 'cart', 'dedupe', 'windows' }) do
    local list, key = s[part], source_key .. (part == 'profile' and '' or ':' .. part)
    if type(list) ~= 'table' then list = {} end
    local out, step = {}, part == 'ids' and 1 or 2
    for i = 1, #list, step do
      local k, v = list[i], list[i + 1]
      if type(k) ~= 'string' or (step == 2 and type(v) ~= 'string') then
        return corrupt(key, tostring(k), 'is not a string field')
      end
      local number = part == 'counts' or part == 'windows' or part == 'viewed'
        or part == 'cat_viewed' or part == 'cat_bought' or part == 'dedupe'
      if number and not string.match(v, '^%d+$') then
        return corrupt(key, k, string.format('%q is not a count or time', v))
      end
      out[#out + 1] = { k, number and tonumber(v) or v }
    end
    src[part] = out
  end
  src.fields = {}
  for _, kv in ipairs(src.profile) do src.fields[kv[1]] = kv[2] end
  for _, field in ipairs(numeric) do
    local v = src.fields[field]
    if v and not string.match(v, '^%-?%d+$') then
      return corrupt(source_key, field, string.format('%q is not an integer', v))
    end
    src.fields[field] = v and tonumber(v)
  end
  for _, kv in ipairs(src.counts) do read_count(kv[1]) end
  for _, kv in ipairs(src.cart) do cart_products[#cart_products + 1] = kv[1] end
end
if plan then
  for _, n in ipairs(plan.counts) do read_count(n) end
end

-- An update of a user profile that carries an anonymous id: the anonymous profile is to be
-- merged in unless it was already (merged, refused because another user took it, or over
-- the limit: `merges` says which). The id joins this profile's ids only when the merge may
-- happen; the caller runs the merge (identity.rs), and is told again by every update until
-- the merge has been recorded as finished (`folded` means its last step is still to run),
-- so a crash at any point delays it and loses nothing.
local merge, take_anon = '', anonymous_id ~= '' and redis.call('EXISTS', ANON_SUPPRESSED) == 0
if reason == 'event' and take_anon and string.sub(profile_id, 1, 2) == 'u:' then
  local from = 'a:' .. anonymous_id
  local done = redis.call('HGET', MERGES, from)
  if done == 'folded' then
    merge = from
  elseif done then
    take_anon = string.match(done, '^%d+$') ~= nil
  else
    merge = from
    if redis.call('SISMEMBER', IDS, 'anon:' .. anonymous_id) == 0 then
      local n = 0
      for _, m in ipairs(redis.call('SMEMBERS', IDS)) do
        if string.sub(m, 1, 5) == 'anon:' then n = n + 1 end
      end
      if n >= max_anonymous_ids then merge, take_anon = 'limit', false end
    end
  end
end

local counted = {} -- counts field -> stored count
local counts_now = hmget(COUNTS, names)
for i, n in ipairs(names) do
  local v = counts_now[i]
  if v then
    if not string.match(v, '^%d+$') then
      return corrupt(COUNTS, n, string.format('%q is not a count', v))
    end
    counted[n] = tonumber(v)
  end
end

-- Only the lines this call changes are read; profile reads report any other bad line.
local cart, had_line = {}, {}
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
    had_line[product] = true
  end
end

-- A merge keeps this profile's traits and adds those it lacks.
local trait_stored = {}
if folding and #src.traits > 0 then
  local names = {}
  for i, kv in ipairs(src.traits) do names[i] = kv[1] end
  local v = hmget(TRAITS, names)
  for i, n in ipairs(names) do trait_stored[n] = v[i] end
end

-- What the segments read beyond the profile hash and counts.
local trait_now = {}      -- trait -> stored text (false: unset)
local cart_len = 0        -- stored cart lines
local wins = {}           -- event -> category (false: any) -> window {tail, buckets, added}
local stale = {}          -- bucket fields that count in no window any more
local cutoff              -- the latest hour whose bucket counts in no window
local by_tail = {}        -- window field tail -> window
local entered = {}        -- segment -> stored entered-at
if plan then
  if #plan.traits > 0 then
    local v = hmget(TRAITS, plan.traits)
    for i, t in ipairs(plan.traits) do trait_now[t] = v[i] end
  end
  if plan.cart then cart_len = redis.call('HLEN', CART) end
  -- Bucket h counts in a window of k hours until (h + k) hours, so once the longest window
  -- has passed it counts nowhere (segments.rs, "Windowed event counts").
  cutoff = math.floor(now / HOUR) - plan.retention
  if #plan.windows > 0 then
    for _, w in ipairs(plan.windows) do
      w.buckets, w.added = {}, {} -- hour -> events; of which applied now
      by_tail[w.tail] = w
      wins[w.event] = wins[w.event] or {}
      wins[w.event][w.category or false] = w
    end
    local raw = redis.call('HGETALL', WINDOWS)
    for i = 1, #raw, 2 do
      local field, n = raw[i], raw[i + 1]
      local hour, tail = string.match(field, '^%[(%-?%d+)(,.+)$')
      if not hour then
        return corrupt(WINDOWS, field, 'is not a bucket [hour,"event","category"]')
      end
      if not string.match(n, '^%d+$') then
        return corrupt(WINDOWS, field, string.format('%q is not a count', n))
      end
      hour = tonumber(hour)
      if hour <= cutoff then
        stale[#stale + 1] = field
      elseif by_tail[tail] then
        by_tail[tail].buckets[hour] = tonumber(n)
      end
    end
  end
  local raw = redis.call('HGETALL', SEGMENTS)
  for i = 1, #raw, 2 do
    if not string.match(raw[i + 1], '^%-?%d+$') then
      return corrupt(SEGMENTS, raw[i], string.format('%q is not a time', raw[i + 1]))
    end
    entered[raw[i]] = tonumber(raw[i + 1])
  end
end

---------------------------------------------------------------- compute, no writes

-- Message ids received before the window are forgotten (the write phase removes them).
local oldest_kept = now - window
local applied, duplicates = 0, 0
local fresh, in_batch = {}, {}       -- the events applied now, in order; their ids
local first_seen, last_seen = cur.first_seen, cur.last_seen
local incr, latest = {}, {}           -- profile hash: counters; times that keep the latest
local counts, cat_viewed, cat_bought, viewed, traits = {}, {}, {}, {}, {}
local consent, currency = {}, nil
local consent_source, log_added = {}, {}
local cart_cleared, cart_changed = false, {}

local function add(t, k, n) t[k] = (t[k] or 0) + n end
local function newer(field, ts)
  local prev = latest[field] or cur[field]
  return not prev or ts >= prev
end
local function touch(field, ts)
  if newer(field, ts) then latest[field] = ts end
end
-- A consent answer: kept when it is the latest for its purpose, logged either way.
local function answer(purpose, status, ts, source, logged)
  local field = 'consent:' .. purpose .. ':at'
  if newer(field, ts) then
    latest[field] = ts
    consent[purpose] = status
    consent_source[purpose] = source or false
  end
  if logged then
    log_added[#log_added + 1] = { purpose = purpose, status = status, at = ts, source = source }
  end
end
-- An event counts once in its name's window and once in each distinct category of its items.
local function bump(w, hour)
  w.buckets[hour] = (w.buckets[hour] or 0) + 1
  w.added[hour] = (w.added[hour] or 0) + 1
end
local function count_in_windows(e)
  local by_category = wins[e.count]
  if not by_category then return end
  local hour = math.floor(e.ts / HOUR)
  if hour <= cutoff then return end
  if by_category[false] then bump(by_category[false], hour) end
  local items = e.items or {}
  for i = 1, #items do
    local c = items[i].category
    local w = c and by_category[c]
    if w then
      local first = true
      for j = 1, i - 1 do
        if items[j].category == c then first = false end
      end
      if first then bump(w, hour) end
    end
  end
end

for _, e in ipairs(events) do
  local score = redis.call('ZSCORE', DEDUPE, e.id)
  if in_batch[e.id] or (score and tonumber(score) >= oldest_kept) then
    duplicates = duplicates + 1
  else
    applied = applied + 1
    fresh[#fresh + 1] = e
    in_batch[e.id] = true
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
      for _, purpose in ipairs(e.granted or {}) do answer(purpose, 'granted', ts, e.source, true) end
      for _, purpose in ipairs(e.denied or {}) do answer(purpose, 'denied', ts, e.source, true) end
    end
    if plan then count_in_windows(e) end
  end
end

-- A merge: the anonymous profile's history added to this one. Counters, event counts,
-- category scores and window buckets add up; first and last seen widen; times, the
-- currency of the last order and each consent answer keep the latest; recently viewed
-- products keep their latest view; traits, the session and cart lines of this profile win
-- over the anonymous one's, except a cart line with a larger quantity there.
local adopted_session = nil
if folding then
  local f = src.fields
  for _, field in ipairs({ 'events', 'page_views', 'sessions', 'orders', 'revenue',
    'email_opens', 'email_clicks' }) do
    if f[field] and f[field] ~= 0 then add(incr, field, f[field]) end
  end
  if f.first_seen and (not first_seen or f.first_seen < first_seen) then first_seen = f.first_seen end
  if f.last_seen and (not last_seen or f.last_seen > last_seen) then last_seen = f.last_seen end
  if f.last_order_at then
    if f.currency and newer('last_order_at', f.last_order_at) then currency = f.currency end
    touch('last_order_at', f.last_order_at)
  end
  for _, field in ipairs({ 'last_engaged_at', 'cart_updated_at' }) do
    if f[field] then touch(field, f[field]) end
  end
  for _, purpose in ipairs(PURPOSES) do
    local status, at = f['consent:' .. purpose], f['consent:' .. purpose .. ':at']
    if (status == 'granted' or status == 'denied') and at then
      answer(purpose, status, at, f['consent:' .. purpose .. ':source'], false)
    end
  end
  if not last_session_id and f.last_session_id then adopted_session = f.last_session_id end
  for _, kv in ipairs(src.counts) do add(counts, kv[1], kv[2]) end
  for _, kv in ipairs(src.traits) do
    if not trait_stored[kv[1]] then traits[kv[1]] = kv[2] end
  end
  for _, kv in ipairs(src.viewed) do
    if not viewed[kv[1]] or kv[2] > viewed[kv[1]] then viewed[kv[1]] = kv[2] end
  end
  for _, kv in ipairs(src.cat_viewed) do add(cat_viewed, kv[1], kv[2]) end
  for _, kv in ipairs(src.cat_bought) do add(cat_bought, kv[1], kv[2]) end
  for _, kv in ipairs(src.cart) do
    local ok, line = pcall(cjson.decode, kv[2])
    if not ok or type(line) ~= 'table' or type(line.quantity) ~= 'number'
      or type(line.price) ~= 'number' then
      return corrupt('profile:{' .. source .. '}:cart', kv[1],
        'is not a cart line {"quantity":n,"price":p,"category":c}')
    end
    if type(line.category) ~= 'string' then line.category = nil end
    local mine = cart[kv[1]]
    if not mine or line.quantity > mine.quantity then
      cart[kv[1]] = line
      cart_changed[kv[1]] = true
    end
  end
  if plan then
    for _, kv in ipairs(src.windows) do
      local hour, tail = string.match(kv[1], '^%[(%-?%d+)(,.+)$')
      hour = tonumber(hour)
      local w = hour and by_tail[tail]
      if w and hour > cutoff then
        w.buckets[hour] = (w.buckets[hour] or 0) + kv[2]
        w.added[hour] = (w.added[hour] or 0) + kv[2]
      end
    end
  end
  first_seen, last_seen = first_seen or now, last_seen or now
  local log, err = consent_log(f.consent_log, 'profile:{' .. source .. '}')
  if err then return err end
  for _, entry in ipairs(log) do log_added[#log_added + 1] = entry end
end

-- Consent withdrawn: what needs the purpose goes, now and while it stays denied. Without
-- personalization, the profile keeps no recently viewed products and no category
-- affinities; without marketing, no contact traits (`MARKETING_TRAITS`). The segments that
-- need the purpose (`consent_granted`) are left below, in this same call.
local function denied(purpose) return (consent[purpose] or answered[purpose]) == 'denied' end
local withdrawn = {}
for _, purpose in ipairs({ 'personalization', 'marketing' }) do
  if denied(purpose) then withdrawn[purpose] = answered[purpose] ~= 'denied' and 'now' or 'before' end
end
if withdrawn.personalization then viewed, cat_viewed, cat_bought = {}, {}, {} end
if withdrawn.marketing then
  for t in pairs(MARKETING_TRAITS) do
    traits[t] = nil
    trait_now[t] = nil
  end
end

if reason == 'event' and applied == 0 then
  redis.call('ZREMRANGEBYSCORE', DEDUPE, '-inf', '(' .. int(oldest_kept))
  return { 0, duplicates, merge }
end
local new_session = session_id ~= '' and last_session_id ~= session_id

-- Segments: each one's membership at `now` in the profile as it will be written, and the
-- profile's next deadline. The deadline is a safe bound, not always the exact one of
-- segments.rs: a leaf test gets its exact next change, and a tree combines its children's
-- ("Deadlines" in segments.rs), so the deadline may come early, never late.
local moves, deadline = {}, nil
if plan then
  local times = {
    first_seen = first_seen,
    last_seen = last_seen,
    last_order_at = latest.last_order_at or cur.last_order_at,
    last_engaged_at = latest.last_engaged_at or cur.last_engaged_at,
    cart_updated_at = latest.cart_updated_at or cur.cart_updated_at,
  }
  local function metric(field)
    if field == 'sessions' then
      return (cur.sessions or 0) + (incr.sessions or 0) + (new_session and 1 or 0)
    end
    return (cur[field] or 0) + (incr[field] or 0)
  end
  local function trait(t)
    if traits[t] then return traits[t] end
    if withdrawn.marketing and MARKETING_TRAITS[t] then return nil end
    return trait_now[t]
  end
  local lines_after = cart_cleared and 0 or cart_len
  for product in pairs(cart_changed) do
    local was, is = had_line[product] and not cart_cleared, cart[product].quantity > 0
    if was and not is then lines_after = lines_after - 1 end
    if is and not was then lines_after = lines_after + 1 end
  end
  local function in_range(n, node)
    return (node.min == nil or n >= node.min) and (node.max == nil or n <= node.max)
  end
  local function earliest(a, b)
    if a == nil or (b ~= nil and b < a) then return b end
    return a
  end
  local hours = {} -- window -> its bucket hours, ascending
  local function hours_of(w)
    if not hours[w] then
      local hs = {}
      for h in pairs(w.buckets) do hs[#hs + 1] = h end
      table.sort(hs)
      hours[w] = hs
    end
    return hours[w]
  end

  -- Whether the condition holds at `now`, and a time after `now` before which it cannot
  -- change by time alone (nil: it never does).
  local judge
  judge = function(node)
    local op = node.op
    if op == 'all' or op == 'any' then
      -- A child that holds decides `any` alone, one that fails decides `all`. When some
      -- child decides, the result lasts until every deciding child has changed: at least
      -- until the latest of their bounds. Otherwise it lasts until any child changes.
      local deciding = op == 'any'
      local decided, lasts, forever, changes = false, nil, false, nil
      for _, child in ipairs(node.of) do
        local v, b = judge(child)
        if v == deciding then
          decided = true
          if b == nil then forever = true elseif lasts == nil or b > lasts then lasts = b end
        else
          changes = earliest(changes, b)
        end
      end
      if decided then
        if forever then return deciding, nil end
        return deciding, lasts
      end
      return not deciding, changes
    elseif op == 'not' then
      local v, b = judge(node.of)
      return not v, b
    elseif op == 'metric' then
      return in_range(metric(node.field), node), nil
    elseif op == 'count' then
      return in_range((counted[node.event] or 0) + (counts[node.event] or 0), node), nil
    elseif op == 'window_count' then
      -- Bucket h leaves a window of k hours at (h + k) hours: the count only falls, so its
      -- next change is exact.
      local w = wins[node.event][node.category or false]
      local hs, k, sum = hours_of(w), node.hours, 0
      for _, h in ipairs(hs) do
        if (h + k) * HOUR > now then sum = sum + w.buckets[h] end
      end
      local holds = in_range(sum, node)
      for _, h in ipairs(hs) do
        local leaves = (h + k) * HOUR
        if leaves > now then
          sum = sum - w.buckets[h]
          if in_range(sum, node) ~= holds then return holds, leaves end
        end
      end
      return holds, nil
    elseif op == 'trait_in' then
      local v = trait(node.name)
      for _, value in ipairs(node.values) do
        if v == value then return true, nil end
      end
      return false, nil
    elseif op == 'trait_exists' then
      return trait(node.name) and true or false, nil
    elseif op == 'within' or op == 'older_than' then
      local t = times[node.field]
      if not t then return false, nil end
      local at = t + node.ms
      local before = now < at -- within holds before `at`, older_than from `at` on
      if op == 'within' then return before, before and at or nil end
      return not before, before and at or nil
    elseif op == 'cart_not_empty' then
      return lines_after > 0, nil
    elseif op == 'no_order_since' then
      local since, order = times[node.field], times.last_order_at
      return since ~= nil and (order == nil or order < since), nil
    elseif op == 'consent_granted' then
      local status = consent[node.purpose] or answered[node.purpose]
      return node.purpose == 'necessary' or status == 'granted', nil
    end
    error('apply.lua: unknown segment condition ' .. tostring(op))
  end

  for i, s in ipairs(plan.segments) do
    local member, bound = judge(s.condition)
    deadline = earliest(deadline, bound)
    if member ~= (entered[s.name] ~= nil) then
      local key = KEYS[FIRST_MEMBERS + i - 1]
      local err = wrong_type(key, 'zset')
      if err then return err end
      moves[#moves + 1] = { segment = s.name, members = key, enter = member }
    end
  end
  if deadline and deadline > LAST_TIME then deadline = nil end
end

---------------------------------------------------------------- write

-- Segments first, since an evaluation writes nothing else.
if plan then
  for _, w in ipairs(plan.windows) do
    for hour, n in pairs(w.added) do
      redis.call('HINCRBY', WINDOWS, '[' .. int(hour) .. w.tail, int(n))
    end
  end
  hdel(WINDOWS, stale)
  for _, m in ipairs(moves) do
    if m.enter then
      redis.call('HSET', SEGMENTS, m.segment, int(now))
      redis.call('ZADD', m.members, int(now), profile_id)
    else
      redis.call('HDEL', SEGMENTS, m.segment)
      redis.call('ZREM', m.members, profile_id)
    end
    redis.call('XADD', TRANSITIONS, 'MAXLEN', '~', transitions_max, '*', 'profile', profile_id,
      'segment', m.segment, 'change', m.enter and 'enter' or 'exit', 'at', int(now),
      'reason', reason)
  end
  if deadline then
    redis.call('ZADD', DEADLINES, int(deadline), profile_id)
  else
    redis.call('ZREM', DEADLINES, profile_id)
  end
end
if evaluation then return { 'evaluated', #moves } end

-- The update's events.
redis.call('ZREMRANGEBYSCORE', DEDUPE, '-inf', '(' .. int(oldest_kept))
for _, e in ipairs(fresh) do
  redis.call('ZADD', DEDUPE, int(e.received), e.id)
  redis.call('XADD', STREAM, 'MAXLEN', '~', stream_max, '*',
    'profile', profile_id, 'kind', e.kind, 'event', e.event)
end
if folding then
  -- The anonymous profile's message ids: a retry of one of its batches, which now lands
  -- here, is still a duplicate.
  for _, kv in ipairs(src.dedupe) do
    if kv[2] >= oldest_kept then redis.call('ZADD', DEDUPE, 'GT', int(kv[2]), kv[1]) end
  end
  for _, kv in ipairs(src.ids) do redis.call('SADD', IDS, kv[1]) end
  -- Its last step (merge.lua 'finish') still has to run: identity.rs records the time then.
  redis.call('HSET', MERGES, source, 'folded')
end

for field, n in pairs(incr) do redis.call('HINCRBY', P, field, int(n)) end
for n, k in pairs(counts) do redis.call('HINCRBY', COUNTS, n, int(k)) end
for category, n in pairs(cat_viewed) do redis.call('ZINCRBY', CAT_VIEWED, int(n), category) end
for category, n in pairs(cat_bought) do redis.call('ZINCRBY', CAT_BOUGHT, int(n), category) end
for t, text in pairs(traits) do redis.call('HSET', TRAITS, t, text) end
if withdrawn.personalization == 'now' then redis.call('DEL', VIEWED, CAT_VIEWED, CAT_BOUGHT) end
if withdrawn.marketing == 'now' then
  for t in pairs(MARKETING_TRAITS) do redis.call('HDEL', TRAITS, t) end
end

local set = { 'id', profile_id, 'first_seen', int(first_seen), 'last_seen', int(last_seen),
  'lifecycle', (now - first_seen < new_for) and 'new' or 'active' }
local function put(field, value)
  set[#set + 1] = field
  set[#set + 1] = value
end
for field, ts in pairs(latest) do put(field, int(ts)) end
for purpose, status in pairs(consent) do
  put('consent:' .. purpose, status)
  if consent_source[purpose] then
    put('consent:' .. purpose .. ':source', consent_source[purpose])
  else
    redis.call('HDEL', P, 'consent:' .. purpose .. ':source')
  end
end
if #log_added > 0 then
  local log = log_before
  for _, entry in ipairs(log_added) do log[#log + 1] = entry end
  table.sort(log, function(a, b)
    if a.at ~= b.at then return a.at < b.at end
    if a.purpose ~= b.purpose then return tostring(a.purpose) < tostring(b.purpose) end
    return tostring(a.status) < tostring(b.status)
  end)
  while #log > CONSENT_LOG_MAX do table.remove(log, 1) end
  -- Written by hand so the fields keep their order and times print as integers.
  local parts = {}
  for i, e in ipairs(log) do
    parts[i] = '{"purpose":' .. cjson.encode(e.purpose) .. ',"status":' .. cjson.encode(e.status)
      .. ',"at":' .. int(e.at) .. (e.source and (',"source":' .. cjson.encode(e.source)) or '') .. '}'
  end
  put('consent_log', '[' .. table.concat(parts, ',') .. ']')
end
if currency then put('currency', currency) end
if user_id ~= '' then put('user_id', user_id) end
if new_session then
  redis.call('HINCRBY', P, 'sessions', 1)
  put('last_session_id', session_id)
end
if adopted_session then put('last_session_id', adopted_session) end
redis.call('HSET', P, unpack(set))

if user_id ~= '' then redis.call('SADD', IDS, 'user:' .. user_id) end
if take_anon then redis.call('SADD', IDS, 'anon:' .. anonymous_id) end
if merge == 'limit' then redis.call('HSET', MERGES, 'a:' .. anonymous_id, 'limit') end

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

if folding then return { 'folded', #moves } end
return { applied, duplicates, merge }
