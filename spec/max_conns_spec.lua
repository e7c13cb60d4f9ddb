-- `server ... max_conns=N`, enforced as nginx enforces it: a server with N
-- connections in flight gets no new request until one ends. The count is
-- the whole nginx's (the shared peer cells), so a request held open through
-- one worker fills the server for the other worker too; the log-phase hook
-- (`dyups.log()`, in the proxy's http block) gives the connection back.
--
-- A backend nginx on two ports (A, B) holds a request at /hold?id=ID until
-- the spec releases that id, so the spec decides exactly how many
-- connections are in flight, and to which server.
local nginx = require "spec.helpers.nginx"
local dy = require "spec.helpers.dyups"
local T = require "spec.helpers.traffic"

local addr = dy.addr

-- A held request answers once /release?id=ID was called (4 s at most, under
-- the proxy's 5 s read timeout, so a failed spec never leaves one hanging).
local BACKEND = [[
http {
    lua_shared_dict holds 1m;

    server {
        listen 127.0.0.1:${port_a};
        listen 127.0.0.1:${port_b};

        location = /hold {
            content_by_lua_block {
                local d, id = ngx.shared.holds, ngx.var.arg_id
                d:set("at " .. id, ngx.var.server_port)
                local give_up = ngx.now() + 4
                while not d:get("released " .. id) and ngx.now() < give_up do
                    ngx.sleep(0.01)
                end
                ngx.say(ngx.var.server_port, " held")
            }
        }
        location = /arrival {
            content_by_lua_block {
                local at = ngx.shared.holds:get("at " .. ngx.var.arg_id)
                if not at then return ngx.exit(404) end
                ngx.say(at)
            }
        }
        location = /release {
            content_by_lua_block {
                ngx.shared.holds:set("released " .. ngx.var.arg_id, true)
                ngx.say("released")
            }
        }
        location / { return 200 "$server_port $connection_requests\n"; }
    }
}
]]

describe("max_conns across the whole nginx (2 workers)", function()
  local proxy, A, B, workers
  local next_id = 0

  lazy_setup(function()
    local backend = nginx.new { workers = 1, conf = BACKEND }
    backend:start()
    A, B = backend.ports.a, backend.ports.b
    proxy = dy.proxy {
      upstreams = dy.upstream("mc", { addr(A) .. " max_conns=1", addr(B) .. " backup" })
        .. dy.upstream("lone", { addr(A) .. " max_conns=1" }),
    }
    proxy:start()
    workers = proxy:worker_pids()
    assert.equal(2, #workers)
  end)

  lazy_teardown(function()
    nginx.stop_all()
  end)

  --- Holds one request to upstream `host`, sent through worker `pid`;
  --- returns once it reached a backend: { c =, id =, port = }.
  local function hold(host, pid)
    next_id = next_id + 1
    local id = tostring(next_id)
    local c = T.conn_to(proxy, pid)
    assert(c:send("GET", "/hold?id=" .. id, { headers = { Host = host }, timeout = 2 }))
    local port = nginx.wait_until(function()
      local status, body = T.request(A, "GET", "/arrival?id=" .. id)
      return status == 200 and tonumber(body:match("%d+"))
    end, 5, "held request " .. id .. " to reach a backend")
    return { c = c, id = id, port = port }
  end

  --- Lets a held request end; its status and the port that answered.
  local function release(h)
    assert.equal(200, (T.request(A, "GET", "/release?id=" .. h.id)))
    local status, body = h.c:response { timeout = 5 }
    h.c:close()
    return status, body and tonumber(body:match("^(%d+) held"))
  end

  --- One request to `host` through worker `pid`: status and backend port.
  local function via(pid, host)
    local c = T.conn_to(proxy, pid)
    local status, body = c:request("GET", "/", { headers = { Host = host } })
    c:close()
    return status, body and tonumber(body:match("^(%d+) "))
  end

  --- The connections in flight to the first server of `name`, as a worker
  --- sees them.
  local function conns(name)
    return tonumber(dy.run(proxy, ("return require('ngx.dyups').peers(%q)[1].conns"):format(name)))
  end

  it("a request held on A (max_conns=1) sends every worker's next requests to the backup until it ends", function()
    local h = hold("mc", workers[1])
    assert.equal(A, h.port)
    assert.equal(1, conns("mc"))
    -- A is full in the whole nginx: the other worker and the same one go
    -- to the backup.
    for _, pid in ipairs { workers[2], workers[1], workers[2], workers[1] } do
      local status, port = via(pid, "mc")
      assert.equal(200, status)
      assert.equal(B, port, "worker " .. pid .. " sent a request to the full server")
    end
    local status, port = release(h)
    assert.equal(200, status)
    assert.equal(A, port)
    -- the log phase gave the connection back: A takes requests again
    nginx.wait_until(function() return conns("mc") == 0 end, 5, "A's connection to be given back")
    for _, pid in ipairs(workers) do
      status, port = via(pid, "mc")
      assert.equal(200, status)
      assert.equal(A, port, "worker " .. pid .. " did not go back to A")
    end
  end)

  it("a lone server at max_conns answers 502 (no live upstreams) until its request ends", function()
    local h = hold("lone", workers[1])
    assert.equal(A, h.port)
    local status = via(workers[2], "lone")
    assert.equal(502, status)
    assert.truthy(proxy:error_log():find("no live upstreams", 1, true))
    assert.equal(200, (release(h)))
    nginx.wait_until(function() return conns("lone") == 0 end, 5, "A's connection to be given back")
    local port
    status, port = via(workers[2], "lone")
    assert.equal(200, status)
    assert.equal(A, port)
  end)
end)
