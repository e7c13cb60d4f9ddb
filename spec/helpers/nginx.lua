-- spec/helpers/nginx.lua: run a real nginx (OpenResty or Debian's nginx with
-- the dynamic lua module) from busted specs under LuaJIT, outside nginx.
--
-- In the style of Kong's spec/helpers/http_mock/nginx_instance.lua: render an
-- nginx.conf into a fresh prefix, start nginx there, wait until it really
-- serves, and always stop it again.
--
--   local nginx = require "spec.helpers.nginx"
--
--   local inst = nginx.new {
--     workers = 2,
--     conf = [[
--       http {
--         lua_package_path "${lua_package_path}";
--         lua_package_cpath "${lua_package_cpath}";
--         server {
--           listen 127.0.0.1:${port_http} reuseport;
--           location /pid { content_by_lua_block { ngx.say(ngx.worker.pid()) } }
--         }
--       }
--     ]],
--   }
--   inst:start()                                   -- waits for ports + workers
--   local status, body, headers = nginx.http(inst.ports.http, "GET", "/pid")
--   inst:stop()                                    -- idempotent
--
-- Specs call `nginx.stop_all()` in `teardown`/`lazy_teardown`. As a safety
-- net the harness also stops every instance it started
--   * when the Lua state closes (a __gc sentinel: normal end, an uncaught
--     error, busted's own exit(), os.exit(code, true)),
--   * on os.exit(code) (wrapped), and
--   * when the owning process dies without any of that (SIGKILL, SIGTERM):
--     a small detached watchdog shell per instance (opt out: watchdog=false).
-- stop_all() and those nets also remove the temp prefixes new() made; set
-- NGINX_TEST_KEEP_PREFIX=1 in the environment to keep them for a post-mortem.
--
-- Template syntax: `${name}` is replaced by vars[name] or a built-in; an
-- unknown name is an error; `$${` renders a literal `${` (for nginx's own
-- `${var}` syntax). Built-ins: prefix, repo, lua_package_path,
-- lua_package_cpath, and any `port_<name>`, which is allocated with
-- free_port() unless given in vars (also available as inst.ports.<name>).
--
-- The preamble (load_module for Debian's dynamic modules, daemon, master,
-- worker_processes, pid, error_log, events) is added by the harness: the
-- template holds the `http { }` (and/or `stream { }`) blocks. Into the first
-- `http {` the harness also injects temp paths and an access_log inside the
-- prefix (unless the template sets them), so nothing is written elsewhere.

local ffi = require "ffi"
local bit = require "bit"

ffi.cdef [[
  typedef int pid_t;
  typedef unsigned int socklen_t;
  struct dyups_sockaddr_in {
    uint16_t sin_family;
    uint16_t sin_port;
    uint32_t sin_addr;
    uint8_t  sin_zero[8];
  };
  int socket(int domain, int type, int protocol);
  int bind(int fd, const void *addr, socklen_t len);
  int connect(int fd, const void *addr, socklen_t len);
  int getsockname(int fd, void *addr, socklen_t *len);
  int close(int fd);
  int poll(void *fds, unsigned long nfds, int timeout);
  int kill(pid_t pid, int sig);
  pid_t getpid(void);
  char *realpath(const char *path, char *resolved);
  void free(void *p);
]]

local C = ffi.C

local AF_INET = 2
local SOCK_STREAM = 1
local SOCK_CLOEXEC = 0x80000 -- Linux, all common arches
local SIGKILL = 9
local SIGQUIT = 3

local M = {}

M.MODULES_DIR = os.getenv("NGINX_MODULES_DIR") or "/usr/lib/nginx/modules"
M.DEFAULT_TIMEOUT = 5

----------------------------------------------------------------------------
-- small utilities

local function sleep_ms(ms)
  C.poll(nil, 0, ms)
end
M.sleep = function(s) sleep_ms(math.floor(s * 1000 + 0.5)) end

local function now()
  -- os.time() is whole seconds; use /proc/uptime for sub-second deadlines.
  local f = io.open("/proc/uptime", "r")
  if f then
    local up = f:read("*n")
    f:close()
    if up then return up end
  end
  return os.time()
end
--- Seconds of a monotonic clock (to 10 ms), for deadlines and elapsed times.
M.now = now

local function shell_quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end
M.shell_quote = shell_quote

-- os.execute that returns true/false plus the exit code under both the
-- Lua 5.1 (number) and 5.2 (ok, "exit", code) conventions.
local function execute(cmd)
  local a, _, c = os.execute(cmd)
  if type(a) == "number" then
    local code = a >= 256 and a / 256 or a
    return a == 0, code
  end
  return a == true, c
end
M.execute = execute

local function read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end
M.read_file = read_file

local function write_file(path, data)
  local f = assert(io.open(path, "wb"))
  assert(f:write(data))
  f:close()
end
M.write_file = write_file

local function tail(text, n)
  if not text or text == "" then return "(empty)" end
  local lines = {}
  for line in text:gmatch("[^\n]+") do lines[#lines + 1] = line end
  local from = math.max(1, #lines - (n or 30) + 1)
  return table.concat(lines, "\n", from)
end

local function realpath(path)
  local p = C.realpath(path, nil)
  if p == nil then return nil end
  local s = ffi.string(p)
  C.free(p)
  return s
end

--- Poll `fn` every ~20ms until it returns a truthy value (returned), or raise
--- "timed out waiting for <what>" after `timeout_s` seconds (default 5).
function M.wait_until(fn, timeout_s, what)
  local deadline = now() + (timeout_s or M.DEFAULT_TIMEOUT)
  while true do
    local r = { fn() }
    if r[1] then return unpack(r) end
    if now() >= deadline then
      error("timed out waiting for " .. (what or "condition"), 2)
    end
    sleep_ms(20)
  end
end
local wait_until = M.wait_until

-- repo root: this file is <repo>/spec/helpers/nginx.lua
do
  local src = debug.getinfo(1, "S").source:gsub("^@", "")
  local abs = realpath(src) or src
  M.REPO = abs:gsub("/spec/helpers/nginx%.lua$", "")
end

local function find_nginx()
  local env = os.getenv("NGINX")
  if env and env ~= "" then return env end
  for dir in (os.getenv("PATH") or ""):gmatch("[^:]+") do
    local p = dir .. "/nginx"
    if execute("test -x " .. shell_quote(p)) then return p end
  end
  for _, p in ipairs { "/usr/sbin/nginx", "/usr/local/openresty/nginx/sbin/nginx" } do
    if execute("test -x " .. p) then return p end
  end
  return "nginx"
end
M.NGINX = find_nginx()

----------------------------------------------------------------------------
-- sockets (ffi; no luasocket needed)

local function sockaddr(port)
  local sa = ffi.new("struct dyups_sockaddr_in")
  sa.sin_family = AF_INET
  sa.sin_port = bit.rshift(bit.bswap(port), 16) -- htons, little endian
  sa.sin_addr = bit.bswap(0x7f000001)           -- htonl(127.0.0.1)
  if not ffi.abi("le") then
    sa.sin_port = port
    sa.sin_addr = 0x7f000001
  end
  return sa
end

local handed_out = {}

--- A free TCP port on 127.0.0.1 (bind to port 0), never the same twice in
--- one process.
function M.free_port()
  for _ = 1, 50 do
    local fd = C.socket(AF_INET, bit.bor(SOCK_STREAM, SOCK_CLOEXEC), 0)
    assert(fd >= 0, "socket() failed: " .. ffi.errno())
    local sa = sockaddr(0)
    local size = ffi.sizeof(sa)
    if C.bind(fd, sa, size) ~= 0 then
      local e = ffi.errno()
      C.close(fd)
      error("bind() failed: errno " .. e)
    end
    local len = ffi.new("socklen_t[1]", size)
    local out = ffi.new("struct dyups_sockaddr_in")
    local rc = C.getsockname(fd, out, len)
    C.close(fd)
    assert(rc == 0, "getsockname() failed")
    local port = ffi.abi("le") and bit.rshift(bit.bswap(out.sin_port), 16) or out.sin_port
    if not handed_out[port] then
      handed_out[port] = true
      return port
    end
  end
  error("could not find a free port")
end

--- true when something accepts TCP connections on 127.0.0.1:port.
function M.can_connect(port)
  local fd = C.socket(AF_INET, bit.bor(SOCK_STREAM, SOCK_CLOEXEC), 0)
  if fd < 0 then return false end
  local sa = sockaddr(port)
  local rc = C.connect(fd, sa, ffi.sizeof(sa))
  C.close(fd)
  return rc == 0
end

----------------------------------------------------------------------------
-- /proc

local function list_pids()
  local pids = {}
  local ok, lfs = pcall(require, "lfs")
  if ok then
    for name in lfs.dir("/proc") do
      if name:match("^%d+$") then pids[#pids + 1] = tonumber(name) end
    end
  else
    local p = io.popen("ls /proc")
    for name in p:lines() do
      if name:match("^%d+$") then pids[#pids + 1] = tonumber(name) end
    end
    p:close()
  end
  return pids
end

-- { state = "S", ppid = n, pgrp = n } or nil if gone
local function proc_stat(pid)
  local s = read_file("/proc/" .. pid .. "/stat")
  if not s then return nil end
  local rest = s:match("^.*%) (.*)$")
  if not rest then return nil end
  local state, ppid, pgrp = rest:match("^(%S+) (%d+) (%d+)")
  return { state = state, ppid = tonumber(ppid), pgrp = tonumber(pgrp) }
end

local function proc_cmdline(pid)
  local s = read_file("/proc/" .. pid .. "/cmdline")
  if not s then return nil end
  return (s:gsub("%z+$", ""):gsub("%z", " "))
end

--- true while pid exists and is not a zombie (a daemonized master whose
--- parent does not reap would otherwise look alive forever).
function M.pid_alive(pid)
  if not pid then return false end
  local st = proc_stat(pid)
  return st ~= nil and st.state ~= "Z" and st.state ~= "X"
end
local pid_alive = M.pid_alive

local function kill(pid, sig)
  return C.kill(pid, sig) == 0
end

-- live (non-zombie) members of process group `pgrp` (nginx's master calls
-- setsid(); its workers stay in its group).
local function group_pids(pgrp)
  local out = {}
  for _, pid in ipairs(list_pids()) do
    local st = proc_stat(pid)
    if st and st.pgrp == pgrp and st.state ~= "Z" and st.state ~= "X" then
      out[#out + 1] = pid
    end
  end
  table.sort(out)
  return out
end
M.group_pids = group_pids

----------------------------------------------------------------------------
-- template rendering

local function render(template, vars)
  local missing = {}
  local out = template:gsub("(%$?)%${([%w_]+)}", function(esc, name)
    if esc == "$" then return "${" .. name .. "}" end
    local v = vars[name]
    if v == nil then
      missing[#missing + 1] = name
      return ""
    end
    return tostring(v)
  end)
  if #missing > 0 then
    error("nginx template: no value for ${" .. table.concat(missing, "}, ${") .. "}", 3)
  end
  return out
end
M.render = render

local function listen_ports(conf)
  local ports, seen = {}, {}
  for spec in conf:gmatch("%f[%w_]listen%s+([^;]+);") do
    local addr = spec:match("^(%S+)")
    if not addr:match("^unix:") and not addr:match("^%[") and not spec:match("%f[%w]udp%f[%W]") then
      local port = tonumber(addr:match(":(%d+)$") or addr:match("^(%d+)$"))
      if port and not seen[port] then
        seen[port] = true
        ports[#ports + 1] = port
      end
    end
  end
  return ports
end
M.listen_ports = listen_ports

local function preamble(self)
  local lines = { "# rendered by spec/helpers/nginx.lua; prefix " .. self.prefix }
  if self.modules then
    for _, mod in ipairs { "ndk_http_module.so", "ngx_http_lua_module.so" } do
      local p = M.MODULES_DIR .. "/" .. mod
      if read_file(p) then -- Debian's dynamic modules; OpenResty has them built in
        lines[#lines + 1] = "load_module " .. p .. ";"
      end
    end
  end
  lines[#lines + 1] = "daemon on;"
  lines[#lines + 1] = "master_process on;"
  lines[#lines + 1] = "worker_processes " .. self.workers .. ";"
  lines[#lines + 1] = "pid logs/nginx.pid;"
  lines[#lines + 1] = "error_log logs/error.log " .. self.log_level .. ";"
  if self.user then lines[#lines + 1] = "user " .. self.user .. ";" end
  return table.concat(lines, "\n") .. "\n"
end

local HTTP_DEFAULTS = {
  { "client_body_temp_path", "client_body_temp_path tmp/client_body;" },
  { "proxy_temp_path", "proxy_temp_path tmp/proxy;" },
  { "fastcgi_temp_path", "fastcgi_temp_path tmp/fastcgi;" },
  { "uwsgi_temp_path", "uwsgi_temp_path tmp/uwsgi;" },
  { "scgi_temp_path", "scgi_temp_path tmp/scgi;" },
  { "access_log", "access_log logs/access.log;" },
}

local function build_conf(self)
  local body = render(self.template, self.vars)
  if self.temp_paths then
    local add = {}
    for _, d in ipairs(HTTP_DEFAULTS) do
      if not body:find("%f[%w_]" .. d[1] .. "%f[^%w_]") then add[#add + 1] = "  " .. d[2] end
    end
    if #add > 0 then
      body = body:gsub("(%f[%w_]http%s*{)", "%1\n" .. table.concat(add, "\n"):gsub("%%", "%%%%"), 1)
    end
  end
  local conf = preamble(self)
  if not body:find("%f[%w_]events%s*{") then
    conf = conf .. "events { worker_connections " .. self.worker_connections .. "; }\n"
  end
  return conf .. "\n" .. body
end

----------------------------------------------------------------------------
-- instances

local registry = {} -- instance -> true, while started
M._registry = registry
local created = {} -- prefixes made by new(), removed by stop_all()
M.KEEP_PREFIX = os.getenv("NGINX_TEST_KEEP_PREFIX") ~= nil

local Instance = {}
Instance.__index = Instance

local function mkdtemp()
  local p = io.popen("mktemp -d /tmp/ngx-dyups-test.XXXXXX")
  local dir = p:read("*l")
  p:close()
  assert(dir and dir ~= "", "mktemp -d failed")
  return dir
end

--- nginx.new{ conf = template, vars = {}, workers = 2, modules = true,
---            temp_paths = true, log_level = "info", watchdog = true,
---            user = nil, umask = nil (e.g. "000": nginx started under it),
---            prefix = nil (default: fresh mktemp -d) }
function M.new(opts)
  opts = opts or {}
  assert(type(opts.conf) == "string", "nginx.new: conf (template string) required")
  local self = setmetatable({}, Instance)
  self.prefix = opts.prefix or mkdtemp()
  if not opts.prefix then created[#created + 1] = self.prefix end
  -- workers run as `nobody` when nginx starts as root: let them read it.
  assert(execute("mkdir -p " .. shell_quote(self.prefix) .. "/logs "
    .. shell_quote(self.prefix) .. "/conf " .. shell_quote(self.prefix) .. "/tmp && chmod 755 "
    .. shell_quote(self.prefix)), "cannot create prefix " .. self.prefix)
  self.workers = opts.workers or 2
  self.worker_connections = opts.worker_connections or 1024
  self.modules = opts.modules ~= false
  self.temp_paths = opts.temp_paths ~= false
  self.watchdog = opts.watchdog ~= false
  self.log_level = opts.log_level or "info"
  self.user = opts.user
  self.umask = opts.umask
  self.nginx = opts.nginx or M.NGINX
  self.conf_path = self.prefix .. "/conf/nginx.conf"
  self.ports = {}
  self:configure(opts.conf, opts.vars)
  return self
end

--- (Re)render the template into conf/nginx.conf. Ports allocated before
--- are kept, so a reload with a new template keeps listening where it did.
function Instance:configure(template, vars)
  self.template = template
  local v = {}
  for k, val in pairs(self.vars or {}) do v[k] = val end
  for k, val in pairs(vars or {}) do v[k] = val end
  v.prefix = self.prefix
  v.repo = M.REPO
  if v.lua_package_path == nil then
    v.lua_package_path = M.REPO .. "/lua/?.lua;" .. M.REPO .. "/lua/?/init.lua;"
      .. M.REPO .. "/spec/?.lua;/usr/share/lua/5.1/?.lua;/usr/share/lua/5.1/?/init.lua;;"
  end
  if v.lua_package_cpath == nil then
    v.lua_package_cpath = M.REPO .. "/lib/?.so;;"
  end
  for name in template:gmatch("%${(port_[%w_]+)}") do
    if v[name] == nil then v[name] = M.free_port() end
  end
  for k, val in pairs(v) do
    local short = type(k) == "string" and k:match("^port_(.+)$")
    if short then self.ports[short] = tonumber(val) end
  end
  self.vars = v
  self.conf = build_conf(self)
  write_file(self.conf_path, self.conf)
  return self.conf
end

function Instance:error_log()
  return read_file(self.prefix .. "/logs/error.log") or ""
end

function Instance:master_pid()
  if self.master and pid_alive(self.master) then return self.master end
  return nil
end

--- Sorted pids of the live worker processes (not those shutting down).
function Instance:worker_pids()
  local master = self.master
  local out = {}
  if not master then return out end
  for _, pid in ipairs(list_pids()) do
    local st = proc_stat(pid)
    if st and st.ppid == master and st.state ~= "Z" then
      local cmd = proc_cmdline(pid) or ""
      if cmd:match("worker process") and not cmd:match("shutting down") then
        out[#out + 1] = pid
      end
    end
  end
  table.sort(out)
  return out
end

--- Every live process of this instance (master, workers, helpers, anything
--- they spawned in the same process group).
function Instance:pids()
  if not self.master then return {} end
  return group_pids(self.master)
end

function Instance:_fail(msg)
  local out = read_file(self.prefix .. "/logs/nginx.out")
  error(("%s\nprefix: %s\n--- nginx output ---\n%s\n--- tail of logs/error.log ---\n%s")
    :format(msg, self.prefix, tail(out, 10), tail(self:error_log(), 30)), 3)
end

local function nginx_cmd(self, extra)
  local umask = self.umask and ("umask " .. assert(tostring(self.umask):match("^[0-7][0-7][0-7]$")) .. "; ") or ""
  return umask .. shell_quote(self.nginx) .. " -p " .. shell_quote(self.prefix .. "/")
    .. " -c conf/nginx.conf" .. (extra or "")
    .. " >" .. shell_quote(self.prefix .. "/logs/nginx.out") .. " 2>&1 </dev/null"
end

-- sh: stop the nginx whose master is $MASTER (SIGQUIT, wait up to 5s, then
-- SIGKILL its process group). Zombie-aware; never fails.
local SH_STOP = [[
alive() { s=$(cat /proc/$1/stat 2>/dev/null) || return 1; s=${s##*) }; case $s in Z*|X*) return 1;; esac; return 0; }
group() {
  for f in /proc/[0-9]*/stat; do
    s=$(cat $f 2>/dev/null) || continue; s=${s##*) }; set -- $s
    [ "$3" = "$MASTER" ] && [ "$1" != Z ] && return 0
  done
  return 1
}
if alive $MASTER; then
  kill -QUIT $MASTER 2>/dev/null
  i=0; while group && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
fi
kill -KILL -- -$MASTER 2>/dev/null
]]

local function spawn_watchdog(self)
  -- Detached (setsid: survives a Ctrl-C to the test's process group), quiet
  -- (must not hold the test's stdout/stderr open), zombie-aware.
  local script = [[
alive() { s=$(cat /proc/$1/stat 2>/dev/null) || return 1; s=${s##*) }; case $s in Z*|X*) return 1;; esac; return 0; }
while alive $OWNER; do alive $MASTER || exit 0; sleep 0.5; done
]] .. SH_STOP .. [[
[ -n "$REMOVE" ] && rm -rf "$REMOVE"
exit 0
]]
  local remove = ""
  if not M.KEEP_PREFIX and self.prefix:match("^/tmp/ngx%-dyups%-test%.[%w]+$") then remove = self.prefix end
  local cmd = ("OWNER=%d MASTER=%d REMOVE=%s setsid sh -c %s >/dev/null 2>&1 </dev/null &")
    :format(C.getpid(), self.master, shell_quote(remove), shell_quote(script))
  execute(cmd)
end

--- Start nginx; returns once every listen port accepts and all workers run.
function Instance:start(opts)
  opts = opts or {}
  local timeout = opts.timeout or M.DEFAULT_TIMEOUT
  if self:master_pid() then error("nginx already running in " .. self.prefix, 2) end
  os.remove(self.prefix .. "/logs/nginx.pid")
  local ok, code = execute(nginx_cmd(self))
  if not ok then self:_fail("nginx failed to start (exit " .. tostring(code) .. ")") end
  local pid_ok, master = pcall(wait_until, function()
    local s = read_file(self.prefix .. "/logs/nginx.pid")
    return s and tonumber(s:match("%d+"))
  end, timeout, "logs/nginx.pid")
  if not pid_ok then self:_fail("nginx started but wrote no pid file") end
  self.master = master
  registry[self] = true
  if self.watchdog then spawn_watchdog(self) end

  local ports = listen_ports(self.conf)
  local ready, err = pcall(wait_until, function()
    if not pid_alive(master) then error("nginx master " .. master .. " exited", 0) end
    for _, port in ipairs(ports) do
      if not M.can_connect(port) then return false end
    end
    return #self:worker_pids() == self.workers
  end, timeout, "nginx to listen on " .. table.concat(ports, ",") .. " with " .. self.workers .. " workers")
  if not ready then
    pcall(self.stop, self)
    self:_fail("nginx did not become ready: " .. tostring(err))
  end
  return self
end

--- Stop: SIGQUIT (graceful), wait for the whole process group, SIGKILL the
--- rest. Idempotent; never raises for an already stopped instance.
function Instance:stop(opts)
  opts = opts or {}
  local master = self.master
  if not master then return true end
  local timeout = opts.timeout or M.DEFAULT_TIMEOUT
  local known = group_pids(master)
  for _, pid in ipairs(self:worker_pids()) do known[#known + 1] = pid end
  local function all_gone()
    for _, pid in ipairs(known) do
      if pid_alive(pid) then return false end
    end
    return #group_pids(master) == 0
  end
  if pid_alive(master) then kill(master, SIGQUIT) end
  local clean = pcall(wait_until, all_gone, timeout, "nginx to quit")
  if not clean then
    kill(-master, SIGKILL)
    for _, pid in ipairs(known) do
      if pid_alive(pid) then kill(pid, SIGKILL) end
    end
    for _, pid in ipairs(group_pids(master)) do kill(pid, SIGKILL) end
    pcall(wait_until, all_gone, 2, "nginx to die")
  end
  registry[self] = nil
  self.master = nil
  return clean
end

--- nginx -s reload (optionally after re-rendering: opts.conf, opts.vars).
--- Waits until `workers` new workers run and (unless opts.wait_old == false)
--- the old ones have exited. Returns the new worker pids.
function Instance:reload(opts)
  opts = opts or {}
  local timeout = opts.timeout or M.DEFAULT_TIMEOUT
  if not self:master_pid() then error("nginx is not running", 2) end
  if opts.conf or opts.vars then self:configure(opts.conf or self.template, opts.vars) end
  local old = self:worker_pids()
  local was = {}
  for _, pid in ipairs(old) do was[pid] = true end
  local ok, code = execute(nginx_cmd(self, " -s reload"))
  if not ok then self:_fail("nginx -s reload failed (exit " .. tostring(code) .. ")") end
  local done, err = pcall(wait_until, function()
    if not self:master_pid() then error("nginx master exited", 0) end
    local now_pids = self:worker_pids()
    if #now_pids ~= self.workers then return false end
    for _, pid in ipairs(now_pids) do
      if was[pid] then return false end
    end
    if opts.wait_old ~= false then
      for _, pid in ipairs(old) do
        if pid_alive(pid) then return false end
      end
    end
    return now_pids
  end, timeout, "new workers after reload")
  if not done then self:_fail("reload did not complete: " .. tostring(err)) end
  return self:worker_pids()
end

--- SIGKILL one worker (default: the first) and wait until the master has
--- respawned a replacement. Returns the new worker's pid.
function Instance:kill_worker(pid, opts)
  opts = opts or {}
  local old = self:worker_pids()
  pid = pid or old[1]
  local was = {}
  for _, p in ipairs(old) do was[p] = true end
  if not was[pid] then error("pid " .. tostring(pid) .. " is not a worker of this nginx", 2) end
  kill(pid, SIGKILL)
  local ok, res = pcall(wait_until, function()
    if pid_alive(pid) then return false end
    local now_pids = self:worker_pids()
    if #now_pids ~= self.workers then return false end
    for _, p in ipairs(now_pids) do
      if not was[p] then return p end
    end
    return false
  end, opts.timeout or M.DEFAULT_TIMEOUT, "a respawned worker")
  if not ok then self:_fail(tostring(res)) end
  return res
end

--- Remove the prefix directory (only when stopped).
function Instance:cleanup()
  self:stop()
  if not M.KEEP_PREFIX and self.prefix:match("^/tmp/ngx%-dyups%-test%.[%w]+$") then
    execute("rm -rf " .. shell_quote(self.prefix))
  end
end

local function remove_prefixes()
  if M.KEEP_PREFIX then return end
  for i = #created, 1, -1 do
    local dir = created[i]
    if dir:match("^/tmp/ngx%-dyups%-test%.[%w]+$") then
      os.execute("rm -rf " .. shell_quote(dir))
    end
    created[i] = nil
  end
end

--- Stop every instance this process started (and has not stopped), then
--- remove the temp prefixes new() made (kept when NGINX_TEST_KEEP_PREFIX is
--- set in the environment, for a post-mortem). Returns how many it stopped.
function M.stop_all()
  local list = {}
  for inst in pairs(registry) do list[#list + 1] = inst end
  for _, inst in ipairs(list) do pcall(inst.stop, inst) end
  remove_prefixes()
  return #list
end

-- Safety nets. The sentinel lives as long as this module (package.loaded
-- holds it), i.e. until lua_close(), which LuaJIT's standalone interpreter
-- runs after a normal end and after an uncaught error, and os.exit(c, true)
-- runs too (busted's exit path). os.exit without `close` skips lua_close, so
-- it is wrapped.
--
-- During lua_close() ffi and lfs are not safe to use any more (a segfault
-- was the result), so the sentinel stops nginx with plain sh only.
function M._final_stop_all()
  for inst in pairs(registry) do
    local master = rawget(inst, "master")
    if master then
      os.execute(("MASTER=%d sh -c %s >/dev/null 2>&1 </dev/null"):format(master, shell_quote(SH_STOP .. "exit 0\n")))
      inst.master = nil
    end
  end
  remove_prefixes()
end

M._sentinel = newproxy(true)
getmetatable(M._sentinel).__gc = function() pcall(M._final_stop_all) end

if not rawget(os, "_dyups_harness_wrapped") then
  local real_exit = os.exit
  os.exit = function(...) -- luacheck: ignore 122
    pcall(M.stop_all)
    return real_exit(...)
  end
  rawset(os, "_dyups_harness_wrapped", true)
end

----------------------------------------------------------------------------
-- HTTP client (curl)

local function tmpname()
  local n = os.tmpname()
  return n
end

--- nginx.http(port, method, path, { headers = {}, body = "", timeout = 5,
---            host = "127.0.0.1" }) -> status, body, headers | nil, err
--- Header names are lower-cased; repeated headers are joined with ", ".
--- `path` may also be a full URL.
function M.http(port, method, path, opts)
  opts = opts or {}
  method = (method or "GET"):upper()
  local url = path
  if not tostring(path):match("^https?://") then
    url = ("http://%s:%d%s"):format(opts.host or "127.0.0.1", port, path or "/")
  end
  local hdr_file, body_file, err_file = tmpname(), tmpname(), tmpname()
  local req_file
  local args = {
    "curl", "-sS", "--max-time", tostring(opts.timeout or M.DEFAULT_TIMEOUT),
    "-o", shell_quote(body_file), "-D", shell_quote(hdr_file), "-w", "'%{http_code}'",
    "-H", "'Expect:'",
  }
  if method == "HEAD" then
    args[#args + 1] = "-I"
  else
    args[#args + 1] = "-X " .. shell_quote(method)
  end
  for k, v in pairs(opts.headers or {}) do
    args[#args + 1] = "-H " .. shell_quote(k .. ": " .. v)
  end
  if opts.body ~= nil then
    req_file = tmpname()
    write_file(req_file, opts.body)
    args[#args + 1] = "--data-binary @" .. shell_quote(req_file)
  end
  args[#args + 1] = shell_quote(url)
  local cmd = table.concat(args, " ") .. " 2>" .. shell_quote(err_file)
  local p = io.popen(cmd)
  local code = p:read("*a")
  p:close()
  local raw_headers = read_file(hdr_file) or ""
  -- with -I curl writes the headers to the -o file too
  local body = method == "HEAD" and "" or (read_file(body_file) or "")
  local err = read_file(err_file) or ""
  for _, f in ipairs { hdr_file, body_file, err_file, req_file } do
    if f then os.remove(f) end
  end
  local status = tonumber(code)
  if not status or status == 0 then
    return nil, "curl " .. method .. " " .. url .. " failed: " .. (err:gsub("%s+$", ""))
  end
  -- keep the last response block (after 1xx interim responses)
  local headers = {}
  local block = raw_headers:gsub("\r", "")
  local last = block
  for b in block:gmatch("(HTTP/[^\n]*\n.-)\n\n") do last = b end
  for line in last:gmatch("[^\n]+") do
    local k, v = line:match("^([^:%s]+):%s*(.-)%s*$")
    if k then
      k = k:lower()
      headers[k] = headers[k] and (headers[k] .. ", " .. v) or v
    end
  end
  return status, body, headers
end

return M
