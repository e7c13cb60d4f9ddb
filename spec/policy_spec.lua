-- Balancing policies against nginx's own: one nginx with 2 workers holds, for
-- each policy, a native upstream and the same upstream in ngx.dyups, and
-- every key (or client address) must reach the same backend through both.
local nginx = require "spec.helpers.nginx"
local dy = require "spec.helpers.dyups"
local T = require "spec.helpers.traffic"

local WEIGHTS = { 1, 2, 1, 3 }

local function servers(ports, extra)
  local out = {}
  for i, p in ipairs(ports) do
    out[#out + 1] = ("        server 127.0.0.1:%d weight=%d%s;"):format(p, WEIGHTS[i], extra or "")
  end
  return table.concat(out, "\n")
end

describe("balancing policies, side by side with nginx's own", function()
  local inst, ports

  lazy_setup(function()
    ports = select(2, dy.backends(#WEIGHTS))
    local policies = {
      chash = "hash $arg_k consistent;",
      hash = "hash $arg_k;",
      -- A key of text and variables, one of them never set, one in braces
      -- because letters follow it.
      hashmix = "hash k${arg_a}x-$arg_b$arg_unset;",
      iphash = "ip_hash;",
    }
    local seed, native = {}, {}
    for name, line in pairs(policies) do
      local block = ("upstream %s {\n        %s\n%s\n    }"):format(name, line, servers(ports))
      seed[#seed + 1] = block
      native[#native + 1] = block:gsub("^upstream " .. name, "upstream native_" .. name)
    end
    inst = nginx.new {
      workers = 2,
      conf = [[
http {
    lua_package_path "${lua_package_path}";
    lua_package_cpath "${lua_package_cpath}";
    set_real_ip_from 127.0.0.1;
    real_ip_header X-Real-IP;

    init_by_lua_block {
        assert(require("ngx.dyups").init{ path = "state/dyups.state", upstreams = "conf/upstream.conf" })
    }
    init_worker_by_lua_block { assert(require("ngx.dyups").init_worker()) }

    ${native}

    upstream dy_chash { server 0.0.0.1; balancer_by_lua_block { require("ngx.dyups").balance("chash") } }
    upstream dy_hash { server 0.0.0.1; balancer_by_lua_block { require("ngx.dyups").balance("hash") } }
    upstream dy_hashmix { server 0.0.0.1; balancer_by_lua_block { require("ngx.dyups").balance("hashmix") } }
    upstream dy_iphash { server 0.0.0.1; balancer_by_lua_block { require("ngx.dyups").balance("iphash") } }

    server {
        listen 127.0.0.1:${port_proxy} reuseport;
        add_header X-Worker $pid always;
        location ~ ^/native/(\w+)$ { proxy_pass http://native_$1; }
        location ~ ^/dy/(\w+)$ { proxy_pass http://dy_$1; }
    }
    server {
        listen 127.0.0.1:${port_api};
        location / { content_by_lua_file ${repo}/lua/dyups_api.lua; }
    }
}
]],
      vars = { native = table.concat(native, "\n    ") },
    }
    nginx.write_file(inst.prefix .. "/conf/upstream.conf", table.concat(seed, "\n") .. "\n")
    inst:start()
  end)

  lazy_teardown(function()
    nginx.stop_all()
  end)

  --- A kept-open connection to the proxy that reconnects when nginx ends
  --- it (keepalive_requests).
  local function connection()
    return { c = T.conn(inst.ports.proxy), close = function(self) self.c:close() end }
  end

  --- The backend port that `path` reaches.
  local function port_of(conn, path, headers)
    local status, body = conn.c:request("GET", path, { headers = headers })
    if not status then
      conn.c:close()
      conn.c = T.conn(inst.ports.proxy)
      status, body = conn.c:request("GET", path, { headers = headers })
    end
    assert(status == 200, ("%s: %s %s"):format(path, tostring(status), tostring(body)))
    return tonumber(body:match("^(%d+)"))
  end

  local function compare(policy, n, request)
    local native, ours = connection(), connection()
    local differ, seen = {}, {}
    for i = 1, n do
      local query, headers = request(i)
      local a = port_of(native, "/native/" .. policy .. query, headers)
      local b = port_of(ours, "/dy/" .. policy .. query, headers)
      seen[a] = (seen[a] or 0) + 1
      if a ~= b and #differ < 5 then
        differ[#differ + 1] = ("%s: native %d, dyups %d"):format(query .. (headers and headers["X-Real-IP"] or ""), a, b)
      end
    end
    native:close()
    ours:close()
    return differ, seen
  end

  it("hash $arg_k consistent: 10,000 keys reach the same server as nginx's", function()
    local differ, seen = compare("chash", 10000, function(i) return "?k=key" .. i end)
    assert.same({}, differ)
    -- Every server takes some keys (the weights make the ring uneven).
    for _, p in ipairs(ports) do assert.is_true((seen[p] or 0) > 200, "server " .. p) end
  end)

  it("hash $arg_k: 3,000 keys reach the same server as nginx's", function()
    local differ = compare("hash", 3000, function(i) return "?k=" .. (i * 7919) end)
    assert.same({}, differ)
  end)

  it("hash of text and variables, one unset, one in braces: 2,000 keys reach the same server as nginx's", function()
    local differ = compare("hashmix", 2000, function(i) return ("?a=%d&b=%d"):format(i % 37, i * 31) end)
    assert.same({}, differ)
  end)

  it("ip_hash: 2,000 clients in 500 networks reach the same server as nginx's, and /24s stick", function()
    local differ = compare("iphash", 2000, function(i)
      return "", { ["X-Real-IP"] = ("10.%d.%d.%d"):format(i % 7, math.floor(i / 4) % 251, i % 250 + 1) }
    end)
    assert.same({}, differ)
  end)

  it("ip_hash: 1,000 IPv6 clients reach the same server as nginx's (every byte of the address counts)", function()
    local differ, seen = compare("iphash", 1000, function(i)
      return "", { ["X-Real-IP"] = ("2001:db8:%x:%x::%x"):format(i % 97, math.floor(i / 3), i % 11 + 1) }
    end)
    assert.same({}, differ)
    local n = 0
    for _ in pairs(seen) do n = n + 1 end
    assert.is_true(n >= 3, "the clients spread over " .. n .. " servers only")
  end)

  it("every key sticks to one server whichever worker balances it: 500 keys each, through both workers, under each hashing method", function()
    local pids = inst:worker_pids()
    assert.equal(2, #pids)
    local cases = {
      chash = function(i) return "?k=sticky" .. i end,
      hash = function(i) return "?k=" .. (i * 104729) end,
      iphash = function(i) return "", { ["X-Real-IP"] = ("172.%d.%d.9"):format(i % 13, i % 199) } end,
    }
    for policy, request in pairs(cases) do
      -- A connection per worker, fresh for each method: 500 requests stay
      -- under nginx's keepalive_requests, so neither is ever re-made on the
      -- other worker.
      local via = {}
      for i, pid in ipairs(pids) do
        via[i] = { c = T.conn_to(inst, pid, "/dy/hash?k=probe"), close = function(self) self.c:close() end }
      end
      local differ, used = {}, {}
      for i = 1, 500 do
        local query, headers = request(i)
        local a = port_of(via[1], "/dy/" .. policy .. query, headers)
        local b = port_of(via[2], "/dy/" .. policy .. query, headers)
        used[a] = true
        if a ~= b and #differ < 5 then differ[#differ + 1] = ("%s: %d, %d"):format(query, a, b) end
      end
      assert.same({}, differ, policy)
      local n = 0
      for _ in pairs(used) do n = n + 1 end
      assert.is_true(n >= 3, policy .. ": the keys spread over " .. n .. " servers only")
      for _, v in ipairs(via) do v:close() end
    end
  end)

  it("hash consistent: taking one server out moves only the keys it held", function()
    local conn = connection()
    local before = {}
    for i = 1, 3000 do before[i] = port_of(conn, "/dy/chash?k=key" .. i) end
    local gone = ports[2]
    local status = nginx.http(inst.ports.api, "DELETE", ("/upstream/chash/servers/127.0.0.1:%d"):format(gone))
    assert.equal(200, status)
    local moved, kept = 0, 0
    for i = 1, 3000 do
      local now = port_of(conn, "/dy/chash?k=key" .. i)
      assert.are_not.equal(gone, now)
      if before[i] == gone then
        moved = moved + 1
      else
        assert.equal(before[i], now, "key" .. i .. " moved though its server stayed")
        kept = kept + 1
      end
    end
    conn:close()
    assert.is_true(moved > 300 and kept > 1500, ("moved %d, kept %d"):format(moved, kept))
  end)

  it("shows the policy in /upstream/NAME and the JSON views; /detail keeps the module's server lines only", function()
    local _, body = nginx.http(inst.ports.api, "GET", "/upstream/iphash")
    assert.matches("^ip_hash;\n", body)
    local _, detail = nginx.http(inst.ports.api, "GET", "/detail")
    assert.truthy(("\n" .. detail):find("\nchash\nserver ", 1, true), detail)
    assert.falsy(detail:find("consistent", 1, true), detail)
    local _, json = nginx.http(inst.ports.api, "GET", "/upstream/hash?format=json")
    assert.truthy(json:find('"policy":"hash $arg_k;"', 1, true), json)
    _, json = nginx.http(inst.ports.api, "GET", "/detail?format=json")
    assert.truthy(json:find('"policy":"hash $arg_k consistent;"', 1, true), json)
  end)

  it("refuses a backup server under ip_hash, and a second balancing line", function()
    local status, body = nginx.http(inst.ports.api, "POST", "/upstream/iphash/servers",
      { body = "127.0.0.1:1 backup" })
    assert.equal(400, status)
    assert.truthy(body:find('does not support parameter "backup"', 1, true), body)
    status, body = nginx.http(inst.ports.api, "POST", "/upstream/x",
      { body = "ip_hash;\nleast_conn;\nserver 127.0.0.1:1;" })
    assert.equal(400, status)
    assert.truthy(body:find("line 2: least_conn: a balancing method is given twice", 1, true), body)
  end)
end)
