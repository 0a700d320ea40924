-- An upload stopped being active (completed or failed): its slot is freed and its bytes,
-- still kept, become ARGV[2]. Idempotent. Keys as in reserve.lua.
-- A step after the reservation: the upload leaves the unconfirmed ones (KEYS[4]).
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
local old = redis.call('HGET', KEYS[2], ARGV[1])
if old then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  redis.call('INCRBY', KEYS[3], tonumber(ARGV[2]) - tonumber(old))
end
return 1
