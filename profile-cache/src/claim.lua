-- Claims the due profiles of the deadline schedule for one scheduler, with a lease: their
-- scores move to the end of the lease, so no other scheduler sees them due until it ends
-- (schedule.rs).
--
-- KEYS: 1 the deadline schedule.
-- ARGV: 1 now (Unix ms), 2 the claim's score (now + lease), 3 the most profiles to claim.
-- Returns {earliest, claimed}: the earliest score in the schedule after the claim ('' when
-- it is empty), and the claimed profile ids, earliest deadline first.

local SCHEDULE = KEYS[1]
local due = redis.call('ZRANGEBYSCORE', SCHEDULE, '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(due) do
  redis.call('ZADD', SCHEDULE, 'XX', ARGV[2], id)
end
local first = redis.call('ZRANGE', SCHEDULE, 0, 0, 'WITHSCORES')
return { first[2] or '', due }
