-- KEYS: acct, session, live, events
-- ARGV: now, n, answered_at (epoch ms, '' = now), stale_s
-- Returns {state, grant, grant_end, final, now}; the clock of the call starts at answered_at,
-- which a reconcile learns from the PBX for a call answered while nobody watched.
local acct, sess, live = KEYS[1], KEYS[2], KEYS[3]
local now = clock(ARGV[1])
local f = redis.call('HMGET', sess, 'n', 'st', 'g', 'ge', 'fin', 'setup', 'acct', 'ch')
if not f[1] then return {'unknown', 0, 0, 0, now} end
if f[1] ~= ARGV[2] then return {'superseded', 0, 0, 0, now} end
if f[2] ~= 'auth' then return {f[2], num(f[3]), num(f[4]), num(f[5]), now} end
local answered = now
if ARGV[3] ~= '' and tonumber(ARGV[3]) < now then answered = tonumber(ARGV[3]) end
if answered < num(f[6]) then answered = num(f[6]) end
local grant = num(f[3])
local grant_end = answered + grant * 1000
redis.call('HSET', sess, 'st', 'ans', 'ans', answered, 'ge', grant_end)
redis.call('ZADD', live, grant_end + num(ARGV[4]) * 1000, f[7] .. '/' .. f[8])
return {'ans', grant, grant_end, num(f[5]), now}
