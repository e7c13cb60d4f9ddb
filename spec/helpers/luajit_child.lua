-- spec/helpers/luajit_child.lua: run Lua code in separate `luajit`
-- processes (not threads, not coroutines) so specs can prove that several
-- processes share one ngx.dyups state file.
--
--   local child = require "spec.helpers.luajit_child"
--   local h = child.spawn(dir, [[
--     local dyups = require "ngx.dyups"
--     assert(dyups.init{ path = ARGS.path })
--     return { version = dyups.version() }     -- sent back to the parent
--   ]], { path = "/tmp/x/state" })
--   local result = h:wait()                    -- the returned table (raises on failure)
--
-- The child runs with package.cpath = <repo>/lib/?.so and package.path
-- covering the repo, gets the `args` table as global ARGS, and may call
-- (global) child.wait_for_file(path [, timeout_s, spin]) to wait at a start
-- barrier and child.sleep_ms(ms). Its return value
-- (a table of strings, numbers, booleans and nested tables) is serialized on
-- stdout and deserialized by wait(). Several children spawned before any
-- wait() run concurrently (io.popen does not wait).

local M = {}

local function shell_quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

local function repo_root()
  local src = debug.getinfo(1, "S").source:gsub("^@", "")
  local dir = src:gsub("/?spec/helpers/luajit_child%.lua$", "")
  if dir == "" then dir = "." end
  if dir:sub(1, 1) ~= "/" then
    local p = io.popen("pwd")
    local cwd = p:read("*l")
    p:close()
    dir = (dir == ".") and cwd or (cwd .. "/" .. dir)
  end
  return dir
end
M.REPO = repo_root()
M.LUAJIT = os.getenv("LUAJIT") or "luajit"

--- A Lua source literal for v (tables, strings, numbers, booleans).
local function serialize(v)
  local t = type(v)
  if t == "string" then
    -- %q writes a newline as backslash + newline: keep the output on one line
    return (("%q"):format(v):gsub("\\\n", "\\n"))
  elseif t == "number" then
    if v ~= v then return "0/0" end
    if v == math.huge then return "math.huge" end
    if v == -math.huge then return "-math.huge" end
    return ("%.17g"):format(v)
  elseif t == "boolean" or t == "nil" then
    return tostring(v)
  elseif t == "table" then
    local parts = {}
    for k, val in pairs(v) do
      parts[#parts + 1] = "[" .. serialize(k) .. "]=" .. serialize(val)
    end
    table.sort(parts)
    return "{" .. table.concat(parts, ",") .. "}"
  end
  return serialize(tostring(v))
end
M.serialize = serialize

local sleep_ms
do
  local ok, ffi = pcall(require, "ffi")
  if ok then
    pcall(ffi.cdef, "int poll(void *fds, unsigned long nfds, int timeout);")
    sleep_ms = function(ms) ffi.C.poll(nil, 0, ms) end
  else
    sleep_ms = function() os.execute("sleep 0.001") end
  end
end
--- child.sleep_ms(ms): a short sleep without spawning a shell.
M.sleep_ms = sleep_ms

--- Poll until `path` exists (a start barrier), at most timeout_s; with
--- `spin` it does not sleep between checks (children start together).
function M.wait_for_file(path, timeout_s, spin)
  local deadline = os.time() + (timeout_s or 10)
  while true do
    local f = io.open(path, "rb")
    if f then f:close() return true end
    if os.time() > deadline then error("timed out waiting for " .. path) end
    if not spin then sleep_ms(1) end
  end
end

local MARK = "\n@@RESULT@@"

local PRELUDE = [[
package.cpath = %s .. "/lib/?.so;" .. package.cpath
package.path = %s .. "/?.lua;" .. %s .. "/spec/?.lua;" .. %s .. "/lua/?.lua;" .. package.path
child = require "spec.helpers.luajit_child" -- global: the code uses it
ARGS = loadstring("return " .. %s)()
local body = assert(loadstring(%s, "=child"))
local ok, res = pcall(body)
io.stdout:write(%q)
if ok then
  io.stdout:write(child.serialize({ ok = true, result = res }))
else
  io.stdout:write(child.serialize({ ok = false, err = tostring(res) }))
end
io.stdout:write("\n")
io.stdout:flush()
os.exit(ok and 0 or 3)
]]

local Handle = {}
Handle.__index = Handle

--- Start `code` in a new luajit process; `dir` is a directory for the
--- script file (the caller removes it). Returns a handle with :wait().
function M.spawn(dir, code, args)
  M._n = (M._n or 0) + 1
  local script = ("%s/child-%d-%d.lua"):format(dir, M._n, math.random(1, 1e9))
  local q = ("%q"):format(M.REPO)
  local src = PRELUDE:format(q, q, q, q, ("%q"):format(serialize(args or {})),
    ("%q"):format(code), MARK)
  local f = assert(io.open(script, "wb"))
  assert(f:write(src))
  f:close()
  local cmd = "cd " .. shell_quote(M.REPO) .. " && " .. M.LUAJIT .. " " .. shell_quote(script)
    .. " 2>&1; echo \"@@EXIT=$?\""
  local p = assert(io.popen(cmd, "r"))
  return setmetatable({ pipe = p, script = script }, Handle)
end

--- Wait for the child to exit; returns what its code returned. Raises with
--- the child's output when it failed, exited non-zero or printed no result.
function Handle:wait()
  local out = self.pipe:read("*a")
  self.pipe:close()
  os.remove(self.script)
  local code = tonumber(out:match("@@EXIT=(%d+)%s*$"))
  local payload = out:match(MARK:gsub("%p", "%%%0") .. "([^\n]*)\n")
  local res
  if payload then
    local fn = loadstring("return " .. payload)
    res = fn and fn()
  end
  if not res then
    error(("child produced no result (exit %s); output:\n%s"):format(tostring(code), out), 2)
  end
  if not res.ok then
    error(("child raised: %s\noutput:\n%s"):format(res.err, out), 2)
  end
  if code ~= 0 then
    error(("child exited %s; output:\n%s"):format(tostring(code), out), 2)
  end
  return res.result
end

--- spawn + wait.
function M.run(dir, code, args)
  return M.spawn(dir, code, args):wait()
end

return M
