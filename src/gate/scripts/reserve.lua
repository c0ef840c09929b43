-- Admit QTY units of one SKU for one user, atomically.
-- KEYS[1] inv hash {stock, cap, inflight, opens, closes, sale, scap, draw}
-- KEYS[2] users hash {user -> live units}
-- KEYS[3] reservation record hash          KEYS[4] pending zset {id -> admitted ms}
-- ARGV: user, qty, record ttl seconds, now ms, reservation id, the call's
-- decision time in ms (checked against the sale window), the SKU's key
-- stem (`P:{SKU}:`), a fresh seed (taken by a draw's first entrant), the
-- most entrants a draw takes, seconds a draw is kept, the most entrants
-- one run decides.
-- Returns {0} no counter (not loaded or unknown SKU), {1, remaining} admitted,
-- {2, remaining} sold out, {3, live, cap} over the per-user limit,
-- {4, opens ms} before the sale window, {5, closes ms} after it, {6, draw
-- closes ms} entered in the SKU's draw (ask again from then on). An
-- admission in a SKU of a capped sale adds the sale and its cap:
-- {1, remaining, sale, cap}; the caller then counts it against the sale
-- (sale_take.lua), whose keys may sit in another slot.
-- The decision table is the same as src/gate/embedded.rs.
--
-- A draw (the fair opening, src/gate/draw.rs) lives under
-- `P:{SKU}:draw:OPENS`: a hash {seed, n (entrants), overflow, opens, ends,
-- drawn (ms it started), stock (units it could give), at (entrants
-- decided so far), admitted, done (ms it finished)}, `:who` {id ->
-- "arrival qty user"}, `:users` {user -> id: one entry per user},
-- `:order` a sorted set of ids by draw key, `:out` {id -> 1, 2 or 3, what
-- the draw decided, or 4: withdrawn, its id decided before the draw came
-- to it}. The draw runs here, in the calls decided at or after its close,
-- a chunk of entrants per run, until it is done; until then those calls
-- are told to come back ({6, close}). It writes its winners' reservation
-- records: keys this call did not declare, all in the SKU's slot.
local inv = redis.call('HMGET', KEYS[1], 'stock', 'cap', 'opens', 'closes', 'sale', 'scap', 'draw')
if not inv[1] then
  return {0}
end
local at = tonumber(ARGV[6])
local cap = tonumber(inv[2] or '0')
local dkey, ends
if inv[3] and inv[7] and tonumber(inv[7]) > 0 then
  dkey = ARGV[7] .. 'draw:' .. inv[3]
  ends = tonumber(inv[3]) + tonumber(inv[7])
end

-- Takes QTY units for USER under RECORD if the stock and the user's limit
-- allow; STOCK is the counter as it stands.
local function admit(id, user, qty, record, stock)
  if stock < qty then
    return {2, math.max(stock, 0)}
  end
  local live = tonumber(redis.call('HGET', KEYS[2], user) or '0')
  if cap > 0 and live + qty > cap then
    return {3, live, cap}
  end
  redis.call('HINCRBY', KEYS[1], 'stock', -qty)
  redis.call('HINCRBY', KEYS[1], 'inflight', qty)
  redis.call('HINCRBY', KEYS[2], user, qty)
  redis.call('HSET', record, 'user', user, 'qty', qty, 'phase', 'inflight')
  redis.call('EXPIRE', record, ARGV[3])
  redis.call('ZADD', KEYS[4], ARGV[4], id)
  if inv[5] and inv[6] then
    redis.call('HSET', record, 'sale', inv[5])
    return {1, stock - qty, inv[5], tonumber(inv[6])}
  end
  return {1, stock - qty}
end

-- The draw closes before anything else is decided: its entrants go
-- before every later call, which waits until it is done. Once started it
-- goes on in every call for the SKU, also one decided just before the
-- close that reaches Redis late (a lagging replica), which would
-- otherwise take stock while entrants are still undecided.
if dkey and redis.call('EXISTS', dkey) == 1 and not redis.call('HGET', dkey, 'done')
    and (at >= ends or redis.call('HEXISTS', dkey, 'drawn') == 1) then
  local stock = tonumber(redis.call('HGET', KEYS[1], 'stock'))
  local who, out = dkey .. ':who', dkey .. ':out'
  if redis.call('HSETNX', dkey, 'drawn', ARGV[4]) == 1 then
    redis.call('HSET', dkey, 'stock', stock)
  end
  local from = tonumber(redis.call('HGET', dkey, 'at') or '0')
  local ids = {}
  if stock > 0 then
    ids = redis.call('ZRANGE', dkey .. ':order', from, from + tonumber(ARGV[11]) - 1)
  end
  local admitted = 0
  for _, id in ipairs(ids) do
    if stock <= 0 then
      break
    end
    local record = ARGV[7] .. 'res:' .. id
    local entry = redis.call('HGET', who, id)
    if entry and redis.call('EXISTS', record) == 0 then
      local _, qty, user = string.match(entry, '^(%d+) (%d+) (.*)$')
      local got = admit(id, user, tonumber(qty), record, stock)
      redis.call('HSET', out, id, got[1])
      if got[1] == 1 then
        stock = got[2]
        admitted = admitted + 1
      end
    else
      -- Defensive: an id decided before the draw came to it is skipped.
      redis.call('HSET', out, id, 4)
    end
    from = from + 1
  end
  redis.call('HINCRBY', dkey, 'admitted', admitted)
  redis.call('HSET', dkey, 'at', from)
  -- Expiring from its first chunk, so a draw left unfinished goes too.
  redis.call('EXPIRE', out, ARGV[10])
  if stock <= 0 or #ids < tonumber(ARGV[11]) then
    redis.call('HSET', dkey, 'done', ARGV[4])
    for _, key in ipairs({dkey, who, out, dkey .. ':order', dkey .. ':users'}) do
      redis.call('EXPIRE', key, ARGV[10])
    end
  else
    return {6, ends}
  end
  inv[1] = tostring(stock)
end

-- An id is admitted once: the same run sent again (a cluster client resends
-- after a lost connection), or an entrant asking after its draw, gets the
-- first answer, not a second admission.
if redis.call('EXISTS', KEYS[3]) == 1 then
  local stock = math.max(tonumber(inv[1]), 0)
  local sale = redis.call('HGET', KEYS[3], 'sale')
  if sale and inv[6] then
    return {1, stock, sale, tonumber(inv[6])}
  end
  return {1, stock}
end
-- An entrant the draw did not admit.
if dkey and redis.call('HEXISTS', dkey, 'done') == 1
    and redis.call('HEXISTS', dkey .. ':who', ARGV[5]) == 1 then
  if redis.call('HGET', dkey .. ':out', ARGV[5]) == '3' then
    return {3, tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0'), cap}
  end
  return {2, math.max(tonumber(inv[1]), 0)}
end
if inv[3] and at < tonumber(inv[3]) then
  return {4, tonumber(inv[3])}
end
if inv[4] and at >= tonumber(inv[4]) then
  return {5, tonumber(inv[4])}
end
-- Entered while the draw is open; once it has run (a replica whose clock
-- is ahead ran it), a call is decided as any later one.
if dkey and at < ends and redis.call('HEXISTS', dkey, 'drawn') == 0 then
  local who = dkey .. ':who'
  if redis.call('HEXISTS', who, ARGV[5]) == 0 then
    local n = tonumber(redis.call('HGET', dkey, 'n') or '0')
    if n >= tonumber(ARGV[9]) then
      redis.call('HINCRBY', dkey, 'overflow', 1)
    elseif redis.call('HSETNX', dkey .. ':users', ARGV[1], ARGV[5]) == 1 then
      if n == 0 then
        redis.call('HSETNX', dkey, 'seed', ARGV[8])
        redis.call('HSET', dkey, 'opens', inv[3], 'ends', ends)
      end
      n = redis.call('HINCRBY', dkey, 'n', 1)
      redis.call('HSET', who, ARGV[5], n .. ' ' .. ARGV[2] .. ' ' .. ARGV[1])
      local seed = redis.call('HGET', dkey, 'seed')
      local key = tonumber(string.sub(redis.sha1hex(seed .. ':' .. ARGV[5]), 1, 13), 16)
      redis.call('ZADD', dkey .. ':order', key, ARGV[5])
      if n == 1 then
        for _, k in ipairs({dkey, who, dkey .. ':order', dkey .. ':users'}) do
          redis.call('EXPIRE', k, ARGV[10])
        end
      end
    end
  end
  return {6, ends}
end
return admit(ARGV[5], ARGV[1], tonumber(ARGV[2]), KEYS[3], tonumber(inv[1]))
