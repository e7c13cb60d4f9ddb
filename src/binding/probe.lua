-- The cosocket side of active health checks, loaded once per Lua VM by the
-- Rust module. Which servers are due, the leases and what a result means are
-- decided in Rust (src/health); this file only runs the probes: one
-- ngx.timer.at(0) per probe, each a cosocket that connects, optionally does a
-- TLS handshake, sends the check request and reads the 12 bytes of an HTTP
-- status line ("HTTP/1.1 200"), never more, so a huge or endless reply costs
-- nothing. `record(token, status, err, elapsed_ms)` takes every outcome.
local record = ...

local floor, tonumber = math.floor, tonumber
-- Taken from `ngx` at the first start: the module also loads outside nginx.
local tcp, timer_at, now, update_time

local function elapsed_ms(t0)
    update_time()
    return floor((now() - t0) * 1000 + 0.5)
end

local function run(job)
    local sock = tcp()
    sock:settimeout(job.timeout)
    local ok, err
    if job.port == 0 then
        ok, err = sock:connect(job.host)
    else
        ok, err = sock:connect(job.host, job.port)
    end
    if not ok then
        if err == "timeout" then
            return nil, err
        end
        return nil, "connect: " .. tostring(err)
    end
    if job.tls then
        ok, err = sock:sslhandshake(nil, nil, false)
        if not ok then
            sock:close()
            if err == "timeout" then
                return nil, err
            end
            return nil, "tls: " .. tostring(err)
        end
    end
    if not job.send then
        sock:close()
        return nil, nil
    end
    ok, err = sock:send(job.send)
    if not ok then
        sock:close()
        return nil, err
    end
    local line
    line, err = sock:receive(12)
    sock:close()
    if not line then
        return nil, err
    end
    local status = tonumber(line:match("^HTTP/%d%.%d (%d%d%d)$"))
    if not status then
        return nil, "bad status line"
    end
    return status, nil
end

local function probe(premature, job)
    if premature then
        -- nginx is exiting: the probe never ran, which is no failure.
        return record(job.token, nil, "late: nginx is exiting", 0)
    end
    update_time()
    local t0 = now()
    local ok, status, err = pcall(run, job)
    if not ok then
        return record(job.token, nil, "probe error: " .. tostring(status), elapsed_ms(t0))
    end
    return record(job.token, status, err, elapsed_ms(t0))
end

-- Starts the probes `jobs` (from the Rust side's walk).
return function(jobs)
    if not tcp then
        tcp, timer_at = ngx.socket.tcp, ngx.timer.at
        now, update_time = ngx.now, ngx.update_time
    end
    for i = 1, #jobs do
        local job = jobs[i]
        local ok, err = timer_at(0, probe, job)
        if not ok then
            record(job.token, nil, "late: could not start a timer: " .. tostring(err), 0)
        end
    end
end
