-- The per-request path of ngx.dyups, loaded once per Lua VM by the Rust
-- module. It is Lua only because nginx's balancer API is: the pick itself is
-- one LuaJIT FFI call into the same library (JIT-compiled, unlike a classic
-- C-API call), with no allocation and no string building. Resolving a name
-- after the table changed goes through the Rust module once per upstream,
-- per change, per worker.
local pick_fn, current_fn, done_fn, key_addr, KEY_MAX, resolve, log_addr, LOG_VAR_MAX = ...

local ffi = require "ffi"
local C = ffi.C

local STALE, NO_LIVE, UNKNOWN, NO_LIVE_CHECKS = -2, -1, -3, -4
-- nginx's NGX_BUSY: the balancer has no peer, so nginx logs "no live
-- upstreams" and answers 502, exactly as its own round robin does.
local NGX_BUSY = -3

local pick = ffi.cast("int32_t (*)(uint32_t, uint64_t, const void *, int32_t, uint32_t, double)", pick_fn)
-- The Rust-owned buffer a request's hash key is written to.
local key_buf = ffi.cast("uint8_t *", key_addr)
local ffi_copy = ffi.copy
local ffi_str = ffi.string
local tonumber = tonumber
local current = ffi.cast("int64_t (*)(void)", current_fn)
local done = ffi.cast("void (*)(const void *, uint32_t, uint32_t)", done_fn)
-- The Rust-owned buffer the log phase copies $upstream_status (first) and
-- $upstream_response_time (at LOG_VAR_MAX) into.
local log_buf = ffi.cast("uint8_t *", log_addr)

local balancer, get_request, get_last_failure, set_current_peer, set_more_tries
local var, log, ERR, exit, ngx_now
local cache, seen = {}, -1

-- A hash key's variables are read with the function behind ngx.var,
-- lua-nginx-module's ngx_http_lua_ffi_var_get (declared by lua-resty-core's
-- resty.core.var, unchanged since 2013), and copied from nginx's memory into
-- the key buffer: ngx.var would make each value a Lua string (interned, then
-- collected) only for it to be copied. Its results: NGX_OK with the value,
-- NGX_DECLINED for a value that is not found (ngx.var's nil), NGX_ERROR.
local NGX_OK, NGX_DECLINED = 0, -5
local var_get, value_ptr, value_len, errmsg, lowcase_log
-- Where var_get writes the variable's name in lower case: as long as the
-- longest name read so far.
local lowcase, lowcase_len = nil, 0

local function setup()
    balancer = require "ngx.balancer"
    get_request = require("resty.core.base").get_request
    get_last_failure = balancer.get_last_failure
    set_current_peer = balancer.set_current_peer
    set_more_tries = balancer.set_more_tries
    var, log, ERR, exit, ngx_now = ngx.var, ngx.log, ngx.ERR, ngx.exit, ngx.now
    require "resty.core.var"
    var_get = C.ngx_http_lua_ffi_var_get
    value_ptr = ffi.new("unsigned char *[1]")
    lowcase_log = ffi.new("char[?]", #"upstream_response_time")
    value_len = ffi.new("size_t[1]")
    errmsg = ffi.new("char *[1]")
end

local function fail(msg, ...)
    log(ERR, "ngx.dyups: ", msg, ...)
    return exit(NGX_BUSY)
end

-- The cache entry of upstream `name`, resolving it on a miss. `false` for a
-- name the table lacks (cached too, until the table changes).
local function entry(name)
    local e = cache[name]
    if e == false and current() ~= seen then
        -- A name the table lacked: it may have been created since.
        cache, e = {}, nil
    end
    if e == nil then
        local now, err
        e, now, err = resolve(name)
        if err then
            return nil, err
        end
        if now ~= seen then
            -- Ids resolved before are of another table: forget them all.
            cache, seen = {}, now
        end
        if e and e.parts then
            for _, part in ipairs(e.parts) do
                local n = part.var and #part.var or 0
                if n > lowcase_len then
                    lowcase, lowcase_len = ffi.new("char[?]", n), n
                end
            end
        end
        e = e or false
        cache[name] = e
    end
    return e
end

-- The tail of nginx variable `name` (at most LOG_VAR_MAX bytes), copied
-- into the log buffer at `at`; its length, 0 when the request has none.
local function copy_var(r, name, at)
    local rc = var_get(r, name, #name, lowcase_log, 0, value_ptr, value_len, errmsg)
    if rc ~= NGX_OK then
        return 0
    end
    local n = tonumber(value_len[0])
    if n > LOG_VAR_MAX then
        -- Its entries are matched to the request's picks from the end.
        ffi_copy(log_buf + at, value_ptr[0] + (n - LOG_VAR_MAX), LOG_VAR_MAX)
        return LOG_VAR_MAX
    end
    ffi_copy(log_buf + at, value_ptr[0], n)
    return n
end

-- log_by_lua entry: the request has ended, so the connection it counted
-- (least_conn, random two) is given back, and each attempt's status and
-- response time are counted against the server that served it: the two
-- variables are read once each, without making Lua strings of them, and
-- handed over in the same one FFI call.
local function log_phase()
    if not balancer then
        setup()
    end
    local r = get_request()
    local status_len = copy_var(r, "upstream_status", 0)
    local times_len = 0
    if status_len > 0 then
        times_len = copy_var(r, "upstream_response_time", LOG_VAR_MAX)
    end
    done(r, status_len, times_len)
end

-- balancer_by_lua entry: routes the request to a server of the upstream
-- `name`, by default the one named by $dyups_upstream. nginx's $proxy_host
-- (the proxy_pass target) cannot be read by name from Lua, so nginx.conf maps
-- it: `map $proxy_host $dyups_upstream { default $proxy_host; }`.
local function balance(name)
    if not balancer then
        setup()
    end
    if not name then
        name = var.dyups_upstream
        if not name or name == "" then
            return fail("no upstream to balance: $dyups_upstream is empty; add ",
                        "`map $proxy_host $dyups_upstream { default $proxy_host; }` to http{}")
        end
    end

    local state = get_last_failure()
    local retry = 0
    if state == "failed" then
        retry = 1
    elseif state then
        retry = 2
    end

    for _ = 1, 3 do
        local e, err = entry(name)
        if not e then
            if err then
                return fail(err)
            end
            return fail("no upstream \"", name, "\" in the table")
        end

        -- hash and ip_hash: evaluate the key into the buffer, part by part,
        -- without building a string.
        local r = get_request()
        local key_len = 0
        local parts = e.parts
        if parts then
            for j = 1, #parts do
                local part = parts[j]
                local text, from, n = part.text, nil, 0
                if text then
                    from, n = text, #text
                else
                    local v = part.var
                    local rc = var_get(r, v, #v, lowcase, 0, value_ptr, value_len, errmsg)
                    if rc == NGX_OK then
                        from, n = value_ptr[0], tonumber(value_len[0])
                    elseif rc ~= NGX_DECLINED then
                        return fail("could not read $", v, ": ", ffi_str(errmsg[0]))
                    end
                end
                if key_len + n > KEY_MAX then
                    n = KEY_MAX - key_len
                end
                if n > 0 then
                    ffi_copy(key_buf + key_len, from, n)
                    key_len = key_len + n
                end
            end
        end

        -- nginx's cached time, as its own balancers read it: failure
        -- windows are timed by it, in the shared cells, in every worker.
        local i = pick(e.id, seen, r, retry, key_len, ngx_now())
        if i >= 0 then
            if retry == 0 and e.tries > 1 then
                set_more_tries(e.tries - 1)
            end
            local ok, why = set_current_peer(e.hosts[i + 1], e.ports[i + 1])
            if not ok then
                return fail("could not set peer ", e.hosts[i + 1], ": ", why)
            end
            return
        end
        if i == NO_LIVE then
            return exit(NGX_BUSY)
        end
        if i == NO_LIVE_CHECKS then
            log(ERR, "ngx.dyups: no live upstreams in \"", name,
                "\": every server failed its health checks")
            return exit(NGX_BUSY)
        end
        if i ~= STALE and i ~= UNKNOWN then
            return fail("internal error ", i, " picking a server of ", name)
        end
        cache = {}
    end
    return fail("the table kept changing while picking a server of ", name)
end

return balance, log_phase
