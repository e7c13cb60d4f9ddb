-- The cosocket side of active health checks, loaded once per Lua VM by the
-- Rust module. Which servers are due, the leases and what a result means are
-- decided in Rust (src/health); this file only runs the probes: one
-- ngx.timer.at(0) per probe, each a cosocket that connects, optionally does a
-- TLS handshake, sends the check request and reads the 12 bytes of an HTTP
-- status line ("HTTP/1.1 200"), which decide the probe. With
-- check_keepalive_requests N > 1 it then reads the rest of the answer (at
-- most HEAD_MAX bytes of header and BODY_MAX of body; anything longer, or
-- delimited by the close, closes instead) so the connection can carry the
-- next probe, up to N in all; a huge or endless reply never costs more.
-- `record(token, status, err, elapsed_ms, more)` takes every outcome and,
-- when `more`, gives the next probe for the same timer: a server that was
-- due while the worker had as many probes in flight as it may, so the
-- probes go on at that many at once between the refresh ticks.
local record = ...

local floor, tonumber, concat = math.floor, tonumber, table.concat
-- Taken from `ngx` at the first start: the module also loads outside nginx.
local tcp, timer_at, now, update_time, exiting

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

-- One line ending in CRLF, without it, at most `max` bytes; nil when longer
-- or on an error.
local function read_line(sock, max)
    local reader = sock:receiveuntil("\r\n")
    local got = ""
    while true do
        local data, err = reader(max)
        if err then return nil end
        if not data then return got end
        got = got .. data
        if #got > max then return nil end
    end
end

-- Whether the time for reading the rest of an answer ran out.
local function past(deadline)
    update_time()
    return now() > deadline
end

-- A chunked body, to its last chunk and trailers, at most BODY_MAX bytes.
local function drain_chunks(sock, deadline)
    local total = 0
    while not past(deadline) do
        local size = tonumber((read_line(sock, CHUNK_LINE_MAX) or ""):match("^%x+") or "", 16)
        if not size then return false end
        if size == 0 then
            for _ = 1, TRAILERS_MAX do
                local line = read_line(sock, HEAD_MAX)
                if not line then return false end
                if line == "" then return true end
            end
            return false
        end
        total = total + size
        if total > BODY_MAX or not sock:receive(size) or sock:receive(2) ~= "\r\n" then
            return false
        end
    end
    return false
end

-- Reads the rest of an answer whose status line (`version`, `status`) was
-- read, so the connection can carry another probe. False when it cannot:
-- the server closes it, the body is delimited by the close or too long,
-- reading fails, or it takes longer than the probe's timeout (a server that
-- drips its answer holds no probe for long).
local function drain(sock, job, version, status)
    update_time()
    local deadline = now() + job.timeout / 1000
    local reader = sock:receiveuntil("\r\n\r\n")
    local parts, n = {}, 0
    while true do
        if past(deadline) then return false end
        local data, err = reader(4096)
        if err then return false end
        if not data then break end
        n = n + #data
        if n > HEAD_MAX then return false end
        parts[#parts + 1] = data
    end
    -- The headers, each after a "\n": the status line's rest comes first.
    local head = concat(parts):lower()
    if head:find("\nconnection:%s*close") then return false end
    if version == "1.0" and not head:find("\nconnection:%s*keep%-alive") then return false end
    if job.head or status < 200 or status == 204 or status == 304 then return true end
    if head:find("\ntransfer%-encoding:%s*chunked") then return drain_chunks(sock, deadline) end
    local len = tonumber(head:match("\ncontent%-length:%s*(%d+)"))
    if not len or len > BODY_MAX then return false end
    return len == 0 or sock:receive(len) ~= nil
end

-- A connection to the job's server: one kept from an earlier probe (its
-- TLS handshake done then), or a new one.
local function open(job)
    local sock = tcp()
    sock:settimeout(job.timeout)
    local opts = job.keepalive > 1 and job.pool_opts or nil
    local ok, err
    if job.port == 0 then
        ok, err = sock:connect(job.host, opts)
    else
        ok, err = sock:connect(job.host, job.port, opts)
    end
    if not ok then
        if err == "timeout" then
            return nil, err
        end
        return nil, "connect: " .. tostring(err)
    end
    if job.tls and sock:getreusedtimes() == 0 then
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

local function run(job, retried)
    local sock, err = open(job)
    if not sock then
        return nil, err
    end
    if not job.send then
        sock:close()
        return nil, nil
    end
    local reused = sock:getreusedtimes()
    local ok, line
    ok, err = sock:send(job.send)
    if ok then
        line, err = sock:receive(12)
    end
    if not line then
        sock:close()
        if reused > 0 and not retried and err ~= "timeout" then
            -- The server closed the kept connection while it idled: that
            -- says nothing about the server; ask on a new one.
            return run(job, true)
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
    if reused + 1 < job.keepalive and drain(sock, job, version, status) then
        sock:setkeepalive(job.idle, POOL_SIZE)
    else
        sock:close()
    end
    return status, nil
end

local function prepare(job)
    if job.keepalive > 1 then
        job.pool_opts = { pool = job.pool }
        job.head = job.send:sub(1, 5) == "HEAD "
    end
    return job
end

local function probe(premature, job)
    if premature then
        -- nginx is exiting: the probe never ran, which is no failure.
        return record(job.token, nil, "late: nginx is exiting", 0, false)
    end
    while job do
        update_time()
        local t0 = now()
        local ok, status, err = pcall(run, job)
        if not ok then
            status, err = nil, "probe error: " .. tostring(status)
        end
        job = record(job.token, status, err, elapsed_ms(t0), not exiting())
        if job then prepare(job) end
    end
end

-- Starts the probes `jobs` (from the Rust side's walk).
return function(jobs)
    if not tcp then
        tcp, timer_at = ngx.socket.tcp, ngx.timer.at
        now, update_time = ngx.now, ngx.update_time
        exiting = ngx.worker.exiting
    end
    for i = 1, #jobs do
        local job = prepare(jobs[i])
        local ok, err = timer_at(0, probe, job)
        if not ok then
            record(job.token, nil, "late: could not start a timer: " .. tostring(err), 0, false)
        end
    end
end
