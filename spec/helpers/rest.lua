-- spec/helpers/rest.lua: small conveniences for the REST and survival specs
-- (the REST interface of ngx.dyups on inst.ports.api, routing by Host on
-- inst.ports.proxy). Built on spec/helpers/nginx.lua, dyups.lua and traffic.lua.
local nginx = require "spec.helpers.nginx"
local dy = require "spec.helpers.dyups"

local M = {}

--- One REST call: status, body, headers (lower-case names).
function M.api(inst, method, path, body, headers)
  local status, rbody, h = nginx.http(inst.ports.api, method, path, { body = body, headers = headers })
  assert(status, rbody) -- curl itself failed (connection refused, timeout)
  return status, rbody, h
end

--- The table version from an ETag header value `"N"` (nil when absent or
--- not of that form).
function M.etag_version(h)
  local v = h and h.etag
  return v and tonumber(v:match('^"(%d+)"$'))
end

-- JSON: the one decoder the specs share; and traffic.lua's sorted keys.
do
  local T = require "spec.helpers.traffic"
  M.decode = T.json_decode
  M.null = T.NULL
  --- The keys of a set, sorted (for messages and comparisons).
  M.keys = T.keys
end

--- `n` requests routed by `Host: host` on new connections. Returns a list of
--- { status =, port =, worker =, body = } and the set of ports seen.
function M.route(inst, host, n)
  local out, ports = {}, {}
  for i = 1, n do
    local status, port, worker, body = dy.get(inst, "/", { Host = host })
    out[i] = { status = status, port = port, worker = worker, body = body }
    if port then ports[port] = (ports[port] or 0) + 1 end
  end
  return out, ports
end

--- A readable one-line summary of what M.route returned.
function M.show(list)
  local parts = {}
  for _, r in ipairs(list) do
    parts[#parts + 1] = ("%s:%s@%s"):format(tostring(r.status), tostring(r.port), tostring(r.worker))
  end
  return table.concat(parts, " ")
end

--- Requests `Host: host` until worker `pid` answers (reuseport spreads new
--- connections over the workers); returns that answer's status, port, body.
function M.route_via(inst, host, pid, tries)
  for _ = 1, tries or 200 do
    local status, port, worker, body = dy.get(inst, "/", { Host = host })
    if worker == pid then return status, port, body end
  end
  error("worker " .. tostring(pid) .. " never answered Host: " .. host)
end

--- A copy of list `t`, sorted.
function M.sorted(t)
  local out = {}
  for i, v in ipairs(t) do out[i] = v end
  table.sort(out)
  return out
end

--- Runs `sh` in the background.
function M.background(sh)
  assert(nginx.execute("(" .. sh .. ") >/dev/null 2>&1 </dev/null &"))
end

return M
