-- spec/helpers/dnsmasq.lua: a real DNS server on loopback for the specs,
-- Debian's dnsmasq, answering for *.dyups.test from a hosts file of the
-- spec's own, logging every query (so a spec can count them), started in
-- a directory of its own and stopped by its pid.
--
--   local dns = dnsmasq.start { ttl = 1, hosts = { ["app.dyups.test"] = { "127.0.0.1", "::1" } } }
--   dns:set_hosts { ... }      -- rewrites the file, SIGHUP: dnsmasq re-reads it
--   dns:queries("A", "app.dyups.test")   -- queries logged so far
--   dns:stop()  dns:start()    -- same port, same files
--
-- SRV records are dnsmasq's --srv-host lines, which it reads only when it
-- starts: `srv = { "_http._tcp.svc.dyups.test,a.dyups.test,8080,0,3" }`
-- (name,target,port,priority,weight) at start, dns:set_srv{ ... } to
-- restart it (by its pid, same port) with others.
local nginx = require "spec.helpers.nginx"

local M = {}
local Server = {}
Server.__index = Server

local DNSMASQ = "/usr/sbin/dnsmasq"
local running = {}
-- every server started, stopped or not: stop_all removes their directories
local started = {}

local function hosts_text(hosts)
  local lines = {}
  for name, addrs in pairs(hosts) do
    for _, a in ipairs(addrs) do lines[#lines + 1] = a .. " " .. name end
  end
  table.sort(lines)
  return table.concat(lines, "\n") .. "\n"
end

function Server:set_hosts(hosts)
  -- dnsmasq logs each re-read: count them first, then wait for this one.
  local want = self:reads() + 1
  nginx.write_file(self.dir .. "/hosts", hosts_text(hosts))
  if self.pid then os.execute("kill -HUP " .. self.pid) end
  if self.pid then
    nginx.wait_until(function() return self:reads() >= want end, 5, "dnsmasq re-read its hosts file")
  end
end

function Server:log()
  local f = io.open(self.dir .. "/dnsmasq.log")
  if not f then return "" end
  local text = f:read("*a")
  f:close()
  return text
end

--- How many times dnsmasq has read the hosts file.
function Server:reads()
  local n = 0
  for _ in self:log():gmatch("read " .. self.dir:gsub("%p", "%%%0") .. "/hosts") do n = n + 1 end
  return n
end

--- Queries of `qtype` for `name` logged so far.
function Server:queries(qtype, name)
  local n = 0
  local pat = "query%[" .. qtype .. "%] " .. name:gsub("%p", "%%%0") .. " from"
  for _ in self:log():gmatch(pat) do n = n + 1 end
  return n
end

--- Restarts dnsmasq with the SRV records `srv` (its --srv-host lines).
function Server:set_srv(srv)
  self:stop()
  self.srv = srv
  self:start()
end

function Server:start()
  local args = {
    DNSMASQ, "--keep-in-foreground", "--conf-file=/dev/null", "--port=" .. self.port,
    "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts",
    "--addn-hosts=" .. self.dir .. "/hosts", "--local=/dyups.test/",
    "--local-ttl=" .. self.ttl, "--log-queries", "--log-facility=" .. self.dir .. "/dnsmasq.log",
    "--pid-file=",
  }
  for _, line in ipairs(self.srv or {}) do
    assert(line:match("^[%w._,-]+$"), line)
    args[#args + 1] = "--srv-host=" .. line
  end
  local p = io.popen("id -u")
  local uid = p:read("*l")
  p:close()
  if uid == "0" then
    args[#args + 1] = "--user=root"
    args[#args + 1] = "--group=root"
  end
  -- Counted before the launch: dnsmasq may log its start at once.
  local starts = select(2, self:log():gsub("started, version", ""))
  local cmd = "cd " .. self.dir .. " && " .. table.concat(args, " ")
    .. " >" .. self.dir .. "/out.log 2>&1 & echo $!"
  p = io.popen(cmd)
  self.pid = tonumber(p:read("*l"))
  p:close()
  running[self] = true
  nginx.wait_until(function()
    return select(2, self:log():gsub("started, version", "")) > starts
  end, 5, "dnsmasq started (" .. self.dir .. "/out.log)")
end

function Server:stop()
  if not self.pid then return end
  os.execute("kill " .. self.pid)
  local pid = self.pid
  nginx.wait_until(function() return not nginx.pid_alive(pid) end, 5, "dnsmasq stopped")
  self.pid = nil
  running[self] = nil
end

function M.start(opts)
  local p = io.popen("mktemp -d /tmp/dyups-dns.XXXXXX")
  local dir = p:read("*l")
  p:close()
  local s = setmetatable({ dir = dir, port = nginx.free_port(), ttl = opts.ttl or 1, srv = opts.srv }, Server)
  nginx.write_file(dir .. "/hosts", hosts_text(opts.hosts or {}))
  started[#started + 1] = s
  s:start()
  return s
end

--- Stops every server started and removes their directories.
function M.stop_all()
  for s in pairs(running) do s:stop() end
  for i = #started, 1, -1 do
    -- only the directories mktemp made for us
    assert(started[i].dir:match("^/tmp/dyups%-dns%.%w+$"), started[i].dir)
    os.execute("rm -rf " .. started[i].dir)
    started[i] = nil
  end
end

return M
