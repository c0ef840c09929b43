-- One call against the fleet-wide budgets, as GCRA cells: the user's and
-- the global one, both spent or neither. A cell holds its theoretical
-- arrival time (TAT) in microseconds of Redis's own clock, so replicas'
-- clocks never matter, and expires when its budget is full again.
--
-- KEYS[1] the user's cell, KEYS[2] the global cell
-- ARGV[1] the user's emission interval (us), ARGV[2] the user's burst,
-- ARGV[3] the global emission interval (us), ARGV[4] the global burst
-- Returns {0, 0} admitted, {1, wait_us} over the user's budget,
-- {2, wait_us} over the global one.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])

local function tat_of(key, interval, burst)
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then
    tat = now
  end
  local early = tat - now - interval * (burst - 1)
  return tat, early
end

local user_interval, user_burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local global_interval, global_burst = tonumber(ARGV[3]), tonumber(ARGV[4])

local user_tat, user_early = tat_of(KEYS[1], user_interval, user_burst)
if user_early > 0 then
  return {1, math.ceil(user_early)}
end
local global_tat, global_early = tat_of(KEYS[2], global_interval, global_burst)
if global_early > 0 then
  return {2, math.ceil(global_early)}
end

-- %d: tostring would round a 16-digit number to 14 significant digits.
local function spend(key, tat, interval)
  local next_tat = tat + interval
  local lasts_ms = math.ceil((next_tat - now) / 1000)
  redis.call('SET', key, string.format('%d', math.ceil(next_tat)), 'PX', math.max(lasts_ms, 1))
end
spend(KEYS[1], user_tat, user_interval)
spend(KEYS[2], global_tat, global_interval)
return {0, 0}
