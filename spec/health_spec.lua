-- Active health checks: real backends whose answer the spec sets (200, 500,
-- a closed connection, a hang past the timeout, garbage, a 10 MB reply), a
-- proxy of 2 workers probing them, and the check_status page read in each
-- format. Every wait is bounded (nginx.wait_until).
local nginx = require "spec.helpers.nginx"
local dy = require "spec.helpers.dyups"
local json = require "dkjson"
local ffi = require "ffi"

local addr = dy.addr

-- One backend nginx on five ports. /mode?port=P&m=M sets how port P
-- answers its health probe (/health): ok (chunked under HTTP/1.1), length
-- (with a Content-Length), fail (500), close (no answer), hang (past any
-- timeout), garbage, huge (10 MB). /hits?port=P counts probes, /conns?port=P
-- says over how many connections and the most one carried, /times?port=P
-- lists when they came (the backend's clock, /now). /reset answers by a
-- reset: the probe's request has more bytes than nginx reads, and nginx
-- closes with them unread.
local BACKEND = [[
http {
    lua_shared_dict modes 4m;
    client_header_buffer_size 1k;
    server {
        listen 127.0.0.1:${port_a};
        listen 127.0.0.1:${port_b};
        listen 127.0.0.1:${port_c};
        listen 127.0.0.1:${port_d};
        listen 127.0.0.1:${port_e};
        listen 127.0.0.1:${port_f};
        location = /health {
            content_by_lua_block {
                local d = ngx.shared.modes
                local port = ngx.var.server_port
                d:incr("hits " .. port, 1, 0)
                d:set("req " .. port .. " " .. ngx.var.connection, tonumber(ngx.var.connection_requests))
                d:rpush("times " .. port, ngx.now())
                local m = d:get("mode " .. port) or "ok"
                if m == "length" then
                    ngx.header["Content-Length"] = 3
                    ngx.print("ok\n")
                    return
                end
                if m == "fail" then return ngx.exit(500) end
                if m == "close" then return ngx.exit(444) end
                if m == "hang" then ngx.sleep(3) end
                if m == "garbage" then
                    local sock = ngx.req.socket(true)
                    sock:send("\0\1\2 not http at all\r\n\r\n")
                    return
                end
                if m == "huge" then
                    ngx.print(string.rep("x", 10 * 1024 * 1024))
                    return
                end
                ngx.say("ok")
            }
        }
        location = /mode {
            content_by_lua_block {
                ngx.shared.modes:set("mode " .. ngx.var.arg_port, ngx.var.arg_m)
                ngx.say("ok")
            }
        }
        location = /hits {
            content_by_lua_block {
                ngx.say(ngx.shared.modes:get("hits " .. ngx.var.arg_port) or 0)
            }
        }
        location = /conns {
            content_by_lua_block {
                local d, prefix = ngx.shared.modes, "req " .. ngx.var.arg_port .. " "
                local n, most, all = 0, 0, 0
                for _, k in ipairs(d:get_keys(0)) do
                    if k:sub(1, #prefix) == prefix then
                        local r = d:get(k)
                        n, all, most = n + 1, all + r, math.max(most, r)
                        if ngx.var.arg_clear then d:delete(k) end
                    end
                end
                ngx.say(n, " ", most, " ", all)
            }
        }
        location = /times {
            content_by_lua_block {
                local d, key, out = ngx.shared.modes, "times " .. ngx.var.arg_port, {}
                for i = 1, d:llen(key) or 0 do out[i] = string.format("%.3f", d:lpop(key)) end
                ngx.say(table.concat(out, " "))
            }
        }
        location = /now {
            content_by_lua_block { ngx.update_time() ngx.say(string.format("%.3f", ngx.now())) }
        }
        location = /reset {
            lingering_close off;
            return 444;
        }
        location / { return 200 "$server_port $connection_requests\n"; }
    }
}
]]

local CHECK = 'check interval=300 rise=2 fall=2 timeout=250 type=http default_down=false;\n'
  .. '    check_http_send "GET /health HTTP/1.0\\r\\n\\r\\n";'

describe("active health checks", function()
  local backend, proxy, A, B, C, D, E, F

  local function mode(port, m)
    local s = nginx.http(backend.ports.a, "GET", "/mode?port=" .. port .. "&m=" .. m)
    assert.equal(200, s)
  end

  local function hits(port)
    local _, body = nginx.http(backend.ports.a, "GET", "/hits?port=" .. port)
    return tonumber(body)
  end

  -- The probes' connections at `port` since the last clear: how many, the
  -- most one carried, and the probes in all.
  local function conns(port, clear)
    local _, body = nginx.http(backend.ports.a, "GET", "/conns?port=" .. port .. (clear and "&clear=1" or ""))
    local n, most, all = body:match("^(%d+) (%d+) (%d+)")
    return tonumber(n), tonumber(most), tonumber(all)
  end

  -- When the probes at `port` came since the last call (backend clock, s).
  local function times(port)
    local _, body = nginx.http(backend.ports.a, "GET", "/times?port=" .. port)
    local out = {}
    for t in body:gmatch("[%d.]+") do out[#out + 1] = tonumber(t) end
    return out
  end

  local function backend_now()
    local _, body = nginx.http(backend.ports.a, "GET", "/now")
    return tonumber(body)
  end

  local function status(query)
    local s, body, h = nginx.http(proxy.ports.proxy, "GET", "/status" .. (query or "?format=json"))
    assert.equal(200, s)
    return body, h
  end

  local function servers(query)
    local body = status(query)
    local doc = assert(json.decode(body), "valid JSON: " .. body)
    return doc.servers
  end

  -- The status of `name` in upstream `up`, from the JSON page.
  local function state(up, name)
    for _, s in ipairs(servers().server) do
      if s.upstream == up and s.name == name then
        return s.checking and "checking" or s.status, s
      end
    end
  end

  local function wait_state(up, port, want, secs)
    return nginx.wait_until(function() return state(up, addr(port)) == want end, secs or 5,
      ("%s %s %s"):format(up, addr(port), want))
  end

  lazy_setup(function()
    backend = nginx.new { workers = 1, conf = BACKEND }
    backend:start()
    A, B, C = backend.ports.a, backend.ports.b, backend.ports.c
    D, E, F = backend.ports.d, backend.ports.e, backend.ports.f
    proxy = dy.proxy {
      upstreams = "upstream hc {\n    server " .. addr(A) .. ";\n    server " .. addr(B) .. ";\n"
        .. "    server " .. addr(C) .. " backup;\n    " .. CHECK .. "\n}\n"
        -- Three probes a connection, over HTTP/1.1.
        .. "upstream ka {\n    server " .. addr(D) .. ";\n"
        .. "    check interval=200 rise=1 fall=3 timeout=500 type=http default_down=false;\n"
        .. '    check_http_send "GET /health HTTP/1.1\\r\\nHost: ka\\r\\n\\r\\n";\n'
        .. "    check_keepalive_requests 3;\n}\n"
        -- One probe a second, to time a takeover.
        .. "upstream lease {\n    server " .. addr(E) .. ";\n"
        .. "    check interval=1000 rise=1 fall=3 timeout=500 type=http default_down=false;\n"
        .. '    check_http_send "GET /health HTTP/1.0\\r\\n\\r\\n";\n}\n',
    }
    proxy:start()
  end)

  lazy_teardown(function() nginx.stop_all() end)

  before_each(function()
    for _, p in ipairs { A, B, C, D, E } do mode(p, "ok") end
    for _, p in ipairs { A, B, C } do wait_state("hc", p, "up") end
  end)

  -- `n` requests to upstream `name`: how many each backend port answered.
  local function route_to(name, n)
    local seen = {}
    for _ = 1, n do
      local s, port = dy.get(proxy, "/", { Host = name })
      local k = s == 200 and port or s
      seen[k] = (seen[k] or 0) + 1
    end
    return seen
  end

  local function route(n)
    local seen, workers = {}, {}
    for _ = 1, n do
      local s, port, worker = dy.get(proxy, "/", { Host = "hc" })
      seen[s == 200 and port or s] = (seen[s == 200 and port or s] or 0) + 1
      if worker then workers[worker] = true end
    end
    local nw = 0
    for _ in pairs(workers) do nw = nw + 1 end
    return seen, nw
  end

  it("takes a failing server out of every worker and brings it back", function()
    for _, bad in ipairs { "fail", "close", "hang", "garbage" } do
      mode(A, bad)
      -- fall=2 probes 300 ms apart (+ a 250 ms timeout): well within 3 s.
      wait_state("hc", A, "down", 3)
      local seen, nw = route(40)
      assert.is_nil(seen[A], bad .. ": a down server got traffic")
      assert.equal(40, seen[B], bad)
      assert.equal(2, nw, "both workers answered")
      mode(A, "ok")
      wait_state("hc", A, "up", 3)
    end
    local _, s = state("hc", addr(A))
    assert.equal("200", s.result)
    assert.is_number(s.latency_ms)
    assert.is_true(s.checked_at_ms > 0)
  end)

  it("a 10 MB reply is read no further than its status line", function()
    mode(A, "huge")
    nginx.wait_until(function()
      local _, s = state("hc", addr(A))
      return s.result == "200" and hits(A) > 3
    end, 5, "probes of the huge reply")
    assert.equal("up", state("hc", addr(A)))
    assert.is_nil(proxy:error_log():match("signal %d+"), "no worker crashed")
  end)

  it("backups take over, then 502 with every server down and the log says why", function()
    mode(A, "fail"); mode(B, "fail")
    wait_state("hc", A, "down"); wait_state("hc", B, "down")
    local seen = route(10)
    assert.equal(10, seen[C], "the backup")
    mode(C, "fail")
    wait_state("hc", C, "down")
    seen = route(10)
    assert.equal(10, seen[502])
    assert.truthy(proxy:error_log():find("every server failed its health checks", 1, true))
    assert.truthy(proxy:error_log():find("is down after 2 failed health checks", 1, true))
  end)

  it("probes each server once per interval for the whole nginx, not once per worker", function()
    local h0 = hits(B)
    nginx.sleep(3)
    local n = hits(B) - h0
    -- 3 s at one probe per 300 ms: 10, give or take the edges; two
    -- workers probing each would make 20.
    assert.is_true(n >= 8 and n <= 12, "probes in 3 s: " .. n)
  end)

  it("a server added at run time is probed at once, checking until rise probes pass", function()
    local body = ("server %s; server %s; check interval=2000 rise=2 fall=2 timeout=250 type=http;"
      .. ' check_http_send "GET /health HTTP/1.0\\r\\n\\r\\n";'):format(addr(A), addr(B))
    local s = nginx.http(proxy.ports.api, "POST", "/upstream/fresh", { body = body })
    assert.equal(200, s)
    assert.equal("checking", state("fresh", addr(A)))
    -- Interval 2 s, rise 2: probed at once, then 2 s later: up in about 2 s,
    -- not 4 s (which waiting an interval before the first probe would take).
    wait_state("fresh", A, "up", 3.5)
    local _, srv = state("fresh", addr(A))
    assert.equal(2, srv.rise)
    -- The same address in another upstream keeps its own state.
    mode(A, "fail")
    wait_state("hc", A, "down")
    assert.equal("up", state("fresh", addr(A)))
  end)

  it("keeps the state across a table change, a reload, and a SIGKILLed prober", function()
    mode(A, "fail")
    wait_state("hc", A, "down")
    local v = servers().generation
    local s = nginx.http(proxy.ports.api, "POST", "/upstream/other", { body = "server " .. addr(C) .. ";" })
    assert.equal(200, s)
    assert.equal("down", state("hc", addr(A)))
    assert.is_true(servers().generation > v, "the table changed")
    -- A flip raises no table version.
    local g = servers().generation
    mode(A, "ok")
    wait_state("hc", A, "up")
    assert.equal(g, servers().generation)
    -- SIGKILL every worker one after the other: probes go on.
    mode(A, "fail")
    wait_state("hc", A, "down")
    for _, pid in ipairs(proxy:worker_pids()) do assert.equal(0, ffi.C.kill(pid, 9)) end
    mode(A, "ok")
    wait_state("hc", A, "up", 5)
    mode(A, "fail")
    wait_state("hc", A, "down")
    proxy:reload()
    assert.equal("down", state("hc", addr(A)), "kept across the reload")
  end)

  it("serves each format, and ?status= filters keep the JSON valid", function()
    mode(A, "fail")
    wait_state("hc", A, "down")
    local all = servers()
    assert.equal(all.total, all.up + all.down)
    assert.is_true(all.down >= 1)
    local down = servers("?format=json&status=down")
    for _, s in ipairs(down.server) do assert.equal("down", s.status) end
    assert.is_true(#down.server >= 1)
    local up = servers("?format=json&status=up")
    for _, s in ipairs(up.server) do assert.equal("up", s.status) end
    assert.equal(all.up, #up.server)
    local csv, h = status("?format=csv")
    assert.equal("text/plain", h["content-type"])
    local rows = 0
    for line in csv:gmatch("[^\n]+") do
      rows = rows + 1
      assert.truthy(line:match("^%d+,[%w_]+,127%.0%.0%.1:%d+,[a-z]+,%d+,%d+,http,0,"), line)
    end
    assert.equal(all.total, rows)
    local html, hh = status("")
    assert.equal("text/html", hh["content-type"])
    assert.truthy(html:find("generation: " .. all.generation, 1, true))
    local bad = nginx.http(proxy.ports.proxy, "GET", "/status?format=xml")
    assert.equal(400, bad)
  end)

  it("check_keepalive_requests 3: each connection carries three probes; 1: one", function()
    for _, how in ipairs { "ok", "length" } do
      -- Chunked (ngx.say under HTTP/1.1), then with a Content-Length.
      mode(D, how)
      conns(D, true)
      local h0 = hits(D)
      nginx.wait_until(function() return hits(D) - h0 >= 10 end, 5, "ten probes of " .. how)
      local n, most, all = conns(D, true)
      assert.equal(3, most, how .. ": the most probes one connection carried")
      -- Every connection but the first and last (cut by the window) carried
      -- three: about a third as many connections as probes.
      assert.is_true(n <= math.ceil(all / 3) + 2, ("%s: %d connections for %d probes"):format(how, n, all))
      assert.equal("up", state("ka", addr(D)))
    end
    conns(A, true)
    local h0 = hits(A)
    nginx.wait_until(function() return hits(A) - h0 >= 4 end, 5, "probes of A")
    local n, most, all = conns(A, true)
    assert.equal(1, most, "the default: a new connection for each probe")
    assert.equal(n, all)
  end)

  it("a backend that stops accepting goes down, comes back when it listens again", function()
    local gone = dy.backend()
    gone:start()
    local G = gone.ports.http
    local body = ("server %s; server %s; check interval=200 rise=1 fall=2 timeout=250 type=tcp default_down=false;")
      :format(addr(G), addr(A))
    assert.equal(200, (nginx.http(proxy.ports.api, "POST", "/upstream/gone", { body = body })))
    wait_state("gone", G, "up")
    assert.is_true(gone:stop(), "the backend stopped")
    -- Its listening socket closed: connects are refused.
    wait_state("gone", G, "down", 3)
    local _, s = state("gone", addr(G))
    assert.equal("connect failed", s.result)
    local seen = route_to("gone", 20)
    assert.equal(20, seen[A], "only the live server is routed to")
    gone:start()
    wait_state("gone", G, "up", 3)
    seen = route_to("gone", 20)
    assert.is_true((seen[G] or 0) > 0, "routed to again")
  end)

  it("takes over the probes of a SIGKILLed lease holder within two intervals", function()
    -- lease: one probe a second for E, for the whole nginx.
    local owner
    nginx.wait_until(function()
      local _, s = state("lease", addr(E))
      owner = s and s.prober ~= 0 and s.prober
      return owner
    end, 5, "a worker holding E's lease")
    times(E)
    nginx.sleep(2.5)
    local before = times(E)
    assert.is_true(#before >= 2 and #before <= 4, "probes in 2.5 s: " .. #before)
    local is_worker = false
    for _, pid in ipairs(proxy:worker_pids()) do is_worker = is_worker or pid == owner end
    assert.is_true(is_worker, "the lease holder " .. owner .. " is one of our workers")
    local killed_at = backend_now()
    assert.equal(0, ffi.C.kill(owner, 9))
    -- Another worker (the survivor, or nginx's new one) probes on.
    local taker
    nginx.wait_until(function()
      local _, s = state("lease", addr(E))
      taker = s and s.prober ~= owner and s.prober ~= 0 and s.prober
      return taker
    end, 5, "the lease taken over")
    nginx.sleep(4)
    local after = times(E)
    assert.is_true(#after >= 1, "probed after the kill")
    local last = before[#before]
    assert.is_true(after[1] - last <= 2 + 0.3,
      ("%.3f s between the last probe before the kill (%.3f s before it) and the next"):format(
        after[1] - last, killed_at - last))
    -- Then one a second, not one per worker: 4 s after the first of them,
    -- give or take one at the edges.
    local window = {}
    for _, t in ipairs(after) do
      if t > after[1] and t <= after[1] + 4 then window[#window + 1] = t end
    end
    assert.is_true(#window >= 3 and #window <= 5, "probes in the 4 s after the takeover: " .. #window)
    assert.is_nil(proxy:error_log():match("%[alert%].-signal 11"), "no worker crashed")
  end)

  it("runs a worker's probes in at most 64 timers, however many servers are due", function()
    -- 300 servers, all probed at F's port (`port=`), which hangs past the
    -- timeout: about 150 due at once in each worker, every probe held 2 s.
    -- The runners are the timers: at most MAX_IN_FLIGHT (64) per worker,
    -- the rest of the due servers waiting, reported late. A timer per
    -- probe or per due server would show 150.
    mode(F, "hang")
    local list = {}
    for i = 1, 300 do list[i] = ("server 127.0.0.1:%d;"):format(20000 + i) end
    local body = table.concat(list, " ")
      .. (" check interval=1000 rise=1 fall=5 timeout=2000 type=http port=%d default_down=false;"):format(F)
      .. ' check_http_send "GET /health HTTP/1.0\\r\\n\\r\\n";'
    local log_from = #proxy:error_log() + 1
    local h0 = hits(F)
    assert.equal(200, (nginx.http(proxy.ports.api, "POST", "/upstream/wide", { body = body })))
    -- Each worker's running and pending timers, sampled while the first
    -- probes hang (they time out 2 s after they start).
    local most, samples = {}, {}
    local t_end = nginx.now() + 1.8
    while nginx.now() < t_end do
      local out = dy.run(proxy, "return ngx.worker.pid() .. ' ' .. ngx.timer.running_count()"
        .. " .. ' ' .. ngx.timer.pending_count()")
      local pid, running, pending = out:match("^(%d+) (%d+) (%d+)$")
      pid, running, pending = tonumber(pid), tonumber(running), tonumber(pending)
      samples[pid] = (samples[pid] or 0) + 1
      most[pid] = math.max(most[pid] or 0, running + pending)
    end
    local workers = 0
    for pid, n in pairs(most) do
      workers = workers + 1
      -- 64 runners; the refresh timer and the request's own are not
      -- running timers while this request runs, but allow one of them.
      assert.is_true(n <= 65, ("worker %d: %d timers (%d samples)"):format(pid, n, samples[pid]))
      -- And the cap was reached: the runners do run the probes at once.
      assert.is_true(n >= 48, ("worker %d: only %d timers (%d samples)"):format(pid, n, samples[pid]))
    end
    assert.equal(2, workers, "both workers sampled")
    -- The servers past the cap are late, not failed, and were started as
    -- runners freed (the backend saw far more probes than 2 x 64).
    nginx.wait_until(function() return hits(F) - h0 >= 200 end, 8, "the due servers probed")
    local late = 0
    for _, s in ipairs(servers().server) do
      if s.upstream == "wide" and (s.late_ms or 0) > 0 then late = late + 1 end
    end
    assert.is_true(late > 0, "servers reported late")
    assert.equal(200, (nginx.http(proxy.ports.api, "DELETE", "/upstream/wide")))
    mode(F, "ok")
    local log = proxy:error_log():sub(log_from)
    assert.is_nil(log:find("too many", 1, true), log)
  end)

  it("a probe target that resets, sends garbage or 10 MB never crashes a worker", function()
    -- The request is longer than the backend's header buffer and the
    -- location closes at once: the unread bytes make it a reset.
    local log_from = #proxy:error_log() + 1
    local send = "GET /reset HTTP/1.0\\r\\nX: " .. string.rep("x", 3000) .. "\\r\\n\\r\\n"
    local body = ('server %s; check interval=200 rise=1 fall=2 timeout=250 type=http default_down=false;'
      .. ' check_http_send "%s";'):format(addr(B), send)
    assert.equal(200, (nginx.http(proxy.ports.api, "POST", "/upstream/rst", { body = body })))
    wait_state("rst", B, "down", 3)
    local _, s = state("rst", addr(B))
    assert.equal("connection lost", s.result)
    mode(A, "garbage")
    wait_state("hc", A, "down", 3)
    mode(A, "huge")
    wait_state("hc", A, "up", 3)
    local pids = proxy:worker_pids()
    nginx.sleep(1)
    assert.same(pids, proxy:worker_pids(), "the same workers, none restarted")
    local log = proxy:error_log():sub(log_from)
    assert.is_nil(log:match("exited on signal"), "no worker crashed: " .. log)
    assert.equal(200, (nginx.http(proxy.ports.api, "DELETE", "/upstream/rst")))
  end)

  it("bad check input is a 400 naming it, and changes nothing", function()
    local base = "server " .. addr(A) .. "; "
    for _, c in ipairs {
      { "check interval=0;", "interval" },
      { "check interval=1000 rise=0;", "rise" },
      { "check interval=1000 fall=0;", "fall" },
      { "check interval=1000 spin=1;", "spin=1" },
      { "check interval=1000 type=mysql;", "mysql" },
      { "check interval=1000 timeout=0;", "timeout" },
      { "check interval=1000; check_keepalive_requests 0;", "check_keepalive_requests" },
      { "check interval=1000; check_http_expect_alive http_6xx;", "http_6xx" },
    } do
      local st, msg = nginx.http(proxy.ports.api, "POST", "/upstream/hc", { body = base .. c[1] })
      assert.equal(400, st, c[1])
      assert.truthy(msg:find(c[2], 1, true), c[1] .. " -> " .. msg)
    end
    -- hc is as it was: its three servers, checked.
    local all = servers()
    local n = 0
    for _, s in ipairs(all.server) do
      if s.upstream == "hc" then n = n + 1 end
    end
    assert.equal(3, n)
    -- Lua's update answers the same.
    local out = dy.run(proxy, ([[
      local status, msg = require("ngx.dyups").update("hc", "server %s; check interval=0;")
      return status .. " " .. msg
    ]]):format(addr(A)))
    assert.truthy(out:match("^400 .*interval"), out)
  end)

  it("keeps the state across a restart of nginx", function()
    mode(A, "fail")
    -- Far more failures in a row than a fresh start could count before
    -- the first look (fall=2, one probe per 300 ms).
    nginx.wait_until(function()
      local st, s = state("hc", addr(A))
      return st == "down" and s.fall >= 8
    end, 6, "A down with 8 failures in a row")
    assert.is_true(proxy:stop())
    proxy:start()
    local st, s = state("hc", addr(A))
    assert.equal("down", st)
    assert.is_true(s.fall >= 8, "the count went on: " .. s.fall)
    mode(A, "ok")
    wait_state("hc", A, "up", 3)
  end)
end)
