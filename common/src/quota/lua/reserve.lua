-- Reserves an active-upload slot and the upload's bytes for one tenant, atomically against
-- every other reservation of the tenant (all three keys share the tenant's hash tag).
-- KEYS[1] active (hash upload -> bytes), KEYS[2] stored (hash upload -> bytes),
-- KEYS[3] stored total (integer), KEYS[4] unconfirmed (hash upload -> ms reserved at)
-- ARGV[1] upload key, ARGV[2] bytes, ARGV[3] max active (-1: none), ARGV[4] max stored (-1),
-- ARGV[5] now (ms since the epoch)
-- Returns {'held'} | {'new'} | {'active', count} | {'stored', total}
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then
  return {'held'}
end
local max_active = tonumber(ARGV[3])
local active = redis.call('HLEN', KEYS[1])
if max_active >= 0 and active >= max_active then
  return {'active', tostring(active)}
end
local total = tonumber(redis.call('GET', KEYS[3]) or '0')
local max_stored = tonumber(ARGV[4])
if max_stored >= 0 and total + tonumber(ARGV[2]) > max_stored then
  return {'stored', tostring(total)}
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('INCRBY', KEYS[3], ARGV[2])
redis.call('HSET', KEYS[4], ARGV[1], ARGV[5])
return {'new'}
