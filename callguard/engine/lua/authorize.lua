-- KEYS: acct, session, live, events
-- ARGV: now, session_id, channel, direction, destination, plan, has_rate, prefix,
--       rate, connect_fee, initial, subsequent, rate_blocked, quota, node, ring_timeout_s
-- Returns {allow, reason, grant, grant_end, final, maxsec, extra}
local acct, sess, live, events = KEYS[1], KEYS[2], KEYS[3], KEYS[4]

local previous = redis.call('HGET', sess, 'res')
if previous then
  local out = {}
  for part in string.gmatch(previous, '([^|]*)|?') do out[#out + 1] = part end
  return {tonumber(out[1]), out[2], tonumber(out[3]), tonumber(out[4]), tonumber(out[5]), tonumber(out[6]), ''}
end

local a = redis.call('HMGET', acct, 'status', 'balance', 'credit', 'reserved', 'channels',
  'max_channels', 'plan', 'cps', 'cps_s', 'cps_n')
if not a[1] then return {0, 'UNKNOWN_ACCOUNT', 0, 0, 0, 0, ''} end
if a[7] ~= ARGV[6] then return {0, 'PLAN', 0, 0, 0, 0, a[7] or ''} end

local now = clock(ARGV[1])
local direction = ARGV[4]
local balance, credit, reserved = num(a[2]), num(a[3]), num(a[4])
local r, cf, i, s = num(ARGV[9]), num(ARGV[10]), num(ARGV[11]), num(ARGV[12])
local quota = num(ARGV[14])
local avail = balance + credit - reserved

local function decide(allow, reason, grant, maxsec)
  local res = table.concat({allow, reason, grant, 0, 0, maxsec}, '|')
  redis.call('HSET', sess, 'st', allow == 1 and 'auth' or 'deny', 'res', res, 'sid', ARGV[2],
    'ch', ARGV[3], 'dir', direction, 'dst', ARGV[5], 'setup', now, 'node', ARGV[15])
  return {allow, reason, grant, 0, 0, maxsec, ''}
end

local function deny(reason)
  local out = decide(0, reason, 0, 0)
  redis.call('EXPIRE', sess, 3600)
  redis.call('XADD', events, '*', 'type', 'deny', 'session', ARGV[2], 'reason', reason,
    'dir', direction, 'dst', ARGV[5], 'at', now)
  return out
end

if a[1] == 'blocked' then return deny('BLOCKED') end
-- The seeds' automatic block: at zero credit no calls either way until money arrives.
if balance + credit <= 0 then return deny('NO_FUNDS') end
if ARGV[7] == '0' then return deny('NO_RATE') end
if ARGV[13] == '1' then return deny('DEST_BLOCKED') end
local max_channels = num(a[6])
if max_channels > 0 and num(a[5]) >= max_channels then return deny('CHANNEL_LIMIT') end
local cps = num(a[8])
if cps > 0 then
  local second = idiv(now, 1000)
  local count = (num(a[9]) == second) and num(a[10]) or 0
  if count >= cps then return deny('RATE_LIMIT') end
  redis.call('HSET', acct, 'cps_s', second, 'cps_n', count + 1)
end

local maxsec = affordable(avail, r, cf, i, s)
if maxsec < 0 then return deny('NO_FUNDS') end
local grant = slice_target(0, quota, i, s)
if grant > maxsec then grant = maxsec end
local hold = cost_of(grant, r, cf)

redis.call('HINCRBY', acct, 'reserved', hold)
redis.call('HINCRBY', acct, 'channels', 1)
decide(1, 'OK', grant, maxsec)
redis.call('HSET', sess, 'pfx', ARGV[8], 'r', r, 'cf', cf, 'i', i, 's', s, 'g', grant, 'hold', hold,
  'fin', 0)
redis.call('ZADD', live, now + num(ARGV[16]) * 1000, ARGV[3])
redis.call('XADD', events, '*', 'type', 'auth', 'session', ARGV[2], 'hold', hold, 'grant', grant,
  'at', now)
return {1, 'OK', grant, 0, 0, maxsec, ''}
