--[[
Stem Redis broker: every queue operation as one atomic script call (stem/brokers/redis.py).

Called as  EVALSHA sha 0 COMMAND PREFIX ARG...  The keys are built here from the prefix and
queue names, because one call may touch many queues; so this script needs a standalone (or
Sentinel-managed) Redis, not Redis Cluster.

Key layout (P = prefix, default "stem:"; Q = queue name; p = priority 0..9). Suffixes hold
no ":" so two queue names never share a key.

  P.."queues"           set     every queue name ever published to
  P.."q:"..Q..":"..p    stream  the ready and leased messages of priority p, oldest first.
                                Consumer group "stem" (one consumer, also "stem"): entries
                                not yet read by the group are ready, read (pending) ones are
                                leased. Fields: m = message id, b = body, n = deliveries so
                                far, not counting the one the entry is read for.
                                A message that becomes available again (nack, lapsed lease,
                                replay, due delay) is added again under a new entry id, so an
                                entry id names exactly one delivery.
  P.."q:"..Q..":lease"  zset    receipt -> lease expiry (ms). Written in the same call that
                                reads the entry: no entry is ever read without a lease.
                                receipt = p.."/"..entry id.."/"..token (token drawn per
                                reserve call). A receipt holds its lease while it is a member;
                                a lapsed member is moved back to its stream by the next
                                reserve, after which the old receipt settles nothing.
  P.."q:"..Q..":delayed" zset   packed message -> due time (ms). Packed form:
                                p..":"..n..":"..nonce..":"..#m..":"..m..b
  P.."q:"..Q..":notify" stream  wake-up marks, capped at about 64 (+ one node): every change
                                that may make a message available adds one. A waiter blocks
                                with XREAD from the last id it saw, so a mark added between
                                its check and its block still wakes it.
  P.."dead"             stream  dead letters of every queue; the entry id is the dead id.
                                Fields: q p m b r(eason) d(etail) t(ime, ms) n(delivery count)
  P.."dead:count"       hash    Q -> number of its dead letters

Times are the Redis server's clock (TIME), so a lease means the same on every host; only a
publisher's not-before time comes from the publisher's clock.

Commands and their ARGV after COMMAND and PREFIX:
  publish  nonce, then (queue, priority, not_before_ms or "", message id, body) per message
  reserve  lease_ms, max_n, token, peek, queue...  -> {expires, flat deliveries[, due_in_ms,
           marks]}. Each delivery is queue, receipt, message id, body, delivery count; with
           peek (a claim key prefix, "" for none) two more: the claim key K = peek..kid..":"..
           nonce read off the last "key_id":"kid","nonce":"nonce" pair in the body's last
           4 KB (a signed body's signature block, as Stem writes it), and the value of
           P.."claim:"..K, or 0 for either when there is none (or K holds no string). The
           caller compares K with the nonce it verified.
  ack      n, ttl_ms, (claim key K, value) x n, (queue, receipt)...  -> number of leases
           that were held. The n claims (keys P.."claim:"..K, see redis_claims.lua; the
           replay nonces of the acked messages) are set unless live, all for ttl_ms, in the
           same call.
  extend   lease_ms, (queue, receipt)...      -> {expires, 1|0 per receipt}
  nack     queue, receipt, delay_ms, has_body ("1"/"0"), body -> 1|0
  dead     queue, receipt, reason, detail     -> 1|0
  replay / dlq_purge  queue filter or "", dead id...  -> number moved / deleted
  stats    queue...                           -> {ready, delayed, reserved, dead} per queue
  purge    queue                              -> number of ready and delayed messages deleted
  drop     queue                              -> number of messages deleted (all its keys
                                                 and its name in P.."queues" go)
]]

local cmd = ARGV[1]
local P = ARGV[2]
local GROUP = 'stem'

local function now_ms()
    local t = redis.call('TIME')
    return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function qkey(q, suffix)
    return P .. 'q:' .. q .. ':' .. suffix
end

local function fields(flat)
    local t = {}
    for i = 1, #flat, 2 do
        t[flat[i]] = flat[i + 1]
    end
    return t
end

local ensured = {}
local function add_ready(q, p, mid, body, n)
    local key = qkey(q, p)
    if not ensured[key] then
        if redis.call('EXISTS', key) == 0 then
            -- id 0: the group must see every entry, including the one added next
            redis.call('XGROUP', 'CREATE', key, GROUP, '0', 'MKSTREAM')
        end
        ensured[key] = true
    end
    redis.call('XADD', key, '*', 'm', mid, 'b', body, 'n', n)
end

local function pack(p, n, nonce, mid, body)
    return p .. ':' .. n .. ':' .. nonce .. ':' .. #mid .. ':' .. mid .. body
end

-- nil unless s is in the packed form (written by publish, or by nack with a delay)
local function unpack_message(s)
    local p, n, _, len, pos = string.match(s, '^(%d):(%d+):([^:]*):(%d+):()')
    len = tonumber(len)
    if not p or len == 0 or pos + len - 1 > #s then
        return nil
    end
    return p, n, string.sub(s, pos, pos + len - 1), string.sub(s, pos + len)
end

-- Add a dead letter (see the key layout).
local function bury(q, p, mid, body, n, reason, detail)
    redis.call(
        'XADD', P .. 'dead', '*', 'q', q, 'p', p, 'm', mid, 'b', body,
        'r', reason, 'd', detail, 't', now_ms(), 'n', n
    )
    redis.call('HINCRBY', P .. 'dead:count', q, 1)
end

-- What is wrong with a stream entry's fields, or nil. Entries this script writes are always
-- right; only a writer to Redis can add another, and it must not stop the queue (the
-- caller reads its fields) nor vanish: it is dead-lettered as malformed.
local function entry_problem(f)
    if type(f.m) ~= 'string' or f.m == '' then
        return 'no message id (field m)'
    end
    if type(f.b) ~= 'string' then
        return 'no body (field b)'
    end
    if not tonumber(f.n) then
        return 'delivery count (field n) is not a number'
    end
    return nil
end

local function bury_entry(q, p, id, f, problem)
    local mid = (type(f.m) == 'string' and f.m ~= '') and f.m or id
    bury(q, p, mid, f.b or '', 1, 'malformed', 'storage entry ' .. id .. ': ' .. problem)
end

-- add_ready inside reserve, where one stream key that is not a stream (written outside
-- Stem) must not fail the reserve of every queue: the message is dead-lettered instead,
-- kept for a replay once the key is mended.
local function add_ready_or_bury(q, p, mid, body, n)
    local ok = pcall(add_ready, q, p, mid, body, n)
    if not ok then
        bury(q, p, mid, body, n, 'malformed', 'storage key ' .. qkey(q, p) .. ' is not a stream')
    end
end

local notified = {}
local function notify(q)
    if not notified[q] then
        redis.call('XADD', qkey(q, 'notify'), 'MAXLEN', '~', 64, '*', 'x', '1')
        notified[q] = true
    end
end

local known = {}
local function remember(q)
    if not known[q] then
        redis.call('SADD', P .. 'queues', q)
        known[q] = true
    end
end

-- End the lease a receipt names and take its entry out of the stream.
-- Returns held (boolean), priority, entry fields (only when asked for and not gone).
local function take_leased(q, receipt, want_fields)
    if redis.call('ZREM', qkey(q, 'lease'), receipt) == 0 then
        return false
    end
    local p, id = string.match(receipt, '^(%d)/(%d+%-%d+)/')
    if not p then
        return true
    end
    local key = qkey(q, p)
    local found = want_fields and redis.call('XRANGE', key, id, id) or {}
    redis.call('XACK', key, GROUP, id)
    redis.call('XDEL', key, id)
    if #found == 0 then
        return true
    end
    return true, p, fields(found[1][2])
end

-- Move due delayed messages into their streams, in due order.
local function promote(q, now)
    local key = qkey(q, 'delayed')
    local due = redis.call('ZRANGEBYSCORE', key, '-inf', now, 'LIMIT', 0, 1000)
    for _, packed in ipairs(due) do
        local p, n, mid, body = unpack_message(packed)
        if p then
            add_ready_or_bury(q, p, mid, body, n)
        else
            bury(q, '0', 'delayed', packed, 0, 'malformed', 'a delayed entry is not a packed message')
        end
    end
    if #due > 0 then
        redis.call('ZREM', key, unpack(due))
    end
end

-- Put messages whose lease lapsed back at the end of their streams, counting that delivery.
local function reclaim(q, now, limit)
    local lapsed = redis.call('ZRANGEBYSCORE', qkey(q, 'lease'), '-inf', now, 'LIMIT', 0, limit)
    for _, receipt in ipairs(lapsed) do
        local _, p, f = take_leased(q, receipt, true)
        if f then
            local problem = entry_problem(f)
            if problem then
                bury_entry(q, p, string.match(receipt, '/(.-)/') or receipt, f, problem)
            else
                add_ready_or_bury(q, p, f.m, f.b, tonumber(f.n) + 1)
            end
        end
    end
    return #lapsed
end

local function queue_args(from)
    local queues = {}
    for i = from, #ARGV do
        queues[#queues + 1] = ARGV[i]
    end
    return queues
end

if cmd == 'publish' then
    local now = now_ms()
    local nonce = ARGV[3]
    for i = 4, #ARGV, 5 do
        local q, p, not_before = ARGV[i], ARGV[i + 1], ARGV[i + 2]
        if not_before ~= '' and tonumber(not_before) > now then
            local packed = pack(p, 0, nonce .. '.' .. i, ARGV[i + 3], ARGV[i + 4])
            redis.call('ZADD', qkey(q, 'delayed'), not_before, packed)
        else
            add_ready(q, p, ARGV[i + 3], ARGV[i + 4], 0)
        end
        remember(q)
        notify(q)
    end
    return (#ARGV - 3) / 5
end

-- The claim key of a signed body's replay nonce, and the claim's value (see reserve). Only
-- the body's last PEEK_TAIL bytes are searched: as Stem writes a body, only the rest of the
-- signature block, "task" (at most 255 characters) and "version" follow the pair, and a
-- long body must not cost a scan of all of it on every reserve. A pair further up is not
-- read (the worker then reads its claim itself). A claim key holding something other than a
-- string (only a writer to the store can put one there) reads as nothing, instead of an
-- error that would stop the reserve after some leases were taken.
local PEEK_TAIL = 4096
local function peek_nonce(body, peek)
    local at, from = nil, math.max(1, #body - PEEK_TAIL + 1)
    while true do
        local found = string.find(body, '"key_id":"', from, true)
        if not found then
            break
        end
        at, from = found, found + 1
    end
    local kid, nonce
    if at then
        kid, nonce = string.match(body, '^"key_id":"([^"\\]+)","nonce":"([^"\\]+)"', at)
    end
    if not kid then
        return 0, 0
    end
    local k = peek .. kid .. ':' .. nonce
    local held = redis.pcall('GET', P .. 'claim:' .. k)
    if type(held) == 'table' then
        return 0, 0
    end
    return k, held or 0
end

if cmd == 'reserve' then
    local lease_ms, max_n, token, peek = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5], ARGV[6]
    local queues = queue_args(7)
    local now = now_ms()
    local expires = now + lease_ms
    for _, q in ipairs(queues) do
        promote(q, now)
        reclaim(q, now, 1000)
    end
    local out, got, regrouped = {}, 0, {}
    for p = 9, 0, -1 do
        for _, q in ipairs(queues) do
            local key = qkey(q, p)
            -- Read again after burying malformed entries, so they never cost a reserve
            -- the valid messages behind them.
            local again = got < max_n and redis.call('EXISTS', key) == 1
            while again do
                again = false
                local res = redis.pcall(
                    'XREADGROUP', 'GROUP', GROUP, GROUP, 'COUNT', max_n - got, 'STREAMS', key, '>'
                )
                if type(res) == 'table' and res.err then
                    -- A stream Stem did not create (written straight into Redis) has no
                    -- group: give it one that sees every entry, which is then checked like
                    -- any other. Any other error (a key of another type) skips this key
                    -- rather than fail the reserve of every queue behind it.
                    if string.find(res.err, 'NOGROUP', 1, true) and not regrouped[key] then
                        regrouped[key] = true
                        redis.pcall('XGROUP', 'CREATE', key, GROUP, '0')
                        again = true
                    end
                    res = nil
                end
                if res then
                    local lkey = qkey(q, 'lease')
                    for _, e in ipairs(res[1][2]) do
                        local f = fields(e[2])
                        local problem = entry_problem(f)
                        if problem then
                            redis.call('XACK', key, GROUP, e[1])
                            redis.call('XDEL', key, e[1])
                            bury_entry(q, p, e[1], f, problem)
                            again = got < max_n
                        else
                            local receipt = p .. '/' .. e[1] .. '/' .. token
                            redis.call('ZADD', lkey, expires, receipt)
                            out[#out + 1] = q
                            out[#out + 1] = receipt
                            out[#out + 1] = f.m
                            out[#out + 1] = f.b
                            out[#out + 1] = tonumber(f.n) + 1
                            if peek ~= '' then
                                local k, held = peek_nonce(f.b, peek)
                                out[#out + 1] = k
                                out[#out + 1] = held
                            end
                            got = got + 1
                        end
                    end
                end
            end
        end
    end
    if got > 0 then
        return {expires, out}
    end
    -- Nothing ready: tell the caller when something may become available by itself (a due
    -- delay or a lapsing lease) and where to wait for anything else.
    local due_in, marks = -1, {}
    for _, q in ipairs(queues) do
        for _, suffix in ipairs({'delayed', 'lease'}) do
            local first = redis.call('ZRANGE', qkey(q, suffix), 0, 0, 'WITHSCORES')
            if #first > 0 then
                local wait = math.max(1, tonumber(first[2]) - now)
                if due_in < 0 or wait < due_in then
                    due_in = wait
                end
            end
        end
        local last = redis.call('XREVRANGE', qkey(q, 'notify'), '+', '-', 'COUNT', 1)
        marks[#marks + 1] = (#last > 0) and last[1][1] or '0-0'
    end
    return {expires, out, due_in, marks}
end

if cmd == 'ack' then
    -- The acks first, then the claims (set unless live, as redis_claims.lua's claim_many).
    -- Over maxmemory, Redis refuses a script whose first write needs memory (SET); the
    -- acks free memory and, run first, let the claims through, so a full server still
    -- drains instead of refusing every ack (and running every task again).
    local first = 5 + 2 * tonumber(ARGV[3])
    local n = 0
    for i = first, #ARGV, 2 do
        if take_leased(ARGV[i], ARGV[i + 1]) then
            n = n + 1
        end
    end
    for i = 5, first - 1, 2 do
        redis.call('SET', P .. 'claim:' .. ARGV[i], ARGV[i + 1], 'PX', ARGV[4], 'NX')
    end
    return n
end

if cmd == 'extend' then
    local expires = now_ms() + tonumber(ARGV[3])
    local out = {expires}
    for i = 4, #ARGV, 2 do
        local lkey = qkey(ARGV[i], 'lease')
        if redis.call('ZSCORE', lkey, ARGV[i + 1]) then
            redis.call('ZADD', lkey, expires, ARGV[i + 1])
            out[#out + 1] = 1
        else
            out[#out + 1] = 0
        end
    end
    return out
end

if cmd == 'nack' then
    local q, receipt, delay_ms = ARGV[3], ARGV[4], tonumber(ARGV[5])
    local held, p, f = take_leased(q, receipt, true)
    if not held then
        return 0
    end
    if f then
        local n, body = f.n, f.b
        if ARGV[6] == '1' then
            n, body = 0, ARGV[7]
        end
        if delay_ms > 0 then
            local nonce = string.match(receipt, '^%d/([^/]+)/')
            redis.call('ZADD', qkey(q, 'delayed'), now_ms() + delay_ms, pack(p, n, nonce, f.m, body))
        else
            add_ready(q, p, f.m, body, n)
        end
        notify(q)
    end
    return 1
end

if cmd == 'dead' then
    local q, receipt = ARGV[3], ARGV[4]
    local held, p, f = take_leased(q, receipt, true)
    if not held then
        return 0
    end
    if f then
        bury(q, p, f.m, f.b, tonumber(f.n) + 1, ARGV[5], ARGV[6])
    end
    return 1
end

if cmd == 'replay' or cmd == 'dlq_purge' then
    local dkey, ckey, only = P .. 'dead', P .. 'dead:count', ARGV[3]
    local n = 0
    for i = 4, #ARGV do
        local found = redis.call('XRANGE', dkey, ARGV[i], ARGV[i])
        if #found > 0 then
            local f = fields(found[1][2])
            if only == '' or f.q == only then
                if cmd == 'replay' then
                    add_ready(f.q, f.p, f.m, f.b, 0)
                    remember(f.q)
                    notify(f.q)
                end
                redis.call('XDEL', dkey, ARGV[i])
                if redis.call('HINCRBY', ckey, f.q, -1) <= 0 then
                    redis.call('HDEL', ckey, f.q)
                end
                n = n + 1
            end
        end
    end
    return n
end

-- A count read from a key of another type (written outside Stem) is 0: reserve passes
-- over such keys, and they must not fail the depths of every queue.
local function count(...)
    return tonumber(redis.pcall(...)) or 0
end

if cmd == 'stats' then
    local now = now_ms()
    local out = {}
    for _, q in ipairs(queue_args(3)) do
        local total = 0
        for p = 0, 9 do
            total = total + count('XLEN', qkey(q, p))
        end
        -- A lapsed lease not yet reclaimed counts as ready, like a due delay not yet promoted.
        local reserved = count('ZCOUNT', qkey(q, 'lease'), '(' .. now, '+inf')
        local due = count('ZCOUNT', qkey(q, 'delayed'), '-inf', now)
        local delayed = count('ZCARD', qkey(q, 'delayed')) - due
        local dead = count('HGET', P .. 'dead:count', q)
        out[#out + 1] = {total - reserved + due, delayed, reserved, dead}
    end
    return out
end

if cmd == 'purge' then
    local q = ARGV[3]
    local now = now_ms()
    while reclaim(q, now, 1000) > 0 do
    end
    local n = 0
    for p = 0, 9 do
        local key = qkey(q, p)
        if redis.call('EXISTS', key) == 1 then
            -- A stream written outside Stem has no group yet: one that sees every entry.
            redis.pcall('XGROUP', 'CREATE', key, GROUP, '0')
            while true do
                local res = redis.pcall(
                    'XREADGROUP', 'GROUP', GROUP, GROUP, 'COUNT', 500, 'STREAMS', key, '>'
                )
                if not res or res.err or #res[1][2] == 0 then
                    break
                end
                local ids = {}
                for _, e in ipairs(res[1][2]) do
                    ids[#ids + 1] = e[1]
                end
                redis.call('XACK', key, GROUP, unpack(ids))
                redis.call('XDEL', key, unpack(ids))
                n = n + #ids
            end
        end
    end
    local dkey = qkey(q, 'delayed')
    n = n + redis.call('ZCARD', dkey)
    redis.call('DEL', dkey)
    return n
end

if cmd == 'drop' then
    local q = ARGV[3]
    local n = redis.call('ZCARD', qkey(q, 'delayed'))
    local keys = {qkey(q, 'delayed'), qkey(q, 'lease'), qkey(q, 'notify')}
    for p = 0, 9 do
        local key = qkey(q, p)
        n = n + redis.call('XLEN', key)
        keys[#keys + 1] = key
    end
    redis.call('DEL', unpack(keys))
    redis.call('SREM', P .. 'queues', q)
    return n
end

return redis.error_reply('unknown Stem broker command ' .. tostring(cmd))
