-- Proves spec/helpers/nginx.lua against a plain nginx with the lua module
-- (no ngx.dyups needed).
local nginx = require "spec.helpers.nginx"

local CONF = [[
http {
  lua_package_path "${lua_package_path}";
  lua_package_cpath "${lua_package_cpath}";
  keepalive_timeout 0;
  client_body_buffer_size 1m;
  client_max_body_size 10m;

  server {
    listen 127.0.0.1:${port_http} reuseport;

    location = /pid {
      content_by_lua_block {
        ngx.say(ngx.worker.pid())
      }
    }

    location = /echo {
      content_by_lua_block {
        ngx.req.read_body()
        local body = ngx.req.get_body_data() or ""
        ngx.header["X-Method"] = ngx.req.get_method()
        ngx.header["X-Greeting"] = ngx.var.http_x_greeting or ""
        ngx.header["X-Len"] = #body
        ngx.print(body)
      }
    }

    location = /teapot {
      return 418 "short and stout";
    }
  }
}
]]

local function set_of(list)
  local s = {}
  for _, v in ipairs(list) do s[v] = true end
  return s
end

-- worker pids seen answering /pid, up to `max` requests or until `want` seen
local function pids_answering(port, want, max)
  local seen, n = {}, 0
  for _ = 1, max do
    local status, body = nginx.http(port, "GET", "/pid")
    assert.equal(200, status)
    local pid = tonumber(body:match("%d+"))
    if not seen[pid] then
      seen[pid] = true
      n = n + 1
      if n >= want then break end
    end
  end
  return seen, n
end

describe("spec.helpers.nginx", function()
  lazy_teardown(function()
    nginx.stop_all()
  end)

  it("free_port gives distinct bindable ports", function()
    local a, b = nginx.free_port(), nginx.free_port()
    assert.is_number(a)
    assert.not_equal(a, b)
    assert.is_false(nginx.can_connect(a))
  end)

  it("wait_until returns the value or raises 'timed out waiting for <what>'", function()
    local n = 0
    assert.equal(3, nginx.wait_until(function()
      n = n + 1
      return n >= 3 and n
    end, 2, "n"))
    local ok, err = pcall(nginx.wait_until, function() return false end, 0.1, "nothing")
    assert.is_false(ok)
    assert.matches("timed out waiting for nothing", err, 1, true)
  end)

  it("renders the template with built-ins and fails on unknown names", function()
    local inst = nginx.new { conf = "http { # ${repo} ${prefix} $${host} ${greeting} }", vars = { greeting = "hi" } }
    assert.matches("# " .. nginx.REPO .. " " .. inst.prefix .. " ${host} hi", inst.conf, 1, true)
    assert.matches("worker_processes 2;", inst.conf, 1, true)
    assert.matches("events { worker_connections 1024; }", inst.conf, 1, true)
    assert.matches("client_body_temp_path tmp/client_body;", inst.conf, 1, true)
    assert.has_error(function() nginx.new { conf = "${nope}" } end)
    inst:cleanup()
  end)

  describe("a running nginx with 2 workers", function()
    local inst

    lazy_setup(function()
      inst = nginx.new { conf = CONF, workers = 2 }
      inst:start()
    end)

    lazy_teardown(function()
      inst:cleanup()
    end)

    it("is up with a master and 2 workers", function()
      assert.is_number(inst:master_pid())
      assert.equal(2, #inst:worker_pids())
      assert.is_number(inst.ports.http)
      assert.is_true(nginx.can_connect(inst.ports.http))
      assert.matches("load_module", inst.conf, 1, true)
    end)

    it("serves content_by_lua_block from both workers", function()
      local seen, n = pids_answering(inst.ports.http, 2, 400)
      assert.equal(2, n)
      for _, pid in ipairs(inst:worker_pids()) do
        assert.is_true(seen[pid], "worker " .. pid .. " never answered")
      end
    end)

    it("http() sends method, headers and a binary body; parses status and headers", function()
      local payload = "a\0b\r\n\255" .. string.rep("x", 70000)
      local status, body, headers = nginx.http(inst.ports.http, "POST", "/echo", {
        headers = { ["X-Greeting"] = "hello there" },
        body = payload,
      })
      assert.equal(200, status)
      assert.equal(#payload, #body)
      assert.is_true(payload == body, "echoed body differs")
      assert.equal("POST", headers["x-method"])
      assert.equal("hello there", headers["x-greeting"])
      assert.equal(tostring(#payload), headers["x-len"])

      status, body = nginx.http(inst.ports.http, "GET", "/teapot")
      assert.equal(418, status)
      assert.equal("short and stout", body)

      status, body = nginx.http(inst.ports.http, "HEAD", "/pid")
      assert.equal(200, status)
      assert.equal("", body)

      local nothing, err = nginx.http(nginx.free_port(), "GET", "/", { timeout = 2 })
      assert.is_nil(nothing)
      assert.matches("curl GET", err, 1, true)
    end)

    it("reload replaces every worker", function()
      local old = set_of(inst:worker_pids())
      local new = inst:reload()
      assert.equal(2, #new)
      for _, pid in ipairs(new) do
        assert.is_nil(old[pid])
      end
      for pid in pairs(old) do
        assert.is_false(nginx.pid_alive(pid))
      end
      local seen = pids_answering(inst.ports.http, 2, 400)
      for pid in pairs(seen) do
        assert.is_nil(old[pid])
      end
    end)

    it("kill_worker gets a respawned worker", function()
      local before = inst:worker_pids()
      local victim = before[2]
      local fresh = inst:kill_worker(victim)
      assert.is_false(nginx.pid_alive(victim))
      assert.is_number(fresh)
      assert.is_nil(set_of(before)[fresh])
      local after = inst:worker_pids()
      assert.equal(2, #after)
      assert.is_true(set_of(after)[fresh])
      assert.matches("exited on signal 9", inst:error_log(), 1, true)
      local status = nginx.http(inst.ports.http, "GET", "/pid")
      assert.equal(200, status)
    end)

    it("stop leaves no process of the prefix and is idempotent", function()
      local master = inst:master_pid()
      local pids = inst:pids()
      assert.is_true(#pids >= 3)
      inst:stop()
      inst:stop()
      assert.is_nil(inst:master_pid())
      for _, pid in ipairs(pids) do
        assert.is_false(nginx.pid_alive(pid), "pid " .. pid .. " survived stop")
      end
      assert.same({}, nginx.group_pids(master))
      assert.is_false(nginx.can_connect(inst.ports.http))
    end)
  end)

  it("start() fails with the tail of error.log", function()
    local inst = nginx.new {
      workers = 1,
      conf = "http { server { listen 127.0.0.1:${port_x}; location / { no_such_directive; } } }",
    }
    local ok, err = pcall(inst.start, inst)
    assert.is_false(ok)
    assert.matches("no_such_directive", err, 1, true)
    assert.is_nil(inst:master_pid())
    inst:cleanup()
  end)

  describe("cleanup when the test process does not stop nginx itself", function()
    local script_conf = "http { server { listen 127.0.0.1:${port_http}; location / { return 200; } } }"

    -- run `code` in a fresh luajit that loads the harness, starts an instance
    -- and prints its master pid; returns master pid, exit ok, output
    local function run_child(code, opts)
      local script = os.tmpname()
      nginx.write_file(script, ([[
package.path = %q .. "/?.lua;" .. package.path
local nginx = require "spec.helpers.nginx"
local inst = nginx.new { workers = 1, watchdog = %s, conf = %q }
inst:start()
io.stdout:write("MASTER ", inst:master_pid(), "\n")
io.stdout:flush()
%s
]]):format(nginx.REPO, tostring(opts.watchdog), script_conf, code))
      local out = os.tmpname()
      local ok = nginx.execute("luajit " .. nginx.shell_quote(script) .. " >" .. nginx.shell_quote(out) .. " 2>&1")
      local text = nginx.read_file(out)
      os.remove(script)
      os.remove(out)
      local master = tonumber(text:match("MASTER (%d+)"))
      assert(master, "child did not start nginx:\n" .. text)
      return master, ok, text
    end

    it("an uncaught error() stops nginx (__gc sentinel at lua_close)", function()
      local master, ok, text = run_child([[error("boom on purpose")]], { watchdog = false })
      assert.is_false(ok)
      assert.matches("boom on purpose", text, 1, true)
      assert.is_false(nginx.pid_alive(master))
      assert.same({}, nginx.group_pids(master))
    end)

    it("os.exit(3) without close stops nginx (wrapped os.exit)", function()
      local master, ok = run_child([[os.exit(3)]], { watchdog = false })
      assert.is_false(ok)
      assert.is_false(nginx.pid_alive(master))
      assert.same({}, nginx.group_pids(master))
    end)

    it("SIGKILL of the test process stops nginx (watchdog)", function()
      local master, ok = run_child([[
local ffi = require "ffi"
ffi.cdef "int kill(int, int); int getpid(void);"
ffi.C.kill(ffi.C.getpid(), 9)
]], { watchdog = true })
      assert.is_false(ok)
      nginx.wait_until(function() return not nginx.pid_alive(master) end, 10, "the watchdog to stop nginx")
      nginx.wait_until(function() return #nginx.group_pids(master) == 0 end, 5, "the workers to go")
    end)

    it("a failing busted run stops nginx it left running", function()
      local dir = io.popen("mktemp -d"):read("*l")
      local spec = dir .. "/leaky_spec.lua"
      local pidfile = dir .. "/master"
      nginx.write_file(spec, ([[
local nginx = require "spec.helpers.nginx"
describe("leaky", function()
  setup(function()
    local inst = nginx.new { workers = 1, watchdog = false, conf = %q }
    inst:start()
    local f = io.open(%q, "w"); f:write(inst:master_pid()); f:close()
  end)
  it("fails", function() error("failing on purpose") end)
end)
]]):format(script_conf, pidfile))
      local out = dir .. "/out"
      local ok = nginx.execute("cd " .. nginx.shell_quote(nginx.REPO) .. " && busted --lua=luajit -o plainTerminal "
        .. nginx.shell_quote(spec) .. " >" .. nginx.shell_quote(out) .. " 2>&1")
      local text = nginx.read_file(out) or ""
      local master = tonumber(nginx.read_file(pidfile) or "")
      nginx.execute("rm -rf " .. nginx.shell_quote(dir))
      assert.is_false(ok, text)
      assert.matches("failing on purpose", text, 1, true)
      assert(master, "nested busted did not start nginx:\n" .. text)
      assert.is_false(nginx.pid_alive(master))
      assert.same({}, nginx.group_pids(master))
    end)
  end)
end)
