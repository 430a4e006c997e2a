-- KEYS: acct, session, live, events
-- ARGV: now, n ('' = the channel's current call), cause, mode, end_ms ('' = now), grace_s,
--       answered_ms ('' = as Redis knows it), talk_ms ('' = end_ms tells)
--   mode 'reported': the PBX reported the end (at end_ms when the caller knows it better
--     than now, e.g. a retry after Redis was away);
--   'stale': the PBX went silent (a sweeper), only once the session's deadline passed;
--   'gone': the channel is no longer on the PBX (a reconcile), end unknown;
--   'release': the call never started (a setup that failed); nothing if it was answered.
-- Returns {state, cost, duration, billed}; state 'done' = committed now, 'already' =
-- committed before, 'superseded' = a later call on the channel replaced it (and ended it),
-- 'unknown' = no such session, 'alive' = not stale after all, 'ans' = not released.
local acct, sess, live, events = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
-- Read once, for finish too: n, st, ..., acct (11), ch (12), ..., cost (19), dur, billed.
local f = session_fields(sess)
if not f[1] then return {'unknown', 0, 0, 0} end
if ARGV[2] ~= '' and f[1] ~= ARGV[2] then return {'superseded', 0, 0, 0} end
if f[2] == 'done' then return {'already', num(f[19]), num(f[20]), num(f[21])} end
local mode = ARGV[4]
if mode == 'release' and f[2] ~= 'auth' then return {f[2], 0, 0, 0} end
local now = clock(ARGV[1])
local member = f[11] .. '/' .. f[12]
if mode == 'stale' then
  -- The sweeper read an old deadline; an extend since then keeps the session alive.
  local deadline = redis.call('ZSCORE', live, member)
  if deadline and tonumber(deadline) > now then return {'alive', 0, 0, 0} end
end
local cost, duration, billed = finish(acct, sess, live, events, member, now, ARGV[5], ARGV[3],
  mode, num(ARGV[6]), ARGV[7], ARGV[8], f)
return {'done', cost, duration, billed}
