-- `server NAME service=NAME resolve;` (SRV records) against a real DNS
-- server on loopback (dnsmasq's --srv-host lines, spec/helpers/dnsmasq.lua):
-- ports and weights from the records, lower priorities as backups, the
-- records followed when they change, as nginx >= 1.27.3 does.
--
-- Every target resolves to 127.0.0.1; the records' ports tell the
-- backends apart (each answers with its port).
local nginx = require "spec.helpers.nginx"
local dy = require "spec.helpers.dyups"
local dnsmasq = require "spec.helpers.dnsmasq"
local T = require "spec.helpers.traffic"

local TTL = 1
local HOSTS = {
  ["one.dyups.test"] = { "127.0.0.1" },
  ["two.dyups.test"] = { "127.0.0.1" },
}

describe("server NAME service=... resolve (SRV, dnsmasq on loopback, 2 workers)", function()
  local dns, proxy, ports, backends

  --- dnsmasq's --srv-host lines: the weighted service, the one with a
  --- backup, and the one that moves, as `moved` says.
  local function records(moved)
    return {
      ("_http._tcp.w.dyups.test,one.dyups.test,%d,0,3"):format(ports[1]),
      ("_http._tcp.w.dyups.test,two.dyups.test,%d,0,1"):format(ports[2]),
      ("_http._tcp.b.dyups.test,one.dyups.test,%d,0,1"):format(ports[3]),
      ("_http._tcp.b.dyups.test,two.dyups.test,%d,10,1"):format(ports[4]),
      ("_http._tcp.m.dyups.test,one.dyups.test,%d,0,1"):format(moved and ports[2] or ports[1]),
    }
  end

  local function api(method, path, body)
    return nginx.http(proxy.ports.api, method, path, { body = body })
  end

  local function json_of(name)
    local status, body = api("GET", "/upstream/" .. name .. "?format=json")
    assert.equal(200, status, body)
    return assert(T.json_decode(body), body)
  end

  --- `n` requests to upstream `host`, each over a new connection: how
  --- many each backend port answered, in all and in each worker.
  local function spread(host, n)
    local by, workers = {}, {}
    for _ = 1, n do
      local status, port, worker, body = dy.get(proxy, "/", { Host = host })
      assert.equal(200, status, body)
      by[port] = (by[port] or 0) + 1
      workers[worker] = workers[worker] or {}
      workers[worker][port] = (workers[worker][port] or 0) + 1
    end
    return by, workers
  end

  lazy_setup(function()
    backends, ports = dy.backends(4)
    dns = dnsmasq.start { ttl = TTL, hosts = HOSTS, srv = records(false) }
    -- A seeded line is resolved in nginx's master at init, blocking.
    proxy = dy.proxy {
      init = ('resolver = "127.0.0.1:%d ipv6=off", resolver_timeout = 1'):format(dns.port),
      upstreams = "upstream seeded {\n    server w.dyups.test service=http resolve;\n}\n",
    }
    proxy:start()
    assert.equal(2, #proxy:worker_pids())
  end)

  lazy_teardown(function()
    dnsmasq.stop_all()
    nginx.stop_all()
  end)

  it("refuses service= without resolve with 400 naming it, as nginx refuses it", function()
    local status, body = api("POST", "/upstream/w", "server w.dyups.test service=http;")
    assert.equal(400, status, body)
    assert.matches('service upstream "w.dyups.test" requires "resolve" parameter', body, 1, true)
    assert.equal(404, (api("GET", "/upstream/w")))
    status, body = api("POST", "/upstream/w", "server w.dyups.test:80 service=http resolve;")
    assert.equal(400, status, body)
    assert.matches("may not have port", body, 1, true)
    assert.equal(404, (api("GET", "/upstream/w")))
  end)

  it("balances by the records' weights, on the records' ports", function()
    local status, body = api("POST", "/upstream/w", "server w.dyups.test service=http resolve;")
    assert.equal(200, status, body)
    local _, text = api("GET", "/upstream/w")
    assert.matches("server w.dyups.test service=http resolve\n", text, 1, true)
    local u = json_of("w")
    assert.equal("http", u.names[1].service)
    local want = { dy.addr(ports[1]), dy.addr(ports[2]) }
    table.sort(want)
    table.sort(u.names[1].addresses)
    assert.same(want, u.names[1].addresses)
    local seeded = json_of("seeded")
    table.sort(seeded.names[1].addresses)
    assert.same(want, seeded.names[1].addresses)
    local weights = {}
    for _, s in ipairs(seeded.servers) do weights[s.addr] = s.weight end
    assert.same({ [dy.addr(ports[1])] = 3, [dy.addr(ports[2])] = 1 }, weights)
    -- Weights 3 and 1. Smooth weighted round robin runs per worker and
    -- repeats `a a b a`: in any run of k requests a worker sends 3k/4
    -- of them to the first, give or take 3/4. With two workers the count
    -- of 40 is 30 within 1.5: 28..32 cannot be missed by a right
    -- balancer, and weights 1:1 (20) or the records ignored cannot hit it.
    local by = spread("w", 40)
    assert.equal(40, (by[ports[1]] or 0) + (by[ports[2]] or 0))
    assert.is_true(math.abs((by[ports[1]] or 0) - 30) <= 2,
      ("weight 3 got %d of 40, weight 1 got %d"):format(by[ports[1]] or 0, by[ports[2]] or 0))
  end)

  it("makes a lower-priority record a backup: traffic only while the primary is down", function()
    local status, body = api("POST", "/upstream/b", "server b.dyups.test service=http resolve;")
    assert.equal(200, status, body)
    local u = json_of("b")
    local backup = {}
    for _, s in ipairs(u.servers) do backup[s.addr] = s.backup end
    assert.same({ [dy.addr(ports[3])] = false, [dy.addr(ports[4])] = true }, backup)
    local by = spread("b", 20)
    assert.equal(20, by[ports[3]], "the primary takes every request")
    backends[3]:stop()
    by = spread("b", 10)
    assert.equal(10, by[ports[4]], "the backup takes them while the primary is down")
  end)

  it("follows a changed record within TTL + 1 s in every worker", function()
    local status, body = api("POST", "/upstream/m", "server m.dyups.test service=http resolve;")
    assert.equal(200, status, body)
    local _, workers = spread("m", 10)
    for _, w in pairs(workers) do assert.same({ [ports[1]] = w[ports[1]] }, w) end
    local before = json_of("m").version
    dns:set_srv(records(true))
    local changed = nginx.now()
    nginx.wait_until(function()
      local by, ws = spread("m", 20)
      local n = 0
      for _ in pairs(ws) do n = n + 1 end
      return by[ports[2]] == 20 and n == 2
    end, TTL + 1 + 1, "traffic to the record's new port only, in both workers")
    -- Within TTL + 1 s of the change (plus the rounds of requests above).
    assert.is_true(nginx.now() - changed < TTL + 1 + 1)
    local u = json_of("m")
    assert.same({ dy.addr(ports[2]) }, u.names[1].addresses)
    assert.equal(before + 1, u.version, "one write for the change")
  end)

  it("counts failed lookups per line, and the count goes on after a reload", function()
    dns:stop()
    local function failures()
      local n = json_of("m").names[1]
      return n.failures or 0, n.last_lookup or 0
    end
    -- A failed lookup is asked again after 1 s: four take about 4 s.
    nginx.wait_until(function() return failures() >= 4 end, 8, "four failed lookups counted")
    assert.matches("kept", json_of("m").names[1].error, 1, true)
    local counted = failures()
    proxy:reload()
    -- The old workers are gone: a lookup after this second is the new
    -- lease holder's. Its first ones (they fail too) publish the count it
    -- went on from; one that started again would say 1 or 2, not more
    -- than the 4 before.
    local after_ms = (os.time() + 1) * 1000
    nginx.wait_until(function()
      local _, last = failures()
      return last > after_ms
    end, 6, "a lookup by the new workers")
    assert.is_true(failures() > counted, "failures after the reload: " .. failures() .. ", before: " .. counted)
    -- The servers stayed through it all.
    assert.same({ dy.addr(ports[2]) }, json_of("m").names[1].addresses)
    dns:start()
  end)
end)
