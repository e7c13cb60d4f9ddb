-- Writers on one state file are served about in the order they came, with
-- the default options (wait up to 5 s, durable), and a write that waits or
-- syncs does not stall the nginx worker serving it (issue 11, items 2-3):
--   * 8 LuaJIT processes writing 500 times each: none refused, every write
--     applied, each after a writer's first served in its turn and within (the writes ahead of it
--     + 2) x the longest turn of the run; the longest wait is reported;
--   * the same with 4 REST clients of a 2-worker nginx and 4 LuaJIT
--     processes mixed;
--   * while a REST write waits for the lock, the worker it waits in keeps
--     answering other requests;
--   * with no thread pool the msync falls back to the event loop, says so
--     once, and the writes still succeed.
local nginx = require "spec.helpers.nginx"
local dy = require "spec.helpers.dyups"
local T = require "spec.helpers.traffic"
local child = require "spec.helpers.luajit_child"

local WRITES = 500 -- per writer, as the issue asks

-- Shared by the children: a monotonic clock in seconds.
local CLOCK = [[
local ffi = require "ffi"
pcall(ffi.cdef, "typedef struct { long tv_sec; long tv_nsec; } dyups_ts; int clock_gettime(int, dyups_ts *);")
local ts = ffi.new("dyups_ts")
local function now()
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end
]]

-- Update k of a writer of upstream NAME: `server 127.0.0.1:20000+k;`, so the
-- last one leaves port 20000 + WRITES - 1.
local LUA_WRITER = CLOCK .. [[
local dyups = require "ngx.dyups"
assert(dyups.init { path = ARGS.path })
child.wait_for_file(ARGS.go, 30, true)
local refused, other, came, done = 0, {}, {}, {}
for k = 0, ARGS.n - 1 do
  came[#came + 1] = now()
  local status, msg = dyups.update(ARGS.name, ("server 127.0.0.1:%d;"):format(20000 + k))
  done[#done + 1] = now()
  if status == 409 then
    refused = refused + 1
  elseif status ~= 200 then
    other[#other + 1] = ("k=%d: %s %s"):format(k, tostring(status), tostring(msg))
  end
end
return { refused = refused, other = other, came = came, done = done }
]]

local REST_WRITER = CLOCK .. [[
local T = require "spec.helpers.traffic"
child.wait_for_file(ARGS.go, 30, true)
local refused, other, came, done, conn = 0, {}, {}, {}, nil
for k = 0, ARGS.n - 1 do
  came[#came + 1] = now()
  local status, body
  for _ = 1, 3 do -- a dropped keep-alive connection is retried on a new one
    conn = conn or assert(T.conn(ARGS.port))
    status, body = conn:request("POST", "/upstream/" .. ARGS.name,
      { body = ("server 127.0.0.1:%d;"):format(20000 + k), timeout = 20 })
    if status then break end
    conn:close()
    conn = nil
  end
  done[#done + 1] = now()
  if status == 409 then
    refused = refused + 1
  elseif status ~= 200 then
    other[#other + 1] = ("k=%d: %s %s"):format(k, tostring(status), tostring(body))
  end
end
if conn then conn:close() end
return { refused = refused, other = other, came = came, done = done }
]]

local READ_STATE = [[
local dyups = require "ngx.dyups"
assert(dyups.init { path = ARGS.path })
local out = { version = dyups.version(), ports = {} }
for _, name in ipairs(dyups.list()) do
  local u = dyups.get(name)
  out.ports[name] = #u.servers == 1 and u.servers[1].port or -#u.servers
end
return out
]]

local function tmpdir()
  local p = io.popen("mktemp -d /tmp/dyups-writers.XXXXXX")
  local dir = p:read("*l")
  p:close()
  return dir
end

local function rmdir(dir)
  if dir and dir:match("^/tmp/dyups%-writers%.") then os.execute("rm -rf " .. nginx.shell_quote(dir)) end
end

-- Judges a run of timed writes ({ writer =, kind =, came =, done = }, in seconds on
-- one clock for every process) by the queue's promise, relative to the run
-- itself so a slow host moves the bounds with it. In completion order a
-- write's turn is from the end of the one before (or its coming, if later)
-- to its own end; a write with k writes ahead of it (came before, not done
-- when it came) ends within k + 1 turns of coming, and no write that came
-- after it ends before it. The clocks are read outside the queue, so only a
-- write that came more than the longest turn later counts as overtaking,
-- and only the same writer doing so twice as out of turn; and only LuaJIT
-- writers are judged so, which read the clock as they call into the store.
-- A REST client reads it before its request reaches a worker, which on a
-- loaded host may wait for the CPU longer than several turns. One turn of
-- margin in the bound covers the same skew.
-- Returns the writes served out of turn or late, and a summary.
local function served_in_turn(writes)
  table.sort(writes, function(a, b) return a.done < b.done end)
  local longest_turn, longest_wait, end_before = 0, 0, 0
  for _, w in ipairs(writes) do
    longest_turn = math.max(longest_turn, w.done - math.max(w.came, end_before))
    longest_wait = math.max(longest_wait, w.done - w.came)
    end_before = w.done
  end
  local late = {}
  for i, w in ipairs(writes) do
    local ahead, by, most = 0, {}, 0
    for j, o in ipairs(writes) do
      if o.came < w.came and o.done > w.came then ahead = ahead + 1 end
      if j < i and o.came > w.came + longest_turn then
        by[o.writer] = (by[o.writer] or 0) + 1
        most = math.max(most, by[o.writer])
      end
    end
    local waited, bound = w.done - w.came, (ahead + 2) * longest_turn
    if (most > 1 and w.kind == "lua") or waited > bound then
      late[#late + 1] = ("%s write %d waited %.1f ms with %d ahead (bound %.1f ms), overtaken %d times by one writer")
        :format(w.writer, w.k, waited * 1e3, ahead, bound * 1e3, most)
    end
  end
  return late, ("the longest wait for one write %.0f ms, the longest turn %.1f ms; %d served out of turn or late")
    :format(longest_wait * 1e3, longest_turn * 1e3, #late)
end

-- Starts `writers` ({ kind =, name = }), lets them go at once, and checks
-- that none was refused or failed, that each was served in its turn
-- (served_in_turn), and that every write was applied: the version moved by
-- one per write and each upstream holds its last server.
local function race(dir, path, writers, api_port)
  local v0 = child.run(dir, READ_STATE, { path = path }).version
  local go = dir .. "/go"
  for _, w in ipairs(writers) do
    local code = w.kind == "rest" and REST_WRITER or LUA_WRITER
    w.h = child.spawn(dir, code, { path = path, port = api_port, name = w.name, n = WRITES, go = go })
  end
  nginx.sleep(0.3) -- every child at the barrier
  local t0 = T.now()
  nginx.write_file(go, "")
  local refused, timed = {}, {}
  for _, w in ipairs(writers) do
    local r = w.h:wait()
    assert.are.same({}, r.other, w.name .. " (" .. w.kind .. "): unexpected answers")
    if r.refused > 0 then refused[#refused + 1] = ("%s: %d of %d refused"):format(w.name, r.refused, WRITES) end
    -- From the second write on: a writer's first call does more than wait
    -- (a REST writer opens its connection, a LuaJIT one's first write does
    -- the module's one-time work).
    for k = 2, #r.came do
      timed[#timed + 1] = { writer = w.name, kind = w.kind, k = k, came = r.came[k], done = r.done[k] }
    end
  end
  local elapsed = T.now() - t0
  local late, fairness = served_in_turn(timed)
  local summary = ("%d writers x %d writes in %.1f s; %s"):format(#writers, WRITES, elapsed, fairness)
  print("\n  " .. summary)
  assert.are.same({}, refused, summary)
  assert.are.same({}, { late[1], late[2], late[3] }, summary)
  local final = child.run(dir, READ_STATE, { path = path })
  assert.are.equal(v0 + #writers * WRITES, final.version, "a write was lost or did not change the table")
  for _, w in ipairs(writers) do
    assert.are.equal(20000 + WRITES - 1, final.ports[w.name], w.name .. "'s last write is not in the table")
  end
end

describe("8 LuaJIT processes x 500 writes on one 16 MiB state file, default options", function()
  local dir

  lazy_setup(function() dir = tmpdir() end)
  lazy_teardown(function() rmdir(dir) end)

  it("none is refused and every write is applied", function()
    local path = dir .. "/dyups.state"
    child.run(dir, [[assert(require("ngx.dyups").init { path = ARGS.path, size = "16m" })]], { path = path })
    local writers = {}
    for i = 1, 8 do writers[i] = { kind = "lua", name = "lua" .. i } end
    race(dir, path, writers)
  end)
end)

describe("4 REST clients and 4 LuaJIT processes x 500 writes, default options", function()
  local dir, inst

  lazy_setup(function()
    dir = tmpdir()
    inst = dy.proxy { upstreams = "upstream seed { server 127.0.0.1:1; }\n", init = 'size = "16m",' }
    inst:start()
  end)

  lazy_teardown(function()
    nginx.stop_all()
    rmdir(dir)
  end)

  it("none is refused and every write is applied", function()
    local writers = {}
    for i = 1, 4 do
      writers[#writers + 1] = { kind = "rest", name = "rest" .. i }
      writers[#writers + 1] = { kind = "lua", name = "lua" .. i }
    end
    race(dir, inst.prefix .. "/state/dyups.state", writers, inst.ports.api)
    assert.are.equal(2, #inst:worker_pids())
    assert.is_nil(inst:error_log():find("[alert]", 1, true), inst:error_log():sub(-2000))
  end)
end)

describe("a REST write waiting for the lock", function()
  local inst

  lazy_setup(function()
    inst = dy.proxy { workers = 1, upstreams = "upstream seed { server 127.0.0.1:1; }\n" }
    inst:start()
  end)

  lazy_teardown(function() nginx.stop_all() end)

  it("leaves its worker answering other requests meanwhile", function()
    local q = nginx.shell_quote
    local state = inst.prefix .. "/state/dyups.state"
    local held = inst.prefix .. "/held"
    -- flock(1) holds the file's lock for 0.6 s, within the 1 s a write waits.
    nginx.execute(("(flock %s -c %s) >/dev/null 2>&1 </dev/null &")
      :format(q(state), q("touch " .. q(held) .. "; sleep 0.6")))
    nginx.wait_until(function() return nginx.read_file(held) end, 3, "flock(1) to take the lock")
    local t0 = T.now()
    local writer = child.spawn(inst.prefix, [[
      local T = require "spec.helpers.traffic"
      local status, body = T.request(ARGS.port, "POST", "/upstream/waited", { body = "server 127.0.0.1:2;", timeout = 5 })
      return { status = status, body = body }
    ]], { port = inst.ports.api })
    -- The one worker answers reads while the write waits in it.
    local reads, slowest = 0, 0
    while T.now() - t0 < 0.4 do
      local t = T.now()
      local status, body = T.request(inst.ports.api, "GET", "/list", { timeout = 5 })
      assert.are.equal(200, status, body)
      slowest = math.max(slowest, T.now() - t)
      reads = reads + 1
    end
    assert.is_true(reads >= 5, "only " .. reads .. " reads answered in 0.4 s")
    assert.is_true(slowest < 0.2, ("a read waited %.2f s behind the write"):format(slowest))
    local r = writer:wait()
    assert.are.equal(200, r.status, r.body)
    assert.is_true(T.now() - t0 >= 0.3, "the write did not wait for the lock")
    local status, body = T.request(inst.ports.api, "GET", "/list")
    assert.are.equal(200, status)
    assert.are.equal("seed\nwaited\n", body)
  end)

  -- The handler runs again each time it looks at the queue: it must judge
  -- the request it was sent, not what is left of it after the first look.
  it("keeps its If-Match while it waits: a stale one is refused", function()
    local q = nginx.shell_quote
    local state = inst.prefix .. "/state/dyups.state"
    local held = inst.prefix .. "/held2"
    local status, _, h = T.request(inst.ports.api, "GET", "/list")
    assert.are.equal(200, status)
    local stale = h.etag
    status = T.request(inst.ports.api, "POST", "/upstream/moved", { body = "server 127.0.0.1:3;" })
    assert.are.equal(200, status)
    local _, before = T.request(inst.ports.api, "GET", "/list")
    nginx.execute(("(flock %s -c %s) >/dev/null 2>&1 </dev/null &")
      :format(q(state), q("touch " .. q(held) .. "; sleep 0.4")))
    nginx.wait_until(function() return nginx.read_file(held) end, 3, "flock(1) to take the lock")
    local t0 = T.now()
    local body
    status, body = T.request(inst.ports.api, "POST", "/upstream/stale",
      { body = "server 127.0.0.1:4;", headers = { ["If-Match"] = stale }, timeout = 5 })
    assert.is_true(T.now() - t0 >= 0.2, "the write did not wait for the lock")
    assert.are.equal(412, status, body)
    local _, after = T.request(inst.ports.api, "GET", "/list")
    assert.are.equal(before, after, "the refused write changed the table")
  end)
end)

describe("durable writes without the thread pool", function()
  local inst

  lazy_setup(function()
    inst = dy.proxy {
      workers = 1,
      upstreams = "upstream seed { server 127.0.0.1:1; }\n",
      init = 'thread_pool = "nowhere",',
    }
    inst:start()
  end)

  lazy_teardown(function() nginx.stop_all() end)

  it("msync on the event loop, say so once, and succeed", function()
    for i = 1, 5 do
      local status, body = T.request(inst.ports.api, "POST", "/upstream/u" .. i, { body = "server 127.0.0.1:2;" })
      assert.are.equal(200, status, body)
    end
    local log = inst:error_log()
    assert.are.equal(1, T.count_lines(log, "durable writes msync on the event loop", 'thread pool "nowhere"'), log)
    local status, body = T.request(inst.ports.api, "GET", "/list")
    assert.are.equal(200, status)
    assert.are.equal("seed\nu1\nu2\nu3\nu4\nu5\n", body)
  end)
end)

describe("writes from every phase that allows them", function()
  local inst

  lazy_setup(function()
    inst = nginx.new {
      workers = 1,
      conf = [[
thread_pool dyups threads=1;
http {
    lua_package_path "${lua_package_path}";
    lua_package_cpath "${lua_package_cpath}";

    init_by_lua_block {
        assert(require("ngx.dyups").init{ path = "state/dyups.state" })
    }
    init_worker_by_lua_block {
        local dyups = require "ngx.dyups"
        assert(dyups.init_worker())
        -- init_worker cannot yield: this one blocks
        local status, msg = dyups.update("init_worker", "server 127.0.0.1:1;")
        if status ~= 200 then ngx.log(ngx.ERR, "INIT_WORKER ", status, " ", msg) end
        ngx.timer.at(0, function()
            local s, m = dyups.update("timer", "server 127.0.0.1:1;")
            if s ~= 200 then ngx.log(ngx.ERR, "TIMER ", s, " ", m) end
        end)
    }

    server {
        listen 127.0.0.1:${port_http};
        location = /rewrite {
            rewrite_by_lua_block { ngx.ctx.r = { require("ngx.dyups").update("rewrite", "server 127.0.0.1:1;") } }
            content_by_lua_block { ngx.say(table.concat(ngx.ctx.r, " ")) }
        }
        location = /access {
            access_by_lua_block { ngx.ctx.r = { require("ngx.dyups").add_server("rewrite", "127.0.0.1:2") } }
            content_by_lua_block { ngx.say(table.concat(ngx.ctx.r, " ")) }
        }
        location = /content {
            content_by_lua_block { ngx.say(require("ngx.dyups").update("content", "server 127.0.0.1:1;")) }
        }
        location = /list {
            content_by_lua_block { ngx.say(table.concat(require("ngx.dyups").list(), " ")) }
        }
    }
}
]],
    }
    inst:start()
  end)

  lazy_teardown(function() nginx.stop_all() end)

  it("succeed, with the msync in the thread pool where the phase can yield", function()
    nginx.wait_until(function()
      local _, body = nginx.http(inst.ports.http, "GET", "/list")
      return body and body:find("timer", 1, true)
    end, 5, "the timer's write")
    local status, body = nginx.http(inst.ports.http, "GET", "/rewrite")
    assert.are.equal(200, status)
    assert.are.equal("200 success\n", body)
    status, body = nginx.http(inst.ports.http, "GET", "/access")
    assert.are.equal(200, status)
    assert.matches("^%d+\n$", body)
    status, body = nginx.http(inst.ports.http, "GET", "/content")
    assert.are.equal(200, status)
    assert.are.equal("200success\n", body)
    status, body = nginx.http(inst.ports.http, "GET", "/list")
    assert.are.equal(200, status)
    assert.are.equal("init_worker timer rewrite content\n", body)
    local log = inst:error_log()
    assert.is_nil(log:find("[error]", 1, true), log)
    assert.is_nil(log:find("msync on the event loop", 1, true), log)
  end)
end)
