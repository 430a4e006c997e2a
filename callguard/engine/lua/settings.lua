-- KEYS: acct, events
-- ARGV: account, field, value, ...
-- Write an account's settings from the books. Its money fields start at 0 (every movement
-- reaches Redis through the books' outbox). New settings re-arm the auto top-up and move the
-- limit level either way: a raised credit limit lifts a block as a payment would.
local acct = KEYS[1]
local values = {}
for k = 2, #ARGV do values[#values + 1] = ARGV[k] end
redis.call('HSET', acct, unpack(values))
for _, name in ipairs({'balance', 'reserved', 'channels'}) do redis.call('HSETNX', acct, name, 0) end
redis.call('HDEL', acct, 'tp')
-- A new prepaid account (or a rebuilt one) has no level yet: its opening balance sets it.
-- A postpaid one has its money now, its credit limit.
local m = watched(acct)
if m.lv or m.kind == 'postpaid' then
  watch(acct, KEYS[2], ARGV[1], true, m)
else
  watch_topup(acct, KEYS[2], ARGV[1], true, m,
    num(m.balance) + num(m.credit) - num(m.reserved))
end
return 1
