-- breaking: true
-- Keyspace layout 1. Per upload, under one hash tag so that every per-upload script touches
-- one Redis Cluster slot:
--   <ns>:{<id>}:meta    hash: geometry, state, names, results
--   <ns>:{<id>}:parts   hash: chunk index -> size, CRC32C, MD5, file name
--   <ns>:{<id>}:bits    bitmap of received chunks
--   <ns>:{<id>}:outbox  hash: merge triggers and events not yet published
--   <ns>:{<id>}:fence   fencing counter of the merge lock
--   <ns>:{<id>}:lock    the merge lock
-- Webhooks: <ns>:webhooks:event:{<event id>}, <ns>:webhooks:log:{<event id>},
-- <ns>:webhooks:disabled.
-- Nothing existed before layout 1, so there is nothing to convert; the step records the layout.
redis.call('HSET', KEYS[1], 'keyspace_layout', '1')
return 1
