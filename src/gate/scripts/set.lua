-- Set one SKU's counter from a database read: available = database stock
-- minus units admitted here and not yet settled (they are not in the
-- database; those that are get their units back when their commit is
-- settled, see settle.lua). Refused when the gate has already settled a
-- change newer than the read, whose effect the read would overwrite.
-- KEYS[1] inv hash.  ARGV: database stock, per-user cap, row version of
-- the read, the sale window's opening and closing (Unix ms, '' = that side
-- open), '1' to set even from a stale read (a database that went back in
-- time, see StockGate::reset), the capped sale the SKU belongs to and
-- that sale's per-user cap ('' = none), taken only by a counter created
-- here (set_sales moves an existing one, dropping the counts it leaves),
-- and the window's draw in ms ('' = none).
-- Returns 1 when set (the caller announces a restock), 0 when the read is
-- stale.
local created = redis.call('EXISTS', KEYS[1]) == 0
local version = tonumber(ARGV[3])
local seen = tonumber(redis.call('HGET', KEYS[1], 'seen') or '-1')
if version < seen and ARGV[6] ~= '1' then
  return 0
end
local inflight = tonumber(redis.call('HGET', KEYS[1], 'inflight') or '0')
-- Not clamped at zero: a commit counted twice comes back later, and a
-- clamped counter would then over-count.
local stock = tonumber(ARGV[1]) - inflight
redis.call('HSET', KEYS[1], 'stock', stock, 'cap', ARGV[2], 'inflight', inflight,
  'ver', version, 'seen', version)
local args = {ARGV[4], ARGV[5], ARGV[9], ARGV[7], ARGV[8]}
local fields = {'opens', 'closes', 'draw', 'sale', 'scap'}
for i = 1, (created and 5 or 3) do
  if args[i] == '' then
    redis.call('HDEL', KEYS[1], fields[i])
  else
    redis.call('HSET', KEYS[1], fields[i], args[i])
  end
end
return 1
