-- Integration specs for the ngx.dyups admin endpoints `/ups` and
-- `/ups/check`, against a real proxy nginx (2 workers) and real backends.
local nginx = require "spec.helpers.nginx"
local dy = require "spec.helpers.dyups"
local T = require "spec.helpers.traffic"

local USAGE = "usage: /ups?op=add|del&server=IP:PORT[&upstream=NAME]"

local addr, upstream, body_of = dy.addr, dy.upstream, dy.body_of

-- request `path` over a new connection (or over `conn`); decode the JSON
local function call(inst, method, path, conn, headers)
  local status, raw, h
  if conn then
    status, raw, h = conn:request(method, path)
  else
    status, raw, h = T.request(inst.ports.proxy, method, path, { headers = headers })
  end
  assert(status, "request failed: " .. tostring(raw))
  local ok, json = pcall(T.json_decode, raw)
  assert(ok, ("%s %s: response is not JSON: %s (%s)"):format(method, path, raw, tostring(json)))
  return status, json, raw, h
end

-- exactly the keys msg, data, code
local function assert_shape(json, raw)
  assert.equal("object", T.json_kind(json), raw)
  assert.same({ "code", "data", "msg" }, T.keys(json), raw)
  assert.equal("string", type(json.msg), raw)
  assert.equal("string", type(json.code), raw)
end

local function assert_success(status, json, raw, msg, server)
  assert.equal(200, status, raw)
  assert_shape(json, raw)
  assert.equal("A00001", json.code, raw)
  assert.equal(msg, json.msg, raw)
  assert.equal("array", T.json_kind(json.data), raw)
  assert.same({ server }, { unpack(json.data) }, raw)
  assert.equal(1, #json.data, raw)
end

local function assert_failure(status, json, raw, want_status, needles)
  assert.equal(want_status, status, raw)
  assert_shape(json, raw)
  assert.equal("E00001", json.code, raw)
  for _, n in ipairs(needles) do
    assert.is_truthy(json.msg:find(n, 1, true), ("msg %q lacks %q"):format(json.msg, n))
  end
end

-- the decoded /ups/check data as a plain table
local function check_data(inst, conn)
  local status, json, raw = call(inst, "GET", "/ups/check", conn)
  assert.equal(200, status, raw)
  assert_shape(json, raw)
  assert.equal("OK", json.msg, raw)
  assert.equal("A00001", json.code, raw)
  -- {} must be an object, never an array
  assert.equal("object", T.json_kind(json.data), raw)
  local out = {}
  for k, v in pairs(json.data) do out[k] = v end
  return out, raw
end

local function warm_up(inst)
  local seen, n = {}, 0
  nginx.wait_until(function()
    local _, _, pid = T.get(inst, "/local")
    if pid and not seen[pid] then seen[pid] = true n = n + 1 end
    return n >= 2
  end, 5, "both workers to answer")
end

describe("ngx.dyups admin", function()
  lazy_teardown(function() nginx.stop_all() end)

  ---------------------------------------------------------------------------
  describe("/ups success cases", function()
    local proxy, A, B, C

    lazy_setup(function()
      local _, ports = dy.backends(3)
      A, B, C = ports[1], ports[2], ports[3]
      proxy = dy.proxy {
        upstreams = upstream("local", { addr(A), addr(B) })
          .. upstream("u2", { addr(A), addr(C) })
          .. upstream("solo", { addr(C) }),
      }
      proxy:start()
    end)
    lazy_teardown(function() nginx.stop_all() end)

    before_each(function()
      -- a known table for every case
      for name, servers in pairs {
        ["local"] = { addr(A), addr(B) },
        u2 = { addr(A), addr(C) },
        solo = { addr(C) },
      } do
        assert.equal("200success", T.run(proxy, ("return dyups.update(%q, %q)"):format(name, body_of(servers))))
      end
    end)

    it("op=del without upstream marks the server down in every upstream holding it (local and u2), 200 {msg,data:[IP:PORT],code:A00001}, version +1", function()
      local v0 = tonumber(T.run(proxy, "return (dyups.version())"))
      local status, json, raw = call(proxy, "GET", "/ups?op=del&server=" .. addr(A))
      assert_success(status, json, raw, "del a server success.", addr(A))
      assert.is_true(T.servers(proxy, "local")[addr(A)].down)
      assert.is_true(T.servers(proxy, "u2")[addr(A)].down)
      assert.is_false(T.servers(proxy, "local")[addr(B)].down)
      assert.is_false(T.servers(proxy, "u2")[addr(C)].down)
      assert.is_true(tonumber(T.run(proxy, "return (dyups.version())")) > v0)
    end)

    it("op=add without upstream restores the server in every upstream holding it, 200 {msg:\"add a server success.\"}", function()
      local status, _, raw = call(proxy, "GET", "/ups?op=del&server=" .. addr(A))
      assert.equal(200, status, raw)
      local v0 = tonumber(T.run(proxy, "return (dyups.version())"))
      local json
      status, json, raw = call(proxy, "GET", "/ups?op=add&server=" .. addr(A))
      assert_success(status, json, raw, "add a server success.", addr(A))
      assert.is_false(T.servers(proxy, "local")[addr(A)].down)
      assert.is_false(T.servers(proxy, "u2")[addr(A)].down)
      assert.is_true(tonumber(T.run(proxy, "return (dyups.version())")) > v0)
    end)

    it("op=del&upstream=local marks it down in local only (u2 untouched)", function()
      local status, json, raw = call(proxy, "GET", "/ups?op=del&server=" .. addr(A) .. "&upstream=local")
      assert_success(status, json, raw, "del a server success.", addr(A))
      assert.is_true(T.servers(proxy, "local")[addr(A)].down)
      assert.is_false(T.servers(proxy, "u2")[addr(A)].down)
      -- and the traffic follows: 20 of 20 to B
      local s = T.burst(proxy, 20)
      assert.same({ [B] = 20 }, s.port, T.describe(s))
    end)

    it("op=add&upstream=local restores it in local only (still down in u2)", function()
      assert.equal(200, (call(proxy, "GET", "/ups?op=del&server=" .. addr(A))))
      local status, json, raw = call(proxy, "GET", "/ups?op=add&server=" .. addr(A) .. "&upstream=local")
      assert_success(status, json, raw, "add a server success.", addr(A))
      assert.is_false(T.servers(proxy, "local")[addr(A)].down)
      assert.is_true(T.servers(proxy, "u2")[addr(A)].down)
    end)

    it("op=add&upstream=solo appends a server solo lacks; it then takes traffic (20 requests to Host: solo, 10±1 each)", function()
      local status, json, raw = call(proxy, "GET", "/ups?op=add&server=" .. addr(A) .. "&upstream=solo")
      assert_success(status, json, raw, "add a server success.", addr(A))
      local servers, order = T.servers(proxy, "solo")
      assert.same({ addr(C), addr(A) }, order)
      assert.is_false(servers[addr(A)].down)
      assert.is_false(servers[addr(A)].backup)
      local s = T.burst(proxy, 20, "/", { Host = "solo" })
      assert.same({ [200] = 20 }, s.status, T.describe(s))
      assert.is_true(math.abs((s.port[A] or 0) - 10) <= 1, T.describe(s))
      assert.is_true(math.abs((s.port[C] or 0) - 10) <= 1, T.describe(s))
    end)

    it("op=del of an already-down server is a 200 success and keeps it down", function()
      assert.equal(200, (call(proxy, "GET", "/ups?op=del&server=" .. addr(A) .. "&upstream=local")))
      local status, json, raw = call(proxy, "GET", "/ups?op=del&server=" .. addr(A) .. "&upstream=local")
      assert_success(status, json, raw, "del a server success.", addr(A))
      assert.is_true(T.servers(proxy, "local")[addr(A)].down)
    end)

    for _, method in ipairs { "GET", "PUT", "POST" } do
      it(method .. " is accepted for op=del and op=add (200, A00001) on /ups, and for /ups/check", function()
        local status, json, raw = call(proxy, method, "/ups?op=del&server=" .. addr(B))
        assert_success(status, json, raw, "del a server success.", addr(B))
        assert.is_true(T.servers(proxy, "local")[addr(B)].down)
        status, json, raw = call(proxy, method, "/ups?op=add&server=" .. addr(B))
        assert_success(status, json, raw, "add a server success.", addr(B))
        assert.is_false(T.servers(proxy, "local")[addr(B)].down)
        status, json, raw = call(proxy, method, "/ups/check")
        assert.equal(200, status, raw)
        assert_shape(json, raw)
        assert.equal("A00001", json.code, raw)
      end)
    end
  end)

  ---------------------------------------------------------------------------
  describe("/ups failures: 400/405 {msg,data,code:E00001} and the table unchanged", function()
    local proxy, A, B, C, D

    lazy_setup(function()
      local _, ports = dy.backends(3)
      A, B, C = ports[1], ports[2], ports[3]
      D = nginx.free_port() -- in no upstream
      proxy = dy.proxy {
        upstreams = upstream("local", { addr(A), addr(B) })
          .. upstream("only_a", { addr(A) })
          .. upstream("solo", { addr(C) })
          .. upstream("halfdown", { addr(B), addr(C) .. " down" }),
      }
      proxy:start()
      -- make the version move once, so "unchanged" is not just "initial"
      assert.equal(200, (call(proxy, "GET", "/ups?op=del&server=" .. addr(B) .. "&upstream=local")))
      assert.equal(200, (call(proxy, "GET", "/ups?op=add&server=" .. addr(B) .. "&upstream=local")))
    end)
    lazy_teardown(function() nginx.stop_all() end)

    local cases = {
      { "missing op (no query)", "GET", function() return "/ups", { "missing op", USAGE } end, 400 },
      { "missing op (server only)", "GET", function() return "/ups?server=" .. addr(A), { "missing op", USAGE } end, 400 },
      { "missing op (empty op=)", "PUT", function() return "/ups?op=&server=" .. addr(A), { "missing op", USAGE } end, 400 },
      { "unknown op", "GET", function() return "/ups?op=foo&server=" .. addr(A), { "unknown op", "foo" } end, 400 },
      { "missing server (op=del)", "GET", function() return "/ups?op=del", { "missing server" } end, 400 },
      { "missing server (op=add&server=)", "POST", function() return "/ups?op=add&server=", { "missing server" } end, 400 },
      { "malformed server (abc)", "GET", function() return "/ups?op=del&server=abc", { "abc" } end, 400 },
      { "malformed server (port 99999)", "GET", function() return "/ups?op=add&server=127.0.0.1:99999", { "127.0.0.1:99999" } end, 400 },
      { "malformed server (no port after ':')", "GET", function() return "/ups?op=del&server=127.0.0.1:", { "127.0.0.1:" } end, 400 },
      { "unknown server, op=del", "GET", function() return "/ups?op=del&server=" .. addr(D), { "in no upstream", addr(D) } end, 400 },
      { "unknown server, op=add without upstream", "GET", function() return "/ups?op=add&server=" .. addr(D), { "in no upstream", addr(D) } end, 400 },
      { "unknown upstream, op=del", "GET", function() return "/ups?op=del&server=" .. addr(A) .. "&upstream=nope", { "not found", "nope" } end, 400 },
      { "unknown upstream, op=add", "PUT", function() return "/ups?op=add&server=" .. addr(A) .. "&upstream=nope", { "not found", "nope" } end, 400 },
      { "del in an upstream lacking the server", "GET", function() return "/ups?op=del&server=" .. addr(C) .. "&upstream=local", { addr(C) } end, 400 },
      { "last server of solo (named)", "GET", function() return "/ups?op=del&server=" .. addr(C) .. "&upstream=solo", { "last available server of upstream solo" } end, 400 },
      { "last server of solo (unnamed)", "POST", function() return "/ups?op=del&server=" .. addr(C), { "last available server of upstream solo" } end, 400 },
      { "last server in rotation of halfdown (the other is down)", "GET", function() return "/ups?op=del&server=" .. addr(B) .. "&upstream=halfdown", { "last available server of upstream halfdown" } end, 400 },
      { "refused as a whole: A is the last server of only_a (local untouched)", "GET", function() return "/ups?op=del&server=" .. addr(A), { "last available server of upstream only_a" } end, 400 },
      { "refused as a whole: B is the last in rotation of halfdown (local untouched)", "GET", function() return "/ups?op=del&server=" .. addr(B), { "last available server of upstream halfdown" } end, 400 },
      { "a URL for a server", "GET", function() return "/ups?op=del&server=http://" .. addr(A), { "has no scheme (http://): write \"" .. addr(A) .. "\"" } end, 400 },
      { "a list of servers", "GET", function() return "/ups?op=del&server=" .. addr(A) .. "," .. addr(B), { "one address, not a list" } end, 400 },
      { "DELETE method", "DELETE", function() return "/ups?op=del&server=" .. addr(B) .. "&upstream=local", { "DELETE" } end, 405 },
      { "PATCH method", "PATCH", function() return "/ups?op=add&server=" .. addr(D) .. "&upstream=local", { "PATCH" } end, 405 },
      -- A change /ups would make, with a precondition nginx would evaluate
      -- on the answer after it: a 200 without an ETag fails If-Match and
      -- If-Unmodified-Since (nginx's own 412 page, the change made).
      { "If-Match on a good del", "GET", function() return "/ups?op=del&server=" .. addr(B) .. "&upstream=local", { "If-Match", "nothing changed" } end, 400, { ["If-Match"] = '"1"' } },
      { "If-Unmodified-Since on a good del", "PUT", function() return "/ups?op=del&server=" .. addr(B) .. "&upstream=local", { "If-Unmodified-Since" } end, 400, { ["If-Unmodified-Since"] = "Thu, 01 Jan 2037 00:00:00 GMT" } },
      { "If-None-Match on a good del", "GET", function() return "/ups?op=del&server=" .. addr(B) .. "&upstream=local", { "If-None-Match" } end, 400, { ["If-None-Match"] = "*" } },
    }

    for _, case in ipairs(cases) do
      local name, method, path_fn, want, headers = unpack(case)
      it(("%s → %d E00001, msg names it, table and version unchanged"):format(name, want), function()
        local before = T.snapshot(proxy)
        local path, needles = path_fn()
        local status, json, raw = call(proxy, method, path, nil, headers)
        assert_failure(status, json, raw, want, needles)
        -- data: the target server in a list, as on a success (none named: [])
        local server = path:match("[?&]server=([^&]*)")
        assert.equal("array", T.json_kind(json.data), raw)
        assert.same((server or "") ~= "" and { server } or {}, { unpack(json.data) }, raw)
        assert.equal(before, T.snapshot(proxy), method .. " " .. path .. " changed the table")
      end)
    end

    it("more than 100 query arguments → 400, never half-read (a lost upstream= would change every upstream)", function()
      local E = nginx.free_port() -- in two upstreams of this test only
      local both = ("server 127.0.0.1:%d; server 127.0.0.1:%d;"):format(A, E)
      for _, name in ipairs { "tw1", "tw2" } do
        assert.equal(200, (nginx.http(proxy.ports.api, "POST", "/upstream/" .. name, { body = both })))
      end
      finally(function()
        for _, name in ipairs { "tw1", "tw2" } do nginx.http(proxy.ports.api, "DELETE", "/upstream/" .. name) end
      end)
      local before = T.snapshot(proxy)
      local path = "/ups?op=del&server=" .. addr(E) .. ("&pad=1"):rep(98) .. "&upstream=tw1"
      local status, json, raw = call(proxy, "GET", path)
      assert_failure(status, json, raw, 400, { "more than 100 query arguments", "nothing changed" })
      assert.equal(before, T.snapshot(proxy), "the table changed")
      -- 100 are read whole.
      path = "/ups?op=del&server=" .. addr(E) .. ("&pad=1"):rep(97) .. "&upstream=tw1"
      status, json, raw = call(proxy, "GET", path)
      assert_success(status, json, raw, "del a server success.", addr(E))
    end)

    it("the missing-op message is \"missing op\" plus the usage line", function()
      local _, json = call(proxy, "GET", "/ups")
      assert.equal("missing op; " .. USAGE, json.msg)
    end)

    it("DELETE on /ups/check → 405 E00001", function()
      local status, json, raw = call(proxy, "DELETE", "/ups/check")
      assert_failure(status, json, raw, 405, { "DELETE" })
    end)

    it("after all the failures, traffic still uses the unchanged table (40 requests: A and B 20±1 each)", function()
      local s = T.burst(proxy, 40)
      assert.same({ [200] = 40 }, s.status, T.describe(s))
      assert.is_true(math.abs((s.port[A] or 0) - 20) <= 1, T.describe(s))
      assert.is_true(math.abs((s.port[B] or 0) - 20) <= 1, T.describe(s))
    end)
  end)

  ---------------------------------------------------------------------------
  describe("/ups/check with a stopped worker (refresh = 30 s)", function()
    local proxy, A, B, X, Y

    lazy_setup(function()
      local _, ports = dy.backends(2)
      A, B = ports[1], ports[2]
      proxy = dy.proxy { upstreams = upstream("local", { addr(A), addr(B) }), init = "refresh = 30," }
      proxy:start()
      warm_up(proxy)
      local pids = proxy:worker_pids()
      X, Y = pids[1], pids[2]
    end)
    lazy_teardown(function()
      if X then T.cont_pid(X) end
      nginx.stop_all()
    end)

    local function with_x_stopped(fn)
      T.stop_pid(X)
      local ok, err = pcall(fn)
      T.cont_pid(X)
      if not ok then error(err, 0) end
    end

    it("is {} when every worker has applied the table", function()
      assert.same({}, (check_data(proxy)))
    end)

    it("del via the running worker: check shows {\"IP:PORT\":1} while the other is stopped, {} once it served a request (which avoided the server)", function()
      with_x_stopped(function()
        local c = T.conn_to(proxy, Y)
        local status, json, raw = call(proxy, "GET", "/ups?op=del&server=" .. addr(A), c)
        assert_success(status, json, raw, "del a server success.", addr(A))
        local data, craw = check_data(proxy, c)
        assert.same({ [addr(A)] = 1 }, data, craw)
        -- the worker that made the change routes per the new table at once
        for _ = 1, 6 do
          local st, body = c:request("GET", "/local")
          assert.equal(200, st)
          assert.equal(B, tonumber(body:match("^(%d+)")))
        end
        -- still pending: nothing woke X
        data, craw = check_data(proxy, c)
        assert.same({ [addr(A)] = 1 }, data, craw)
        c:close()
      end)
      -- X resumes; its first served /local request must avoid A
      local c, status, body = T.conn_to(proxy, X, "/local")
      assert.equal(200, status)
      assert.equal(B, tonumber(body:match("^(%d+)")), "first request of the resumed worker went to the removed server")
      local data, craw = check_data(proxy, c)
      assert.same({}, data, craw)
      c:close()
      assert.same({}, (check_data(proxy)))
    end)

    it("add via the running worker: check shows {\"IP:PORT\":0} while the other is stopped, {} once it served a request", function()
      with_x_stopped(function()
        local c = T.conn_to(proxy, Y)
        local status, json, raw = call(proxy, "PUT", "/ups?op=add&server=" .. addr(A), c)
        assert_success(status, json, raw, "add a server success.", addr(A))
        local data, craw = check_data(proxy, c)
        assert.same({ [addr(A)] = 0 }, data, craw)
        c:close()
      end)
      local c, status = T.conn_to(proxy, X, "/local")
      assert.equal(200, status)
      local data, craw = check_data(proxy, c)
      assert.same({}, data, craw)
      c:close()
      -- and the resumed worker uses A again: 4 requests on one connection
      -- to X (equal weights alternate) include A
      c = T.conn_to(proxy, X, "/local")
      local seen = {}
      for _ = 1, 4 do
        local st, b = c:request("GET", "/local")
        assert.equal(200, st)
        seen[tonumber(b:match("^(%d+)"))] = true
      end
      c:close()
      assert.is_true(seen[A], "resumed worker never used the restored server")
    end)
  end)

  ---------------------------------------------------------------------------
  describe("/ups/check with the default refresh (0.05 s) and no traffic", function()
    local proxy, A, B

    lazy_setup(function()
      local _, ports = dy.backends(2)
      A, B = ports[1], ports[2]
      proxy = dy.proxy { upstreams = upstream("local", { addr(A), addr(B) }) }
      proxy:start()
      warm_up(proxy)
    end)
    lazy_teardown(function() nginx.stop_all() end)

    -- poll /ups/check every 20 ms over the connection that made the change
    -- (so the other worker gets no request at all: only its timer applies)
    local function time_to_empty(c, t0, limit)
      while true do
        local data = check_data(proxy, c)
        local t = T.now() - t0
        if next(data) == nil then return t end
        if t > limit then return nil, data end
        nginx.sleep(0.02)
      end
    end

    for _, op in ipairs { "del", "add" } do
      it("op=" .. op .. ": check becomes {} within 500 ms without traffic to the other worker (target <= 200 ms; measured time printed)", function()
        local c = T.conn(proxy.ports.proxy)
        local status, json, raw = call(proxy, "GET", "/ups?op=" .. op .. "&server=" .. addr(A), c)
        assert.equal(200, status, raw)
        assert.equal("A00001", json.code, raw)
        local t0 = T.now()
        local t, left = time_to_empty(c, t0, 0.5)
        c:close()
        print(("\n  /ups/check op=%s: {} after %s ms (bound 500 ms, target 200 ms)")
          :format(op, t and math.floor(t * 1000 + 0.5) or "> 500"))
        assert.is_truthy(t, "still pending after 500 ms: " .. tostring(left and next(left)))
        assert.is_true(t <= 0.5)
      end)
    end
  end)
end)
