-- Claims an idempotency key, or reports what holds it.
-- KEYS[1]: the record (hash: fp = request fingerprint, token = the claiming
--          call, answer = the stored answer once there is one)
-- ARGV[1]: fingerprint, ARGV[2]: token, ARGV[3]: claim lifetime (ms)
-- Returns {"run"} | {"done", answer} | {"inflight"} | {"mismatch"}.
local fp = redis.call('HGET', KEYS[1], 'fp')
if not fp then
  redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'token', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {'run'}
end
if fp ~= ARGV[1] then
  return {'mismatch'}
end
local answer = redis.call('HGET', KEYS[1], 'answer')
if answer then
  return {'done', answer}
end
return {'inflight'}
