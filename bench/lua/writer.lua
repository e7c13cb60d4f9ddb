-- bench/lua/writer.lua: the REST writer of section 4's churn runs, in plain
-- LuaJIT (not wrk): one keep-alive connection to the admin port, a steady
-- RATE of `POST /upstream/NAME` for SECS seconds, each replacing a random
-- one of NAMES with 1 to 4 of BACKENDS (ports on 127.0.0.1). Raw sockets
-- through the FFI, so that the writer's own CPU (a few µs a write) does not
-- take the machine from the traffic it measures, as a Python client's does.
--
--   luajit writer.lua API_PORT RATE SECS NAME[,NAME...] PORT[,PORT...] [read]
--
-- With `read`, it sends `GET /list` instead, at the same rate: what the
-- admin requests cost without the writes.
-- Prints one line: `ok N failed M secs S p50 X p99 Y` (latencies in
-- seconds, client side, request sent to answer read).
local ffi = require "ffi"
local bit = require "bit"

ffi.cdef [[
  struct bench_sockaddr_in { uint16_t family; uint16_t port; uint32_t addr; uint8_t zero[8]; };
  struct bench_timespec { long sec; long nsec; };
  int socket(int, int, int);
  int connect(int, const struct bench_sockaddr_in *, uint32_t);
  int setsockopt(int, int, int, const void *, uint32_t);
  long write(int, const void *, size_t);
  long read(int, void *, size_t);
  int close(int);
  int poll(void *, unsigned long, int);
  int clock_gettime(int, struct bench_timespec *);
]]
local C = ffi.C

local api_port, rate, secs = tonumber(arg[1]), tonumber(arg[2]), tonumber(arg[3])
local names, backends = {}, {}
for n in arg[4]:gmatch("[^,]+") do names[#names + 1] = n end
for p in arg[5]:gmatch("[^,]+") do backends[#backends + 1] = tonumber(p) end
local reading = arg[6] == "read"

local ts = ffi.new("struct bench_timespec")
local function now()
    C.clock_gettime(1, ts)
    return tonumber(ts.sec) + tonumber(ts.nsec) * 1e-9
end

local function connect()
    local fd = C.socket(2, 1, 0)
    assert(fd >= 0, "socket() failed")
    local sa = ffi.new("struct bench_sockaddr_in")
    sa.family = 2
    sa.port = bit.rshift(bit.bswap(api_port), 16)
    sa.addr = bit.bswap(0x7f000001)
    assert(C.connect(fd, sa, ffi.sizeof(sa)) == 0, "connect() to the admin port failed")
    C.setsockopt(fd, 6, 1, ffi.new("int[1]", 1), 4) -- TCP_NODELAY
    return fd
end

local buf = ffi.new("uint8_t[65536]")
local fd, pending = connect(), ""

-- Reads until `pending` holds `n` bytes or a `sep`; false when the
-- connection dropped.
local function fill()
    local n = tonumber(C.read(fd, buf, 65536))
    if n <= 0 then return false end
    pending = pending .. ffi.string(buf, n)
    return true
end

local function take_until(sep)
    while true do
        local at = pending:find(sep, 1, true)
        if at then
            local out = pending:sub(1, at - 1)
            pending = pending:sub(at + #sep)
            return out
        end
        if not fill() then return nil end
    end
end

local function take(n)
    while #pending < n do
        if not fill() then return nil end
    end
    local out = pending:sub(1, n)
    pending = pending:sub(n + 1)
    return out
end

-- One request, answered (nginx sends ngx.print's body chunked): the status,
-- or nil when the connection dropped.
local function request(path, body)
    local req = reading and "GET /list HTTP/1.1\r\nHost: bench\r\n\r\n"
        or ("POST %s HTTP/1.1\r\nHost: bench\r\nContent-Length: %d\r\n\r\n%s"):format(path, #body, body)
    if C.write(fd, req, #req) ~= #req then return nil end
    local head = take_until("\r\n\r\n")
    if not head then return nil end
    local status = tonumber(head:match("^HTTP/1%.%d (%d%d%d)"))
    local lower = head:lower()
    if lower:find("transfer%-encoding: *chunked") then
        while true do
            local size = take_until("\r\n")
            size = size and tonumber(size:match("^%x+"), 16)
            if not size then return nil end
            if size == 0 then
                if not take_until("\r\n") then return nil end
                break
            end
            if not take(size + 2) then return nil end
        end
    elseif not take(tonumber(lower:match("content%-length: *(%d+)")) or 0) then
        return nil
    end
    return status
end

local ok, failed, lat = 0, 0, {}
local t0 = now()
local k = 0
while now() - t0 < secs do
    -- 1 to 4 distinct backends, in a random order
    for i = #backends, 2, -1 do
        local j = math.random(i)
        backends[i], backends[j] = backends[j], backends[i]
    end
    local picked = {}
    for i = 1, math.random(1, #backends) do
        picked[i] = ("server 127.0.0.1:%d;"):format(backends[i])
    end
    local t = now()
    local status = request("/upstream/" .. names[math.random(#names)], table.concat(picked, " "))
    if not status then
        C.close(fd)
        fd, pending = connect(), ""
    end
    lat[#lat + 1] = now() - t
    if status == 200 then ok = ok + 1 else failed = failed + 1 end
    k = k + 1
    local wait = t0 + k / rate - now()
    if wait > 0 then C.poll(nil, 0, math.floor(wait * 1000 + 0.5)) end
end
local took = now() - t0
C.close(fd)
table.sort(lat)
local function pct(p) return lat[math.max(1, math.ceil(#lat * p / 100))] or 0 end
print(("ok %d failed %d secs %.3f p50 %.6f p99 %.6f"):format(ok, failed, took, pct(50), pct(99)))
