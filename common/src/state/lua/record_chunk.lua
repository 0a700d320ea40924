-- Records one chunk of an upload, atomically. See StateStore::record_chunk.
--
-- KEYS: 1 meta (hash), 2 parts (hash index -> entry), 3 bits (bitmap),
--       4 outbox merge triggers (list), 5 outbox events (list)
-- ARGV: 1 index, 2 entry "offset:len:crc32c:md5hex:token", 3 offset, 4 len, 5 crc32c,
--       6 md5hex ("" when none), 7 total_size, 8 chunk_size, 9 total_chunks,
--       10 filename, 11 file_md5hex, 12 metadata json, 13 now_ms, 14 ttl_ms,
--       15 the merge trigger (stored outbox entry, written when this chunk completes the
--       upload), 16 the upload.created event (stored outbox entry, written when this chunk
--       creates it)
--
-- Returns one of
--   {"conflict", "geometry", total_size, chunk_size, total_chunks}
--   {"conflict", "file_md5"} | {"conflict", "state", state} | {"conflict", "chunk"}
--   {"conflict", "assembly"} (the upload is not one of chunks)
--   {"duplicate", state, chunks_received, bytes_received, counted_token}
--   {"recorded", state, chunks_received, bytes_received, completed (0|1), created (0|1)}
-- A conflict writes nothing.

local meta, parts, bits, merges, events = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local index, entry = ARGV[1], ARGV[2]
local offset, len, crc, md5 = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local total_size, chunk_size, total_chunks = ARGV[7], ARGV[8], ARGV[9]
local filename, file_md5, metadata = ARGV[10], ARGV[11], ARGV[12]
local now, ttl, job, created_event = ARGV[13], ARGV[14], ARGV[15], ARGV[16]

local current = redis.call('HMGET', meta, 'state', 'total_size', 'chunk_size', 'total_chunks',
  'file_md5', 'filename', 'assembly')
local state = current[1]
local set_fields = {}
local created = 0

if not state then
  created = 1
  state = 'receiving'
  redis.call('HSET', meta, 'version', '1', 'state', state, 'total_size', total_size,
    'chunk_size', chunk_size, 'total_chunks', total_chunks, 'filename', filename,
    'file_md5', file_md5, 'metadata', metadata, 'created_at', now, 'updated_at', now,
    'bytes_received', 0, 'chunks_received', 0)
else
  if (current[7] or '') ~= '' then
    return {'conflict', 'assembly'}
  end
  if current[2] ~= total_size or current[3] ~= chunk_size or current[4] ~= total_chunks then
    return {'conflict', 'geometry', current[2], current[3], current[4]}
  end
  if file_md5 ~= '' and current[5] ~= '' and current[5] ~= file_md5 then
    return {'conflict', 'file_md5'}
  end
  if state ~= 'receiving' then
    return {'conflict', 'state', state}
  end
  if file_md5 ~= '' and current[5] == '' then
    table.insert(set_fields, 'file_md5'); table.insert(set_fields, file_md5)
  end
  if filename ~= '' and current[6] == '' then
    table.insert(set_fields, 'filename'); table.insert(set_fields, filename)
  end
end

local function refresh_ttl()
  redis.call('PEXPIRE', meta, ttl)
  redis.call('PEXPIRE', parts, ttl)
  redis.call('PEXPIRE', bits, ttl)
  for _, outbox in ipairs({merges, events}) do
    if redis.call('EXISTS', outbox) == 1 then redis.call('PEXPIRE', outbox, ttl) end
  end
end

local existing = redis.call('HGET', parts, index)
if existing then
  local e_offset, e_len, e_crc, e_md5, e_token =
    string.match(existing, '^(%d+):(%d+):(%d+):(%x*):(.+)$')
  local same = e_offset == offset and e_len == len and e_crc == crc
    and (e_md5 == '' or md5 == '' or e_md5 == md5)
  if not same then
    return {'conflict', 'chunk'}
  end
  if #set_fields > 0 then redis.call('HSET', meta, unpack(set_fields)) end
  redis.call('HSET', meta, 'updated_at', now)
  refresh_ttl()
  local counts = redis.call('HMGET', meta, 'chunks_received', 'bytes_received')
  return {'duplicate', state, counts[1], counts[2], e_token}
end

redis.call('HSET', parts, index, entry)
redis.call('SETBIT', bits, index, 1)
local chunks = redis.call('HINCRBY', meta, 'chunks_received', 1)
local bytes = redis.call('HINCRBY', meta, 'bytes_received', len)
table.insert(set_fields, 'updated_at'); table.insert(set_fields, now)

local completed = 0
if bytes == tonumber(total_size) then
  state = 'merging'
  completed = 1
  table.insert(set_fields, 'state'); table.insert(set_fields, state)
  table.insert(set_fields, 'merging_at'); table.insert(set_fields, now)
  redis.call('RPUSH', merges, job)
end
redis.call('HSET', meta, unpack(set_fields))
if created == 1 then
  redis.call('RPUSH', events, created_event)
end
refresh_ttl()
return {'recorded', state, tostring(chunks), tostring(bytes), completed, created}
