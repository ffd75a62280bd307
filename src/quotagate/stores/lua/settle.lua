-- Settle a batch of calls, one after the other, in this one atomic step.
-- ARGV: now ('' = server time), call count, then per call: "<reservation> <budget count>",
--       then per budget: "<window>:<granularity>:<quota>:<amount>:<holds 0/1>:<mode>:<taken at>"
-- KEYS, per call in order: each budget's hash
-- mode 'charge': replace the reservation's hold by `amount` spent now.
-- mode 'refund': undo an admission (its take or its hold) that another slot refused.
-- Returns, per call: {now, then per budget: used, held, reset, retry}
local now = clock(ARGV[1])
local arg, key = 3, 1
local results = {}

local function settle_one()
  local reservation, count = string.match(ARGV[arg], '^(%S+) (%d+)$')
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

for c = 1, tonumber(ARGV[2]) do
  results[c] = settle_one()
end
return results
