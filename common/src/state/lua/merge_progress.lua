-- Records how far the current merge attempt got (for status), if it is still the newest.
-- KEYS: 1 meta, 2 fence   ARGV: 1 fence, 2 bytes_done
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'state') ~= 'merging' then return 0 end
redis.call('HSET', KEYS[1], 'merge_bytes_done', ARGV[2])
return 1
