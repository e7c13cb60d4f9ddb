-- Files and users, against a real nginx started as root:
--   * every file and directory ngx.dyups makes has an explicit mode (0644,
--     0755) whatever the umask: a daemonized nginx runs with umask 0, and a
--     state file or upstream file others may write lets them rewrite routing;
--   * nginx's workers can open the state file whatever nginx.conf's `user`
--     (init finds it; its `user` option still overrides, and a wrong one is
--     named in the workers' error);
--   * a write whose write-back of the upstream file fails answers 200 (the
--     change is made) and says so in a header and in write_back_status().
local nginx = require "spec.helpers.nginx"
local dy = require "spec.helpers.dyups"
local T = require "spec.helpers.traffic"

--- "644 www-data" for the file at `path`, nil when there is none.
local function stat(path)
  local p = io.popen("stat -c '%a %U' " .. nginx.shell_quote(path) .. " 2>/dev/null")
  local out = p:read("*l")
  p:close()
  return out
end

local function umask_of(pid)
  return (nginx.read_file("/proc/" .. pid .. "/status") or ""):match("Umask:%s*(%d+)")
end

local function uid_of(pid)
  return tonumber((nginx.read_file("/proc/" .. pid .. "/status") or ""):match("Uid:%s*(%d+)"))
end

local function uid_of_user(name)
  local p = io.popen("id -u " .. nginx.shell_quote(name))
  local uid = tonumber(p:read("*l"))
  p:close()
  return uid
end

local function leftovers(dir)
  local p = io.popen("ls -A " .. nginx.shell_quote(dir))
  local found = {}
  for name in p:lines() do
    if name:match("%.tmp$") then found[#found + 1] = name end
  end
  p:close()
  return found
end

describe("files and users:", function()
  local B

  lazy_setup(function()
    B = select(2, dy.backends(1))[1]
  end)

  lazy_teardown(function()
    nginx.stop_all()
  end)

  local function seed() return ("upstream local { server 127.0.0.1:%d; }\n"):format(B) end

  it("under umask 0 every file and directory ngx.dyups makes is 0644 or 0755", function()
    local inst = dy.proxy {
      umask = "000",
      upstreams = seed(),
      init = [[path = "state/a/b/dyups.state", write_upstreams = "state/w/upstream.conf",]],
    }
    inst:start()
    local p = inst.prefix
    -- The conditions of the test: nginx's master under umask 0, and its
    -- workers too (nginx sets 0 when it daemonizes).
    assert.equal("0000", umask_of(inst:master_pid()))
    for _, pid in ipairs(inst:worker_pids()) do assert.equal("0000", umask_of(pid)) end

    -- Made by the master: the directories the workers write in are theirs.
    for _, dir in ipairs { "state", "state/a" } do
      assert.equal("755 root", stat(p .. "/" .. dir), dir)
    end
    for _, dir in ipairs { "state/a/b", "state/w" } do
      assert.equal("755 nobody", stat(p .. "/" .. dir), dir)
    end
    assert.equal("644 nobody", stat(p .. "/state/a/b/dyups.state"))
    -- The upstream file as last read, for the next reload.
    assert.equal("644 nobody", stat(p .. "/state/a/b/dyups.state.seed"))

    -- Made by a worker: the write-back, write_upstreams(), a restored state file.
    local status, body, h = nginx.http(inst.ports.api, "POST", "/upstream/x", { body = "server 127.0.0.1:1;" })
    assert.equal(200, status, body)
    assert.equal("ok", h["x-dyups-write-back"])
    assert.equal("644 nobody", stat(p .. "/state/w/upstream.conf"))
    assert.equal("true", dy.run(inst, [[return (require("ngx.dyups").write_upstreams("state/w/out.conf"))]]))
    assert.equal("644 nobody", stat(p .. "/state/w/out.conf"))
    assert(os.remove(p .. "/state/a/b/dyups.state"))
    nginx.wait_until(function()
      return inst:error_log():find("now routing by the file there", 1, true)
    end, 5, "the state file restored")
    assert.equal("644 nobody", stat(p .. "/state/a/b/dyups.state"))
    assert.same({}, leftovers(p .. "/state/w"))
    assert.same({}, leftovers(p .. "/state/a/b"))
    inst:stop()
  end)

  -- Debian has no group `nobody`: nginx needs it named.
  for _, directive in ipairs { "www-data", "nobody nogroup" } do
    local user = directive:match("^%S+")
    it("nginx as root with `user " .. directive .. ";` and no user option: requests route, writes work, also after a reload", function()
      local inst = dy.proxy { user = directive, upstreams = seed() }
      inst:start()
      local uid = uid_of_user(user)
      for _, pid in ipairs(inst:worker_pids()) do assert.equal(uid, uid_of(pid)) end
      assert.equal("644 " .. user, stat(inst.prefix .. "/state/dyups.state"))
      assert.equal("755 " .. user, stat(inst.prefix .. "/state"))
      -- init_by_lua logs to nginx's output before the error log is open.
      local said = nginx.read_file(inst.prefix .. "/logs/nginx.out") or ""
      assert.truthy(said:find("is for user " .. user .. " (the `user` directive of "
        .. inst.prefix .. "/conf/nginx.conf)", 1, true), said)
      local writes = 0
      local function works(what)
        writes = writes + 1
        for i = 1, 6 do
          local status, port = T.get(inst, "/local")
          assert.equal(200, status, what .. ": request " .. i)
          assert.equal(B, port, what .. ": request " .. i)
        end
        local status, body = nginx.http(inst.ports.api, "POST", "/upstream/w" .. writes, { body = "server 127.0.0.1:1;" })
        assert.equal(200, status, what .. ": " .. tostring(body))
        status, body = nginx.http(inst.ports.proxy, "PUT", "/ups?op=add&server=127.0.0.1:2&upstream=local")
        assert.equal(200, status, what .. ": " .. tostring(body))
        status, body = nginx.http(inst.ports.proxy, "PUT", "/ups?op=del&server=127.0.0.1:2&upstream=local")
        assert.equal(200, status, what .. ": " .. tostring(body))
      end
      works("after start")
      -- A reload runs init again in the master, whose process title now
      -- stands where its arguments were.
      inst:reload()
      works("after a reload")
      assert.equal("644 " .. user, stat(inst.prefix .. "/state/dyups.state"))
      inst:stop()
    end)
  end

  it("init's user option overrides nginx.conf's; a wrong one is named in the workers' error", function()
    local inst = dy.proxy { user = "www-data", upstreams = seed(), init = [[user = "nobody",]] }
    inst:start()
    assert.equal("644 nobody", stat(inst.prefix .. "/state/dyups.state"))
    nginx.wait_until(function()
      return inst:error_log():find("dyups init_worker:", 1, true)
    end, 5, "the workers' init_worker error")
    local log = inst:error_log()
    assert.truthy(log:find("gave it to user nobody (init's user option), but this worker runs as uid "
      .. uid_of_user("www-data"), 1, true), log)
    assert.truthy(log:find('set dyups.init{ user = "..." }', 1, true), log)
    local status, body = nginx.http(inst.ports.proxy, "PUT", "/ups?op=add&server=127.0.0.1:2&upstream=local")
    assert.equal(500, status, body)
    assert.truthy(body:find("dyups.init{ user", 1, true), body)
    inst:stop()
  end)

  it("a write-back that fails (a root-owned conf/): 200, the change made, the failure in a header and in write_back_status()", function()
    local inst = dy.proxy { upstreams = seed(), init = [[write_upstreams = true,]] }
    inst:start()
    local before = nginx.read_file(inst.prefix .. "/conf/upstream.conf")
    local status, body, h = nginx.http(inst.ports.api, "POST", "/upstream/made", { body = "server 127.0.0.1:1;" })
    assert.equal(200, status, body)
    assert.equal("success", body)
    local header = h["x-dyups-write-back"] or ""
    local prefix = "failed: could not write upstream file " .. inst.prefix .. "/conf/upstream.conf"
    assert.equal(prefix, header:sub(1, #prefix))
    assert.truthy(header:find("Permission denied", 1, true), header)
    assert.equal(200, (nginx.http(inst.ports.api, "GET", "/upstream/made")))
    assert.equal(before, nginx.read_file(inst.prefix .. "/conf/upstream.conf"))
    -- /ups says it the same way.
    status, body, h = nginx.http(inst.ports.proxy, "PUT", "/ups?op=add&server=127.0.0.1:2&upstream=local")
    assert.equal(200, status, body)
    assert.truthy((h["x-dyups-write-back"] or ""):find("^failed: "), h["x-dyups-write-back"])
    -- Every worker reports it, the one that failed and the other.
    local code = [[
      local s = assert(require("ngx.dyups").write_back_status())
      return table.concat({ s.path, s.version, tostring(s.written), s.error or "no error" }, "|")
    ]]
    for _ = 1, 6 do
      local path, version, written, err = dy.run(inst, code):match("^(.-)|(%d+)|(.-)|(.*)$")
      assert.equal(inst.prefix .. "/conf/upstream.conf", path)
      assert.equal(3, tonumber(version))
      assert.equal("nil", written)
      assert.truthy(err:find("upstream file", 1, true), err)
    end
    inst:stop()
  end)
end)
