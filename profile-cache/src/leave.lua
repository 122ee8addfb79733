-- Takes one profile out of a segment that is no longer configured (rebuild.rs): its entry in
-- the segment's member set and in the profile's segments hash, with an `exit` transition of
-- reason `removed`. Atomic, and it writes nothing when the profile is not a member (any
-- more), so a batch repeated after a crash, or run by two collectors, writes each exit once.
--
-- KEYS: 1 the segment's member set, 2 the transition stream, 3 the profile's segments hash
--       (left out when the member is not a profile id).
-- ARGV: 1 the member, 2 the segment's name, 3 now (Unix ms), 4 the transition stream's
--       max length.
-- Returns 1 when it removed the member, 0 when it was not one.

local MEMBERS, TRANSITIONS, SEGMENTS = KEYS[1], KEYS[2], KEYS[3]
local member, segment, now, transitions_max = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

-- Checks first: Redis does not roll back a script that fails halfway.
local stream = redis.call('TYPE', TRANSITIONS)['ok']
if stream ~= 'none' and stream ~= 'stream' then
  return redis.error_reply('CORRUPT ' .. cjson.encode({ key = TRANSITIONS, field = '-',
    detail = 'is a ' .. stream .. ', expected a stream' }))
end
if not redis.call('ZSCORE', MEMBERS, member) then return 0 end
-- A profile whose segments hash is damaged still leaves the segment: the apply script
-- reports that hash when the profile is next updated.
local hash = SEGMENTS and redis.call('TYPE', SEGMENTS)['ok'] == 'hash'

redis.call('ZREM', MEMBERS, member)
if hash then redis.call('HDEL', SEGMENTS, segment) end
redis.call('XADD', TRANSITIONS, 'MAXLEN', '~', transitions_max, '*', 'profile', member,
  'segment', segment, 'change', 'exit', 'at', now, 'reason', 'removed')
return 1
