-- Count one admission's units against its user's cap across a sale, or
-- refuse them. Runs after reserve.lua admitted the units in the SKU's own
-- slot (a sale's keys sit in a slot of their own on a cluster); a refusal
-- gives the admission back. Once per reservation id however often it
-- runs: the admission's mark holds its units while counted, and `done`
-- once refused or ended (sale_give.lua), so a resend, or a take that
-- lands after a give overtook it, counts nothing.
-- KEYS[1] sale users hash {user -> live units}, KEYS[2] the admission's mark.
-- ARGV: user, qty, the sale's cap, seconds the mark lasts.
-- Returns {1} counted, {0, live units} refused.
local live = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local mark = redis.call('GET', KEYS[2])
if mark == 'done' then
  return {0, live}
elseif mark then
  return {1}
end
if live + tonumber(ARGV[2]) > tonumber(ARGV[3]) then
  redis.call('SET', KEYS[2], 'done', 'EX', ARGV[4])
  return {0, live}
end
redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[4])
return {1}
