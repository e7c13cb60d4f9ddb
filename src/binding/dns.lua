-- DNS over nginx's cosockets: the lookups a write needs before its turn,
-- and the resolver's round in the worker that holds the resolver lease.
-- The messages are built and read in Rust (raw.dns_*); this file only
-- carries them: UDP to each name server in turn, TCP when a reply was
-- truncated, each lookup of a round in a light thread of its own (and,
-- for an SRV name, then each of its targets).
local raw = ...

local ipairs, pcall, tostring = ipairs, pcall, tostring
local byte, char = string.byte, string.char

-- Datagrams that are not the reply awaited (another id, a late reply to
-- an earlier query) before the attempt gives up.
local STRAYS_MAX = 8

local function udp(server, packet, timeout)
    local sock = ngx.socket.udp()
    sock:settimeout(timeout * 1000)
    local ok, err = sock:setpeername(server.host, server.port)
    if not ok then
        return nil, "udp " .. server.host .. ":" .. server.port .. ": " .. tostring(err)
    end
    ok, err = sock:send(packet)
    if not ok then
        sock:close()
        return nil, "udp send: " .. tostring(err)
    end
    for _ = 1, STRAYS_MAX do
        local data, rerr = sock:receive(4096)
        if not data then
            sock:close()
            return nil, server.host .. ":" .. server.port .. ": " .. tostring(rerr)
        end
        local verdict = raw.dns_read(packet, data)
        if verdict then
            sock:close()
            return data, nil, verdict
        end
    end
    sock:close()
    return nil, server.host .. ":" .. server.port .. ": no reply to the query among the datagrams"
end

local function tcp(server, packet, timeout)
    local sock = ngx.socket.tcp()
    sock:settimeout(timeout * 1000)
    local ok, err = sock:connect(server.host, server.port)
    if not ok then
        return nil, "tcp " .. server.host .. ":" .. server.port .. ": " .. tostring(err)
    end
    local n = #packet
    ok, err = sock:send(char(math.floor(n / 256), n % 256) .. packet)
    local len = ok and sock:receive(2)
    local data = len and sock:receive(byte(len, 1) * 256 + byte(len, 2))
    sock:close()
    if not data then
        return nil, "tcp " .. server.host .. ":" .. server.port .. ": " .. tostring(err or "no reply")
    end
    return data
end

-- Fills entry.replies and entry.errors, one per packet (record type).
local function ask(entry)
    entry.replies, entry.errors = {}, {}
    for i, packet in ipairs(entry.packets) do
        local reply, err, verdict
        for _, server in ipairs(entry.servers) do
            reply, err, verdict = udp(server, packet, entry.attempt)
            if verdict == "truncated" then
                reply, err = tcp(server, packet, entry.attempt)
            end
            if reply then
                break
            end
        end
        entry.replies[i] = reply or false
        entry.errors[i] = err
    end
    -- An SRV answer names targets: their addresses are asked next, each
    -- in a light thread of its own, before the entry is read.
    if entry.srv then
        local subs = raw.dns_targets(entry)
        if subs then
            raw.dns_lookup_all(subs)
            entry.targets = subs
        end
    end
end

-- Runs every lookup of `plan` at once, each in a light thread.
function raw.dns_lookup_all(plan)
    local threads = {}
    for i, entry in ipairs(plan) do
        threads[i] = ngx.thread.spawn(ask, entry)
    end
    for i, t in ipairs(threads) do
        local ok, err = ngx.thread.wait(t)
        if not ok then
            plan[i].replies, plan[i].errors = {}, { tostring(err) }
        end
    end
end

local running = false

local function run(premature, jobs)
    if not premature then
        local ok, err = pcall(raw.dns_lookup_all, jobs)
        if not ok then
            ngx.log(ngx.ERR, "ngx.dyups: resolver lookups failed: ", err)
        end
        for _, job in ipairs(jobs) do
            local update = raw.dns_record(job)
            if update then
                local done, why = pcall(raw.in_turn, raw.dns_apply, nil, update)
                if not done then
                    ngx.log(ngx.ERR, "ngx.dyups: resolver write failed: ", why)
                end
            end
        end
    end
    running = false
end

-- After each refresh tick: in the worker that holds the resolver lease,
-- the lookups due now, in a timer of their own (the tick's timer must not
-- wait for the DNS). A worker that exits gives the lease up.
return function(premature)
    if premature then
        raw.dns_release()
        return
    end
    if running then
        return
    end
    local jobs = raw.dns_due()
    if not jobs then
        return
    end
    running = true
    local ok, err = ngx.timer.at(0, run, jobs)
    if not ok then
        running = false
        ngx.log(ngx.ERR, "ngx.dyups: could not start the resolver's lookups: ", err)
    end
end
