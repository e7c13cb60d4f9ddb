-- spec/helpers/etcd.lua: a real etcd cluster (Debian's etcd-server) on
-- loopback for the specs, each member on its own free ports with its own
-- data directory under one temporary directory; and `dyups sync` agents.
-- Everything here is stopped by the pid it was started with, never by name;
-- a watchdog kills what is left if the test process dies.
local nginx = require "spec.helpers.nginx"

local q = nginx.shell_quote
local M = {}

M.ETCD = os.getenv("ETCD") or "/usr/bin/etcd"
M.ETCDCTL = os.getenv("ETCDCTL") or "/usr/bin/etcdctl"
M.BIN = nginx.REPO .. "/bin/dyups"

--- Starts `cmd` in the background with its output in `log`; returns its
--- pid. A watchdog SIGKILLs it once this test process is gone.
local function spawn(cmd, log)
  local pidfile = os.tmpname()
  nginx.execute(("setsid sh -c %s >%s 2>&1 </dev/null & echo $! >%s")
    :format(q("exec " .. cmd), q(log), q(pidfile)))
  local pid = tonumber(nginx.read_file(pidfile))
  os.remove(pidfile)
  assert(pid, "could not start: " .. cmd)
  local owner = tonumber(nginx.read_file("/proc/self/stat"):match("^%d+ %b() %S+ (%d+)"))
  local watchdog = [[
alive() { s=$(cat /proc/$1/stat 2>/dev/null) || return 1; s=${s##*) }; case $s in Z*|X*) return 1;; esac; return 0; }
while alive $OWNER; do alive $PID || exit 0; sleep 0.5; done
kill -KILL $PID 2>/dev/null
]]
  nginx.execute(("OWNER=%d PID=%d setsid sh -c %s >/dev/null 2>&1 </dev/null &"):format(owner, pid, q(watchdog)))
  return pid
end
M.spawn = spawn

--- Sends `sig` ("TERM", "KILL") to `pid` and waits until it is gone.
function M.stop_pid(pid, sig)
  if not pid or not nginx.pid_alive(pid) then return end
  nginx.execute(("kill -%s %d"):format(sig or "TERM", pid))
  nginx.wait_until(function() return not nginx.pid_alive(pid) end, 10, "pid " .. pid .. " to exit")
end

local Cluster = {}
Cluster.__index = Cluster

--- A cluster of `n` members, not started yet.
function M.cluster(n)
  local dir = assert(io.popen("mktemp -d /tmp/ngx-dyups-etcd.XXXXXX")):read("*l")
  local self = setmetatable({ dir = dir, members = {} }, Cluster)
  local peers = {}
  for i = 1, n do
    local m = { name = "m" .. i, client = nginx.free_port(), peer = nginx.free_port() }
    m.data = dir .. "/" .. m.name
    m.log = dir .. "/" .. m.name .. ".log"
    self.members[i] = m
    peers[i] = ("%s=http://127.0.0.1:%d"):format(m.name, m.peer)
  end
  self.initial = table.concat(peers, ",")
  return self
end

function Cluster:member_cmd(m)
  return table.concat({
    q(M.ETCD), "--name", m.name, "--data-dir", q(m.data),
    "--listen-client-urls", "http://127.0.0.1:" .. m.client,
    "--advertise-client-urls", "http://127.0.0.1:" .. m.client,
    "--listen-peer-urls", "http://127.0.0.1:" .. m.peer,
    "--initial-advertise-peer-urls", "http://127.0.0.1:" .. m.peer,
    "--initial-cluster", q(self.initial),
    "--initial-cluster-token", q(self.dir),
    "--initial-cluster-state", "new",
    -- Fast elections on loopback keep the quorum specs short.
    "--heartbeat-interval", "50", "--election-timeout", "500",
  }, " ")
end

--- Starts member `i` (again: its data directory is kept).
function Cluster:start_member(i)
  local m = self.members[i]
  m.pid = spawn(self:member_cmd(m), m.log)
end

--- SIGKILLs member `i`.
function Cluster:kill_member(i)
  M.stop_pid(self.members[i].pid, "KILL")
  self.members[i].pid = nil
end

--- Starts every member; returns once the cluster answers a write.
function Cluster:start()
  for i = 1, #self.members do self:start_member(i) end
  self:wait_healthy()
end

function Cluster:wait_healthy()
  nginx.wait_until(function()
    return (self:ctl { "put", "/health-check", "1" })
  end, 20, "etcd cluster to take a write")
end

--- Client URLs, comma-separated.
function Cluster:endpoints()
  local out = {}
  for i, m in ipairs(self.members) do out[i] = "http://127.0.0.1:" .. m.client end
  return table.concat(out, ",")
end

--- Runs etcdctl (API v3) against every member: ok, stdout, stderr.
function Cluster:ctl(args)
  local out, err = os.tmpname(), os.tmpname()
  local cmd = { "ETCDCTL_API=3", q(M.ETCDCTL), "--dial-timeout=1s", "--command-timeout=3s",
    "--endpoints", q(self:endpoints()) }
  for _, a in ipairs(args) do cmd[#cmd + 1] = q(a) end
  local ok = nginx.execute(table.concat(cmd, " ") .. " >" .. q(out) .. " 2>" .. q(err))
  local o, e = nginx.read_file(out), nginx.read_file(err)
  os.remove(out)
  os.remove(err)
  return ok, o, e
end

--- The cluster's current revision.
function Cluster:revision()
  local ok, out, err = self:ctl { "get", "/health-check", "-w", "json" }
  assert(ok, err)
  return tonumber(out:match('"revision":(%d+)'))
end

function Cluster:stop()
  for i = 1, #self.members do
    if self.members[i].pid then self:kill_member(i) end
  end
  nginx.execute("rm -rf " .. q(self.dir))
end

local Agent = {}
Agent.__index = Agent

--- A `dyups sync` for the state file `state`, following `cluster` under
--- `prefix`; not started yet.
function M.agent(cluster, state, prefix)
  return setmetatable({ cluster = cluster, state = state, prefix = prefix or "/dyups/",
    log = state .. ".agent.log" }, Agent)
end

function Agent:start()
  assert(not self.pid, "agent already running")
  local cmd = table.concat({ q(M.BIN), "sync", "--etcd", q(self.cluster:endpoints()),
    "--prefix", q(self.prefix), "--state", q(self.state), "--probe-interval", "0.5" }, " ")
  -- Appended: a restarted agent's log follows the last one's.
  self.pid = spawn(cmd .. " 2>>" .. q(self.log), "/dev/null")
end

function Agent:stop(sig)
  M.stop_pid(self.pid, sig)
  self.pid = nil
end

function Agent:read_log()
  return nginx.read_file(self.log) or ""
end

return M
