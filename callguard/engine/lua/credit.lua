-- KEYS: acct, marker, events
-- ARGV: amount (signed micro-units), account
-- Apply a money movement already booked in SQL, once: the marker (named after its ledger
-- entry) stays for as long as the books' outbox still lists the movement, so a retry finds it.
-- Returns {applied (0/1), balance}
local acct, marker = KEYS[1], KEYS[2]
local amount = tonumber(ARGV[1])
if not amount or amount ~= math.floor(amount) or math.abs(amount) > MAX_MONEY then
  return redis.error_reply('amount out of range')
end
if redis.call('EXISTS', acct) == 0 then return redis.error_reply('unknown account') end
local balance = num(redis.call('HGET', acct, 'balance'))
if math.abs(balance + amount) > MAX_MONEY then return redis.error_reply('balance out of range') end
if redis.call('SET', marker, 1, 'NX') == false then return {0, balance} end
balance = balance + amount
redis.call('HSET', acct, 'balance', balance)
-- Money arrived (or an adjustment took some): the limit level follows, either way.
watch(acct, KEYS[3], ARGV[2], amount > 0)
return {1, balance}
