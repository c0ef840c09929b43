-- Settle admitted reservations of one SKU after the database decided, or
-- give their units back. Exactly once per reservation id however often it
-- runs: a record's phase moves inflight -> committed -> done, never back.
-- Versions (GateEntry::version in src/gate/mod.rs): the inv hash's `ver` is
-- the row version of the database read the counter was last rebuilt from,
-- `seen` the newest version of any database change settled since; an entry
-- that mirrors a database change carries the version that change wrote.
-- KEYS[1] inv hash, KEYS[2] users hash, KEYS[3] pending zset,
-- KEYS[3+i] the record of reservation i (all under the SKU's hash tag).
-- ARGV: action (committed | rejected | release | charged), record ttl seconds,
-- then user, qty, id, version ('' for none) for each reservation.
-- Returns {how many records changed, 1 when units came back (the caller
-- announces a restock) else 0, then sale, id, user, qty for each
-- reservation refused or released here that may count against a capped
-- sale (the caller ends its count there with sale_give.lua, once per id):
-- one that ended now or had ended before (a settlement sent again after
-- its give failed), by the sale its record names, and a database release
-- whose record is gone, by the SKU's sale now}.
local action = ARGV[1]
local base = tonumber(redis.call('HGET', KEYS[1], 'ver') or '-1')
local seen = tonumber(redis.call('HGET', KEYS[1], 'seen') or '-1')
local give = 0
local take = 0
local changed = 0
local ended = {}
local function ends(sale, id, user, qty)
  if sale then
    ended[#ended + 1] = sale
    ended[#ended + 1] = id
    ended[#ended + 1] = user
    ended[#ended + 1] = qty
  end
end
for i = 1, (#KEYS - 3) do
  local record = KEYS[3 + i]
  local user = ARGV[4 * i - 1]
  local qty = tonumber(ARGV[4 * i])
  local id = ARGV[4 * i + 1]
  local version = tonumber(ARGV[4 * i + 2])
  if version and version > seen then
    seen = version
  end
  local phase = redis.call('HGET', record, 'phase')
  if action == 'charged' then
    -- The database took stock for a reservation this gate did not admit
    -- (redriven from the dead-letter queue): charge it once and keep it
    -- as committed, so its release gives the units back. A release of it
    -- that got here first (marked on the record) leaves nothing to charge.
    local released = tonumber(redis.call('HGET', record, 'released') or '-1')
    if phase ~= 'committed' and not (version and released >= version) then
      if phase == 'inflight' then
        redis.call('HINCRBY', KEYS[1], 'inflight', -qty)
        redis.call('ZREM', KEYS[3], id)
        if version and version <= base then
          give = give + qty
        end
      else
        redis.call('HINCRBY', KEYS[2], user, qty)
        if not (version and version <= base) then
          take = take + qty
        end
      end
      redis.call('HSET', record, 'user', user, 'qty', qty, 'phase', 'committed')
      redis.call('EXPIRE', record, ARGV[2])
      changed = changed + 1
    end
  elseif phase == 'done' then
    if action ~= 'committed' then
      ends(redis.call('HGET', record, 'sale'), id, user, qty)
    end
    -- A database release of a record already done: remembered, in case a
    -- charge for the same reservation is still on its way.
    if action == 'release' and version then
      local released = tonumber(redis.call('HGET', record, 'released') or '-1')
      if version > released then
        redis.call('HSET', record, 'released', version)
      end
    end
  else
    if phase == 'inflight' then
      redis.call('HINCRBY', KEYS[1], 'inflight', -qty)
      redis.call('ZREM', KEYS[3], id)
    end
    if action == 'committed' then
      if phase == 'inflight' then
        redis.call('HSET', record, 'phase', 'committed')
        -- The rebuild's read already had this commit and also subtracted
        -- it as in flight: once too often.
        if version and version <= base then
          give = give + qty
        end
        changed = changed + 1
      end
    elseif phase or (action == 'release' and version) then
      -- Without a record, only a database release has a user's units to
      -- free (its record went with a flush); a rejection or a gate-only
      -- release of an admission that never ran has nothing.
      local live = redis.call('HINCRBY', KEYS[2], user, -qty)
      if live <= 0 then
        redis.call('HDEL', KEYS[2], user)
      end
      if phase then
        ends(redis.call('HGET', record, 'sale'), id, user, qty)
      else
        ends(redis.call('HGET', KEYS[1], 'sale'), id, user, qty)
      end
      if action == 'release' then
        if version then
          -- A database restock: back unless the rebuild's read had it
          -- (even without a record, which a rebuild does not keep).
          if version > base then
            give = give + qty
          end
        elseif phase then
          -- Never reached the database: the admission's units come back. No
          -- record means a rebuild since, which never subtracted them.
          give = give + qty
        end
      end
      redis.call('HSET', record, 'user', user, 'qty', qty, 'phase', 'done')
      if action == 'release' and version then
        redis.call('HSET', record, 'released', version)
      end
      redis.call('EXPIRE', record, ARGV[2])
      changed = changed + 1
    end
  end
end
-- A missing counter stays missing: "not loaded" must never become "N left".
local restocked = 0
if redis.call('EXISTS', KEYS[1]) == 1 then
  if seen >= 0 then
    redis.call('HSET', KEYS[1], 'seen', seen)
  end
  if give > 0 then
    redis.call('HINCRBY', KEYS[1], 'stock', give)
    restocked = 1
  end
  if take > 0 then
    redis.call('HINCRBY', KEYS[1], 'stock', -take)
  end
end
local reply = {changed, restocked}
for _, part in ipairs(ended) do
  reply[#reply + 1] = part
end
return reply
