-- ngx.dyups as a plain LuaJIT module, outside nginx: init and the state
-- file, validation, capacity, versions, add/remove_server, and several
-- luajit processes sharing one state file.
--
--   busted --lua=luajit spec/module_spec.lua
local nginx = require "spec.helpers.nginx" -- utilities only; no nginx is started
local child = require "spec.helpers.luajit_child"
local dnsmasq = require "spec.helpers.dnsmasq"
local dyups = require "ngx.dyups"

local execute, shell_quote = nginx.execute, nginx.shell_quote
local write_file, read_file = nginx.write_file, nginx.read_file

----------------------------------------------------------------------------
-- helpers

local dirs = {}

-- a fresh directory under /tmp, removed by cleanup_dirs()
local function mkdtemp()
  local p = io.popen("mktemp -d /tmp/ngx-dyups-module-spec.XXXXXX")
  local dir = p:read("*l")
  p:close()
  assert(dir and dir:match("^/tmp/ngx%-dyups%-module%-spec%.%w+$"), "mktemp -d failed")
  dirs[#dirs + 1] = dir
  return dir
end

local function cleanup_dirs()
  for i = #dirs, 1, -1 do
    execute("rm -rf " .. shell_quote(dirs[i]))
    dirs[i] = nil
  end
end

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() return true end
  return false
end

local function file_size(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local n = f:seek("end")
  f:close()
  return n
end

-- everything a reader can see: version, names in order, every upstream
local function snapshot()
  local names = assert(dyups.list())
  local ups = {}
  for _, name in ipairs(names) do
    ups[name] = assert(dyups.get(name))
  end
  return { version = dyups.version(), list = names, upstreams = ups }
end

local function addrs(name)
  local out = {}
  for _, s in ipairs(assert(dyups.get(name), "no upstream " .. name).servers) do
    out[#out + 1] = s.addr
  end
  return out
end

local function server(name, addr)
  for _, s in ipairs(assert(dyups.get(name)).servers) do
    if s.addr == addr then return s end
  end
  return nil
end

local SEED = [[
# seed file for the spec: nginx syntax
upstream alpha {
    # first server
    server 127.0.0.1:8081 weight=3 max_fails=2 fail_timeout=5s;  # trailing comment
    server 127.0.0.1:8082 backup;
    balancer_by_lua_block {
        local t = { peers = { "10.9.9.9:9" } }
        if t.peers then ngx.log(ngx.INFO, "}") end
    }
    keepalive 16;
    zone alpha 64k;
    check interval=3000 rise=2 fall=5 timeout=1000;
}

upstream beta {
    server 127.0.0.2:9000 down;
    server 127.0.0.3:9001;
}
]]

-- a fresh directory with upstream.conf = SEED and a state file made from it
local function fresh(opts)
  local dir = mkdtemp()
  local conf = dir .. "/upstream.conf"
  write_file(conf, SEED)
  local o = { path = dir .. "/state", upstreams = conf }
  for k, v in pairs(opts or {}) do o[k] = v end
  local ok, err = dyups.init(o)
  assert(ok, err)
  return dir, o.path, conf
end

-- A DNS server on loopback for the host names (host names are asked of
-- DNS only, and the specs send nothing off the host): started on first use,
-- it knows ok.dyups.test, and any other name under dyups.test is NXDOMAIN.
local dns_server
local function dns()
  dns_server = dns_server or dnsmasq.start { hosts = { ["ok.dyups.test"] = { "127.0.0.7", "127.0.0.8" } } }
  return dns_server
end

local function loopback_resolver()
  return "127.0.0.1:" .. dns().port .. " ipv6=off"
end

----------------------------------------------------------------------------

describe("ngx.dyups module", function()
  after_each(cleanup_dirs)
  teardown(function()
    cleanup_dirs()
    dnsmasq.stop_all()
  end)

  describe("loading", function()
    it("loads in plain luajit from lib/?.so", function()
      assert.is_table(dyups)
      assert.equal(dyups, package.loaded["ngx.dyups"])
      local where = package.searchpath("ngx.dyups", package.cpath)
      assert.truthy(where and where:match("lib/ngx/dyups%.so$"), tostring(where))
    end)

    it("has a _VERSION string", function()
      assert.is_string(dyups._VERSION)
      assert.truthy(dyups._VERSION:match("^%d+%.%d+%.%d+"), dyups._VERSION)
      assert.equal("0.1.0", dyups._VERSION)
    end)

    it("exports every documented function", function()
      for _, name in ipairs { "init", "version", "update", "delete", "list", "get",
                              "add_server", "remove_server", "pending" } do
        assert.is_function(dyups[name], "dyups." .. name .. " missing")
      end
    end)

    it("answers nil, err (not a raise) before init, in a fresh process", function()
      local dir = mkdtemp()
      local r = child.run(dir, [[
        local dyups = require "ngx.dyups"
        local v, err = dyups.version()
        local l, lerr = dyups.list()
        return { v = v or false, err = err, l = l or false, lerr = lerr }
      ]])
      assert.is_false(r.v)
      assert.is_string(r.err)
      assert.truthy(r.err:match("init"), r.err)
      assert.is_false(r.l)
      assert.is_string(r.lerr)
    end)
  end)

  ----------------------------------------------------------------------------
  -- As lua-resty-core's functions do: success returns only its values (no
  -- trailing nil, so `ngx.say("version ", dyups.version())` prints
  -- "version 1"), failure `nil, err` (add_server/remove_server: `nil, err,
  -- status`); update/delete return `status, message` for Tengine.
  describe("return values", function()
    local function pack(...) return { n = select("#", ...), ... } end

    it("success returns only its values", function()
      local dir = mkdtemp()
      write_file(dir .. "/upstream.conf", "upstream a { server 127.0.0.1:1; server 127.0.0.1:2; }\n")
      local cases = {
        { "init", 1, function()
          return dyups.init { path = dir .. "/state", upstreams = dir .. "/upstream.conf", write_upstreams = true }
        end },
        { "version", 1, function() return dyups.version() end },
        { "list", 1, function() return dyups.list() end },
        { "get", 1, function() return dyups.get("a") end },
        { "peers", 1, function() return dyups.peers("a") end },
        { "pending", 1, function() return dyups.pending() end },
        { "update", 2, function() return dyups.update("b", "server 127.0.0.1:3;") end },
        { "remove_server", 1, function() return dyups.remove_server("a", "127.0.0.1:2") end },
        { "add_server", 1, function() return dyups.add_server("a", "127.0.0.1:2") end },
        { "write_upstreams", 1, function() return dyups.write_upstreams(dir .. "/out.conf") end },
        { "write_back_status", 1, function() return dyups.write_back_status() end },
        { "delete", 2, function() return dyups.delete("b") end },
      }
      for _, case in ipairs(cases) do
        local name, want, call = case[1], case[2], case[3]
        local out = pack(call())
        assert.is_not_nil(out[1], name .. " failed: " .. tostring(out[2]))
        assert.equal(want, out.n, name .. " returned " .. out.n .. " values")
      end
      assert.equal("version " .. dyups.version(), table.concat({ "version ", dyups.version() }))
      -- init_worker in a process of its own: it makes that process a worker.
      local r = child.run(dir, [[
        local dyups = require "ngx.dyups"
        local n = select("#", dyups.init { path = ARGS.path })
        return { init = n, init_worker = select("#", dyups.init_worker()) }
      ]], { path = dir .. "/state" })
      assert.same({ init = 1, init_worker = 1 }, r)
    end)

    it("failure returns nil and a message (add_server/remove_server: and a status)", function()
      local dir = mkdtemp()
      assert(dyups.init { path = dir .. "/state" })
      assert.equal(200, (dyups.update("a", "server 127.0.0.1:1;")))
      local cases = {
        { "init", 2, function() return dyups.init { path = dir .. "/new", upstreams = dir .. "/missing.conf" } end },
        { "get", 2, function() return dyups.get("nope") end },
        { "peers", 2, function() return dyups.peers("nope") end },
        { "add_server", 3, function() return dyups.add_server("nope", "127.0.0.1:2") end },
        { "remove_server", 3, function() return dyups.remove_server("a", "127.0.0.1:1") end },
        { "write_upstreams", 2, function() return dyups.write_upstreams(dir .. "/no/such/dir/out.conf") end },
        { "write_back_status", 2, function() return dyups.write_back_status() end },
        { "update", 2, function() return dyups.update("a", "server;") end },
        { "delete", 2, function() return dyups.delete("nope") end },
      }
      for _, case in ipairs(cases) do
        local name, want, call = case[1], case[2], case[3]
        local out = pack(call())
        assert.equal(want, out.n, name .. " returned " .. out.n .. " values")
        assert.is_string(out[2], name)
        if name == "update" or name == "delete" then
          assert.is_true(out[1] >= 400, name)
        else
          assert.is_nil(out[1], name)
        end
      end
      local r = child.run(dir, [[
        local dyups = require "ngx.dyups"
        return { version = select("#", dyups.version()), list = select("#", dyups.list()),
                 init_worker = select("#", dyups.init_worker()) }
      ]])
      assert.same({ version = 2, list = 2, init_worker = 2 }, r)
    end)
  end)

  ----------------------------------------------------------------------------
  describe("init", function()
    it("creates a missing state file seeded from the upstream file", function()
      local dir = mkdtemp()
      local conf = dir .. "/upstream.conf"
      write_file(conf, SEED)
      local path = dir .. "/state"
      assert.is_false(exists(path))
      local ok, err = dyups.init { path = path, upstreams = conf }
      assert.is_nil(err)
      assert.is_true(ok)
      assert.is_true(exists(path))
      assert.equal(2097152, file_size(path)) -- default size 2m
      assert.equal(1, dyups.version())
      assert.same({ "alpha", "beta" }, dyups.list())

      local alpha = dyups.get("alpha")
      assert.equal("alpha", alpha.name)
      -- the balancer_by_lua_block (and keepalive) contributed no server
      assert.same({
        { addr = "127.0.0.1:8081", host = "127.0.0.1", port = 8081, weight = 3, max_conns = 0, max_fails = 2,
          fail_timeout = 5, slow_start = 0, backup = false, down = false,
          line = "server 127.0.0.1:8081 weight=3 max_fails=2 fail_timeout=5s;" },
        { addr = "127.0.0.1:8082", host = "127.0.0.1", port = 8082, weight = 1, max_conns = 0, max_fails = 1,
          fail_timeout = 10, slow_start = 0, backup = true, down = false,
          line = "server 127.0.0.1:8082 backup;" },
      }, alpha.servers)
      -- the upstream's settings: keepalive and the check line as given, the
      -- rest at nginx's and the check module's defaults
      assert.equal(16, alpha.keepalive)
      assert.same({ 1000, 3600000, 60000 }, { alpha.keepalive_requests, alpha.keepalive_time, alpha.keepalive_timeout })
      assert.same({ interval = 3000, rise = 2, fall = 5, timeout = 1000, default_down = true, type = "tcp",
        port = 0, jitter = 0 }, alpha.check)
      assert.equal("GET / HTTP/1.0\r\n\r\n", alpha.check_http_send)
      assert.same({ "http_2xx", "http_3xx" }, alpha.check_http_expect_alive)
      assert.equal(1, alpha.check_keepalive_requests)
      assert.same({ "keepalive 16;", "check interval=3000 rise=2 fall=5 timeout=1000;" }, alpha.settings)

      local beta = dyups.get("beta")
      assert.equal("beta", beta.name)
      assert.same({ "127.0.0.2:9000", "127.0.0.3:9001" }, addrs("beta"))
      assert.is_true(beta.servers[1].down)
      assert.is_false(beta.servers[2].down)
      assert.is_nil(beta.check)
      assert.is_nil(dyups.get("10.9.9.9:9"))
      local none, nerr = dyups.get("nope")
      assert.is_nil(none)
      assert.equal("not found", nerr)
    end)

    it("creates an empty table without an upstream file", function()
      local dir = mkdtemp()
      assert.is_true(dyups.init { path = dir .. "/state" })
      assert.equal(1, dyups.version())
      assert.same({}, dyups.list())
    end)

    it("honours size (bytes, or k/m suffixes)", function()
      local dir = mkdtemp()
      assert.is_true(dyups.init { path = dir .. "/a", size = 16384 })
      assert.equal(16384, file_size(dir .. "/a"))
      assert.is_true(dyups.init { path = dir .. "/b", size = "512k" })
      assert.equal(524288, file_size(dir .. "/b"))
      assert.is_true(dyups.init { path = dir .. "/c", size = "4m" })
      assert.equal(4194304, file_size(dir .. "/c"))
    end)

    it("keeps a valid existing state file over the upstream file", function()
      local dir, path, conf = fresh()
      assert.equal(200, dyups.update("gamma", "server 127.0.0.9:1;"))
      local before = snapshot()

      write_file(conf, "upstream other {\n    server 10.0.0.1:80;\n}\n")
      local ok, err = dyups.init { path = path, upstreams = conf }
      assert.is_nil(err)
      assert.is_true(ok)
      assert.same(before, snapshot())

      -- a brand-new process opening it sees the file's table too
      local r = child.run(dir, [[
        local dyups = require "ngx.dyups"
        assert(dyups.init { path = ARGS.path, upstreams = ARGS.conf })
        return { version = dyups.version(), list = dyups.list() }
      ]], { path = path, conf = conf })
      assert.equal(before.version, r.version)
      assert.same({ "alpha", "beta", "gamma" }, r.list)
    end)

    it("refuses a bad upstream file with its line number and creates no state file", function()
      local dir = mkdtemp()
      local conf = dir .. "/upstream.conf"
      write_file(conf, "upstream a {\n    server 1.2.3.4:80;\n    server 1.2.3.5:80 weight=zero;\n}\n")
      local path = dir .. "/state"
      local ok, err = dyups.init { path = path, upstreams = conf }
      assert.is_nil(ok)
      assert.is_string(err)
      assert.truthy(err:find("line 3", 1, true), err)
      assert.truthy(err:find(conf, 1, true), err)
      assert.is_false(exists(path))
    end)

    it("refuses an upstream file with what nginx refuses in an upstream block, naming the line", function()
      for _, case in ipairs {
        { "    sticky cookie srv_id;\n", 'line 3: sticky cookie srv_id: unknown directive "sticky"' },
        { "    check interval=0;\n", "line 3: check interval=0: interval=0: interval must be 1.." },
        { "    check_http_send \"GET / HTTP/1.0\\r\\n\\r\\n\" x;\n", "line 3: check_http_send" },
        { "    server 1.2.3.5:80 max_conns=-1;\n", "line 3: server 1.2.3.5:80 max_conns=-1: max_conns=-1: max_conns must be 0.." },
      } do
        local dir = mkdtemp()
        local conf = dir .. "/upstream.conf"
        write_file(conf, "upstream a {\n    server 1.2.3.4:80;\n" .. case[1] .. "}\n")
        local ok, err = dyups.init { path = dir .. "/state", upstreams = conf }
        assert.is_nil(ok)
        assert.truthy(err:find(case[2], 1, true), err)
        assert.truthy(err:find(conf, 1, true), err)
        assert.is_false(exists(dir .. "/state"))
      end
    end)

    it("write_upstreams writes every setting back, and a new state file made from it holds the same upstreams", function()
      local dir = fresh()
      local body = "least_conn;\nzone z 64k;\nserver 127.0.0.1:1 weight=2 max_conns=10;\nserver 127.0.0.1:2 backup;\n"
        .. "keepalive 8;\nkeepalive_requests 50;\nkeepalive_time 30m;\nkeepalive_timeout 500ms;\n"
        .. "check interval=2s rise=3 fall=4 timeout=500 type=http default_down=false port=8080 jitter=100;\n"
        .. 'check_http_send "GET /health HTTP/1.1\\r\\nHost: \\"a\\" } {;\\r\\n\\r\\n";\n'
        .. "check_http_expect_alive http_2xx http_4xx;\ncheck_keepalive_requests 5;\n"
      local status, msg = dyups.update("full", body)
      assert.equal(200, status, msg)
      local before = snapshot()
      assert.equal("GET /health HTTP/1.1\r\nHost: \"a\" } {;\r\n\r\n", before.upstreams.full.check_http_send)
      assert.is_true(dyups.write_upstreams(dir .. "/written.conf"))
      local text = read_file(dir .. "/written.conf")
      assert.truthy(text:find('    check_http_send "GET /health HTTP/1.1\\r\\nHost: \\"a\\" } {;\\r\\n\\r\\n";\n', 1, true), text)
      assert.truthy(text:find("    check interval=2000 rise=3 fall=4 timeout=500 default_down=false type=http port=8080 jitter=100;\n", 1, true), text)
      assert.truthy(text:find("    server 127.0.0.1:1 weight=2 max_conns=10;\n", 1, true), text)
      assert.truthy(text:find("    keepalive_timeout 500ms;\n", 1, true), text)
      -- read again on a fresh host: the same table
      assert.is_true(dyups.init { path = dir .. "/state2", upstreams = dir .. "/written.conf" })
      local after = snapshot()
      assert.same(before.list, after.list)
      assert.same(before.upstreams, after.upstreams)
    end)

    it("resolves the host names of an upstream file for a new state file", function()
      local dir = mkdtemp()
      local conf = dir .. "/upstream.conf"
      write_file(conf, "upstream a {\n    server 1.2.3.4:80;\n}\nupstream b {\n    server ok.dyups.test:8080 weight=3;\n}\n")
      local ok, err = dyups.init { path = dir .. "/state", upstreams = conf, resolver = loopback_resolver() }
      assert.is_nil(err)
      assert.is_true(ok)
      local b = dyups.get("b")
      local got = {}
      for _, s in ipairs(b.servers) do
        got[#got + 1] = s.addr
        assert.equal(3, s.weight)
      end
      table.sort(got)
      assert.same({ "127.0.0.7:8080", "127.0.0.8:8080" }, got)
      assert.equal("server ok.dyups.test:8080 weight=3;", b.names[1].line)
    end)

    it("refuses an upstream file with a host name that does not resolve and creates no state file", function()
      local dir = mkdtemp()
      local conf = dir .. "/upstream.conf"
      write_file(conf, "upstream a {\n    server 1.2.3.4:80;\n}\nupstream b {\n    server nowhere.dyups.test:80;\n}\n")
      local ok, err = dyups.init { path = dir .. "/state", upstreams = conf, resolver = loopback_resolver() }
      assert.is_nil(ok)
      assert.truthy(err:find("upstream file " .. conf, 1, true), err)
      assert.truthy(err:find("upstream b: server nowhere.dyups.test:80", 1, true), err)
      assert.truthy(err:find("NXDOMAIN", 1, true), err)
      assert.is_false(exists(dir .. "/state"))
    end)

    it("refuses a missing upstream file for a new state file", function()
      local dir = mkdtemp()
      local ok, err = dyups.init { path = dir .. "/state", upstreams = dir .. "/missing.conf" }
      assert.is_nil(ok)
      assert.truthy(err:find(dir .. "/missing.conf", 1, true), err)
      assert.is_false(exists(dir .. "/state"))
    end)

    describe("never overwrites a file it cannot read as a state file", function()
      -- each case: how to make the file, and what the error must say
      local function valid_state(dir)
        local src = dir .. "/valid"
        assert(dyups.init { path = src, upstreams = nil })
        assert.equal(200, dyups.update("x", "server 127.0.0.1:1;"))
        return read_file(src)
      end

      local cases = {
        {
          what = "a foreign (text) file",
          make = function()
            return ("this is not a state file, just some text\n"):rep(300) -- > 4096 bytes
          end,
          reason = { "magic", "not an ngx%.dyups state file" },
        },
        {
          what = "a short text file",
          make = function() return "hello world\n" end,
          reason = { "truncated", "magic", "not an ngx%.dyups state file", "too short" },
        },
        {
          what = "a zero-length file",
          make = function() return "" end,
          reason = { "truncated", "empty", "0 bytes" },
        },
        {
          what = "a truncated state file",
          make = function(dir) return valid_state(dir):sub(1, 100000) end,
          reason = { "truncated" },
        },
        {
          what = "a state file cut inside its header",
          make = function(dir) return valid_state(dir):sub(1, 2000) end,
          reason = { "truncated" },
        },
        {
          what = "a state file with a corrupted header",
          make = function(dir)
            local s = valid_state(dir)
            -- flip a byte of the slot length field (offset 20)
            return s:sub(1, 20) .. string.char((s:byte(21) + 7) % 256) .. s:sub(22)
          end,
          reason = { "checksum", "corrupt", "inconsistent" },
        },
        {
          what = "a state file with a bad magic",
          make = function(dir)
            local s = valid_state(dir)
            return "\137DYUPX" .. s:sub(7)
          end,
          reason = { "magic", "not an ngx%.dyups state file" },
        },
      }

      for _, case in ipairs(cases) do
        it(case.what .. " -> nil, err naming path and reason; bytes unchanged", function()
          local dir = mkdtemp()
          local path = dir .. "/state"
          local bytes = case.make(dir)
          write_file(path, bytes)
          local conf = dir .. "/upstream.conf"
          write_file(conf, SEED)

          for _ = 1, 2 do -- a second attempt fails the same way: nothing was "repaired"
            local ok, err = dyups.init { path = path, upstreams = conf }
            assert.is_nil(ok)
            assert.is_string(err)
            assert.truthy(err:find(path, 1, true), "error does not name the path: " .. err)
            local named = false
            for _, pat in ipairs(case.reason) do
              if err:lower():match(pat) then named = true end
            end
            assert.truthy(named, "error does not give the reason (" .. table.concat(case.reason, "|")
              .. "): " .. err)
            assert.equal(#bytes, file_size(path))
            assert.is_true(read_file(path) == bytes, "the file's bytes changed")
          end
        end)
      end
    end)

    it("raises for bad option types", function()
      local dir = mkdtemp()
      local p = dir .. "/state"
      assert.has_error(function() dyups.init() end)
      assert.has_error(function() dyups.init("x") end)
      assert.has_error(function() dyups.init { path = 1 } end)
      assert.has_error(function() dyups.init { path = p, size = true } end)
      assert.has_error(function() dyups.init { path = p, trylock = "yes" } end)
      assert.has_error(function() dyups.init { path = p, durable = 1 } end)
      assert.has_error(function() dyups.init { path = p, upstreams = 5 } end)
      assert.has_error(function() dyups.init { path = p, lock_timeout = "soon" } end)
      local ok, err = pcall(dyups.init)
      assert.is_false(ok)
      assert.truthy(tostring(err):match("bad argument #1 to 'init'"), tostring(err))
      assert.is_false(exists(p))
    end)

    it("switches the process to another file when called again", function()
      local dir = mkdtemp()
      local a, b = dir .. "/a", dir .. "/b"
      assert.is_true(dyups.init { path = a })
      assert.equal(200, dyups.update("only_in_a", "server 127.0.0.1:1;"))
      assert.is_true(dyups.init { path = b })
      assert.same({}, dyups.list())
      assert.equal(1, dyups.version())
      assert.equal(200, dyups.update("only_in_b", "server 127.0.0.1:2;"))
      assert.is_true(dyups.init { path = a })
      assert.same({ "only_in_a" }, dyups.list())
      assert.equal(2, dyups.version())
      assert.is_true(dyups.init { path = b })
      assert.same({ "only_in_b" }, dyups.list())
    end)
  end)

  ----------------------------------------------------------------------------
  describe("bad input changes nothing", function()
    before_each(function() fresh { resolver = loopback_resolver() } end)

    local raising = {
      { "update(nil, body)", function() return dyups.update(nil, "server 127.0.0.1:1;") end,
        "bad argument #1 to 'update' (string expected, got nil)" },
      { "update(name, nil)", function() return dyups.update("alpha", nil) end,
        "bad argument #2 to 'update' (string expected, got nil)" },
      { "update(name, number)", function() return dyups.update("alpha", 1) end,
        "bad argument #2 to 'update'" },
      { "update(table, body)", function() return dyups.update({}, "server 127.0.0.1:1;") end,
        "bad argument #1 to 'update'" },
      { "update(name, body, 'x')", function() return dyups.update("alpha", "server 127.0.0.1:1;", "x") end,
        "bad argument #3 to 'update'" },
      { "delete(nil)", function() return dyups.delete(nil) end, "bad argument #1 to 'delete'" },
      { "delete(name, {})", function() return dyups.delete("alpha", {}) end, "bad argument #2 to 'delete'" },
      { "get(nil)", function() return dyups.get(nil) end, "bad argument #1 to 'get'" },
      { "add_server(name, nil)", function() return dyups.add_server("alpha", nil) end,
        "bad argument #2 to 'add_server'" },
      { "add_server(1, addr)", function() return dyups.add_server(1, "127.0.0.1:9") end,
        "bad argument #1 to 'add_server'" },
      { "remove_server(name, nil)", function() return dyups.remove_server("alpha", nil) end,
        "bad argument #2 to 'remove_server'" },
      { "remove_server(name, addr, 'x')",
        function() return dyups.remove_server("alpha", "127.0.0.1:8081", "x") end,
        "bad argument #3 to 'remove_server'" },
    }

    for _, case in ipairs(raising) do
      it("raises for " .. case[1], function()
        local before = snapshot()
        local ok, err = pcall(case[2])
        assert.is_false(ok, case[1] .. " did not raise")
        assert.truthy(tostring(err):find(case[3], 1, true), tostring(err))
        assert.same(before, snapshot())
      end)
    end

    local refused = {
      { "an empty body", "alpha", "" },
      { "a blank body", "alpha", "  \n\t\n" },
      { "a bad weight", "alpha", "server 127.0.0.1:1 weight=0;", "weight" },
      { "a non-numeric weight", "alpha", "server 127.0.0.1:1 weight=abc;", "weight" },
      { "a duplicate server", "alpha", "server 127.0.0.1:1;\nserver 127.0.0.1:1;", "line 2" },
      { "an unknown parameter", "alpha", "server 127.0.0.1:1 drain;", "drain" },
      { "a host name that does not resolve", "alpha", "server nowhere.dyups.test:80;",
        "upstream alpha: server nowhere.dyups.test:80: host name \"nowhere.dyups.test\" does not resolve" },
      { "a missing ';'", "alpha", "server 127.0.0.1:1", "line 1" },
      { "an unknown directive", "alpha", "server 127.0.0.1:1;\n  bogus;", "line 2" },
      { "a good line then a bad one", "alpha", "server 127.0.0.1:1;\nserver 127.0.0.1:2 weight=abc;", "line 2" },
      { "a bad line then a good one", "alpha", "server 127.0.0.1:2 max_fails=x;\nserver 127.0.0.1:1;", "line 1" },
      { "good and bad lines, new upstream", "fresh_one", "server 127.0.0.1:1;\nserver 127.0.0.1:2 weight=abc;", "line 2" },
      { "a name with '/'", "a/b", "server 127.0.0.1:1;", "/" },
      { "an empty name", "", "server 127.0.0.1:1;" },
      { "a name with a space", "a b", "server 127.0.0.1:1;" },
      { "a 256-byte name", ("n"):rep(256), "server 127.0.0.1:1;", "256" },
    }

    for _, case in ipairs(refused) do
      it("refuses " .. case[1] .. " with 400", function()
        local before = snapshot()
        local status, msg = dyups.update(case[2], case[3])
        assert.equal(400, status)
        assert.is_string(msg)
        if case[4] then
          assert.truthy(msg:find(case[4], 1, true), msg)
        end
        assert.same(before, snapshot())
      end)
    end

    it("refuses add_server with a host name that does not resolve, or junk", function()
      local before = snapshot()
      for _, bad in ipairs { "nowhere.dyups.test:80", "127.0.0.1:80;;", "127.0.0.1:0", "", "127.0.0.1:80 weight=0",
                             "127.0.0.1:80 drain" } do
        local v, err, status = dyups.add_server("alpha", bad)
        assert.is_nil(v, bad)
        assert.is_string(err)
        assert.equal(400, status, bad .. ": " .. tostring(err))
      end
      assert.same(before, snapshot())
    end)

    it("add_server takes a whole `server ...;` line too", function()
      local v = assert(dyups.add_server("alpha", "server 127.0.0.1:81 weight=2;"))
      assert.equal(v, dyups.version())
      local servers = dyups.get("alpha").servers
      assert.equal("127.0.0.1:81", servers[#servers].addr)
      assert.equal(2, servers[#servers].weight)
    end)

    it("accepts a 255-byte name", function()
      local name = ("n"):rep(255)
      local v = dyups.version()
      assert.equal(200, dyups.update(name, "server 127.0.0.1:1;"))
      assert.equal(v + 1, dyups.version())
      assert.same({ "alpha", "beta", name }, dyups.list())
      assert.same({ "127.0.0.1:1" }, addrs(name))
    end)

    it("accepts names of letters, digits, '.', '-', '_'", function()
      assert.equal(200, dyups.update("Svc-1.example_A", "server 127.0.0.1:1;"))
      assert.truthy(dyups.get("Svc-1.example_A"))
    end)
  end)

  ----------------------------------------------------------------------------
  describe("capacity", function()
    it("answers 507 for a table too large for the file and changes nothing", function()
      local dir = mkdtemp()
      assert.is_true(dyups.init { path = dir .. "/state", size = 16384 })
      assert.equal(200, dyups.update("small", "server 127.0.0.1:1;"))
      local before = snapshot()

      local lines = {}
      for i = 1, 900 do -- under the 1000-server limit, over the 16 KiB file
        lines[#lines + 1] = ("server 10.%d.%d.%d:%d weight=2;"):format(i % 200, math.floor(i / 200), i % 250 + 1,
          1000 + i)
      end
      local status, msg = dyups.update("huge", table.concat(lines, "\n"))
      assert.equal(507, status)
      assert.is_string(msg)
      assert.same(before, snapshot())

      -- replacing an existing upstream with too much fails the same way
      status = dyups.update("small", table.concat(lines, "\n"))
      assert.equal(507, status)
      assert.same(before, snapshot())

      -- and small writes still work
      assert.equal(200, dyups.update("small2", "server 127.0.0.1:2;"))
      assert.equal(before.version + 1, dyups.version())
      assert.same({ "small", "small2" }, dyups.list())
      assert.is_truthy(dyups.add_server("small", "127.0.0.1:3"))
      assert.same({ "127.0.0.1:1", "127.0.0.1:3" }, addrs("small"))
    end)

    it("answers 507 when add_server would overflow the file, and changes nothing", function()
      local dir = mkdtemp()
      assert.is_true(dyups.init { path = dir .. "/state", size = 16384 })
      assert.equal(200, dyups.update("u", "server 127.0.0.1:1;"))
      local status, before
      for port = 2, 5000 do
        before = snapshot()
        local v, err
        v, err, status = dyups.add_server("u", "127.0.0.1:" .. port)
        if not v then
          assert.is_string(err)
          break
        end
      end
      assert.equal(507, status)
      assert.same(before, snapshot())
    end)
  end)

  ----------------------------------------------------------------------------
  describe("versions", function()
    before_each(function() fresh() end)

    it("counts every successful write, and not a write that changes nothing", function()
      assert.equal(1, dyups.version())
      assert.equal(200, dyups.update("gamma", "server 127.0.0.1:1;"))
      assert.equal(2, dyups.version())
      assert.equal(200, dyups.update("gamma", "server 127.0.0.1:1;\nserver 127.0.0.1:2;"))
      assert.equal(3, dyups.version())
      -- same body again: 200, no new version
      assert.equal(200, dyups.update("gamma", "server 127.0.0.1:1;\nserver 127.0.0.1:2;"))
      assert.equal(3, dyups.version())
      assert.equal(4, dyups.remove_server("gamma", "127.0.0.1:2"))
      assert.equal(4, dyups.version())
      assert.equal(5, dyups.add_server("gamma", "127.0.0.1:2"))
      assert.equal(5, dyups.version())
      assert.equal(6, dyups.add_server("gamma", "127.0.0.1:3"))
      assert.equal(200, dyups.delete("gamma"))
      assert.equal(7, dyups.version())
      assert.same({ "alpha", "beta" }, dyups.list())
      assert.is_nil(dyups.get("gamma"))
      -- refused writes do not count
      assert.equal(404, dyups.delete("gamma"))
      assert.equal(400, dyups.update("gamma", ""))
      assert.equal(7, dyups.version())
    end)

    it("update with a stale expected version -> 412 and nothing changes", function()
      assert.equal(200, dyups.update("gamma", "server 127.0.0.1:1;"))
      local v = dyups.version()
      local before = snapshot()
      local status, msg = dyups.update("gamma", "server 127.0.0.1:9;", v - 1)
      assert.equal(412, status)
      assert.is_string(msg)
      assert.same(before, snapshot())
      status = dyups.update("gamma", "server 127.0.0.1:9;", v + 1)
      assert.equal(412, status)
      assert.same(before, snapshot())
      -- a new upstream is not created either
      assert.equal(412, dyups.update("delta", "server 127.0.0.1:9;", v - 1))
      assert.same(before, snapshot())

      status = dyups.update("gamma", "server 127.0.0.1:9;", v)
      assert.equal(200, status)
      assert.equal(v + 1, dyups.version())
      assert.same({ "127.0.0.1:9" }, addrs("gamma"))
    end)

    it("delete/add_server/remove_server honour the expected version", function()
      local v = dyups.version()
      local before = snapshot()
      assert.equal(412, dyups.delete("alpha", v + 5))
      local r, err, status = dyups.add_server("alpha", "127.0.0.1:7777", v + 5)
      assert.is_nil(r)
      assert.is_string(err)
      assert.equal(412, status)
      r, err, status = dyups.remove_server("alpha", "127.0.0.1:8081", v + 5)
      assert.is_nil(r)
      assert.is_string(err)
      assert.equal(412, status)
      assert.same(before, snapshot())

      assert.equal(v + 1, dyups.add_server("alpha", "127.0.0.1:7777", v))
      assert.equal(v + 2, dyups.remove_server("alpha", "127.0.0.1:8081", v + 1))
      assert.equal(200, dyups.delete("alpha", v + 2))
      assert.equal(v + 3, dyups.version())
      assert.same({ "beta" }, dyups.list())
    end)

    it("delete of an unknown upstream -> 404", function()
      local before = snapshot()
      local status, msg = dyups.delete("nope")
      assert.equal(404, status)
      assert.is_string(msg)
      assert.same(before, snapshot())
    end)
  end)

  ----------------------------------------------------------------------------
  describe("add_server / remove_server", function()
    before_each(function()
      fresh()
      assert.equal(200, dyups.update("a", "server 127.0.0.1:1;\nserver 127.0.0.1:2;"))
      assert.equal(200, dyups.update("b", "server 127.0.0.1:2;\nserver 127.0.0.1:3;"))
      assert.equal(200, dyups.update("c", "server 127.0.0.1:3;"))
    end)

    it("remove_server marks the server down in the named upstream only", function()
      local v = dyups.version()
      assert.equal(v + 1, dyups.remove_server("a", "127.0.0.1:2"))
      assert.is_true(server("a", "127.0.0.1:2").down)
      assert.is_false(server("b", "127.0.0.1:2").down)
      -- still listed (marked down, not deleted)
      assert.same({ "127.0.0.1:1", "127.0.0.1:2" }, addrs("a"))
    end)

    it("remove_server is idempotent", function()
      local v = dyups.version()
      assert.equal(v + 1, dyups.remove_server("a", "127.0.0.1:2"))
      local before = snapshot()
      assert.equal(v + 1, dyups.remove_server("a", "127.0.0.1:2"))
      assert.same(before, snapshot())
    end)

    it("remove_server without a name marks it down everywhere", function()
      local v = dyups.version()
      assert.equal(v + 1, dyups.remove_server(nil, "127.0.0.1:2"))
      assert.is_true(server("a", "127.0.0.1:2").down)
      assert.is_true(server("b", "127.0.0.1:2").down)
      assert.is_false(server("a", "127.0.0.1:1").down)
    end)

    it("refuses to take the last available server out of rotation, as a whole", function()
      local before = snapshot()
      -- c has only 127.0.0.1:3; b would keep 127.0.0.1:2, but c would have none
      local r, err, status = dyups.remove_server(nil, "127.0.0.1:3")
      assert.is_nil(r)
      assert.equal(400, status)
      assert.truthy(err:find("last available server", 1, true), err)
      assert.truthy(err:find("127.0.0.1:3", 1, true), err)
      assert.truthy(err:match("%f[%w]c%f[^%w]"), "message does not name upstream c: " .. err)
      -- b was not changed either (all or nothing)
      assert.same(before, snapshot())

      r, err, status = dyups.remove_server("c", "127.0.0.1:3")
      assert.is_nil(r)
      assert.equal(400, status)
      assert.truthy(err:find("last available server", 1, true), err)
      assert.same(before, snapshot())

      -- a down server does not count as available
      assert.truthy(dyups.remove_server("a", "127.0.0.1:2"))
      before = snapshot()
      r, err, status = dyups.remove_server("a", "127.0.0.1:1")
      assert.is_nil(r)
      assert.equal(400, status)
      assert.truthy(err:find("127.0.0.1:1", 1, true), err)
      assert.truthy(err:match("%f[%w]a%f[^%w]"), "message does not name upstream a: " .. err)
      assert.same(before, snapshot())
    end)

    it("add_server puts a down server back in rotation", function()
      local v = dyups.version()
      assert.equal(v + 1, dyups.remove_server(nil, "127.0.0.1:2"))
      assert.equal(v + 2, dyups.add_server(nil, "127.0.0.1:2"))
      assert.is_false(server("a", "127.0.0.1:2").down)
      assert.is_false(server("b", "127.0.0.1:2").down)
      -- adding a server already in rotation changes nothing
      local before = snapshot()
      assert.equal(v + 2, dyups.add_server("a", "127.0.0.1:2"))
      assert.same(before, snapshot())
    end)

    it("add_server with a name restores only that upstream", function()
      local v = dyups.version()
      assert.equal(v + 1, dyups.remove_server(nil, "127.0.0.1:2"))
      assert.equal(v + 2, dyups.add_server("b", "127.0.0.1:2"))
      assert.is_false(server("b", "127.0.0.1:2").down)
      assert.is_true(server("a", "127.0.0.1:2").down)
    end)

    it("add_server appends a new server to the named upstream", function()
      local v = dyups.version()
      assert.equal(v + 1, dyups.add_server("a", "127.0.0.1:9 weight=5 max_fails=4 fail_timeout=7s"))
      assert.same({ "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:9" }, addrs("a"))
      local s = server("a", "127.0.0.1:9")
      assert.equal(5, s.weight)
      assert.equal(4, s.max_fails)
      assert.equal(7, s.fail_timeout)
      assert.is_false(s.down)
      assert.equal("127.0.0.1", s.host)
      assert.equal(9, s.port)
      -- only there
      assert.is_nil(server("b", "127.0.0.1:9"))
      assert.is_nil(server("c", "127.0.0.1:9"))
    end)

    it("unknown server or upstream -> nil, err, 404 and nothing changes", function()
      local before = snapshot()
      local cases = {
        { dyups.add_server, nil, "127.0.0.1:99" },   -- in no upstream, no name to append to
        { dyups.add_server, "zz", "127.0.0.1:1" },   -- unknown upstream
        { dyups.remove_server, nil, "127.0.0.1:99" },
        { dyups.remove_server, "zz", "127.0.0.1:1" },
        { dyups.remove_server, "c", "127.0.0.1:1" }, -- known server, not in c
      }
      for i, case in ipairs(cases) do
        local r, err, status = case[1](case[2], case[3])
        assert.is_nil(r, "case " .. i)
        assert.is_string(err, "case " .. i)
        assert.equal(404, status, "case " .. i .. ": " .. tostring(err))
      end
      assert.same(before, snapshot())
    end)

    it("pending() is empty outside nginx (no worker registers)", function()
      assert.truthy(dyups.remove_server(nil, "127.0.0.1:2"))
      local p = dyups.pending()
      assert.is_table(p)
      assert.is_nil(next(p))
    end)
  end)

  ----------------------------------------------------------------------------
  describe("several luajit processes sharing one state file", function()
    it("this process sees a child's writes without re-init", function()
      local dir, path = fresh()
      local v0 = dyups.version()
      local r = child.run(dir, [[
        local dyups = require "ngx.dyups"
        assert(dyups.init { path = ARGS.path })
        local v_seen = dyups.version()
        assert(dyups.update("from_child", "server 127.0.0.5:5 weight=4;") == 200)
        assert(dyups.delete("beta") == 200)
        assert(dyups.remove_server("alpha", "127.0.0.1:8082"))
        return { seen = v_seen, version = dyups.version() }
      ]], { path = path })
      assert.equal(v0, r.seen)
      assert.equal(v0 + 3, r.version)
      -- no init here since
      assert.equal(v0 + 3, dyups.version())
      assert.same({ "alpha", "from_child" }, dyups.list())
      assert.is_nil(dyups.get("beta"))
      assert.same({ "127.0.0.5:5" }, addrs("from_child"))
      assert.equal(4, server("from_child", "127.0.0.5:5").weight)
      assert.is_true(server("alpha", "127.0.0.1:8082").down)
    end)

    it("a child sees this process's writes, and versions continue across processes", function()
      local dir, path = fresh()
      -- the child opens the file first, then waits while we write
      local go = dir .. "/go"
      local h = child.spawn(dir, [[
        local dyups = require "ngx.dyups"
        assert(dyups.init { path = ARGS.path })
        local before = dyups.version()
        child.wait_for_file(ARGS.go)
        local ups = {}
        for _, name in ipairs(dyups.list()) do ups[name] = dyups.get(name) end
        local v = dyups.version()
        assert(dyups.update("child_too", "server 127.0.0.7:7;") == 200)
        return { before = before, version = v, list = dyups.list(), ups = ups, after = dyups.version() }
      ]], { path = path, go = go })
      local v0 = dyups.version()
      nginx.sleep(0.05)
      assert.equal(200, dyups.update("gamma", "server 127.0.0.6:6 down;"))
      assert.equal(200, dyups.delete("alpha"))
      local expected = snapshot()
      write_file(go, "")
      local r = h:wait()
      assert.equal(v0, r.before)
      assert.equal(v0 + 2, r.version)
      assert.same({ "beta", "gamma", "child_too" }, r.list)
      assert.same(expected.upstreams, r.ups)
      assert.equal(v0 + 3, r.after)
      assert.equal(v0 + 3, dyups.version())
      assert.same({ "beta", "gamma", "child_too" }, dyups.list())
    end)

    it("a child's expected version check sees this process's writes (412)", function()
      local dir, path = fresh()
      local v0 = dyups.version()
      assert.equal(200, dyups.update("gamma", "server 127.0.0.6:6;"))
      local r = child.run(dir, [[
        local dyups = require "ngx.dyups"
        assert(dyups.init { path = ARGS.path })
        local status = dyups.update("gamma", "server 127.0.0.8:8;", ARGS.stale)
        return { status = status, version = dyups.version() }
      ]], { path = path, stale = v0 })
      assert.equal(412, r.status)
      assert.equal(v0 + 1, r.version)
      assert.same({ "127.0.0.6:6" }, addrs("gamma"))
    end)

    local function concurrent(n_children, per_child, code, extra)
      local dir = mkdtemp()
      local path = dir .. "/state"
      assert.is_true(dyups.init { path = path })
      assert.equal(200, dyups.update("shared", "server 127.0.0.1:1;"))
      local v0 = dyups.version()
      local go = dir .. "/go"
      local handles = {}
      for i = 1, n_children do
        local args = { path = path, go = go, id = i, n = per_child, base = 10000 + 1000 * i }
        for k, v in pairs(extra or {}) do args[k] = v end
        handles[i] = child.spawn(dir, code, args)
      end
      nginx.sleep(0.1)
      write_file(go, "")
      local results = {}
      for i, h in ipairs(handles) do results[i] = h:wait() end
      return v0, results
    end

    it("concurrent add_server from 3 processes: no lost update", function()
      local N, K = 100, 3
      local v0, results = concurrent(K, N, [[
        local dyups = require "ngx.dyups"
        assert(dyups.init { path = ARGS.path, lock_timeout = 10 })
        child.wait_for_file(ARGS.go, 10, true)
        local fails, versions = {}, {}
        for j = 1, ARGS.n do
          local v, err, status = dyups.add_server("shared", "127.0.0.1:" .. (ARGS.base + j))
          if v then versions[#versions + 1] = v
          else fails[#fails + 1] = tostring(status) .. " " .. tostring(err) end
          if j % 10 == 0 then child.sleep_ms(1) end -- let the others in
        end
        return { fails = fails, versions = versions }
      ]])
      local all_versions = {}
      for i, r in ipairs(results) do
        assert.same({}, r.fails, "child " .. i .. " had failures")
        assert.equal(N, #r.versions)
        for _, v in ipairs(r.versions) do
          -- every successful add_server published a version of its own
          assert.is_nil(all_versions[v], "version " .. v .. " returned twice")
          all_versions[v] = true
        end
      end
      for v = v0 + 1, v0 + K * N do
        assert.truthy(all_versions[v], "no writer got version " .. v)
      end
      -- the writers really interleaved (else this proves little): some
      -- child's versions are not one contiguous run
      local interleaved = 0
      for _, r in ipairs(results) do
        for j = 2, #r.versions do
          if r.versions[j] ~= r.versions[j - 1] + 1 then interleaved = interleaved + 1 end
        end
      end
      assert.truthy(interleaved > 0, "the children ran one after another")
      assert.equal(v0 + K * N, dyups.version())
      local have = {}
      for _, a in ipairs(addrs("shared")) do have[a] = (have[a] or 0) + 1 end
      assert.equal(1 + K * N, #addrs("shared"))
      for i = 1, K do
        for j = 1, N do
          local a = "127.0.0.1:" .. (10000 + 1000 * i + j)
          assert.equal(1, have[a], a .. " missing or duplicated")
        end
      end
    end)

    it("concurrent updates of distinct upstreams from 3 processes: no lost update", function()
      local N, K = 100, 3
      local v0, results = concurrent(K, N, [[
        local dyups = require "ngx.dyups"
        assert(dyups.init { path = ARGS.path, lock_timeout = 10 })
        child.wait_for_file(ARGS.go, 10, true)
        local fails = {}
        for j = 1, ARGS.n do
          local status, msg = dyups.update(("c%d_u%d"):format(ARGS.id, j),
            ("server 127.0.0.%d:%d weight=%d;"):format(ARGS.id, ARGS.base + j, j % 10 + 1))
          if status ~= 200 then fails[#fails + 1] = tostring(status) .. " " .. tostring(msg) end
          if j % 10 == 0 then child.sleep_ms(1) end
        end
        return { fails = fails, version = dyups.version() }
      ]])
      for i, r in ipairs(results) do
        assert.same({}, r.fails, "child " .. i .. " had failures")
        assert.truthy(r.version >= v0 + N)
      end
      assert.equal(v0 + K * N, dyups.version())
      local names = dyups.list()
      assert.equal(1 + K * N, #names)
      for i = 1, K do
        for j = 1, N do
          local name = ("c%d_u%d"):format(i, j)
          local u = dyups.get(name)
          assert.truthy(u, name .. " missing")
          assert.same({ ("127.0.0.%d:%d"):format(i, 10000 + 1000 * i + j) }, addrs(name))
          assert.equal(j % 10 + 1, u.servers[1].weight)
        end
      end
    end)

    it("concurrent writers with expected versions: exactly the winners' writes land", function()
      local N, K = 50, 3
      local v0, results = concurrent(K, N, [[
        local dyups = require "ngx.dyups"
        assert(dyups.init { path = ARGS.path, lock_timeout = 10 })
        child.wait_for_file(ARGS.go, 10, true)
        local won, lost, other = {}, 0, {}
        for j = 1, ARGS.n do
          local v = dyups.version()
          local status, msg = dyups.update(("c%d_u%d"):format(ARGS.id, j),
            ("server 127.0.0.%d:%d;"):format(ARGS.id, ARGS.base + j), v)
          if status == 200 then won[#won + 1] = j
          elseif status == 412 then lost = lost + 1
          else other[#other + 1] = tostring(status) .. " " .. tostring(msg) end
        end
        return { won = won, lost = lost, other = other }
      ]])
      local total = 0
      for i, r in ipairs(results) do
        assert.same({}, r.other, "child " .. i .. " had unexpected answers")
        assert.equal(N, #r.won + r.lost)
        total = total + #r.won
        local won = {}
        for _, j in ipairs(r.won) do won[j] = true end
        for j = 1, N do
          local name = ("c%d_u%d"):format(i, j)
          if won[j] then
            assert.truthy(dyups.get(name), name .. " won but is missing")
          else
            assert.is_nil(dyups.get(name), name .. " lost (412) but is present")
          end
        end
      end
      assert.equal(v0 + total, dyups.version())
      assert.equal(1 + total, #dyups.list())
    end)
  end)
end)
