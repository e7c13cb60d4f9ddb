-- The per-request path of ngx.dyups, loaded once per Lua VM by the Rust
-- module. It is Lua only because nginx's balancer API is: the pick itself is
-- one LuaJIT FFI call into the same library (JIT-compiled, unlike a classic
-- C-API call), with no allocation and no string building. Resolving a name
-- after the table changed goes through the Rust module once per upstream,
-- per change, per worker.
local pick_fn, current_fn, done_fn, key_addr, KEY_MAX, resolve = ...

local ffi = require "ffi"

local STALE, NO_LIVE, UNKNOWN, NO_LIVE_CHECKS = -2, -1, -3, -4
-- nginx's NGX_BUSY: the balancer has no peer, so nginx logs "no live
-- upstreams" and answers 502, exactly as its own round robin does.
local NGX_BUSY = -3

local pick = ffi.cast("int32_t (*)(uint32_t, uint64_t, const void *, int32_t, uint32_t)", pick_fn)
-- The Rust-owned buffer a request's hash key is written to.
local key_buf = ffi.cast("uint8_t *", key_addr)
local ffi_copy = ffi.copy
local current = ffi.cast("int64_t (*)(void)", current_fn)
local done = ffi.cast("void (*)(const void *)", done_fn)

local balancer, get_request, get_last_failure, set_current_peer, set_more_tries
local var, log, ERR, exit
local cache, seen = {}, -1

local function setup()
    balancer = require "ngx.balancer"
    get_request = require("resty.core.base").get_request
    get_last_failure = balancer.get_last_failure
    set_current_peer = balancer.set_current_peer
    set_more_tries = balancer.set_more_tries
    var, log, ERR, exit = ngx.var, ngx.log, ngx.ERR, ngx.exit
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
        e = e or false
        cache[name] = e
    end
    return e
end

-- log_by_lua entry: the request has ended, so the connection it counted
-- (least_conn, random two) is given back.
local function log_phase()
    if not get_request then
        get_request = require("resty.core.base").get_request
    end
    done(get_request())
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
        local key_len = 0
        local parts = e.parts
        if parts then
            for j = 1, #parts do
                local part = parts[j]
                local v = part.text or var[part.var] or ""
                local n = #v
                if key_len + n > KEY_MAX then
                    n = KEY_MAX - key_len
                end
                ffi_copy(key_buf + key_len, v, n)
                key_len = key_len + n
            end
        end

        local i = pick(e.id, seen, get_request(), retry, key_len)
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
