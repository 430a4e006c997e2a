-- KEYS: events, dead
-- ARGV: group, error ('' = booked), id...
-- Acknowledge and delete stream entries in one step, so no entry is ever acknowledged but
-- left in the stream (which would count as unbooked for ever). With an error, each entry is
-- first copied to the dead-letter stream with the error and its original id.
local events, dead = KEYS[1], KEYS[2]
for k = 3, #ARGV do
  local id = ARGV[k]
  if ARGV[2] ~= '' then
    local entry = redis.call('XRANGE', events, id, id)
    if entry[1] then
      local fields = entry[1][2]
      fields[#fields + 1] = 'error'
      fields[#fields + 1] = ARGV[2]
      fields[#fields + 1] = 'from'
      fields[#fields + 1] = id
      redis.call('XADD', dead, '*', unpack(fields))
    end
  end
  redis.call('XACK', events, ARGV[1], id)
  redis.call('XDEL', events, id)
end
return #ARGV - 2
