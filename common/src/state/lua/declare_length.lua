-- Fixes the length of an upload of segments created without one. See
-- StateStore::declare_length.
--
-- KEYS: 1 meta (hash), 2 outbox merge triggers (list)
-- ARGV: 1 length, 2 now_ms, 3 ttl_ms, 4 the merge trigger (stored outbox entry, written when
--       the bytes received already complete the upload)
--
-- Returns one of
--   {"missing"} | {"conflict", "assembly"} | {"conflict", "state", state}
--   {"conflict", "length", total_size, bytes_received}
--   {"recorded", state, chunks_received, bytes_received, completed (0|1)}
-- A refusal writes nothing.

local meta, merges = KEYS[1], KEYS[2]
local length, now, ttl, job = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
local m = redis.call('HMGET', meta, 'state', 'assembly', 'total_size', 'bytes_received',
  'chunks_received')
local state, assembly = m[1], m[2] or ''
if not state then return {'missing'} end
if assembly ~= 'segments' and assembly ~= 'partial' then return {'conflict', 'assembly'} end
if state ~= 'receiving' then return {'conflict', 'state', state} end
local total, received = tonumber(m[3]), tonumber(m[4])
if total == length then return {'recorded', state, m[5], m[4], 0} end
if total ~= 0 or length < received or length < 1 then
  return {'conflict', 'length', m[3], m[4]}
end
redis.call('HSET', meta, 'total_size', length, 'chunk_size', length, 'total_chunks', 1,
  'updated_at', now)
local completed = 0
if received == length and assembly == 'segments' then
  state = 'merging'
  completed = 1
  redis.call('HSET', meta, 'state', state, 'merging_at', now)
  redis.call('RPUSH', merges, job)
  redis.call('PEXPIRE', merges, ttl)
end
redis.call('PEXPIRE', meta, ttl)
return {'recorded', state, m[5], m[4], completed}
