--[[
Stem Redis broker: claims, the small expiring key-value primitive (stem/brokers/redis.py).

Called as  EVALSHA sha 1 KEY COMMAND ARG...  (claim_many: EVALSHA sha n KEY... COMMAND ARG...;
a single claim is a claim_many of one key)

Key layout (P = prefix, default "stem:"; K = the claim's key as the caller names it):

  P.."claim:"..K   string   the claim's value; expiry (PX) is the claim's ttl, none for a
                            swap without ttl. Redis drops expired keys, so a key that exists
                            holds a live value.

Commands and their ARGV after COMMAND:
  claim_many  value1, ttl_ms1, value2, ttl_ms2, ...  (one pair per key, in KEYS order)
                                 -> the value now held for each key (ours if we set it)
  release  value                 -> 1 if the key held value and was deleted, else 0
  swap     has_expected ("1"/"0"), expected, has_new ("1"/"0"), new, ttl_ms or ""
                                 -> 1 if the key held expected (or was absent when
                                    has_expected is "0") and now holds new (or is gone)
]]

local key, cmd = KEYS[1], ARGV[1]

if cmd == 'claim_many' then
    local held = {}
    for i, k in ipairs(KEYS) do
        local current = redis.call('GET', k)
        if current then
            held[i] = current
        else
            local ttl_ms = tonumber(ARGV[2 * i + 1])
            if ttl_ms > 0 then
                redis.call('SET', k, ARGV[2 * i], 'PX', ttl_ms)
            end
            held[i] = ARGV[2 * i]
        end
    end
    return held
end

if cmd == 'release' then
    if redis.call('GET', key) == ARGV[2] then
        return redis.call('DEL', key)
    end
    return 0
end

if cmd == 'swap' then
    local current = redis.call('GET', key)
    if ARGV[2] == '1' then
        if current ~= ARGV[3] then
            return 0
        end
    elseif current then
        return 0
    end
    if ARGV[4] ~= '1' then
        redis.call('DEL', key)
    elseif ARGV[6] == '' then
        redis.call('SET', key, ARGV[5])
    elseif tonumber(ARGV[6]) > 0 then
        redis.call('SET', key, ARGV[5], 'PX', ARGV[6])
    else
        redis.call('DEL', key)
    end
    return 1
end

return redis.error_reply('unknown Stem claim command ' .. tostring(cmd))
