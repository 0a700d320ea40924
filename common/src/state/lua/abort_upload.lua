-- Aborts an upload. See StateStore::abort_upload.
--
-- KEYS: 1 meta, 2 parts, 3 bits, 4 outbox
-- ARGV: 1 now_ms, 2 ttl_ms, 3 the upload.aborted event (outbox entry)
-- Returns {"missing"} | {"already"} | {"aborted", previous_state}

-- Removes the merge triggers from the outbox; pending events stay to be published.
local function drop_merge_triggers(outbox)
  for _, entry in ipairs(redis.call('LRANGE', outbox, 0, -1)) do
    if string.sub(entry, 1, 15) == '{"type":"merge"' then
      redis.call('LREM', outbox, 0, entry)
    end
  end
end

local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  return {'missing'}
end
if state == 'aborted' then
  return {'already'}
end
redis.call('HSET', KEYS[1], 'state', 'aborted', 'updated_at', ARGV[1], 'aborted_at', ARGV[1],
  'chunks_received', 0, 'bytes_received', 0)
redis.call('DEL', KEYS[2], KEYS[3])
drop_merge_triggers(KEYS[4])
redis.call('RPUSH', KEYS[4], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[4], ARGV[2])
return {'aborted', state}
