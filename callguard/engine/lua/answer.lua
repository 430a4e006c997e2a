-- KEYS: acct, session, live, events
-- ARGV: now, channel, stale_grace_s
-- Returns {state, grant, grant_end, final, now}; the clock of the call starts here.
local acct, sess, live, events = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local st = redis.call('HMGET', sess, 'st', 'g', 'ge', 'fin', 'sid')
local now = clock(ARGV[1])
if not st[1] then return {'unknown', 0, 0, 0, now} end
if st[1] ~= 'auth' then return {st[1], num(st[2]), num(st[3]), num(st[4]), now} end
local grant = num(st[2])
local grant_end = now + grant * 1000
redis.call('HSET', sess, 'st', 'ans', 'ans', now, 'ge', grant_end)
redis.call('ZADD', live, grant_end + num(ARGV[3]) * 1000, ARGV[2])
redis.call('XADD', events, '*', 'type', 'answer', 'session', st[5], 'at', now)
return {'ans', grant, grant_end, num(st[4]), now}
