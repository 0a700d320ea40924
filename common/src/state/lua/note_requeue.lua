-- Counts a sweeper re-enqueue of a stuck merge. KEYS: 1 meta   ARGV: 1 now_ms
-- Returns the new count, or -1 when the upload is no longer merging.
if redis.call('HGET', KEYS[1], 'state') ~= 'merging' then return -1 end
redis.call('HSET', KEYS[1], 'requeued_at', ARGV[1])
return redis.call('HINCRBY', KEYS[1], 'requeues', 1)
