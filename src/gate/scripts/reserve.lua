-- Admit QTY units of one SKU for one user, atomically.
-- KEYS[1] inv hash {stock, cap, inflight}   KEYS[2] users hash {user -> live units}
-- KEYS[3] reservation record hash          KEYS[4] pending zset {id -> admitted ms}
-- ARGV: user, qty, record ttl seconds, now ms, reservation id
-- Returns {0} no counter (not loaded or unknown SKU), {1, remaining} admitted,
-- {2, remaining} sold out, {3, live, cap} over the per-user limit.
-- The decision table is the same as src/gate/embedded.rs.
local stock = redis.call('HGET', KEYS[1], 'stock')
if not stock then
  return {0}
end
stock = tonumber(stock)
local qty = tonumber(ARGV[2])
if stock < qty then
  return {2, math.max(stock, 0)}
end
local cap = tonumber(redis.call('HGET', KEYS[1], 'cap') or '0')
local live = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if cap > 0 and live + qty > cap then
  return {3, live, cap}
end
redis.call('HINCRBY', KEYS[1], 'stock', -qty)
redis.call('HINCRBY', KEYS[1], 'inflight', qty)
redis.call('HINCRBY', KEYS[2], ARGV[1], qty)
redis.call('HSET', KEYS[3], 'user', ARGV[1], 'qty', qty, 'phase', 'inflight')
redis.call('EXPIRE', KEYS[3], ARGV[3])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[5])
return {1, stock - qty}
