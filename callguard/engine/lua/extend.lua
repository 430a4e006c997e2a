-- KEYS: acct, session, live, events
-- ARGV: now, channel, quota, expected_grant, stale_grace_s
-- Reserve the next slice. Idempotent: only a caller that saw the current grant
-- (expected_grant) extends it, so a retried or late extend adds nothing twice.
-- Returns {state, grant, grant_end, final, now}
local acct, sess, live, events = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local st = redis.call('HMGET', sess, 'st', 'g', 'ge', 'fin', 'hold', 'r', 'cf', 'i', 's', 'sid')
local now = clock(ARGV[1])
if not st[1] then return {'unknown', 0, 0, 0, now} end
local granted, grant_end, final = num(st[2]), num(st[3]), num(st[4])
if st[1] ~= 'ans' or final == 1 or granted ~= num(ARGV[4]) then
  return {st[1], granted, grant_end, final, now}
end
local quota = num(ARGV[3])
-- Too early: more than one slice still to run. Nothing to do yet.
if grant_end - now > quota * 1000 then return {'ans', granted, grant_end, 0, now} end
local r, cf, i, s = num(st[6]), num(st[7]), num(st[8]), num(st[9])
local hold = num(st[5])
local want = slice_target(granted, quota, i, s)
-- This session's own hold counts as available to itself.
local can = affordable(available(acct) + hold, r, cf, i, s)
local grant = want
if can < grant then grant = can end
if grant <= granted then
  redis.call('HSET', sess, 'fin', 1)
  redis.call('XADD', events, '*', 'type', 'final', 'session', st[10], 'grant', granted, 'at', now)
  return {'ans', granted, grant_end, 1, now}
end
local new_hold = cost_of(grant, r, cf)
local answered = grant_end - granted * 1000
local new_end = answered + grant * 1000
final = (grant < want) and 1 or 0
redis.call('HINCRBY', acct, 'reserved', new_hold - hold)
redis.call('HSET', sess, 'g', grant, 'ge', new_end, 'hold', new_hold, 'fin', final)
redis.call('ZADD', live, new_end + num(ARGV[5]) * 1000, ARGV[2])
redis.call('XADD', events, '*', 'type', 'extend', 'session', st[10], 'grant', grant,
  'hold', new_hold, 'at', now)
return {'ans', grant, new_end, final, now}
