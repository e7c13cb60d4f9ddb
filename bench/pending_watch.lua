-- bench/pending_watch.lua: the idle-propagation observer of `make bench`.
--
--   luajit bench/pending_watch.lua REPO STATE_FILE SIZE
--
-- Loads lib/ngx/dyups.so in plain LuaJIT (outside nginx) on the proxy's
-- state file, so watching sends no request to any worker. Prints "ready",
-- then for every "wait LIMIT" line on stdin polls dyups.pending() (what
-- /ups/check answers: the changes some live worker has not applied) every
-- 0.2 ms until it is empty or LIMIT seconds passed, and prints
-- "POLLS SECONDS".
local repo, path, size = arg[1], arg[2], arg[3]
package.cpath = repo .. "/lib/?.so;" .. package.cpath

local ffi = require "ffi"
ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
  int clock_gettime(int clk, bench_timespec *ts);
  int poll(void *fds, unsigned long nfds, int timeout);
  int usleep(unsigned int usec);
]]
local ts = ffi.new("bench_timespec")
local function now()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

local dyups = require "ngx.dyups"
local ok, err = dyups.init { path = path, size = size }
if not ok then
  io.write("error ", tostring(err), "\n")
  os.exit(1)
end
io.write("ready\n")
io.stdout:flush()

for line in io.stdin:lines() do
  local limit = tonumber(line:match("^wait%s+(%S+)")) or 3
  local t0, polls = now(), 0
  while true do
    local p = dyups.pending()
    polls = polls + 1
    if p and next(p) == nil then break end
    if now() - t0 > limit then break end
    ffi.C.usleep(200)
  end
  io.write(string.format("%d %.6f\n", polls, now() - t0))
  io.stdout:flush()
end
