-- Makes the ledger say what storage says of one upload: it keeps ARGV[2] bytes, and is
-- active (ARGV[3] = '1') or not. With ARGV[4] = 'grow' (a length still open) an entry
-- holding more keeps its bytes (the reservation of the largest size the upload may reach).
-- No limit applies: the upload exists. Idempotent. Keys as in reserve.lua; a lost running
-- total is summed again from the hash.
-- A step after the reservation: the upload leaves the unconfirmed ones (KEYS[4]).
redis.call('HDEL', KEYS[4], ARGV[1])
local old = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
local bytes = tonumber(ARGV[2])
if ARGV[4] == 'grow' then
  bytes = math.max(old, bytes)
end
bytes = string.format('%d', bytes)
redis.call('HSET', KEYS[2], ARGV[1], bytes)
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('INCRBY', KEYS[3], tonumber(bytes) - old)
else
  local total = 0
  for _, held in ipairs(redis.call('HVALS', KEYS[2])) do
    total = total + tonumber(held)
  end
  redis.call('SET', KEYS[3], string.format('%d', total))
end
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[1], ARGV[1], bytes)
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return 1
