-- Marks a merging upload failed, fenced when a fence is given. See StateStore::fail_merge.
--
-- KEYS: 1 meta, 2 fence, 3 outbox merge triggers, 4 outbox events
-- ARGV: 1 fence ("" = unfenced: the sweeper or a poison job), 2 reason, 3 event_id,
--       4 now_ms, 5 ttl_ms, 6 the upload.failed event (stored outbox entry)
-- Returns {"missing"} | {"state", state, failed_event_id} | {"fenced"} | {"failed"}

local meta = KEYS[1]
local state = redis.call('HGET', meta, 'state')
if not state then return {'missing'} end
if state ~= 'merging' then
  return {'state', state, redis.call('HGET', meta, 'failed_event_id') or ''}
end
if ARGV[1] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[1] then return {'fenced'} end
redis.call('HSET', meta, 'state', 'failed', 'failure_reason', ARGV[2],
  'failed_event_id', ARGV[3], 'failed_at', ARGV[4], 'updated_at', ARGV[4])
-- Pending merge triggers go; pending events stay, and the failure joins them.
redis.call('DEL', KEYS[3])
redis.call('RPUSH', KEYS[4], ARGV[6])
redis.call('PEXPIRE', meta, ARGV[5])
redis.call('PEXPIRE', KEYS[4], ARGV[5])
return {'failed'}
