-- The REST admin interface of ngx.dyups (ngx_http_dyups_module's /list,
-- /detail, /upstream/NAME, plus /upstream/NAME/servers[/ADDR], ETag/If-Match,
-- JSON views, 405/413/409), against a real nginx with two workers, and the
-- source document's transcript and Lua API example replayed unchanged.
local nginx = require "spec.helpers.nginx"
local dy = require "spec.helpers.dyups"
local rest = require "spec.helpers.rest"

local api = rest.api

local function uptime()
  local f = assert(io.open("/proc/uptime"))
  local t = f:read("*n")
  f:close()
  return t
end

--- The line /detail prints for a server with nginx's defaults, as
--- ngx_http_dyups_module prints it.
local function detail_line(port)
  return ("server 127.0.0.1:%d weight=1 max_conns=0 max_fails=1 fail_timeout=10 backup=0 down=0\n"):format(port)
end

--- An upstream's JSON with every setting at its default, and `servers`.
-- A JSON view without each server's state and statistics (README,
-- Statistics), which traffic moves: what the table says.
local function table_only(body)
  assert.matches('"state":"%a+","stats":{', body)
  return (body:gsub(',"active":%d+,"shared":%a+,"state":"%a+","stats":%b{}', ""))
end

local function json_upstream(name, servers)
  return {
    name = name,
    keepalive_requests = 1000,
    keepalive_time = 3600000,
    keepalive_timeout = 60000,
    check = rest.null,
    check_http_send = "GET / HTTP/1.0\r\n\r\n",
    check_http_expect_alive = { "http_2xx", "http_3xx" },
    check_keepalive_requests = 1,
    servers = servers,
  }
end

--- A server's JSON: nginx's defaults, then `params`.
local function json_server(addr, params)
  local s = { addr = addr, weight = 1, max_conns = 0, max_fails = 1, fail_timeout = 10,
    slow_start = 0, backup = false, down = false }
  for k, v in pairs(params or {}) do s[k] = v end
  return s
end

local function seed(b1, b2)
  return ("upstream host1 {\n    server 127.0.0.1:%d;\n}\nupstream host2 {\n    server 127.0.0.1:%d;\n}\n")
    :format(b1, b2)
end

--- A started proxy seeded with host1 and host2, one backend each: the
--- proxy and the two backend ports.
local function two_host_proxy()
  local _, ports = dy.backends(2)
  local inst = dy.proxy { upstreams = seed(ports[1], ports[2]) }
  inst:start()
  return inst, ports[1], ports[2]
end

describe("REST: the source document's transcript", function()
  local inst, B1, B2

  lazy_setup(function()
    inst, B1, B2 = two_host_proxy()
  end)

  lazy_teardown(function()
    nginx.stop_all()
  end)

  it("replays: 502, create dyhost, balance, /detail, DELETE, 502 again", function()
    -- curl -H "host: dyhost" 127.0.0.1:8080 -> 502 (no such upstream)
    for i = 1, 4 do
      local status, _, _, body = dy.get(inst, "/", { Host = "dyhost" })
      assert.are.equal(502, status, "request " .. i .. " before the upstream exists: " .. tostring(body))
    end

    -- curl -d "server 127.0.0.1:8089;server 127.0.0.1:8088;" 127.0.0.1:8081/upstream/dyhost
    local status, body = api(inst, "POST", "/upstream/dyhost",
      ("server 127.0.0.1:%d;server 127.0.0.1:%d;"):format(B2, B1))
    assert.are.equal(200, status, body)
    assert.are.equal("success", body)

    -- curl -H "host: dyhost" 127.0.0.1:8080 (twice): B2 then B1, per worker
    local list, ports = rest.route(inst, "dyhost", 16)
    local per_worker = {}
    for i, r in ipairs(list) do
      assert.are.equal(200, r.status, "request " .. i .. ": " .. rest.show(list))
      assert.is_truthy(r.port == B1 or r.port == B2, "not B1/B2: " .. rest.show(list))
      per_worker[r.worker] = per_worker[r.worker] or {}
      table.insert(per_worker[r.worker], r.port)
    end
    assert.is_truthy(ports[B1] and ports[B2], "both servers should answer: " .. rest.show(list))
    for pid, seq in pairs(per_worker) do
      -- nginx's (smooth) round robin over two equal servers: the first
      -- listed first, then taking turns
      assert.are.equal(B2, seq[1], "worker " .. pid .. " started with " .. seq[1] .. ": " .. rest.show(list))
      for i = 2, #seq do
        assert.are_not.equal(seq[i - 1], seq[i], "worker " .. pid .. " did not take turns: " .. rest.show(list))
      end
    end

    -- curl 127.0.0.1:8081/detail
    status, body = api(inst, "GET", "/detail")
    assert.are.equal(200, status)
    assert.are.equal("host1\n" .. detail_line(B1) .. "\nhost2\n" .. detail_line(B2) .. "\n"
      .. "dyhost\n" .. detail_line(B2) .. detail_line(B1) .. "\n", body)

    -- curl -i -X DELETE 127.0.0.1:8081/upstream/dyhost
    status, body = api(inst, "DELETE", "/upstream/dyhost")
    assert.are.equal(200, status, body)
    assert.are.equal("success", body)

    status, body = api(inst, "GET", "/detail")
    assert.are.equal(200, status)
    assert.are.equal("host1\n" .. detail_line(B1) .. "\nhost2\n" .. detail_line(B2) .. "\n", body)

    -- curl -i -H "host: dyhost" 127.0.0.1:8080 -> 502 again, in every worker
    list = rest.route(inst, "dyhost", 8)
    for i, r in ipairs(list) do
      assert.are.equal(502, r.status, "request " .. i .. " after DELETE: " .. rest.show(list))
    end
  end)

  it("routes the seeded host1 and host2 by Host", function()
    local list, ports = rest.route(inst, "host1", 4)
    assert.are.same({ B1 }, rest.keys(ports), rest.show(list))
    list, ports = rest.route(inst, "host2", 4)
    assert.are.same({ B2 }, rest.keys(ports), rest.show(list))
  end)
end)

describe("the Lua API example, unchanged in content_by_lua_block", function()
  lazy_teardown(function()
    nginx.stop_all()
  end)

  it("prints 200successupdate successdelete success", function()
    local inst = nginx.new {
      workers = 2,
      conf = [==[
http {
    lua_package_path "${lua_package_path}";
    lua_package_cpath "${lua_package_cpath}";

    init_by_lua_block {
        assert(require("ngx.dyups").init{ path = "state/dyups.state" })
    }
    init_worker_by_lua_block {
        local ok, err = require("ngx.dyups").init_worker()
        if not ok then ngx.log(ngx.ERR, "dyups init_worker: ", err) end
    }

    server {
        listen 127.0.0.1:${port_http};
        location = /example {
            content_by_lua_block {
                local dyups = require "ngx.dyups"
                local status, rv = dyups.update("test", [[server 127.0.0.1:8088;]]);
                ngx.print(status, rv)
                if status ~= 200 then
                    ngx.print(status, rv)
                    return
                end
                ngx.print("update success")
                status, rv = dyups.delete("test")
                if status ~= 200 then
                    ngx.print(status, rv)
                    return
                end
                ngx.print("delete success")
            }
        }
    }
}
]==],
    }
    inst:start()
    local status, body = nginx.http(inst.ports.http, "GET", "/example")
    assert.are.equal(200, status, body)
    assert.are.equal("200successupdate successdelete success", body)
    -- and again: "test" was deleted, so the update creates it anew
    status, body = nginx.http(inst.ports.http, "GET", "/example")
    assert.are.equal(200, status, body)
    assert.are.equal("200successupdate successdelete success", body)
    assert.is_nil(inst:error_log():match("%[error%]"), inst:error_log())
  end)
end)

describe("REST endpoints", function()
  local inst, B1, B2

  lazy_setup(function()
    inst, B1, B2 = two_host_proxy()
  end)

  lazy_teardown(function()
    nginx.stop_all()
  end)

  local function version()
    local status, _, h = api(inst, "GET", "/list")
    assert.are.equal(200, status)
    local v = rest.etag_version(h)
    assert.is_number(v, "no ETag on GET /list: " .. tostring(h.etag))
    return v
  end

  local function detail()
    local status, body = api(inst, "GET", "/detail")
    assert.are.equal(200, status, body)
    return body
  end

  describe("reads", function()
    it("GET /list names the upstreams one per line, as text", function()
      local status, body, h = api(inst, "GET", "/list")
      assert.are.equal(200, status)
      assert.are.equal("host1\nhost2\n", body)
      assert.matches("^text/plain", h["content-type"])
      assert.matches('^"%d+"$', h.etag)
    end)

    it("GET /detail lists each upstream with every parameter of each server, as the module does", function()
      local status, body, h = api(inst, "GET", "/detail")
      assert.are.equal(200, status)
      assert.are.equal("host1\n" .. detail_line(B1) .. "\nhost2\n" .. detail_line(B2) .. "\n", body)
      assert.matches('^"%d+"$', h.etag)
    end)

    it("GET /upstream/NAME gives its server lines; 404 for an unknown one", function()
      local status, body, h = api(inst, "GET", "/upstream/host1")
      assert.are.equal(200, status)
      assert.are.equal(("server 127.0.0.1:%d\n"):format(B1), body)
      assert.matches('^"%d+"$', h.etag)

      status, body = api(inst, "GET", "/upstream/nope")
      assert.are.equal(404, status)
      assert.matches("upstream nope not found", body, 1, true)
    end)

    it("every read carries the same ETag while nothing changes", function()
      local tags = {}
      for _, path in ipairs { "/list", "/detail", "/upstream/host1", "/upstream/host2/servers",
        "/list?format=json", "/detail?format=json", "/upstream/host1?format=json" } do
        local status, _, h = api(inst, "GET", path)
        assert.are.equal(200, status, path)
        assert.matches('^"%d+"$', h.etag or "", 1)
        tags[#tags + 1] = h.etag
      end
      for i = 2, #tags do assert.are.equal(tags[1], tags[i]) end
    end)

    it("unknown paths answer 404", function()
      for _, path in ipairs { "/", "/nothing", "/lists", "/upstream/host1/other",
        "/upstream/host1/servers/", "/upstream" } do
        local status, body = api(inst, "GET", path)
        assert.are.equal(404, status, path .. ": " .. tostring(body))
      end
    end)
  end)

  describe("JSON views", function()
    it("/list with Accept: application/json and with ?format=json", function()
      local v = version()
      for _, req in ipairs {
        { "/list", { Accept = "application/json" } },
        { "/list?format=json" },
      } do
        local status, body, h = api(inst, "GET", req[1], nil, req[2])
        assert.are.equal(200, status, body)
        assert.matches("^application/json", h["content-type"])
        local doc = assert(rest.decode(body), "not JSON: " .. body)
        assert.are.same({ version = v, upstreams = { "host1", "host2" } }, doc)
        assert.are.equal(v, rest.etag_version(h))
      end
    end)

    it("/detail gives every server parameter", function()
      local v = version()
      local status, body, h = api(inst, "GET", "/detail", nil, { Accept = "application/json" })
      assert.are.equal(200, status, body)
      assert.matches("^application/json", h["content-type"])
      local doc = assert(rest.decode(table_only(body)), "not JSON: " .. body)
      assert.are.same({
        version = v,
        upstreams = {
          json_upstream("host1", { json_server("127.0.0.1:" .. B1) }),
          json_upstream("host2", { json_server("127.0.0.1:" .. B2) }),
        },
      }, doc)
    end)

    it("/upstream/NAME with non-default parameters", function()
      local status, body = api(inst, "POST", "/upstream/jsonup",
        "server 127.0.0.1:9001 weight=2 max_fails=3 fail_timeout=4s backup;\nserver 127.0.0.1:9002;\n")
      assert.are.equal(200, status, body)
      local v = version()
      local h
      status, body, h = api(inst, "GET", "/upstream/jsonup?format=json")
      assert.are.equal(200, status, body)
      assert.matches("^application/json", h["content-type"])
      local doc = assert(rest.decode(table_only(body)), "not JSON: " .. body)
      local want = json_upstream("jsonup", {
        json_server("127.0.0.1:9001", { weight = 2, max_fails = 3, fail_timeout = 4, backup = true }),
        json_server("127.0.0.1:9002"),
      })
      want.version = v
      assert.are.same(want, doc)
      -- text form of the same
      status, body = api(inst, "GET", "/upstream/jsonup")
      assert.are.equal(200, status)
      assert.are.equal("server 127.0.0.1:9001 weight=2 max_fails=3 fail_timeout=4s backup\n"
        .. "server 127.0.0.1:9002\n", body)
      assert.are.equal(200, (api(inst, "DELETE", "/upstream/jsonup")))
    end)

    it("404 stays 404 in JSON", function()
      local status = api(inst, "GET", "/upstream/nope?format=json")
      assert.are.equal(404, status)
    end)
  end)

  describe("POST /upstream/NAME", function()
    it("creates an upstream that routes at once, and replaces it whole", function()
      local status, body = api(inst, "POST", "/upstream/made", ("server 127.0.0.1:%d;"):format(B1))
      assert.are.equal(200, status, body)
      assert.are.equal("success", body)
      local list, ports = rest.route(inst, "made", 6)
      assert.are.same({ B1 }, rest.keys(ports), rest.show(list))

      status, body = api(inst, "POST", "/upstream/made", ("server 127.0.0.1:%d weight=3;\n"):format(B2))
      assert.are.equal(200, status, body)
      assert.are.equal("success", body)
      status, body = api(inst, "GET", "/upstream/made")
      assert.are.equal(200, status)
      assert.are.equal(("server 127.0.0.1:%d weight=3\n"):format(B2), body)
      list, ports = rest.route(inst, "made", 6)
      assert.are.same({ B2 }, rest.keys(ports), rest.show(list))
      assert.are.equal(200, (api(inst, "DELETE", "/upstream/made")))
    end)

    it("refuses a bad body with 400 naming the parameter and line; nothing changes", function()
      local before, v = detail(), version()
      local cases = {
        { "server 127.0.0.1:9001 drain;", "drain" },
        { "server 127.0.0.1:9001;\nserver 127.0.0.1:9002 colour=red;\n", "line 2" },
        { "server 127.0.0.1:9001;\nserver 127.0.0.1:9002 colour=red;\n", "colour" },
        { "server 127.0.0.1:9001 weight=0;", "weight" },
        { "server 127.0.0.1:9001", "';'" },
        { "", nil },
        { "\n  \n", nil },
      }
      for _, c in ipairs(cases) do
        local status, body = api(inst, "POST", "/upstream/host1", c[1])
        assert.are.equal(400, status, ("%q -> %s %s"):format(c[1], tostring(status), tostring(body)))
        if c[2] then
          assert.is_truthy(body:find(c[2], 1, true), ("%q -> %q lacks %q"):format(c[1], body, c[2]))
        end
        status, body = api(inst, "POST", "/upstream/brandnew", c[1])
        assert.are.equal(400, status, ("%q -> %s %s"):format(c[1], tostring(status), tostring(body)))
      end
      assert.are.equal(before, detail())
      assert.are.equal(v, version())
      assert.are.equal(404, (api(inst, "GET", "/upstream/brandnew")))
    end)

    it("a body mixing good and bad lines changes nothing", function()
      local before, v = detail(), version()
      local status, body = api(inst, "POST", "/upstream/host1",
        ("server 127.0.0.1:%d;\nserver 127.0.0.1:9003;\nserver 127.0.0.1:9004 drain;\n"):format(B2))
      assert.are.equal(400, status, body)
      assert.is_truthy(body:find("line 3", 1, true), body)
      assert.are.equal(before, detail())
      assert.are.equal(v, version())
      local list, ports = rest.route(inst, "host1", 4)
      assert.are.same({ B1 }, rest.keys(ports), rest.show(list))
    end)

    it("refuses a name with bad characters with 400", function()
      local v = version()
      for _, name in ipairs { "bad!name", "a%20b", "semi;colon", "br%7Bace" } do
        local status, body = api(inst, "POST", "/upstream/" .. name, "server 127.0.0.1:9001;")
        assert.are.equal(400, status, name .. ": " .. tostring(status) .. " " .. tostring(body))
      end
      assert.are.equal(v, version())
    end)
  end)

  describe("what ngx_http_dyups_module's users send", function()
    local CHECKS = "check interval=3000 rise=2 fall=5 timeout=1000 type=http;\n"
      .. 'check_http_send "HEAD / HTTP/1.0\\r\\n\\r\\n";\n'

    --- Posts the Tengine-style body of upstream `name`: zone, max_conns and
    --- the check lines its users resend with every update.
    local function post_tengine(name)
      local status, body = api(inst, "POST", "/upstream/" .. name,
        ("zone %s 64k;\nserver 127.0.0.1:%d max_conns=10;\nserver 127.0.0.1:%d;\n"):format(name, B1, B2)
          .. CHECKS .. "check_http_expect_alive http_2xx http_3xx;\n")
      assert.are.equal(200, status, body)
      assert.are.equal("success", body)
    end

    it("a body with zone, max_conns and the check lines is taken, shown and routed", function()
      post_tengine("tengine")
      local status, body = api(inst, "GET", "/upstream/tengine")
      assert.are.equal(200, status)
      assert.are.equal(CHECKS .. ("server 127.0.0.1:%d max_conns=10\nserver 127.0.0.1:%d\n"):format(B1, B2), body)
      status, body = api(inst, "GET", "/upstream/tengine?format=json")
      assert.are.equal(200, status)
      local doc = rest.decode(body)
      assert.are.same({ interval = 3000, rise = 2, fall = 5, timeout = 1000, default_down = true,
        type = "http", port = 0, jitter = 0 }, doc.check)
      assert.are.equal("HEAD / HTTP/1.0\r\n\r\n", doc.check_http_send)
      assert.are.equal(10, doc.servers[1].max_conns)
      status, body = api(inst, "GET", "/detail")
      assert.are.equal(200, status)
      assert.is_truthy(body:find("\ntengine\n" .. detail_line(B1):gsub("max_conns=0", "max_conns=10")
        .. detail_line(B2) .. "\n", 1, true), body)
      -- default_down (the check line's default): new servers take traffic
      -- once their first rise=2 probes passed, about one interval (3 s) on.
      local want = table.concat(rest.sorted { B1, B2 }, " ")
      local list, ports = nginx.wait_until(function()
        local l, p = rest.route(inst, "tengine", 8)
        if table.concat(rest.keys(p), " ") == want then return l, p end
      end, 10, "both servers of tengine up by their checks")
      assert.are.same(rest.sorted { B1, B2 }, rest.keys(ports), rest.show(list))
      assert.are.equal(200, (api(inst, "DELETE", "/upstream/tengine")))
    end)

    it("/detail's server lines, copied back into a POST, make the same upstream", function()
      post_tengine("original")
      local _, body = api(inst, "GET", "/detail")
      local block = body:match("\noriginal\n(.-\n)\n")
      assert.is_truthy(block, body)
      -- nginx writes the flags bare: a script drops `backup=0 down=0`.
      local copy = block:gsub(" backup=0 down=0\n", ";\n")
      local status, answer = api(inst, "POST", "/upstream/copy", copy)
      assert.are.equal(200, status, copy .. " -> " .. tostring(answer))
      _, body = api(inst, "GET", "/detail")
      assert.are.equal(block, body:match("\ncopy\n(.-\n)\n"), body)
      assert.are.equal(200, (api(inst, "DELETE", "/upstream/original")))
      assert.are.equal(200, (api(inst, "DELETE", "/upstream/copy")))
    end)

    it("per-server changes keep the check settings; a POST replaces them", function()
      post_tengine("kept")
      local U = "/upstream/kept"
      assert.are.equal(200, (api(inst, "POST", U .. "/servers", "127.0.0.1:9009 backup")))
      assert.are.equal(200, (api(inst, "PATCH", U .. "/servers/127.0.0.1:" .. B2, "weight=2 max_conns=4")))
      assert.are.equal(200, (api(inst, "DELETE", U .. "/servers/127.0.0.1:9009")))
      local status, body = nginx.http(inst.ports.proxy, "PUT",
        ("/ups?op=del&server=127.0.0.1:%d&upstream=kept"):format(B2))
      assert.are.equal(200, status, body)
      status, body = api(inst, "GET", U)
      assert.are.equal(200, status)
      assert.are.equal(CHECKS .. ("server 127.0.0.1:%d max_conns=10\nserver 127.0.0.1:%d weight=2 max_conns=4 down\n")
        :format(B1, B2), body)
      assert.are.equal(200, (api(inst, "POST", U, ("server 127.0.0.1:%d;"):format(B1))))
      status, body = api(inst, "GET", U)
      assert.are.equal(200, status)
      assert.are.equal(("server 127.0.0.1:%d\n"):format(B1), body)
      assert.are.equal(200, (api(inst, "DELETE", U)))
    end)

    it("names match in any case: Host: Foo.Example routes to what POST /upstream/Foo.Example made", function()
      local status, body = api(inst, "POST", "/upstream/Foo.Example", ("server 127.0.0.1:%d;"):format(B1))
      assert.are.equal(200, status, body)
      -- nginx lower-cases $host, by which the proxy routes
      local list, ports = rest.route(inst, "Foo.Example", 6)
      assert.are.same({ B1 }, rest.keys(ports), rest.show(list))
      status, body = api(inst, "GET", "/upstream/foo.example")
      assert.are.equal(200, status, body)
      assert.are.equal(("server 127.0.0.1:%d\n"):format(B1), body)
      -- replaced under another spelling: still one upstream, shown as first spelt
      assert.are.equal(200, (api(inst, "POST", "/upstream/FOO.EXAMPLE", ("server 127.0.0.1:%d;"):format(B2))))
      local _, names = api(inst, "GET", "/list")
      assert.are.equal("host1\nhost2\nFoo.Example\n", names)
      list, ports = rest.route(inst, "foo.example", 6)
      assert.are.same({ B2 }, rest.keys(ports), rest.show(list))
      assert.are.equal(200, (api(inst, "DELETE", "/upstream/foo.EXAMPLE")))
      assert.are.equal(404, (api(inst, "GET", "/upstream/Foo.Example")))
    end)

    it("what nginx refuses is refused, with a message naming what is wrong; nothing changes", function()
      local before, v = detail(), version()
      local cases = {
        { "POST", "/upstream/host1", "server 127.0.0.1:9001;\nsticky cookie srv;\n",
          'line 2: sticky cookie srv: unknown directive "sticky"' },
        { "POST", "/upstream/host1", "server 127.0.0.1:9001;\ncheck interval=0;\n",
          "line 2: check interval=0: interval=0: interval must be 1.." },
        { "POST", "/upstream/host1", "server 127.0.0.1:9001;\ncheck type=mysql;\n", 'check type "mysql" is not supported' },
        { "POST", "/upstream/host1", "server 127.0.0.1:9001 backup;\nserver 127.0.0.1:9002 backup;\n",
          "only backup servers" },
        { "POST", "/upstream/host1", "server 127.0.0.1:9001; server 127.0.0.1:9001;",
          "server 127.0.0.1:9001 is given twice on line 1" },
        { "POST", "/upstream/host1", "server http://127.0.0.1:8088;", "has no scheme (http://)" },
        { "POST", "/upstream/host1/servers", "127.0.0.1:1,127.0.0.1:2", "one address, not a list" },
        { "PATCH", "/upstream/host1/servers/127.0.0.1:" .. B1, "weight=2;", "a PATCH body is parameters without ';'" },
      }
      for _, c in ipairs(cases) do
        local status, body = api(inst, c[1], c[2], c[3])
        assert.are.equal(400, status, ("%s %s %q -> %s %s"):format(c[1], c[2], c[3], tostring(status), tostring(body)))
        assert.is_truthy(body:find(c[4], 1, true), ("%q -> %q lacks %q"):format(c[3], body, c[4]))
      end
      assert.are.equal(before, detail())
      assert.are.equal(v, version())
    end)
  end)

  describe("DELETE /upstream/NAME", function()
    it("answers success, then 404; routing stops", function()
      assert.are.equal(200, (api(inst, "POST", "/upstream/gone", ("server 127.0.0.1:%d;"):format(B1))))
      local status, body = api(inst, "DELETE", "/upstream/gone")
      assert.are.equal(200, status, body)
      assert.are.equal("success", body)
      local list = rest.route(inst, "gone", 4)
      for _, r in ipairs(list) do assert.are.equal(502, r.status, rest.show(list)) end
      local v = version()
      status, body = api(inst, "DELETE", "/upstream/gone")
      assert.are.equal(404, status)
      assert.matches("upstream gone not found", body, 1, true)
      assert.are.equal(v, version())
    end)
  end)

  describe("/upstream/NAME/servers", function()
    local U = "srv"
    local function servers()
      local status, body = api(inst, "GET", "/upstream/" .. U)
      assert.are.equal(200, status, body)
      return body
    end

    before_each(function()
      local status, body = api(inst, "POST", "/upstream/" .. U, ("server 127.0.0.1:%d;"):format(B1))
      assert.are.equal(200, status, body)
    end)

    it("POST adds one server (IP:PORT [params] or a server line); 400 if present; 404 unknown upstream", function()
      local status, body = api(inst, "POST", "/upstream/" .. U .. "/servers", ("127.0.0.1:%d weight=3"):format(B2))
      assert.are.equal(200, status, body)
      assert.are.equal("success", body)
      assert.are.equal(("server 127.0.0.1:%d\nserver 127.0.0.1:%d weight=3\n"):format(B1, B2), servers())
      local list, ports = rest.route(inst, U, 12)
      assert.are.same(rest.sorted { B1, B2 }, rest.keys(ports), rest.show(list))

      status, body = api(inst, "POST", "/upstream/" .. U .. "/servers", "server 127.0.0.1:9005 backup;")
      assert.are.equal(200, status, body)
      assert.are.equal(("server 127.0.0.1:%d\nserver 127.0.0.1:%d weight=3\nserver 127.0.0.1:9005 backup\n")
        :format(B1, B2), servers())

      local v = version()
      status, body = api(inst, "POST", "/upstream/" .. U .. "/servers", ("127.0.0.1:%d"):format(B2))
      assert.are.equal(400, status, body)
      status, body = api(inst, "POST", "/upstream/nope/servers", "127.0.0.1:9006")
      assert.are.equal(404, status, body)
      status, body = api(inst, "POST", "/upstream/" .. U .. "/servers", "127.0.0.1:9007 drain")
      assert.are.equal(400, status, body)
      assert.is_truthy(body:find("drain", 1, true), body)
      assert.are.equal(v, version())
    end)

    it("GET /upstream/NAME/servers and /servers/ADDR read; 404 for an unknown server", function()
      local status, body = api(inst, "GET", "/upstream/" .. U .. "/servers")
      assert.are.equal(200, status)
      assert.are.equal(("server 127.0.0.1:%d\n"):format(B1), body)
      status, body = api(inst, "GET", ("/upstream/%s/servers/127.0.0.1:%d"):format(U, B1))
      assert.are.equal(200, status)
      assert.are.equal(("server 127.0.0.1:%d\n"):format(B1), body)
      status = api(inst, "GET", ("/upstream/%s/servers/127.0.0.1:9"):format(U))
      assert.are.equal(404, status)
    end)

    it("PATCH changes parameters", function()
      assert.are.equal(200, (api(inst, "POST", "/upstream/" .. U .. "/servers", ("127.0.0.1:%d"):format(B2))))
      local path = ("/upstream/%s/servers/127.0.0.1:%d"):format(U, B2)
      local status, body = api(inst, "PATCH", path, "weight=5 backup")
      assert.are.equal(200, status, body)
      assert.are.equal("success", body)
      status, body = api(inst, "GET", path)
      assert.are.equal(200, status)
      assert.are.equal(("server 127.0.0.1:%d weight=5 backup\n"):format(B2), body)
      -- a backup does not answer while the primary is up
      local list, ports = rest.route(inst, U, 8)
      assert.are.same({ B1 }, rest.keys(ports), rest.show(list))

      status, body = api(inst, "PATCH", path, "down")
      assert.are.equal(200, status, body)
      status, body = api(inst, "PATCH", path, "down=off max_fails=2 fail_timeout=5s")
      assert.are.equal(200, status, body)
      status, body = api(inst, "GET", path)
      assert.are.equal(200, status)
      assert.are.equal(("server 127.0.0.1:%d weight=5 max_fails=2 fail_timeout=5s backup\n"):format(B2), body)

      local v = version()
      status, body = api(inst, "PATCH", path, "colour=red")
      assert.are.equal(400, status, body)
      status = api(inst, "PATCH", ("/upstream/%s/servers/127.0.0.1:9"):format(U), "weight=2")
      assert.are.equal(404, status)
      status = api(inst, "PATCH", "/upstream/nope/servers/127.0.0.1:9", "weight=2")
      assert.are.equal(404, status)
      assert.are.equal(v, version())
    end)

    it("DELETE removes a server, 404 the second time", function()
      assert.are.equal(200, (api(inst, "POST", "/upstream/" .. U .. "/servers", ("127.0.0.1:%d"):format(B2))))
      local path = ("/upstream/%s/servers/127.0.0.1:%d"):format(U, B1)
      local status, body = api(inst, "DELETE", path)
      assert.are.equal(200, status, body)
      assert.are.equal("success", body)
      assert.are.equal(("server 127.0.0.1:%d\n"):format(B2), servers())
      local list, ports = rest.route(inst, U, 6)
      assert.are.same({ B2 }, rest.keys(ports), rest.show(list))
      status = api(inst, "DELETE", path)
      assert.are.equal(404, status)
    end)

    it("refuses to remove or down the last available server (400)", function()
      local v = version()
      local path = ("/upstream/%s/servers/127.0.0.1:%d"):format(U, B1)
      local status, body = api(inst, "DELETE", path)
      assert.are.equal(400, status, body)
      assert.is_truthy(body:find("last available server", 1, true), body)
      status, body = api(inst, "PATCH", path, "down")
      assert.are.equal(400, status, body)
      assert.is_truthy(body:find("last available server", 1, true), body)
      assert.are.equal(("server 127.0.0.1:%d\n"):format(B1), servers())
      assert.are.equal(v, version())
      -- a server that is down is no available server either
      assert.are.equal(200, (api(inst, "POST", "/upstream/" .. U .. "/servers", "127.0.0.1:9008 down")))
      v = version()
      status, body = api(inst, "DELETE", path)
      assert.are.equal(400, status, body)
      assert.is_truthy(body:find("last available server", 1, true), body)
      assert.are.equal(v, version())
      assert.are.equal(("server 127.0.0.1:%d\nserver 127.0.0.1:9008 down\n"):format(B1), servers())
      local list, ports = rest.route(inst, U, 4)
      assert.are.same({ B1 }, rest.keys(ports), rest.show(list))
    end)
  end)

  describe("methods", function()
    it("answers 405 with an Allow header", function()
      local cases = {
        { "PUT", "/upstream/host1", "GET, HEAD, POST, DELETE" },
        { "PATCH", "/upstream/host1", "GET, HEAD, POST, DELETE" },
        { "POST", "/list", "GET, HEAD" },
        { "DELETE", "/detail", "GET, HEAD" },
        { "PUT", "/upstream/host1/servers", "GET, HEAD, POST" },
        { "DELETE", "/upstream/host1/servers", "GET, HEAD, POST" },
        { "POST", ("/upstream/host1/servers/127.0.0.1:%d"):format(B1), "GET, HEAD, PATCH, DELETE" },
      }
      local v = version()
      for _, c in ipairs(cases) do
        local status, body, h = api(inst, c[1], c[2], "server 127.0.0.1:9;")
        assert.are.equal(405, status, c[1] .. " " .. c[2] .. ": " .. tostring(body))
        assert.are.equal(c[3], h.allow, c[1] .. " " .. c[2])
      end
      assert.are.equal(v, version())
    end)

    it("HEAD reads answer like GET, without a body", function()
      local status, body, h = api(inst, "HEAD", "/list")
      assert.are.equal(200, status)
      assert.are.equal("", body)
      assert.matches('^"%d+"$', h.etag)
    end)
  end)

  describe("request size", function()
    it("answers 413 to a body over 64 KiB and changes nothing", function()
      local v = version()
      local big = ("server 127.0.0.1:9001;\n" .. ("#"):rep(76) .. "\n"):rep(700) -- 70000 bytes
      assert.are.equal(70000, #big)
      local status, body = api(inst, "POST", "/upstream/big", big)
      assert.are.equal(413, status, body:sub(1, 200))
      status = api(inst, "POST", "/upstream/host1/servers", "127.0.0.1:9001" .. (" "):rep(70000))
      assert.are.equal(413, status)
      assert.are.equal(v, version())
      assert.are.equal(404, (api(inst, "GET", "/upstream/big")))
    end)

    it("takes a body that arrives in a later packet than the head (a slow client)", function()
      local T = require "spec.helpers.traffic"
      local v = version()
      local status, body = T.request(inst.ports.api, "POST", "/upstream/late",
        { body = ("server 127.0.0.1:%d;"):format(B1), body_after = 0.1 })
      assert.are.equal(200, status, body)
      status, body = T.request(inst.ports.api, "PATCH", ("/upstream/late/servers/127.0.0.1:%d"):format(B1),
        { body = "weight=7", body_after = 0.1 })
      assert.are.equal(200, status, body)
      assert.are.equal(v + 2, version())
      local _, lines = api(inst, "GET", "/upstream/late")
      assert.are.equal(("server 127.0.0.1:%d weight=7\n"):format(B1), lines)
      assert.are.equal(200, (api(inst, "DELETE", "/upstream/late")))
    end)

    it("takes a body just under the limit", function()
      local body = ("server 127.0.0.1:%d;\n"):format(B1) .. ("#"):rep(60000) .. "\n"
      local status, rbody = api(inst, "POST", "/upstream/almost", body)
      assert.are.equal(200, status, rbody)
      assert.are.equal(200, (api(inst, "DELETE", "/upstream/almost")))
    end)
  end)

  describe("ETag and If-Match", function()
    it("a stale If-Match gets 412 and changes nothing", function()
      local status, body, h = api(inst, "GET", "/upstream/host2")
      assert.are.equal(200, status, body)
      local e0 = h.etag
      local v0 = rest.etag_version(h)
      assert.is_number(v0, tostring(e0))

      -- someone else writes
      status, body, h = api(inst, "POST", "/upstream/other", "server 127.0.0.1:9010;")
      assert.are.equal(200, status, body)
      local v1 = rest.etag_version(h)
      assert.is_number(v1, "a write answers with the new ETag: " .. tostring(h.etag))
      assert.is_true(v1 > v0)
      assert.are.equal(v1, version())

      -- our writes based on the old read
      local before = detail()
      status, body = api(inst, "POST", "/upstream/host2", "server 127.0.0.1:9011;", { ["If-Match"] = e0 })
      assert.are.equal(412, status, body)
      status = api(inst, "DELETE", "/upstream/other", nil, { ["If-Match"] = e0 })
      assert.are.equal(412, status)
      status = api(inst, "POST", "/upstream/host2/servers", "127.0.0.1:9012", { ["If-Match"] = e0 })
      assert.are.equal(412, status)
      status = api(inst, "PATCH", ("/upstream/host2/servers/127.0.0.1:%d"):format(B2), "weight=4",
        { ["If-Match"] = e0 })
      assert.are.equal(412, status)
      status = api(inst, "DELETE", ("/upstream/host2/servers/127.0.0.1:%d"):format(B2), nil, { ["If-Match"] = e0 })
      assert.are.equal(412, status)
      status = api(inst, "POST", "/upstream/host2", "server 127.0.0.1:9011;", { ["If-Match"] = "garbage" })
      assert.are.equal(412, status)
      assert.are.equal(before, detail())
      assert.are.equal(v1, version())
      assert.are.equal(200, (api(inst, "DELETE", "/upstream/other")))
    end)

    it("the current If-Match succeeds: 200 success and the new ETag", function()
      local v1 = version()
      local status, body, h = api(inst, "POST", "/upstream/guarded", "server 127.0.0.1:9013;",
        { ["If-Match"] = '"' .. v1 .. '"' })
      local applied = api(inst, "GET", "/upstream/guarded") == 200
      local v2 = version()
      assert.are.equal(200, status, ("If-Match: \"%d\" (current) -> %d (change applied: %s, version now %d): %s")
        :format(v1, status, tostring(applied), v2, body))
      assert.are.equal("success", body)
      assert.are.equal(v2, rest.etag_version(h))
      assert.is_true(v2 > v1)
    end)

    it("answers 412 only when the change was not made", function()
      -- whatever the status of a guarded write, 412 must mean "not written"
      local v1 = version()
      for i, req in ipairs {
        { "POST", "/upstream/g1", "server 127.0.0.1:9014;" },
        { "POST", "/upstream/g1/servers", "127.0.0.1:9015" },
        { "PATCH", "/upstream/g1/servers/127.0.0.1:9015", "weight=3" },
        { "DELETE", "/upstream/g1/servers/127.0.0.1:9015" },
        { "DELETE", "/upstream/g1" },
      } do
        local status, body = api(inst, req[1], req[2], req[3], { ["If-Match"] = '"' .. v1 .. '"' })
        local v2 = version()
        if status == 412 then
          assert.are.equal(v1, v2, ("step %d: %s %s answered 412 but the table moved from version %d to %d")
            :format(i, req[1], req[2], v1, v2))
        else
          assert.are.equal(200, status, body)
        end
        v1 = v2
      end
    end)

    it("the JSON version is the ETag", function()
      local status, body, h = api(inst, "GET", "/detail?format=json")
      assert.are.equal(200, status)
      local doc = assert(rest.decode(body))
      assert.are.equal(doc.version, rest.etag_version(h))
    end)
  end)

  -- module_spec counts the returns of the functions that run outside nginx.
  it("the content handlers and log() return nothing", function()
    for _, f in ipairs { "handle_check", "handle_ups", "handle_api", "log" } do
      -- Not dy.run: a handler sets its own status.
      local _, out = nginx.http(inst.ports.proxy, "POST", "/lua",
        { body = ("return '|' .. select('#', require('ngx.dyups').%s())"):format(f) })
      assert.are.equal("|0", tostring(out):match("|%d+\n$"):sub(1, -2), f .. ": " .. tostring(out))
    end
  end)

  -- What a careless or hostile client sends. nginx's not-modified filter
  -- evaluates conditional headers against the answer, after the handler
  -- wrote; every answer here must say whether the table changed.
  describe("preconditions", function()
    local T = require "spec.helpers.traffic"

    --- One request over a raw socket, headers in the order given.
    local function send(method, path, body, headers)
      local c = assert(T.conn(inst.ports.api))
      local lines = { ("%s %s HTTP/1.1"):format(method, path), "Host: 127.0.0.1", "Connection: close" }
      for _, h in ipairs(headers or {}) do lines[#lines + 1] = h end
      if body then lines[#lines + 1] = "Content-Length: " .. #body end
      assert(c:_send(table.concat(lines, "\r\n") .. "\r\n\r\n" .. (body or ""), T.now() + 5))
      local status, rbody, h = c:response()
      c:close()
      assert(status, rbody)
      return status, rbody, h
    end

    local function exists(name) return (api(inst, "GET", "/upstream/" .. name)) == 200 end

    it("If-None-Match: * creates only: 200 and the new ETag when absent, 412 and unchanged when present", function()
      local v = version()
      local status, body, h = send("POST", "/upstream/inm", "server 127.0.0.1:9020;", { "If-None-Match: *" })
      assert.are.equal(200, status, ("answered %d %q; applied: %s"):format(status, body, tostring(exists("inm"))))
      assert.are.equal("success", body)
      assert.are.equal(v + 1, rest.etag_version(h))
      assert.are.equal(v + 1, version())
      status, body = send("POST", "/upstream/inm", "server 127.0.0.1:9021;", { "If-None-Match: *" })
      assert.are.equal(412, status, body)
      assert.truthy(body:find("exists", 1, true), body)
      assert.are.equal(v + 1, version())
      assert.are.equal(200, (api(inst, "DELETE", "/upstream/inm")))
    end)

    it("If-Unmodified-Since on a write is refused with 400 before it; with If-Match it is If-Match that counts", function()
      local v = version()
      local date = "Thu, 01 Jan 2037 00:00:00 GMT"
      local status, body = send("POST", "/upstream/ius", "server 127.0.0.1:9022;", { "If-Unmodified-Since: " .. date })
      assert.are.equal(400, status, ("answered %d %q; applied: %s"):format(status, body, tostring(exists("ius"))))
      assert.truthy(body:find("If-Match", 1, true), body)
      assert.are.equal(v, version())
      assert.is_false(exists("ius"))
      status, body = send("POST", "/upstream/ius", "server 127.0.0.1:9022;",
        { "If-Unmodified-Since: " .. date, ('If-Match: "%d"'):format(v) })
      assert.are.equal(200, status, body)
      assert.are.equal(v + 1, version())
      assert.are.equal(200, (api(inst, "DELETE", "/upstream/ius")))
    end)

    it("an If-Match after 100 other headers is seen: stale -> 412 unapplied, current -> 200 applied", function()
      local many = {}
      for i = 1, 120 do many[i] = ("X-Filler-%d: %d"):format(i, i) end
      local v = version()
      local stale = { unpack(many) }
      stale[#stale + 1] = ('If-Match: "%d"'):format(v - 1)
      local status, body = send("POST", "/upstream/deep", "server 127.0.0.1:9023;", stale)
      assert.are.equal(412, status, ("answered %d %q; applied: %s"):format(status, body, tostring(exists("deep"))))
      assert.truthy(body:find("table version", 1, true), body) -- ours, not nginx's HTML page
      assert.are.equal(v, version())
      assert.is_false(exists("deep"))
      local current = { unpack(many) }
      current[#current + 1] = ('If-Match: "%d"'):format(v)
      status, body = send("POST", "/upstream/deep", "server 127.0.0.1:9023;", current)
      assert.are.equal(200, status, body)
      assert.are.equal(v + 1, version())
      assert.are.equal(200, (api(inst, "DELETE", "/upstream/deep")))
    end)

    it("whatever the preconditions, 200 means the table moved by one and anything else that it did not", function()
      local date = "Thu, 01 Jan 1970 00:00:00 GMT"
      local sets = {
        function() return { "If-None-Match: *" } end,
        function(v) return { ('If-None-Match: "%d"'):format(v) } end,
        function(v) return { ('If-None-Match: W/"%d", "0"'):format(v) } end,
        function() return { "If-Modified-Since: " .. date } end,
        function() return { "If-Unmodified-Since: " .. date } end,
        function(v) return { ('If-Match: "%d"'):format(v), "If-None-Match: *" } end,
        function(v) return { ('If-Match: W/"%d"'):format(v), "If-Modified-Since: " .. date } end,
        function(v) return { ('If-Match: "%d", "%d"'):format(v, v + 1) } end,
        function() return { "If-Match: *" } end,
        function() return { "If-Match: *", "If-None-Match: *" } end,
        function() return { "If-Match: nonsense" } end,
      }
      local requests = {
        { "POST", "/upstream/pre", "server 127.0.0.1:9024;" },
        { "POST", "/upstream/pre/servers", "127.0.0.1:9025" },
        { "PATCH", "/upstream/pre/servers/127.0.0.1:9025", "weight=2" },
        { "DELETE", "/upstream/pre/servers/127.0.0.1:9025" },
        { "DELETE", "/upstream/pre" },
      }
      local seen = {}
      for i, headers_of in ipairs(sets) do
        -- From no upstream `pre`, each request that succeeds changes something.
        api(inst, "DELETE", "/upstream/pre")
        for _, req in ipairs(requests) do
          local v = version()
          local headers = headers_of(v)
          local status, body = send(req[1], req[2], req[3], headers)
          local now = version()
          local what = ("set %d (%s) %s %s -> %d %q"):format(i, table.concat(headers, "; "), req[1], req[2],
            status, body)
          seen[status] = true
          if status == 200 then
            assert.are.equal(v + 1, now, what .. ": answered 200, the table did not move by one")
          else
            assert.is_true(status == 400 or status == 404 or status == 412, what)
            assert.are.equal(v, now, what .. ": answered " .. status .. ", the table moved")
          end
        end
      end
      assert.is_true(seen[200] and seen[400] and seen[412], "every outcome was exercised")
      api(inst, "DELETE", "/upstream/pre")
    end)

    it("reads: If-None-Match with the ETag -> 304, a stale If-Match -> 412, dates ignored", function()
      local v = version()
      local status, body, h = send("GET", "/upstream/host1", nil, { ('If-None-Match: "%d"'):format(v) })
      assert.are.equal(304, status, body)
      assert.are.equal(v, rest.etag_version(h))
      status = send("GET", "/upstream/host1", nil, { ('If-None-Match: "%d"'):format(v - 1) })
      assert.are.equal(200, status)
      status, body = send("GET", "/upstream/host1", nil, { ('If-Match: "%d"'):format(v - 1) })
      assert.are.equal(412, status, body)
      status = send("GET", "/upstream/host1", nil, { "If-Unmodified-Since: Thu, 01 Jan 1970 00:00:00 GMT" })
      assert.are.equal(200, status)
    end)
  end)

  -- nginx decodes `%2F` in $uri into a separator; a front proxy that
  -- authorises by the path it saw would let these through.
  describe("an encoded '/' in a name", function()
    local T = require "spec.helpers.traffic"

    local function victim()
      local status, body = api(inst, "POST", "/upstream/victim", "server 127.0.0.1:9030; server 127.0.0.1:9031;")
      assert.are.equal(200, status, body)
      return version(), select(2, api(inst, "GET", "/upstream/victim"))
    end

    local function refused(method, path, body, v, servers)
      local status, rbody = T.request(inst.ports.api, method, path, { body = body })
      assert.are.equal(400, status, method .. " " .. path .. ": " .. tostring(rbody))
      assert.truthy(rbody:find("'/'", 1, true), rbody)
      assert.are.equal(servers, select(2, api(inst, "GET", "/upstream/victim")))
      assert.are.equal(v, version())
    end

    it("POST /upstream/victim%2Fservers adds no server to victim", function()
      local v, servers = victim()
      refused("POST", "/upstream/victim%2Fservers", "127.0.0.1:9032", v, servers)
    end)

    it("DELETE /upstream/victim%2Fservers%2FADDR removes no server of victim", function()
      local v, servers = victim()
      refused("DELETE", "/upstream/victim%2Fservers%2F127.0.0.1:9031", nil, v, servers)
      refused("PATCH", "/upstream/victim%2Fservers%2F127.0.0.1:9031", "down", v, servers)
    end)

    it("POST /upstream/h16%2F..%2Fvictim does not replace victim", function()
      local v, servers = victim()
      refused("POST", "/upstream/h16%2F..%2Fvictim", "server 127.0.0.1:9033;", v, servers)
      refused("DELETE", "/upstream/h16%2F..%2Fvictim", nil, v, servers)
      assert.are.equal(200, (api(inst, "DELETE", "/upstream/victim")))
    end)
  end)
end)

describe("REST on an empty table", function()
  local inst, B1

  lazy_setup(function()
    local _, ports = dy.backends(1)
    B1 = ports[1]
    inst = dy.proxy { upstreams = "" }
    inst:start()
  end)

  lazy_teardown(function()
    nginx.stop_all()
  end)

  it("/list and /detail answer 204 with an empty body", function()
    for _, path in ipairs { "/list", "/detail" } do
      local status, body, h = api(inst, "GET", path)
      assert.are.equal(204, status, path)
      assert.are.equal("", body, path)
      assert.matches('^"%d+"$', h.etag or "")
    end
  end)

  it("JSON /list of nothing is an empty list", function()
    local status, body, h = api(inst, "GET", "/list", nil, { Accept = "application/json" })
    assert.are.equal(200, status)
    assert.matches('"upstreams":%[%]', body)
    local doc = assert(rest.decode(body))
    assert.are.equal(rest.etag_version(h), doc.version)
  end)

  it("the first upstream makes /list 200, deleting it 204 again", function()
    assert.are.equal(200, (api(inst, "POST", "/upstream/first", ("server 127.0.0.1:%d;"):format(B1))))
    local status, body = api(inst, "GET", "/list")
    assert.are.equal(200, status)
    assert.are.equal("first\n", body)
    local list, ports = rest.route(inst, "first", 4)
    assert.are.same({ B1 }, rest.keys(ports), rest.show(list))
    assert.are.equal(200, (api(inst, "DELETE", "/upstream/first")))
    status, body = api(inst, "GET", "/detail")
    assert.are.equal(204, status)
    assert.are.equal("", body)
  end)
end)

describe("REST with trylock = true while another process holds the lock", function()
  local inst, B1, STATE

  lazy_setup(function()
    local _, ports = dy.backends(1)
    B1 = ports[1]
    inst = dy.proxy {
      upstreams = ("upstream host1 {\n    server 127.0.0.1:%d;\n}\n"):format(B1),
      init = "trylock = true,",
    }
    inst:start()
    STATE = inst.prefix .. "/state/dyups.state"
  end)

  lazy_teardown(function()
    nginx.stop_all()
  end)

  it("writes answer 409, reads still work; after release the write succeeds", function()
    local q = nginx.shell_quote
    local held, released = inst.prefix .. "/held", inst.prefix .. "/released"
    rest.background(("flock %s -c %s; touch %s"):format(q(STATE), q("touch " .. q(held) .. "; sleep 1.5"), q(released)))
    nginx.wait_until(function() return nginx.read_file(held) end, 3, "flock(1) to take the lock")

    local status, body = api(inst, "POST", "/upstream/locked", ("server 127.0.0.1:%d;"):format(B1))
    assert.are.equal(409, status, body)
    status, body = api(inst, "DELETE", "/upstream/host1")
    assert.are.equal(409, status, body)
    local ups_status, ups_body = nginx.http(inst.ports.proxy, "GET",
      "/ups?op=add&server=127.0.0.1:9020&upstream=host1")
    assert.are.equal(409, ups_status, ups_body)

    -- readers take no lock
    status, body = api(inst, "GET", "/list")
    assert.are.equal(200, status)
    assert.are.equal("host1\n", body)
    local list, ports = rest.route(inst, "host1", 4)
    assert.are.same({ B1 }, rest.keys(ports), rest.show(list))

    assert.is_nil(nginx.read_file(released), "the lock was released before the checks ended")
    nginx.wait_until(function() return nginx.read_file(released) end, 5, "flock(1) to end")

    status, body = api(inst, "POST", "/upstream/locked", ("server 127.0.0.1:%d;"):format(B1))
    assert.are.equal(200, status, body)
    assert.are.equal("success", body)
    ups_status, ups_body = nginx.http(inst.ports.proxy, "GET", "/ups?op=add&server=127.0.0.1:9020&upstream=host1")
    assert.are.equal(200, ups_status, ups_body)
    status, body = api(inst, "GET", "/list")
    assert.are.equal(200, status)
    assert.are.equal("host1\nlocked\n", body)
    status, body = api(inst, "GET", "/upstream/host1")
    assert.are.equal(200, status)
    assert.are.equal(("server 127.0.0.1:%d\nserver 127.0.0.1:9020\n"):format(B1), body)
  end)
end)

describe("REST without trylock while another process holds the lock", function()
  local inst, B1, STATE

  lazy_setup(function()
    local _, ports = dy.backends(1)
    B1 = ports[1]
    inst = dy.proxy { upstreams = ("upstream host1 {\n    server 127.0.0.1:%d;\n}\n"):format(B1) }
    inst:start()
    STATE = inst.prefix .. "/state/dyups.state"
  end)

  lazy_teardown(function()
    nginx.stop_all()
  end)

  it("a write waits for the lock (up to lock_timeout, 5 s) and then succeeds", function()
    local q = nginx.shell_quote
    local held = inst.prefix .. "/held"
    rest.background(("flock %s -c %s"):format(q(STATE), q("touch " .. q(held) .. "; sleep 0.5")))
    nginx.wait_until(function() return nginx.read_file(held) end, 3, "flock(1) to take the lock")
    local t0 = uptime()
    local status, body = api(inst, "POST", "/upstream/waited", ("server 127.0.0.1:%d;"):format(B1))
    local waited = uptime() - t0
    assert.are.equal(200, status, body)
    assert.is_true(waited >= 0.2, "the write did not wait for the lock: " .. waited .. " s")
    assert.are.equal("success", body)
    status, body = api(inst, "GET", "/list")
    assert.are.equal(200, status)
    assert.are.equal("host1\nwaited\n", body)
  end)
end)
