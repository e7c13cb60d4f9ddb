-- Integration specs for the ngx.dyups balancer: a real proxy nginx (2
-- workers, reuseport, so new connections spread over both) in front of real
-- backend nginx instances that answer "<port> <connection_requests>".
--
-- Every request in these specs goes over a NEW client connection unless
-- said otherwise (spec/helpers/traffic.lua), so the kernel spreads them over
-- both workers; specs assert that both worker pids really served requests.
local nginx = require "spec.helpers.nginx"
local dy = require "spec.helpers.dyups"
local T = require "spec.helpers.traffic"
local ffi = require "ffi"

local addr, upstream, body_of = dy.addr, dy.upstream, dy.body_of

-- error-log lines whose message (not the `host:` field nginx appends) names `word`
local function log_names(inst, word)
  local n = 0
  for line in inst:error_log():gmatch("[^\n]+") do
    if line:find("[error]", 1, true) then
      local msg = line:match("^(.-), client: ") or line
      if msg:find(word, 1, true) then n = n + 1 end
    end
  end
  return n
end

local function ups(inst, query, method)
  local status, body = T.request(inst.ports.proxy, method or "GET", "/ups?" .. query)
  return status, body
end

-- both workers answer before a spec starts measuring
local function warm_up(inst, path, headers)
  local seen, n = {}, 0
  nginx.wait_until(function()
    local _, _, pid = T.get(inst, path or "/local", headers)
    if pid and not seen[pid] then seen[pid] = true n = n + 1 end
    return n >= 2
  end, 5, "both workers to answer")
end

-- every window of `period` consecutive requests of one worker holds exactly
-- want[port] requests for each port (SWRR is exact per cycle)
-- (skip: ignore windows starting in the first `skip` requests of a worker)
local function assert_cycles(s, period, want, skip)
  for pid, seq in pairs(s.seq) do
    assert.is_true(#seq >= period + (skip or 0), ("worker %d served only %d requests"):format(pid, #seq))
    for i = 1 + (skip or 0), #seq - period + 1 do
      local got = {}
      for j = i, i + period - 1 do
        local p = seq[j]
        got[p] = (got[p] or 0) + 1
      end
      for port, n in pairs(want) do
        if (got[port] or 0) ~= n then
          error(("worker %d, requests %d..%d: port %d got %d, want %d; sequence: %s")
            :format(pid, i, i + period - 1, port, got[port] or 0, n, table.concat(seq, " ")), 2)
        end
      end
    end
  end
end

describe("ngx.dyups balancer", function()
  lazy_teardown(function() nginx.stop_all() end)

  ---------------------------------------------------------------------------
  describe("propagation of an update to every worker (refresh = 30 s, so not by the timer)", function()
    local proxy, A, B

    lazy_setup(function()
      local _, ports = dy.backends(2)
      A, B = ports[1], ports[2]
      -- a slow refresh timer: what the next requests see is applied by the
      -- request path itself, not by the timer
      proxy = dy.proxy { upstreams = upstream("local", { addr(A) }), init = "refresh = 30," }
      proxy:start()
      warm_up(proxy)
    end)
    lazy_teardown(function() nginx.stop_all() end)

    it("update() via /lua in one worker: the next 30 requests (6 flips, both pids) all route per the new table, 0 misrouted", function()
      local s0 = T.burst(proxy, 10)
      assert.same({ [A] = 10 }, s0.port)
      for round = 1, 6 do
        local target = round % 2 == 1 and B or A
        local status, body, h = T.request(proxy.ports.proxy, "POST", "/lua",
          { body = ("return require('ngx.dyups').update('local', %q)"):format(body_of { addr(target) }) })
        assert.equal(200, status)
        assert.equal("200success\n", body)
        local updater = tonumber(h["x-worker"])
        local s = T.burst(proxy, 30)
        assert.same({ [200] = 30 }, s.status, T.describe(s))
        assert.same({ [target] = 30 }, s.port, "round " .. round .. ": " .. T.describe(s))
        assert.equal(2, s.pids, "both workers must serve: " .. T.describe(s))
        -- the worker that did NOT make the update served some of them too
        local other = 0
        for pid, n in pairs(s.pid) do if pid ~= updater then other = other + n end end
        assert.is_true(other > 0, "the non-updating worker served nothing: " .. T.describe(s))
      end
    end)

    it("/ups?op=del in one worker: the next 40 requests (both pids) never reach the removed server; after op=add both workers use it again", function()
      assert.equal("200success", T.run(proxy, ("return dyups.update('local', %q)"):format(body_of { addr(A), addr(B) })))
      local s = T.burst(proxy, 40)
      assert.equal(2, s.ports, T.describe(s))

      local status, body = ups(proxy, "op=del&server=" .. addr(A))
      assert.equal(200, status, body)
      s = T.burst(proxy, 40)
      assert.same({ [200] = 40 }, s.status, T.describe(s))
      assert.same({ [B] = 40 }, s.port, T.describe(s))
      assert.equal(2, s.pids, T.describe(s))

      status, body = ups(proxy, "op=add&server=" .. addr(A), "PUT")
      assert.equal(200, status, body)
      s = T.burst(proxy, 40)
      assert.same({ [200] = 40 }, s.status, T.describe(s))
      assert.equal(2, s.pids, T.describe(s))
      for pid, seq in pairs(s.seq) do
        local seen = {}
        for _, p in ipairs(seq) do seen[p] = true end
        assert.is_true(seen[A] and seen[B] and true or false,
          "worker " .. pid .. " must use both servers again: " .. table.concat(seq, " "))
      end
    end)
  end)

  ---------------------------------------------------------------------------
  describe("smooth weighted round robin", function()
    local proxy, A, B, C

    lazy_setup(function()
      local _, ports = dy.backends(3)
      A, B, C = ports[1], ports[2], ports[3]
      proxy = dy.proxy {
        upstreams = upstream("local", { addr(A) .. " weight=3", addr(B) .. " weight=1" })
          .. upstream("eq", { addr(A), addr(B) })
          .. upstream("w511", { addr(A) .. " weight=5", addr(B), addr(C) }),
      }
      proxy:start()
    end)
    lazy_teardown(function() nginx.stop_all() end)

    it("weight=3 vs weight=1 over 400 requests: 300±2 / 100±2 overall, every 4 consecutive requests of a worker are exactly 3:1", function()
      local s = T.burst(proxy, 400)
      assert.same({ [200] = 400 }, s.status, T.describe(s))
      assert.equal(2, s.pids, T.describe(s))
      assert.is_true(math.abs((s.port[A] or 0) - 300) <= 2, T.describe(s))
      assert.is_true(math.abs((s.port[B] or 0) - 100) <= 2, T.describe(s))
      assert_cycles(s, 4, { [A] = 3, [B] = 1 })
    end)

    it("equal weights alternate strictly within each worker (200 requests, |A-B| <= 2 overall)", function()
      local s = T.burst(proxy, 200, "/", { Host = "eq" })
      assert.same({ [200] = 200 }, s.status, T.describe(s))
      assert.equal(2, s.pids, T.describe(s))
      assert.is_true(math.abs((s.port[A] or 0) - (s.port[B] or 0)) <= 2, T.describe(s))
      assert_cycles(s, 2, { [A] = 1, [B] = 1 })
    end)

    it("weight=5/1/1 over 280 requests: 200±2/40±2/40±2, every 7 consecutive requests of a worker are exactly 5/1/1", function()
      local s = T.burst(proxy, 280, "/", { Host = "w511" })
      assert.same({ [200] = 280 }, s.status, T.describe(s))
      assert.equal(2, s.pids, T.describe(s))
      assert.is_true(math.abs((s.port[A] or 0) - 200) <= 2, T.describe(s))
      assert.is_true(math.abs((s.port[B] or 0) - 40) <= 2, T.describe(s))
      assert.is_true(math.abs((s.port[C] or 0) - 40) <= 2, T.describe(s))
      assert_cycles(s, 7, { [A] = 5, [B] = 1, [C] = 1 })
    end)

    it("a weight changed by update() applies to the next requests (weight 1:4 over 200 requests: 40±2 / 160±2, windows of 5 exact after a 5-request transient per worker)", function()
      assert.equal("200success", T.run(proxy,
        ("return dyups.update('local', %q)"):format(body_of { addr(A), addr(B) .. " weight=4" })))
      local s = T.burst(proxy, 200)
      assert.same({ [200] = 200 }, s.status, T.describe(s))
      assert.equal(2, s.pids, T.describe(s))
      assert.is_true(math.abs((s.port[A] or 0) - 40) <= 2, T.describe(s))
      assert.is_true(math.abs((s.port[B] or 0) - 160) <= 2, T.describe(s))
      -- the old cycle's current weights may carry over: allow one cycle
      assert_cycles(s, 5, { [A] = 1, [B] = 4 }, 5)
    end)
  end)

  ---------------------------------------------------------------------------
  describe("down servers and /ups del/add", function()
    local proxy, A, B, C

    lazy_setup(function()
      local _, ports = dy.backends(3)
      A, B, C = ports[1], ports[2], ports[3]
      proxy = dy.proxy {
        upstreams = upstream("local", { addr(A), addr(B), addr(C) .. " down" }),
      }
      proxy:start()
      warm_up(proxy)
    end)
    lazy_teardown(function() nginx.stop_all() end)

    it("a server marked `down` in the upstream file gets 0 of 60 requests; the other two alternate", function()
      local s = T.burst(proxy, 60)
      assert.same({ [200] = 60 }, s.status, T.describe(s))
      assert.is_nil(s.port[C], T.describe(s))
      assert.equal(2, s.pids, T.describe(s))
      assert_cycles(s, 2, { [A] = 1, [B] = 1 })
    end)

    it("after /ups?op=del a server gets 0 of 60 requests in any worker; after op=add it gets traffic in both workers", function()
      local status, body = ups(proxy, "op=del&server=" .. addr(A))
      assert.equal(200, status, body)
      local s = T.burst(proxy, 60)
      assert.same({ [200] = 60 }, s.status, T.describe(s))
      assert.same({ [B] = 60 }, s.port, T.describe(s))
      assert.equal(2, s.pids, T.describe(s))

      status, body = ups(proxy, "op=add&server=" .. addr(A), "POST")
      assert.equal(200, status, body)
      s = T.burst(proxy, 60)
      assert.same({ [200] = 60 }, s.status, T.describe(s))
      assert.is_nil(s.port[C], T.describe(s))
      assert.equal(2, s.pids, T.describe(s))
      assert_cycles(s, 2, { [A] = 1, [B] = 1 })
    end)

    it("op=add of a server marked `down` in the file puts it in rotation (each worker's windows of 3 hold A, B and C once)", function()
      local status, body = ups(proxy, "op=add&server=" .. addr(C) .. "&upstream=local")
      assert.equal(200, status, body)
      local s = T.burst(proxy, 90)
      assert.same({ [200] = 90 }, s.status, T.describe(s))
      assert.equal(2, s.pids, T.describe(s))
      assert_cycles(s, 3, { [A] = 1, [B] = 1, [C] = 1 })
    end)
  end)

  ---------------------------------------------------------------------------
  describe("backup servers", function()
    local proxy, A, B, K, dead1, dead2

    lazy_setup(function()
      local _, ports = dy.backends(3)
      A, B, K = ports[1], ports[2], ports[3]
      dead1, dead2 = nginx.free_port(), nginx.free_port()
      proxy = dy.proxy {
        upstreams = upstream("local", { addr(A), addr(B), addr(K) .. " backup" })
          .. upstream("deadprim", { addr(dead1), addr(dead2), addr(K) .. " backup" })
          .. upstream("halfdead", { addr(dead1), addr(A), addr(K) .. " backup" }),
      }
      proxy:start()
      warm_up(proxy)
    end)
    lazy_teardown(function() nginx.stop_all() end)

    it("a backup gets 0 of 60 requests while both primaries are up, and 0 of 60 with one primary del'd", function()
      local s = T.burst(proxy, 60)
      assert.same({ [200] = 60 }, s.status, T.describe(s))
      assert.is_nil(s.port[K], T.describe(s))
      assert_cycles(s, 2, { [A] = 1, [B] = 1 })

      local status, body = ups(proxy, "op=del&server=" .. addr(A) .. "&upstream=local")
      assert.equal(200, status, body)
      s = T.burst(proxy, 60)
      assert.same({ [200] = 60 }, s.status, T.describe(s))
      assert.same({ [B] = 60 }, s.port, T.describe(s))
    end)

    it("every primary del'd: 60 of 60 requests go to the backup (both workers); one primary restored: 0 to the backup", function()
      local status, body = ups(proxy, "op=del&server=" .. addr(B) .. "&upstream=local")
      assert.equal(200, status, body)
      local s = T.burst(proxy, 60)
      assert.same({ [200] = 60 }, s.status, T.describe(s))
      assert.same({ [K] = 60 }, s.port, T.describe(s))
      assert.equal(2, s.pids, T.describe(s))

      status, body = ups(proxy, "op=add&server=" .. addr(B))
      assert.equal(200, status, body)
      s = T.burst(proxy, 60)
      assert.same({ [200] = 60 }, s.status, T.describe(s))
      assert.same({ [B] = 60 }, s.port, T.describe(s))
    end)

    it("every primary removed by update(): all 40 requests go to the backup; primaries back: 0 of 40", function()
      assert.equal("200success", T.run(proxy,
        ("return dyups.update('local', %q)"):format(body_of { addr(A) .. " down", addr(K) .. " backup" })))
      local s = T.burst(proxy, 40)
      assert.same({ [200] = 40 }, s.status, T.describe(s))
      assert.same({ [K] = 40 }, s.port, T.describe(s))

      assert.equal("200success", T.run(proxy,
        ("return dyups.update('local', %q)"):format(body_of { addr(A), addr(B), addr(K) .. " backup" })))
      s = T.burst(proxy, 40)
      assert.same({ [200] = 40 }, s.status, T.describe(s))
      assert.is_nil(s.port[K], T.describe(s))
    end)

    it("every primary dead (closed ports): 40 of 40 requests answered 200 by the backup", function()
      local s = T.burst(proxy, 40, "/", { Host = "deadprim" })
      assert.same({ [200] = 40 }, s.status, T.describe(s))
      assert.same({ [K] = 40 }, s.port, T.describe(s))
      assert.equal(2, s.pids, T.describe(s))
    end)

    it("one primary dead, one alive: 40 of 40 requests go to the live primary, 0 to the backup", function()
      local s = T.burst(proxy, 40, "/", { Host = "halfdead" })
      assert.same({ [200] = 40 }, s.status, T.describe(s))
      assert.same({ [A] = 40 }, s.port, T.describe(s))
    end)
  end)

  ---------------------------------------------------------------------------
  describe("failures, retries and passive health checks", function()
    local proxy, backends, A, B, dead1, dead3, deadft, dead4, dead5

    lazy_setup(function()
      local ports
      backends, ports = dy.backends(2)
      A, B = ports[1], ports[2]
      dead1, dead3, deadft = nginx.free_port(), nginx.free_port(), nginx.free_port()
      dead4, dead5 = nginx.free_port(), nginx.free_port()
      proxy = dy.proxy {
        upstreams = upstream("local", { addr(A), addr(B) })
          .. upstream("withdead", { addr(A), addr(dead1) .. " max_fails=1 fail_timeout=30" })
          .. upstream("dead3", { addr(A), addr(dead3) .. " max_fails=3 fail_timeout=30" })
          .. upstream("ft", { addr(A), addr(deadft) .. " max_fails=1 fail_timeout=1" })
          .. upstream("alldead", { addr(dead4), addr(dead5) }),
      }
      proxy:start()
      warm_up(proxy)
    end)
    lazy_teardown(function() nginx.stop_all() end)

    local function refused(port)
      return T.count_lines(proxy:error_log(), "connect() failed", "upstream: \"http://127.0.0.1:" .. port .. "/")
    end

    it("a server on a closed port (max_fails=1 fail_timeout=30) costs no client request: 60 of 60 are 200 from the live one; it is tried 1..2 times (once per worker)", function()
      local s = T.burst(proxy, 60, "/", { Host = "withdead" })
      assert.same({ [200] = 60 }, s.status, T.describe(s))
      assert.same({ [A] = 60 }, s.port, T.describe(s))
      assert.equal(2, s.pids, T.describe(s))
      local n = refused(dead1)
      assert.is_true(n >= 1 and n <= 2, "connect() failures to the dead server: " .. n)
    end)

    it("max_fails=3: over 100 requests (all 200) the dead server is tried 3..6 times (max_fails per worker)", function()
      local s = T.burst(proxy, 100, "/", { Host = "dead3" })
      assert.same({ [200] = 100 }, s.status, T.describe(s))
      assert.same({ [A] = 100 }, s.port, T.describe(s))
      assert.equal(2, s.pids, T.describe(s))
      for pid, n in pairs(s.pid) do
        assert.is_true(n >= 6, "worker " .. pid .. " served only " .. n .. " requests")
      end
      local n = refused(dead3)
      assert.is_true(n >= 3 and n <= 6, "connect() failures to the dead server: " .. n)
    end)

    it("fail_timeout=1: skipped for 1 s (1..2 failures over 0.5 s of traffic), tried again after 1.2 s (1..2 more), all requests 200", function()
      local all = { status = {}, n = 0 }
      local function run(seconds)
        local deadline = T.now() + seconds
        repeat
          local s = T.burst(proxy, 10, "/", { Host = "ft" })
          for k, v in pairs(s.status) do all.status[k] = (all.status[k] or 0) + v end
          all.n = all.n + 10
          nginx.sleep(0.02)
        until T.now() >= deadline
      end
      run(0.5)
      local first = refused(deadft)
      assert.is_true(first >= 1 and first <= 2, "connect() failures in the first 0.5 s: " .. first)
      nginx.sleep(1.2)
      run(0.3)
      local second = refused(deadft) - first
      assert.is_true(second >= 1 and second <= 2, "connect() failures after fail_timeout: " .. second)
      assert.same({ [200] = all.n }, all.status)
    end)

    it("all servers dead (closed ports): 20 of 20 requests get 502 and the error log says \"no live upstreams\"", function()
      local s = T.burst(proxy, 20, "/", { Host = "alldead" })
      assert.same({ [502] = 20 }, s.status, T.describe(s))
      assert.equal(2, s.pids, T.describe(s))
      assert.is_true(T.count_lines(proxy:error_log(), "no live upstreams", "host: \"alldead\"") >= 1)
    end)

    it("every server `down`: 20 of 20 requests get 502 and the error log says \"no live upstreams\"", function()
      assert.equal("200success", T.run(proxy,
        ("return dyups.update('alldown', %q)"):format(body_of { addr(A) .. " down", addr(B) .. " down" })))
      local s = T.burst(proxy, 20, "/", { Host = "alldown" })
      assert.same({ [502] = 20 }, s.status, T.describe(s))
      assert.is_true(T.count_lines(proxy:error_log(), "no live upstreams", "host: \"alldown\"") >= 1)
    end)

    it("unknown upstream (Host: nosuchups): 10 of 10 requests get 502 and the error log names it", function()
      local s = T.burst(proxy, 10, "/", { Host = "nosuchups" })
      assert.same({ [502] = 10 }, s.status, T.describe(s))
      assert.is_true(log_names(proxy, "nosuchups") >= 1, "no error-log message naming nosuchups")
    end)

    it("a backend killed (SIGKILL) after 60 of 200 requests costs no client request: 200 of 200 are 200, none reach it afterwards, both workers serve", function()
      local victim = backends[2]
      local after = { port = {}, pid = {} }
      local s = T.burst(proxy, 200, "/local", nil, function(i, r)
        if i == 60 then
          assert.equal(0, ffi.C.kill(-victim.master, 9), "kill -KILL the backend's process group")
          nginx.wait_until(function() return not nginx.can_connect(B) end, 2, "backend to die")
        elseif i > 60 then
          if r.port then after.port[r.port] = (after.port[r.port] or 0) + 1 end
          if r.pid then after.pid[r.pid] = true end
        end
      end)
      assert.same({ [200] = 200 }, s.status, T.describe(s))
      assert.is_true((s.port[B] or 0) >= 20, "B served before the kill: " .. T.describe(s))
      assert.same({ [A] = 140 }, after.port)
      local pids = 0
      for _ in pairs(after.pid) do pids = pids + 1 end
      assert.equal(2, pids)
    end)

    it("a backend stopped (graceful) while 4 curl clients send 60 requests each (stop after >= 40 answers, >= 20 sent after it) costs no client request: 240 of 240 are 200", function()
      -- its own upstream and a fresh backend X (passive-health state of the
      -- other upstreams does not matter); X is stopped while curl clients
      -- run in parallel (shell background jobs).
      local X = dy.backend()
      X:start()
      local xport = X.ports.http
      assert.equal("200success", T.run(proxy,
        ("return dyups.update('conc', %q)"):format(body_of { addr(A), addr(xport) })))
      local out = os.tmpname()
      local script = ([[
for c in 1 2 3 4; do
  ( for i in $(seq 1 60); do
      curl -s -H 'Host: conc' -w ' %%{http_code}\n' --max-time 5 http://127.0.0.1:%d/
    done ) > %s.$c &
done
wait
cat %s.1 %s.2 %s.3 %s.4 > %s
rm -f %s.1 %s.2 %s.3 %s.4
]]):format(proxy.ports.proxy, out, out, out, out, out, out, out, out, out, out)
      local function answered()
        local n = 0
        for c = 1, 4 do
          for _ in (nginx.read_file(out .. "." .. c) or ""):gmatch("\n (%d%d%d)") do n = n + 1 end
        end
        return n
      end
      local job = io.popen("sh -c " .. nginx.shell_quote(script) .. " 2>&1")
      nginx.wait_until(function() return answered() >= 40 end, 5, "40 answers")
      X:stop()
      local after_stop = 240 - answered()
      local _ = job:read("*a")
      job:close()
      local codes, ports, total = {}, {}, 0
      for line in (nginx.read_file(out) or ""):gmatch("[^\n]+") do
        local code = line:match("^ (%d%d%d)$")
        if code then
          codes[code] = (codes[code] or 0) + 1
          total = total + 1
        end
        local port = tonumber(line:match("^(%d+) %d+$"))
        if port then ports[port] = (ports[port] or 0) + 1 end
      end
      os.remove(out)
      assert.equal(240, total)
      assert.same({ ["200"] = 240 }, codes)
      assert.is_true((ports[xport] or 0) > 0, "X got no traffic before it stopped")
      assert.is_true((ports[A] or 0) > 0, "A got no traffic")
      -- the stop happened while traffic was still running
      assert.is_true(after_stop >= 20, "only " .. after_stop .. " requests were sent after X stopped")
    end)
  end)

  ---------------------------------------------------------------------------
  describe("upstream keepalive", function()
    local proxy

    lazy_setup(function()
      local _, ports = dy.backends(1)
      proxy = dy.proxy { upstreams = upstream("local", { addr(ports[1]) }) }
      proxy:start()
    end)
    lazy_teardown(function() nginx.stop_all() end)

    it("40 requests over new client connections reuse upstream connections: connection_requests reaches >= 10, at most 4 fresh connections", function()
      local s = T.burst(proxy, 40)
      assert.same({ [200] = 40 }, s.status, T.describe(s))
      local max, fresh = 0, 0
      for _, r in ipairs(s.list) do
        if r.creq > max then max = r.creq end
        if r.creq == 1 then fresh = fresh + 1 end
      end
      assert.is_true(max >= 10, "max connection_requests " .. max)
      assert.is_true(fresh <= 4, "requests on a fresh upstream connection: " .. fresh)
    end)
  end)

  ---------------------------------------------------------------------------
  describe("Host routing to dynamic upstreams", function()
    local proxy, A, B

    lazy_setup(function()
      local _, ports = dy.backends(2)
      A, B = ports[1], ports[2]
      proxy = dy.proxy { upstreams = upstream("local", { addr(A) }) }
      proxy:start()
    end)
    lazy_teardown(function() nginx.stop_all() end)

    it("Host: dyhost → 502 (10/10) before update(), 20±2 / 20±2 over 40 after (both pids), 502 (10/10) after delete() with the log naming it", function()
      local s = T.burst(proxy, 10, "/", { Host = "dyhost" })
      assert.same({ [502] = 10 }, s.status, T.describe(s))
      assert.equal(2, s.pids, T.describe(s))

      assert.equal("200success", T.run(proxy,
        ("return dyups.update('dyhost', %q)"):format(body_of { addr(A), addr(B) })))
      s = T.burst(proxy, 40, "/", { Host = "dyhost" })
      assert.same({ [200] = 40 }, s.status, T.describe(s))
      assert.equal(2, s.pids, T.describe(s))
      assert.is_true(math.abs((s.port[A] or 0) - 20) <= 2, T.describe(s))
      assert.is_true(math.abs((s.port[B] or 0) - 20) <= 2, T.describe(s))
      assert_cycles(s, 2, { [A] = 1, [B] = 1 })
      -- other upstreams are untouched
      local l = T.burst(proxy, 10, "/local")
      assert.same({ [A] = 10 }, l.port, T.describe(l))

      local before = log_names(proxy, "dyhost")
      assert.equal("200success", T.run(proxy, "return dyups.delete('dyhost')"))
      s = T.burst(proxy, 10, "/", { Host = "dyhost" })
      assert.same({ [502] = 10 }, s.status, T.describe(s))
      assert.equal(2, s.pids, T.describe(s))
      assert.is_true(log_names(proxy, "dyhost") > before, "no new error-log message naming dyhost")
    end)
  end)
end)
