-- The anonymous side of merging an anonymous profile into a user profile (identity.rs).
-- The user side is apply.lua's 'merged' mode. A merge takes three calls, each atomic and
-- each safe to repeat, so a crash at any point leaves a state the next call resumes from:
--
-- 1. 'seal' (here): the anonymous profile records `merged_into` = the user profile and
--    `merge_state` = 'sealed' in its hash, and its data is returned. From then on, updates
--    for it are redirected (apply.lua returns {'merged', target, state}).
-- 2. apply.lua 'merged' on the user profile: adds the data, records the source in the
--    user profile's `merges` hash (which makes a repeat a no-op), re-evaluates segments.
-- 3. 'finish' (here): the anonymous profile leaves its segments (transitions with reason
--    'merged') and the schedule, and its keys are deleted but for the hash, which keeps
--    `merged_into`, `merge_state` = 'done' and `merged_at`: the redirect.
--
-- KEYS: the anonymous profile's keys in apply.lua's order (1 profile .. 12 merges), 13 the
--       transition stream, 14 the deadline schedule, 15 the anonymous profile's suppression
--       key (privacy.rs), then (finish only) the member set of each segment the profile is
--       in, in the order of ARGV 5...
-- ARGV: 1 'seal' or 'finish', 2 the user profile's id, 3 now (Unix ms), 4 the transition
--       stream's max length, then (finish) the names of the segments whose member sets
--       follow in KEYS.
-- Returns, for 'seal': {'sealed', snapshot} (JSON: {profile, traits, counts, windows, cart,
-- segments: flat [field, value, ...]; viewed, cat_viewed, cat_bought, dedupe: flat [member,
-- score, ...]; ids: [member]}, all strings), {'done'} when the merge into this user
-- finished before, {'conflict', other} when the profile was merged into another user.
-- For 'finish': {'finished', exits} or {'done'}, or {'conflict', other}. Either returns
-- {'erased'} when the anonymous person was erased meanwhile (an erasure that ran between
-- the steps): nothing is read, and no redirect is written back.

local P, TRAITS, COUNTS, IDS, VIEWED, CAT_VIEWED, CAT_BOUGHT, CART, DEDUPE, WINDOWS, SEGMENTS,
  MERGES, TRANSITIONS, DEADLINES, SUPPRESSED = unpack(KEYS, 1, 15)
local op, target, now, transitions_max = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

local function corrupt(key, detail)
  return redis.error_reply('CORRUPT ' .. cjson.encode({ key = key, field = '-', detail = detail }))
end

-- Checks first: Redis does not roll back a script that fails halfway.
local expected = {
  [P] = 'hash', [TRAITS] = 'hash', [COUNTS] = 'hash', [IDS] = 'set', [VIEWED] = 'zset',
  [CAT_VIEWED] = 'zset', [CAT_BOUGHT] = 'zset', [CART] = 'hash', [DEDUPE] = 'zset',
  [WINDOWS] = 'hash', [SEGMENTS] = 'hash', [MERGES] = 'hash', [TRANSITIONS] = 'stream',
  [DEADLINES] = 'zset',
}
for key, want in pairs(expected) do
  local t = redis.call('TYPE', key)['ok']
  if t ~= 'none' and t ~= want then return corrupt(key, 'is a ' .. t .. ', expected a ' .. want) end
end

if redis.call('EXISTS', SUPPRESSED) == 1 then return { 'erased' } end
local into = redis.call('HGET', P, 'merged_into')
if into and into ~= target then return { 'conflict', into } end
if into and redis.call('HGET', P, 'merge_state') == 'done' then return { 'done' } end

if op == 'seal' then
  if not into then redis.call('HSET', P, 'merged_into', target, 'merge_state', 'sealed') end
  local function scored(key) return redis.call('ZRANGE', key, 0, -1, 'WITHSCORES') end
  local profile = redis.call('HGETALL', P)
  return { 'sealed', cjson.encode({
    profile = profile,
    traits = redis.call('HGETALL', TRAITS),
    counts = redis.call('HGETALL', COUNTS),
    ids = redis.call('SMEMBERS', IDS),
    viewed = scored(VIEWED),
    cat_viewed = scored(CAT_VIEWED),
    cat_bought = scored(CAT_BOUGHT),
    cart = redis.call('HGETALL', CART),
    dedupe = scored(DEDUPE),
    windows = redis.call('HGETALL', WINDOWS),
    segments = redis.call('HGETALL', SEGMENTS),
  }) }
elseif op ~= 'finish' then
  return redis.error_reply('ERR merge.lua: unknown operation ' .. tostring(op))
end

if not into then
  return redis.error_reply('ERR merge.lua: finish before seal')
end
local profile_id = string.match(P, '^profile:{(.*)}$')
local exits = 0
for i = 5, #ARGV do
  local segment, members = ARGV[i], KEYS[15 + i - 4]
  local t = redis.call('TYPE', members)['ok']
  if t == 'zset' and redis.call('ZREM', members, profile_id) == 1 then
    exits = exits + 1
    redis.call('XADD', TRANSITIONS, 'MAXLEN', '~', transitions_max, '*', 'profile', profile_id,
      'segment', segment, 'change', 'exit', 'at', now, 'reason', 'merged')
  end
end
redis.call('ZREM', DEADLINES, profile_id)
redis.call('DEL', P, TRAITS, COUNTS, IDS, VIEWED, CAT_VIEWED, CAT_BOUGHT, CART, DEDUPE, WINDOWS,
  SEGMENTS, MERGES)
redis.call('HSET', P, 'merged_into', target, 'merge_state', 'done', 'merged_at', now)
return { 'finished', exits }
