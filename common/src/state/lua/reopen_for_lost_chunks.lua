-- Puts a merging upload back to receiving because storage lost counted chunks, fenced by the
-- merge attempt that found them. See StateStore::reopen_for_lost_chunks.
--
-- KEYS: 1 meta, 2 fence, 3 parts, 4 bits, 5 outbox merge triggers, 6 outbox events
-- ARGV: 1 fence, 2 the upload.chunks_lost event (stored outbox entry), 3 now_ms, 4 ttl_ms,
--       5.. the lost chunk indices
-- Returns {"missing"} | {"state", state} | {"fenced"}
--       | {"reopened", chunks_received, bytes_received}
-- Anything but "reopened" writes nothing.

local meta, fence, parts, bits = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local merges, events = KEYS[5], KEYS[6]
local now, ttl = ARGV[3], ARGV[4]
local state = redis.call('HGET', meta, 'state')
if not state then return {'missing'} end
if state ~= 'merging' then return {'state', state} end
if redis.call('GET', fence) ~= ARGV[1] then return {'fenced'} end

for i = 5, #ARGV do
  redis.call('HDEL', parts, ARGV[i])
  redis.call('SETBIT', bits, ARGV[i], 0)
end
-- The counters follow the records that are left, whatever they said before.
local chunks, bytes = 0, 0
for _, entry in ipairs(redis.call('HVALS', parts)) do
  chunks = chunks + 1
  bytes = bytes + tonumber(string.match(entry, '^%d+:(%d+):'))
end
-- As integers: a Lua number would be written in exponent form past 14 digits.
chunks, bytes = string.format('%d', chunks), string.format('%d', bytes)
redis.call('HSET', meta, 'state', 'receiving', 'chunks_received', chunks,
  'bytes_received', bytes, 'requeues', '0', 'updated_at', now)
-- merge_fence stays: begin_merge never hands out a token at or below it.
redis.call('HDEL', meta, 'merging_at', 'requeued_at', 'merge_started_at',
  'merge_bytes_done')
-- Pending merge triggers go; pending events stay, and the loss joins them.
redis.call('DEL', merges)
redis.call('RPUSH', events, ARGV[2])
for _, key in ipairs({meta, parts, bits, events, fence}) do
  if redis.call('EXISTS', key) == 1 then redis.call('PEXPIRE', key, ttl) end
end
return {'reopened', chunks, bytes}
