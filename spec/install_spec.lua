-- make install / make uninstall, into a DESTDIR:
--   * LAYOUT=debian puts the module and the shims in the directories on the
--     default package.cpath and package.path of Debian's nginx lua module
--     (checked against that nginx), and an nginx using them there works;
--     the tool in /usr/local/bin;
--   * LAYOUT=openresty puts both in $(PREFIX)/lualib and the tool in
--     $(PREFIX)/bin, and is the default where $(PREFIX)/lualib exists;
--   * uninstall removes exactly what install put there.
local nginx = require "spec.helpers.nginx"
local dy = require "spec.helpers.dyups"
local T = require "spec.helpers.traffic"

local q = nginx.shell_quote
local REPO = nginx.REPO
local SHIMS = { "check_status.lua", "dashboard.lua", "dyups_api.lua", "log.lua", "metrics.lua", "srvcheck.lua",
  "upsops.lua", "upstream.lua" }

-- A fresh directory nginx's workers (`nobody` when the tests run as root)
-- can read.
local function mktemp()
  local p = io.popen("mktemp -d /tmp/ngx-dyups-install.XXXXXX")
  local dir = p:read("*l")
  p:close()
  assert(nginx.execute("chmod 755 " .. q(dir)))
  return dir
end

local function make(args)
  local out = os.tmpname()
  local ok = nginx.execute("cd " .. q(REPO) .. " && make -s " .. args .. " >" .. q(out) .. " 2>&1")
  local said = nginx.read_file(out) or ""
  os.remove(out)
  assert(ok, "make " .. args .. ":\n" .. said)
  return said
end

local function by_path(list)
  table.sort(list, function(a, b) return a:sub(5) < b:sub(5) end)
  return list
end

-- "MODE PATH" of every file under `dir`, relative to it, sorted by path.
local function files(dir)
  local p = io.popen("cd " .. q(dir) .. " && find . -type f -printf '%m %P\\n'")
  local out = {}
  for line in p:lines() do out[#out + 1] = line end
  p:close()
  return by_path(out)
end

local function expected(lib, share, bin)
  local out = { "755 " .. lib .. "/ngx/dyups.so", "755 " .. bin .. "/dyups" }
  for _, name in ipairs(SHIMS) do out[#out + 1] = "644 " .. share .. "/ngx/dyups/" .. name end
  return by_path(out)
end

describe("make install", function()
  local dirs = {}
  local function tmp()
    local d = mktemp()
    dirs[#dirs + 1] = d
    return d
  end

  lazy_teardown(function()
    nginx.stop_all()
    for _, d in ipairs(dirs) do
      if d:match("^/tmp/ngx%-dyups%-install%.%w+$") then nginx.execute("rm -rf " .. q(d)) end
    end
  end)

  it("LAYOUT=debian: the directories on Debian nginx's default Lua paths, and uninstall removes it all", function()
    local dest = tmp()
    -- Another module's file, there before: uninstall leaves it.
    assert(nginx.execute("mkdir -p " .. q(dest .. "/usr/local/share/lua/5.1/ngx")))
    nginx.write_file(dest .. "/usr/local/share/lua/5.1/ngx/other.lua", "return 1\n")
    local said = make("install LAYOUT=debian DESTDIR=" .. q(dest))
    local want = expected("usr/local/lib/lua/5.1", "usr/local/share/lua/5.1", "usr/local/bin")
    table.insert(want, "644 usr/local/share/lua/5.1/ngx/other.lua")
    assert.same(by_path(want), files(dest))
    -- It says what to put in nginx.conf.
    assert.truthy(said:find("balancer_by_lua_file /usr/local/share/lua/5.1/ngx/dyups/upstream.lua;", 1, true), said)

    make("uninstall LAYOUT=debian DESTDIR=" .. q(dest))
    assert.same({ "644 usr/local/share/lua/5.1/ngx/other.lua" }, files(dest))
    assert.is_nil(io.open(dest .. "/usr/local/share/lua/5.1/ngx/dyups"), "the shims' directory is left")
    assert.is_nil(io.open(dest .. "/usr/local/lib/lua/5.1/ngx"), "ngx/ of the module is left, empty")
  end)

  it("LAYOUT=debian: nginx's Lua looks there by default, and an nginx using the installed files routes and answers /ups", function()
    -- What Debian's nginx lua module searches with no lua_package_* set.
    local bare = nginx.new {
      workers = 1,
      conf = [[
http {
    server {
        listen 127.0.0.1:${port_http};
        location / { content_by_lua_block { ngx.say(package.cpath) ngx.say(package.path) } }
    }
}
]],
    }
    bare:start()
    local status, body = nginx.http(bare.ports.http, "GET", "/")
    assert.equal(200, status, body)
    assert.truthy(body:find("/usr/local/lib/lua/5.1/?.so;", 1, true), body)
    assert.truthy(body:find("/usr/local/share/lua/5.1/?.lua;", 1, true), body)
    bare:stop()

    -- The same files in a DESTDIR, named there in nginx.conf as they would
    -- be in /usr/local.
    local dest = tmp()
    make("install LAYOUT=debian DESTDIR=" .. q(dest))
    local B = select(2, dy.backends(1))[1]
    local shims = dest .. "/usr/local/share/lua/5.1/ngx/dyups"
    local inst = nginx.new {
      workers = 2,
      conf = [[
http {
    lua_package_cpath "${dest}/usr/local/lib/lua/5.1/?.so;;";
    map $proxy_host $dyups_upstream { default $proxy_host; }
    init_by_lua_block {
        assert(require("ngx.dyups").init{ path = "state/dyups.state", upstreams = "conf/upstream.conf" })
    }
    init_worker_by_lua_block { assert(require("ngx.dyups").init_worker()) }
    upstream local {
        server 0.0.0.1;
        balancer_by_lua_file ${shims}/upstream.lua;
    }
    server {
        listen 127.0.0.1:${port_proxy};
        location /local { proxy_pass http://local; log_by_lua_file ${shims}/log.lua; }
        location = /ups { content_by_lua_file ${shims}/upsops.lua; }
        location = /ups/check { content_by_lua_file ${shims}/srvcheck.lua; }
        location / { content_by_lua_file ${shims}/dyups_api.lua; }
    }
}
]],
      vars = { dest = dest, shims = shims },
    }
    nginx.write_file(inst.prefix .. "/conf/upstream.conf", ("upstream local { server 127.0.0.1:%d; }\n"):format(B))
    inst:start()
    local got = { T.get(inst, "/local") } -- status, port, worker, body
    assert.equal(200, got[1], got[4])
    assert.equal(B, got[2])
    status, body = nginx.http(inst.ports.proxy, "PUT", "/ups?op=add&upstream=local&server=127.0.0.1:1")
    assert.equal(200, status, body)
    status, body = nginx.http(inst.ports.proxy, "GET", "/ups/check")
    assert.equal(200, status, body)
    status, body = nginx.http(inst.ports.proxy, "GET", "/upstream/local")
    assert.equal(200, status, body)
    assert.equal(("server 127.0.0.1:%d\nserver 127.0.0.1:1\n"):format(B), body)
    inst:stop()
  end)

  it("LAYOUT=openresty: both in PREFIX/lualib, the default where it exists; uninstall leaves lua-resty-core's ngx/", function()
    local root = tmp()
    local prefix = root .. "/openresty"
    -- OpenResty's lualib/ngx holds lua-resty-core's modules.
    assert(nginx.execute("mkdir -p " .. q(prefix .. "/lualib/ngx")))
    nginx.write_file(prefix .. "/lualib/ngx/balancer.lua", "return {}\n")
    local dest = root .. "/dest"
    local said = make("install PREFIX=" .. q(prefix) .. " DESTDIR=" .. q(dest))
    assert.truthy(said:find("installed for openresty", 1, true), said)
    local lualib = prefix:sub(2) .. "/lualib"
    assert.same(expected(lualib, lualib, prefix:sub(2) .. "/bin"), files(dest))
    -- Uninstall, with lua-resty-core's file where install put ours.
    nginx.write_file(dest .. prefix .. "/lualib/ngx/balancer.lua", "return {}\n")
    make("uninstall PREFIX=" .. q(prefix) .. " DESTDIR=" .. q(dest))
    assert.same({ "644 " .. lualib .. "/ngx/balancer.lua" }, files(dest))
    -- Without PREFIX/lualib, the default is Debian's layout.
    said = make("install PREFIX=" .. q(root .. "/none") .. " DESTDIR=" .. q(root .. "/dest2"))
    assert.truthy(said:find("installed for debian", 1, true), said)
    assert.same(expected("usr/local/lib/lua/5.1", "usr/local/share/lua/5.1", "usr/local/bin"), files(root .. "/dest2"))
  end)
end)
