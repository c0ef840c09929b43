-- Stores the answer if the claim is still this call's (it may have lapsed
-- and been taken by a retry, whose answer then stands).
-- KEYS[1]: the record; ARGV[1]: token, ARGV[2]: answer, ARGV[3]: ttl (ms)
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'answer', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
