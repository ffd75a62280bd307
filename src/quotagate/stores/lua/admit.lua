-- KEYS: [key record hash, if ARGV[4] == '1'], then for each budget: H, Z
-- ARGV: now ('' = server time), reservation, hold ttl, check key (0/1), budget count,
--       then per budget: window, granularity, quota, amount, holds (0/1), meta JSON, policies JSON
-- Returns {key active, allowed, now, then per budget: used, held, reset, retry}
local now = clock(ARGV[1])
local reservation, ttl = ARGV[2], tonumber(ARGV[3])
local first = 1
if ARGV[4] == '1' then
  local revoked = redis.call('HGET', KEYS[1], 'revoked_at')
  if revoked ~= '' then return {0, 0, tostring(now)} end
  first = 2
end
local count = tonumber(ARGV[5])
local budgets = {}
for b = 1, count do
  local at = 5 + (b - 1) * 7
  local x = {
    h = KEYS[first + (b - 1) * 2], z = KEYS[first + (b - 1) * 2 + 1],
    window = tonumber(ARGV[at + 1]), g = tonumber(ARGV[at + 2]), quota = tonumber(ARGV[at + 3]),
    amount = tonumber(ARGV[at + 4]), holds = ARGV[at + 5] == '1', meta = ARGV[at + 6], policies = ARGV[at + 7],
  }
  expire(x.h, x.z, x.window, now)
  local used = num(redis.call('HGET', x.h, 't')) or 0
  if x.holds then
    x.fits = used + (num(redis.call('HGET', x.h, 'hd')) or 0) < x.quota
  else
    x.fits = used + x.amount <= x.quota
  end
  budgets[b] = x
end
local allowed = true
for _, x in ipairs(budgets) do
  if not x.fits then allowed = false end
end
local out = {1, allowed and 1 or 0, tostring(now)}
for _, x in ipairs(budgets) do
  if allowed then
    if x.holds then
      redis.call('HSET', x.h, 'r' .. reservation, int(x.amount))
      redis.call('HINCRBY', x.h, 'hd', int(x.amount))
      redis.call('ZADD', x.z, now + ttl, reservation)
    else
      add(x.h, x.g, now, x.amount)
    end
  elseif not x.fits then
    redis.call('HSET', x.h, 'ld', string.format('%.3f', now))
  end
  redis.call('HSETNX', x.h, 'm', x.meta)
  redis.call('HSET', x.h, 'q', int(x.quota), 'p', x.policies)
  local life = math.ceil((x.window + (x.holds and ttl or 0)) * 1000)
  redis.call('PEXPIRE', x.h, life)
  redis.call('PEXPIRE', x.z, life)
  for _, v in ipairs(view(x.h, x.window, now, x.quota, x.amount, x.holds, not allowed)) do
    table.insert(out, v)
  end
end
return out
