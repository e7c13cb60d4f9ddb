-- What survives: a change made at run time (an upstream created over REST, a
-- server removed over /ups) is kept and served after a worker is SIGKILLed,
-- across `nginx -s reload`, across a full stop and start on the same prefix
-- (the state file wins over the seed file), and, written back as an nginx
-- upstream file, on a fresh host. A corrupt state file stops nginx from
-- starting, named, and untouched. Each describe has its own nginx (2 workers).
local nginx = require "spec.helpers.nginx"
local dy = require "spec.helpers.dyups"
local rest = require "spec.helpers.rest"

local api = rest.api

-- host1 {B1}, host2 {B2; B3}
local function seed(P)
  return ("upstream host1 {\n    server 127.0.0.1:%d;\n}\n"
    .. "upstream host2 {\n    server 127.0.0.1:%d;\n    server 127.0.0.1:%d;\n}\n"):format(P[1], P[2], P[3])
end

-- The run-time change: dyhost {B3; B1} created over REST, B2 taken out of
-- host2's rotation over /ups (`op=del` marks it down, as the original did).
local function change(inst, P)
  local status, body = api(inst, "POST", "/upstream/dyhost",
    ("server 127.0.0.1:%d;\nserver 127.0.0.1:%d;\n"):format(P[3], P[1]))
  assert.are.equal(200, status, body)
  assert.are.equal("success", body)
  status, body = nginx.http(inst.ports.proxy, "GET", ("/ups?op=del&server=127.0.0.1:%d&upstream=host2"):format(P[2]))
  assert.are.equal(200, status, body)
  assert.matches('"code":"A00001"', body, 1, true)
end

-- /detail as ngx_http_dyups_module prints it: every parameter of each server.
local function expected_detail(P)
  local function line(port, down)
    return ("server 127.0.0.1:%d weight=1 max_conns=0 max_fails=1 fail_timeout=10 backup=0 down=%d\n")
      :format(port, down and 1 or 0)
  end
  return "host1\n" .. line(P[1]) .. "\nhost2\n" .. line(P[2], true) .. line(P[3]) .. "\n"
    .. "dyhost\n" .. line(P[3]) .. line(P[1]) .. "\n"
end

-- The changed table, as the REST interface shows it and as both workers
-- route by it.
local function assert_changed_table(inst, P, when)
  local status, body = api(inst, "GET", "/detail")
  assert.are.equal(200, status, when .. ": " .. tostring(body))
  assert.are.equal(expected_detail(P), body, when)

  local list, ports = rest.route(inst, "dyhost", 12)
  local workers = {}
  for i, r in ipairs(list) do
    assert.are.equal(200, r.status, when .. ": dyhost request " .. i .. ": " .. rest.show(list))
    workers[r.worker] = true
  end
  assert.are.same(rest.sorted { P[1], P[3] }, rest.keys(ports), when .. ": dyhost: " .. rest.show(list))

  list, ports = rest.route(inst, "host2", 8)
  assert.are.same({ P[3] }, rest.keys(ports), when .. ": host2 (B2 was removed): " .. rest.show(list))
  list, ports = rest.route(inst, "host1", 4)
  assert.are.same({ P[1] }, rest.keys(ports), when .. ": host1: " .. rest.show(list))
  return workers
end

-- A proxy seeded with seed(P), started, with the run-time change made.
local function changed_proxy(P, init)
  local inst = dy.proxy { upstreams = seed(P), init = init }
  inst:start()
  change(inst, P)
  assert_changed_table(inst, P, "right after the change")
  return inst
end

describe("survival: a worker killed with SIGKILL", function()
  local inst, P

  lazy_setup(function()
    P = select(2, dy.backends(3))
    inst = changed_proxy(P)
  end)

  lazy_teardown(function()
    nginx.stop_all()
  end)

  it("the respawned worker serves the changed table", function()
    local before = inst:worker_pids()
    assert.are.equal(2, #before)
    for _, victim in ipairs(before) do
      local fresh = inst:kill_worker(victim)
      assert.is_falsy(nginx.pid_alive(victim))
      -- the new worker, asked directly: host2 without B2, dyhost B3 then B1
      local status, port, body = rest.route_via(inst, "host2", fresh)
      assert.are.equal(200, status, body)
      assert.are.equal(P[3], port, "new worker " .. fresh .. " routed host2 to " .. tostring(port))
      local first, second
      status, first, body = rest.route_via(inst, "dyhost", fresh)
      assert.are.equal(200, status, body)
      status, second, body = rest.route_via(inst, "dyhost", fresh)
      assert.are.equal(200, status, body)
      assert.are.same({ P[3], P[1] }, { first, second }, "new worker " .. fresh .. " on dyhost")
      local status502 = rest.route_via(inst, "nosuch", fresh)
      assert.are.equal(502, status502)
    end
    local workers = assert_changed_table(inst, P, "after killing both original workers")
    for _, pid in ipairs(before) do
      assert.is_nil(workers[pid], "a killed worker answered: " .. pid)
    end
  end)

  it("the lock is free after the kills: writes go through and reach every worker", function()
    local status, body = api(inst, "POST", "/upstream/after", ("server 127.0.0.1:%d;"):format(P[2]))
    assert.are.equal(200, status, body)
    for _, pid in ipairs(inst:worker_pids()) do
      local st, port = rest.route_via(inst, "after", pid)
      assert.are.equal(200, st)
      assert.are.equal(P[2], port)
    end
    assert.are.equal(200, (api(inst, "DELETE", "/upstream/after")))
    assert_changed_table(inst, P, "after the write following the kills")
  end)

  it("a worker killed right after a write it made keeps that write", function()
    -- /lua runs in whichever worker takes the connection; kill exactly that one
    local pid = tonumber(dy.run(inst, [[
      local dyups = require "ngx.dyups"
      local status, rv = dyups.update("killed", "server 127.0.0.1:]] .. P[2] .. [[;")
      assert(status == 200, rv)
      return ngx.worker.pid()
    ]]))
    assert.is_number(pid)
    local fresh = inst:kill_worker(pid)
    local status, port = rest.route_via(inst, "killed", fresh)
    assert.are.equal(200, status)
    assert.are.equal(P[2], port)
    local body
    status, body = api(inst, "GET", "/upstream/killed")
    assert.are.equal(200, status)
    assert.are.equal(("server 127.0.0.1:%d\n"):format(P[2]), body)
    assert.are.equal(200, (api(inst, "DELETE", "/upstream/killed")))
  end)
end)

describe("survival: nginx -s reload", function()
  local inst, P

  lazy_setup(function()
    P = select(2, dy.backends(3))
    inst = changed_proxy(P)
  end)

  lazy_teardown(function()
    nginx.stop_all()
  end)

  it("keeps the changed table (the state file wins over the unchanged seed file)", function()
    local master = inst:master_pid()
    local old = inst:worker_pids()
    local new = inst:reload()
    assert.are.equal(master, inst:master_pid())
    for _, pid in ipairs(new) do
      for _, o in ipairs(old) do assert.are_not.equal(o, pid) end
    end
    assert.are.equal(seed(P), nginx.read_file(inst.prefix .. "/conf/upstream.conf"))
    local workers = assert_changed_table(inst, P, "after reload")
    for pid in pairs(workers) do
      for _, o in ipairs(old) do assert.are_not.equal(o, pid, "an old worker answered after reload") end
    end
  end)

  it("and a second reload, after another change, keeps that too", function()
    local status, body = api(inst, "POST", "/upstream/dyhost/servers", ("127.0.0.1:%d weight=2"):format(P[2]))
    assert.are.equal(200, status, body)
    inst:reload()
    status, body = api(inst, "GET", "/upstream/dyhost")
    assert.are.equal(200, status)
    assert.are.equal(("server 127.0.0.1:%d\nserver 127.0.0.1:%d\nserver 127.0.0.1:%d weight=2\n")
      :format(P[3], P[1], P[2]), body)
    local list, ports = rest.route(inst, "dyhost", 16)
    assert.are.same(rest.sorted { P[1], P[2], P[3] }, rest.keys(ports), rest.show(list))
  end)
end)

describe("survival: stop, then start on the same prefix", function()
  local inst, P

  lazy_setup(function()
    P = select(2, dy.backends(3))
    inst = changed_proxy(P)
  end)

  lazy_teardown(function()
    nginx.stop_all()
  end)

  it("serves the changed table, not the seed file's", function()
    local state = inst.prefix .. "/state/dyups.state"
    local old_master = inst:master_pid()
    assert.is_true(inst:stop())
    assert.is_falsy(nginx.pid_alive(old_master))
    assert.is_nil(inst:master_pid())
    assert.is_false(nginx.can_connect(inst.ports.api))
    assert.is_truthy(nginx.read_file(state), "the state file is gone after stop")
    -- the seed file still holds the old table
    assert.are.equal(seed(P), nginx.read_file(inst.prefix .. "/conf/upstream.conf"))

    inst:start()
    assert.are_not.equal(old_master, inst:master_pid())
    assert_changed_table(inst, P, "after stop and start")
    local status, body = api(inst, "GET", "/list")
    assert.are.equal(200, status)
    assert.are.equal("host1\nhost2\ndyhost\n", body)
  end)

  it("keeps a change made after the restart across another restart", function()
    local status, body = api(inst, "DELETE", "/upstream/host1")
    assert.are.equal(200, status, body)
    inst:stop()
    inst:start()
    status, body = api(inst, "GET", "/list")
    assert.are.equal(200, status)
    assert.are.equal("host2\ndyhost\n", body)
    local list = rest.route(inst, "host1", 4)
    for _, r in ipairs(list) do assert.are.equal(502, r.status, rest.show(list)) end
  end)
end)

describe("survival: SIGKILL of the whole nginx, then start on the same prefix", function()
  local inst, P

  lazy_setup(function()
    P = select(2, dy.backends(3))
    inst = changed_proxy(P)
  end)

  lazy_teardown(function()
    nginx.stop_all()
  end)

  it("serves the changed table and takes writes (no stale lock or worker slots)", function()
    local master = inst:master_pid()
    local pids = inst:pids()
    assert.is_true(#pids >= 3, "master and two workers: " .. table.concat(pids, " "))
    local has_master = false
    for _, pid in ipairs(pids) do has_master = has_master or pid == master end
    assert.is_true(has_master, "the master is not among " .. table.concat(pids, " "))
    assert(nginx.execute("kill -9 " .. table.concat(pids, " ")))
    nginx.wait_until(function()
      for _, pid in ipairs(pids) do
        if nginx.pid_alive(pid) then return false end
      end
      return true
    end, 5, "nginx to die")
    inst:stop() -- forget the dead master
    inst:start()
    assert_changed_table(inst, P, "after SIGKILL of every nginx process and a start")
    local status, body = api(inst, "POST", "/upstream/afterkill", ("server 127.0.0.1:%d;"):format(P[2]))
    assert.are.equal(200, status, body)
    for _, pid in ipairs(inst:worker_pids()) do
      local st, port = rest.route_via(inst, "afterkill", pid)
      assert.are.equal(200, st)
      assert.are.equal(P[2], port)
    end
    -- /ups/check: every live worker routes by the current table; the
    -- killed workers' entries in the state file must not count
    local cbody
    local drained = pcall(nginx.wait_until, function()
      local cstatus
      cstatus, cbody = nginx.http(inst.ports.proxy, "GET", "/ups/check")
      return cstatus == 200 and cbody:find('"data":{}', 1, true)
    end, 5)
    local states = {}
    for _, pid in ipairs(pids) do
      local st = nginx.read_file("/proc/" .. pid .. "/stat")
      states[#states + 1] = pid .. "=" .. (st and st:match("^%d+ %b() (%S)") or "gone")
    end
    assert.is_true(drained, "/ups/check still pending 5 s after the write: " .. tostring(cbody)
      .. " (killed processes: " .. table.concat(states, " ") .. ")")
  end)
end)

describe("survival: write-back to an upstream file, restored on a fresh host", function()
  local inst, P, FILE

  lazy_setup(function()
    P = select(2, dy.backends(3))
    inst = changed_proxy(P, 'write_upstreams = "state/upstream.conf",')
    FILE = inst.prefix .. "/state/upstream.conf"
  end)

  lazy_teardown(function()
    nginx.stop_all()
  end)

  -- `nginx -t` on a configuration whose http block includes `file` and
  -- proxies to each of `names`.
  local function nginx_t(file, names)
    local dir = assert(io.popen("mktemp -d /tmp/ngx-dyups-test.XXXXXX")):read("*l")
    local locs = {}
    for i, n in ipairs(names) do
      locs[#locs + 1] = ("        location /%d { proxy_pass http://%s; }"):format(i, n)
    end
    nginx.write_file(dir .. "/nginx.conf", ([[
error_log %s/error.log;
pid %s/nginx.pid;
events { }
http {
    include %s;
    server {
        listen 127.0.0.1:%d;
%s
    }
}
]]):format(dir, dir, file, nginx.free_port(), table.concat(locs, "\n")))
    local out = dir .. "/out"
    local ok = nginx.execute(("%s -t -p %s/ -c %s/nginx.conf >%s 2>&1"):format(
      nginx.shell_quote(nginx.NGINX), dir, dir, out))
    local text = nginx.read_file(out) or ""
    nginx.execute("rm -rf " .. nginx.shell_quote(dir))
    return ok, text
  end

  it("the file is valid nginx syntax holding the changed table", function()
    local text = assert(nginx.read_file(FILE), "no " .. FILE .. " after the change")
    assert.is_truthy(text:find("upstream dyhost {", 1, true), text)
    assert.is_truthy(text:find(("upstream dyhost {%%s*server 127%%.0%%.0%%.1:%d;%%s*server 127%%.0%%.0%%.1:%d;%%s*}")
      :format(P[3], P[1])), text)
    assert.is_truthy(text:find(("upstream host2 {%%s*server 127%%.0%%.0%%.1:%d down;%%s*server 127%%.0%%.0%%.1:%d;%%s*}")
      :format(P[2], P[3])), text)
    assert.is_truthy(text:find(("upstream host1 {%%s*server 127%%.0%%.0%%.1:%d;%%s*}"):format(P[1])), text)
    local ok, out = nginx_t(FILE, { "host1", "host2", "dyhost" })
    assert.is_true(ok, "nginx -t on the written file:\n" .. out .. "\n--- file ---\n" .. text)
    -- the check has teeth
    local bad = inst.prefix .. "/bad.conf"
    nginx.write_file(bad, text:gsub("server", "srv", 1))
    assert.is_false((nginx_t(bad, { "host1" })))
  end)

  it("follows each later change, parameters included, from REST, /ups and the Lua API", function()
    local status, body = api(inst, "POST", "/upstream/dyhost/servers",
      ("127.0.0.1:%d weight=2 max_fails=3 fail_timeout=5s backup"):format(P[2]))
    assert.are.equal(200, status, body)
    local text = nginx.read_file(FILE) or ""
    assert.is_truthy(text:find(("server 127.0.0.1:%d weight=2 max_fails=3 fail_timeout=5s backup;"):format(P[2]),
      1, true), text)

    status, body = nginx.http(inst.ports.proxy, "GET", ("/ups?op=add&server=127.0.0.1:%d&upstream=host2"):format(P[1]))
    assert.are.equal(200, status, body)
    text = nginx.read_file(FILE) or ""
    assert.is_truthy(text:find(("upstream host2 {%%s*server 127%%.0%%.0%%.1:%d down;%%s*server 127%%.0%%.0%%.1:%d;"
      .. "%%s*server 127%%.0%%.0%%.1:%d;%%s*}"):format(P[2], P[3], P[1])), text)

    dy.run(inst, [[
      local status, rv = require("ngx.dyups").update("viaapi", "server 127.0.0.1:]] .. P[3] .. [[;")
      assert(status == 200, rv)
      return rv
    ]])
    text = nginx.read_file(FILE) or ""
    assert.is_truthy(text:find(("upstream viaapi {%%s*server 127%%.0%%.0%%.1:%d;%%s*}"):format(P[3])), text)

    status = api(inst, "DELETE", "/upstream/viaapi")
    assert.are.equal(200, status)
    text = nginx.read_file(FILE) or ""
    assert.is_nil(text:find("viaapi", 1, true), text)

    -- a refused change leaves the file as it was
    status = api(inst, "POST", "/upstream/dyhost", "server 127.0.0.1:9 drain;")
    assert.are.equal(400, status)
    assert.are.equal(text, nginx.read_file(FILE))
    local ok, out = nginx_t(FILE, { "host1", "host2", "dyhost" })
    assert.is_true(ok, "nginx -t:\n" .. out .. "\n--- file ---\n" .. text)
  end)

  it("a fresh instance seeded with that file serves the same table", function()
    local text = assert(nginx.read_file(FILE))
    local _, detail = api(inst, "GET", "/detail")
    local fresh = dy.proxy { upstreams = text }
    assert.are_not.equal(inst.prefix, fresh.prefix)
    assert.is_nil(nginx.read_file(fresh.prefix .. "/state/dyups.state"))
    fresh:start()
    local status, body = api(fresh, "GET", "/detail")
    assert.are.equal(200, status, body)
    assert.are.equal(detail, body)
    -- dyhost: B3 and B1 take turns, the backup B2 stays idle while they are up
    local list, ports = rest.route(fresh, "dyhost", 12)
    assert.are.same(rest.sorted { P[1], P[3] }, rest.keys(ports), rest.show(list))
    list, ports = rest.route(fresh, "host2", 12)
    assert.are.same(rest.sorted { P[1], P[3] }, rest.keys(ports), rest.show(list))
    list, ports = rest.route(fresh, "host1", 4)
    assert.are.same({ P[1] }, rest.keys(ports), rest.show(list))
    fresh:stop()
  end)
end)

describe("survival: a corrupt state file at start", function()
  lazy_teardown(function()
    nginx.stop_all()
  end)

  it("nginx does not start, the error names the path and 'bad magic', the file is untouched", function()
    local inst = dy.proxy { upstreams = "upstream host1 {\n    server 127.0.0.1:9;\n}\n" }
    local state = inst.prefix .. "/state/dyups.state"
    assert(nginx.execute("mkdir -p " .. nginx.shell_quote(inst.prefix .. "/state")))
    local garbage = {}
    for i = 1, 2048 do garbage[i] = string.char((i * 37 + 11) % 256) end
    garbage = "this is not a state file\n" .. table.concat(garbage):rep(8)
    nginx.write_file(state, garbage)

    local ok, err = pcall(inst.start, inst)
    assert.is_false(ok, "nginx started on a corrupt state file")
    err = tostring(err)
    assert.is_nil(inst:master_pid())
    assert.is_false(nginx.can_connect(inst.ports.proxy))
    assert.is_false(nginx.can_connect(inst.ports.api))
    local said = err .. "\n" .. (nginx.read_file(inst.prefix .. "/logs/nginx.out") or "") .. "\n" .. inst:error_log()
    assert.is_truthy(said:find(state, 1, true), "the path is not named:\n" .. said)
    assert.is_truthy(said:find("bad magic", 1, true), "no 'bad magic':\n" .. said)
    assert.are.equal(garbage, nginx.read_file(state), "the corrupt file was changed")
    local p = io.popen("ls -A " .. nginx.shell_quote(inst.prefix .. "/state"))
    local names = p:read("*a")
    p:close()
    assert.are.equal("dyups.state\n", names, "files left beside the state file")
  end)
end)
