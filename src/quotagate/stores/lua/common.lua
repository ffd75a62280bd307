-- quotagate: the window algorithm of quotagate/limiter.py, on one budget's Redis hash.
--   scalars: t = units in the window, hd = units held by calls in flight,
--            o / n = oldest / newest bucket index, ol = time of the oldest bucket's latest unit,
--            na = newest bucket's amount, he = earliest expiry of a hold,
--            q = strictest quota, p = policies (JSON), m = meta (JSON, long values only), ld = last denial
--   buckets: a<i> / l<i> = amount / time of the latest unit of bucket i
--   holds:   r<reservation> = "<amount>:<expiry>"
-- A step reads the scalars with one HMGET and writes them back with one HSET: redis.call costs
-- more than the commands themselves here, so a budget costs three or four calls per step.
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

local function hold_parts(value)
  local amount, expiry = string.match(value, '^(%d+):(.+)$')
  return tonumber(amount), tonumber(expiry)
end

-- drop the buckets whose latest unit is `window` old, oldest first
local function expire_buckets(s, window, now)
  local horizon = now - window
  if not s.o or (s.ol and s.ol > horizon) then return end
  local gone = {}
  s.ol = nil
  while s.o <= s.n do
    local b = redis.call('HMGET', s.h, 'l' .. s.o, 'a' .. s.o)
    local latest = num(b[1])
    if latest then
      if latest > horizon then s.ol = latest break end
      s.t = s.t - (num(b[2]) or 0)
      table.insert(gone, 'a' .. s.o) table.insert(gone, 'l' .. s.o)
    end
    s.o = s.o + 1
  end
  if not s.ol then
    s.o, s.n, s.na = nil, nil, nil
    table.insert(gone, 'o') table.insert(gone, 'n') table.insert(gone, 'ol') table.insert(gone, 'na')
  end
  if #gone > 0 then redis.call('HDEL', s.h, unpack(gone)) end
  s.dirty = true
end

-- drop the holds of calls that can no longer end (their gateway died): rare, so it may scan
local function expire_holds(s, now)
  if not s.he or s.he > now then return end
  local all = redis.call('HGETALL', s.h)
  local gone, earliest = {}, nil
  for i = 1, #all, 2 do
    if string.sub(all[i], 1, 1) == 'r' then
      local amount, expiry = hold_parts(all[i + 1])
      if expiry <= now then
        s.hd = s.hd - amount
        table.insert(gone, all[i])
        if all[i] == 'r' .. s.res then s.r = nil end  -- already gone: not to be released twice
      elseif not earliest or expiry < earliest then
        earliest = expiry
      end
    end
  end
  if #gone > 0 then redis.call('HDEL', s.h, unpack(gone)) end
  s.he = earliest
  if not earliest then redis.call('HDEL', s.h, 'he') end
  s.dirty = true
end

-- the budget's state, brought up to `now`; `reservation` also reads that call's hold
local function load(h, window, now, reservation)
  local v = redis.call('HMGET', h, 'o', 'n', 't', 'hd', 'ol', 'na', 'he', 'q', 'p', 'r' .. (reservation or ''))
  local s = {h = h, o = num(v[1]), n = num(v[2]), t = num(v[3]) or 0, hd = num(v[4]) or 0, ol = num(v[5]),
             na = num(v[6]), he = num(v[7]), q = v[8], p = v[9], r = v[10], res = reservation or '', w = {},
             dirty = false}
  expire_buckets(s, window, now)
  expire_holds(s, now)
  return s
end

-- write the scalars and the pending fields back in one call
local function save(s)
  local f = s.w
  table.insert(f, 't') table.insert(f, int(s.t))
  table.insert(f, 'hd') table.insert(f, int(s.hd))
  if s.o then
    table.insert(f, 'o') table.insert(f, int(s.o))
    table.insert(f, 'n') table.insert(f, int(s.n))
    table.insert(f, 'ol') table.insert(f, string.format('%.6f', s.ol))
    table.insert(f, 'na') table.insert(f, int(s.na))
  end
  if s.he then table.insert(f, 'he') table.insert(f, string.format('%.3f', s.he)) end
  redis.call('HSET', s.h, unpack(f))
end

local function add(s, g, now, amount)
  if amount <= 0 then return end
  local i = math.floor(now / g)
  if s.n and i < s.n then  -- a clock that went back: count it in its own bucket
    redis.call('HINCRBY', s.h, 'a' .. i, int(amount))
  else
    if s.n == i then
      s.na = (s.na or num(redis.call('HGET', s.h, 'a' .. i)) or 0) + amount
    else
      s.n, s.na = i, amount
    end
    table.insert(s.w, 'a' .. i) table.insert(s.w, int(s.na))
  end
  table.insert(s.w, 'l' .. i) table.insert(s.w, string.format('%.6f', now))
  if not s.o or i < s.o then s.o, s.ol = i, now elseif i == s.o then s.ol = now end
  if not s.n then s.n, s.na = i, amount end
  s.t = s.t + amount
  s.dirty = true
end

local function hold(s, reservation, amount, expiry)
  table.insert(s.w, 'r' .. reservation) table.insert(s.w, int(amount) .. ':' .. string.format('%.3f', expiry))
  s.hd = s.hd + amount
  if not s.he or expiry < s.he then s.he = expiry end
  s.dirty = true
end

local function release_hold(s, reservation)
  if s.r then
    s.hd = s.hd - hold_parts(s.r)
    redis.call('HDEL', s.h, 'r' .. reservation)
    s.r = nil
    s.dirty = true
  end
end

-- used, held, reset, and (when denied) seconds until the request would fit
local function view(s, window, now, quota, amount, holds, denied)
  local reset, retry = 0, 0
  if s.ol then reset = math.max(1, math.ceil(s.ol + window - now)) elseif s.hd > 0 then reset = 1 end
  if denied then
    local excess
    if holds then excess = s.t + s.hd - quota + 1 else excess = s.t + amount - quota end
    if excess > 0 then
      retry = 1
      if s.o then
        for i = s.o, s.n do
          local b = redis.call('HMGET', s.h, 'a' .. i, 'l' .. i)
          local a = num(b[1])
          if a and a > 0 then
            excess = excess - a
            if excess <= 0 then retry = math.max(1, math.ceil(num(b[2]) + window - now)) break end
          end
        end
      end
    end
  end
  return {s.t, s.hd, reset, retry}
end
