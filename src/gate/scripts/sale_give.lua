-- Stop counting ended reservations against their users' caps across a
-- sale, once per reservation id (the mark becomes `done`). A mark holding
-- units gives those back. A missing mark (expired with its record, or a
-- take still on its way) gives the reservation's units: a count can then
-- fall short of the database's, which only leaves the decision to the
-- database, where counting on would refuse what the database allows.
-- KEYS[1] sale users hash, KEYS[1+i] the mark of reservation i.
-- ARGV: seconds a mark lasts, then user and qty of each reservation.
for i = 2, #KEYS do
  local user = ARGV[2 * i - 2]
  local mark = redis.call('GET', KEYS[i])
  if mark ~= 'done' then
    local qty = tonumber(mark or ARGV[2 * i - 1])
    local live = redis.call('HINCRBY', KEYS[1], user, -qty)
    if live <= 0 then
      redis.call('HDEL', KEYS[1], user)
    end
    redis.call('SET', KEYS[i], 'done', 'EX', ARGV[1])
  end
end
return #KEYS - 1
