-- KEYS: acct, session, live, events
-- ARGV: now, channel, cause, mode
--   mode '0': the PBX reported the end now;
--   '1' stale: the PBX went silent (the sweeper), only once the session's deadline passed;
--   '2' gone: the channel is no longer on the PBX (an adapter's restart), end unknown.
-- Rate the real duration, move it from reserved to spent, free the channel.
-- When the end is not known the call is charged up to its last grant, never beyond.
-- Returns {state, cost, duration, billed}; state 'done' = committed now,
-- 'already' = committed before, 'unknown' = no such session.
local acct, sess, live, events = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local st = redis.call('HMGET', sess, 'st', 'g', 'ge', 'hold', 'r', 'cf', 'i', 's', 'ans',
  'sid', 'ch', 'dir', 'dst', 'pfx', 'setup', 'node', 'cost', 'dur', 'billed')
if not st[1] then return {'unknown', 0, 0, 0} end
if st[1] == 'done' or st[1] == 'deny' then return {'already', num(st[17]), num(st[18]), num(st[19])} end
local now = clock(ARGV[1])
if ARGV[4] == '1' then
  -- The sweeper read an old deadline; an extend since then keeps the session alive.
  local deadline = redis.call('ZSCORE', live, ARGV[2])
  if deadline and tonumber(deadline) > now then return {'alive', 0, 0, 0} end
end
local granted, grant_end, hold = num(st[2]), num(st[3]), num(st[4])
local r, cf, i, s = num(st[5]), num(st[6]), num(st[7]), num(st[8])
local cost, duration, billed = 0, 0, 0
if st[1] == 'ans' then
  local answered = num(st[9])
  local end_ms = now
  if ARGV[4] ~= '0' and end_ms > grant_end then end_ms = grant_end end
  if end_ms < answered then end_ms = answered end
  duration = idiv(end_ms - answered, 1000)
  billed = billed_of(duration, i, s)
  cost = cost_of(billed, r, cf)
end
redis.call('HINCRBY', acct, 'reserved', 0 - hold)
redis.call('HINCRBY', acct, 'channels', -1)
redis.call('HINCRBY', acct, 'balance', 0 - cost)
redis.call('ZREM', live, ARGV[2])
redis.call('HSET', sess, 'st', 'done', 'end', now, 'cost', cost, 'dur', duration,
  'billed', billed, 'hold', 0, 'cause', ARGV[3])
redis.call('EXPIRE', sess, 86400)
redis.call('XADD', events, '*', 'type', 'commit', 'session', st[10],
  'channel', st[11], 'node', st[16] or '', 'dir', st[12], 'dst', st[13], 'pfx', st[14] or '',
  'r', r, 'cf', cf, 'i', i, 's', s, 'setup', st[15], 'ans', st[9] or '', 'end', now,
  'dur', duration, 'billed', billed, 'cost', cost, 'cause', ARGV[3])
return {'done', cost, duration, billed}
