-- Shared by every callguard script (prepended to each one).
-- Money is integer micro-units and time integer milliseconds. Lua numbers are
-- doubles: exact for integers below 2^53, so division is corrected to be exact.
-- Every key a script touches carries the same shard tag, so it runs on one
-- Redis Cluster slot.
local MAX_MONEY = 9007199254740991
local MAX_SECONDS = 1000000  -- caps a billed duration (11.5 days) so rate*seconds stays exact
local DONE_TTL = '60'  -- seconds a finished session answers 'already' to a late duplicate
local CENT = 10000  -- a hundredth of the currency unit: less available than this is nothing
local HOUR = 3600000
local STRIKES = 10  -- channel-cap or rate-limit denials within a minute that look like fraud

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

local function num(v) return tonumber(v) or 0 end
-- A constant argument to redis.call is written as a string ('1', not 1): the same bytes
-- reach Redis, without its number formatting (%.17g) on every call.

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

-- A hash's fields by name: HMGET of `names`, as a table keyed by them. It builds the table
-- key by key (regrowing it as it fills), which costs about as much as the HMGET: the busy
-- paths write the table whole instead, `local v = redis.call('HMGET', key, 'x', 'y', ...)`
-- then `{x = v[1], y = v[2], ...}`, which tests/test_lua_build.py checks name by name.
local function fields(key, names)
  local values, t = redis.call('HMGET', key, unpack(names)), {}
  for k, name in ipairs(names) do t[name] = values[k] end
  return t
end

-- An engine event for the worker to book (a notice, an auto top-up, a fraud suspicion),
-- with the account's money as it stood.
local function emit(events, event, account, m, reason)
  redis.call('XADD', events, '*', 'type', 'limit', 'event', event, 'acct', account,
    'bal', num(m.balance), 'credit', num(m.credit), 'res', num(m.reserved),
    'reason', reason or '')
end

-- Blocked by the operator (status, from the books) or by the engine on a fraud suspicion
-- (fb: when; it holds until an operator unblock after it, ub).
local function is_blocked(a)
  return a.status == 'blocked' or num(a.fb) > num(a.ub)
end

-- One auto top-up request per crossing below the threshold (tp: asked, not answered);
-- re-armed by money arriving above it, by new settings, or by the worker finding the
-- request no longer wanted.
local function watch_topup(acct, events, account, arrived, m, avail)
  local below = num(m.tpb)
  if below == 0 then return end
  if avail < below then
    if m.tp ~= '1' then
      redis.call('HSET', acct, 'tp', '1')
      emit(events, 'topup', account, m)
    end
  elseif arrived and m.tp == '1' then
    redis.call('HDEL', acct, 'tp')
  end
end

-- The account's limit level after its money moved: 0 fine, 1 warned (available credit
-- below `warn`), 2 exhausted (less than a cent left once its calls are paid: blocks new
-- calls both ways until money arrives). Each rise is announced once; only money arriving
-- (`arrived`: a top-up, a payment, new settings) lowers it, so reservations coming and
-- going never repeat a warning. `m`: the caller's reading of watched(), when it has one.
-- (No table of names outside a function: what a script keeps of this file runs on every
-- call of it, see with_common in core.py.)
local function watched(acct)
  return fields(acct, {'balance', 'credit', 'reserved', 'warn', 'lv', 'tpb', 'tp', 'kind'})
end
local function watch(acct, events, account, arrived, m)
  m = m or watched(acct)
  local funds = num(m.balance) + num(m.credit)
  local avail = funds - num(m.reserved)
  local level = 0
  if funds < CENT then level = 2 elseif avail < num(m.warn) then level = 1 end
  local was = num(m.lv)
  local event = nil
  if not m.lv then
    was = level  -- first sight (an opening balance, a rebuilt Redis): no crossing to tell
  elseif level > was then
    if m.kind == 'postpaid' then
      event = (level == 2) and 'credit_limit' or 'credit_warning'
    else
      event = (level == 2) and 'exhausted' or 'low_balance'
    end
  elseif level < was and arrived then
    if was == 2 then event = 'unblocked' end
  else
    level = was
  end
  if level ~= was or not m.lv then redis.call('HSET', acct, 'lv', level) end
  if event then emit(events, event, account, m) end
  watch_topup(acct, events, account, arrived, m, avail)
end

-- Fraud suspected: said once by the caller's rule; with on_fraud 'block' the engine blocks
-- the account at once (the worker books it and hangs its calls up on every node).
local function suspect(acct, events, account, why)
  local m = fields(acct, {'balance', 'credit', 'reserved', 'fraud'})
  emit(events, 'fraud_suspected', account, m, why)
  -- Redis's own clock, as the stream entry's id and an operator's unblock (ub) use.
  if m.fraud == 'block' then redis.call('HSET', acct, 'fb', clock('')) end
end

-- Spend of the last hour: a sliding estimate over two hourly buckets of finished calls'
-- cost (the previous hour weighted by how much of it is still inside the hour), plus what
-- live calls hold. v: the account's vh, vs, vp.
local function spent_last_hour(v, now, reserved)
  local hour = idiv(now, HOUR)
  local cur, prev = num(v.vs), num(v.vp)
  if num(v.vh) ~= hour then
    prev = (num(v.vh) == hour - 1) and cur or 0
    cur = 0
  end
  return math.floor(prev * ((HOUR - (now - hour * HOUR)) / HOUR)) + cur + reserved
end

-- A finished call's cost into the bucket of the hour it ended in; a late commit of the
-- hour before goes to that hour's bucket, an older one to none (never rewinding).
-- v: the account's vmax, vh, vs.
local function count_spend(acct, ended, cost, v)
  if num(v.vmax) == 0 then return end
  local hour, current = idiv(ended, HOUR), num(v.vh)
  if hour == current then
    redis.call('HINCRBY', acct, 'vs', cost)
  elseif hour == current - 1 then
    redis.call('HINCRBY', acct, 'vp', cost)
  elseif hour > current then
    redis.call('HSET', acct, 'vh', hour, 'vs', cost,
      'vp', (current == hour - 1) and num(v.vs) or 0)
  end
end

-- End the session held in `sess`: rate what was talked, move it from reserved to spent,
-- free the channel and queue the commit for the books (the shard's stream).
-- mode 'reported': the PBX said it ended at end_ms (or now); it cannot have talked past
--   the deadline pushed into it, the grant's end plus the grace.
-- mode 'stale' / 'gone': nobody saw it end; it is charged up to its grant, never beyond.
-- answered_arg: when the caller knows the call was answered but Redis was not told (the
-- answer could not be written in time); a call allowed while the PBX was out of sight
-- ('bl', fail_open) that nobody saw end counts as answered at setup: its short grant.
-- talk_arg: the PBX's own billed duration (FreeSWITCH's billmsec), in ms: the call then
-- ended that long after the answer Redis holds, whatever either clock says.
-- f: the session's session_fields(), when the caller has read them.
-- Returns cost, duration, billed.
local function session_fields(sess)  -- 1-18 for finish, 19-21 what a finished one keeps
  return redis.call('HMGET', sess, 'n', 'st', 'g', 'ge', 'hold', 'r', 'cf', 'i', 's', 'ans',
    'acct', 'ch', 'dir', 'dst', 'pfx', 'setup', 'node', 'bl', 'cost', 'dur', 'billed')
end
local function finish(acct, sess, live, events, member, now, end_arg, cause, mode, grace_s,
                      answered_arg, talk_arg, f)
  f = f or session_fields(sess)
  local ended = now
  if end_arg ~= nil and end_arg ~= '' and tonumber(end_arg) < now then ended = tonumber(end_arg) end
  local r, cf, i, s = num(f[6]), num(f[7]), num(f[8]), num(f[9])
  local cost, duration, billed = 0, 0, 0
  if f[2] == 'auth' then
    local answered = nil
    if answered_arg ~= nil and answered_arg ~= '' then
      answered = tonumber(answered_arg)
    elseif f[18] == '1' and (mode == 'gone' or mode == 'stale') then
      answered = num(f[16])
    end
    if answered then
      if answered < num(f[16]) then answered = num(f[16]) end
      if answered > ended then answered = ended end
      f[2], f[10], f[4] = 'ans', answered, answered + num(f[3]) * 1000
    end
  end
  if f[2] == 'ans' then
    local answered, grant_end = num(f[10]), num(f[4])
    if talk_arg ~= nil and talk_arg ~= '' and answered + tonumber(talk_arg) < now then
      ended = answered + tonumber(talk_arg)
    end
    local cap = grant_end
    if mode == 'reported' then cap = grant_end + grace_s * 1000 end
    if ended > cap then ended = cap end
    if ended < answered then ended = answered end
    duration = idiv(ended - answered, 1000)
    billed = billed_of(duration, i, s)
    cost = cost_of(billed, r, cf)
  end
  -- watched() and count_spend's fields, read once: nothing below writes them but the
  -- HINCRBYs, whose replies take their place.
  local v = redis.call('HMGET', acct, 'balance', 'credit', 'reserved', 'warn', 'lv', 'tpb', 'tp',
    'kind', 'vmax', 'vh', 'vs')
  local m = {balance = v[1], credit = v[2], reserved = v[3], warn = v[4], lv = v[5], tpb = v[6],
    tp = v[7], kind = v[8], vmax = v[9], vh = v[10], vs = v[11]}
  m.reserved = redis.call('HINCRBY', acct, 'reserved', 0 - num(f[5]))
  redis.call('HINCRBY', acct, 'channels', '-1')
  if cost > 0 then
    m.balance = redis.call('HINCRBY', acct, 'balance', 0 - cost)
    count_spend(acct, ended, cost, m)
  end
  redis.call('ZREM', live, member)
  redis.call('XADD', events, '*', 'type', 'commit', 'session', member .. '/' .. f[1],
    'node', f[17] or '', 'dir', f[13], 'dst', f[14], 'pfx', f[15] or '',
    'r', r, 'cf', cf, 'i', i, 's', s, 'setup', f[16], 'ans', f[10] or '', 'end', ended,
    'dur', duration, 'billed', billed, 'cost', cost, 'cause', cause)
  watch(acct, events, f[11], false, m)
  -- Only what a late duplicate needs stays, briefly.
  redis.call('DEL', sess)
  redis.call('HSET', sess, 'n', f[1], 'st', 'done', 'cost', cost, 'dur', duration, 'billed', billed)
  redis.call('EXPIRE', sess, DONE_TTL)
  return cost, duration, billed
end
