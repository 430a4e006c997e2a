-- Shared by every callguard script (prepended to each one).
-- Money is integer micro-units and time integer milliseconds. Lua numbers are
-- doubles: exact for integers below 2^53, so division is corrected to be exact.
local MAX_MONEY = 9007199254740991
local MAX_SECONDS = 1000000  -- caps a billed duration (11.5 days) so rate*seconds stays exact

local function idiv(a, b)
  local q = math.floor(a / b)
  local r = a - q * b
  if r < 0 then q = q - 1 elseif r >= b then q = q + 1 end
  return q
end

-- '0 - x', never '-x': Lua's -0 reaches Redis as "-0", which HINCRBY refuses.
local function ceildiv(a, b) return 0 - idiv(0 - a, b) end

local function clock(arg)
  if arg ~= nil and arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + idiv(tonumber(t[2]), 1000)
end

-- DESIGN.md: billed = initial + ceil(max(0, d - initial) / subsequent) * subsequent
local function billed_of(d, i, s)
  if d > MAX_SECONDS then d = MAX_SECONDS end
  if d <= i then return i end
  return i + ceildiv(d - i, s) * s
end

-- connect fee + rate x billed / 60, rounded up to the micro-unit
local function cost_of(billed, r, cf) return cf + ceildiv(r * billed, 60) end

-- Largest billed seconds, in whole increments, whose cost fits `budget`;
-- -1 when not even the connect fee and first increment fit.
local function affordable(budget, r, cf, i, s)
  if budget < cost_of(i, r, cf) then return -1 end
  if r == 0 then return i + idiv(MAX_SECONDS - i, s) * s end
  local m = budget - cf
  local whole = idiv(m, r)
  local secs
  if whole >= MAX_SECONDS then
    secs = MAX_SECONDS
  else
    secs = whole * 60 + idiv((m - whole * r) * 60, r)
    if secs > MAX_SECONDS then secs = MAX_SECONDS end
  end
  return i + idiv(secs - i, s) * s
end

-- The slice to ask for: `quota` seconds rounded up to whole increments, at least one.
local function slice_target(granted, quota, i, s)
  if granted == 0 then
    if quota <= i then return i end
    return i + ceildiv(quota - i, s) * s
  end
  local steps = ceildiv(quota, s)
  if steps < 1 then steps = 1 end
  return granted + steps * s
end

local function num(v) return tonumber(v) or 0 end

-- Account money fields as numbers: balance, credit limit, reserved.
local function available(acct_key)
  local m = redis.call('HMGET', acct_key, 'balance', 'credit', 'reserved')
  return num(m[1]) + num(m[2]) - num(m[3])
end
