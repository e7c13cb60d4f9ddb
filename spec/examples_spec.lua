-- The two migrations, runnable: examples/from-upsops (the first source
-- document's nginx.conf) and examples/from-dyups (Tengine's example) answer
-- each document's requests as the document shows, on free ports; and
-- scripts/demo.sh (what `make demo EXAMPLE=NAME` runs) starts each and stops
-- it cleanly.
local nginx = require "spec.helpers.nginx"
local demo = require "spec.helpers.demo"
local T = require "spec.helpers.traffic"

local function port_of(body)
  return body and tonumber(body:match("^(%d+)\n$"))
end

-- Words of a text, one space between them: the documents' transcripts lost
-- their line breaks.
local function words(text)
  return (text:gsub("%s+", " "):gsub("^ ", ""):gsub(" $", ""))
end

describe("examples/from-upsops", function()
  local inst, P

  lazy_setup(function()
    P = demo.free_ports()
    inst = demo.example("from-upsops", P)
    inst:start()
  end)

  lazy_teardown(function()
    nginx.stop_all()
  end)

  local function get(path)
    return nginx.http(P[8080], "GET", path)
  end
  local function put(path)
    return nginx.http(P[8080], "PUT", path)
  end

  -- the backend ports answering `n` requests for /local
  local function answers(n)
    local seen, list = {}, {}
    for i = 1, n do
      local status, body = get("/local")
      assert.equal(200, status, "request " .. i .. ": " .. tostring(body))
      local port = assert(port_of(body), "not a backend's answer: " .. tostring(body))
      seen[port] = true
      list[#list + 1] = port
    end
    return seen, table.concat(list, " ")
  end

  it("serves /local from the servers of the upstream block in nginx.conf, not the backup", function()
    local seen, list = answers(12)
    assert.same({ [P[8088]] = true, [P[8090]] = true }, seen, list)
  end)

  it("answers the document's requests as it shows, and keeps a usable server", function()
    local function addr(port) return "127.0.0.1:" .. P[port] end
    for _, port in ipairs { 8088, 8090 } do
      local status, body = put("/ups?op=del&server=" .. addr(port))
      assert.equal(200, status, body)
      assert.equal('{"msg":"del a server success.","data":["' .. addr(port) .. '"],"code":"A00001"}\n', body)
    end
    local seen, list = answers(6)
    assert.same({ [P[8089]] = true }, seen, "only the backup: " .. list)
    -- The last one left is not removed.
    local status, body = put("/ups?op=del&server=" .. addr(8089))
    assert.equal(400, status, body)
    assert.truthy(body:find('"code":"E00001"', 1, true), body)
    assert.truthy(body:find("last available server of upstream local", 1, true), body)
    -- /ups/check: empty once every worker has applied the changes.
    nginx.wait_until(function()
      local s, b = put("/ups/check")
      return s == 200 and b == '{"msg":"OK","data":{},"code":"A00001"}\n'
    end, 5, "/ups/check to empty")
    for _, port in ipairs { 8088, 8090 } do
      status, body = put("/ups?op=add&server=" .. addr(port))
      assert.equal(200, status, body)
      assert.equal('{"msg":"add a server success.","data":["' .. addr(port) .. '"],"code":"A00001"}\n', body)
    end
    assert.same({ [P[8088]] = true, [P[8090]] = true }, (answers(8)))
  end)

  it("a reload with the upstream block edited in nginx.conf routes by the edited block", function()
    local template = inst.template
    local edited = template:gsub("\n%s*server 127%.0%.0%.1:" .. P[8090] .. ";", "", 1)
    assert.are_not.equal(template, edited)
    inst:reload { conf = edited }
    local seen, list = answers(6)
    assert.same({ [P[8088]] = true }, seen, list)
    assert.truthy(inst:error_log():find("upstream local set to { server 127.0.0.1:" .. P[8088]
      .. "; server 127.0.0.1:" .. P[8089] .. " backup; }", 1, true))
  end)
end)

describe("examples/from-dyups", function()
  local P

  lazy_setup(function()
    P = demo.free_ports()
  end)

  lazy_teardown(function()
    nginx.stop_all()
  end)

  it("replays the document's session, and its Lua API example", function()
    local inst = demo.example("from-dyups", P)
    inst:start()
    local api = P[8081]
    -- /detail's names and servers, as the document's session shows them:
    -- the module prints each server's parameters after it (weight=1
    -- max_conns=0 ...), which the document's (older) session did not.
    local function detail()
      local status, body = nginx.http(api, "GET", "/detail")
      assert.equal(200, status, body)
      return words((body:gsub("%f[%w][%w_]+=%S*", "")))
    end
    local mapped = function(text) return demo.with_ports(text, P) end

    -- » curl -H "host: dyhost" 127.0.0.1:8080 → 502 Bad Gateway
    local status, body = nginx.http(P[8080], "GET", "/", { headers = { Host = "dyhost" } })
    assert.equal(502, status, body)
    assert.truthy(body:find("502 Bad Gateway", 1, true), body)
    -- » curl -d "server 127.0.0.1:8089;server 127.0.0.1:8088;" 127.0.0.1:8081/upstream/dyhost → success
    status, body = nginx.http(api, "POST", "/upstream/dyhost",
      { body = mapped("server 127.0.0.1:8089;server 127.0.0.1:8088;") })
    assert.equal(200, status, body)
    assert.equal("success", words(body))
    -- » curl -H "host: dyhost" 127.0.0.1:8080 → 8089, then 8088 (one
    -- worker's rotation: one connection)
    local c = assert(T.conn(P[8080]))
    local got = {}
    for i = 1, 2 do
      local s, b = c:request("GET", "/", { headers = { Host = "dyhost" }, close = i == 2 })
      assert.equal(200, s, b)
      got[i] = words(b)
    end
    c:close()
    assert.same({ "8089", "8088" }, got)
    -- » curl 127.0.0.1:8081/detail
    assert.equal(mapped("host1 server 127.0.0.1:8088 host2 server 127.0.0.1:8089 "
      .. "dyhost server 127.0.0.1:8089 server 127.0.0.1:8088"), detail())
    -- The dump, without a third party.
    local dump = nginx.read_file(inst.prefix .. "/dump/upstream.conf") or ""
    assert.truthy(dump:find("upstream dyhost {", 1, true), dump)
    -- » curl -i -X DELETE 127.0.0.1:8081/upstream/dyhost → success
    status, body = nginx.http(api, "DELETE", "/upstream/dyhost")
    assert.equal(200, status, body)
    assert.equal("success", words(body))
    -- » curl 127.0.0.1:8081/detail
    assert.equal(mapped("host1 server 127.0.0.1:8088 host2 server 127.0.0.1:8089"), detail())
    -- upstream.conf's upstreams, by Host.
    status, body = nginx.http(P[8080], "GET", "/", { headers = { Host = "host1" } })
    assert.equal(200, status, body)
    assert.equal("8088", words(body))

    -- The Lua API example: update, then delete, each 200 "success".
    status, body = nginx.http(api, "GET", "/lua-api")
    assert.equal(200, status, body)
    assert.equal("200successupdate successdelete success", body)
    assert.equal(mapped("host1 server 127.0.0.1:8088 host2 server 127.0.0.1:8089"), detail())
    inst:stop()
  end)

  it("with the original's `include` of upstream.conf kept, nginx refuses to start and says why", function()
    local inst = demo.example("from-dyups", P, function(conf)
      return (conf:gsub("\nhttp {\n", "\nhttp {\n    include upstream.conf;\n", 1))
    end)
    local ok, err = pcall(inst.start, inst)
    assert.is_false(ok, "nginx started")
    local said = err .. (nginx.read_file(inst.prefix .. "/logs/nginx.out") or "")
    assert.truthy(said:find("upstream host1 of ngx.dyups is also an upstream block that nginx balances itself", 1, true), said)
  end)
end)

describe("scripts/demo.sh EXAMPLE=", function()
  local q = nginx.shell_quote

  for _, case in ipairs {
    { name = "from-upsops", try = 'curl -X PUT "127.0.0.1:%d/ups?op=del&server=127.0.0.1:%d"', ports = { 8080, 8088 },
      probe = function(P)
        local status, body = nginx.http(P[8080], "GET", "/local", { timeout = 1 })
        return status == 200 and (port_of(body) == P[8088] or port_of(body) == P[8090])
      end },
    { name = "from-dyups", try = 'curl -d "server 127.0.0.1:%d;server 127.0.0.1:%d;" 127.0.0.1:%d/upstream/dyhost',
      ports = { 8089, 8088, 8081 },
      probe = function(P)
        local status, body = nginx.http(P[8080], "GET", "/", { timeout = 1, headers = { Host = "host2" } })
        return status == 200 and body == "8089\n"
      end },
  } do
    it(case.name .. " starts on its ports (moved by DEMO_PORTS), says what to try, and leaves nothing behind on SIGINT", function()
      local P = demo.free_ports()
      local moves = {}
      for from, to in pairs(P) do moves[#moves + 1] = from .. "=" .. to end
      local run = demo.script("EXAMPLE=" .. case.name .. " DEMO_PORTS=" .. q(table.concat(moves, " ")))
      finally(run.cleanup)
      local text = run.started()
      assert.is_string(run.prefix, text)
      assert.is_number(run.master, text)
      assert.truthy(text:find("examples/" .. case.name, 1, true), text)
      local moved = {}
      for i, port in ipairs(case.ports) do moved[i] = P[port] end
      local try = case.try:format(unpack(moved))
      assert.truthy(text:find(try, 1, true), "expected `" .. try .. "` in:\n" .. text)
      nginx.wait_until(function() return case.probe(P) end, 10, "the demo to answer")
      assert.equal(2 + 1, #nginx.group_pids(run.master), "master + 2 workers")
      local stopped = run.stop()
      assert(stopped, "after SIGINT: nginx processes left: " .. table.concat(run.leftovers(), " ") .. "\n" .. run.output())
      assert.is_nil(io.open(run.prefix .. "/conf/nginx.conf"), "the prefix " .. run.prefix .. " was not removed")
    end)
  end

  it("make demo passes EXAMPLE to it; an unknown example is named with those there", function()
    local p = io.popen("cd " .. q(nginx.REPO) .. " && make -n demo EXAMPLE=from-dyups 2>&1")
    local plan = p:read("*a")
    p:close()
    assert.truthy(plan:find('EXAMPLE="from-dyups" bash scripts/demo.sh', 1, true), plan)
    local run = demo.script("EXAMPLE=nope")
    finally(run.cleanup)
    local said = nginx.wait_until(function()
      return not nginx.pid_alive(run.pid) and run.output()
    end, 10, "the demo to refuse")
    assert.truthy(said:find("no example 'nope': there are from-dyups from-upsops", 1, true), said)
  end)
end)
