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

local pcall, error, select, unpack = pcall, error, select, unpack

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

-- msyncs the `len` bytes at `addr` (the state file's mapping): the in-thread
-- half of a durable write, run by ngx.run_worker_thread in a Lua VM of the
-- thread pool. Only the kernel reads the mapping here, and an msync of a
-- range no longer mapped fails without touching memory.
function module._flush(addr, len)
    local ffi = require "ffi"
    pcall(ffi.cdef, "int msync(void *addr, size_t length, int flags);")
    if ffi.C.msync(addr, len, MS_SYNC) ~= 0 then
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
    while turn:state() == "waiting" do
        ngx.sleep(POLL)
        res = pack(pcall(f, turn, ...))
    end
    local _, addr, len = turn:state()
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

function module.update(...)
    local res, unsynced = in_turn(raw.update, answers_for("update", ...), ...)
    if unsynced then
        return 500, unsynced
    end
    return unpack(res, 1, res.n)
end

function module.delete(...)
    local res, unsynced = in_turn(raw.delete, nil, ...)
    if unsynced then
        return 500, unsynced
    end
    return unpack(res, 1, res.n)
end

function module.add_server(...)
    local res, unsynced = in_turn(raw.add_server, answers_for("add_server", ...), ...)
    if unsynced then
        return nil, unsynced, 500
    end
    return unpack(res, 1, res.n)
end

function module.remove_server(...)
    local res, unsynced = in_turn(raw.remove_server, nil, ...)
    if unsynced then
        return nil, unsynced, 500
    end
    return unpack(res, 1, res.n)
end

function module.write_upstreams(...)
    local res = in_turn(raw.write_upstreams, nil, ...)
    return unpack(res, 1, res.n)
end

function module.handle_ups()
    local res, unsynced = in_turn(raw.ups, nil)
    return raw.send_ups(res[1], unsynced)
end

function module.handle_api()
    if raw.api_wants_body() then
        ngx.req.read_body()
    end
    local res, unsynced = in_turn(raw.api, answers_for("api"))
    return raw.send_api(res[1], unsynced)
end
