-- Creates an upload, or confirms an identical one. See StateStore::create_upload.
--
-- KEYS: 1 meta, 2 outbox events, 3 outbox merge triggers
-- ARGV: 1 total_size, 2 chunk_size, 3 total_chunks, 4 filename, 5 file_md5hex,
--       6 metadata json, 7 now_ms, 8 ttl_ms, 9 the upload.created event (stored outbox entry),
--       10 callback url ("" when none), 11 callback secret ("" when none),
--       12 assembly ("" chunks | "segments" | "partial" | "concat"), 13 a concatenation's parts
--       (ids joined by spaces), 14 the merge trigger (stored outbox entry) for a
--       concatenation, which is merging as it is created ("" otherwise)
-- Returns {"created"} | {"exists"} | {"conflict", "geometry", ts, cs, tc}
--       | {"conflict", "file_md5"} | {"conflict", "state", state}

local meta = KEYS[1]
local current = redis.call('HMGET', meta, 'state', 'total_size', 'chunk_size', 'total_chunks',
  'file_md5', 'assembly')
if current[1] then
  if (current[6] or '') ~= ARGV[12] then
    return {'conflict', 'assembly'}
  end
  if current[2] ~= ARGV[1] or current[3] ~= ARGV[2] or current[4] ~= ARGV[3] then
    return {'conflict', 'geometry', current[2], current[3], current[4]}
  end
  if ARGV[5] ~= '' and current[5] ~= ARGV[5] then
    return {'conflict', 'file_md5'}
  end
  if current[1] == 'aborted' or current[1] == 'failed' then
    return {'conflict', 'state', current[1]}
  end
  return {'exists'}
end
redis.call('HSET', meta, 'version', '1', 'state', 'receiving', 'total_size', ARGV[1],
  'chunk_size', ARGV[2], 'total_chunks', ARGV[3], 'filename', ARGV[4], 'file_md5', ARGV[5],
  'metadata', ARGV[6], 'created_at', ARGV[7], 'updated_at', ARGV[7],
  'bytes_received', 0, 'chunks_received', 0, 'callback_url', ARGV[10],
  'callback_secret', ARGV[11], 'assembly', ARGV[12], 'concat_parts', ARGV[13])
if ARGV[12] == 'concat' then
  redis.call('HSET', meta, 'state', 'merging', 'merging_at', ARGV[7])
  redis.call('RPUSH', KEYS[3], ARGV[14])
  redis.call('PEXPIRE', KEYS[3], ARGV[8])
end
redis.call('PEXPIRE', meta, ARGV[8])
redis.call('RPUSH', KEYS[2], ARGV[9])
redis.call('PEXPIRE', KEYS[2], ARGV[8])
return {'created'}
