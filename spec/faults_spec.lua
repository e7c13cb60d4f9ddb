-- Faults under a running nginx: the state file deleted, cut short,
-- overwritten, its header or active slot wrecked, made read-only, the disk full, nginx reloaded in the middle of
-- a stream of updates. For each: what clients see, what the error log says,
-- and that no acknowledged update is lost.
local nginx = require "spec.helpers.nginx"
local dy = require "spec.helpers.dyups"
local T = require "spec.helpers.traffic"

local function version(inst)
  return tonumber(dy.run(inst, [[return (require("ngx.dyups").version())]]))
end

local function detail(inst)
  local status, body = nginx.http(inst.ports.api, "GET", "/detail")
  assert.equal(200, status)
  return body
end

--- Every one of n requests to /local answers 200 from a real backend.
local function serves(inst, ports, n)
  local allowed = {}
  for _, p in ipairs(ports) do allowed[p] = true end
  for i = 1, n or 20 do
    local status, port = T.get(inst, "/local")
    assert.equal(200, status, "request " .. i)
    assert.truthy(allowed[port], "request " .. i .. " reached " .. tostring(port))
  end
end

local function no_crash(inst, pids)
  assert.same(pids, inst:worker_pids())
  assert.falsy(inst:error_log():find("exited on signal", 1, true))
end

describe("faults under a running nginx:", function()
  local ports

  lazy_setup(function()
    -- The backends run until stop_all() below.
    ports = select(2, dy.backends(2))
  end)

  lazy_teardown(function()
    nginx.stop_all()
  end)

  local function start()
    local inst = dy.proxy {
      upstreams = ("upstream local { server 127.0.0.1:%d; server 127.0.0.1:%d; }"):format(ports[1], ports[2]),
    }
    inst:start()
    -- An acknowledged change the faults below must not lose.
    local status = nginx.http(inst.ports.api, "POST", "/upstream/dyhost",
                              { body = ("server 127.0.0.1:%d;"):format(ports[2]) })
    assert.equal(200, status)
    return inst, inst.prefix .. "/state/dyups.state"
  end

  local damages = {
    { "deleted", "was deleted; restored it", function(path) assert(os.remove(path)) end },
    { "cut to 0 bytes", "is damaged", function(path)
        assert(nginx.execute("truncate -s 0 " .. path))
      end },
    { "cut to 6000 bytes", "is damaged", function(path)
        assert(nginx.execute("truncate -s 6000 " .. path))
      end },
    { "overwritten with garbage", "its table is unreadable", function(path)
        local size = #assert(nginx.read_file(path))
        -- Keep the header, wreck both table slots in place (same inode).
        assert(nginx.execute(("dd if=/dev/urandom of=%s bs=4096 seek=1 count=%d conv=notrunc 2>/dev/null")
          :format(path, math.floor(size / 4096) - 1)))
      end },
    { "header wrecked", "its header is damaged", function(path)
        -- Magic, geometry, commit word and worker table: the whole first block.
        assert(nginx.execute(("dd if=/dev/urandom of=%s bs=4096 count=1 conv=notrunc 2>/dev/null"):format(path)))
      end },
    { "active slot wrecked", "is unreadable", function(path)
        -- The slot the commit word names holds the last write (dyhost).
        local bytes = assert(nginx.read_file(path))
        local slot_len = 0
        for i = 24, 17, -1 do slot_len = slot_len * 256 + bytes:byte(i) end
        local active = bytes:byte(65) % 2
        local payload = 4096 + active * slot_len + 32
        assert(nginx.execute(("dd if=/dev/urandom of=%s bs=1 seek=%d count=16 conv=notrunc 2>/dev/null")
          :format(path, payload + 8)))
      end },
  }

  for _, d in ipairs(damages) do
    local what, logged, damage = d[1], d[2], d[3]
    it("state file " .. what .. ": traffic goes on, the file is restored with every change, writes go on", function()
      local inst, path = start()
      local pids = inst:worker_pids()
      local before = detail(inst)
      local v = version(inst)
      damage(path)
      serves(inst, ports, 30)
      nginx.wait_until(function()
        local snap = nginx.read_file(path)
        return snap and #snap > 8192 and inst:error_log():find("now routing by the file there", 1, true)
      end, 5, "the state file restored")
      local log = inst:error_log()
      assert.truthy(log:find(logged, 1, true), log)
      assert.truthy(log:find("; restored it from ", 1, true), log)
      no_crash(inst, pids)
      assert.equal(before, detail(inst))
      assert.is_true(version(inst) > v)
      -- Writes work, go to the new file, and survive a restart.
      assert.equal(200, (nginx.http(inst.ports.api, "DELETE", "/upstream/dyhost")))
      serves(inst, ports, 10)
      inst:stop()
      inst:start()
      local status = nginx.http(inst.ports.api, "GET", "/upstream/dyhost")
      assert.equal(404, status)
      -- /detail without dyhost's block (its name, one server, a blank line)
      assert.equal((before:gsub("dyhost\n[^\n]*\n\n$", "")), detail(inst))
      inst:stop()
    end)
  end

  it("state file made read-only: writes go on (the file is open), and the next start still works", function()
    local inst, path = start()
    assert(nginx.execute("chmod 0444 " .. path))
    local status = nginx.http(inst.ports.api, "POST", "/upstream/ro", { body = "server 127.0.0.1:1;" })
    assert.equal(200, status)
    inst:stop()
    inst:start()
    assert.equal(200, (nginx.http(inst.ports.api, "GET", "/upstream/ro")))
    assert.equal(200, (nginx.http(inst.ports.api, "DELETE", "/upstream/ro")))
    inst:stop()
  end)

  it("disk full: writes to the state file go on; the write-back fails, told in the answer, the status and the log", function()
    local inst = dy.proxy {
      upstreams = ("upstream local { server 127.0.0.1:%d; }"):format(ports[1]),
      init = [[size = 16384, write_upstreams = "state/upstream.conf",]],
    }
    local state = inst.prefix .. "/state"
    assert(nginx.execute("mkdir -p " .. state .. " && mount -t tmpfs -o size=128k tmpfs " .. state))
    finally(function() nginx.execute("umount -l " .. state) end)
    inst:start()
    local status, _, h = nginx.http(inst.ports.api, "POST", "/upstream/a", { body = "server 127.0.0.1:2;" })
    assert.equal(200, status)
    assert.equal("ok", h["x-dyups-write-back"])
    assert.truthy(nginx.read_file(state .. "/upstream.conf"):find("upstream a {", 1, true))
    local status_code = [[
      local s = assert(require("ngx.dyups").write_back_status())
      return s.version .. " " .. tostring(s.written) .. " " .. (s.error or "ok")
    ]]
    assert.equal(version(inst) .. " " .. version(inst) .. " ok", dy.run(inst, status_code))
    -- Fill the disk.
    nginx.execute("dd if=/dev/zero of=" .. state .. "/filler bs=4k count=64 2>/dev/null")
    status, _, h = nginx.http(inst.ports.api, "POST", "/upstream/b", { body = "server 127.0.0.1:3;" })
    assert.equal(200, status)
    assert.truthy((h["x-dyups-write-back"] or ""):find("No space left on device", 1, true), h["x-dyups-write-back"])
    assert.equal(200, (nginx.http(inst.ports.api, "GET", "/upstream/b")))
    -- Whichever worker answers: the file is one version behind, and why.
    for _ = 1, 4 do
      local v = version(inst)
      local said = dy.run(inst, status_code)
      assert.equal(v .. " " .. (v - 1) .. " ", said:sub(1, #tostring(v) + #tostring(v - 1) + 2), said)
      assert.truthy(said:find("upstream file", 1, true), said)
    end
    serves(inst, { ports[1] }, 10)
    nginx.wait_until(function()
      return inst:error_log():find("could not write upstream file", 1, true)
    end, 3, "the write-back failure logged")
    assert.truthy(inst:error_log():find("No space left on device", 1, true))
    -- Space again: the next change writes the file back whole.
    assert(os.remove(state .. "/filler"))
    status, _, h = nginx.http(inst.ports.api, "DELETE", "/upstream/a")
    assert.equal(200, status)
    assert.equal("ok", h["x-dyups-write-back"])
    assert.equal(version(inst) .. " " .. version(inst) .. " ok", dy.run(inst, status_code))
    local back = nginx.read_file(state .. "/upstream.conf")
    assert.truthy(back:find("upstream b {", 1, true))
    assert.falsy(back:find("upstream a {", 1, true))
    inst:stop()
  end)

  it("nginx -s reload twice during a stream of updates: every acknowledged update is kept", function()
    local inst = start()
    local acknowledged = {}
    local reloads = 0
    for i = 1, 120 do
      local addr = ("127.0.0.1:%d"):format(20000 + i)
      local status = nginx.http(inst.ports.api, "POST", "/upstream/stream/servers", { body = addr })
      if status == 404 then
        status = nginx.http(inst.ports.api, "POST", "/upstream/stream", { body = "server " .. addr .. ";" })
      end
      if status == 200 then acknowledged[#acknowledged + 1] = addr end
      if i == 40 or i == 80 then
        inst:reload { wait_old = false }
        reloads = reloads + 1
      end
    end
    assert.equal(2, reloads)
    assert.is_true(#acknowledged >= 100, "only " .. #acknowledged .. " of 120 acknowledged")
    inst:reload()
    local _, body = nginx.http(inst.ports.api, "GET", "/upstream/stream")
    for _, addr in ipairs(acknowledged) do
      assert.truthy(body:find("server " .. addr .. "\n", 1, true), addr .. " lost")
    end
    inst:stop()
  end)
end)
