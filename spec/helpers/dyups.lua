-- spec/helpers/dyups.lua: the nginx set-ups the ngx.dyups specs share: a
-- proxy with the module in its http block, and backends that answer with
-- their own port, each backend its own nginx so a spec can kill one.
local nginx = require "spec.helpers.nginx"

local M = {}

--- The proxy: `upstream local` and a Host-routed catch-all balanced by
--- ngx.dyups, `/ups`, `/ups/check`, and `/lua` running a Lua snippet given
--- in the request body (specs use it to call the module inside a worker).
--- opts.upstreams: the seed upstream file's text; opts.init: extra init
--- options as Lua source (`refresh = 1, trylock = true`); opts.user and
--- opts.umask: nginx's `user` directive and the umask nginx starts under.
function M.proxy(opts)
  opts = opts or {}
  local inst = nginx.new {
    workers = opts.workers or 2,
    user = opts.user,
    umask = opts.umask,
    conf = [[
# Durable writes msync in this pool, off the event loop (the README's set-up).
thread_pool dyups threads=1;

http {
    lua_package_path "${lua_package_path}";
    lua_package_cpath "${lua_package_cpath}";
    client_body_buffer_size 1m;
    client_max_body_size 1m;

    map $proxy_host $dyups_upstream {
        default        $proxy_host;
        dyups_by_host  $host;
    }

    init_by_lua_block {
        assert(require("ngx.dyups").init{
            path = "state/dyups.state",
            upstreams = "conf/upstream.conf",
            ${init}
        })
    }
    init_worker_by_lua_block {
        local ok, err = require("ngx.dyups").init_worker()
        if not ok then ngx.log(ngx.ERR, "dyups init_worker: ", err) end
    }
    log_by_lua_file ${repo}/lua/log.lua;

    upstream local {
        server 0.0.0.1;
        balancer_by_lua_file ${repo}/lua/upstream.lua;
        keepalive 16;
    }
    upstream dyups_by_host {
        server 0.0.0.1;
        balancer_by_lua_file ${repo}/lua/upstream.lua;
        keepalive 16;
    }

    server {
        listen 127.0.0.1:${port_proxy} reuseport;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_connect_timeout 1s;
        proxy_read_timeout 5s;
        add_header X-Worker $pid always;

        location /local { proxy_pass http://local; }
        location = /ups { content_by_lua_file ${repo}/lua/upsops.lua; }
        location = /ups/check { content_by_lua_file ${repo}/lua/srvcheck.lua; }
        location = /status { content_by_lua_file ${repo}/lua/check_status.lua; }
        location = /metrics { content_by_lua_file ${repo}/lua/metrics.lua; }
        location = /dashboard { content_by_lua_file ${repo}/lua/dashboard.lua; }
        location = /lua {
            content_by_lua_block {
                ngx.req.read_body()
                local f = assert(loadstring(ngx.req.get_body_data()))
                ngx.say(f())
            }
        }
        location / {
            proxy_set_header Host $host;
            proxy_pass http://dyups_by_host;
        }
    }

    server {
        listen 127.0.0.1:${port_api} reuseport;
        location / { content_by_lua_file ${repo}/lua/dyups_api.lua; }
    }
}
]],
    vars = { init = opts.init or "" },
  }
  nginx.write_file(inst.prefix .. "/conf/upstream.conf", opts.upstreams or "")
  return inst
end

--- A backend: one nginx answering every request with its port and how many
--- requests its connection has carried (to see keepalive).
function M.backend(port)
  return nginx.new {
    workers = 1,
    modules = false,
    conf = [[
http {
    server {
        listen 127.0.0.1:${port_http};
        location / { return 200 "$server_port $connection_requests\n"; }
    }
}
]],
    vars = { port_http = port },
  }
end

--- `n` started backends; returns them and their ports.
function M.backends(n)
  local list, ports = {}, {}
  for i = 1, n do
    list[i] = M.backend()
    list[i]:start()
    ports[i] = list[i].ports.http
  end
  return list, ports
end

--- "127.0.0.1:PORT".
function M.addr(port) return "127.0.0.1:" .. port end

--- An upstream file block: "upstream NAME {\n    server A;\n ...}\n",
--- with `method` ("least_conn", "hash $arg_k consistent") as its first line.
function M.upstream(name, servers, method)
  local out = { "upstream " .. name .. " {" }
  if method then out[#out + 1] = "    " .. method .. ";" end
  for _, s in ipairs(servers) do out[#out + 1] = "    server " .. s .. ";" end
  out[#out + 1] = "}"
  return table.concat(out, "\n") .. "\n"
end

--- A dyups body: "server A; server B weight=3;".
function M.body_of(servers)
  local out = {}
  for _, s in ipairs(servers) do out[#out + 1] = "server " .. s .. ";" end
  return table.concat(out, " ")
end

--- GET `path` on the proxy over a new connection: status, backend port
--- (from the body), worker pid, body.
function M.get(inst, path, headers)
  local status, body, h = nginx.http(inst.ports.proxy, "GET", path, { headers = headers })
  local port = body and tonumber(body:match("^(%d+) "))
  return status, port, h and tonumber(h["x-worker"]), body
end

--- Runs Lua source inside a worker of `inst`; returns what it printed.
function M.run(inst, code)
  local status, body = nginx.http(inst.ports.proxy, "POST", "/lua", { body = code })
  assert(status == 200, "lua snippet failed: " .. tostring(status) .. " " .. tostring(body))
  return (body:gsub("\n$", ""))
end

return M
