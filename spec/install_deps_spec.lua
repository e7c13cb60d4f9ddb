-- scripts/install-deps.sh (run by `make test` and `make demo`) leaves the
-- host's own nginx alone: a "production" nginx that runs when it starts runs,
-- serves and keeps its workers when it ends.
--
-- The old script read /run/nginx.pid and killed that process. A stand-in for
-- the host's nginx therefore announces itself there, as Debian's nginx does,
-- when no nginx of the host does already (the file is ours then, and removed
-- again). When the host's nginx owns /run/nginx.pid it is only looked at.
local nginx = require "spec.helpers.nginx"

local SYSTEM_PID_FILE = "/run/nginx.pid"

local CONF = [[
http {
  server {
    listen 127.0.0.1:${port_http};
    location / { return 200 "production\n"; }
  }
}
]]

local function capture(cmd)
  local p = assert(io.popen(cmd .. " 2>&1; echo \"exit=$?\""))
  local out = p:read("*a")
  p:close()
  return out, tonumber(out:match("exit=(%d+)%s*$"))
end

local function enabled_state()
  if not nginx.execute("test -d /run/systemd/system && command -v systemctl >/dev/null") then
    return nil
  end
  return (capture("systemctl is-enabled nginx"))
end

describe("scripts/install-deps.sh", function()
  local standin, wrote_pid_file

  lazy_setup(function()
    standin = nginx.new { conf = CONF, modules = false }
    standin:start()
    if not nginx.read_file(SYSTEM_PID_FILE) then
      nginx.write_file(SYSTEM_PID_FILE, standin:master_pid() .. "\n")
      wrote_pid_file = true
    end
  end)

  lazy_teardown(function()
    if wrote_pid_file then os.remove(SYSTEM_PID_FILE) end
    nginx.stop_all()
  end)

  it("leaves a running nginx of the host running, serving, with its workers", function()
    local host_pid = tonumber((nginx.read_file(SYSTEM_PID_FILE) or ""):match("%d+"))
    local host_was_alive = nginx.pid_alive(host_pid)
    local workers = standin:worker_pids()
    local enabled = enabled_state()

    local out, code = capture("bash " .. nginx.shell_quote(nginx.REPO .. "/scripts/install-deps.sh") .. " </dev/null")

    assert.equal(0, code, out)
    assert.truthy(out:find("all dependencies present", 1, true), out)
    assert.falsy(out:lower():find("stopping", 1, true), out)
    assert.is_true(nginx.pid_alive(standin:master_pid()), out)
    assert.same(workers, standin:worker_pids())
    local status, body = nginx.http(standin.ports.http, "GET", "/")
    assert.equal(200, status)
    assert.equal("production\n", body)
    if host_was_alive then assert.is_true(nginx.pid_alive(host_pid), out) end
    assert.equal(enabled, enabled_state())
  end)
end)
