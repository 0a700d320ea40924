-- Expires an abandoned upload: its record becomes a tombstone that refuses later chunks.
-- See StateStore::expire_upload. Atomic with record_chunk: a chunk recorded before this
-- refreshed updated_at (so the upload is kept); one recorded after finds the tombstone.
--
-- KEYS: 1 meta, 2 parts, 3 bits, 4 outbox merge triggers, 5 outbox events
-- ARGV: 1 idle_before_ms, 2 now_ms, 3 ttl_ms, 4 the upload.expired event (stored outbox entry)
-- Returns {"expired"} | {"kept", state}

local meta = KEYS[1]
local m = redis.call('HMGET', meta, 'state', 'updated_at')
local state, updated = m[1], tonumber(m[2] or '0')
if state == 'merging' or state == 'completed' then return {'kept', state} end
if state and state ~= 'aborted' and updated >= tonumber(ARGV[1]) then
  return {'kept', state}
end
if not state then
  -- Unknown (lost, or never recorded): a tombstone of its own, with no geometry, which no
  -- chunk matches.
  redis.call('HSET', meta, 'version', '1', 'total_size', '0', 'chunk_size', '0',
    'total_chunks', '0', 'file_md5', '', 'filename', '', 'created_at', ARGV[2])
end
redis.call('HSET', meta, 'state', 'aborted', 'updated_at', ARGV[2], 'aborted_at', ARGV[2],
  'expired_at', ARGV[2], 'chunks_received', 0, 'bytes_received', 0)
redis.call('DEL', KEYS[2], KEYS[3])
-- Pending merge triggers go; pending events stay, and the expiry joins them.
redis.call('DEL', KEYS[4])
redis.call('RPUSH', KEYS[5], ARGV[4])
redis.call('PEXPIRE', meta, ARGV[3])
redis.call('PEXPIRE', KEYS[5], ARGV[3])
return {'expired'}
