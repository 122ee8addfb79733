-- Reads keys whatever their type, for an export (privacy.rs), as one atomic snapshot.
--
-- KEYS: the keys to read (one profile's, so one Redis Cluster slot).
-- Returns one {type, value} per key, in the order of KEYS: the type as TYPE names it
-- ('none' for a missing key), and the value flat, as the read command returns it: HGETALL
-- (hash), SMEMBERS (set), ZRANGE 0 -1 WITHSCORES (zset), {GET} (string), LRANGE 0 -1 (list),
-- XRANGE - + (stream); {} for a missing key or another type.

local out = {}
for i, key in ipairs(KEYS) do
  local t = redis.call('TYPE', key)['ok']
  local value = {}
  if t == 'hash' then
    value = redis.call('HGETALL', key)
  elseif t == 'set' then
    value = redis.call('SMEMBERS', key)
  elseif t == 'zset' then
    value = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
  elseif t == 'string' then
    value = { redis.call('GET', key) }
  elseif t == 'list' then
    value = redis.call('LRANGE', key, 0, -1)
  elseif t == 'stream' then
    value = redis.call('XRANGE', key, '-', '+')
  end
  out[i] = { t, value }
end
return out
