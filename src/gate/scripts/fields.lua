-- Set fields of one SKU's existing counter that no database version
-- orders (the sale window, the sale the SKU belongs to), each written
-- whole; a SKU the gate has no counter for is left alone (its load or set
-- carries them).
-- KEYS[1] inv hash.  ARGV: field, value, field, value, ... ('' deletes
-- the field).
-- Returns {1, the first field's value before ('' for none)} when set,
-- {0} for no counter.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {0}
end
local before = redis.call('HGET', KEYS[1], ARGV[1]) or ''
for i = 1, #ARGV, 2 do
  if ARGV[i + 1] == '' then
    redis.call('HDEL', KEYS[1], ARGV[i])
  else
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return {1, before}
