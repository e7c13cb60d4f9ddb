-- slow_start=TIME: a server put back ramps from a sliver of its weight to all
-- of it, in both workers alike (the ramp starts at a time in its shared
-- cell), and the hash methods refuse the parameter. Every wait is bounded.
local nginx = require "spec.helpers.nginx"
local dy = require "spec.helpers.dyups"
local rest = require "spec.helpers.rest"

local addr = dy.addr

describe("slow_start", function()
  local proxy, A, B

  lazy_setup(function()
    local _, ports = dy.backends(2)
    A, B = ports[1], ports[2]
    proxy = dy.proxy {
      upstreams = "upstream ss {\n    server " .. addr(A) .. ";\n    server " .. addr(B)
        .. " slow_start=30s;\n}\n",
    }
    proxy:start()
  end)

  lazy_teardown(function() nginx.stop_all() end)

  -- `n` requests to upstream ss: per worker, how many went to B and in all.
  local function shares(n)
    local per = {}
    for _ = 1, n do
      local s, port, worker = dy.get(proxy, "/", { Host = "ss" })
      assert.equal(200, s)
      local w = per[worker] or { b = 0, all = 0 }
      per[worker] = w
      w.all = w.all + 1
      if port == B then w.b = w.b + 1 end
    end
    return per
  end

  local function both_workers(per)
    local n = 0
    for _ in pairs(per) do n = n + 1 end
    return n == 2
  end

  it("a server put back ramps up in both workers, from the time it came back", function()
    -- Up since nginx started: no ramp, round robin takes turns.
    local per = shares(40)
    assert.is_true(both_workers(per), "both workers answered")
    for pid, w in pairs(per) do
      assert.is_true(math.abs(w.b - w.all / 2) <= 1, ("worker %d: %d of %d to B"):format(pid, w.b, w.all))
    end

    local s = nginx.http(proxy.ports.proxy, "GET", "/ups?op=del&server=" .. addr(B))
    assert.equal(200, s)
    s = nginx.http(proxy.ports.proxy, "GET", "/ups?op=add&server=" .. addr(B))
    assert.equal(200, s)
    local back = nginx.now()
    per = shares(60)
    -- 30 s ramp: at t seconds B weighs t/30 of A, so its share is at most
    -- f/(1+f) with f the time the requests took; a request or two of slack.
    local f = (nginx.now() - back) / 30
    assert.is_true(f < 0.5, "the requests took " .. f * 30 .. " s")
    assert.is_true(both_workers(per), "both workers answered")
    for pid, w in pairs(per) do
      local bound = w.all * f / (1 + f) + 1
      assert.is_true(w.b <= bound,
        ("worker %d sent %d of %d to B; the ramp allows %.1f"):format(pid, w.b, w.all, bound))
    end

    -- A shorter slow_start keeps the time B came back: once that is over,
    -- both workers give B its whole weight (a ramp restarted by the change,
    -- or kept per worker, would not be over yet).
    s = rest.api(proxy, "PATCH", "/upstream/ss/servers/" .. addr(B), "slow_start=1s")
    assert.equal(200, s)
    nginx.wait_until(function() return nginx.now() - back > 1.2 end, 5, "1 s since B came back")
    per = shares(40)
    assert.is_true(both_workers(per), "both workers answered")
    for pid, w in pairs(per) do
      assert.is_true(math.abs(w.b - w.all / 2) <= 1, ("worker %d: %d of %d to B"):format(pid, w.b, w.all))
    end
  end)

  it("is shown, kept by per-server changes, and refused by the hash methods", function()
    local s = rest.api(proxy, "POST", "/upstream/shown",
      "least_conn; server " .. addr(A) .. "; server " .. addr(B) .. " slow_start=15s;")
    assert.equal(200, s)
    s = rest.api(proxy, "PATCH", "/upstream/shown/servers/" .. addr(B), "weight=2")
    assert.equal(200, s)
    local body
    s, body = rest.api(proxy, "GET", "/upstream/shown", nil, { Accept = "application/json" })
    assert.equal(200, s)
    local doc = rest.decode(body)
    assert.same({ 0, 15 }, { doc.servers[1].slow_start, doc.servers[2].slow_start }, body)
    assert.equal(2, doc.servers[2].weight)
    local _, text = rest.api(proxy, "GET", "/upstream/shown")
    assert.truthy(text:find("server " .. addr(B) .. " weight=2 slow_start=15s", 1, true), text)
    local _, detail = rest.api(proxy, "GET", "/detail")
    assert.truthy(detail:find("server " .. addr(B) .. " weight=2 .* down=0 slow_start=15\n"), detail)
    for _, method in ipairs { "hash $uri", "hash $uri consistent", "ip_hash", "random", "random two" } do
      local body_in = method .. "; server " .. addr(A) .. "; server " .. addr(B) .. " slow_start=10s;"
      local st, msg = rest.api(proxy, "POST", "/upstream/refused", body_in)
      assert.equal(400, st, method)
      assert.truthy(msg:find('does not support parameter "slow_start" (server ' .. addr(B) .. ")", 1, true), msg)
    end
    local st = rest.api(proxy, "GET", "/upstream/refused")
    assert.equal(404, st, "nothing was created")
    local bad = rest.api(proxy, "PATCH", "/upstream/ss/servers/" .. addr(B), "slow_start=1x")
    assert.equal(400, bad)
  end)
end)
