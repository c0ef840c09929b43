-- Set one SKU's sale window (Unix ms; '' = that side open) on an existing
-- counter; a SKU the gate has no counter for is left alone (its load or
-- set carries the window).
-- KEYS[1] inv hash.  ARGV: opens ms or '', closes ms or ''.
-- Returns 1 when set, 0 for no counter.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local fields = {'opens', 'closes'}
for i = 1, 2 do
  if ARGV[i] == '' then
    redis.call('HDEL', KEYS[1], fields[i])
  else
    redis.call('HSET', KEYS[1], fields[i], ARGV[i])
  end
end
return 1
