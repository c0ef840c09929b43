-- Settle one admitted reservation after the database decided, or give its
-- units back. Exactly once per reservation id however often it runs: the
-- record's phase moves inflight -> committed -> done and never back.
-- KEYS: as reserve.lua.  ARGV: action (committed | rejected | release), user,
-- qty, record ttl seconds, reservation id, restock channel, sku
-- Returns 1 when something changed, 0 when it was already settled.
local action = ARGV[1]
local user = ARGV[2]
local qty = tonumber(ARGV[3])
local phase = redis.call('HGET', KEYS[3], 'phase')
if phase == 'done' then
  return 0
end
if phase == 'inflight' then
  redis.call('HINCRBY', KEYS[1], 'inflight', -qty)
  redis.call('ZREM', KEYS[4], ARGV[5])
end
if action == 'committed' then
  if phase ~= 'inflight' then
    return 0
  end
  redis.call('HSET', KEYS[3], 'phase', 'committed')
  return 1
end
if action == 'rejected' and not phase then
  -- Not admitted here (or its record expired): nothing to free.
  return 0
end
local live = redis.call('HINCRBY', KEYS[2], user, -qty)
if live <= 0 then
  redis.call('HDEL', KEYS[2], user)
end
if action == 'release' and redis.call('EXISTS', KEYS[1]) == 1 then
  -- A counter rebuilt from the database did not count this hold as
  -- available, so the units go back even without a record. A missing
  -- counter stays missing: "not loaded" must never turn into "N left".
  redis.call('HINCRBY', KEYS[1], 'stock', qty)
  redis.call('PUBLISH', ARGV[6], ARGV[7])
end
redis.call('HSET', KEYS[3], 'user', user, 'qty', qty, 'phase', 'done')
redis.call('EXPIRE', KEYS[3], ARGV[4])
return 1
