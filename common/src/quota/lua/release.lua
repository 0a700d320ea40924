-- An upload is gone (aborted, expired, deleted): everything it held is freed. Idempotent.
-- Keys as in reserve.lua. A tenant left holding nothing leaves no key behind.
-- A step after the reservation: the upload leaves the unconfirmed ones (KEYS[4]).
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
local old = redis.call('HGET', KEYS[2], ARGV[1])
if old then
  redis.call('HDEL', KEYS[2], ARGV[1])
  if redis.call('DECRBY', KEYS[3], old) <= 0 and redis.call('HLEN', KEYS[2]) == 0 then
    redis.call('DEL', KEYS[3])
  end
end
return 1
