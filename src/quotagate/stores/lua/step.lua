-- One step of a batch of admissions and settlements, one after the other, atomically.
-- ARGV: now ('' = server time), operation count, then per operation:
--   an admission: "A <reservation> <hold ttl> <check key 0/1> <budget count> <meta count>",
--       then per budget "<window>:<granularity>:<quota>:<amount>:<holds 0/1>:<meta 0/1>:<policies JSON>",
--       followed by its meta JSON when it has one (a budget id that holds only a hash of its value);
--       KEYS: [the key record's hash, if check key], then each budget's hash.
--       Returns {key active, allowed, now, then per budget: used, held, reset, retry}, and when
--       denied, then per budget: the policies (JSON) of the last call it admitted if it refused and
--       they are not this request's, else ''. A denial leaves a counter's q and p as they were.
--   a settlement: "S <reservation> <budget count>",
--       then per budget "<window>:<granularity>:<quota>:<amount>:<holds 0/1>:<mode>:<taken at>:<policies JSON>";
--       mode 'charge' replaces the reservation's hold by `amount` spent now, 'refund' undoes an
--       admission (its take or its hold) that another Cluster slot refused; KEYS: each budget's hash.
--       A charge whose hold was no longer there (the call outlived it) keeps its units a whole
--       window (the hash's expiry moved out if need be), and on a hash that expired it writes
--       the charging call's quota and policies, as an admission would.
--       Returns {now, then per budget: used, held, reset, retry}.
-- An operation that fails (its budget's hash broken, say) returns an error reply in its place, and
-- the next operations run: one bad request fails alone. Redis has no rollback: what the failing
-- operation wrote before its error stays (it never takes more than its own amounts).
-- (Few arguments, each one string: packing arguments is the client's main cost per call.)
local now = clock(ARGV[1])
local stamp = string.format('%.6f', now)
local arg, key = 3, 1
local results = {}
local actives = {}  -- a gateway key's hash -> whether it is active, as read in this call

local function admit_one()
  local reservation, ttl, check, count = string.match(ARGV[arg], '^A (%S+) (%S+) (%d) (%d+) %d+$')
  ttl, check, count = tonumber(ttl), check == '1', tonumber(count)
  arg = arg + 1
  local active = true
  if check then  -- once per key and script call: nothing can revoke it in between
    active = actives[KEYS[key]]
    if active == nil then
      active = redis.call('HGET', KEYS[key], 'revoked_at') == ''
      actives[KEYS[key]] = active
    end
    key = key + 1
  end
  local budgets = {}
  for b = 1, count do
    local window, g, quota, amount, holds, meta, policies =
      string.match(ARGV[arg], '^(%d+):(%d+):(%d+):(%d+):(%d):(%d):(.*)$')
    local x = {h = KEYS[key], window = tonumber(window), g = tonumber(g), quota = tonumber(quota), q = quota,
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
      if x.holds then hold(s, reservation, x.amount, now + ttl) else add(s, x.g, now, stamp, x.amount) end
    elseif not x.fits and (not s.ld or now - s.ld >= 1) then  -- the dashboard needs no finer time
      s.w[#s.w + 1] = 'ld'
      s.w[#s.w + 1] = stamp
    end
    if (allowed or s.fresh) and (s.q ~= x.q or s.p ~= x.policies) then
      local f = s.w
      f[#f + 1], f[#f + 2], f[#f + 3], f[#f + 4] = 'q', x.q, 'p', x.policies
    end
    if x.meta ~= '' then s.w[#s.w + 1] = 'm' s.w[#s.w + 2] = x.meta end
    if s.dirty or #s.w > 0 then save(s) end
    if allowed or s.fresh then  -- a denial adds nothing that outlives what the hash holds
      redis.call('PEXPIRE', x.h, math.ceil((x.window + (x.holds and ttl or 0)) * 1000))
    end
    view(out, s, x.window, now, x.quota, x.amount, x.holds, not allowed)
  end
  if not allowed then  -- x.s.p: the policies as loaded, before this step
    for _, x in ipairs(budgets) do
      out[#out + 1] = (not x.fits and x.s.p and x.s.p ~= x.policies) and x.s.p or ''
    end
  end
  return out
end

local function settle_one()
  local reservation, count = string.match(ARGV[arg], '^S (%S+) (%d+)$')
  count = tonumber(count)
  arg = arg + 1
  local out = {tostring(now)}
  local budgets = {}
  for b = 1, count do
    local window, g, quota, amount, holds, mode, taken, policies =
      string.match(ARGV[arg], '^(%d+):(%d+):(%d+):(%d+):(%d):(%a+):([^:]+):(.*)$')
    budgets[b] = {h = KEYS[key], window = tonumber(window), g = tonumber(g), quota = tonumber(quota), q = quota,
                  amount = tonumber(amount), holds = holds == '1', mode = mode, taken = taken, policies = policies}
    key, arg = key + 1, arg + 1
  end
  for _, x in ipairs(budgets) do x.s = load(x.h, x.window, now, reservation) end  -- every budget read before any write
  for _, x in ipairs(budgets) do
    local s, h, g, amount = x.s, x.h, x.g, x.amount
    local late = x.mode == 'charge' and amount > 0 and not s.r  -- its hold expired, or the whole hash
    release_hold(s, reservation)
    if x.mode == 'charge' then
      add(s, g, now, stamp, amount)
      if late and s.fresh then
        local f = s.w
        f[#f + 1], f[#f + 2], f[#f + 3], f[#f + 4] = 'q', x.q, 'p', x.policies
      end
    elseif not x.holds then
      local i = math.floor(tonumber(x.taken) / g)
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
    if late and redis.call('PTTL', h) < x.window * 1000 then redis.call('PEXPIRE', h, x.window * 1000) end
    view(out, s, x.window, now, x.quota, 0, x.holds, false)
  end
  return out
end

-- how many keys and arguments an operation spans, read from its head alone (to find the next
-- operation after one that failed part-way)
local function extent(head)
  local check, count, metas = string.match(head, '^A %S+ %S+ (%d) (%d+) (%d+)$')
  if check then return check + count, 1 + count + metas end
  count = tonumber(string.match(head, '^S %S+ (%d+)$'))
  return count, 1 + count
end

for r = 1, tonumber(ARGV[2]) do
  local first_key, first_arg = key, arg
  local ok, out = pcall(string.sub(ARGV[arg], 1, 1) == 'A' and admit_one or settle_one)
  if not ok then
    local keys, args = extent(ARGV[first_arg])
    key, arg = first_key + keys, first_arg + args
    out = redis.error_reply('step failed: ' .. (type(out) == 'table' and tostring(out.err) or tostring(out)))
  end
  results[r] = out
end
return results
