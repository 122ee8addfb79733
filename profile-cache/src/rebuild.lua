-- The bookkeeping of a segment rebuild (rebuild.rs): its lease, its progress, and the record
-- of the definitions whose memberships are complete. Every step of a rebuild starts with
-- `begin` and saves what it did with `advance` or `forget`; each checks the lease first, so
-- a collector that lost it (it stalled for longer than the lease) changes nothing here.
--
-- KEYS: 1 the lease (a string: the owner's token, with an expiry), 2 the progress (hash:
--       target, cursor, started_at, profiles, changes), 3 the record (hash: segment name ->
--       fingerprint). They share one hash tag, so a call touches one slot.
-- ARGV: 1 the operation, 2 the caller's owner token, 3 the lease (ms), 4 the fingerprint of
--       the caller's definitions: the target of its rebuild; then, by operation:
--   begin   5 '1' to discard the progress of a rebuild for other definitions (a collector's
--           first step), 6 now (ms), then the caller's definitions as name, fingerprint.
--           Returns {'current'} when the record holds exactly those definitions (a lease the
--           caller held is released, with the progress); {'busy'} when another owner holds
--           the lease. Else takes or renews the lease, starts the progress over unless its
--           target is the caller's, and returns {'ok', record, cursor, fresh}: the record as
--           a flat name, fingerprint list, and fresh '1' when the progress started over now.
--   forget  5 a segment name, removed from the record. Returns {'ok'}, or {'lost'} without
--           the lease.
--   advance 5 the walk's next SCAN cursor, 6 profiles evaluated, 7 changes, then the
--           caller's definitions as name, fingerprint: saves the cursor and adds the counts.
--           With cursor '0' (the walk is complete) it records the definitions and removes
--           progress and lease. Returns {'ok' or 'finished', total profiles, total changes};
--           {'lost'} without the lease; {'reset'} when the progress was discarded meanwhile.
--   release deletes the lease if the caller holds it. Returns {'ok'}.

local LEASE, PROGRESS, RECORD = KEYS[1], KEYS[2], KEYS[3]
local op, owner, lease_ms, target = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

local function holds()
  return redis.call('GET', LEASE) == owner
end

if op == 'release' then
  if holds() then redis.call('DEL', LEASE) end
  return { 'ok' }
end

if op == 'begin' then
  local discard, now, first = ARGV[5], ARGV[6], 7
  local progress = redis.call('HGET', PROGRESS, 'target')
  if discard == '1' and progress and progress ~= target then
    -- Collectors with the caller's definitions have been updating profiles that rebuild
    -- already walked: its walk no longer holds (rebuild.rs).
    redis.call('DEL', PROGRESS)
    progress = false
  end
  local record = redis.call('HGETALL', RECORD)
  local same = #record == #ARGV - first + 1
  if same then
    local recorded = {}
    for i = 1, #record, 2 do recorded[record[i]] = record[i + 1] end
    for i = first, #ARGV, 2 do
      if recorded[ARGV[i]] ~= ARGV[i + 1] then
        same = false
        break
      end
    end
  end
  if same then
    if holds() then redis.call('DEL', LEASE, PROGRESS) end
    return { 'current' }
  end
  if holds() then
    redis.call('PEXPIRE', LEASE, lease_ms)
  elseif not redis.call('SET', LEASE, owner, 'NX', 'PX', lease_ms) then
    return { 'busy' }
  end
  local fresh = '0'
  if progress ~= target then
    redis.call('DEL', PROGRESS)
    redis.call('HSET', PROGRESS, 'target', target, 'cursor', '0', 'started_at', now,
      'profiles', '0', 'changes', '0')
    fresh = '1'
  end
  return { 'ok', record, redis.call('HGET', PROGRESS, 'cursor'), fresh }
end

if not holds() then return { 'lost' } end
redis.call('PEXPIRE', LEASE, lease_ms)

if op == 'forget' then
  redis.call('HDEL', RECORD, ARGV[5])
  return { 'ok' }
end

if op == 'advance' then
  if redis.call('HGET', PROGRESS, 'target') ~= target then return { 'reset' } end
  local profiles = redis.call('HINCRBY', PROGRESS, 'profiles', ARGV[6])
  local changes = redis.call('HINCRBY', PROGRESS, 'changes', ARGV[7])
  if ARGV[5] ~= '0' then
    redis.call('HSET', PROGRESS, 'cursor', ARGV[5])
    return { 'ok', profiles, changes }
  end
  redis.call('DEL', RECORD)
  for i = 8, #ARGV, 2 do redis.call('HSET', RECORD, ARGV[i], ARGV[i + 1]) end
  redis.call('DEL', PROGRESS, LEASE)
  return { 'finished', profiles, changes }
end

return redis.error_reply('ERR rebuild.lua: unknown operation ' .. tostring(op))
