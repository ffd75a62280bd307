-- KEYS: for each budget: H, Z
-- ARGV: now ('' = server time), reservation, budget count,
--       then per budget: window, granularity, quota, amount, holds (0/1), mode, taken at
-- mode 'charge': replace the reservation's hold by `amount` spent now.
-- mode 'refund': undo an admission (its take or its hold) that another slot refused.
-- Returns {now, then per budget: used, held, reset, retry}
local now = clock(ARGV[1])
local reservation, count = ARGV[2], tonumber(ARGV[3])
local out = {tostring(now)}
for b = 1, count do
  local at = 3 + (b - 1) * 7
  local h, z = KEYS[(b - 1) * 2 + 1], KEYS[(b - 1) * 2 + 2]
  local window, g, quota = tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2]), tonumber(ARGV[at + 3])
  local amount, holds, mode = tonumber(ARGV[at + 4]), ARGV[at + 5] == '1', ARGV[at + 6]
  expire(h, z, window, now)
  release_hold(h, z, reservation)
  if mode == 'charge' then
    add(h, g, now, amount)
  elseif not holds then
    local i = math.floor(tonumber(ARGV[at + 7]) / g)
    local a = num(redis.call('HGET', h, 'a' .. i))
    if a then
      local back = math.min(a, amount)
      redis.call('HINCRBY', h, 't', int(-back))
      if a - back <= 0 then redis.call('HDEL', h, 'a' .. i, 'l' .. i) else redis.call('HINCRBY', h, 'a' .. i, int(-back)) end
    end
  end
  for _, v in ipairs(view(h, window, now, quota, 0, holds, false)) do
    table.insert(out, v)
  end
end
return out
