-- Active health checks: real backends whose answer the spec sets (200, 500,
-- a closed connection, a hang past the timeout, garbage, a 10 MB reply), a
-- proxy of 2 workers probing them, and the check_status page read in each
-- format. Every wait is bounded (nginx.wait_until).
local nginx = require "spec.helpers.nginx"
local dy = require "spec.helpers.dyups"
local json = require "dkjson"
local ffi = require "ffi"

local addr = dy.addr

-- One backend nginx on three ports. /mode?port=P&m=M sets how port P
-- answers its health probe (/health): ok, fail (500), close (no answer),
-- hang (past any timeout), garbage, huge (10 MB). /hits?port=P counts probes.
local BACKEND = [[
http {
    lua_shared_dict modes 1m;
    server {
        listen 127.0.0.1:${port_a};
        listen 127.0.0.1:${port_b};
        listen 127.0.0.1:${port_c};
        location = /health {
            content_by_lua_block {
                local d = ngx.shared.modes
                local port = ngx.var.server_port
                d:incr("hits " .. port, 1, 0)
                local m = d:get("mode " .. port) or "ok"
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
        location / { return 200 "$server_port $connection_requests\n"; }
    }
}
]]

local CHECK = 'check interval=300 rise=2 fall=2 timeout=250 type=http default_down=false;\n'
  .. '    check_http_send "GET /health HTTP/1.0\\r\\n\\r\\n";'

describe("active health checks", function()
  local backend, proxy, A, B, C

  local function mode(port, m)
    local s = nginx.http(backend.ports.a, "GET", "/mode?port=" .. port .. "&m=" .. m)
    assert.equal(200, s)
  end

  local function hits(port)
    local _, body = nginx.http(backend.ports.a, "GET", "/hits?port=" .. port)
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
    proxy = dy.proxy {
      upstreams = "upstream hc {\n    server " .. addr(A) .. ";\n    server " .. addr(B) .. ";\n"
        .. "    server " .. addr(C) .. " backup;\n    " .. CHECK .. "\n}\n",
    }
    proxy:start()
  end)

  lazy_teardown(function() nginx.stop_all() end)

  before_each(function()
    for _, p in ipairs { A, B, C } do mode(p, "ok") end
    for _, p in ipairs { A, B, C } do wait_state("hc", p, "up") end
  end)

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
end)
