-- Aborts an upload. See StateStore::abort_upload.
--
-- KEYS: 1 meta, 2 parts, 3 bits, 4 outbox merge triggers, 5 outbox events
-- ARGV: 1 now_ms, 2 ttl_ms, 3 the upload.aborted event (stored outbox entry)
-- Returns {"missing"} | {"already"} | {"aborted", previous_state}

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
-- Pending merge triggers go; pending events stay, and the abort joins them.
redis.call('DEL', KEYS[4])
redis.call('RPUSH', KEYS[5], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[5], ARGV[2])
return {'aborted', state}
