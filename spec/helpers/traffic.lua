-- spec/helpers/traffic.lua: fast HTTP traffic for the ngx.dyups specs.
--
-- nginx.http() forks curl per request (~10 ms); the balancer specs send
-- hundreds of requests, so this is a tiny HTTP/1.x client over ffi sockets:
-- every T.request() opens a NEW connection (so reuseport spreads requests
-- over the workers), T.conn() keeps one connection open (to talk to one
-- worker on purpose). Plus JSON decoding (through dkjson, busted's own) and
-- helpers to snapshot the module's table inside a worker.
local ffi = require "ffi"
local bit = require "bit"
local nginx = require "spec.helpers.nginx" -- declares socket/connect/close/poll/kill

pcall(ffi.cdef, [[
  struct dyups_pollfd { int fd; short events; short revents; };
  long read(int fd, void *buf, unsigned long n);
  long write(int fd, const void *buf, unsigned long n);
]])

local C = ffi.C
local POLLIN, POLLOUT = 1, 4

local T = {}

----------------------------------------------------------------------------
-- monotonic-enough clock (sub-second): nginx.now, /proc/uptime

T.now = nginx.now

----------------------------------------------------------------------------
-- sockets

local function sockaddr(port)
  local sa = ffi.new("struct dyups_sockaddr_in")
  sa.sin_family = 2
  if ffi.abi("le") then
    sa.sin_port = bit.rshift(bit.bswap(port), 16)
    sa.sin_addr = bit.bswap(0x7f000001)
  else
    sa.sin_port = port
    sa.sin_addr = 0x7f000001
  end
  return sa
end

local function wait_fd(fd, events, deadline)
  local pfd = ffi.new("struct dyups_pollfd[1]")
  pfd[0].fd = fd
  pfd[0].events = events
  while true do
    local left = math.floor((deadline - T.now()) * 1000)
    if left <= 0 then return false end
    pfd[0].revents = 0
    local rc = C.poll(pfd, 1, left)
    if rc > 0 then return true end
    if rc < 0 and ffi.errno() ~= 4 then return false end -- EINTR: retry
  end
end

local Conn = {}
Conn.__index = Conn

--- T.conn(port) -> a connection (blocking connect to 127.0.0.1:port).
function T.conn(port)
  local fd = C.socket(2, bit.bor(1, 0x80000), 0)
  assert(fd >= 0, "socket() failed")
  local sa = sockaddr(port)
  if C.connect(fd, sa, ffi.sizeof(sa)) ~= 0 then
    local e = ffi.errno()
    C.close(fd)
    return nil, "connect() to " .. port .. " failed: errno " .. e
  end
  return setmetatable({ fd = fd, port = port, buf = "" }, Conn)
end

function Conn:close()
  if self.fd then C.close(self.fd) end
  self.fd = nil
end

function Conn:_send(data, deadline)
  local p = ffi.cast("const char *", data)
  local off = 0
  while off < #data do
    if not wait_fd(self.fd, POLLOUT, deadline) then return nil, "timeout writing" end
    local n = tonumber(C.write(self.fd, p + off, #data - off))
    if n <= 0 then return nil, "write failed: errno " .. ffi.errno() end
    off = off + n
  end
  return true
end

local chunk = ffi.new("char[65536]")

-- read more bytes into self.buf; false on EOF, nil+err on timeout
function Conn:_fill(deadline)
  if not wait_fd(self.fd, POLLIN, deadline) then return nil, "timeout" end
  local n = tonumber(C.read(self.fd, chunk, 65536))
  if n < 0 then return nil, "read failed: errno " .. ffi.errno() end
  if n == 0 then return false end
  self.buf = self.buf .. ffi.string(chunk, n)
  return true
end

function Conn:_need(pred, deadline)
  while true do
    local r = pred()
    if r then return r end
    local ok, err = self:_fill(deadline)
    if not ok then return nil, err or "connection closed" end
  end
end

--- conn:send(method, path, { headers = {}, body = nil, timeout = 5,
---   close = false, body_after = nil }) -> true | nil, err
--- Sends one request without waiting for its answer (read it with
--- conn:response). body_after: seconds to wait between sending the head and
--- the body. HTTP/1.1 with keep-alive unless opts.close ("Connection: close").
function Conn:send(method, path, opts)
  opts = opts or {}
  local deadline = T.now() + (opts.timeout or 5)
  local lines = { ("%s %s HTTP/1.1"):format(method, path) }
  local headers = opts.headers or {}
  local has_host = false
  for k, v in pairs(headers) do
    if k:lower() == "host" then has_host = true end
    lines[#lines + 1] = k .. ": " .. v
  end
  if not has_host then lines[#lines + 1] = "Host: 127.0.0.1:" .. self.port end
  if opts.close then lines[#lines + 1] = "Connection: close" end
  if opts.body then lines[#lines + 1] = "Content-Length: " .. #opts.body end
  local request_head = table.concat(lines, "\r\n") .. "\r\n\r\n"
  if opts.body_after then
    -- The body in a later packet, as slow clients send it.
    local ok, err = self:_send(request_head, deadline)
    if not ok then return nil, err end
    nginx.sleep(opts.body_after)
    return self:_send(opts.body or "", deadline)
  end
  return self:_send(request_head .. (opts.body or ""), deadline)
end

--- conn:response({ timeout = 5, head = false }) -> status, body, headers | nil, err
--- Reads the answer to a request sent before (opts.head: to a HEAD request).
function Conn:response(opts)
  opts = opts or {}
  local deadline = T.now() + (opts.timeout or 5)
  local head_end, e1 = self:_need(function() return self.buf:find("\r\n\r\n", 1, true) end, deadline)
  if not head_end then return nil, "no response head: " .. tostring(e1) end
  local head = self.buf:sub(1, head_end - 1)
  self.buf = self.buf:sub(head_end + 4)
  local status = tonumber(head:match("^HTTP/%d%.%d (%d%d%d)"))
  if not status then return nil, "bad status line: " .. head:sub(1, 80) end
  local h = {}
  for line in head:gmatch("[^\r\n]+") do
    local k, v = line:match("^([^:%s]+):%s*(.-)%s*$")
    if k then
      k = k:lower()
      h[k] = h[k] and (h[k] .. ", " .. v) or v
    end
  end

  local body
  if opts.head or status == 204 or status == 304 then
    body = ""
  elseif h["content-length"] then
    local len = tonumber(h["content-length"])
    local got, e2 = self:_need(function() return #self.buf >= len end, deadline)
    if not got then return nil, "short body: " .. tostring(e2) end
    body = self.buf:sub(1, len)
    self.buf = self.buf:sub(len + 1)
  elseif (h["transfer-encoding"] or ""):lower():find("chunked") then
    local parts = {}
    while true do
      local le, e3 = self:_need(function() return self.buf:find("\r\n", 1, true) end, deadline)
      if not le then return nil, "bad chunk: " .. tostring(e3) end
      local size = tonumber(self.buf:sub(1, le - 1):match("^%x+"), 16)
      if not size then return nil, "bad chunk size" end
      self.buf = self.buf:sub(le + 2)
      if size == 0 then
        local te = self:_need(function() return self.buf:find("\r\n", 1, true) end, deadline)
        if te then self.buf = self.buf:sub(te + 2) end
        break
      end
      local got, e4 = self:_need(function() return #self.buf >= size + 2 end, deadline)
      if not got then return nil, "short chunk: " .. tostring(e4) end
      parts[#parts + 1] = self.buf:sub(1, size)
      self.buf = self.buf:sub(size + 3)
    end
    body = table.concat(parts)
  else
    -- until EOF
    while true do
      local ok2, e5 = self:_fill(deadline)
      if ok2 == nil then return nil, "body: " .. tostring(e5) end
      if ok2 == false then break end
    end
    body = self.buf
    self.buf = ""
  end
  return status, body, h
end

--- conn:request(method, path, opts) -> status, body, headers | nil, err:
--- conn:send, then conn:response (same opts).
function Conn:request(method, path, opts)
  opts = opts or {}
  local ok, err = self:send(method, path, opts)
  if not ok then return nil, err end
  return self:response { timeout = opts.timeout, head = method == "HEAD" }
end

--- One request over a new connection, closed afterwards.
--- T.request(port, method, path, opts) -> status, body, headers | nil, err
function T.request(port, method, path, opts)
  local c, err = T.conn(port)
  if not c then return nil, err end
  opts = opts or {}
  local o = { headers = opts.headers, body = opts.body, timeout = opts.timeout, close = true,
              body_after = opts.body_after }
  local status, body, h = c:request(method or "GET", path, o)
  c:close()
  return status, body, h
end

--- GET through the proxy over a new connection:
--- status, backend port, worker pid, body (or nil, err)
function T.get(inst, path, headers, timeout)
  local status, body, h = T.request(inst.ports.proxy, "GET", path or "/local",
    { headers = headers, timeout = timeout })
  if not status then return nil, body end
  return status, tonumber(body:match("^(%d+) ")), tonumber(h["x-worker"]), body
end

--- n GETs, each over a new connection. Returns a summary:
---   { n, status = {code=count}, port = {port=count}, pid = {pid=count},
---     seq = { pid = {port, port, ...} }  -- ports in order, per worker
---     list = { {status, port, pid, body, creq}, ... } }
--- A request that fails at the transport level counts as status "err".
function T.burst(inst, n, path, headers, each)
  local s = { n = n, status = {}, port = {}, pid = {}, seq = {}, list = {}, pids = 0, ports = 0 }
  for i = 1, n do
    local status, port, pid, body = T.get(inst, path, headers)
    local key = status or "err"
    s.status[key] = (s.status[key] or 0) + 1
    if port then
      if not s.port[port] then s.ports = s.ports + 1 end
      s.port[port] = (s.port[port] or 0) + 1
    end
    if pid then
      if not s.pid[pid] then s.pids = s.pids + 1 end
      s.pid[pid] = (s.pid[pid] or 0) + 1
      s.seq[pid] = s.seq[pid] or {}
      s.seq[pid][#s.seq[pid] + 1] = port or false
    end
    local creq = type(body) == "string" and tonumber(body:match("^%d+ (%d+)")) or nil
    s.list[i] = { status = status, port = port, pid = pid, body = body, creq = creq }
    if each then each(i, s.list[i]) end
  end
  return s
end

--- Short description of a burst summary for assertion messages.
function T.describe(s)
  local function kv(t)
    local out = {}
    for k, v in pairs(t) do out[#out + 1] = tostring(k) .. "=" .. tostring(v) end
    table.sort(out)
    return "{" .. table.concat(out, " ") .. "}"
  end
  return ("n=%d status=%s ports=%s pids=%s"):format(s.n, kv(s.status), kv(s.port), kv(s.pid))
end

----------------------------------------------------------------------------
-- processes

function T.proc_state(pid)
  local s = nginx.read_file("/proc/" .. pid .. "/stat")
  return s and s:match("^.*%) (%S)")
end

--- SIGSTOP a pid and wait until the kernel reports it stopped.
function T.stop_pid(pid)
  assert(nginx.execute("kill -STOP " .. pid))
  nginx.wait_until(function() return T.proc_state(pid) == "T" end, 2, "pid " .. pid .. " stopped")
end

function T.cont_pid(pid)
  return nginx.execute("kill -CONT " .. pid .. " 2>/dev/null")
end

--- Open new connections to the proxy until one is served by `pid`
--- (probing with a harmless GET `probe_path`, short timeout: connections
--- that land on a stopped worker just time out). Returns the open conn and
--- the probe's status, body, headers.
function T.conn_to(inst, pid, probe_path, tries)
  for _ = 1, tries or 60 do
    local c = T.conn(inst.ports.proxy)
    if c then
      local status, body, h = c:request("GET", probe_path or "/ups/check", { timeout = 0.3 })
      if status and tonumber(h["x-worker"]) == pid then return c, status, body, h end
      c:close()
    end
  end
  error("no connection served by worker " .. pid)
end

--- Count lines of `text` matching a plain substring (all given must match).
function T.count_lines(text, ...)
  local needles = { ... }
  local n = 0
  for line in text:gmatch("[^\n]+") do
    local all = true
    for _, s in ipairs(needles) do
      if not line:find(s, 1, true) then all = false break end
    end
    if all then n = n + 1 end
  end
  return n
end

----------------------------------------------------------------------------
-- JSON, through dkjson (a dependency of busted): it marks objects and arrays
-- with a __jsontype metatable, so `{}` and `[]` stay apart.

local dkjson = require "dkjson"
T.NULL = dkjson.null -- JSON null (keeps the key present)

function T.json_kind(v)
  if v == T.NULL then return "null" end
  local mt = type(v) == "table" and getmetatable(v)
  return mt and mt.__jsontype or type(v)
end

--- The keys of a set or a decoded JSON object, sorted.
function T.keys(t)
  local out = {}
  for k in pairs(t) do out[#out + 1] = k end
  table.sort(out)
  return out
end

function T.json_decode(str)
  local v, _, err = dkjson.decode(str, 1, T.NULL)
  if err then error("json: " .. err .. " in " .. str, 0) end
  return v
end

----------------------------------------------------------------------------
-- module state, read inside a worker through /lua

-- Lua source defining ser(v): a deterministic serialization (sorted keys).
T.SER = [[
local function ser(v)
  if type(v) ~= "table" then
    return type(v) == "string" and string.format("%q", v) or tostring(v)
  end
  local keys = {}
  for k in pairs(v) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  local out = {}
  for _, k in ipairs(keys) do out[#out + 1] = "[" .. ser(k) .. "]=" .. ser(v[k]) end
  return "{" .. table.concat(out, ",") .. "}"
end
local dyups = require("ngx.dyups")
]]

--- POST Lua source (with ser() and dyups predefined) to /lua over a new
--- connection; returns the printed text (asserts 200).
function T.run(inst, code)
  local status, body = T.request(inst.ports.proxy, "POST", "/lua", { body = T.SER .. code })
  assert(status == 200, "lua snippet failed: " .. tostring(status) .. " " .. tostring(body))
  return (body:gsub("\n$", ""))
end

--- Serialized snapshot of the whole table: version, list, every upstream.
function T.snapshot(inst)
  return T.run(inst, [[
local names = dyups.list()
table.sort(names)
local out = { "version=" .. tostring(dyups.version()) }
for _, n in ipairs(names) do out[#out + 1] = n .. "=" .. ser(dyups.get(n)) end
return table.concat(out, "\n")
]])
end

--- { ["IP:PORT"] = {down=, backup=, weight=, ...} } of upstream `name`
--- decoded from get() (via a small line format).
function T.servers(inst, name)
  local text = T.run(inst, ([[
local u = dyups.get(%q)
if not u then return "NONE" end
local out = {}
for _, s in ipairs(u.servers) do
  out[#out + 1] = table.concat({ s.addr, tostring(s.down), tostring(s.backup), tostring(s.weight) }, " ")
end
return table.concat(out, "\n")
]]):format(name))
  if text == "NONE" then return nil end
  local out, order = {}, {}
  for line in text:gmatch("[^\n]+") do
    local addr, down, backup, weight = line:match("^(%S+) (%S+) (%S+) (%S+)$")
    out[addr] = { down = down == "true", backup = backup == "true", weight = tonumber(weight) }
    order[#order + 1] = addr
  end
  return out, order
end

return T
