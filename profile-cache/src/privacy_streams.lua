-- One page of a scan of a stream for the entries of some profiles (privacy.rs). The
-- streams have no index by profile, so an export or an erasure reads them whole, a bounded
-- page per call (privacy.rs, `STREAM_PAGE`): each call holds Redis for one page only.
--
-- KEYS: 1 the stream (one key: any Redis Cluster slot).
-- ARGV: 1 where the page starts: '-' for the first page, else '(' followed by the id of the
--       last entry of the page before; 2 where the scan ends: the id of the stream's last
--       entry when the scan began (entries added later are left alone); 3 the most entries
--       to read; 4 'read' or 'delete'; 5... the profile ids whose entries are wanted.
-- Returns {last, read, found}: the id of the page's last entry ('' when the page was
-- empty), how many entries the page read (fewer than ARGV 3: the scan is done), and for
-- 'read' the entries whose `profile` field is one of the ids, as XRANGE returns them, for
-- 'delete' how many of them it deleted (XDEL).

local stream, start, stop, count, mode = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
if mode ~= 'read' and mode ~= 'delete' then
  return redis.error_reply('ERR privacy_streams.lua: unknown mode ' .. tostring(mode))
end
local t = redis.call('TYPE', stream)['ok']
if t == 'none' then return { '', 0, mode == 'read' and {} or 0 } end
if t ~= 'stream' then
  return redis.error_reply('CORRUPT ' .. cjson.encode({ key = stream, field = '-',
    detail = 'is a ' .. t .. ', expected a stream' }))
end

local wanted = {}
for i = 5, #ARGV do wanted[ARGV[i]] = true end
local page = redis.call('XRANGE', stream, start, stop, 'COUNT', count)
local found = {}
for _, entry in ipairs(page) do
  local fields = entry[2]
  for i = 1, #fields, 2 do
    if fields[i] == 'profile' then
      if wanted[fields[i + 1]] then found[#found + 1] = entry end
      break
    end
  end
end
local last = #page > 0 and page[#page][1] or ''
if mode == 'read' then return { last, #page, found } end

-- Commands take a bounded number of unpacked arguments: XDEL in chunks.
for i = 1, #found, 500 do
  local ids = {}
  for j = i, math.min(i + 499, #found) do ids[#ids + 1] = found[j][1] end
  redis.call('XDEL', stream, unpack(ids))
end
return { last, #page, #found }
