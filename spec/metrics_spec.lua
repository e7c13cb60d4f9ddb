-- /metrics and /dashboard in the demo (examples/nginx.conf on free ports,
-- with an admin token): promtool takes the exposition, a real Prometheus
-- server scrapes it and answers a query with what the spec just set and
-- the exact number of requests it just sent, and a headless chromium draws
-- the dashboard from live data, redraws it after a change, and shows a
-- killed backend unhealthy. Prometheus, chromium and that backend run in
-- this spec's own temp directory, on loopback, and are stopped by their pid.
local nginx = require "spec.helpers.nginx"
local demo = require "spec.helpers.demo"
local rest = require "spec.helpers.rest"

local q = nginx.shell_quote
local TOKEN = "s3cret-metrics"
local AUTH = { Authorization = "Bearer " .. TOKEN }
-- A socket path may hold a double quote: its label value needs escaping.
local QUOTED = 'unix:/tmp/dyups"metrics.sock'

local function capture(cmd)
  local p = assert(io.popen(cmd .. " 2>&1; echo \"exit=$?\""))
  local out = p:read("*a")
  p:close()
  return out, tonumber(out:match("exit=(%d+)%s*$"))
end

local function urlencode(s)
  return (s:gsub("[^%w%-_%.~]", function(c) return ("%%%02X"):format(c:byte()) end))
end

--- Starts `cmd` in a session of its own; returns its pid (the leader of
--- its process group, which is what stop() signals).
local function spawn(cmd, log)
  local p = io.popen("setsid " .. cmd .. " >" .. q(log) .. " 2>&1 </dev/null & echo $!")
  local pid = tonumber(p:read("*l"))
  p:close()
  assert(pid, "could not start: " .. cmd)
  return pid
end

local function stop(pid)
  if not pid then return end
  -- dash, which runs these, takes no `--` before a process group.
  nginx.execute("kill -TERM -" .. pid .. " 2>/dev/null")
  local gone = pcall(nginx.wait_until, function() return not nginx.pid_alive(pid) end, 10, "pid " .. pid)
  if not gone then nginx.execute("kill -KILL -" .. pid .. " 2>/dev/null") end
end

describe("/metrics and /dashboard (examples/nginx.conf, with admin_token)", function()
  local inst, P, dir
  local started = {}

  local function api(method, path, body, headers)
    return rest.api(inst, method, path, body, headers or AUTH)
  end

  local function version()
    local status, body = api("GET", "/list?format=json")
    assert.equal(200, status, body)
    return rest.decode(body).version
  end

  -- Waits until both workers route by the current table.
  local function applied()
    nginx.wait_until(function()
      local doc = rest.decode(select(2, api("GET", "/workers")))
      local behind = #doc.workers ~= 2
      for _, w in ipairs(doc.workers) do behind = behind or w.generation ~= doc.version end
      return not behind
    end, 10, "both workers to apply version " .. version())
  end

  -- The sample of `name{labels}` in a fresh /metrics, or nil.
  local function metric(name, labels)
    local status, body = api("GET", "/metrics")
    assert.equal(200, status, body)
    local head = name .. "{" .. labels .. "} "
    local at = body:find("\n" .. head, 1, true)
    return at and tonumber(body:match("^(%S+)", at + 1 + #head)), body
  end

  -- Each `<td>`'s text in the row of `server` of a dumped page, or nil.
  local function cells(dom, server)
    local row = dom:match('<tr data%-server="' .. server:gsub("%p", "%%%0") .. '"(.-)</tr>')
    if not row then return nil end
    local out = {}
    for td in row:gmatch("<td[^>]*>(.-)</td>") do out[#out + 1] = td end
    return out, row
  end

  lazy_setup(function()
    P = demo.free_ports()
    inst = demo.example(nil, P, function(conf)
      return (conf:gsub('(upstreams = "conf/upstream.conf",)', '%1\n            admin_token = "' .. TOKEN .. '",', 1))
    end)
    inst.ports.api = P[8081]
    inst:start()
    dir = inst.prefix .. "/observe"
    assert(nginx.execute("mkdir -p " .. q(dir)))
    -- A second upstream, and a server whose name needs escaping.
    local status, body = api("POST", "/upstream/web", "server 127.0.0.1:" .. P[8089] .. " weight=2; server 127.0.0.1:"
      .. P[8090] .. ";")
    assert.equal(200, status, body)
    status, body = api("POST", "/upstream/web/servers", QUOTED .. " down")
    assert.equal(200, status, body)
  end)

  lazy_teardown(function()
    for _, pid in ipairs(started) do stop(pid) end
    nginx.stop_all()
  end)

  it("answers the text exposition, which promtool checks clean, with every upstream and the quote escaped", function()
    local status, body, h = api("GET", "/metrics")
    assert.equal(200, status, body)
    assert.equal("text/plain; version=0.0.4; charset=utf-8", h["content-type"])
    local file = dir .. "/metrics.txt"
    nginx.write_file(file, body)
    local said, code = capture("promtool check metrics <" .. q(file))
    assert.equal(0, code, said)
    -- promtool can fail: the same text with the quote left unescaped.
    nginx.write_file(dir .. "/broken.txt", (body:gsub('dyups\\"metrics', 'dyups"metrics')))
    local _, broken = capture("promtool check metrics <" .. q(dir .. "/broken.txt"))
    assert.not_equal(0, broken)
    for _, want in ipairs {
      ('dyups_upstream_server_state{upstream="local",server="127.0.0.1:%d"} 1\n'):format(P[8088]),
      ('dyups_upstream_server_weight{upstream="web",server="127.0.0.1:%d"} 2\n'):format(P[8089]),
      'dyups_upstream_server_state{upstream="web",server="unix:/tmp/dyups\\"metrics.sock"} 3\n',
      "# TYPE dyups_upstream_server_state gauge\n",
      ("dyups_table_version %d\n"):format(version()),
      "\ndyups_table_upstreams 2\n",
      "\ndyups_workers 2\n",
    } do
      assert.truthy(body:find(want, 1, true), want .. " missing from:\n" .. body)
    end
    -- HEAD: the headers alone.
    local hs, hb, hh = api("HEAD", "/metrics")
    assert.equal(200, hs)
    assert.equal("", hb)
    assert.equal("text/plain; version=0.0.4; charset=utf-8", hh["content-type"])
  end)

  it("refuses a missing or wrong token (401) and other methods (405), changing nothing", function()
    local before = version()
    -- The page itself is static and holds no data: served to a browser,
    -- which cannot send a bearer token when it opens a URL; its data is not.
    local status, body = api("GET", "/dashboard", nil, {})
    assert.equal(200, status, body)
    assert.falsy(body:find("127.0.0.1", 1, true), body)
    assert.falsy(body:find("local", 1, true), body)
    for _, path in ipairs { "/metrics", "/dashboard?format=json" } do
      local s, b, h = api("GET", path, nil, {})
      assert.equal(401, s, path)
      assert.equal('Bearer realm="ngx.dyups"', h["www-authenticate"])
      assert.truthy(b:find("Authorization: Bearer TOKEN", 1, true), b)
      s = api("GET", path, nil, { Authorization = "Bearer wrong" })
      assert.equal(401, s, path)
    end
    for _, path in ipairs { "/metrics", "/dashboard", "/dashboard?format=json" } do
      local s, b, h = api("POST", path, "x")
      assert.equal(405, s, path .. " " .. b)
      assert.equal("GET, HEAD", h.allow)
    end
    status, body = api("GET", "/dashboard?format=csv")
    assert.equal(400, status)
    assert.truthy(body:find("not one of html, json", 1, true), body)
    assert.equal(before, version())
    assert.truthy(inst:error_log():find("refused an admin request from 127.0.0.1", 1, true))
  end)

  it("is scraped by a Prometheus server, whose query API returns the weight just set and the requests just sent", function()
    local port = nginx.free_port()
    local pdir = dir .. "/prometheus"
    assert(nginx.execute("mkdir -p " .. q(pdir .. "/data")))
    nginx.write_file(pdir .. "/prometheus.yml", ([[
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: dyups
    scrape_interval: 1s
    scrape_timeout: 1s
    metrics_path: /metrics
    authorization:
      type: Bearer
      credentials: %s
    static_configs:
      - targets: ["127.0.0.1:%d"]
]]):format(TOKEN, P[8081]))
    local pid = spawn(("prometheus --config.file=%s --storage.tsdb.path=%s --web.listen-address=127.0.0.1:%d")
      :format(q(pdir .. "/prometheus.yml"), q(pdir .. "/data"), port), pdir .. "/prometheus.log")
    started[#started + 1] = pid
    nginx.wait_until(function()
      assert(nginx.pid_alive(pid), "prometheus exited: " .. (nginx.read_file(pdir .. "/prometheus.log") or ""))
      return nginx.http(port, "GET", "/-/ready") == 200
    end, 30, "prometheus to be ready")

    local server = "127.0.0.1:" .. P[8090]
    local status, body = api("PATCH", "/upstream/web/servers/" .. server, "weight=7")
    assert.equal(200, status, body)
    local query = ('dyups_upstream_server_weight{upstream="web",server="%s"}'):format(server)
    local got
    nginx.wait_until(function()
      local s, b = nginx.http(port, "GET", "/api/v1/query?query=" .. urlencode(query))
      if s ~= 200 then return false end
      local r = rest.decode(b).data.result
      got = r[1] and r[1].value[2]
      return got == "7"
    end, 20, "prometheus to have scraped weight 7 (last: " .. tostring(got) .. ")")
    -- The scrape itself was healthy: `up` is 1 for the target.
    local _, b = nginx.http(port, "GET", "/api/v1/query?query=" .. urlencode('up{job="dyups"}'))
    assert.equal("1", rest.decode(b).data.result[1].value[2])

    -- A request counter the balancer counts, exactly. An upstream of its
    -- own: new servers' counters start at zero, no health check probes it
    -- (probes are not picks anyway), and nothing but these requests names
    -- it in Host.
    local function prom(expr)
      local s, text = nginx.http(port, "GET", "/api/v1/query?query=" .. urlencode(expr))
      if s ~= 200 then return nil end
      local r = rest.decode(text).data.result
      return r[1] and tonumber(r[1].value[2])
    end
    status, body = api("POST", "/upstream/counted", ("server 127.0.0.1:%d; server 127.0.0.1:%d;")
      :format(P[8089], P[8090]))
    assert.equal(200, status, body)
    -- Gone again whatever happens: the title test counts every server.
    finally(function() api("DELETE", "/upstream/counted") end)
    applied()
    local N = 37
    for i = 1, N do
      local s = nginx.http(P[8080], "GET", "/", { headers = { Host = "counted" } })
      assert.equal(200, s, "request " .. i)
    end
    -- A scrape newer than the last request: one that sees a write made
    -- after it (a weight change, which keeps the servers and their counts).
    status, body = api("PATCH", "/upstream/counted/servers/127.0.0.1:" .. P[8090], "weight=2")
    assert.equal(200, status, body)
    local marker = version()
    nginx.wait_until(function() return (prom("dyups_table_version") or 0) >= marker end, 20,
      "prometheus to scrape version " .. marker)
    local sum = prom('sum(dyups_upstream_server_requests_total{upstream="counted"})')
    assert.equal(N, sum)
    -- Both servers had some of them (round robin), per the JSON view too.
    local view = rest.decode(select(2, api("GET", "/upstream/counted?format=json")))
    local each = 0
    for _, s in ipairs(view.servers) do
      assert.truthy(s.stats.requests > 0, s.addr)
      each = each + s.stats.requests
    end
    assert.equal(N, each)
    stop(pid)
  end)

  local function chromium(args, user_dir)
    return ("chromium --headless --disable-gpu --no-sandbox --no-first-run --user-data-dir=%s "
      .. "--enable-logging=stderr --v=0 %s"):format(q(user_dir), args)
  end

  -- The dashboard's DOM after 3 s of chromium's virtual time, the token in
  -- the fragment, and what chromium said; `name` keeps each dump's files
  -- (the DOM, the browser profile) apart.
  local function dashboard_dom(name)
    local url = ("http://127.0.0.1:%d/dashboard#token=%s"):format(P[8081], TOKEN)
    local out = dir .. "/" .. name .. ".html"
    local said, code = capture(chromium("--virtual-time-budget=3000 --dump-dom " .. q(url), dir .. "/chrome-" .. name)
      .. " >" .. q(out))
    assert.equal(0, code, said)
    return assert(nginx.read_file(out)), said
  end

  it("draws every server's state word and the table version in headless chromium, with the token from the fragment", function()
    local dom, said = dashboard_dom("dom")
    assert.truthy(dom:find(('data-version="%d"'):format(version()), 1, true), dom)
    for _, row in ipairs {
      { "127.0.0.1:" .. P[8088], "up" },
      { "127.0.0.1:" .. P[8089], "up" },
      { "127.0.0.1:" .. P[8090], "up" },
      { QUOTED:gsub('"', "&quot;"), "down" },
    } do
      local tr = ('<tr data-server="%s" data-state="%s">'):format(row[1], row[2])
      local at = dom:find(tr, 1, true)
      assert.truthy(at, tr .. " missing from:\n" .. dom)
      -- The word is shown, not only the colour.
      assert.truthy(dom:find(('<span class="state state-%s">%s</span>'):format(row[2], row[2]), at, true), dom)
    end
    -- Requests per second from two refreshes' counters (none sent: 0.0),
    -- and the failures counted.
    local td = assert(cells(dom, "127.0.0.1:" .. P[8088]), dom)
    assert.truthy(td[5]:match("^%d+%.%d$"), "req/s " .. tostring(td[5]))
    assert.equal("0", td[6])
    assert.truthy(dom:find('id="error" role="alert" style="display: none;"', 1, true), dom)
    assert.falsy(said:find("Uncaught", 1, true), said)
    assert.falsy(said:find("CONSOLE", 1, true), said)
    -- Without the token the page says how to give it.
    local dom2, code
    said, code = capture(chromium(("--virtual-time-budget=3000 --dump-dom http://127.0.0.1:%d/dashboard"):format(P[8081]),
      dir .. "/chrome-nodom"))
    assert.equal(0, code, said)
    dom2 = said
    assert.truthy(dom2:find("this nginx has an admin token", 1, true), dom2)
  end)

  it("redraws the running page after /ups?op=del within 3 s (chromium's title, over its DevTools HTTP endpoint)", function()
    local devtools = nginx.free_port()
    local url = ("http://127.0.0.1:%d/dashboard#token=%s"):format(P[8081], TOKEN)
    local pid = spawn(chromium(("--remote-debugging-address=127.0.0.1 --remote-debugging-port=%d --window-size=1200,800 %s")
      :format(devtools, q(url)), dir .. "/chrome-live"), dir .. "/chrome-live.log")
    started[#started + 1] = pid
    local function title()
      local s, b = nginx.http(devtools, "GET", "/json/list")
      if s ~= 200 then return nil end
      for _, t in ipairs(rest.decode(b)) do
        if t.type == "page" and t.url:find("/dashboard", 1, true) then return t.title end
      end
    end
    local v = version()
    -- 5 of 6 servers up: web's quoted one is down (local's backup is up).
    local want = ("ngx.dyups version %d: 5 of 6 up"):format(v)
    local last
    nginx.wait_until(function()
      last = title()
      return last == want
    end, 20, "the title " .. want)
    local status, body = nginx.http(P[8080], "GET", "/ups?op=del&upstream=local&server=127.0.0.1:" .. P[8088],
      { headers = AUTH })
    assert.equal(200, status, body)
    want = ("ngx.dyups version %d: 4 of 6 up"):format(v + 1)
    local t0 = nginx.now()
    local ok = pcall(nginx.wait_until, function()
      last = title()
      return last == want
    end, 3, "the title " .. want)
    assert(ok, "after 3 s the title is " .. tostring(last) .. ", not " .. want)
    assert.is_true(nginx.now() - t0 <= 3)
    stop(pid)
    -- A picture of the page, kept in the spec's temp directory.
    local shot = dir .. "/dashboard.png"
    local said, code = capture(chromium(("--virtual-time-budget=3000 --window-size=1200,700 --screenshot=%s %s")
      :format(q(shot), q(url)), dir .. "/chrome-shot"))
    assert.equal(0, code, said)
    assert.truthy((nginx.read_file(shot) or ""):sub(1, 8) == "\137PNG\r\n\26\n", said)
  end)
  it("shows a killed backend unhealthy: its state code 6 and its row in chromium, with the check's result", function()
    local backend = nginx.new { workers = 1, modules = false, conf = [[
http {
    server {
        listen 127.0.0.1:${port_b};
        location / { return 200 "fragile\n"; }
    }
}
]] }
    backend:start()
    local server = "127.0.0.1:" .. backend.ports.b
    local status, body = api("POST", "/upstream/fragile", ("server %s; server 127.0.0.1:%d; "
      .. "check interval=200 rise=1 fall=2 timeout=250 type=tcp default_down=false;"):format(server, P[8090]))
    assert.equal(200, status, body)
    local labels = ('upstream="fragile",server="%s"'):format(server)
    local last
    nginx.wait_until(function()
      last = metric("dyups_upstream_server_health_checks_checks_total", labels)
      return (last or 0) >= 1
    end, 10, "a probe of " .. server)
    assert.equal(1, metric("dyups_upstream_server_state", labels))
    backend:stop()
    nginx.wait_until(function()
      last = metric("dyups_upstream_server_state", labels)
      return last == 6
    end, 10, "state 6 for the killed " .. server .. " (last: " .. tostring(last) .. ")")
    assert.equal(1, metric("dyups_upstream_server_health_checks_unhealthy_total", labels))
    assert.truthy(metric("dyups_upstream_server_health_checks_fails_total", labels) >= 2)
    assert.equal(0, metric("dyups_upstream_server_health_checks_last_passed", labels))
    -- The other server stays up.
    assert.equal(1, metric("dyups_upstream_server_state", ('upstream="fragile",server="127.0.0.1:%d"'):format(P[8090])))

    local dom = dashboard_dom("killed")
    local td, row = cells(dom, server)
    assert.truthy(td, server .. " missing from:\n" .. dom)
    assert.truthy(row:find('data-state="unhealthy"', 1, true), row)
    assert.equal('<span class="state state-unhealthy">unhealthy</span>', td[2])
    -- The last check failed (no 200: the connection's outcome), just now.
    assert.truthy(td[7] ~= "not yet" and not td[7]:find("^200"), td[7])
    assert.truthy(td[8]:match("^%d+ s ago$"), td[8])
  end)
end)
