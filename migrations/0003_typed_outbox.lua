-- breaking: true
-- per-upload: outbox outbox:merge outbox:events
-- Keyspace layout 2: the typed outbox. Layout 1 kept an upload's merge triggers and events in
-- one list, <ns>:{<id>}:outbox, and told them apart by their text; layout 2 keeps each kind in
-- a list of its own, under the same hash tag:
--   <ns>:{<id>}:outbox:merge   merge triggers not yet published
--   <ns>:{<id>}:outbox:events  events not yet published
-- A per-upload step: `stitch-worker migrate` runs it once for every upload that has a layout-1
-- outbox (KEYS[1]), with that upload's two new lists (KEYS[2], KEYS[3]); ARGV[1] is the
-- namespace. The sweeper runs it too, for an outbox that a process older than this step wrote
-- after the step ran, so that no entry is left where nothing reads it.
-- Each entry moves, text unchanged and in order, to the list of its kind, read once here from
-- the layout-1 format's own type tag. An entry of no known kind stays in the old list (kept,
-- never dropped; the sweeper logs it). The lists keep the old list's TTL (none: none), unless
-- the new list already has a longer one. Idempotent: a second run finds nothing to move.
-- Returns {merge triggers moved, events moved, entries kept}.
local old, merges, events = KEYS[1], KEYS[2], KEYS[3]
local ttl = redis.call('PTTL', old)
if ttl == -2 then return {0, 0, 0} end
local before = {[merges] = redis.call('PTTL', merges), [events] = redis.call('PTTL', events)}
local moved = {[merges] = 0, [events] = 0}
local kept = 0
for _, entry in ipairs(redis.call('LRANGE', old, 0, -1)) do
  local ok, decoded = pcall(cjson.decode, entry)
  local kind = ok and type(decoded) == 'table' and decoded['type'] or nil
  local target = nil
  if kind == 'merge' then target = merges elseif kind == 'event' then target = events end
  if target then
    redis.call('RPUSH', target, entry)
    redis.call('LREM', old, 1, entry)
    moved[target] = moved[target] + 1
  else
    kept = kept + 1
  end
end
for _, key in ipairs({merges, events}) do
  if moved[key] > 0 then
    if ttl == -1 then
      redis.call('PERSIST', key)
    elseif before[key] == -2 or (before[key] > 0 and before[key] < ttl) then
      redis.call('PEXPIRE', key, ttl)
    end
  end
end
return {moved[merges], moved[events], kept}
