-- KEYS: acct, events, dead, marker...
-- ARGV: books_balance, "ACCOUNT/", booked session...
-- Rebuild: the account's balance is the books' minus the charges of commits still in the
-- shard's streams that the books have not booked (ARGV lists those they have); the
-- movements the books' outbox still lists are marked applied (the books' balance has them).
-- In one script, so a commit landing meanwhile is counted exactly once.
local prefix = ARGV[2]
local booked = {}
for k = 3, #ARGV do booked[ARGV[k]] = true end
local unbooked = 0
for stream = 2, 3 do
  for _, entry in ipairs(redis.call('XRANGE', KEYS[stream], '-', '+')) do
    local f, t = entry[2], {}
    for k = 1, #f, 2 do t[f[k]] = f[k + 1] end
    if t.type == 'commit' and t.session and string.sub(t.session, 1, #prefix) == prefix
        and not booked[t.session] then
      unbooked = unbooked + num(t.cost)
    end
  end
end
redis.call('HSET', KEYS[1], 'balance', num(ARGV[1]) - unbooked)
for k = 4, #KEYS do redis.call('SET', KEYS[k], 1) end
return unbooked
