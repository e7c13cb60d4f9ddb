-- nginx.conf as the users of the two source documents keep it:
--   * init{ nginx_conf = true } seeds the table from the upstream blocks of
--     nginx.conf (through its includes) that hand balancing to Lua: the
--     first document's shape, servers in the block, no second file;
--   * a configuration that would bypass ngx.dyups is refused at start, with
--     the reason: a write-back into a file nginx includes, an upstream of the
--     table that nginx also balances itself (Tengine's `include
--     conf/upstream.conf;`);
--   * `nginx -s reload` applies what changed in the upstream file (or in
--     nginx.conf) since it was last read, as one write, and logs it; an
--     unchanged file keeps the run-time changes; a bad edit fails the reload
--     and changes nothing;
--   * a balancer can route by any variable: balance(ngx.var.x).
local nginx = require "spec.helpers.nginx"
local dy = require "spec.helpers.dyups"
local T = require "spec.helpers.traffic"

local q = nginx.shell_quote

-- The proxy, seeding from `init` (Lua source of init's options beyond
-- path). `blocks`: nginx.conf lines in http{} (upstream blocks, includes);
-- `names`: the nginx upstream blocks, each proxied to at /NAME.
local function proxy(init, blocks, names)
  local locations = {}
  for _, name in ipairs(names) do
    locations[#locations + 1] = ("        location /%s { proxy_pass http://%s; }"):format(name, name)
  end
  local inst = nginx.new {
    workers = 2,
    conf = [[
http {
    lua_package_path "${lua_package_path}";
    lua_package_cpath "${lua_package_cpath}";
    map $proxy_host $dyups_upstream { default $proxy_host; }
    init_by_lua_block {
        assert(require("ngx.dyups").init{ path = "state/dyups.state", ${init} })
    }
    init_worker_by_lua_block {
        local ok, err = require("ngx.dyups").init_worker()
        if not ok then ngx.log(ngx.ERR, "dyups init_worker: ", err) end
    }
${blocks}
    server {
        listen 127.0.0.1:${port_proxy};
        proxy_connect_timeout 1s;
        add_header X-Worker $pid always;
${locations}
        location = /ups { content_by_lua_file ${repo}/lua/upsops.lua; }
        location = /ups/check { content_by_lua_file ${repo}/lua/srvcheck.lua; }
        location = /lua {
            content_by_lua_block {
                ngx.req.read_body()
                local f = assert(loadstring(ngx.req.get_body_data()))
                ngx.say(f())
            }
        }
    }
}
]],
    vars = { init = init, blocks = blocks, locations = table.concat(locations, "\n") },
  }
  assert(nginx.execute("mkdir -p " .. q(inst.prefix .. "/conf/ups") .. " " .. q(inst.prefix .. "/state")))
  return inst
end

local function write_conf(inst, name, text)
  nginx.write_file(inst.prefix .. "/conf/" .. name, text)
end

-- The ports `n` requests to `path` reach, as a set and a list.
local function reached(inst, path, n, headers)
  local set, list = {}, {}
  for i = 1, n do
    local status, port = T.get(inst, path, headers)
    assert.equal(200, status, path .. ": request " .. i)
    set[port] = true
    list[#list + 1] = port
  end
  return set, list
end

local function version(inst)
  return tonumber(T.run(inst, [[return (require("ngx.dyups").version())]]))
end

local function servers(inst, name)
  return T.run(inst, ([[
    local u = require("ngx.dyups").get(%q)
    local out = {}
    for _, s in ipairs(u and u.servers or {}) do out[#out + 1] = s.line end
    return table.concat(out, " ")]]):format(name))
end

-- nginx -s reload, expecting it to be refused: returns once the master
-- logged why, with the workers it had still serving.
local function refused_reload(inst, expect)
  local before = inst:worker_pids()
  assert(nginx.execute(q(inst.nginx) .. " -p " .. q(inst.prefix .. "/") .. " -c conf/nginx.conf -s reload >/dev/null 2>&1"))
  nginx.wait_until(function()
    return inst:error_log():find(expect, 1, true)
  end, 5, "the refused reload logged: " .. expect)
  assert.same(before, inst:worker_pids(), "the workers changed")
end

-- The error log since `mark` (its length before).
local function log_since(inst, mark)
  return inst:error_log():sub(mark + 1)
end

describe("nginx.conf as it is:", function()
  local P

  lazy_setup(function()
    P = select(2, dy.backends(4))
  end)

  lazy_teardown(function()
    nginx.stop_all()
  end)

  local function block(name, balancer, list)
    local out = { "upstream " .. name .. " {" }
    for _, s in ipairs(list) do out[#out + 1] = "    server 127.0.0.1:" .. s .. ";" end
    if balancer then out[#out + 1] = "    " .. balancer end
    out[#out + 1] = "}"
    return table.concat(out, "\n") .. "\n"
  end
  local FILE = "balancer_by_lua_file " .. nginx.REPO .. "/lua/upstream.lua;"

  describe("init{ nginx_conf = true }", function()
    local inst

    lazy_setup(function()
      inst = proxy("nginx_conf = true,", [[
    include ups/*.conf;
    upstream api {
        server 127.0.0.1:]] .. P[4] .. [[;
        balancer_by_lua_block { require("ngx.dyups").balance("api") }
    }
    upstream static { server 127.0.0.1:]] .. P[4] .. [[; }
]], { "local", "api", "static" })
      -- The first document's block: its servers, a backup, the balancer.
      write_conf(inst, "ups/local.conf", block("local", FILE, { P[1], P[2] .. " backup", P[3] }))
      inst:start()
    end)

    it("seeds every upstream block with a balancer_by_lua_* line, through includes, and no other", function()
      assert.equal("local api", T.run(inst, [[return table.concat(require("ngx.dyups").list(), " ")]]))
      -- Which file it read is said (init_by_lua logs before the error log is open).
      local said = nginx.read_file(inst.prefix .. "/logs/nginx.out") or ""
      assert.truthy(said:find(("state file %s/state/dyups.state made from nginx configuration %s/conf/nginx.conf: 2 upstreams")
        :format(inst.prefix, inst.prefix), 1, true), said)
      local set, list = reached(inst, "/local", 12)
      assert.same({ [P[1]] = true, [P[3]] = true }, set, table.concat(list, " "))
      assert.same({ [P[4]] = true }, (reached(inst, "/api", 3)))
      -- nginx's own block still works, as nginx's.
      assert.same({ [P[4]] = true }, (reached(inst, "/static", 2)))
      -- The first document's transcript: the backup takes over.
      for _, p in ipairs { P[1], P[3] } do
        local status, body = nginx.http(inst.ports.proxy, "PUT", "/ups?op=del&server=127.0.0.1:" .. p)
        assert.equal(200, status, body)
        assert.equal(('{"msg":"del a server success.","data":["127.0.0.1:%d"],"code":"A00001"}\n'):format(p), body)
      end
      assert.same({ [P[2]] = true }, (reached(inst, "/local", 4)))
    end)

    it("a reload applies the edited block as one write, logs it, and keeps the run-time changes of the others", function()
      -- A run-time change to api, which nobody edits in nginx.conf.
      local status, body = nginx.http(inst.ports.proxy, "PUT", "/ups?op=add&upstream=api&server=127.0.0.1:" .. P[3])
      assert.equal(200, status, body)
      local v = version(inst)
      local mark = #inst:error_log()
      write_conf(inst, "ups/local.conf", block("local", FILE, { P[1], P[2] }))
      inst:reload()
      assert.equal(v + 1, version(inst), "one write")
      assert.equal(("server 127.0.0.1:%d; server 127.0.0.1:%d;"):format(P[1], P[2]), servers(inst, "local"))
      assert.equal(("server 127.0.0.1:%d; server 127.0.0.1:%d;"):format(P[4], P[3]), servers(inst, "api"))
      assert.same({ [P[1]] = true, [P[2]] = true }, (reached(inst, "/local", 8)))
      local said = log_since(inst, mark)
      assert.truthy(said:find(("nginx configuration %s/conf/nginx.conf changed since nginx last read it: "
        .. "applied as table version %d: upstream local set to { server 127.0.0.1:%d; server 127.0.0.1:%d; }")
        :format(inst.prefix, v + 1, P[1], P[2]), 1, true), said)

      -- Reloaded with nothing edited: the run-time changes stay, nothing is said.
      status, body = nginx.http(inst.ports.proxy, "PUT", "/ups?op=del&server=127.0.0.1:" .. P[1])
      assert.equal(200, status, body)
      mark = #inst:error_log()
      inst:reload()
      assert.equal(v + 2, version(inst))
      assert.equal(("server 127.0.0.1:%d down; server 127.0.0.1:%d;"):format(P[1], P[2]), servers(inst, "local"))
      assert.falsy(log_since(inst, mark):find("changed since", 1, true))
    end)

    it("an edit nginx takes and ngx.dyups cannot fails the reload, names the file and line, and changes nothing", function()
      local v = version(inst)
      local good = nginx.read_file(inst.prefix .. "/conf/ups/local.conf")
      -- nginx has no upper limit on weight; ngx.dyups's is 1000.
      write_conf(inst, "ups/local.conf", block("local", FILE, { P[1], P[2] .. " weight=5000" }))
      refused_reload(inst, inst.prefix .. "/conf/ups/local.conf: line 3: ")
      assert.equal(v, version(inst))
      write_conf(inst, "ups/local.conf", good)
      inst:reload()
      assert.equal(v, version(inst), "the good file again is no change")
    end)
  end)

  describe("refused at start, saying why:", function()
    local function refused(inst, expect)
      local ok, err = pcall(inst.start, inst)
      assert.is_false(ok, "nginx started")
      local said = err .. (nginx.read_file(inst.prefix .. "/logs/nginx.out") or "")
      assert.truthy(said:find(expect, 1, true), said)
      assert.is_nil(nginx.read_file(inst.prefix .. "/state/dyups.state"), "a state file was made")
      return said
    end

    it("a write-back into a file nginx includes (the reload after would drop balancer_by_lua)", function()
      local inst = proxy([[upstreams = "conf/ups/local.conf", write_upstreams = true,]], "    include ups/*.conf;\n",
        { "local" })
      write_conf(inst, "ups/local.conf", block("local", FILE, { P[1] }))
      local said = refused(inst, "write_upstreams " .. inst.prefix .. "/conf/ups/local.conf: `include "
        .. inst.prefix .. "/conf/ups/*.conf` on line ")
      assert.truthy(said:find("duplicate upstream", 1, true), said)
      -- Also a file the include would read only once it is written.
      inst = proxy([[upstreams = "conf/seed.conf", write_upstreams = "conf/ups/dyups.conf",]], "    include ups/*.conf;\n",
        { "local" })
      write_conf(inst, "ups/local.conf", block("local", FILE, { P[1] }))
      write_conf(inst, "seed.conf", block("local", nil, { P[1] }))
      refused(inst, "write_upstreams " .. inst.prefix .. "/conf/ups/dyups.conf: `include")
    end)

    it("an upstream of the table that nginx balances itself (Tengine's include conf/upstream.conf)", function()
      local inst = proxy([[upstreams = "conf/upstream.conf",]], "    include upstream.conf;\n", { "host1" })
      write_conf(inst, "upstream.conf", block("host1", nil, { P[1] }) .. block("host2", nil, { P[2] }))
      refused(inst, "upstream host1 of ngx.dyups is also an upstream block that nginx balances itself ("
        .. inst.prefix .. "/conf/upstream.conf line 1: it has no balancer_by_lua_*)")
    end)

    it("write_upstreams = true with nginx_conf: there is no upstream file to write", function()
      local inst = proxy("nginx_conf = true, write_upstreams = true,", block("local", FILE, { P[1] }), { "local" })
      refused(inst, "write_upstreams = true writes back to the upstreams file, and nginx_conf has none")
    end)
  end)

  describe("a reload with an upstream file", function()
    it("applies what was edited since the last start or reload, and only that", function()
      local inst = proxy([[upstreams = "conf/upstream.conf",]], block("local", FILE, { "1" }) .. block("api", FILE, { "1" }),
        { "local", "api" })
      write_conf(inst, "upstream.conf", block("local", nil, { P[1] }) .. block("api", nil, { P[2] })
        .. block("gone", nil, { P[3] }))
      inst:start()
      -- A run-time change to api.
      assert.equal(200, (nginx.http(inst.ports.proxy, "PUT", "/ups?op=add&upstream=api&server=127.0.0.1:" .. P[3])))
      local v = version(inst)
      local mark = #inst:error_log()
      write_conf(inst, "upstream.conf", block("local", nil, { P[1], P[4] }) .. block("api", nil, { P[2] })
        .. block("new", nil, { P[3] }))
      inst:reload()
      assert.equal(v + 1, version(inst), "one write")
      assert.equal("local api new", T.run(inst, [[return table.concat(require("ngx.dyups").list(), " ")]]))
      assert.equal(("server 127.0.0.1:%d; server 127.0.0.1:%d;"):format(P[2], P[3]), servers(inst, "api"))
      assert.same({ [P[1]] = true, [P[4]] = true }, (reached(inst, "/local", 8)))
      local said = log_since(inst, mark)
      assert.truthy(said:find(("upstream file %s/conf/upstream.conf changed since nginx last read it: "
        .. "applied as table version %d: upstream local set to { server 127.0.0.1:%d; server 127.0.0.1:%d; }, "
        .. "upstream new created { server 127.0.0.1:%d; }, upstream gone deleted")
        :format(inst.prefix, v + 1, P[1], P[4], P[3]), 1, true), said)
      -- The file gone: said, and the table kept.
      assert(os.remove(inst.prefix .. "/conf/upstream.conf"))
      mark = #inst:error_log()
      inst:reload()
      assert.equal(v + 1, version(inst))
      said = log_since(inst, mark)
      assert.truthy(said:find("upstream file " .. inst.prefix .. "/conf/upstream.conf is missing: nothing applied", 1, true), said)
      inst:stop()
    end)

    it("a syntax error fails the reload, names the file and line, and changes nothing", function()
      local inst = proxy([[upstreams = "conf/upstream.conf",]], block("local", FILE, { "1" }), { "local" })
      write_conf(inst, "upstream.conf", block("local", nil, { P[1] }))
      inst:start()
      local v = version(inst)
      write_conf(inst, "upstream.conf", "upstream local {\n    server 127.0.0.1:" .. P[2] .. "\n}\n")
      refused_reload(inst, "upstream file " .. inst.prefix .. "/conf/upstream.conf: line ")
      assert.equal(v, version(inst))
      assert.same({ [P[1]] = true }, (reached(inst, "/local", 3)))
      inst:stop()
    end)

    it("written back (write_upstreams = true): applies the hand edit of the written file, and nothing when unedited", function()
      local inst = proxy([[upstreams = "state/w/upstream.conf", write_upstreams = true,]],
        block("local", FILE, { "1" }), { "local" })
      -- The workers write the file back: its directory is theirs.
      assert(nginx.execute("mkdir -p " .. q(inst.prefix .. "/state/w")))
      nginx.execute("chown nobody " .. q(inst.prefix .. "/state/w") .. " 2>/dev/null")
      nginx.write_file(inst.prefix .. "/state/w/upstream.conf", block("local", nil, { P[1] }))
      inst:start()
      local status, body, h = nginx.http(inst.ports.proxy, "PUT", "/ups?op=add&upstream=local&server=127.0.0.1:" .. P[2])
      assert.equal(200, status, body)
      assert.equal("ok", h["x-dyups-write-back"])
      local v = version(inst)
      inst:reload()
      assert.equal(v, version(inst), "the file as written back is no edit")
      local path = inst.prefix .. "/state/w/upstream.conf"
      local text = nginx.read_file(path)
      nginx.write_file(path, (text:gsub("127%.0%.0%.1:" .. P[2], "127.0.0.1:" .. P[3])))
      inst:reload()
      assert.equal(v + 1, version(inst))
      assert.equal(("server 127.0.0.1:%d; server 127.0.0.1:%d;"):format(P[1], P[3]), servers(inst, "local"))
      inst:stop()
    end)
  end)

  it("a balancer routes by any variable: balance(ngx.var.http_x_to)", function()
    local inst = proxy([[upstreams = "conf/upstream.conf",]], [[
    upstream by_header {
        server 0.0.0.1;
        balancer_by_lua_block { require("ngx.dyups").balance(ngx.var.http_x_to) }
    }
]], { "by_header" })
    write_conf(inst, "upstream.conf", block("one", nil, { P[1] }) .. block("two", nil, { P[2] }))
    inst:start()
    assert.same({ [P[1]] = true }, (reached(inst, "/by_header", 3, { ["X-To"] = "one" })))
    assert.same({ [P[2]] = true }, (reached(inst, "/by_header", 3, { ["X-To"] = "two" })))
    local status = T.get(inst, "/by_header", { ["X-To"] = "three" })
    assert.equal(502, status)
    inst:stop()
  end)
end)
