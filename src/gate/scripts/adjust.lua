-- Add DELTA to a loaded counter (never below zero); a missing counter stays
-- missing. KEYS[1] inv hash.  ARGV: delta, restock channel, sku
if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
local stock = redis.call('HINCRBY', KEYS[1], 'stock', ARGV[1])
if stock < 0 then
  redis.call('HSET', KEYS[1], 'stock', 0)
  stock = 0
end
if tonumber(ARGV[1]) > 0 then
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
return stock
