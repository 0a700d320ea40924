-- An upload is gone (aborted, expired, deleted): everything it held is freed. Idempotent.
-- Keys as in reserve.lua.
redis.call('HDEL', KEYS[1], ARGV[1])
local old = redis.call('HGET', KEYS[2], ARGV[1])
if old then
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('DECRBY', KEYS[3], old)
end
return 1
