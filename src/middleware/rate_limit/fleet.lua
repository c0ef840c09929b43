-- A batch of calls against the fleet-wide budgets, in order, as GCRA
-- cells: for each call the user's cell and the global one, both spent or
-- neither. A cell holds its theoretical arrival time (TAT) in microseconds
-- of Redis's own clock since a fixed epoch (so replicas' clocks never
-- matter and a double keeps sub-microsecond steps), and expires when its
-- budget is full again. One script per batch: the clock, the global cell
-- and the script call are paid once for all its calls.
--
-- Once per batch however often it is sent: a cluster client sends a
-- command again after a lost connection, and a batch run twice would spend
-- its callers' budget twice, so each batch carries an id of its own and its
-- first run leaves its answers under it for the later ones.
--
-- KEYS[1] the global cell, KEYS[2] the batch's mark, KEYS[3..] each call's
-- user cell
-- ARGV[1] the user's emission interval (us), ARGV[2] the user's burst,
-- ARGV[3] the global emission interval (us), ARGV[4] the global burst,
-- ARGV[5] how long the mark lasts (ms), 0 for none (one server: its
-- client never resends)
-- Returns per call two numbers: {0, 0} admitted, {1, wait_us} over the
-- user's budget, {2, wait_us} over the global one.
local marked = ARGV[5] ~= '0'
if marked then
  local mark = redis.call('GET', KEYS[2])
  if mark then
    return cjson.decode(mark)
  end
end
local time = redis.call('TIME')
local now = (tonumber(time[1]) - 1700000000) * 1000000 + tonumber(time[2])

local user_interval, user_burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local global_interval, global_burst = tonumber(ARGV[3]), tonumber(ARGV[4])

-- A cell's TAT, never before now. (The cells' names carry the rates, so
-- a cell is only ever read at the rates it was written with.)
local function tat_of(value)
  local tat = tonumber(value) or now
  return math.max(tat, now)
end

local function lasts_ms(tat)
  return math.max(math.ceil((tat - now) / 1000), 1)
end

local global_tat = tat_of(redis.call('GET', KEYS[1]))
local global_spent = false
local out = {}
for i = 3, #KEYS do
  local user_tat = tat_of(redis.call('GET', KEYS[i]))
  local user_early = user_tat - now - user_interval * (user_burst - 1)
  local global_early = global_tat - now - global_interval * (global_burst - 1)
  if user_early > 0 then
    out[#out + 1] = 1
    out[#out + 1] = math.ceil(user_early)
  elseif global_early > 0 then
    out[#out + 1] = 2
    out[#out + 1] = math.ceil(global_early)
  else
    user_tat = user_tat + user_interval
    global_tat = global_tat + global_interval
    global_spent = true
    -- %.17g: tostring keeps only 14 significant digits.
    redis.call('SET', KEYS[i], string.format('%.17g', user_tat), 'PX', lasts_ms(user_tat))
    out[#out + 1] = 0
    out[#out + 1] = 0
  end
end
if global_spent then
  redis.call('SET', KEYS[1], string.format('%.17g', global_tat), 'PX', lasts_ms(global_tat))
end
if marked then
  redis.call('SET', KEYS[2], cjson.encode(out), 'PX', ARGV[5])
end
return out
