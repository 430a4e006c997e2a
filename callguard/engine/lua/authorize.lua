-- KEYS: acct, session, live, seq, events
-- ARGV: now, account, channel, direction, destination, plan, has_rate, prefix, rate,
--       connect_fee, initial, subsequent, rate_blocked, quota, node, ring_s, grace_s, stale_s,
--       blind ('1': allowed while the PBX is out of sight, under fail_open)
-- Returns {allow, reason, session_id, grant, maxsec, extra}.
-- A deny writes nothing but the account's counters (setups, fraud strikes): a flood of
-- denied setups leaves no footprint in Redis.
local acct, sess, live, seq, events = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local member = ARGV[2] .. '/' .. ARGV[3]
local now = clock(ARGV[1])
local direction, destination = ARGV[4], ARGV[5]
local ring_s, grace_s, stale_s = num(ARGV[16]), num(ARGV[17]), num(ARGV[18])

local cur = redis.call('HMGET', sess, 'n', 'st', 'dir', 'dst', 'g', 'mx')
if cur[2] == 'auth' and cur[3] == direction and cur[4] == destination then
  -- The same request again on this channel (a dialplan that retries the number): the same
  -- answer, and the ring allowance starts again, as the PBX's own timeout does.
  redis.call('ZADD', live, now + (ring_s + num(cur[5]) + grace_s + stale_s) * 1000, member)
  return {1, 'OK', member .. '/' .. cur[1], num(cur[5]), num(cur[6]), ''}
end

local a = redis.call('HMGET', acct, 'status', 'plan')
local status = a[1]
if not status then return {0, 'UNKNOWN_ACCOUNT', '', 0, 0, ''} end
if a[2] ~= ARGV[6] then return {0, 'PLAN', '', 0, 0, a[2] or ''} end
if cur[2] == 'auth' or cur[2] == 'ans' then
  -- The channel has moved on to another call: the one before it ended now.
  finish(acct, sess, live, events, member, now, '', 'superseded', 'reported', grace_s, '')
end

a = redis.call('HMGET', acct, 'balance', 'credit', 'reserved', 'channels', 'max_channels',
  'cps', 'cps_s', 'cps_n', 'lv', 'cpm', 'cpm_m', 'cpm_n', 'vmax', 'bp', 'fd_m', 'fd_n', 'fz',
  'warn', 'tpb', 'tp', 'kind', 'vh', 'vs', 'vp')
local balance, credit, reserved = num(a[1]), num(a[2]), num(a[3])
local r, cf, i, s = num(ARGV[9]), num(ARGV[10]), num(ARGV[11]), num(ARGV[12])
local minute = idiv(now, 60000)

local function deny(reason) return {0, reason, '', 0, 0, ''} end
-- A hacked PBX shows as calls hitting the channel cap or the rate limits again and again.
local function strike(reason)
  local count = ((num(a[15]) == minute) and num(a[16]) or 0) + 1
  redis.call('HSET', acct, 'fd_m', minute, 'fd_n', count)
  if count == STRIKES then suspect(acct, events, ARGV[2], string.lower(reason)) end
  return deny(reason)
end
if status == 'blocked' then return deny('BLOCKED') end
-- The seeds' automatic block: with nothing left, no calls either way until money arrives.
if num(a[9]) == 2 or balance + credit - reserved < CENT then return deny('NO_FUNDS') end
if a[14] and a[14] ~= '' then  -- the account's own blocked prefixes, rated or not
  for p in string.gmatch(a[14], '%S+') do
    if string.sub(destination, 1, #p) == p then return deny('DEST_BLOCKED') end
  end
end
if ARGV[7] == '0' then return deny('NO_RATE') end
if ARGV[13] == '1' then return deny('DEST_BLOCKED') end
local max_channels = num(a[5])
if max_channels > 0 and num(a[4]) >= max_channels then return strike('CHANNEL_LIMIT') end
local cps = num(a[6])
if cps > 0 then
  local second = idiv(now, 1000)
  local count = (num(a[7]) == second) and num(a[8]) or 0
  if count >= cps then return strike('RATE_LIMIT') end
  redis.call('HSET', acct, 'cps_s', second, 'cps_n', count + 1)
end
local cpm = num(a[10])
if cpm > 0 then
  local count = (num(a[11]) == minute) and num(a[12]) or 0
  if count >= cpm then return strike('RATE_LIMIT') end
  redis.call('HSET', acct, 'cpm_m', minute, 'cpm_n', count + 1)
end

local maxsec = affordable(balance + credit - reserved, r, cf, i, s)
if maxsec < 0 then return deny('NO_FUNDS') end
local grant = slice_target(0, num(ARGV[14]), i, s)
if grant > maxsec then grant = maxsec end
local hold = cost_of(grant, r, cf)
local vmax = num(a[13])
if vmax > 0 and spent_last_hour({a[22], a[23], a[24]}, now, reserved) + hold > vmax then
  local hour = idiv(now, HOUR)
  if num(a[17]) ~= hour then
    redis.call('HSET', acct, 'fz', hour)
    suspect(acct, events, ARGV[2], 'velocity_limit')
  end
  return deny('VELOCITY_LIMIT')
end

redis.call('HINCRBY', acct, 'reserved', hold)
redis.call('HINCRBY', acct, 'channels', 1)
-- Attempts are numbered per shard, so a session id is never used twice, even by a
-- channel that lives longer than a finished session is remembered.
local n = redis.call('INCR', seq)
redis.call('DEL', sess)
redis.call('HSET', sess, 'n', n, 'st', 'auth', 'acct', ARGV[2], 'ch', ARGV[3], 'dir', direction,
  'dst', destination, 'setup', now, 'node', ARGV[15], 'pfx', ARGV[8], 'r', r, 'cf', cf, 'i', i,
  's', s, 'g', grant, 'hold', hold, 'fin', 0, 'mx', maxsec, 'bl', ARGV[19])
-- Not answered by the time the PBX's own timeout has ended it: the sweeper frees it.
redis.call('ZADD', live, now + (ring_s + grant + grace_s + stale_s) * 1000, member)
watch(acct, events, ARGV[2], false, false,
  {balance, credit, reserved + hold, a[18], a[9], a[19], a[20], a[21]})
return {1, 'OK', member .. '/' .. n, grant, maxsec, ''}
