-- The demo: examples/nginx.conf (+ examples/upstream.conf) works as shown,
-- on free ports, and scripts/demo.sh starts it and stops it cleanly.
local nginx = require "spec.helpers.nginx"
local demo = require "spec.helpers.demo"

local REPO = nginx.REPO
local DEMO_PORTS = { 8080, 8081, 8088, 8089, 8090 }

local function sh(cmd)
  return nginx.execute(cmd)
end

-- true when the built module exports `name` (asked in a separate luajit,
-- so this process never loads it).
local function module_has(name)
  local p = io.popen("cd " .. nginx.shell_quote(REPO) .. " && luajit -e "
    .. nginx.shell_quote("package.cpath = 'lib/?.so;' .. package.cpath; "
      .. "io.write(tostring(require('ngx.dyups')[" .. ("%q"):format(name) .. "] ~= nil))") .. " 2>/dev/null")
  local out = p:read("*a")
  p:close()
  return out == "true"
end

local function port_of(body)
  return body and tonumber(body:match("^(%d+)\n$"))
end

describe("examples/nginx.conf", function()
  local inst
  local P = {} -- demo port -> the free port standing in for it

  lazy_setup(function()
    for _, port in ipairs(DEMO_PORTS) do P[port] = nginx.free_port() end
    inst = nginx.new { workers = 2, conf = demo.as_template(demo.with_ports(demo.file(nil, "nginx.conf"), P)) }
    local q = nginx.shell_quote
    assert(sh("mkdir -p " .. q(inst.prefix .. "/state")
      .. " && ln -s " .. q(REPO .. "/lib") .. " " .. q(inst.prefix .. "/lib")
      .. " && ln -s " .. q(REPO .. "/lua") .. " " .. q(inst.prefix .. "/lua")))
    nginx.write_file(inst.prefix .. "/conf/upstream.conf", demo.with_ports(demo.file(nil, "upstream.conf"), P))
    inst:start()
  end)

  lazy_teardown(function()
    nginx.stop_all()
  end)

  local function get(path, headers)
    return nginx.http(P[8080], "GET", path, { headers = headers })
  end

  -- the backend ports answering `n` requests for `path` (a set and a list)
  local function answers(n, path, headers)
    local seen, list = {}, {}
    for i = 1, n do
      local status, body = get(path, headers)
      assert.are.equal(200, status, "request " .. i .. ": " .. tostring(body))
      local port = port_of(body)
      assert.is_not_nil(port, "not a backend's answer: " .. tostring(body))
      seen[port] = true
      list[#list + 1] = port
    end
    return seen, list
  end

  it("serves /local from the primaries, never the backup while they are up", function()
    local seen, list = answers(20, "/local")
    assert.is_true(seen[P[8088]] and seen[P[8090]] or false,
      "both primaries should answer: " .. table.concat(list, " "))
    assert.is_nil(seen[P[8089]], "the backup answered: " .. table.concat(list, " "))
  end)

  it("routes / by Host to the upstream of that name", function()
    local seen, list = answers(6, "/", { Host = "local" })
    assert.is_nil(seen[P[8089]], "the backup answered: " .. table.concat(list, " "))
  end)

  it("answers a Host with no such upstream with 502", function()
    local status, body = get("/", { Host = "dyhost" })
    assert.are.equal(502, status, tostring(body))
  end)

  it("falls back to the backup once /ups?op=del took both primaries out", function()
    for _, port in ipairs { 8088, 8090 } do
      local status, body = get("/ups?op=del&server=127.0.0.1:" .. P[port])
      assert.are.equal(200, status, tostring(body))
      assert.matches('"code":"A00001"', body, 1, true)
    end
    local _, list = answers(8, "/local")
    for _, port in ipairs(list) do
      assert.are.equal(P[8089], port, "expected only the backup: " .. table.concat(list, " "))
    end
    local status, body = get("/ups/check")
    assert.are.equal(200, status, tostring(body))

    -- and back
    for _, port in ipairs { 8088, 8090 } do
      status, body = get("/ups?op=add&server=127.0.0.1:" .. P[port])
      assert.are.equal(200, status, tostring(body))
    end
    local seen
    seen, list = answers(10, "/local")
    assert.is_nil(seen[P[8089]], "the backup answered: " .. table.concat(list, " "))
  end)

  it("creates, routes to and deletes `dyhost` through the REST interface", function()
    if not nginx.read_file(REPO .. "/lua/dyups_api.lua") then
      pending("lua/dyups_api.lua is not written yet")
    end
    if not module_has("handle_api") then
      pending("lib/ngx/dyups.so has no handle_api yet (make build)")
    end
    local body = ("server 127.0.0.1:%d;server 127.0.0.1:%d;"):format(P[8089], P[8088])
    local status, out = nginx.http(P[8081], "POST", "/upstream/dyhost", { body = body })
    assert.are.equal(200, status, tostring(out))
    local seen, list = answers(6, "/", { Host = "dyhost" })
    for port in pairs(seen) do
      assert.is_true(port == P[8088] or port == P[8089], "unexpected: " .. table.concat(list, " "))
    end
    status, out = nginx.http(P[8081], "GET", "/detail")
    assert.are.equal(200, status, tostring(out))
    assert.matches("dyhost", out, 1, true)
    status, out = nginx.http(P[8081], "DELETE", "/upstream/dyhost")
    assert.are.equal(200, status, tostring(out))
    status, out = get("/", { Host = "dyhost" })
    assert.are.equal(502, status, tostring(out))
  end)
end)

describe("scripts/demo.sh", function()
  it("starts the demo on its ports and leaves nothing behind on SIGINT", function()
    local taken = {}
    for _, port in ipairs(DEMO_PORTS) do
      if nginx.can_connect(port) then taken[#taken + 1] = port end
    end
    if #taken > 0 then
      print("\nspec/demo_spec.lua: skipping the scripts/demo.sh test: 127.0.0.1 port(s) "
        .. table.concat(taken, ",") .. " in use")
      pending("ports in use: " .. table.concat(taken, ","))
    end

    local q = nginx.shell_quote
    local out_file = os.tmpname()
    local script, master, prefix
    finally(function()
      -- whatever happened: nothing of the demo may outlive the test
      if master then sh("kill -KILL -- -" .. master .. " 2>/dev/null") end
      if script then sh("kill -KILL -- -" .. script .. " 2>/dev/null") end
      if prefix and prefix:match("^/tmp/ngx%-dyups%-demo%.[%w]+$") then sh("rm -rf " .. q(prefix)) end
      os.remove(out_file)
    end)

    -- setsid: its own process group, like a shell job; KEEP unset.
    local p = io.popen("cd " .. q(REPO) .. " && KEEP= setsid bash scripts/demo.sh >" .. q(out_file)
      .. " 2>&1 </dev/null & echo $!")
    script = tonumber(p:read("*l"))
    p:close()
    assert.is_number(script)

    local function output() return nginx.read_file(out_file) or "" end
    local ok, err = pcall(nginx.wait_until, function()
      if not nginx.pid_alive(script) then error("scripts/demo.sh exited:\n" .. output(), 0) end
      local status, body = nginx.http(8080, "GET", "/local", { timeout = 1 })
      return status == 200 and (port_of(body) == 8088 or port_of(body) == 8090)
    end, 15, "the demo to answer on 127.0.0.1:8080")
    assert(ok, tostring(err))

    -- it says what to try, and where it runs
    local text = nginx.wait_until(function()
      local s = output()
      return s:find("Press Ctrl-C", 1, true) and s
    end, 5, "the demo's instructions")
    prefix = text:match("prefix%s+(/tmp/ngx%-dyups%-demo%.[%w]+)")
    master = tonumber(text:match("master pid (%d+)"))
    assert.is_string(prefix, text)
    assert.is_number(master, text)
    assert.matches('curl -d "server 127.0.0.1:8089;server 127.0.0.1:8088;" 127.0.0.1:8081/upstream/dyhost',
      text, 1, true)
    assert.matches('curl -H "host: dyhost" 127.0.0.1:8080', text, 1, true)
    assert.are.equal(2 + 1, #nginx.group_pids(master), "master + 2 workers")

    sh("kill -INT " .. script)

    -- processes whose command line names the prefix (the master), or in the
    -- master's process group (its workers)
    local function leftovers()
      local left = nginx.group_pids(master)
      local ls = io.popen("ls /proc")
      for name in ls:lines() do
        local pid = tonumber(name)
        local cmd = pid and nginx.read_file("/proc/" .. pid .. "/cmdline")
        if cmd and cmd:find("nginx", 1, true) and cmd:find(prefix, 1, true) and nginx.pid_alive(pid) then
          left[#left + 1] = pid
        end
      end
      ls:close()
      return left
    end
    local stopped = pcall(nginx.wait_until, function()
      return not nginx.pid_alive(script) and #leftovers() == 0
    end, 10, "the demo to stop")
    assert(stopped, "after SIGINT: script alive: " .. tostring(nginx.pid_alive(script))
      .. ", nginx processes left: " .. table.concat(leftovers(), " ") .. "\n" .. output())
    assert.is_false(nginx.can_connect(8080), "127.0.0.1:8080 still accepts")
    assert.is_nil(io.open(prefix .. "/conf/nginx.conf"), "the prefix " .. prefix .. " was not removed")
    assert.matches("stopping nginx", output(), 1, true)
  end)
end)
