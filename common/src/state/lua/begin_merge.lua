-- Starts a merge attempt: takes a new fencing token and returns the plan. See
-- StateStore::begin_merge. Called by a worker that holds the upload's lock.
--
-- KEYS: 1 meta, 2 parts, 3 fence
-- ARGV: 1 now_ms, 2 ttl_ms
-- Returns {"missing"} | {"state", state} | {"completed"}
--       | {"merging", fence, total_size, chunk_size, total_chunks, filename, file_md5,
--          metadata, created_at, assembly, concat parts, index1, entry1, index2, entry2, ...}

local meta, parts, fence = KEYS[1], KEYS[2], KEYS[3]
local m = redis.call('HMGET', meta, 'state', 'total_size', 'chunk_size', 'total_chunks',
  'filename', 'file_md5', 'metadata', 'created_at', 'assembly', 'concat_parts')
local state = m[1]
if not state then return {'missing'} end
if state == 'completed' then return {'completed'} end
if state ~= 'merging' then return {'state', state} end
-- The counter key carries a TTL; the upload's own record of its last token does not go
-- before the upload does, so a counter that expired (an upload back to receiving for
-- longer than the TTL) never restarts below a token already handed out.
local last = tonumber(redis.call('HGET', meta, 'merge_fence') or '0')
local token = redis.call('INCR', fence)
if token <= last then
  token = last + 1
  redis.call('SET', fence, token)
end
redis.call('PEXPIRE', fence, ARGV[2])
redis.call('HSET', meta, 'merge_fence', token, 'merge_started_at', ARGV[1], 'merge_bytes_done', 0)
local reply = {'merging', tostring(token), m[2], m[3], m[4], m[5] or '', m[6] or '', m[7] or '',
  m[8] or '0', m[9] or '', m[10] or ''}
local all = redis.call('HGETALL', parts)
for i = 1, #all do reply[#reply + 1] = all[i] end
return reply
