-- Admit QTY units of one SKU for one user, atomically.
-- KEYS[1] inv hash {stock, cap, inflight, opens, closes, sale, scap}
-- KEYS[2] users hash {user -> live units}
-- KEYS[3] reservation record hash          KEYS[4] pending zset {id -> admitted ms}
-- ARGV: user, qty, record ttl seconds, now ms, reservation id, the call's
-- decision time in ms (checked against the sale window).
-- Returns {0} no counter (not loaded or unknown SKU), {1, remaining} admitted,
-- {2, remaining} sold out, {3, live, cap} over the per-user limit,
-- {4, opens ms} before the sale window, {5, closes ms} after it. An
-- admission in a SKU of a capped sale adds the sale and its cap:
-- {1, remaining, sale, cap}; the caller then counts it against the sale
-- (sale_take.lua), whose keys may sit in another slot.
-- The decision table is the same as src/gate/embedded.rs.
local inv = redis.call('HMGET', KEYS[1], 'stock', 'cap', 'opens', 'closes', 'sale', 'scap')
if not inv[1] then
  return {0}
end
-- An id is admitted once: the same run sent again (a cluster client resends
-- after a lost connection) gets the first answer, not a second admission.
if redis.call('EXISTS', KEYS[3]) == 1 then
  local sale = redis.call('HGET', KEYS[3], 'sale')
  if sale and inv[6] then
    return {1, math.max(tonumber(inv[1]), 0), sale, tonumber(inv[6])}
  end
  return {1, math.max(tonumber(inv[1]), 0)}
end
local at = tonumber(ARGV[6])
if inv[3] and at < tonumber(inv[3]) then
  return {4, tonumber(inv[3])}
end
if inv[4] and at >= tonumber(inv[4]) then
  return {5, tonumber(inv[4])}
end
local stock = tonumber(inv[1])
local qty = tonumber(ARGV[2])
if stock < qty then
  return {2, math.max(stock, 0)}
end
local cap = tonumber(inv[2] or '0')
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
if inv[5] and inv[6] then
  redis.call('HSET', KEYS[3], 'sale', inv[5])
  return {1, stock - qty, inv[5], tonumber(inv[6])}
end
return {1, stock - qty}
