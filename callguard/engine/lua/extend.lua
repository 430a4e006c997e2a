-- KEYS: acct, session, live, events
-- ARGV: now, n, quota, expected_grant, stale_s
-- Reserve the next slice. Idempotent: only a caller that saw the current grant
-- (expected_grant) extends it, so a retried or late extend adds nothing twice.
-- A blocked account gets no more slices: its calls end with the grant they have; nor
-- does one past its spend per hour.
-- Returns {state, grant, grant_end, final, now, hold}
local acct, sess, live = KEYS[1], KEYS[2], KEYS[3]
local now = clock(ARGV[1])
local f = redis.call('HMGET', sess, 'n', 'st', 'g', 'ge', 'fin', 'hold', 'r', 'cf', 'i', 's',
  'acct', 'ch')
if not f[1] then return {'unknown', 0, 0, 0, now, 0} end
if f[1] ~= ARGV[2] then return {'superseded', 0, 0, 0, now, 0} end
local granted, grant_end, final = num(f[3]), num(f[4]), num(f[5])
if f[2] ~= 'ans' or final == 1 or granted ~= num(ARGV[4]) then
  return {f[2], granted, grant_end, final, now, num(f[6])}
end
local quota = num(ARGV[3])
-- Too early: more than one slice still to run. Nothing to do yet.
if grant_end - now > quota * 1000 then return {'ans', granted, grant_end, 0, now, num(f[6])} end
local r, cf, i, s = num(f[7]), num(f[8]), num(f[9]), num(f[10])
local hold = num(f[6])
local want = slice_target(granted, quota, i, s)
-- With watched()'s, for watch below: nothing here writes those but the HINCRBY of reserved.
local v = redis.call('HMGET', acct, 'status', 'fb', 'ub', 'balance', 'credit', 'reserved', 'vmax',
  'vh', 'vs', 'vp', 'fz', 'warn', 'lv', 'tpb', 'tp', 'kind')
local a = {status = v[1], fb = v[2], ub = v[3], balance = v[4], credit = v[5], reserved = v[6],
  vmax = v[7], vh = v[8], vs = v[9], vp = v[10], fz = v[11], warn = v[12], lv = v[13], tpb = v[14],
  tp = v[15], kind = v[16]}
local grant = -1
if not is_blocked(a) then
  -- This session's own hold counts as available to itself.
  local reserved = num(a.reserved)
  grant = affordable(num(a.balance) + num(a.credit) - reserved + hold, r, cf, i, s)
  if grant > want then grant = want end
  local vmax = num(a.vmax)
  if vmax > 0 then
    -- The spend per hour bounds a long call too, not only new ones.
    local spent = spent_last_hour(a, now, reserved - hold)
    local within = (spent < vmax) and affordable(vmax - spent, r, cf, i, s) or -1
    if within < grant then
      grant = within
      if num(a.fz) ~= idiv(now, HOUR) then  -- said once an hour
        redis.call('HSET', acct, 'fz', idiv(now, HOUR))
        suspect(acct, KEYS[4], f[11], 'velocity_limit')
      end
    end
  end
end
if grant <= granted then
  redis.call('HSET', sess, 'fin', '1')
  return {'ans', granted, grant_end, 1, now, hold}
end
local new_hold = cost_of(grant, r, cf)
local new_end = grant_end + (grant - granted) * 1000
final = (grant < want) and 1 or 0
a.reserved = redis.call('HINCRBY', acct, 'reserved', new_hold - hold)
redis.call('HSET', sess, 'g', grant, 'ge', new_end, 'hold', new_hold, 'fin', final)
redis.call('ZADD', live, new_end + num(ARGV[5]) * 1000, f[11] .. '/' .. f[12])
watch(acct, KEYS[4], f[11], false, a)
return {'ans', grant, new_end, final, now, new_hold}
