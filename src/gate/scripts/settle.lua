-- Settle admitted reservations of one SKU after the database decided, or
-- give their units back. Exactly once per reservation id however often it
-- runs: a record's phase moves inflight -> committed -> done, never back.
-- KEYS[1] inv hash, KEYS[2] users hash, KEYS[3] pending zset,
-- KEYS[3+i] the record of reservation i (all under the SKU's hash tag).
-- ARGV: action (committed | rejected | release), record ttl seconds,
-- restock channel, sku, then user, qty, id for each reservation.
-- Returns how many records changed.
local action = ARGV[1]
local changed = 0
local restocked = false
for i = 1, #KEYS - 3 do
  local record = KEYS[3 + i]
  local user = ARGV[2 + 3 * i]
  local qty = tonumber(ARGV[3 + 3 * i])
  local id = ARGV[4 + 3 * i]
  local phase = redis.call('HGET', record, 'phase')
  if phase ~= 'done' then
    if phase == 'inflight' then
      redis.call('HINCRBY', KEYS[1], 'inflight', -qty)
      redis.call('ZREM', KEYS[3], id)
    end
    if action == 'committed' then
      if phase == 'inflight' then
        redis.call('HSET', record, 'phase', 'committed')
        changed = changed + 1
      end
    elseif action == 'release' or phase then
      -- A rejection without a record was not admitted here: nothing to free.
      local live = redis.call('HINCRBY', KEYS[2], user, -qty)
      if live <= 0 then
        redis.call('HDEL', KEYS[2], user)
      end
      if action == 'release' and redis.call('EXISTS', KEYS[1]) == 1 then
        -- A counter rebuilt from the database did not count this hold as
        -- available, so the units go back even without a record. A missing
        -- counter stays missing: "not loaded" must never become "N left".
        redis.call('HINCRBY', KEYS[1], 'stock', qty)
        restocked = true
      end
      redis.call('HSET', record, 'user', user, 'qty', qty, 'phase', 'done')
      redis.call('EXPIRE', record, ARGV[2])
      changed = changed + 1
    end
  end
end
if restocked then
  redis.call('PUBLISH', ARGV[3], ARGV[4])
end
return changed
