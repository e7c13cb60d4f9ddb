-- spec/helpers/demo.lua: the configurations of examples/ run by the specs,
-- on free ports: through the harness (nginx.lua), or through
-- scripts/demo.sh with DEMO_PORTS.
local nginx = require "spec.helpers.nginx"

local M = {}

local q = nginx.shell_quote
M.PORTS = { 8080, 8081, 8088, 8089, 8090 }

--- A free port standing in for each of the demo's: { [8080] = 41234, ... }.
function M.free_ports()
  local P = {}
  for _, port in ipairs(M.PORTS) do P[port] = nginx.free_port() end
  return P
end

--- `127.0.0.1:PORT` -> `127.0.0.1:ports[PORT]` (other addresses stay).
function M.with_ports(text, ports)
  return (text:gsub("127%.0%.0%.1:(%d+)%f[%D]", function(p)
    local to = ports[tonumber(p)]
    return to and ("127.0.0.1:" .. to) or nil
  end))
end

--- An example's nginx.conf as a harness template: the harness writes the
--- main context's pid, error_log, workers and daemon itself, and `${` is
--- its template syntax.
function M.as_template(conf)
  local out = {}
  for line in (conf .. "\n"):gmatch("(.-)\n") do
    if not (line:match("^master_process%s") or line:match("^worker_processes%s")
        or line:match("^pid%s") or line:match("^error_log%s") or line:match("^daemon%s")) then
      out[#out + 1] = line
    end
  end
  return (table.concat(out, "\n"):gsub("%${", "$${"))
end

--- The text of examples/NAME/FILE (NAME nil: examples/FILE).
function M.file(name, file)
  local path = nginx.REPO .. "/examples/" .. (name and (name .. "/") or "") .. file
  return assert(nginx.read_file(path), path .. " is missing")
end

--- An nginx (not started) running examples/NAME/nginx.conf (NAME nil:
--- examples/nginx.conf, the demo), with `edit`
--- applied to its text when given, and the example's other *.conf files
--- in conf/, on the ports `P` stands in for; its prefix laid out as
--- scripts/demo.sh lays it out.
function M.example(name, P, edit)
  local conf = M.with_ports(M.file(name, "nginx.conf"), P)
  if edit then conf = edit(conf) end
  local inst = nginx.new { workers = 2, conf = M.as_template(conf) }
  assert(nginx.execute("mkdir -p " .. q(inst.prefix .. "/state")
    .. " && ln -s " .. q(nginx.REPO .. "/lib") .. " " .. q(inst.prefix .. "/lib")
    .. " && ln -s " .. q(nginx.REPO .. "/lua") .. " " .. q(inst.prefix .. "/lua")
    .. " && ln -s " .. q(nginx.REPO .. "/lua") .. " " .. q(inst.prefix .. "/ngx_lua")))
  local p = io.popen("cd " .. q(nginx.REPO .. "/examples/" .. (name or "")) .. " && ls *.conf")
  for file in p:lines() do
    if file ~= "nginx.conf" then
      nginx.write_file(inst.prefix .. "/conf/" .. file, M.with_ports(M.file(name, file), P))
    end
  end
  p:close()
  return inst
end

--- Runs scripts/demo.sh (in its own process group, as a shell job) with
--- `env` ("EXAMPLE=x DEMO_PORTS=..."). Returns a handle: output(), and
--- stop() which sends SIGINT and returns whether the script and every
--- nginx process of its prefix are gone within 10 s. Whatever happens,
--- cleanup() kills what is left (call it from a `finally`).
function M.script(env)
  local out_file = os.tmpname()
  local p = io.popen("cd " .. q(nginx.REPO) .. " && KEEP= " .. env .. " setsid bash scripts/demo.sh >"
    .. q(out_file) .. " 2>&1 </dev/null & echo $!")
  local h = { pid = tonumber(p:read("*l")) }
  p:close()
  assert(h.pid, "scripts/demo.sh did not start")

  function h.output() return nginx.read_file(out_file) or "" end

  --- Waits for the instructions; sets h.prefix and h.master.
  function h.started()
    local text = nginx.wait_until(function()
      if not nginx.pid_alive(h.pid) then error("scripts/demo.sh exited:\n" .. h.output(), 0) end
      local s = h.output()
      return s:find("Press Ctrl-C", 1, true) and s
    end, 15, "the demo's instructions")
    h.prefix = text:match("prefix%s+(/tmp/ngx%-dyups%-demo%.[%w]+)")
    h.master = tonumber(text:match("master pid (%d+)"))
    return text
  end

  -- nginx processes whose command line names the prefix (the master), or
  -- in the master's process group (its workers).
  function h.leftovers()
    local left = h.master and nginx.group_pids(h.master) or {}
    local ls = io.popen("ls /proc")
    for name in ls:lines() do
      local pid = tonumber(name)
      local cmd = pid and h.prefix and nginx.read_file("/proc/" .. pid .. "/cmdline")
      if cmd and cmd:find("nginx", 1, true) and cmd:find(h.prefix, 1, true) and nginx.pid_alive(pid) then
        left[#left + 1] = pid
      end
    end
    ls:close()
    return left
  end

  function h.stop()
    nginx.execute("kill -INT " .. h.pid)
    return pcall(nginx.wait_until, function()
      return not nginx.pid_alive(h.pid) and #h.leftovers() == 0
    end, 10, "the demo to stop")
  end

  function h.cleanup()
    if h.master then nginx.execute("kill -KILL -- -" .. h.master .. " 2>/dev/null") end
    nginx.execute("kill -KILL -- -" .. h.pid .. " 2>/dev/null")
    if h.prefix and h.prefix:match("^/tmp/ngx%-dyups%-demo%.[%w]+$") then nginx.execute("rm -rf " .. q(h.prefix)) end
    os.remove(out_file)
  end

  return h
end

return M
