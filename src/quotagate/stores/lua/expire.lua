-- Expired entries of the dashboard's index, removed from its expiry set in one atomic step.
-- KEYS[1]: the expiry set (budget id -> when it expires, by the counters' clock).
-- ARGV: now ('' = server time, the clock the counters use), the most entries to remove.
-- Returns the removed ids, for the caller to remove from the ratio set too.
local now = clock(ARGV[1])
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', string.format('%.6f', now), 'LIMIT', 0, tonumber(ARGV[2]))
if #gone > 0 then redis.call('ZREM', KEYS[1], unpack(gone)) end
return gone
