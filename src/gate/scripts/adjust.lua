-- Add DELTA to a loaded counter unless the counter was
-- rebuilt from a read that already had this adjustment; a missing counter
-- stays missing. Once per call however often it is sent: a cluster client
-- sends a command again after a lost connection, and a delta run twice
-- would count its units twice, so each call carries an id of its own and
-- its first run leaves a mark that answers the later ones.
-- KEYS[1] inv hash, KEYS[2] the call's mark (under the SKU's hash tag).
-- ARGV: delta, row version the adjustment wrote, seconds the mark lasts.
-- Returns {the counter or -1 when there is none, 1 when units came back
-- (the caller announces a restock) else 0}.
local mark = redis.call('GET', KEYS[2])
if mark then
  return {tonumber(redis.call('HGET', KEYS[1], 'stock') or '-1'), tonumber(mark)}
end
local function done(stock, restocked)
  redis.call('SET', KEYS[2], restocked, 'EX', ARGV[3])
  return {stock, restocked}
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return done(-1, 0)
end
local version = tonumber(ARGV[2])
local base = tonumber(redis.call('HGET', KEYS[1], 'ver') or '-1')
local seen = tonumber(redis.call('HGET', KEYS[1], 'seen') or '-1')
if version > seen then
  redis.call('HSET', KEYS[1], 'seen', version)
end
if version <= base then
  return done(tonumber(redis.call('HGET', KEYS[1], 'stock')), 0)
end
-- Not clamped at zero (see set.lua): below zero it under-counts until the
-- refusals or the reconciler level it, which never oversells.
local stock = redis.call('HINCRBY', KEYS[1], 'stock', ARGV[1])
if tonumber(ARGV[1]) > 0 then
  return done(stock, 1)
end
return done(stock, 0)
