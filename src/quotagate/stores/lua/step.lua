-- One step of a batch of admissions and settlements, one after the other, atomically.
-- ARGV: now ('' = server time), operation count, then per operation:
--   an admission: "A <reservation> <hold ttl> <check key 0/1> <budget count>",
--       then per budget "<window>:<granularity>:<quota>:<amount>:<holds 0/1>:<meta 0/1>:<policies JSON>",
--       followed by its meta JSON when it has one (a budget id that holds only a hash of its value);
--       KEYS: [the key record's hash, if check key], then each budget's hash.
--       Returns {key active, allowed, now, then per budget: used, held, reset, retry}.
--   a settlement: "S <reservation> <budget count>",
--       then per budget "<window>:<granularity>:<quota>:<amount>:<holds 0/1>:<mode>:<taken at>";
--       mode 'charge' replaces the reservation's hold by `amount` spent now, 'refund' undoes an
--       admission (its take or its hold) that another Cluster slot refused; KEYS: each budget's hash.
--       Returns {now, then per budget: used, held, reset, retry}.
-- (Few arguments, each one string: packing arguments is the client's main cost per call.)
local now = clock(ARGV[1])
local arg, key = 3, 1
local results = {}

local function admit_one()
  local reservation, ttl, check, count = string.match(ARGV[arg], '^A (%S+) (%S+) (%d) (%d+)$')
  ttl, check, count = tonumber(ttl), check == '1', tonumber(count)
  arg = arg + 1
  local active = true
  if check then
    active = redis.call('HGET', KEYS[key], 'revoked_at') == ''
    key = key + 1
  end
  local budgets = {}
  for b = 1, count do
    local window, g, quota, amount, holds, meta, policies =
      string.match(ARGV[arg], '^(%d+):(%d+):(%d+):(%d+):(%d):(%d):(.*)$')
    local x = {h = KEYS[key], window = tonumber(window), g = tonumber(g), quota = tonumber(quota),
               amount = tonumber(amount), holds = holds == '1', policies = policies, meta = ''}
    key, arg = key + 1, arg + 1
    if meta == '1' then x.meta, arg = ARGV[arg], arg + 1 end
    budgets[b] = x
  end
  if not active then return {0, 0, tostring(now)} end
  local allowed = true
  for _, x in ipairs(budgets) do
    x.s = load(x.h, x.window, now, nil)
    if x.holds then x.fits = x.s.t + x.s.hd < x.quota else x.fits = x.s.t + x.amount <= x.quota end
    if not x.fits then allowed = false end
  end
  local out = {1, allowed and 1 or 0, tostring(now)}
  for _, x in ipairs(budgets) do
    local s = x.s
    if allowed then
      if x.holds then hold(s, reservation, x.amount, now + ttl) else add(s, x.g, now, x.amount) end
    elseif not x.fits then
      table.insert(s.w, 'ld') table.insert(s.w, string.format('%.3f', now))
    end
    if s.q ~= int(x.quota) or s.p ~= x.policies then
      table.insert(s.w, 'q') table.insert(s.w, int(x.quota))
      table.insert(s.w, 'p') table.insert(s.w, x.policies)
    end
    if x.meta ~= '' then table.insert(s.w, 'm') table.insert(s.w, x.meta) end
    if s.dirty or #s.w > 0 then save(s) end
    redis.call('PEXPIRE', x.h, math.ceil((x.window + (x.holds and ttl or 0)) * 1000))
    for _, v in ipairs(view(s, x.window, now, x.quota, x.amount, x.holds, not allowed)) do
      table.insert(out, v)
    end
  end
  return out
end

local function settle_one()
  local reservation, count = string.match(ARGV[arg], '^S (%S+) (%d+)$')
  count = tonumber(count)
  arg = arg + 1
  local out = {tostring(now)}
  for b = 1, count do
    local h = KEYS[key]
    local window, g, quota, amount, holds, mode, taken =
      string.match(ARGV[arg], '^(%d+):(%d+):(%d+):(%d+):(%d):(%a+):(.+)$')
    window, g, quota, amount, holds = tonumber(window), tonumber(g), tonumber(quota), tonumber(amount), holds == '1'
    key, arg = key + 1, arg + 1
    local s = load(h, window, now, reservation)
    release_hold(s, reservation)
    if mode == 'charge' then
      add(s, g, now, amount)
    elseif not holds then
      local i = math.floor(tonumber(taken) / g)
      local a = num(redis.call('HGET', h, 'a' .. i))
      if a then
        local back = math.min(a, amount)
        s.t = s.t - back
        if s.n == i then s.na = s.na - back end
        redis.call('HINCRBY', h, 'a' .. i, int(-back))
        s.dirty = true
      end
    end
    if s.dirty then save(s) end
    for _, v in ipairs(view(s, window, now, quota, 0, holds, false)) do
      table.insert(out, v)
    end
  end
  return out
end

for r = 1, tonumber(ARGV[2]) do
  if string.sub(ARGV[arg], 1, 1) == 'A' then results[r] = admit_one() else results[r] = settle_one() end
end
return results
