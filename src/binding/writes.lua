-- The writing functions of ngx.dyups, as Lua sees them. In a phase that may
-- yield (rewrite, access, content, timer) a write never blocks the worker's
-- event loop, which serves every other request of the worker meanwhile:
--   * while other writers are ahead of it in the writers' queue, the Rust
--     call returns and is made again after an ngx.sleep (a coroutine cannot
--     yield across a Rust (C) function);
--   * a durable write's msync runs in nginx's thread pool (init option
--     thread_pool, `thread_pool NAME threads=1;` in nginx.conf), through
--     ngx.run_worker_thread, into `_flush` below, pure Lua: no Rust runs
--     outside the event loop's thread;
--   * the answer is given only once the msync is done.
-- Elsewhere (init_worker, plain LuaJIT) the Rust call waits and msyncs
-- itself. Reading a REST request body may wait for the client too, so it is
-- read here, before the Rust handler.
local module, raw = ...

local pcall, error, select, unpack, ipairs = pcall, error, select, unpack, ipairs

-- Phases where ngx.sleep and ngx.run_worker_thread may yield.
local YIELDABLE = { rewrite = true, server_rewrite = true, access = true, content = true, timer = true }
-- Seconds between two looks at the queue while writers are ahead.
local POLL = 0.001
local MS_SYNC = 4 -- <sys/mman.h> on Linux

local function pack(...)
    return { n = select("#", ...), ... }
end

local function yieldable()
    local ngx = ngx
    return ngx ~= nil and YIELDABLE[ngx.get_phase()] == true
end

local warned = false

-- The C library's msync, declared once per Lua VM of the thread pool (the
-- declaration is parsed again at every ffi.cdef).
local msync

-- msyncs the `len` bytes at `addr` (the state file's mapping): the in-thread
-- half of a durable write, run by ngx.run_worker_thread in a Lua VM of the
-- thread pool. Only the kernel reads the mapping here, and an msync of a
-- range no longer mapped fails without touching memory.
function module._flush(addr, len)
    local ffi = require "ffi"
    if not msync then
        pcall(ffi.cdef, "int msync(void *addr, size_t length, int flags);")
        msync = ffi.C.msync
    end
    if msync(addr, len, MS_SYNC) ~= 0 then
        return nil, "msync: errno " .. ffi.errno()
    end
    return true
end

-- The msync of a write held in `turn`, in the thread pool; true when done.
local function flush_in_thread(addr, len)
    local ngx = ngx
    local pool = raw.thread_pool()
    if not pool or not ngx.run_worker_thread then
        return false
    end
    local ok, done, why = ngx.run_worker_thread(pool, "ngx.dyups", "_flush", addr, len)
    if ok and done then
        return true
    end
    if not warned then
        warned = true
        ngx.log(ngx.WARN, "ngx.dyups: durable writes msync on the event loop: thread pool \"", pool,
            "\": ", tostring(ok and why or done),
            " (add `thread_pool ", pool, " threads=1;` to nginx.conf, or set init{ thread_pool = false })")
    end
    return false
end

-- Calls `f(turn, ...)` until its turn in the writers' queue has come, then
-- has its write flushed and gives the turn up. Returns f's results (a packed
-- table) and, when a write made is not known to be on disk, why. `answers`:
-- those of the host names the write adds, gathered before its turn.
local function in_turn(f, answers, ...)
    if not yieldable() then
        return pack(f(nil, ...)), nil
    end
    local turn = raw.turn()
    if answers then
        turn:set_answers(answers)
    end
    local res = pack(pcall(f, turn, ...))
    local waiting, addr, len = turn:state()
    while waiting do
        ngx.sleep(POLL)
        res = pack(pcall(f, turn, ...))
        waiting, addr, len = turn:state()
    end
    local flushed = addr ~= nil and flush_in_thread(addr, len)
    local unsynced = turn:finish(flushed)
    if not res[1] then
        return error(res[2], 0)
    end
    return pack(unpack(res, 2, res.n)), unsynced
end

raw.in_turn = in_turn

-- The answers for the host names a write of `kind` adds: looked up with
-- cosockets (dns.lua) before its turn, so no writer waits behind a DNS
-- query; nil where the phase cannot yield (the write then resolves,
-- blocking, as nginx does when it reads its configuration).
local function answers_for(kind, ...)
    if not yieldable() then
        return nil
    end
    local plan = raw.dns_plan(kind, ...)
    if not plan then
        return nil
    end
    raw.dns_lookup_all(plan)
    return raw.dns_answers(plan)
end

-- `f(nil, ...)`, as in_turn returns it: for what never writes (and so
-- has no answers to take).
local function direct(f, _, ...)
    return pack(f(nil, ...)), nil
end

-- The answer of a write that is made but not known to be on disk: in
-- update's and delete's Tengine shape (status, message), and in
-- add_server's and remove_server's (nil, err, status).
local function unsynced_status(why)
    return 500, why
end

local function unsynced_error(why)
    return nil, why, 500
end

-- `f`'s answers, its write made in turn (in_turn), or `unsynced(why)`'s
-- when the write is not known to be on disk.
local function write_answer(f, answers, unsynced, ...)
    local res, why = in_turn(f, answers, ...)
    if why then
        return unsynced(why)
    end
    return unpack(res, 1, res.n)
end

function module.update(...)
    return write_answer(raw.update, answers_for("update", ...), unsynced_status, ...)
end

function module.delete(...)
    return write_answer(raw.delete, nil, unsynced_status, ...)
end

function module.add_server(...)
    return write_answer(raw.add_server, answers_for("add_server", ...), unsynced_error, ...)
end

function module.remove_server(...)
    return write_answer(raw.remove_server, nil, unsynced_error, ...)
end

function module.write_upstreams(...)
    local res = in_turn(raw.write_upstreams, nil, ...)
    return unpack(res, 1, res.n)
end

-- Query arguments /ups reads; a request with more is refused.
local UPS_MAX_ARGS = 100

-- The conditional headers /ups refuses (it has none of its own, and nginx
-- would evaluate them against its answer after the write). Not
-- If-Modified-Since: nginx ignores it without a Last-Modified, and it has
-- no meaning on a write.
local UPS_PRECONDITIONS = {
    { "If-Match", "http_if_match" },
    { "If-None-Match", "http_if_none_match" },
    { "If-Unmodified-Since", "http_if_unmodified_since" },
}

-- The /ups content handler: the request read here once, as for REST.
function module.handle_ups()
    local ngx = ngx
    local var, req = ngx.var, ngx.req
    local args, truncated = req.get_uri_args(UPS_MAX_ARGS)
    local precondition
    for _, h in ipairs(UPS_PRECONDITIONS) do
        if var[h[2]] then
            precondition = h[1]
            break
        end
    end
    local res, unsynced = in_turn(raw.ups, nil, req.get_method(), args.op, args.server, args.upstream,
        truncated ~= nil, precondition, var.http_authorization, var.remote_addr)
    local status, body, write_back = unpack(res, 1, 3)
    if unsynced then
        status, body = 500, raw.ups_failure(unsynced)
    end
    if status >= 500 then
        ngx.log(ngx.ERR, "ngx.dyups: ", body)
    end
    ngx.status = status
    local header = ngx.header
    header["Content-Type"] = "application/json"
    if status == 405 then
        header["Allow"] = "GET, POST, PUT"
    end
    if status == 401 then
        header["WWW-Authenticate"] = 'Bearer realm="ngx.dyups"'
    end
    if write_back then
        header["X-Dyups-Write-Back"] = write_back
    end
    ngx.say(body)
end

-- The precondition headers the REST handler evaluates itself. Left in
-- place, nginx's not-modified filter would evaluate them again on the
-- answer, after a write: a 200 with the new ETag would become a 304
-- (If-None-Match: *) or a 412 (If-Match, If-Unmodified-Since) for a change
-- that was made.
local PRECONDITIONS = { "If-Match", "If-None-Match", "If-Unmodified-Since", "If-Modified-Since" }

-- The REST content handler. Everything the Rust handler reads of the
-- request is read here, once, and passed in plain values; its answer comes
-- back the same way. Calls from Rust into nginx's Lua API cost a protected
-- call of mlua's each, and a request made some 40.
function module.handle_api()
    local ngx = ngx
    local var, req = ngx.var, ngx.req
    local method = req.get_method()
    local length = var.content_length
    local body, body_file
    if raw.api_wants_body(method, length) then
        req.read_body()
        body = req.get_body_data()
        if not body then
            body_file = req.get_body_file()
        end
    end
    -- Headers through nginx's variables, which see every header: a list
    -- from ngx.req.get_headers stops at 100, and an If-Match past them
    -- would not be seen.
    local if_match, if_none_match = var.http_if_match, var.http_if_none_match
    local if_unmodified_since, if_modified_since = var.http_if_unmodified_since, var.http_if_modified_since
    if if_match or if_none_match or if_unmodified_since or if_modified_since then
        for _, name in ipairs(PRECONDITIONS) do
            req.clear_header(name)
        end
    end
    local uri, accept, format = var.request_uri, var.http_accept, var.arg_format
    local authorization, client = var.http_authorization, var.remote_addr
    -- A read takes no turn in the writers' queue, and adds no host name.
    local handle, answers = direct, nil
    if method ~= "GET" and method ~= "HEAD" then
        handle = in_turn
        answers = answers_for("api", method, uri, accept, format, if_match, if_none_match,
            if_unmodified_since, if_modified_since, authorization, client, length, body, body_file)
    end
    local res, unsynced = handle(raw.api, answers, method, uri, accept, format,
        if_match, if_none_match, if_unmodified_since, if_modified_since,
        authorization, client, length, body, body_file)
    local status, text, json, etag, allow, write_back = unpack(res, 1, 6)
    if unsynced then
        status, text, json, etag, allow = 500, unsynced, false, nil, nil
    end
    if status >= 500 then
        ngx.log(ngx.ERR, "ngx.dyups: ", text)
    end
    ngx.status = status
    local header = ngx.header
    header["Content-Type"] = json and "application/json" or "text/plain"
    if etag then
        header["ETag"] = '"' .. etag .. '"'
    end
    if allow then
        header["Allow"] = allow
    end
    if status == 401 then
        header["WWW-Authenticate"] = 'Bearer realm="ngx.dyups"'
    end
    if write_back then
        header["X-Dyups-Write-Back"] = write_back
    end
    if text ~= "" then
        ngx.print(text)
    end
end
