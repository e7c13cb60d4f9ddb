-- Host names in `server` lines, against a real DNS server on loopback
-- (dnsmasq, spec/helpers/dnsmasq.lua): resolved at write time, and with
-- `resolve` for the life of the upstream, by one worker for the whole nginx.
--
-- The backend answers with the address it was reached on, and listens on
-- 127.0.0.1 and ::1: a name with an A and an AAAA record is two servers.
local nginx = require "spec.helpers.nginx"
local dy = require "spec.helpers.dyups"
local dnsmasq = require "spec.helpers.dnsmasq"
local T = require "spec.helpers.traffic"

local TTL = 1
local BACKEND = [[
http {
    server {
        listen 127.0.0.1:${port_http};
        listen [::1]:${port_http};
        location / { return 200 "$server_addr\n"; }
    }
}
]]
local V4, V6 = "127.0.0.1", "::1"

describe("server NAME lines (dnsmasq on loopback, 2 workers)", function()
  local dns, proxy, port, other

  local function api(method, path, body, headers)
    return nginx.http(proxy.ports.api, method, path, { body = body, headers = headers })
  end

  --- `n` requests to upstream `host` over new connections: how many each
  --- backend address answered, in each worker.
  local function spread(host, n)
    local by, workers = {}, {}
    for _ = 1, n do
      local status, body, h = nginx.http(proxy.ports.proxy, "GET", "/", { headers = { Host = host } })
      assert.equal(200, status, body)
      local a = body:match("^(%S+)")
      by[a] = (by[a] or 0) + 1
      local w = h["x-worker"]
      workers[w] = workers[w] or {}
      workers[w][a] = (workers[w][a] or 0) + 1
    end
    return by, workers
  end

  --- Whether every request of a round goes to `addr` alone, through both
  --- workers.
  local function only(host, addr)
    local by, workers = spread(host, 20)
    local n = 0
    for _ in pairs(workers) do n = n + 1 end
    return by[addr] == 20 and n == 2
  end

  local function json_of(name)
    local status, body = api("GET", "/upstream/" .. name .. "?format=json")
    assert.equal(200, status, body)
    return assert(T.json_decode(body), body)
  end

  lazy_setup(function()
    dns = dnsmasq.start {
      ttl = TTL,
      hosts = {
        ["app.dyups.test"] = { V4, V6 },
        ["alone.dyups.test"] = { V4, V6 },
        ["count.dyups.test"] = { V4 },
        ["once.dyups.test"] = { V4 },
      },
    }
    local backend = nginx.new { workers = 1, conf = BACKEND }
    backend:start()
    port = backend.ports.http
    local b2 = dy.backend()
    b2:start()
    other = b2.ports.http
    proxy = dy.proxy { init = ('resolver = "127.0.0.1:%d", resolver_timeout = 1'):format(dns.port) }
    proxy:start()
    assert.equal(2, #proxy:worker_pids())
  end)

  lazy_teardown(function()
    dnsmasq.stop_all()
    nginx.stop_all()
  end)

  it("refuses a name that does not resolve with 400 naming it, and changes nothing", function()
    local status, body = api("POST", "/upstream/nx", "server nowhere.dyups.test:" .. port .. ";")
    assert.equal(400, status, body)
    assert.matches("nowhere.dyups.test", body, 1, true)
    assert.matches("NXDOMAIN", body, 1, true)
    assert.equal(404, (api("GET", "/upstream/nx")))
    -- Through the Lua API too, and with `resolve`.
    local out = dy.run(proxy, [[
      local dyups = require "ngx.dyups"
      local v = dyups.version()
      local s, m = dyups.update("nx", "server nowhere.dyups.test resolve;")
      return s .. " " .. m .. " " .. tostring(dyups.version() == v)
    ]])
    assert.matches("^400 ", out)
    assert.matches("nowhere.dyups.test", out, 1, true)
    assert.matches("true$", out)
  end)

  it("resolves a name at write time: every address is a server, shown as written", function()
    local status, body = api("POST", "/upstream/once",
      "resolver 127.0.0.1:" .. dns.port .. " ipv6=off; server once.dyups.test:" .. port .. " weight=2;")
    assert.equal(200, status, body)
    local _, text = api("GET", "/upstream/once")
    assert.matches("server once.dyups.test:" .. port .. " weight=2\n", text, 1, true)
    local u = json_of("once")
    assert.equal("server once.dyups.test:" .. port .. " weight=2;", u.names[1].line)
    assert.same({ V4 .. ":" .. port }, u.names[1].addresses)
    assert.equal(false, u.names[1].resolve)
    assert.equal("once.dyups.test:" .. port, u.servers[1].name)
    assert.equal(2, u.servers[1].weight)
    local by = spread("once", 6)
    assert.equal(6, by[V4])
  end)

  it("balances a resolve name across both its addresses", function()
    local status, body = api("POST", "/upstream/dyn", "server app.dyups.test:" .. port .. " resolve;")
    assert.equal(200, status, body)
    local u = json_of("dyn")
    table.sort(u.names[1].addresses)
    assert.same({ V4 .. ":" .. port, "[::1]:" .. port }, u.names[1].addresses)
    -- Round robin per worker: each worker alternates, so the two counts
    -- differ by one per worker at most.
    local by = spread("dyn", 20)
    assert.equal(20, (by[V4] or 0) + (by[V6] or 0))
    assert.is_true(math.abs((by[V4] or 0) - (by[V6] or 0)) <= 2, "both used evenly")
  end)

  it("follows a changed record within TTL + 1 s in every worker", function()
    local before = json_of("dyn").version
    dns:set_hosts {
      ["app.dyups.test"] = { V6 },
      ["alone.dyups.test"] = { V4, V6 },
      ["count.dyups.test"] = { V4 },
      ["once.dyups.test"] = { V4 },
    }
    local changed = nginx.now()
    nginx.wait_until(function() return only("dyn", V6) end, TTL + 1 + 1, "traffic to ::1 only")
    -- Within TTL + 1 s of the change (plus the rounds of requests above).
    assert.is_true(nginx.now() - changed < TTL + 1 + 1)
    local u = json_of("dyn")
    assert.same({ "[::1]:" .. port }, u.names[1].addresses)
    assert.equal(before + 1, u.version, "one write for the change")
    -- A write-time name is not asked again.
    assert.same({ V4 .. ":" .. port }, json_of("once").names[1].addresses)
  end)

  it("asks once per TTL for the whole nginx, not once per worker", function()
    local status, body = api("POST", "/upstream/counted",
      "resolver 127.0.0.1:" .. dns.port .. " valid=2s ipv6=off; server count.dyups.test:" .. port .. " resolve;")
    assert.equal(200, status, body)
    local start = dns:queries("A", "count.dyups.test")
    local t0 = nginx.now()
    -- A window of wall time: the rate is what is measured.
    nginx.sleep(10)
    local asked = dns:queries("A", "count.dyups.test") - start
    local windows = (nginx.now() - t0) / 2
    -- One query per valid= window (2 s) in all; two workers each asking
    -- would make twice as many.
    assert.is_true(asked >= math.floor(windows) - 1, "asked " .. asked .. " in " .. windows .. " windows")
    assert.is_true(asked <= math.floor(windows) + 1, "asked " .. asked .. " in " .. windows .. " windows")
  end)

  it("keeps the last addresses while the DNS server is down", function()
    local status, body = api("POST", "/upstream/kept", "server alone.dyups.test:" .. port .. " resolve;")
    assert.equal(200, status, body)
    dns:stop()
    nginx.wait_until(function()
      local u = json_of("kept")
      return u.names[1].error ~= nil and u.names[1].error ~= T.NULL
    end, 5, "a failed lookup reported")
    assert.matches("kept", json_of("kept").names[1].error, 1, true)
    local by = spread("kept", 20)
    assert.equal(20, (by[V4] or 0) + (by[V6] or 0))
    assert.is_true(math.abs((by[V4] or 0) - (by[V6] or 0)) <= 2, "both still used")
    dns:start()
  end)

  it("shows each name line's addresses and failed lookups on /dashboard and /metrics", function()
    local status, body = api("POST", "/upstream/shown",
      "server app.dyups.test:" .. port .. " resolve; server 127.0.0.1:" .. other .. ";")
    assert.equal(200, status, body)
    local function shown()
      local s, b = nginx.http(proxy.ports.proxy, "GET", "/dashboard?format=json")
      assert.equal(200, s, b)
      for _, u in ipairs(T.json_decode(b).upstreams) do
        if u.name == "shown" then return u end
      end
    end
    -- What the record holds now (an earlier case moved it): the page
    -- shows the name line with the addresses it resolved to.
    local app = shown().names[1]
    assert.equal("app.dyups.test:" .. port, app.name)
    assert.equal(true, app.resolve)
    assert.equal(T.NULL, app.error)
    assert.is_true(#app.addresses >= 1)
    assert.is_true(app.resolved_ms > 0)
    local servers = {}
    for _, srv in ipairs(json_of("shown").servers) do
      if srv.name then servers[#servers + 1] = srv.addr end
    end
    table.sort(servers)
    table.sort(app.addresses)
    assert.same(servers, app.addresses)
    -- The record gone: the page says the lookup failed, and the metric counts it.
    dns:set_hosts {
      ["alone.dyups.test"] = { V4, V6 },
      ["count.dyups.test"] = { V4 },
      ["once.dyups.test"] = { V4 },
    }
    nginx.wait_until(function()
      local a = shown().names[1]
      return a.error ~= T.NULL and a.failures >= 1
    end, TTL + 3, "the failed lookup shown")
    assert.matches("NXDOMAIN", shown().names[1].error, 1, true)
    local s, text = nginx.http(proxy.ports.proxy, "GET", "/metrics")
    assert.equal(200, s, text)
    local n = text:match('dyups_upstream_resolve_failures_total{upstream="shown",name="app%.dyups%.test:' ..
      port .. '"} (%d+)')
    assert.is_truthy(n, text:sub(1, 2000))
    assert.is_true(tonumber(n) >= 1)
    dns:set_hosts {
      ["app.dyups.test"] = { V4, V6 },
      ["alone.dyups.test"] = { V4, V6 },
      ["count.dyups.test"] = { V4 },
      ["once.dyups.test"] = { V4 },
    }
    assert.equal(200, (api("DELETE", "/upstream/shown")))
  end)

  it("removes a name's servers on NXDOMAIN, but never an upstream's last", function()
    local status, body = api("POST", "/upstream/mixed",
      "server alone.dyups.test:" .. port .. " resolve; server 127.0.0.1:" .. other .. ";")
    assert.equal(200, status, body)
    dns:set_hosts {
      ["count.dyups.test"] = { V4 },
      ["once.dyups.test"] = { V4 },
    }
    -- Beside a server written as an address: all of the name's go.
    nginx.wait_until(function()
      return #json_of("mixed").servers == 1
    end, TTL + 2, "the name's servers removed")
    assert.same({}, json_of("mixed").names[1].addresses)
    for _ = 1, 6 do
      local s, p = dy.get(proxy, "/", { Host = "mixed" })
      assert.equal(200, s)
      assert.equal(other, p)
    end
    -- Alone in its upstream: one server stays, and the log says so.
    nginx.wait_until(function()
      return proxy:error_log():find("kept", 1, true) and #json_of("kept").servers == 1
    end, TTL + 2, "the last server kept")
    assert.matches("NXDOMAIN, but kept", proxy:error_log(), 1, true)
    local s = dy.get(proxy, "/", { Host = "kept" })
    assert.equal(200, s)
    -- The line stays, and its name comes back when the record does.
    local _, text = api("GET", "/upstream/mixed")
    assert.matches("server alone.dyups.test:" .. port .. " resolve\n", text, 1, true)
    dns:set_hosts {
      ["alone.dyups.test"] = { V4 },
      ["count.dyups.test"] = { V4 },
      ["once.dyups.test"] = { V4 },
    }
    nginx.wait_until(function() return #json_of("mixed").servers == 2 end, TTL + 2, "back")
  end)
end)
