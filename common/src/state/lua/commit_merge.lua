-- Commits a finished merge, fenced: only the newest attempt of a still-merging upload may.
-- See StateStore::commit_merge.
--
-- KEYS: 1 meta, 2 fence, 3 parts, 4 outbox merge triggers, 5 outbox events, 6 bits
-- ARGV: 1 fence, 2 size, 3 md5hex, 4 location, 5 event_id, 6 now_ms,
--       7 the upload.completed event (stored outbox entry), 8 crc32c (8 hex digits),
--       9 sha256hex, 10 composite md5 ("<hex>-<parts>"); 8-10 are '' when absent
-- A completed upload has no TTL: it is kept until deleted or past its retention.
-- Returns {"missing"} | {"completed", event_id} | {"state", state} | {"fenced"} | {"committed"}

local meta, fence = KEYS[1], KEYS[2]
local state = redis.call('HGET', meta, 'state')
if not state then return {'missing'} end
if state == 'completed' then
  return {'completed', redis.call('HGET', meta, 'completed_event_id') or ''}
end
if state ~= 'merging' then return {'state', state} end
if redis.call('GET', fence) ~= ARGV[1] then return {'fenced'} end
redis.call('HSET', meta, 'state', 'completed', 'size', ARGV[2], 'md5', ARGV[3],
  'location', ARGV[4], 'completed_event_id', ARGV[5], 'completed_at', ARGV[6],
  'updated_at', ARGV[6], 'merge_bytes_done', ARGV[2])
for i, field in ipairs({'crc32c', 'sha256', 'composite_md5'}) do
  if ARGV[7 + i] ~= '' then redis.call('HSET', meta, field, ARGV[7 + i]) end
end
redis.call('DEL', KEYS[3])
-- Pending merge triggers go; pending events stay, and the completion joins them.
redis.call('DEL', KEYS[4])
redis.call('RPUSH', KEYS[5], ARGV[7])
redis.call('PERSIST', meta)
redis.call('PERSIST', KEYS[6])
redis.call('PERSIST', KEYS[5])
return {'committed'}
