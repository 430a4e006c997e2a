-- KEYS: node
-- ARGV: token, ttl_ms (0 = release), replaceable (a dead holder's token, or '')
-- Take or keep a node identity. Returns '' when it is ours now, else the live holder.
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] and cur ~= ARGV[3] then return cur end
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
elseif cur then
  redis.call('DEL', KEYS[1])
end
return ''
