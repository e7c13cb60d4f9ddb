-- The cosocket side of active health checks, loaded once per Lua VM by the
-- Rust module. Which servers are due, the leases and what a result means are
-- decided in Rust (src/health); this file only runs the probes, in runners:
-- long-lived ngx.timer callbacks, as many as the worker ever had probes in
-- flight at once (at most `cap`, MAX_IN_FLIGHT in src/health/prober.rs),
-- each taking the next probe from the queue the refresh tick fills and
-- waiting on a semaphore when there is none. A timer per probe cost
-- lua-nginx-module's fake request and coroutine each time.
--
-- A probe is a cosocket that connects, optionally does a TLS handshake,
-- sends the check request and reads the 12 bytes of an HTTP status line
-- ("HTTP/1.1 200"), which decide it. With check_keepalive_requests N > 1 it
-- then reads the rest of the answer (at most HEAD_MAX bytes of header and
-- BODY_MAX of body; anything longer, or delimited by the close, closes
-- instead) so the connection can carry the next probe, up to N in all; a
-- huge or endless reply never costs more.
--
-- A probe is its token and its server's target (a table the Rust side
-- builds once per table generation: host, port, request, pool options).
-- `record(token, status, err, elapsed_ms, more)` takes every outcome and,
-- when `more`, gives the next probe for the same runner (token, target): a
-- server that was due while the worker had as many probes in flight as it
-- may, so the probes go on at that many at once between the refresh ticks.
local record, cap = ...

local floor, tonumber, min = math.floor, tonumber, math.min
local find, sub, lower, match = string.find, string.sub, string.lower, string.match
-- Taken from `ngx` at the first start: the module also loads outside nginx.
local tcp, timer_at, now, update_time, exiting, log, WARN
local semaphore

-- How long an idle runner waits for a probe before it looks at
-- ngx.worker.exiting again: an exiting worker (a reload) waits no longer
-- for its runners.
local IDLE_WAIT = 1

-- What a kept connection's answer may hold besides its status line.
local HEAD_MAX = 16384
local BODY_MAX = 65536
-- Longest chunk-size line of a chunked body.
local CHUNK_LINE_MAX = 64
local TRAILERS_MAX = 32
-- Idle connections kept per server address: the probes of the same
-- address in several upstreams share its pool, each taking a connection
-- while it runs; as many as a worker runs at once (MAX_IN_FLIGHT in
-- src/health/prober.rs), so none is closed for want of room.
local POOL_SIZE = 64

local function elapsed_ms(t0)
    update_time()
    return floor((now() - t0) * 1000 + 0.5)
end

-- Whether the time for reading the rest of an answer ran out.
local function past(deadline)
    update_time()
    return now() > deadline
end

-- `buf` from `pos` on, with what the socket has next appended (at most
-- `max` bytes more): nil on an error or past `deadline`. receiveany gives
-- what the cosocket's buffer holds (a loopback answer is there whole after
-- the status line's read) in one C call, and never more than asked, so a
-- reply without line ends cannot grow a buffer.
local function more(sock, buf, pos, max, deadline)
    if past(deadline) then return nil end
    local data = sock:receiveany(max)
    if not data then return nil end
    return sub(buf, pos) .. data
end

-- The line at `pos` of `buf`, reading more while it has no end: `buf`,
-- `pos` (where the line starts, 1 once more was read) and the position of
-- its CRLF; nil once over `max` bytes went by without one, on an error or
-- past `deadline`.
local function line_at(sock, buf, pos, max, deadline)
    local eol = find(buf, "\r\n", pos, true)
    while not eol do
        if #buf - pos > max then return nil end
        buf = more(sock, buf, pos, max, deadline)
        if not buf then return nil end
        pos = 1
        eol = find(buf, "\r\n", 1, true)
    end
    return buf, pos, eol
end

-- A chunked body, to its last chunk and trailers, at most BODY_MAX bytes,
-- `buf` holding what was read of it from `pos`. True when it ended with
-- nothing after it.
local function drain_chunks(sock, buf, pos, deadline)
    local total = 0
    while true do
        local eol
        buf, pos, eol = line_at(sock, buf, pos, CHUNK_LINE_MAX, deadline)
        if not buf then return false end
        if eol - pos > CHUNK_LINE_MAX then return false end
        local size = tonumber(match(buf, "^%x+", pos) or "", 16)
        if not size then return false end
        pos = eol + 2
        if size == 0 then
            -- Trailers, each a line, then an empty line.
            for _ = 1, TRAILERS_MAX do
                buf, pos, eol = line_at(sock, buf, pos, HEAD_MAX, deadline)
                if not buf then return false end
                if eol == pos then return eol + 1 == #buf end
                pos = eol + 2
            end
            return false
        end
        total = total + size
        if total > BODY_MAX then return false end
        -- The chunk and its CRLF.
        local need = size + 2 - (#buf - pos + 1)
        if need > 0 then
            local data = sock:receive(need)
            if not data then return false end
            buf, pos = sub(buf, pos) .. data, 1
        end
        if sub(buf, pos + size, pos + size + 1) ~= "\r\n" then return false end
        pos = pos + size + 2
        if past(deadline) then return false end
    end
end

-- Reads the rest of an answer whose status line (`version`, `status`) was
-- read, so the connection can carry another probe. False when it cannot:
-- the server closes it, the body is delimited by the close or too long,
-- bytes follow the answer, reading fails, or it takes longer than the
-- probe's timeout (a server that drips its answer holds no probe for long).
local function drain(sock, target, version, status)
    update_time()
    local deadline = now() + target.timeout / 1000
    local buf = sock:receiveany(HEAD_MAX)
    if not buf then return false end
    local stop = find(buf, "\r\n\r\n", 1, true)
    while not stop do
        if #buf > HEAD_MAX then return false end
        -- The head's end may straddle the two reads.
        local from = #buf - 2
        buf = more(sock, buf, 1, HEAD_MAX, deadline)
        if not buf then return false end
        stop = find(buf, "\r\n\r\n", from > 0 and from or 1, true)
    end
    if stop > HEAD_MAX then return false end
    -- The headers, each after a "\n": the status line's rest comes first.
    local head = lower(sub(buf, 1, stop + 1))
    local pos = stop + 4
    if find(head, "\nconnection:%s*close") then return false end
    if version == "1.0" and not find(head, "\nconnection:%s*keep%-alive") then return false end
    local left = #buf - pos + 1
    if target.head or status < 200 or status == 204 or status == 304 then return left == 0 end
    if find(head, "\ntransfer%-encoding:%s*chunked") then
        return drain_chunks(sock, buf, pos, deadline)
    end
    local len = tonumber(match(head, "\ncontent%-length:%s*(%d+)"))
    if not len or len > BODY_MAX or left > len then return false end
    return left == len or sock:receive(len - left) ~= nil
end

-- A connection to the target's server: one kept from an earlier probe (its
-- TLS handshake done then), or a new one.
local function open(target)
    local sock = tcp()
    sock:settimeout(target.timeout)
    local opts = target.keepalive > 1 and target.pool_opts or nil
    local ok, err
    if target.port == 0 then
        ok, err = sock:connect(target.host, opts)
    else
        ok, err = sock:connect(target.host, target.port, opts)
    end
    if not ok then
        if err == "timeout" then
            return nil, err
        end
        return nil, "connect: " .. tostring(err)
    end
    if target.tls and sock:getreusedtimes() == 0 then
        ok, err = sock:sslhandshake(nil, nil, false)
        if not ok then
            sock:close()
            if err == "timeout" then
                return nil, err
            end
            return nil, "tls: " .. tostring(err)
        end
    end
    return sock
end

local function run(target, retried)
    local sock, err = open(target)
    if not sock then
        return nil, err
    end
    if not target.send then
        sock:close()
        return nil, nil
    end
    local reused = sock:getreusedtimes()
    local ok, line
    ok, err = sock:send(target.send)
    if ok then
        line, err = sock:receive(12)
    end
    if not line then
        sock:close()
        if reused > 0 and not retried and err ~= "timeout" then
            -- The server closed the kept connection while it idled: that
            -- says nothing about the server; ask on a new one.
            return run(target, true)
        end
        return nil, err
    end
    local version, code = line:match("^HTTP/(%d%.%d) (%d%d%d)$")
    local status = tonumber(code)
    if not status then
        sock:close()
        return nil, "bad status line"
    end
    -- This probe was the connection's (reused + 1)th.
    if reused + 1 < target.keepalive and drain(sock, target, version, status) then
        sock:setkeepalive(target.idle, POOL_SIZE)
    else
        sock:close()
    end
    return status, nil
end

-- The probes the refresh tick gave, in order, waiting for a runner: token
-- and target at `first`, `first + 1`, ..., up to `last`.
local queue, first, last = {}, 1, 0
-- Runners started and running, and how many of them wait for a probe.
local runners, idle = 0, 0
local wake

local function pop()
    if first > last then return nil end
    local token, target = queue[first], queue[first + 1]
    queue[first], queue[first + 1] = nil, nil
    first = first + 2
    if first > last then first, last = 1, 0 end
    return token, target
end

-- The probes still queued when none will run them: late, not failed.
local function drop_queued(why)
    while true do
        local token = pop()
        if not token then return end
        record(token, nil, why, 0, false)
    end
end

-- One probe and the ones that waited for it: each result recorded, and
-- the next waiting server run while nginx is not exiting.
local function chain(token, target)
    while token do
        update_time()
        local t0 = now()
        local ok, status, err = pcall(run, target)
        if not ok then
            status, err = nil, "probe error: " .. tostring(status)
        end
        token, target = record(token, status, err, elapsed_ms(t0), not exiting())
    end
end

local function serve()
    while true do
        if exiting() then
            return drop_queued("late: nginx is exiting")
        end
        local token, target = pop()
        if token then
            chain(token, target)
        else
            idle = idle + 1
            wake:wait(IDLE_WAIT)
            idle = idle - 1
        end
    end
end

local function runner(premature)
    if premature then
        -- nginx is exiting: the probes queued never ran, which is no failure.
        runners = runners - 1
        return drop_queued("late: nginx is exiting")
    end
    local ok, err = pcall(serve)
    runners = runners - 1
    if not ok then
        log(WARN, "ngx.dyups: a health-check runner stopped: ", tostring(err))
    end
end

-- Queues the probes `jobs` (token, target, token, target... from the Rust
-- side's walk), wakes as many idle runners and starts the runners missing.
return function(jobs)
    if not tcp then
        tcp, timer_at = ngx.socket.tcp, ngx.timer.at
        now, update_time = ngx.now, ngx.update_time
        exiting = ngx.worker.exiting
        log, WARN = ngx.log, ngx.WARN
        semaphore = require "ngx.semaphore"
        wake = assert(semaphore.new(0))
    end
    for i = 1, #jobs do
        last = last + 1
        queue[last] = jobs[i]
    end
    local queued = (last - first + 1) / 2
    local woken = min(idle, queued)
    if woken > 0 then wake:post(woken) end
    local err
    for _ = 1, min(queued - woken, cap - runners) do
        local ok
        ok, err = timer_at(0, runner)
        if not ok then break end
        runners = runners + 1
    end
    if runners == 0 then
        drop_queued("late: could not start a timer: " .. tostring(err))
    end
end
