-- Shared peer state, as nginx's `zone`: the connections in flight to each
-- server and its failures in the current fail_timeout window are counted
-- once for the whole nginx, in the state file, not once per worker.
--
-- One proxy nginx with 2 workers (reuseport) and one backend nginx that
-- listens on three ports (A, B, C) and can HOLD a request: /hold records
-- its arrival (which port, which proxy worker sent it) and answers only
-- when the spec releases it. Held requests keep their connection to the
-- backend open, so the spec decides exactly how many connections are in
-- flight, and to which server.
--
-- Every check is made so that state kept per worker fails it:
--   * held requests are sent alternately through each worker (a new client
--     connection per request, kept until it lands on the wanted worker), so
--     two requests in a row meet two different workers' views;
--   * /peers is asked of each worker in turn, and each answer must be right
--     at once (polling until *some* worker agrees would let a per-worker
--     count pass when the poll happens to reach the worker that counted).
--
-- Connections are counted for the methods that weigh them (`least_conn`,
-- `random two`); failures for every method.
local nginx = require "spec.helpers.nginx"
local dy = require "spec.helpers.dyups"
local T = require "spec.helpers.traffic"

local addr = dy.addr

-- The backend: one worker (the hold flags live in a shared dict all the
-- same), three ports. A request is held until the released batch number
-- reaches its own (20 s at most, so a failed spec never leaves it hanging).
local BACKEND = [[
http {
    lua_package_path "${lua_package_path}";
    lua_shared_dict holds 1m;

    server {
        listen 127.0.0.1:${port_a};
        listen 127.0.0.1:${port_b};
        listen 127.0.0.1:${port_c};

        location = /hold {
            content_by_lua_block {
                local d = ngx.shared.holds
                local batch = tonumber(ngx.var.arg_batch)
                d:set("at " .. ngx.var.arg_id,
                      ngx.var.server_port .. " " .. (ngx.var.http_x_proxy_worker or "0"))
                local give_up = ngx.now() + 20
                while (d:get("released") or -1) < batch and ngx.now() < give_up do
                    ngx.sleep(0.01)
                end
                ngx.say(ngx.var.server_port, " held")
            }
        }
        location = /arrival {
            content_by_lua_block {
                local at = ngx.shared.holds:get("at " .. ngx.var.arg_id)
                if not at then return ngx.exit(404) end
                ngx.say(at)
            }
        }
        location = /release {
            content_by_lua_block {
                ngx.shared.holds:set("released", tonumber(ngx.var.arg_upto))
                ngx.say("released")
            }
        }
        location / { return 200 "$server_port $connection_requests\n"; }
    }
}
]]

-- The proxy: routes by Host (as spec/helpers/dyups.lua's proxy does), gives
-- a request's connection back in the log phase, shows peers(NAME) as JSON
-- at /peers?name=NAME, and tells the backend which worker sent a request.
local PROXY = [[
http {
    lua_package_path "${lua_package_path}";
    lua_package_cpath "${lua_package_cpath}";

    map $proxy_host $dyups_upstream {
        default        $proxy_host;
        dyups_by_host  $host;
    }

    init_by_lua_block {
        assert(require("ngx.dyups").init{ path = "state/dyups.state", upstreams = "conf/upstream.conf" })
    }
    init_worker_by_lua_block { assert(require("ngx.dyups").init_worker()) }
    log_by_lua_file ${repo}/lua/log.lua;

    upstream dyups_by_host {
        server 0.0.0.1;
        balancer_by_lua_file ${repo}/lua/upstream.lua;
        keepalive 16;
    }

    server {
        listen 127.0.0.1:${port_proxy} reuseport;
        add_header X-Worker $pid always;

        location = /pid { return 200 "$pid\n"; }
        location = /peers {
            content_by_lua_block {
                local peers, err = require("ngx.dyups").peers(ngx.var.arg_name)
                if not peers then
                    ngx.status = 404
                    ngx.say(err)
                    return
                end
                ngx.say(require("dkjson").encode(peers))
            }
        }
        location / {
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Proxy-Worker $pid;
            proxy_connect_timeout 1s;
            proxy_read_timeout 30s;
            proxy_pass http://dyups_by_host;
        }
    }

    server {
        listen 127.0.0.1:${port_api};
        location / { content_by_lua_file ${repo}/lua/dyups_api.lua; }
    }
}
]]

describe("shared peer state (zone), 2 workers", function()
  local proxy, backend, workers
  local A, B, C, DEAD1, DEAD2, DEAD3

  lazy_setup(function()
    backend = nginx.new { workers = 1, conf = BACKEND }
    backend:start()
    A, B, C = backend.ports.a, backend.ports.b, backend.ports.c
    -- closed ports: free_port() never hands one out twice, nothing listens
    DEAD1, DEAD2, DEAD3 = nginx.free_port(), nginx.free_port(), nginx.free_port()
    proxy = nginx.new { workers = 2, conf = PROXY }
    nginx.write_file(proxy.prefix .. "/conf/upstream.conf", table.concat {
      dy.upstream("lc", { addr(A), addr(B) }, "least_conn"),
      dy.upstream("r2", { addr(A), addr(B) }, "random two"),
      dy.upstream("count", { addr(A), addr(B) }, "least_conn"),
      -- the closed port first: each worker's first pick is the first server
      dy.upstream("fd", { addr(DEAD1) .. " max_fails=1 fail_timeout=30s", addr(A) }),
      dy.upstream("probe", { addr(DEAD3) .. " max_fails=1 fail_timeout=3s", addr(A) }),
      dy.upstream("keep", { addr(DEAD2) .. " max_fails=1 fail_timeout=30s", addr(A), addr(B) }, "least_conn"),
    })
    proxy:start()
    workers = proxy:worker_pids()
    assert.equal(2, #workers)
  end)

  lazy_teardown(function()
    nginx.stop_all()
  end)

  ---------------------------------------------------------------------------
  -- held requests

  -- Held requests come in batches: release(b) ends every request of
  -- batch b and earlier, the later ones stay held.
  local next_id, batch = 0, 0
  local open = {} -- held requests not answered yet

  --- Holds one request to upstream `host`, sent through worker `pid` over a
  --- new client connection, in the current batch; returns once it reached
  --- the backend: { c = client connection, id =, batch =, port = backend
  --- port, via = proxy pid }.
  local function hold(host, pid)
    next_id = next_id + 1
    local id = tostring(next_id)
    local c = T.conn_to(proxy, pid, "/pid")
    -- Only the request goes out now; its answer is read by release().
    assert(c:send("GET", ("/hold?id=%s&batch=%d"):format(id, batch), { headers = { Host = host }, timeout = 2 }))
    local h = { c = c, id = id, batch = batch }
    open[#open + 1] = h
    local at = nginx.wait_until(function()
      local status, body = T.request(A, "GET", "/arrival?id=" .. id)
      return status == 200 and body
    end, 5, "held request " .. id .. " to reach a backend")
    h.port, h.via = at:match("^(%d+) (%d+)")
    h.port, h.via = tonumber(h.port), tonumber(h.via)
    assert.equal(pid, h.via, "held request " .. id .. " was proxied by another worker")
    return h
  end

  --- The requests held from now on form a new batch.
  local function next_batch()
    batch = batch + 1
  end

  --- Status and backend port of a held request's answer.
  local function answer_of(h, timeout)
    local status, body = h.c:response { timeout = timeout }
    if not status then return nil, body end
    return status, tonumber(body:match("(%d+) held\n"))
  end

  --- Lets the held requests of batch `upto` and earlier end; returns their
  --- answers, { status =, port = (that answered), held_on = (port held on) }.
  local function release(upto)
    local status = T.request(A, "GET", "/release?upto=" .. upto)
    assert.equal(200, status)
    local out, still = {}, {}
    for _, h in ipairs(open) do
      if h.batch > upto then
        still[#still + 1] = h
      elseif h.c.fd then -- not given up by the spec
        local code, port = answer_of(h, 10)
        h.c:close()
        out[#out + 1] = { status = code, port = port, held_on = h.port }
      end
    end
    open = still
    return out
  end

  --- Lets every held request end (see release); a new batch starts.
  local function release_all()
    local out = release(batch)
    next_batch()
    return out
  end

  -- a failed spec leaves no request held for the next one
  after_each(function()
    if #open > 0 then pcall(release_all) end
  end)

  ---------------------------------------------------------------------------
  -- /peers

  --- peers(name) as worker `pid` answers it: the decoded list.
  local function peers_of(pid, name)
    local c = T.conn_to(proxy, pid, "/pid")
    local status, body, h = c:request("GET", "/peers?name=" .. name)
    c:close()
    assert.equal(200, status, body)
    assert.equal(pid, tonumber(h["x-worker"]))
    return T.json_decode(body)
  end

  local function show(list)
    local out = {}
    for _, p in ipairs(list) do
      out[#out + 1] = ("%s conns=%s fails=%s shared=%s")
        :format(tostring(p.server), tostring(p.conns), tostring(p.fails), tostring(p.shared))
    end
    return "[" .. table.concat(out, "; ") .. "]"
  end

  --- Whether `list` holds exactly the servers of `want` ({ [addr] = {
  --- conns = n, fails = n, min_fails = n } }, each field optional), each
  --- with a shared cell; false and why not otherwise.
  local function matches(list, want)
    local seen = 0
    for _, p in ipairs(list) do
      local w = want[p.server]
      if not w then return false, "unexpected server " .. tostring(p.server) end
      seen = seen + 1
      if type(p.conns) ~= "number" or type(p.fails) ~= "number" or p.shared ~= true then
        return false, "bad entry for " .. p.server
      end
      if w.conns and p.conns ~= w.conns then return false, p.server .. " conns" end
      if w.fails and p.fails ~= w.fails then return false, p.server .. " fails" end
      if w.min_fails and p.fails < w.min_fails then return false, p.server .. " fails" end
    end
    local n = 0
    for _ in pairs(want) do n = n + 1 end
    if seen ~= n then return false, "servers missing" end
    return true
  end

  local function show_want(want)
    local out = {}
    for server, w in pairs(want) do
      out[#out + 1] = ("%s conns=%s fails=%s"):format(server, tostring(w.conns),
        w.min_fails and (">=" .. w.min_fails) or tostring(w.fails))
    end
    table.sort(out)
    return "{" .. table.concat(out, "; ") .. "}"
  end

  --- Waits (5 s) until some worker's peers(name) matches `want`, then asks
  --- each worker: every one must match at once. Returns the last list.
  local function agree(name, want)
    local last
    local ok = pcall(nginx.wait_until, function()
      local status, body = T.request(proxy.ports.proxy, "GET", "/peers?name=" .. name)
      if status ~= 200 then last = body return false end
      last = T.json_decode(body)
      return (matches(last, want))
    end, 5)
    assert.is_true(ok, not ok and ("peers(%q) never became %s; last: %s"):format(name, show_want(want),
      type(last) == "table" and show(last) or tostring(last)) or nil)
    for _, pid in ipairs(workers) do
      last = peers_of(pid, name)
      local good, why = matches(last, want)
      assert.is_true(good, not good and ("worker %d: peers(%q) is %s, want %s (%s)"):format(pid, name,
        show(last), show_want(want), why) or nil)
    end
    return last
  end

  -- error-log lines of a connect() failure to 127.0.0.1:port
  local function refused(port)
    return T.count_lines(proxy:error_log(), "connect() failed", "upstream: \"http://127.0.0.1:" .. port .. "/")
  end

  ---------------------------------------------------------------------------

  for _, method in ipairs { "least_conn", "random two" } do
    local name = method == "least_conn" and "lc" or "r2"

    it(method .. " weighs every worker's connections: 8 held requests, alternately through each worker, are never more than 1 apart and end 4/4; /peers agrees at each step and falls back to 0", function()
      local count, seq, via = { [A] = 0, [B] = 0 }, {}, {}
      for i = 1, 8 do
        -- Alternate workers. Counted per worker, the 2nd request's worker
        -- would still see 0/0 and (least_conn) take A again, or (random two)
        -- do so half the time at every pair.
        local h = hold(name, workers[(i - 1) % 2 + 1])
        count[h.port] = count[h.port] + 1
        seq[#seq + 1] = ("%d->%d"):format(h.via, h.port)
        via[h.via] = true
        assert.is_true(math.abs(count[A] - count[B]) <= 1,
          ("after %d held requests A=%d B=%d: %s"):format(i, count[A], count[B], table.concat(seq, " ")))
        agree(name, { [addr(A)] = { conns = count[A] }, [addr(B)] = { conns = count[B] } })
      end
      assert.same({ [A] = 4, [B] = 4 }, count)
      assert.is_true(via[workers[1]] and via[workers[2]], "both workers proxied held requests")

      for _, r in ipairs(release_all()) do
        assert.same({ status = 200, port = r.held_on, held_on = r.held_on }, r)
      end
      agree(name, { [addr(A)] = { conns = 0, fails = 0 }, [addr(B)] = { conns = 0, fails = 0 } })
    end)
  end

  it("/peers counts the connections in flight of the whole nginx: 6 held through one worker show in the other's answer, 2 more through the other make 8 everywhere", function()
    local count = { [A] = 0, [B] = 0 }
    for _ = 1, 6 do
      local h = hold("count", workers[1])
      count[h.port] = count[h.port] + 1
    end
    assert.equal(6, count[A] + count[B])
    -- workers[2] proxied none of them
    agree("count", { [addr(A)] = { conns = count[A] }, [addr(B)] = { conns = count[B] } })

    for _ = 1, 2 do
      local h = hold("count", workers[2])
      count[h.port] = count[h.port] + 1
    end
    local list = agree("count", { [addr(A)] = { conns = count[A] }, [addr(B)] = { conns = count[B] } })
    assert.equal(8, list[1].conns + list[2].conns)

    for _, r in ipairs(release_all()) do assert.equal(200, r.status) end
    agree("count", { [addr(A)] = { conns = 0 }, [addr(B)] = { conns = 0 } })
  end)

  it("a client that gives up on a held request gives its connection back: 4 held (both workers), the clients close, /peers falls back to 0 everywhere", function()
    local count = { [A] = 0, [B] = 0 }
    for i = 1, 4 do
      local h = hold("count", workers[(i - 1) % 2 + 1])
      count[h.port] = count[h.port] + 1
    end
    agree("count", { [addr(A)] = { conns = count[A] }, [addr(B)] = { conns = count[B] } })
    -- nginx ends each request (499) while the backend still holds it
    for _, h in ipairs(open) do h.c:close() end
    agree("count", { [addr(A)] = { conns = 0, fails = 0 }, [addr(B)] = { conns = 0, fails = 0 } })
    assert.same({}, release_all())
  end)

  it("peers() of an unknown upstream returns nil, \"not found\"", function()
    local status, body = T.request(proxy.ports.proxy, "GET", "/peers?name=nosuchups")
    assert.equal(404, status)
    assert.equal("not found\n", body)
  end)

  it("a failure one worker saw keeps every worker off the server: max_fails=1 on a closed port costs one connect() failure for the whole nginx, not one per worker; every request 200", function()
    -- requests until one met the closed port (the first does: each
    -- worker's first pick is the first server)
    local failed_on
    for _ = 1, 10 do
      local status, port, pid = T.get(proxy, "/", { Host = "fd" })
      assert.equal(200, status)
      assert.equal(A, port)
      if refused(DEAD1) > 0 then
        failed_on = pid
        break
      end
    end
    assert.is_number(failed_on, "no connect() failure to the closed port")
    assert.equal(1, refused(DEAD1))

    -- the other worker, first by name (it has never picked in `fd`), then
    -- 40 requests over new connections
    local other = failed_on == workers[1] and workers[2] or workers[1]
    local c = T.conn_to(proxy, other, "/pid")
    for _ = 1, 5 do
      local status, body = c:request("GET", "/", { headers = { Host = "fd" } })
      assert.equal(200, status)
      assert.equal(A, tonumber(body:match("^(%d+) ")))
    end
    c:close()
    local s = T.burst(proxy, 40, "/", { Host = "fd" })
    assert.same({ [200] = 40 }, s.status, T.describe(s))
    assert.same({ [A] = 40 }, s.port, T.describe(s))
    assert.equal(2, s.pids, T.describe(s))

    assert.equal(1, refused(DEAD1), "connect() failures to the closed port")
    agree("fd", { [addr(DEAD1)] = { conns = 0, min_fails = 1 }, [addr(A)] = { conns = 0, fails = 0 } })
  end)

  it("after fail_timeout one request of the whole nginx probes the failed server, not one per worker: a closed port (max_fails=1 fail_timeout=3s) fails once, both workers skip it, and 3 s later it fails exactly once more; every request 200", function()
    for _ = 1, 10 do
      local status = T.get(proxy, "/", { Host = "probe" })
      assert.equal(200, status)
      if refused(DEAD3) > 0 then break end
    end
    local failed_at = T.now()
    assert.equal(1, refused(DEAD3))
    local s = T.burst(proxy, 20, "/", { Host = "probe" })
    assert.same({ [200] = 20 }, s.status, T.describe(s))
    assert.same({ [A] = 20 }, s.port, T.describe(s))
    assert.equal(2, s.pids, T.describe(s))
    assert.equal(1, refused(DEAD3), "connect() failures within fail_timeout")

    -- The window has passed: the next requests of each worker would try it,
    -- were the window each worker's own. The probe fails and opens a new
    -- 3 s window, which these 20 requests must not outlast.
    nginx.sleep(math.max(0, failed_at + 3.3 - T.now()))
    local started = T.now()
    s = T.burst(proxy, 20, "/", { Host = "probe" })
    assert.is_true(T.now() - started < 2, "20 requests took over 2 s: inconclusive")
    assert.same({ [200] = 20 }, s.status, T.describe(s))
    assert.same({ [A] = 20 }, s.port, T.describe(s))
    assert.equal(2, s.pids, T.describe(s))
    assert.equal(2, refused(DEAD3), "connect() failures: the first, then one probe")
    agree("probe", { [addr(DEAD3)] = { conns = 0, min_fails = 1 }, [addr(A)] = { conns = 0, fails = 0 } })
  end)

  it("counters of the servers that stay survive table changes: A's held connections and the closed port's failure outlast removing B (while it holds some), adding C and re-adding B; C and the re-added B start at 0, and B's requests ending later do not count on C", function()
    local api = proxy.ports.api
    -- the closed port fails once (it is the first server: the first pick)
    for _ = 1, 10 do
      local status = T.get(proxy, "/", { Host = "keep" })
      assert.equal(200, status)
      if refused(DEAD2) > 0 then break end
    end
    assert.equal(1, refused(DEAD2))

    local count = { [A] = 0, [B] = 0 }
    for i = 1, 5 do
      local h = hold("keep", workers[(i - 1) % 2 + 1])
      count[h.port] = count[h.port] + 1
    end
    assert.same({ 3, 2 }, { math.max(count[A], count[B]), math.min(count[A], count[B]) })
    local dead = { conns = 0, min_fails = 1 }
    agree("keep", { [addr(DEAD2)] = dead, [addr(A)] = { conns = count[A] }, [addr(B)] = { conns = count[B] } })

    -- B goes while it holds connections; then C comes (it may get B's cell)
    local status, body = nginx.http(api, "DELETE", "/upstream/keep/servers/" .. addr(B))
    assert.equal(200, status, body)
    agree("keep", { [addr(DEAD2)] = dead, [addr(A)] = { conns = count[A] } })
    status, body = nginx.http(api, "POST", "/upstream/keep/servers", { body = addr(C) })
    assert.equal(200, status, body)
    local list = agree("keep", { [addr(DEAD2)] = dead, [addr(A)] = { conns = count[A] },
      [addr(C)] = { conns = 0, fails = 0 } })

    -- in table order
    local _, text = nginx.http(api, "GET", "/upstream/keep")
    local order = {}
    for server in text:gmatch("server (%S+)") do order[#order + 1] = (server:gsub(";$", "")) end
    local got = {}
    for i, p in ipairs(list) do got[i] = p.server end
    assert.same(order, got)

    -- Every worker still sees A busy and the closed port failed: 20 quick
    -- requests (both workers) all go to C, none to the closed port.
    local s = T.burst(proxy, 20, "/", { Host = "keep" })
    assert.same({ [200] = 20 }, s.status, T.describe(s))
    assert.same({ [C] = 20 }, s.port, T.describe(s))
    assert.equal(2, s.pids, T.describe(s))
    assert.equal(1, refused(DEAD2), "connect() failures to the closed port")

    -- Two more held requests: both go to C, the least busy. Then the first
    -- batch ends, B's requests too: C's count must not pay for B's (C may
    -- have been given B's old cell), nor A's count be off.
    next_batch()
    for i = 1, 2 do
      local h = hold("keep", workers[i])
      assert.equal(C, h.port)
    end
    agree("keep", { [addr(DEAD2)] = dead, [addr(A)] = { conns = count[A] }, [addr(C)] = { conns = 2 } })
    local answers = release(batch - 1)
    assert.equal(5, #answers)
    for _, r in ipairs(answers) do
      assert.same({ status = 200, port = r.held_on, held_on = r.held_on }, r)
    end
    agree("keep", { [addr(DEAD2)] = dead, [addr(A)] = { conns = 0, fails = 0 }, [addr(C)] = { conns = 2, fails = 0 } })
    for _, r in ipairs(release_all()) do
      assert.same({ status = 200, port = C, held_on = C }, r)
    end
    agree("keep", { [addr(DEAD2)] = dead, [addr(A)] = { conns = 0, fails = 0 }, [addr(C)] = { conns = 0, fails = 0 } })

    status, body = nginx.http(api, "POST", "/upstream/keep/servers", { body = addr(B) })
    assert.equal(200, status, body)
    agree("keep", { [addr(DEAD2)] = dead, [addr(A)] = { conns = 0, fails = 0 }, [addr(C)] = { conns = 0, fails = 0 },
      [addr(B)] = { conns = 0, fails = 0 } })
  end)
end)
