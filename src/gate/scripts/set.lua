-- Set one SKU's counter from the database: available = database stock minus
-- units admitted here and not yet settled (they are not in the database).
-- KEYS[1] inv hash.  ARGV: database stock, per-user cap, restock channel, sku
-- Returns the counter.
local inflight = tonumber(redis.call('HGET', KEYS[1], 'inflight') or '0')
local stock = tonumber(ARGV[1]) - inflight
if stock < 0 then
  stock = 0
end
redis.call('HSET', KEYS[1], 'stock', stock, 'cap', ARGV[2], 'inflight', inflight)
redis.call('PUBLISH', ARGV[3], ARGV[4])
return stock
