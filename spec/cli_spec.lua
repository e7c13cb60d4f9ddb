-- bin/dyups against the state file of a running nginx (two workers): each
-- command's effect checked through nginx itself, and every refusal
-- checked to change nothing nginx serves.
local nginx = require "spec.helpers.nginx"
local dy = require "spec.helpers.dyups"
local T = require "spec.helpers.traffic"

local BIN = nginx.REPO .. "/bin/dyups"
local q = nginx.shell_quote

--- Runs bin/dyups with `args` (and `input` on stdin): exit code, stdout,
--- stderr.
local function dyups(args, input)
  local out, err, inp = os.tmpname(), os.tmpname(), os.tmpname()
  nginx.write_file(inp, input or "")
  local cmd = { q(BIN) }
  for _, a in ipairs(args) do cmd[#cmd + 1] = q(a) end
  local _, code = nginx.execute(table.concat(cmd, " ") .. " <" .. q(inp) .. " >" .. q(out) .. " 2>" .. q(err))
  local o, e = nginx.read_file(out), nginx.read_file(err)
  os.remove(out)
  os.remove(err)
  os.remove(inp)
  return code, o, e
end

--- `dyups inspect --json`: exit code and the report.
local function inspect(state)
  local code, out, err = dyups { "inspect", "--state", state, "--json" }
  return code, T.json_decode(out), err
end

--- The applied generation of each live registered worker, by pid.
local function applied(report)
  local out = {}
  for _, w in ipairs(report.workers) do
    if w.alive then out[w.pid] = w.applied end
  end
  return out
end

--- Waits until every worker of `inst` is registered in the state file and
--- has applied `generation` (or later).
local function converged(inst, state, generation)
  local pids = inst:worker_pids()
  assert.equal(2, #pids)
  return nginx.wait_until(function()
    local _, r = inspect(state)
    local by_pid = applied(r)
    for _, pid in ipairs(pids) do
      if not by_pid[pid] or by_pid[pid] < generation then return false end
    end
    return r
  end, 5, "both workers at generation " .. generation)
end

local function api(inst, method, path, body)
  return nginx.http(inst.ports.api, method, path, { body = body })
end

--- The owner uid of a file.
local function uid_of(path)
  local p = assert(io.popen("stat -c %u " .. q(path)))
  local uid = tonumber(p:read("*l"))
  p:close()
  return uid
end

local function dump_json(state)
  local code, out, err = dyups { "dump", "--state", state, "--json" }
  assert.equal(0, code, err)
  return T.json_decode(out)
end

--- Every one of `n` requests for Host `host` answers 200 from `port`; both
--- workers answer some of them.
local function routes_to(inst, host, port, n)
  local pids = {}
  nginx.wait_until(function()
    local status, p, pid = T.get(inst, "/", { Host = host })
    assert.equal(200, status)
    assert.equal(port, p)
    pids[pid] = true
    return #T.keys(pids) == 2
  end, 5, "both workers answering for " .. host)
  for i = 1, n or 20 do
    local status, p = T.get(inst, "/", { Host = host })
    assert.equal(200, status, "request " .. i)
    assert.equal(port, p, "request " .. i)
  end
end

describe("dyups against a running nginx:", function()
  local inst, state, ports, dir

  lazy_setup(function()
    ports = select(2, dy.backends(2))
    inst = dy.proxy { upstreams = dy.upstream("local", { dy.addr(ports[1]) }) }
    inst:start()
    state = inst.prefix .. "/state/dyups.state"
    dir = inst.prefix .. "/conf"
  end)

  lazy_teardown(function()
    nginx.stop_all()
  end)

  it("inspect: sound, both workers with the generation each applied", function()
    local r = converged(inst, state, 1)
    local code, report, err = inspect(state)
    assert.equal(0, code, err)
    assert.is_true(report.sound)
    assert.equal(T.NULL, report.damage)
    assert.equal(1, report.commit.generation)
    assert.same(applied(r), applied(report))
    local code2, text = dyups { "inspect", "--state", state }
    assert.equal(0, code2)
    assert.truthy(text:find("state file " .. state .. ": sound", 1, true), text)
    for _, pid in ipairs(inst:worker_pids()) do
      assert.truthy(text:find(("pid %d: applied generation 1\n"):format(pid), 1, true), text)
    end
    assert.truthy(text:find("workers: 2 live", 1, true), text)
  end)

  it("apply: a new upstream as one write, routed by both workers within a bounded wait", function()
    local before = dump_json(state).version
    local file = dir .. "/new.conf"
    nginx.write_file(file, dy.upstream("cli_new", { dy.addr(ports[2]) }) .. dy.upstream("cli_two", { dy.addr(ports[1]) }))
    local code, out, err = dyups { "apply", "--state", state, file }
    assert.equal(0, code, err)
    local v = before + 1
    assert.equal(("state file %s: version %d (created cli_new, cli_two)\n"):format(state, v), out)
    routes_to(inst, "cli_new", ports[2])
    routes_to(inst, "cli_two", ports[1])
    converged(inst, state, v)
    -- The copy this root writer made goes to the workers' user, so
    -- nginx's own writes keep it up to date.
    assert.equal(uid_of(state), uid_of(state .. ".copy"))
    assert.equal(200, (api(inst, "POST", "/upstream/cli_rest", "server 127.0.0.1:1;")))
    local _, r = inspect(state)
    assert.equal(v + 1, r.commit.generation)
    assert.equal(v + 1, r.copy.newest)
    assert.equal(0, (dyups { "delete", "--state", state, "cli_rest" }))
  end)

  it("apply --if-version with a stale version: exit 5, nothing changed", function()
    local before = dump_json(state)
    local file = dir .. "/stale.conf"
    nginx.write_file(file, dy.upstream("cli_stale", { dy.addr(ports[1]) }))
    local code, out, err = dyups { "apply", "--state", state, "--if-version", tostring(before.version - 1), file }
    assert.equal(5, code)
    assert.equal("", out)
    assert.truthy(err:find(("table version is %d, not the expected %d"):format(before.version, before.version - 1), 1, true), err)
    assert.same(before, dump_json(state))
    assert.equal(404, (api(inst, "GET", "/upstream/cli_stale")))
    -- The current version is taken.
    code, out, err = dyups { "apply", "--state", state, "--if-version", tostring(before.version), file }
    assert.equal(0, code, err)
    assert.truthy(out:find("(created cli_stale)", 1, true), out)
    routes_to(inst, "cli_stale", ports[1], 4)
    assert.equal(0, (dyups { "delete", "--state", state, "cli_stale" }))
  end)

  it("apply of bad input: exit 3, stderr names the line, nothing changed", function()
    local before = dump_json(state)
    local file = dir .. "/bad.conf"
    nginx.write_file(file, "upstream cli_bad {\n    server 127.0.0.1:1;\n    server 127.0.0.1:2 weight=0;\n}\n")
    local code, out, err = dyups { "apply", "--state", state, file }
    assert.equal(3, code)
    assert.equal("", out)
    assert.truthy(err:find("upstream file " .. file .. ": line 3: ", 1, true), err)
    code, out, err = dyups({ "apply", "--state", state, "-" }, "upstream cli_bad { server 127.0.0.1:1; }\nupstream {")
    assert.equal(3, code)
    assert.equal("", out)
    assert.truthy(err:find("standard input: line 2: ", 1, true), err)
    assert.same(before, dump_json(state))
    assert.equal(404, (api(inst, "GET", "/upstream/cli_bad")))
    local status = T.get(inst, "/", { Host = "cli_bad" })
    assert.equal(502, status)
  end)

  it("dump: an upstream file init reads back as the same table", function()
    local code, text, err = dyups { "dump", "--state", state }
    assert.equal(0, code, err)
    local v = dump_json(state).version
    assert.equal(("# dyups dump of state file %s, version %d\n"):format(state, v), text:match("^[^\n]*\n"))
    assert.truthy(text:find("upstream cli_new {\n    server " .. dy.addr(ports[2]) .. ";\n}\n", 1, true), text)
    local other = dy.proxy { upstreams = text }
    other:start()
    local _, mine = api(inst, "GET", "/detail")
    local _, theirs = api(other, "GET", "/detail")
    assert.equal(mine, theirs)
    local _, again = dyups { "dump", "--state", other.prefix .. "/state/dyups.state" }
    assert.equal(text:gsub("^[^\n]*\n", ""), (again:gsub("^[^\n]*\n", "")))
    other:stop()
  end)

  it("delete: 404 on GET /upstream/NAME and 502 by Host from both workers; an unknown name exits 4", function()
    routes_to(inst, "cli_two", ports[1], 2)
    local code, out, err = dyups { "delete", "--state", state, "cli_two" }
    assert.equal(0, code, err)
    local v = tonumber(out:match("version (%d+) %(deleted cli_two%)"))
    assert.truthy(v, out)
    converged(inst, state, v)
    assert.equal(404, (api(inst, "GET", "/upstream/cli_two")))
    local pids = {}
    nginx.wait_until(function()
      local status, _, pid = T.get(inst, "/", { Host = "cli_two" })
      assert.equal(502, status)
      pids[pid] = true
      return #T.keys(pids) == 2
    end, 5, "both workers refusing cli_two")
    local before = dump_json(state)
    code, out, err = dyups { "delete", "--state", state, "cli_two" }
    assert.equal(4, code)
    assert.equal("", out)
    assert.truthy(err:find("upstream cli_two not found", 1, true), err)
    assert.same(before, dump_json(state))
  end)
end)

describe("dyups repair under a running nginx:", function()
  local ports

  lazy_setup(function()
    ports = select(2, dy.backends(2))
  end)

  lazy_teardown(function()
    nginx.stop_all()
  end)

  --- A proxy whose workers do not look at the state file on their own:
  --- they restore a damaged file themselves within a second (faults_spec),
  --- which would race the repair under test. They look when a /lua call
  --- reads the module (dyups.version()), and move then to a file put at
  --- the path, as the refresh timer has them do.
  local function start()
    local inst = dy.proxy {
      upstreams = dy.upstream("local", { dy.addr(ports[1]) }),
      init = "refresh = 600,",
    }
    inst:start()
    local state = inst.prefix .. "/state/dyups.state"
    -- An acknowledged write: in the active slot and the copy, and applied
    -- by both workers (on their next request: no timer) before any damage.
    assert.equal(200, (api(inst, "POST", "/upstream/dyhost", "server " .. dy.addr(ports[2]) .. ";")))
    routes_to(inst, "dyhost", ports[2], 2)
    converged(inst, state, 2)
    return inst, state
  end

  --- Wrecks 16 bytes of the active slot's payload in place (same inode:
  --- every worker's mapping shows it).
  local function wreck_active_slot(state)
    local bytes = assert(nginx.read_file(state))
    local slot_len = 0
    for i = 24, 17, -1 do slot_len = slot_len * 256 + bytes:byte(i) end
    local active = bytes:byte(65) % 2
    local at = 4096 + active * slot_len + 32 + 8
    assert(nginx.execute(("dd if=/dev/urandom of=%s bs=1 seek=%d count=16 conv=notrunc 2>/dev/null"):format(q(state), at)))
  end

  --- Has each worker look at the file until both are registered in the one
  --- at the path, at `version`.
  local function moved(inst, state, version)
    local pids = inst:worker_pids()
    nginx.wait_until(function()
      dy.run(inst, [[return (require("ngx.dyups").version())]])
      local _, r = inspect(state)
      local by_pid = applied(r)
      return by_pid[pids[1]] == version and by_pid[pids[2]] == version
    end, 5, "both workers on the repaired file")
  end

  local function asides(state)
    local p = assert(io.popen("ls " .. q(state) .. ".damaged.* 2>/dev/null"))
    local list = {}
    for line in p:lines() do list[#list + 1] = line end
    p:close()
    return list
  end

  it("from the copy: nginx serves throughout and routes by the repaired table, with the last write", function()
    local inst, state = start()
    local pids = inst:worker_pids()
    local owner = uid_of(state)
    local v = dump_json(state).version
    wreck_active_slot(state)
    local code, _, err = inspect(state)
    assert.equal(1, code)
    assert.truthy(err:find("slot %d is unreadable %(checksum mismatch%)"), err)
    -- The workers route by the table they hold.
    routes_to(inst, "dyhost", ports[2], 10)
    local out
    code, out, err = dyups { "repair", "--state", state }
    assert.equal(0, code, err)
    assert.truthy(out:find(("rebuilt state file %s from the copy %s.copy (version %d) at version %d"):format(state, state, v, v + 1), 1, true), out)
    assert.equal(v + 1, dump_json(state).version)
    -- The damaged bytes kept aside, for the owner only; the new file the
    -- workers' as the old one was.
    local kept = asides(state)
    assert.equal(1, #kept)
    assert.equal("600", (io.popen("stat -c %a " .. q(kept[1])):read("*l")))
    assert.equal(owner, uid_of(state))
    moved(inst, state, v + 1)
    code = inspect(state)
    assert.equal(0, code)
    routes_to(inst, "dyhost", ports[2], 10)
    assert.same(pids, inst:worker_pids())
    -- Writes go on, into the repaired file.
    assert.equal(200, (api(inst, "DELETE", "/upstream/dyhost")))
    local _, r = inspect(state)
    assert.equal(v + 2, r.commit.generation)
    assert.equal(v + 2, r.copy.newest)
    inst:stop()
  end)

  it("from an upstream file: the workers move to its table", function()
    local inst, state = start()
    local v = dump_json(state).version
    wreck_active_slot(state)
    local file = inst.prefix .. "/conf/repair.conf"
    nginx.write_file(file, dy.upstream("dyhost", { dy.addr(ports[1]) }) .. dy.upstream("cli_rebuilt", { dy.addr(ports[2]) }))
    local code, out, err = dyups { "repair", "--state", state, "--from", file }
    assert.equal(0, code, err)
    assert.truthy(out:find("from upstream file " .. file, 1, true), out)
    -- Before they look, the workers still route by the old mapping.
    routes_to(inst, "dyhost", ports[2], 4)
    moved(inst, state, v + 1)
    routes_to(inst, "dyhost", ports[1])
    routes_to(inst, "cli_rebuilt", ports[2])
    assert.equal(404, (api(inst, "GET", "/upstream/local")))
    -- A sound file is left alone.
    local before = nginx.read_file(state)
    code, out = dyups { "repair", "--state", state, "--from", file }
    assert.equal(0, code)
    assert.truthy(out:find("is sound (version " .. (v + 1) .. "): nothing was changed", 1, true), out)
    assert.equal(1, #asides(state))
    assert.equal(#before, #nginx.read_file(state))
    inst:stop()
  end)
end)
