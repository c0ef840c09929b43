-- Drops the claim if it is still this call's, so a retry runs.
-- KEYS[1]: the record; ARGV[1]: token
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
return 1
