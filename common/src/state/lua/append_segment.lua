-- Appends one byte-range segment to an upload of segments, atomically. See
-- StateStore::append_segment.
--
-- KEYS: 1 meta (hash), 2 parts (hash index -> entry), 3 outbox merge triggers (list)
-- ARGV: 1 entry "offset:len:crc32c:md5hex:token", 2 offset, 3 len, 4 now_ms, 5 ttl_ms,
--       6 the merge trigger (stored outbox entry, written when this segment completes an
--       upload that merges when complete)
--
-- Returns one of
--   {"missing"} | {"conflict", "assembly"} | {"conflict", "state", state}
--   {"conflict", "offset", bytes_received} | {"conflict", "past_end", total_size}
--   {"recorded", state, chunks_received, bytes_received, completed (0|1)}
-- A refusal writes nothing.

local meta, parts, merges = KEYS[1], KEYS[2], KEYS[3]
local entry, offset, len = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local now, ttl, job = ARGV[4], ARGV[5], ARGV[6]

local m = redis.call('HMGET', meta, 'state', 'assembly', 'total_size', 'bytes_received',
  'chunks_received')
local state, assembly = m[1], m[2] or ''
if not state then return {'missing'} end
if assembly ~= 'segments' and assembly ~= 'partial' then return {'conflict', 'assembly'} end
if state ~= 'receiving' then return {'conflict', 'state', state} end
local total, received = tonumber(m[3]), tonumber(m[4])
if offset ~= received then return {'conflict', 'offset', m[4]} end
-- A length still open (0, tus Upload-Defer-Length) bounds nothing here; the caller does.
if total > 0 and offset + len > total then return {'conflict', 'past_end', m[3]} end

local index = tonumber(m[5])
redis.call('HSET', parts, index, entry)
local chunks = redis.call('HINCRBY', meta, 'chunks_received', 1)
local bytes = redis.call('HINCRBY', meta, 'bytes_received', len)
local completed = 0
if bytes == total and assembly == 'segments' then
  state = 'merging'
  completed = 1
  redis.call('HSET', meta, 'state', state, 'merging_at', now, 'updated_at', now)
  redis.call('RPUSH', merges, job)
  redis.call('PEXPIRE', merges, ttl)
else
  redis.call('HSET', meta, 'updated_at', now)
end
redis.call('PEXPIRE', meta, ttl)
redis.call('PEXPIRE', parts, ttl)
return {'recorded', state, tostring(chunks), tostring(bytes), completed}
