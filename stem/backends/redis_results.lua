--[[
Stem Redis result backend scripts (stem/backends/redis.py).

Called as  EVALSHA sha 1 KEY COMMAND ARG...

Key layout (P = prefix, default "stem:"):

  P.."result:"..TASK_ID    hash     s = state, b = record body; PEXPIRE = the record's ttl
                                    (none when stored without a ttl)
  P.."members:"..KEY       set      unique members of a group/chord counter; PEXPIRE = ttl
  P.."result:"..TASK_ID    channel  (pub/sub, not a key) state.."\n"..body is published here
                                    when a record reaches a ready state, after it is written,
                                    so a waiter that subscribed and then read the record misses
                                    nothing, and needs no read after the message

Commands and their ARGV after COMMAND:
  store   state, body, ttl_ms or "", ready ("1"/"0"), channel  -> 1
  member  member, ttl_ms or ""                                 -> the set's size
]]

local key, cmd = KEYS[1], ARGV[1]

if cmd == 'store' then
    redis.call('DEL', key)
    redis.call('HSET', key, 's', ARGV[2], 'b', ARGV[3])
    if ARGV[4] ~= '' then
        redis.call('PEXPIRE', key, ARGV[4])
    end
    if ARGV[5] == '1' then
        redis.call('PUBLISH', ARGV[6], ARGV[2] .. '\n' .. ARGV[3])
    end
    return 1
end

if cmd == 'member' then
    redis.call('SADD', key, ARGV[2])
    if ARGV[3] ~= '' then
        redis.call('PEXPIRE', key, ARGV[3])
    end
    return redis.call('SCARD', key)
end

return redis.error_reply('unknown Stem result command ' .. tostring(cmd))
