-- quotagate: the window algorithm of quotagate/limiter.py, on one budget's Redis keys.
-- A budget is a hash H and a sorted set Z sharing one hash tag:
--   H: t = units in the window, hd = units held by calls in flight,
--      o / n = oldest / newest bucket index, a<i> / l<i> = amount / time of latest unit of bucket i,
--      r<reservation> = a hold's amount, m = meta (JSON), q = strictest quota, p = policies, ld = last denial
--   Z: reservation -> expiry time of its hold
local function num(v)
  if v then return tonumber(v) end
  return nil
end

local function int(x)
  return string.format('%d', x)
end

local function clock(arg)
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- drop buckets whose latest unit is w seconds old, and holds past their expiry
local function expire(h, z, window, now)
  local o = num(redis.call('HGET', h, 'o'))
  if o then
    local n = num(redis.call('HGET', h, 'n'))
    local horizon = now - window
    while o <= n do
      local latest = num(redis.call('HGET', h, 'l' .. o))
      if latest then
        if latest > horizon then break end
        local a = num(redis.call('HGET', h, 'a' .. o)) or 0
        redis.call('HINCRBY', h, 't', int(-a))
        redis.call('HDEL', h, 'a' .. o, 'l' .. o)
      end
      o = o + 1
    end
    if o > n then redis.call('HDEL', h, 'o', 'n') else redis.call('HSET', h, 'o', o) end
  end
  local gone = redis.call('ZRANGEBYSCORE', z, '-inf', now)
  for _, res in ipairs(gone) do
    local a = num(redis.call('HGET', h, 'r' .. res))
    if a then
      redis.call('HINCRBY', h, 'hd', int(-a))
      redis.call('HDEL', h, 'r' .. res)
    end
  end
  if #gone > 0 then redis.call('ZREMRANGEBYSCORE', z, '-inf', now) end
end

local function add(h, g, now, amount)
  if amount <= 0 then return end
  local i = math.floor(now / g)
  redis.call('HINCRBY', h, 'a' .. i, int(amount))
  local latest = num(redis.call('HGET', h, 'l' .. i))
  if not latest or latest < now then redis.call('HSET', h, 'l' .. i, string.format('%.6f', now)) end
  redis.call('HINCRBY', h, 't', int(amount))
  local o = num(redis.call('HGET', h, 'o'))
  if not o or i < o then redis.call('HSET', h, 'o', i) end
  local n = num(redis.call('HGET', h, 'n'))
  if not n or i > n then redis.call('HSET', h, 'n', i) end
end

local function release_hold(h, z, res)
  local a = num(redis.call('HGET', h, 'r' .. res))
  if a then
    redis.call('HINCRBY', h, 'hd', int(-a))
    redis.call('HDEL', h, 'r' .. res)
    redis.call('ZREM', z, res)
  end
end

-- used, held, reset, and (when denied) seconds until the request would fit
local function view(h, window, now, quota, amount, holds, denied)
  local used = num(redis.call('HGET', h, 't')) or 0
  local held = num(redis.call('HGET', h, 'hd')) or 0
  local o, n = num(redis.call('HGET', h, 'o')), num(redis.call('HGET', h, 'n'))
  local reset, retry = 0, 0
  local excess
  if holds then excess = used + held - quota + 1 else excess = used + amount - quota end
  if o then
    for i = o, n do
      local a = num(redis.call('HGET', h, 'a' .. i))
      if a and a > 0 then
        local wait = math.max(1, math.ceil(num(redis.call('HGET', h, 'l' .. i)) + window - now))
        if reset == 0 then reset = wait end
        if not denied or excess <= 0 then break end
        excess = excess - a
        if excess <= 0 then retry = wait break end
      end
    end
  end
  if reset == 0 and held > 0 then reset = 1 end
  if denied and excess > 0 and retry == 0 then retry = 1 end
  return {used, held, reset, retry}
end
