-- Rebuilds a lost upload from what storage holds, only if the store does not know it. See
-- StateStore::restore_upload.
--
-- KEYS: 1 meta, 2 parts, 3 bits, 4 outbox merge triggers, 5 outbox events, 6 fence
-- ARGV: 1 total_size, 2 chunk_size, 3 total_chunks, 4 filename, 5 file_md5hex, 6 metadata,
--       7 created_at, 8 callback_url, 9 callback_secret, 10 now_ms, 11 ttl_ms,
--       12 highest fence on storage, 13 last activity (ms), 14 the merge trigger (stored outbox entry),
--       15 completed (0|1), 16 size, 17 md5hex, 18 location, 19 completed_at, 20 event_id,
--       21 the upload.created event (stored outbox entry, for an upload restored not completed),
--       22 crc32c (8 hex digits), 23 sha256hex, 24 composite md5 (22-24: '' when absent),
--       25 assembly, 26 a concatenation's parts, 27 merges when complete (0|1: a partial
--       upload does not),
--       28.. triples: index, entry "offset:len:crc32c:md5hex:token", len
-- Returns {"exists", state} | {"restored", state}

local meta, parts, bits, merges, events, fence = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5],
  KEYS[6]
local state = redis.call('HGET', meta, 'state')
if state then return {'exists', state} end

-- Tokens never go backwards: past every attempt storage knows, and past the counter if it
-- survived.
local current = tonumber(redis.call('GET', fence) or '0')
if tonumber(ARGV[12]) > current then redis.call('SET', fence, ARGV[12]) end

local chunks, bytes = 0, 0
for i = 28, #ARGV, 3 do
  redis.call('HSET', parts, ARGV[i], ARGV[i + 1])
  redis.call('SETBIT', bits, ARGV[i], 1)
  chunks = chunks + 1
  bytes = bytes + tonumber(ARGV[i + 2])
end

redis.call('HSET', meta, 'version', '1', 'total_size', ARGV[1], 'chunk_size', ARGV[2],
  'total_chunks', ARGV[3], 'filename', ARGV[4], 'file_md5', ARGV[5], 'metadata', ARGV[6],
  'created_at', ARGV[7], 'updated_at', ARGV[13], 'callback_url', ARGV[8],
  'callback_secret', ARGV[9], 'restored_at', ARGV[10], 'assembly', ARGV[25],
  'concat_parts', ARGV[26])

if ARGV[15] == '1' then
  state = 'completed'
  redis.call('DEL', parts)
  for i = 0, tonumber(ARGV[3]) - 1 do redis.call('SETBIT', bits, i, 1) end
  redis.call('HSET', meta, 'state', state, 'size', ARGV[16], 'md5', ARGV[17],
    'location', ARGV[18], 'completed_at', ARGV[19], 'completed_event_id', ARGV[20],
    'merge_bytes_done', ARGV[16], 'chunks_received', ARGV[3], 'bytes_received', ARGV[1])
  for i, field in ipairs({'crc32c', 'sha256', 'composite_md5'}) do
    if ARGV[21 + i] ~= '' then redis.call('HSET', meta, field, ARGV[21 + i]) end
  end
  redis.call('PERSIST', meta)
  redis.call('PERSIST', bits)
  return {'restored', state}
end

redis.call('HSET', meta, 'chunks_received', chunks, 'bytes_received', bytes)
redis.call('RPUSH', events, ARGV[21])
if (bytes == tonumber(ARGV[1]) and tonumber(ARGV[1]) > 0 and ARGV[27] == '1')
    or ARGV[25] == 'concat' then
  state = 'merging'
  redis.call('HSET', meta, 'state', state, 'merging_at', ARGV[10])
  redis.call('RPUSH', merges, ARGV[14])
  redis.call('PEXPIRE', merges, ARGV[11])
else
  state = 'receiving'
  redis.call('HSET', meta, 'state', state)
end
redis.call('PEXPIRE', meta, ARGV[11])
redis.call('PEXPIRE', events, ARGV[11])
if chunks > 0 then
  redis.call('PEXPIRE', parts, ARGV[11])
  redis.call('PEXPIRE', bits, ARGV[11])
end
return {'restored', state}
