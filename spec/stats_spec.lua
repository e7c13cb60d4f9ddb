-- Per-server statistics, counted by every worker into the state file and
-- shown by `GET /upstream/NAME?format=json` and `GET /workers`: a real nginx
-- with 2 workers in front of real backends. The balancer counts picks and
-- the failures `proxy_next_upstream` retries; the log hook (`dyups.log()`,
-- in the proxy's http block) counts each attempt's status class and
-- response time; both add up over the workers, exactly.
--
-- The backend answers 200 on port A and 500 on port B; port D has nothing
-- listening, so a request sent there fails and is retried on the next server.
local nginx = require "spec.helpers.nginx"
local dy = require "spec.helpers.dyups"
local T = require "spec.helpers.traffic"

local addr = dy.addr

local BACKEND = [[
http {
    server {
        listen 127.0.0.1:${port_a};
        location / { return 200 "$server_port ok\n"; }
    }
    server {
        listen 127.0.0.1:${port_b};
        location / { return 500 "$server_port broken\n"; }
    }
}
]]

describe("statistics (2 workers)", function()
  local proxy, backend, A, B, D

  lazy_setup(function()
    backend = nginx.new { workers = 1, modules = false, conf = BACKEND }
    backend:start()
    A, B = backend.ports.a, backend.ports.b
    D = nginx.free_port()
    proxy = dy.proxy()
    proxy:start()
  end)

  lazy_teardown(function()
    if proxy then proxy:stop() end
    if backend then backend:stop() end
  end)

  local function api(method, path, body)
    local status, text = T.request(proxy.ports.api, method, path, { body = body })
    assert(status, text)
    return status, text
  end

  local function define(name, body)
    local status, text = api("POST", "/upstream/" .. name, body)
    assert.equal(200, status, text)
    -- Both workers route by it before traffic is sent.
    nginx.wait_until(function()
      local doc = T.json_decode(select(2, api("GET", "/workers")))
      local behind = #doc.workers ~= 2
      for _, w in ipairs(doc.workers) do behind = behind or w.generation ~= doc.version end
      return not behind
    end, 5, "both workers to apply " .. name)
  end

  -- The servers of `name`, by address, from its JSON.
  local function servers(name)
    local status, text = api("GET", "/upstream/" .. name .. "?format=json")
    assert.equal(200, status, text)
    local by = {}
    for _, s in ipairs(T.json_decode(text).servers) do by[s.addr] = s end
    return by
  end

  local function requests_sent(name, n)
    for _ = 1, n do
      local status = T.get(proxy, "/", { Host = name })
      assert(status, "request to " .. name)
    end
  end

  it("counts every pick once over both workers, and each response by its class", function()
    define("stats", dy.body_of { addr(A), addr(B) })
    local N = 40
    local s = T.burst(proxy, N, "/", { Host = "stats" })
    -- Each worker keeps its own rotation: A answers 200, B 500.
    local ok, broken = s.status[200] or 0, s.status[500] or 0
    assert.equal(N, ok + broken, T.describe(s))
    assert(ok > 0 and broken > 0, T.describe(s))
    assert.equal(2, s.pids, "both workers served: " .. T.describe(s))
    -- Picks are counted before the request goes out: exact at once.
    local by = servers("stats")
    assert.equal(ok, by[addr(A)].stats.requests)
    assert.equal(broken, by[addr(B)].stats.requests)
    -- The log phase runs after the answer is sent: waited for, then exact.
    nginx.wait_until(function()
      by = servers("stats")
      return by[addr(A)].stats.response_time.count + by[addr(B)].stats.response_time.count == N
    end, 5, "the log phase of every request")
    local a, b = by[addr(A)].stats, by[addr(B)].stats
    assert.same({ ["1xx"] = 0, ["2xx"] = ok, ["3xx"] = 0, ["4xx"] = 0, ["5xx"] = 0 }, a.responses)
    assert.same({ ["1xx"] = 0, ["2xx"] = 0, ["3xx"] = 0, ["4xx"] = 0, ["5xx"] = broken }, b.responses)
    assert.equal(0, a.fails + b.fails, "a 500 is no failure without proxy_next_upstream http_500")
    local in_buckets = 0
    for _, n in ipairs(a.response_time.counts) do in_buckets = in_buckets + n end
    assert.equal(ok, in_buckets)
    assert.equal("up", by[addr(A)].state)
    assert.equal(12, #a.response_time.counts)
  end)

  it("lists both workers with their generation and requests in /workers", function()
    local status, text = api("GET", "/workers")
    assert.equal(200, status, text)
    local doc = T.json_decode(text)
    local pids = proxy:worker_pids()
    table.sort(pids)
    local listed, total = {}, 0
    for _, w in ipairs(doc.workers) do
      listed[#listed + 1] = w.pid
      total = total + w.requests
      assert.equal(doc.version, w.generation, "worker " .. w.pid .. " is up to date")
    end
    table.sort(listed)
    assert.same(pids, listed)
    -- Every pick so far was the previous test's.
    assert.equal(40, total)
    assert.equal(doc.version, doc.table.version)
    assert(doc.table.writes_accepted >= 1, text)
    assert(doc.table.bytes_used > 0 and doc.table.bytes_used < doc.table.bytes_capacity, text)
  end)

  it("counts a refused connection as a failure of its server, retried on the next", function()
    define("flaky", dy.body_of { addr(D) .. " max_fails=1 fail_timeout=30s", addr(A) })
    -- One at a time: the first request in either worker goes to D first,
    -- fails, is retried on A, and takes D out for every worker.
    local N = 10
    for _ = 1, N do
      local status = T.get(proxy, "/", { Host = "flaky" })
      assert.equal(200, status)
    end
    local by
    nginx.wait_until(function()
      by = servers("flaky")
      return by[addr(A)].stats.responses["2xx"] == N
    end, 5, "the log phase of every request")
    local d, a = by[addr(D)], by[addr(A)]
    assert.equal(1, d.stats.requests)
    assert.equal(1, d.stats.fails)
    assert.equal(1, d.stats.unavail)
    assert.equal("unavail", d.state)
    -- nginx records the refused attempt as 502: counted against D.
    assert.equal(1, d.stats.responses["5xx"])
    assert.equal(N, a.stats.requests)
    assert.equal(0, a.stats.fails)
  end)

  it("keeps a server's counters across table changes that keep it", function()
    local before = servers("stats")
    define("unrelated", dy.body_of { addr(A) })
    define("stats", dy.body_of { addr(B), addr(A) .. " weight=2", addr(D) .. " down" })
    local after = servers("stats")
    for _, server in ipairs { addr(A), addr(B) } do
      assert.same(before[server].stats, after[server].stats, server)
    end
    assert.equal(0, after[addr(D)].stats.requests, "a new server starts at zero")
    assert.equal("down", after[addr(D)].state)
    -- And counting goes on from there.
    requests_sent("stats", 3)
    local now = servers("stats")
    assert.equal(before[addr(A)].stats.requests + before[addr(B)].stats.requests + 3,
      now[addr(A)].stats.requests + now[addr(B)].stats.requests)
  end)
end)
