-- `dyups sync`: three nginx hosts (each its own prefix, state file and
-- agent, two workers) following a real 3-member etcd cluster on loopback.
local nginx = require "spec.helpers.nginx"
local dy = require "spec.helpers.dyups"
local etcd = require "spec.helpers.etcd"
local T = require "spec.helpers.traffic"

local q = nginx.shell_quote
local HOSTS = 3
local KEYS = "/dyups/upstreams/"

local function dyups(args)
  local out, err = os.tmpname(), os.tmpname()
  local cmd = { q(etcd.BIN) }
  for _, a in ipairs(args) do cmd[#cmd + 1] = q(a) end
  local _, code = nginx.execute(table.concat(cmd, " ") .. " >" .. q(out) .. " 2>" .. q(err) .. " </dev/null")
  local o, e = nginx.read_file(out), nginx.read_file(err)
  os.remove(out)
  os.remove(err)
  return code, o, e
end

local function dump(state)
  local code, out, err = dyups { "dump", "--state", state, "--json" }
  assert.equal(0, code, err)
  return T.json_decode(out)
end

describe("dyups sync:", function()
  local cluster, hosts, ports

  --- Waits until every worker of every host answers for `name` from
  --- `port` (nil: 502, no such upstream).
  local function converged(name, port, timeout)
    for _, h in ipairs(hosts) do
      local seen = {}
      nginx.wait_until(function()
        local status, p, pid = dy.get(h.inst, "/", { Host = name })
        if port then
          if status ~= 200 or p ~= port then seen = {} return false end
        elseif status ~= 502 then
          seen = {}
          return false
        end
        seen[pid] = true
        return #T.keys(seen) == 2
      end, timeout or 10, ("host %s: %s on %s"):format(h.inst.prefix, name, tostring(port)))
    end
  end

  local function put(name, body)
    local ok, _, err = cluster:ctl { "put", KEYS .. name, body }
    assert.is_true(ok, err)
  end

  --- etcdctl (API v3) on `endpoint` with standard input from `input`.
  local function ctl_at(endpoint, args, input)
    local cmd = { "ETCDCTL_API=3", q(etcd.ETCDCTL), "--command-timeout=20s", "--endpoints", q(endpoint) }
    for _, a in ipairs(args) do cmd[#cmd + 1] = q(a) end
    local err = os.tmpname()
    local ok = nginx.execute(table.concat(cmd, " ") .. " >/dev/null 2>" .. q(err)
      .. " <" .. q(input or "/dev/null"))
    local e = nginx.read_file(err)
    os.remove(err)
    return ok, e
  end

  --- Puts `kvs` ({ {key, value}, ... }) in transactions of 100.
  local function put_all(kvs)
    for first = 1, #kvs, 100 do
      local lines = { "" }
      for i = first, math.min(#kvs, first + 99) do
        lines[#lines + 1] = ("put %s %q"):format(kvs[i][1], kvs[i][2])
      end
      local file = os.tmpname()
      nginx.write_file(file, table.concat(lines, "\n") .. "\n\n\n")
      local ok, err = ctl_at(cluster:endpoints(), { "txn" }, file)
      os.remove(file)
      assert.is_true(ok, err)
    end
  end

  local function etcd_owned(state)
    local names = {}
    for _, u in ipairs(dump(state).upstreams) do
      if u.owner == "etcd" then names[#names + 1] = u.name end
    end
    return names
  end

  lazy_setup(function()
    cluster = etcd.cluster(3)
    cluster:start()
    ports = select(2, dy.backends(2))
    hosts = {}
    for i = 1, HOSTS do
      local inst = dy.proxy {}
      inst:start()
      local state = inst.prefix .. "/state/dyups.state"
      local agent = etcd.agent(cluster, state)
      agent:start()
      hosts[i] = { inst = inst, state = state, agent = agent }
    end
  end)

  lazy_teardown(function()
    for _, h in ipairs(hosts or {}) do h.agent:stop("KILL") end
    if cluster then cluster:stop() end
    nginx.stop_all()
  end)

  it("a put converges on every worker of every host, a replacement and a delete too", function()
    put("s_put", dy.body_of { dy.addr(ports[1]) })
    converged("s_put", ports[1])
    put("s_put", "least_conn; " .. dy.body_of { dy.addr(ports[2]) })
    converged("s_put", ports[2])
    for _, h in ipairs(hosts) do
      local _, body = nginx.http(h.inst.ports.api, "GET", "/upstream/s_put")
      assert.truthy(body:find("least_conn", 1, true), body)
    end
    assert.is_true((cluster:ctl { "del", KEYS .. "s_put" }))
    converged("s_put", nil)
  end)

  it("a value that does not parse is skipped, named in the log; the rest is applied", function()
    put("s_keep", dy.body_of { dy.addr(ports[1]) })
    converged("s_keep", ports[1])
    -- One transaction: the bad values and a good one in one watch response.
    local txn = ("put %ss_bad \"server nonsense\"\nput %ss_keep \"server 127.0.0.1:0 weight=0;\"\nput %ss_good \"%s\"\n\n")
      :format(KEYS, KEYS, KEYS, dy.body_of { dy.addr(ports[2]) })
    local file = os.tmpname()
    nginx.write_file(file, "\n" .. txn .. "\n")
    assert.is_true(nginx.execute(("ETCDCTL_API=3 %s --endpoints %s txn <%s >/dev/null"):format(
      q(etcd.ETCDCTL), q(cluster:endpoints()), q(file))))
    os.remove(file)
    converged("s_good", ports[2])
    -- The bad replacement left the last good value; the bad key, nothing.
    converged("s_keep", ports[1], 1)
    converged("s_bad", nil, 1)
    for _, h in ipairs(hosts) do
      local log = h.agent:read_log()
      assert.truthy(log:find("skipping key " .. KEYS .. "s_bad: ", 1, true), log)
      assert.truthy(log:find("skipping key " .. KEYS .. "s_keep: ", 1, true), log)
    end
  end)

  it("a local write to an upstream etcd owns answers 409 naming the key; a local upstream stays local", function()
    put("s_owned", dy.body_of { dy.addr(ports[1]) })
    converged("s_owned", ports[1])
    local h = hosts[1]
    local before = dump(h.state)
    for _, req in ipairs {
      { "POST", "/upstream/s_owned", "server 127.0.0.1:1;" },
      { "DELETE", "/upstream/s_owned" },
      { "POST", "/upstream/s_owned/servers", "127.0.0.1:2" },
    } do
      local status, body = nginx.http(h.inst.ports.api, req[1], req[2], { body = req[3] })
      assert.equal(409, status, req[2])
      assert.truthy(body:find("write it to etcd key " .. KEYS .. "s_owned", 1, true), body)
    end
    local status, body = nginx.http(h.inst.ports.proxy, "GET", "/ups?op=del&upstream=s_owned&server=" .. dy.addr(ports[1]))
    assert.equal(409, status, body)
    assert.truthy(body:find(KEYS .. "s_owned", 1, true), body)
    local file = os.tmpname()
    nginx.write_file(file, dy.upstream("s_owned", { dy.addr(ports[2]) }))
    local code, _, err = dyups { "apply", "--state", h.state, file }
    os.remove(file)
    assert.equal(8, code, err)
    assert.truthy(err:find(KEYS .. "s_owned", 1, true), err)
    assert.same(before, dump(h.state))
    converged("s_owned", ports[1], 2)
    -- A local upstream: written locally, kept through etcd's changes and
    -- through a full read (an agent restart with another cluster's mark is
    -- tested below; a compaction does one too).
    assert.equal(200, (nginx.http(h.inst.ports.api, "POST", "/upstream/s_local", { body = dy.body_of { dy.addr(ports[2]) } })))
    put("s_other", dy.body_of { dy.addr(ports[1]) })
    converged("s_other", ports[1])
    local status2, p = dy.get(h.inst, "/", { Host = "s_local" })
    assert.equal(200, status2)
    assert.equal(ports[2], p)
  end)

  it("compaction past an agent's revision: it reads everything again and applies the difference", function()
    local h = hosts[2]
    h.agent:stop("TERM")
    -- Two revisions past the agent's, both compacted away.
    put("s_compact_new", dy.body_of { dy.addr(ports[1]) })
    put("s_compact_new", dy.body_of { dy.addr(ports[2]) })
    assert.is_true((cluster:ctl { "del", KEYS .. "s_other" }))
    assert.is_true((cluster:ctl { "compact", tostring(cluster:revision()) }))
    h.agent:start()
    converged("s_compact_new", ports[2])
    converged("s_other", nil)
    local log = h.agent:read_log()
    assert.truthy(log:find("was compacted", 1, true), log)
    -- The local upstream of host 1 was never etcd's: host 1 still has it.
    local status, p = dy.get(hosts[1].inst, "/", { Host = "s_local" })
    assert.equal(200, status)
    assert.equal(ports[2], p)
  end)

  it("two members killed (no quorum): every host keeps serving, says so, and catches up when they return", function()
    put("s_quorum", dy.body_of { dy.addr(ports[1]) })
    converged("s_quorum", ports[1])
    cluster:kill_member(2)
    cluster:kill_member(3)
    for _, h in ipairs(hosts) do
      nginx.wait_until(function()
        local code = dyups { "inspect", "--state", h.state }
        return code == 9
      end, 20, "inspect to report that sync cannot follow etcd")
      local _, out = dyups { "inspect", "--state", h.state }
      assert.truthy(out:find("is unreachable at etcd revision", 1, true), out)
    end
    converged("s_quorum", ports[1], 2)
    cluster:start_member(2)
    cluster:start_member(3)
    cluster:wait_healthy()
    put("s_quorum", dy.body_of { dy.addr(ports[2]) })
    converged("s_quorum", ports[2], 30)
    for _, h in ipairs(hosts) do
      nginx.wait_until(function()
        return dyups { "inspect", "--state", h.state } == 0
      end, 20, "inspect to report sync following again")
    end
  end)

  it("the member the agents read from is killed: they move to another endpoint and keep following", function()
    -- Every agent starts on the first endpoint; the quorum test above may
    -- have moved them, so each host's member is the one its log names last.
    put("s_member", dy.body_of { dy.addr(ports[1]) })
    converged("s_member", ports[1])
    local logs = {}
    for i, h in ipairs(hosts) do logs[i] = #h.agent:read_log() end
    for i = 1, 3 do
      cluster:kill_member(i)
      -- The put itself may time out while the other two elect a leader.
      nginx.wait_until(function()
        return (cluster:ctl { "put", KEYS .. "s_member", dy.body_of { dy.addr(ports[i % 2 + 1]) } })
      end, 20, "a put with member " .. i .. " down")
      converged("s_member", ports[i % 2 + 1], 30)
      cluster:start_member(i)
      cluster:wait_healthy()
    end
    -- Each agent lost its member at least once, and said so.
    for i, h in ipairs(hosts) do
      local log = h.agent:read_log():sub(logs[i] + 1)
      assert.truthy(log:find("keeping the last table, retrying", 1, true), log)
    end
  end)

  it("an agent restarted resumes from the etcd revision in the state file, reading nothing again", function()
    local h = hosts[1]
    put("s_resume", dy.body_of { dy.addr(ports[1]) })
    converged("s_resume", ports[1])
    -- The table holds the revision of the last change: nothing has been
    -- written to etcd since.
    nginx.wait_until(function()
      return dump(h.state).sync.revision == cluster:revision()
    end, 10, "the sync mark to reach etcd's revision")
    local mark = dump(h.state).sync
    assert.equal("/dyups/", mark.prefix)
    assert.truthy(mark.cluster_id:match("^%d+$"), mark.cluster_id)
    h.agent:stop("TERM")
    local seen = #h.agent:read_log()
    put("s_resume", dy.body_of { dy.addr(ports[2]) })
    put("s_resume_new", dy.body_of { dy.addr(ports[1]) })
    h.agent:start()
    converged("s_resume", ports[2])
    converged("s_resume_new", ports[1])
    local log = h.agent:read_log():sub(seen + 1)
    assert.falsy(log:find("upstreams from etcd", 1, true), log)
    assert.falsy(log:find("reading everything again", 1, true), log)
    -- Both changes came in the watch's first response: one write.
    assert.truthy(log:find("revision %d+: version %d+ %(created 1; replaced 1; deleted 0%)"), log)
    assert.equal(cluster:revision(), dump(h.state).sync.revision)
  end)

  it("an agent SIGKILLed while it applies: the state file is sound and the restart catches up", function()
    local h = hosts[3]
    local n = 40
    local script = {}
    for i = 1, n do
      script[#script + 1] = ("ETCDCTL_API=3 %s --endpoints %s put %ss_kill_%d %s >/dev/null")
        :format(q(etcd.ETCDCTL), q(cluster:endpoints()), KEYS, i, q(dy.body_of { dy.addr(ports[1]) }))
    end
    local writer = etcd.spawn("sh -c " .. q(table.concat(script, "\n")), "/dev/null")
    -- Killed once some of the puts are in, while the rest arrive.
    nginx.wait_until(function()
      for _, u in ipairs(dump(h.state).upstreams) do
        if u.name == "s_kill_3" then return true end
      end
      return false
    end, 20, "a few puts applied")
    h.agent:stop("KILL")
    local code, _, err = dyups { "inspect", "--state", h.state }
    assert.equal(0, code, err)
    nginx.wait_until(function() return not nginx.pid_alive(writer) end, 30, "the puts to finish")
    h.agent:start()
    converged("s_kill_" .. n, ports[1])
    local names = {}
    for _, u in ipairs(dump(h.state).upstreams) do names[u.name] = true end
    for i = 1, n do assert.is_true(names["s_kill_" .. i], "s_kill_" .. i) end
  end)

  it("a prefix of more keys than one read takes, with an answer past 10 MiB, is read whole", function()
    -- 1,100 keys (the agent reads 1,000 a time), then 12 values of 1 MiB
    -- (a comment pads each): more than the HTTP client reads in one body
    -- by default, in the last page.
    local kvs = {}
    for i = 1, 1100 do
      kvs[i] = { ("/big/upstreams/b_%04d"):format(i), dy.body_of { dy.addr(ports[i % 2 + 1]) } }
    end
    put_all(kvs)
    local pad = "# " .. ("x"):rep(1024 * 1024) .. "\n" .. dy.body_of { dy.addr(ports[1]) }
    local file = os.tmpname()
    nginx.write_file(file, pad)
    for i = 1, 12 do
      local ok, err = ctl_at(cluster:endpoints(), { "put", ("/big/upstreams/huge_%02d"):format(i) }, file)
      assert.is_true(ok, err)
    end
    os.remove(file)
    local dir = assert(io.popen("mktemp -d /tmp/ngx-dyups-big.XXXXXX")):read("*l")
    local state = dir .. "/big.state"
    local agent = etcd.agent(cluster, state, "/big/")
    agent:start()
    local ok, why = pcall(function()
      nginx.wait_until(function()
        return agent:read_log():find("read 1112 upstreams from etcd", 1, true) ~= nil
      end, 60, "the agent to read the whole prefix")
      local names = etcd_owned(state)
      assert.equal(1112, #names)
      table.sort(names)
      assert.equal("b_0001", names[1])
      assert.equal("b_1100", names[1100])
      assert.equal("huge_12", names[1112])
    end)
    agent:stop("KILL")
    if not ok then why = tostring(why) .. "\nthe agent's log ends:\n" .. agent:read_log():sub(-1500) end
    nginx.execute("rm -rf " .. q(dir))
    assert.is_true((cluster:ctl { "del", "--prefix", "/big/" }))
    assert(ok, why)
  end)

  it("etcd restored from a backup, below the table's revision: each agent reads everything again", function()
    put("s_snap", dy.body_of { dy.addr(ports[1]) })
    converged("s_snap", ports[1])
    local snap = cluster.dir .. "/backup.db"
    local m1 = cluster.members[1]
    local ok, err = ctl_at("http://127.0.0.1:" .. m1.client, { "snapshot", "save", snap })
    assert.is_true(ok, err)
    -- After the backup: changes the restore takes back, several revisions'
    -- worth, so etcd restored stays below them after a few writes.
    put("s_after", dy.body_of { dy.addr(ports[1]) })
    for _ = 1, 5 do put("s_snap", dy.body_of { dy.addr(ports[2]) }) end
    converged("s_after", ports[1])
    converged("s_snap", ports[2])
    local logs = {}
    for i, h in ipairs(hosts) do logs[i] = #h.agent:read_log() end
    for i = 1, #cluster.members do cluster:kill_member(i) end
    for _, m in ipairs(cluster.members) do
      m.data = m.data .. ".restored"
      local restored, why = ctl_at("http://127.0.0.1:" .. m.client, {
        "snapshot", "restore", snap, "--name", m.name, "--data-dir", m.data,
        "--initial-cluster", cluster.initial, "--initial-cluster-token", cluster.dir,
        "--initial-advertise-peer-urls", "http://127.0.0.1:" .. m.peer })
      assert.is_true(restored, why)
    end
    for i = 1, #cluster.members do cluster:start_member(i) end
    cluster:wait_healthy()
    converged("s_after", nil, 30)
    converged("s_snap", ports[1], 30)
    for i, h in ipairs(hosts) do
      local log = h.agent:read_log():sub(logs[i] + 1)
      assert.truthy(log:find("reading everything again", 1, true), log)
      assert.truthy(log:find("upstreams from etcd", 1, true), log)
    end
  end)
end)
