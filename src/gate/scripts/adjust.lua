-- Add DELTA to a loaded counter unless the counter was
-- rebuilt from a read that already had this adjustment; a missing counter
-- stays missing. KEYS[1] inv hash.
-- ARGV: delta, row version the adjustment wrote.
-- Returns {the counter or -1 when there is none, 1 when units came back
-- (the caller announces a restock) else 0}.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {-1, 0}
end
local version = tonumber(ARGV[2])
local base = tonumber(redis.call('HGET', KEYS[1], 'ver') or '-1')
local seen = tonumber(redis.call('HGET', KEYS[1], 'seen') or '-1')
if version > seen then
  redis.call('HSET', KEYS[1], 'seen', version)
end
if version <= base then
  return {tonumber(redis.call('HGET', KEYS[1], 'stock')), 0}
end
-- Not clamped at zero (see set.lua): below zero it under-counts until the
-- refusals or the reconciler level it, which never oversells.
local stock = redis.call('HINCRBY', KEYS[1], 'stock', ARGV[1])
if tonumber(ARGV[1]) > 0 then
  return {stock, 1}
end
return {stock, 0}
