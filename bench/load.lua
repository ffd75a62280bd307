-- wrk script for the quotagate benchmark (bench/run.py drives it; settings come from the environment).
--
-- Every request is a realistic chat completion POST with its own Helicone-User-Id, cycling over
-- BENCH_USERS distinct users, plus the gateway key and policy header when given.
--
-- BENCH_RATE > 0 turns wrk into a fixed-rate generator in the manner of wrk2: run it with as many
-- threads as connections (-t N -c N), so that each thread drives exactly one connection. Each
-- connection sends on its own schedule (BENCH_RATE / N requests a second, phases spread evenly);
-- delay() waits for the next slot, and a response's latency is measured from its intended send time
-- (or from the actual send, when the millisecond timer fires a little early), so a server that
-- stalls is charged for the requests it held back (no coordinated omission). Without a rate wrk
-- runs flat out and records its own latency histogram. Either way every response's status is
-- counted, and so are the responses without the header BENCH_HEADER (the rate-limit header that a
-- gateway which really checked the budgets adds); all of it goes to the file BENCH_OUT as JSON.

local ffi = require("ffi")
ffi.cdef([[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]])
local ts = ffi.new("bench_timespec")
local CLOCK_MONOTONIC = 1

local function now_us()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.tv_sec) * 1000000 + tonumber(ts.tv_nsec) / 1000
end

local rate = tonumber(os.getenv("BENCH_RATE") or "0")
local users = tonumber(os.getenv("BENCH_USERS") or "10000")
local auth = os.getenv("BENCH_AUTH") or ""
local policy = os.getenv("BENCH_POLICY") or ""
local path = os.getenv("BENCH_PATH") or "/v1/chat/completions"
local out = os.getenv("BENCH_OUT") or ""
local must_have = os.getenv("BENCH_HEADER") or ""
local must_have_lower = string.lower(must_have)

local body = '{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are a helpful assistant."},'
  .. '{"role":"user","content":"Write a haiku about rate limits and budgets."}],"max_tokens":64,"temperature":0.7}'

local headers = {
  ["Content-Type"] = "application/json",
  ["Authorization"] = "Bearer sk-bench-not-a-real-key",
}
if auth ~= "" then
  headers["Helicone-Auth"] = "Bearer " .. auth
end
if policy ~= "" then
  headers["Helicone-RateLimit-Policy"] = policy
end

-- main state: number the threads ------------------------------------------------------------
local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

-- thread state ------------------------------------------------------------------------------
local count = 0
local nthreads = 1
local interval = 0
local next_slot = nil
local started = 0

function init(args)
  nthreads = tonumber(os.getenv("BENCH_THREADS") or "1")
  if rate > 0 then
    interval = 1000000 * nthreads / rate
  end
  count = (tid or 0) * 7919
  lat = {}
  n = 0
  statuses = {}
  missing = 0
end

function request()
  count = count + 1
  headers["Helicone-User-Id"] = "user-" .. (count % users)
  if rate > 0 then
    local t = now_us()
    local slot = next_slot or t
    started = math.min(slot, t)
    next_slot = slot + interval
  end
  return wrk.format("POST", path, headers, body)
end

if rate > 0 then
  function delay()
    local t = now_us()
    if next_slot == nil then
      next_slot = t + interval * ((tid or 0) / nthreads)
    end
    local wait = next_slot - t
    if wait <= 0 then
      return 0
    end
    return math.floor(wait / 1000)
  end
end

-- every response: its status, whether it carries the header the gateway must add (BENCH_HEADER),
-- and at a fixed rate its latency
function response(status, hdrs, resp_body)
  if rate > 0 then
    n = n + 1
    lat[n] = now_us() - started
  end
  statuses[status] = (statuses[status] or 0) + 1
  if must_have ~= "" and hdrs[must_have] == nil and hdrs[must_have_lower] == nil then
    missing = missing + 1
  end
end

-- main state: report ------------------------------------------------------------------------
function done(summary, latency, requests)
  local parts = {}
  local codes = {}
  local missing_total = 0
  for _, thread in ipairs(threads) do
    local tl = thread:get("lat")
    for i = 1, #tl do
      parts[#parts + 1] = string.format("%.1f", tl[i])
    end
    for code, c in pairs(thread:get("statuses")) do
      codes[code] = (codes[code] or 0) + c
    end
    missing_total = missing_total + thread:get("missing")
  end
  local status_parts = {}
  for code, c in pairs(codes) do
    status_parts[#status_parts + 1] = string.format('"%d":%d', code, c)
  end
  local e = summary.errors
  local json = string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
      .. '"wrk_p50_us":%d,"wrk_p99_us":%d,"missing_header":%d,"statuses":{%s},"latency_us":[%s]}',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), missing_total, table.concat(status_parts, ","),
    table.concat(parts, ",")
  )
  if out ~= "" then
    local f = assert(io.open(out, "w"))
    f:write(json)
    f:close()
  else
    io.write(json, "\n")
  end
end
