-- An upload stopped being active (completed or failed): its slot is freed and its bytes,
-- still kept, become ARGV[2]. Idempotent. Keys as in reserve.lua.
redis.call('HDEL', KEYS[1], ARGV[1])
local old = redis.call('HGET', KEYS[2], ARGV[1])
if old then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  redis.call('INCRBY', KEYS[3], tonumber(ARGV[2]) - tonumber(old))
end
return 1
