-- KEYS: acct, session, live, seq, events
-- ARGV: now, account, channel, direction, destination, plan, has_rate, prefix, rate,
--       connect_fee, initial, subsequent, rate_blocked, quota, node, ring_s, grace_s, stale_s,
--       blind ('1': allowed while the PBX is out of sight, under fail_open)
-- Returns {allow, reason, session_id, grant, maxsec, extra}: extra is the money held for
-- the session when allowed (for the process's metrics), the account's plan for 'PLAN'.
-- A deny writes nothing but the account's counters (setups, fraud strikes): a flood of
-- denied setups leaves no footprint in Redis.
local acct, sess, live, seq, events = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local member = ARGV[2] .. '/' .. ARGV[3]
local now = clock(ARGV[1])
local direction, destination = ARGV[4], ARGV[5]
local ring_s, grace_s, stale_s = num(ARGV[16]), num(ARGV[17]), num(ARGV[18])

local cur = redis.call('HMGET', sess, 'n', 'st', 'dir', 'dst', 'g', 'mx', 'hold')
if cur[2] == 'auth' and cur[3] == direction and cur[4] == destination then
  -- The same request again on this channel (a dialplan that retries the number): the same
  -- answer, and the ring allowance starts again, as the PBX's own timeout does.
  redis.call('ZADD', live, now + (ring_s + num(cur[5]) + grace_s + stale_s) * 1000, member)
  return {1, 'OK', member .. '/' .. cur[1], num(cur[5]), num(cur[6]), cur[7] or '0'}
end

-- The account's fields by name (see fields() in common.lua for why written out).
local function account()
  local v = redis.call('HMGET', acct, 'status', 'plan', 'balance', 'credit', 'reserved',
    'channels', 'max_channels', 'cps', 'cps_s', 'cps_n', 'cpm', 'cpm_m', 'cpm_n', 'vmax', 'vh',
    'vs', 'vp', 'fz', 'bp', 'fd_m', 'fd_n', 'fb', 'ub', 'warn', 'lv', 'tpb', 'tp', 'kind')
  return {status = v[1], plan = v[2], balance = v[3], credit = v[4], reserved = v[5],
    channels = v[6], max_channels = v[7], cps = v[8], cps_s = v[9], cps_n = v[10], cpm = v[11],
    cpm_m = v[12], cpm_n = v[13], vmax = v[14], vh = v[15], vs = v[16], vp = v[17], fz = v[18],
    bp = v[19], fd_m = v[20], fd_n = v[21], fb = v[22], ub = v[23], warn = v[24], lv = v[25],
    tpb = v[26], tp = v[27], kind = v[28]}
end
local a = account()
if not a.status then return {0, 'UNKNOWN_ACCOUNT', '', 0, 0, ''} end
if a.plan ~= ARGV[6] then return {0, 'PLAN', '', 0, 0, a.plan or ''} end
if cur[2] == 'auth' or cur[2] == 'ans' then
  -- The channel has moved on to another call: the one before it ended now.
  finish(acct, sess, live, events, member, now, '', 'superseded', 'reported', grace_s, '')
  a = account()  -- its money moved
end
local balance, credit, reserved = num(a.balance), num(a.credit), num(a.reserved)
local r, cf, i, s = num(ARGV[9]), num(ARGV[10]), num(ARGV[11]), num(ARGV[12])
local minute = idiv(now, 60000)
local outbound = direction == 'outbound'

local function deny(reason) return {0, reason, '', 0, 0, ''} end
-- A hacked PBX shows as outbound calls hitting the channel cap or the rate limits again
-- and again (callers ringing a busy customer are not the customer's doing).
local function strike(reason)
  if outbound then
    local count = ((num(a.fd_m) == minute) and num(a.fd_n) or 0) + 1
    redis.call('HSET', acct, 'fd_m', minute, 'fd_n', count)
    if count == STRIKES then suspect(acct, events, ARGV[2], string.lower(reason)) end
  end
  return deny(reason)
end
if is_blocked(a) then return deny('BLOCKED') end
-- The seeds' automatic block: with nothing left, no calls either way until money arrives.
if num(a.lv) == 2 or balance + credit - reserved < CENT then return deny('NO_FUNDS') end
if outbound and a.bp and a.bp ~= '' then  -- the account's own blocked prefixes, rated or not
  for p in string.gmatch(a.bp, '%S+') do
    if string.sub(destination, 1, #p) == p then return deny('DEST_BLOCKED') end
  end
end
if ARGV[7] == '0' then return deny('NO_RATE') end
if ARGV[13] == '1' then return deny('DEST_BLOCKED') end
local max_channels = num(a.max_channels)
if max_channels > 0 and num(a.channels) >= max_channels then return strike('CHANNEL_LIMIT') end
local cps = num(a.cps)
if cps > 0 then
  local second = idiv(now, 1000)
  local count = (num(a.cps_s) == second) and num(a.cps_n) or 0
  if count >= cps then return strike('RATE_LIMIT') end
  redis.call('HSET', acct, 'cps_s', second, 'cps_n', count + 1)
end
local cpm = num(a.cpm)
if cpm > 0 then
  local count = (num(a.cpm_m) == minute) and num(a.cpm_n) or 0
  if count >= cpm then return strike('RATE_LIMIT') end
  redis.call('HSET', acct, 'cpm_m', minute, 'cpm_n', count + 1)
end

local maxsec = affordable(balance + credit - reserved, r, cf, i, s)
if maxsec < 0 then return deny('NO_FUNDS') end
local grant = slice_target(0, num(ARGV[14]), i, s)
if grant > maxsec then grant = maxsec end
local hold = cost_of(grant, r, cf)
local vmax = num(a.vmax)
if vmax > 0 and spent_last_hour(a, now, reserved) + hold > vmax then
  if num(a.fz) ~= idiv(now, HOUR) then  -- said once an hour
    redis.call('HSET', acct, 'fz', idiv(now, HOUR))
    suspect(acct, events, ARGV[2], 'velocity_limit')
  end
  return deny('VELOCITY_LIMIT')
end

redis.call('HINCRBY', acct, 'reserved', hold)
redis.call('HINCRBY', acct, 'channels', '1')
-- Attempts are numbered per shard, so a session id is never used twice, even by a
-- channel that lives longer than a finished session is remembered.
local n = redis.call('INCR', seq)
redis.call('DEL', sess)  -- always: a hash edited by hand (no n) must not lend this call its fields
redis.call('HSET', sess, 'n', n, 'st', 'auth', 'acct', ARGV[2], 'ch', ARGV[3], 'dir', direction,
  'dst', destination, 'setup', now, 'node', ARGV[15], 'pfx', ARGV[8], 'r', r, 'cf', cf, 'i', i,
  's', s, 'g', grant, 'hold', hold, 'fin', '0', 'mx', maxsec, 'bl', ARGV[19])
-- Not answered by the time the PBX's own timeout has ended it: the sweeper frees it.
redis.call('ZADD', live, now + (ring_s + grant + grace_s + stale_s) * 1000, member)
a.reserved = reserved + hold
watch(acct, events, ARGV[2], false, a)
return {1, 'OK', member .. '/' .. n, grant, maxsec, tostring(hold)}
