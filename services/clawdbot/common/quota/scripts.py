"""The Lua scripts behind budgets and rate limits, each one atomic on the Redis server.

Every key a script touches belongs to one API key and sits under that key's hash tag
("{cb:q:<key_id>}:..."), so a script never spans Redis Cluster slots. Clocks: rate
buckets, holds and leases use the server's TIME (one clock for every replica); the budget
period is chosen by the caller (its injectable clock) and is part of the key names.

local.py mirrors each script in Python for the in-process fallback; a change here goes
there too (the tests run the same cases against both).

Token buckets are kept in integer units of 1/60000 of a token, so that a bucket of R per
minute refills by exactly R units a millisecond: no float drift in the counts the
x-ratelimit headers show. Money is integer nano-dollars.
"""

from __future__ import annotations

from typing import Final

# Units per token in a bucket: milliseconds in a minute (see the module doc).
BUCKET_SCALE: Final = 60_000
# A full bucket is simply a missing key: a bucket expires this long after it would be full.
BUCKET_IDLE_MS: Final = 60_000

_BUCKET_FUNCTIONS: Final = """
local SCALE = 60000
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- The level of a bucket refilled up to now (a missing bucket is full).
local function level_of(key, rate)
  local cap = rate * SCALE
  local state = redis.call('HMGET', key, 'v', 't')
  if not state[1] then return cap end
  local elapsed = now - tonumber(state[2])
  if elapsed < 0 then elapsed = 0 end
  local v = tonumber(state[1]) + elapsed * rate
  if v > cap then v = cap end
  return v
end

local function store(key, rate, v)
  local cap = rate * SCALE
  redis.call('HSET', key, 'v', string.format('%d', v), 't', string.format('%d', now))
  redis.call('PEXPIRE', key, math.ceil((cap - v) / rate) + 60000)
end
"""

# KEYS: requests bucket, tokens bucket, leases ZSET.
# ARGV: rpm, tpm, max_parallel (0: no such limit), tokens, lease id, lease ttl ms.
# Returns {admitted 1|0, reason, wait ms, requests level, tokens level, leases in use};
# reason "" | "requests" | "tokens" | "too_large" | "parallel"; a level is -1 without
# that limit. Denied: nothing is taken (expired leases are dropped, nothing else).
ADMIT: Final = (
    _BUCKET_FUNCTIONS
    + """
local rpm = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local par = tonumber(ARGV[3])
local tokens = tonumber(ARGV[4])
local wait = 0
local reason = ''
local rv = -1
local tv = -1
local inflight = 0

if rpm > 0 then
  rv = level_of(KEYS[1], rpm)
  if rv < SCALE then
    wait = math.ceil((SCALE - rv) / rpm)
    reason = 'requests'
  end
end
if tpm > 0 then
  tv = level_of(KEYS[2], tpm)
  local need = tokens * SCALE
  if tv < need then
    local w = math.ceil((need - tv) / tpm)
    if w > wait then
      wait = w
      reason = 'tokens'
    end
  end
end
if par > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  inflight = redis.call('ZCARD', KEYS[3])
  if inflight >= par and wait < 1000 then
    wait = 1000
    reason = 'parallel'
  end
end
if tpm > 0 and tokens > tpm then
  -- No wait would ever let it in: said so rather than a retry that cannot succeed.
  reason = 'too_large'
  wait = math.ceil((tpm * SCALE - tv) / tpm)
end
if reason ~= '' then
  return {0, reason, wait, rv, tv, inflight}
end

if rpm > 0 then
  rv = rv - SCALE
  store(KEYS[1], rpm, rv)
end
if tpm > 0 and tokens > 0 then
  tv = tv - tokens * SCALE
  store(KEYS[2], tpm, tv)
end
if par > 0 then
  local ttl = tonumber(ARGV[6])
  redis.call('ZADD', KEYS[3], now + ttl, ARGV[5])
  redis.call('PEXPIRE', KEYS[3], ttl + 60000)
  inflight = inflight + 1
end
return {1, '', 0, rv, tv, inflight}
"""
)

# KEYS: tokens bucket, leases ZSET.
# ARGV: tpm (0: none), tokens to charge beyond the hold (negative: give back), lease id ("").
# The bucket may go below zero (debt): later requests wait until it refills.
FINISH: Final = (
    _BUCKET_FUNCTIONS
    + """
local tpm = tonumber(ARGV[1])
local delta = tonumber(ARGV[2])
if tpm > 0 and delta ~= 0 then
  local v = level_of(KEYS[1], tpm) - delta * SCALE
  if v > tpm * SCALE then v = tpm * SCALE end
  store(KEYS[1], tpm, v)
end
if ARGV[3] ~= '' then
  redis.call('ZREM', KEYS[2], ARGV[3])
end
return 1
"""
)

# Budget keys of one period: spent (integer nano-dollars), holds (HASH hold id -> amount),
# hold expiries (ZSET hold id -> expiry ms, server clock).
_HOLD_FUNCTIONS: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- Drop the holds whose process never settled them; the sum of the others.
local function held_now(holds, expiries)
  local expired = redis.call('ZRANGEBYSCORE', expiries, '-inf', now)
  for _, id in ipairs(expired) do redis.call('HDEL', holds, id) end
  if #expired > 0 then redis.call('ZREMRANGEBYSCORE', expiries, '-inf', now) end
  local held = 0
  for _, v in ipairs(redis.call('HVALS', holds)) do held = held + tonumber(v) end
  return held
end
"""

# KEYS: spent, holds, expiries.
# ARGV: hold id, amount, budget (nano-dollars), hold ttl ms.
# Returns {"cold"} when the period's counter is missing (the caller seeds it from the
# ledger and asks again), {"refused", remaining} or {"ok", remaining after the hold}.
HOLD: Final = (
    _HOLD_FUNCTIONS
    + """
local spent = redis.call('GET', KEYS[1])
if not spent then return {'cold', 0} end
spent = tonumber(spent)
local held = held_now(KEYS[2], KEYS[3])
local budget = tonumber(ARGV[3])
local amount = tonumber(ARGV[2])
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then
  -- The same hold asked twice (a retried call): it is already counted.
  return {'ok', budget - spent - held}
end
if spent >= budget or spent + held + amount > budget then
  return {'refused', budget - spent - held}
end
local ttl = tonumber(ARGV[4])
redis.call('HSET', KEYS[2], ARGV[1], string.format('%d', amount))
redis.call('ZADD', KEYS[3], now + ttl, ARGV[1])
-- The hold records live as long as their youngest hold could.
redis.call('PEXPIRE', KEYS[2], 2 * ttl + 60000)
redis.call('PEXPIRE', KEYS[3], 2 * ttl + 60000)
return {'ok', budget - spent - held - amount}
"""
)

# KEYS: spent, holds, expiries, settled marker (of this hold id, whatever the period).
# ARGV: hold id, cost, budget (nano-dollars), counter ttl s (0: none), marker ttl s,
#       release_only "1" (the counter is missing and could not be seeded: drop the hold
#       and mark it settled, but leave the counter missing for the next hold to seed
#       from the ledger, which records this call).
# Returns {"cold", 0}, {"duplicate", remaining} (already settled: nothing done),
# {"released", 0} or {"ok", remaining}.
SETTLE: Final = (
    _HOLD_FUNCTIONS
    + """
local budget = tonumber(ARGV[3])
local spent = redis.call('GET', KEYS[1])
if redis.call('EXISTS', KEYS[4]) == 1 then
  return {'duplicate', budget - tonumber(spent or '0') - held_now(KEYS[2], KEYS[3])}
end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if not spent then
  if ARGV[6] ~= '1' then return {'cold', 0} end
  redis.call('SET', KEYS[4], '1', 'EX', ARGV[5])
  return {'released', 0}
end
spent = redis.call('INCRBY', KEYS[1], ARGV[2])
local ttl = tonumber(ARGV[4])
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
redis.call('SET', KEYS[4], '1', 'EX', ARGV[5])
return {'ok', budget - spent - held_now(KEYS[2], KEYS[3])}
"""
)

# KEYS: spent, holds, expiries. ARGV: budget (nano-dollars).
# Returns {"cold", 0} or {"ok", remaining}.
PEEK: Final = (
    _HOLD_FUNCTIONS
    + """
local spent = redis.call('GET', KEYS[1])
if not spent then return {'cold', 0} end
return {'ok', tonumber(ARGV[1]) - tonumber(spent) - held_now(KEYS[2], KEYS[3])}
"""
)

# KEYS: spent. ARGV: the ledger's figure (nano-dollars), counter ttl s (0: none).
# max(Redis, ledger): a counter that went on counting meanwhile keeps its larger figure.
SEED: Final = """
local current = redis.call('GET', KEYS[1])
local seeded = tonumber(ARGV[1])
if current and tonumber(current) >= seeded then return tonumber(current) end
redis.call('SET', KEYS[1], ARGV[1])
local ttl = tonumber(ARGV[2])
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
return seeded
"""
