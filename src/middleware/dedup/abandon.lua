-- Drops the claim if it is still this call's, so a retry runs.
-- KEYS[1]: the record (a claim is 'c' .. 64-char fingerprint .. token)
-- ARGV[1]: token
local record = redis.call('GET', KEYS[1])
if not record or #record ~= 65 + #ARGV[1] or string.sub(record, 1, 1) ~= 'c'
    or string.sub(record, 66) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
return 1
