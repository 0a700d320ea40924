-- Marks a merging upload failed, fenced when a fence is given. See StateStore::fail_merge.
--
-- KEYS: 1 meta, 2 fence, 3 outbox
-- ARGV: 1 fence ("" = unfenced: the sweeper or a poison job), 2 reason, 3 event_id,
--       4 now_ms, 5 ttl_ms, 6 the upload.failed event (outbox entry)
-- Returns {"missing"} | {"state", state, failed_event_id} | {"fenced"} | {"failed"}

-- Removes the merge triggers from the outbox; pending events stay to be published.
local function drop_merge_triggers(outbox)
  for _, entry in ipairs(redis.call('LRANGE', outbox, 0, -1)) do
    if string.sub(entry, 1, 15) == '{"type":"merge"' then
      redis.call('LREM', outbox, 0, entry)
    end
  end
end

local meta = KEYS[1]
local state = redis.call('HGET', meta, 'state')
if not state then return {'missing'} end
if state ~= 'merging' then
  return {'state', state, redis.call('HGET', meta, 'failed_event_id') or ''}
end
if ARGV[1] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[1] then return {'fenced'} end
redis.call('HSET', meta, 'state', 'failed', 'failure_reason', ARGV[2],
  'failed_event_id', ARGV[3], 'failed_at', ARGV[4], 'updated_at', ARGV[4])
drop_merge_triggers(KEYS[3])
redis.call('RPUSH', KEYS[3], ARGV[6])
redis.call('PEXPIRE', meta, ARGV[5])
redis.call('PEXPIRE', KEYS[3], ARGV[5])
return {'failed'}
