-- Claims the recording of a SKU's finished draw, once across replicas:
-- the first call after the draw is done gets its summary, every later one
-- nothing.
-- KEYS[1] inv hash.  ARGV: the SKU's key stem (`P:{SKU}:`), seconds the
-- draw is kept.
-- Returns {} (no draw for the current opening, not done, or claimed
-- before), or {seed, opens, ends, done ms, stock, entrants, admitted,
-- overflow}. The draw's keys are undeclared, in the SKU's slot.
local inv = redis.call('HMGET', KEYS[1], 'opens', 'draw')
if not inv[1] or not inv[2] then
  return {}
end
local dkey = ARGV[1] .. 'draw:' .. inv[1]
if not redis.call('HGET', dkey, 'done') or redis.call('HSETNX', dkey, 'recorded', 1) == 0 then
  return {}
end
redis.call('EXPIRE', dkey, ARGV[2])
local d = redis.call('HMGET', dkey, 'seed', 'opens', 'ends', 'done', 'stock', 'n', 'admitted', 'overflow')
for i = 1, 8 do
  d[i] = d[i] or '0'
end
return d
