-- Commits a finished merge, fenced: only the newest attempt of a still-merging upload may.
-- See StateStore::commit_merge.
--
-- KEYS: 1 meta, 2 fence, 3 parts, 4 outbox, 5 bits
-- ARGV: 1 fence, 2 size, 3 md5hex, 4 location, 5 event_id, 6 now_ms,
--       7 the upload.completed event (outbox entry)
-- A completed upload has no TTL: it is kept until deleted or past its retention.
-- Returns {"missing"} | {"completed", event_id} | {"state", state} | {"fenced"} | {"committed"}

-- Removes the merge triggers from the outbox; pending events stay to be published.
local function drop_merge_triggers(outbox)
  for _, entry in ipairs(redis.call('LRANGE', outbox, 0, -1)) do
    if string.sub(entry, 1, 15) == '{"type":"merge"' then
      redis.call('LREM', outbox, 0, entry)
    end
  end
end

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
redis.call('DEL', KEYS[3])
drop_merge_triggers(KEYS[4])
redis.call('RPUSH', KEYS[4], ARGV[7])
redis.call('PERSIST', meta)
redis.call('PERSIST', KEYS[5])
redis.call('PERSIST', KEYS[4])
return {'committed'}
