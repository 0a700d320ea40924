-- Makes the ledger say what storage says of one upload: it keeps ARGV[2] bytes, and is
-- active (ARGV[3] = '1') or not. No limit applies: the upload exists. Idempotent. Keys as
-- in reserve.lua; a lost running total is summed again from the hash.
-- A step after the reservation: the upload leaves the unconfirmed ones (KEYS[4]).
redis.call('HDEL', KEYS[4], ARGV[1])
local old = redis.call('HGET', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('INCRBY', KEYS[3], tonumber(ARGV[2]) - tonumber(old or '0'))
else
  local total = 0
  for _, bytes in ipairs(redis.call('HVALS', KEYS[2])) do
    total = total + tonumber(bytes)
  end
  redis.call('SET', KEYS[3], string.format('%d', total))
end
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return 1
