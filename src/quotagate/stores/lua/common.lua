-- quotagate: the window algorithm of quotagate/limiter.py, on one budget's Redis hash.
--   s = the scalars, packed in one field "t:hd:o:n:na:ol:he": units in the window, units held by
--       calls in flight, oldest / newest bucket index, newest bucket's amount, time of the oldest
--       bucket's latest unit (o..ol empty without buckets), earliest expiry of a hold (empty
--       without holds)
--   q = strictest quota, p = policies (JSON), m = meta (JSON, long values only), ld = last denial
--   buckets: a<i> / l<i> = amount / time of the latest unit of bucket i
--   holds:   r<reservation> = "<amount>:<expiry>"
-- A step reads a budget with one HMGET and writes it back with one HSET. Inside a script each
-- redis.call, and each string.format, costs more than the work it does (a microsecond or more
-- here), so the scalars travel as one field, formatted once.
local function num(v)
  if v and v ~= '' then return tonumber(v) end
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
      gone[#gone + 1] = 'a' .. s.o
      gone[#gone + 1] = 'l' .. s.o
    end
    s.o = s.o + 1
  end
  if not s.ol then s.o, s.n, s.na = nil, nil, nil end
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
        gone[#gone + 1] = all[i]
        if all[i] == 'r' .. s.res then s.r = nil end  -- already gone: not to be released twice
      elseif not earliest or expiry < earliest then
        earliest = expiry
      end
    end
  end
  if #gone > 0 then redis.call('HDEL', s.h, unpack(gone)) end
  s.he = earliest
  s.dirty = true
end

-- the budget's state, brought up to `now`; `reservation` also reads that call's hold, an
-- admission (no reservation) the time of the last denial
local function load(h, window, now, reservation)
  local v, s
  if reservation then
    v = redis.call('HMGET', h, 's', 'q', 'p', 'r' .. reservation)
    s = {r = v[4], res = reservation}
  else
    v = redis.call('HMGET', h, 's', 'q', 'p', 'ld')
    s = {ld = num(v[4]), res = ''}
  end
  s.h, s.t, s.hd, s.q, s.p, s.w, s.dirty, s.fresh = h, 0, 0, v[2], v[3], {}, false, not v[1]
  if v[1] then
    local t, hd, o, n, na, ol, he = string.match(v[1], '^([^:]*):([^:]*):([^:]*):([^:]*):([^:]*):([^:]*):(.*)$')
    s.t, s.hd, s.o, s.n, s.na, s.ol, s.he = tonumber(t), tonumber(hd), num(o), num(n), num(na), num(ol), num(he)
  end
  expire_buckets(s, window, now)
  expire_holds(s, now)
  return s
end

-- write the scalars and the pending fields back in one call
local function save(s)
  local f = s.w
  local he = s.he and string.format('%.3f', s.he) or ''
  f[#f + 1] = 's'
  if s.o then
    f[#f + 1] = string.format('%d:%d:%d:%d:%d:%.6f:%s', s.t, s.hd, s.o, s.n, s.na, s.ol, he)
  else
    f[#f + 1] = string.format('%d:%d:::::%s', s.t, s.hd, he)
  end
  redis.call('HSET', s.h, unpack(f))
end

-- `stamp` is `now` as written in l<i>, formatted once per script
local function add(s, g, now, stamp, amount)
  if amount <= 0 then return end
  local i = math.floor(now / g)
  local f = s.w
  if s.n and i < s.n then  -- a clock that went back: count it in its own bucket
    redis.call('HINCRBY', s.h, 'a' .. i, int(amount))
  else
    if s.n == i then
      s.na = (s.na or num(redis.call('HGET', s.h, 'a' .. i)) or 0) + amount
    else
      s.n, s.na = i, amount
    end
    f[#f + 1] = 'a' .. i
    f[#f + 1] = int(s.na)
  end
  f[#f + 1] = 'l' .. i
  f[#f + 1] = stamp
  if not s.o or i < s.o then s.o, s.ol = i, now elseif i == s.o then s.ol = now end
  if not s.n then s.n, s.na = i, amount end
  s.t = s.t + amount
  s.dirty = true
end

local function hold(s, reservation, amount, expiry)
  local f = s.w
  f[#f + 1] = 'r' .. reservation
  f[#f + 1] = string.format('%d:%.3f', amount, expiry)
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

-- append used, held, reset, and (when denied) seconds until the request would fit to `out`
local function view(out, s, window, now, quota, amount, holds, denied)
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
  local k = #out
  out[k + 1], out[k + 2], out[k + 3], out[k + 4] = s.t, s.hd, reset, retry
end
