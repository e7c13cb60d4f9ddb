-- Concurrent writers on one table: 8 writers, each its own process, doing
-- 1,000 updates each against 3 overlapping upstreams while readers watch:
--   * 4 writers are HTTP clients of the REST API of a 2-worker nginx (the
--     writes happen in the nginx workers);
--   * 4 writers are plain LuaJIT processes using the module directly on the
--     same state file;
--   * 2 readers are LuaJIT processes reading through the module, and the
--     spec itself reads `GET /detail?format=json` from the workers meanwhile.
--
-- Every write is self-consistent, so a reader can tell a torn table from a
-- whole one: update k of writer w carries tag = w*1000 + k; its body has
-- tag%5+1 servers 127.0.0.J:(20000+tag), J = 1.., all of weight tag%7+1.
-- Every 10th update is a DELETE of the upstream instead.
--
-- Each accepted write's version is known: REST answers it as ETag; the Lua
-- writers write with an expected version v (retrying on 412), so a 200 means
-- version v+1 is theirs. Then:
--   * the accepted versions are distinct and are exactly v0+1 .. final: no
--     commit lost or duplicated, and no refused write committed;
--   * replaying the accepted writes in version order on the seed table (a
--     tiny model) gives the final table, as the workers and a fresh process
--     see it;
--   * every table a reader observed whole (the version did not move while it
--     read) is internally consistent AND equals the model's table at that
--     version; versions never went backwards for any reader.
--
-- Writers run with `durable = true` (msync per write, the default): about
-- 40 s for the 8,000 writes here. DYUPS_CONCURRENCY_DURABLE=0 in the
-- environment runs them with `durable = false` (about 7 s); the commit
-- protocol under test (the lock, the slots, the commit word) is the same.
local nginx = require "spec.helpers.nginx"
local dy = require "spec.helpers.dyups"
local T = require "spec.helpers.traffic"
local child = require "spec.helpers.luajit_child"

local WRITES = 1000 -- per writer, as the issue asks
local REST_WRITERS, LUA_WRITERS, READERS = 4, 4, 2
local NAMES = { "c0", "c1", "c2" }
local DURABLE = os.getenv("DYUPS_CONCURRENCY_DURABLE") ~= "0"

-- Shared by the spec and (as source) by the children.
local COMMON = [[
local function body_of(tag)
  local n, w = tag % 5 + 1, tag % 7 + 1
  local out = {}
  for j = 1, n do out[j] = ("server 127.0.0.%d:%d weight=%d;"):format(j, 20000 + tag, w) end
  return table.concat(out, "\n")
end
-- update k of writer w: { op = "update"|"delete", name =, tag = }
local function op_of(w, k)
  local name = "c" .. ((k + w) % 3)
  if k % 10 == 9 then return { op = "delete", name = name } end
  return { op = "update", name = name, tag = w * 1000 + k }
end
-- nil when `servers` (a list of {addr=, weight=, backup=, down=}) is what
-- body_of(tag) gives for some tag; else why not. Returns the tag.
local function check_servers(servers)
  if type(servers) ~= "table" or #servers == 0 then return nil, "no servers" end
  local port = tonumber(tostring(servers[1].addr):match(":(%d+)$"))
  if not port then return nil, "bad addr " .. tostring(servers[1].addr) end
  local tag = port - 20000
  if #servers ~= tag % 5 + 1 then
    return nil, ("tag %d: %d servers, expected %d"):format(tag, #servers, tag % 5 + 1)
  end
  for j, s in ipairs(servers) do
    local want = ("127.0.0.%d:%d"):format(j, port)
    if s.addr ~= want then return nil, ("tag %d: server %d is %s, expected %s"):format(tag, j, tostring(s.addr), want) end
    if s.weight ~= tag % 7 + 1 then return nil, ("tag %d: server %d weight %s"):format(tag, j, tostring(s.weight)) end
    if s.backup or s.down then return nil, ("tag %d: server %d backup/down"):format(tag, j) end
  end
  return tag
end
]]

local body_of, op_of, check_servers = assert(loadstring(COMMON
  .. "return body_of, op_of, check_servers"))()

local function seed()
  local out = {}
  for i, name in ipairs(NAMES) do
    out[#out + 1] = ("upstream %s {\n%s\n}\n"):format(name, body_of(i - 1)) -- tags 0, 1, 2
  end
  return table.concat(out)
end

-- The model: an ordered list of { name, tag }; update replaces in place or
-- appends, delete removes (as the module's table does).
local function model_apply(state, w)
  for i, u in ipairs(state) do
    if u.name == w.name then
      if w.op == "delete" then
        table.remove(state, i)
      else
        u.tag = w.tag
      end
      return true
    end
  end
  if w.op == "delete" then return false end
  state[#state + 1] = { name = w.name, tag = w.tag }
  return true
end

local function model_string(state)
  local parts = {}
  for _, u in ipairs(state) do parts[#parts + 1] = u.name .. "=" .. u.tag end
  return table.concat(parts, ",")
end

local REST_WRITER = COMMON .. [[
local T = require "spec.helpers.traffic"
child.wait_for_file(ARGS.go, 20, true)
local conn
local out, other = {}, {}
for k = 0, ARGS.n - 1 do
  local o = op_of(ARGS.w, k)
  local method, body = "POST", body_of(o.tag or 0)
  if o.op == "delete" then method, body = "DELETE", nil end
  local status, rbody, h
  for _ = 1, 3 do -- a dropped keep-alive connection is retried on a new one
    conn = conn or assert(T.conn(ARGS.port))
    status, rbody, h = conn:request(method, "/upstream/" .. o.name, { body = body, timeout = 20 })
    if status then break end
    conn:close()
    conn = nil
  end
  local v = h and h.etag and tonumber(h.etag:match('^"(%d+)"$'))
  out[#out + 1] = { k = k, status = status or 0, v = v }
  if status ~= 200 and not (status == 404 and o.op == "delete") then
    other[#other + 1] = ("k=%d %s %s: %s %s"):format(k, method, o.name, tostring(status), tostring(rbody))
  end
end
if conn then conn:close() end
return { out = out, other = other }
]]

local LUA_WRITER = COMMON .. [[
local dyups = require "ngx.dyups"
assert(dyups.init { path = ARGS.path, durable = ARGS.durable, lock_timeout = 20 })
child.wait_for_file(ARGS.go, 20, true)
local out, other, retries = {}, {}, 0
for k = 0, ARGS.n - 1 do
  local o = op_of(ARGS.w, k)
  while true do
    local v = assert(dyups.version())
    local status, msg
    if o.op == "delete" then
      status, msg = dyups.delete(o.name, v)
    else
      status, msg = dyups.update(o.name, body_of(o.tag), v)
    end
    if status == 200 then
      out[#out + 1] = { k = k, status = 200, v = v + 1 }
      break
    elseif status == 412 then
      retries = retries + 1
    else
      out[#out + 1] = { k = k, status = status }
      if not (status == 404 and o.op == "delete") then
        other[#other + 1] = ("k=%d %s %s: %s %s"):format(k, o.op, o.name, tostring(status), tostring(msg))
      end
      break
    end
  end
end
return { out = out, other = other, retries = retries }
]]

local READER = COMMON .. [[
local dyups = require "ngx.dyups"
assert(dyups.init { path = ARGS.path })
child.wait_for_file(ARGS.go, 20, true)
local seen, bad, reads, whole, last = {}, {}, 0, 0, 0
local function stop_now()
  local f = io.open(ARGS.stop, "rb")
  if f then f:close() return true end
end
local n = 0
while true do
  n = n + 1
  if n % 16 == 0 and stop_now() then break end
  local v1 = assert(dyups.version())
  local names = assert(dyups.list())
  local ups = {}
  for i, name in ipairs(names) do ups[i] = dyups.get(name) or false end
  local v2 = assert(dyups.version())
  reads = reads + 1
  if v1 < last then bad[#bad + 1] = ("version went back from %d to %d"):format(last, v1) end
  if v2 < v1 then bad[#bad + 1] = ("version went back from %d to %d within one read"):format(v1, v2) end
  last = v2
  local parts, dup = {}, {}
  for i, name in ipairs(names) do
    if not name:match("^c[012]$") then bad[#bad + 1] = "unknown upstream " .. tostring(name) end
    if dup[name] then bad[#bad + 1] = ("v%d: %s listed twice"):format(v1, name) end
    dup[name] = true
    local u = ups[i]
    if u then
      local tag, why = check_servers(u.servers)
      if not tag then bad[#bad + 1] = ("v%d..%d: %s torn: %s"):format(v1, v2, name, why) end
      parts[#parts + 1] = name .. "=" .. tostring(tag)
    elseif v1 == v2 then
      bad[#bad + 1] = ("v%d: %s listed but get() found nothing"):format(v1, name)
    end
  end
  if v1 == v2 then
    whole = whole + 1
    local s = table.concat(parts, ",")
    if seen[v1] and seen[v1] ~= s then
      bad[#bad + 1] = ("v%d read twice, differently: %s / %s"):format(v1, seen[v1], s)
    end
    seen[v1] = s
  end
  if #bad > 50 then break end
end
return { seen = seen, bad = bad, reads = reads, whole = whole }
]]

describe("8 concurrent writers (4 over REST, 4 through the module), 2 readers", function()
  local dir, inst

  lazy_setup(function()
    local p = io.popen("mktemp -d /tmp/dyups-conc.XXXXXX")
    dir = p:read("*l")
    p:close()
    inst = dy.proxy {
      upstreams = seed(),
      init = ("durable = %s, lock_timeout = 20,"):format(tostring(DURABLE)),
    }
    inst:start()
  end)

  lazy_teardown(function()
    nginx.stop_all()
    if dir and dir:match("^/tmp/dyups%-conc%.") then os.execute("rm -rf " .. nginx.shell_quote(dir)) end
  end)

  it("no accepted write lost or duplicated, final table = replay, no torn read", function()
    local t0 = T.now()
    local path = inst.prefix .. "/state/dyups.state"
    local go, stop = dir .. "/go", dir .. "/stop"

    local s0, b0 = T.request(inst.ports.api, "GET", "/detail?format=json")
    assert.are.equal(200, s0, b0)
    local initial = T.json_decode(b0)
    local v0 = initial.version
    local state = {}
    for _, u in ipairs(initial.upstreams) do
      state[#state + 1] = { name = u.name, tag = assert(check_servers(u.servers)) }
    end
    assert.are.equal("c0=0,c1=1,c2=2", model_string(state))

    local writers, readers = {}, {}
    for w = 1, REST_WRITERS do
      writers[#writers + 1] = { w = w, kind = "rest",
        h = child.spawn(dir, REST_WRITER, { w = w, n = WRITES, port = inst.ports.api, go = go }) }
    end
    for w = REST_WRITERS + 1, REST_WRITERS + LUA_WRITERS do
      writers[#writers + 1] = { w = w, kind = "lua",
        h = child.spawn(dir, LUA_WRITER, { w = w, n = WRITES, path = path, go = go, durable = DURABLE }) }
    end
    for r = 1, READERS do
      readers[r] = child.spawn(dir, READER, { path = path, go = go, stop = stop })
    end
    nginx.sleep(0.3) -- let every child reach the barrier
    nginx.write_file(go, "")

    -- the spec reads through the workers meanwhile, until every writer is
    -- done (the writers' last version is the final one)
    local rest_seen, rest_bad, rest_reads = {}, {}, 0
    local last_v = v0
    local function done()
      local s, b = T.request(inst.ports.api, "GET", "/detail?format=json")
      if s ~= 200 then
        rest_bad[#rest_bad + 1] = "GET /detail?format=json: " .. tostring(s) .. " " .. tostring(b)
        return
      end
      rest_reads = rest_reads + 1
      local d = T.json_decode(b)
      local parts = {}
      for _, u in ipairs(d.upstreams) do
        local tag, why = check_servers(u.servers)
        if not tag then rest_bad[#rest_bad + 1] = ("v%d: %s torn: %s"):format(d.version, u.name, why) end
        parts[#parts + 1] = u.name .. "=" .. tostring(tag)
      end
      local s2 = table.concat(parts, ",")
      if rest_seen[d.version] and rest_seen[d.version] ~= s2 then
        rest_bad[#rest_bad + 1] = ("v%d served twice, differently"):format(d.version)
      end
      rest_seen[d.version] = s2
      -- a worker may lag behind the file, never go back
      if d.version < last_v then
        rest_bad[#rest_bad + 1] = ("workers' version went back from %d to %d"):format(last_v, d.version)
      end
      last_v = math.max(last_v, d.version)
    end
    -- poll while the writers run; they finish on their own
    local deadline = T.now() + 120
    while T.now() < deadline do
      done()
      nginx.sleep(0.005)
      -- stop polling once no write happened for a while
      if rest_reads % 50 == 0 then
        local s, _, h = T.request(inst.ports.api, "GET", "/list")
        local v = h and h.etag and tonumber(h.etag:match("%d+"))
        if s == 200 and v and v >= v0 + 1 then
          -- compare with a moment later
          nginx.sleep(0.3)
          local s2, _, h2 = T.request(inst.ports.api, "GET", "/list")
          local v2 = h2 and h2.etag and tonumber(h2.etag:match("%d+"))
          if s2 == 200 and v2 == v then break end
        end
      end
    end

    local results = {}
    for i, wr in ipairs(writers) do
      results[i] = wr.h:wait()
    end
    nginx.write_file(stop, "")
    local reads = {}
    for r, h in ipairs(readers) do reads[r] = h:wait() end
    local elapsed = T.now() - t0

    -- every writer did 1,000 updates, none answered other than 200 (or 404
    -- for deleting an absent upstream)
    local accepted, by_version = {}, {}
    local total_412 = 0
    for i, r in ipairs(results) do
      local wr = writers[i]
      assert.are.same({}, r.other, ("writer %d (%s): unexpected answers"):format(wr.w, wr.kind))
      assert.are.equal(WRITES, #r.out, ("writer %d (%s): updates done"):format(wr.w, wr.kind))
      total_412 = total_412 + (r.retries or 0)
      for _, rec in ipairs(r.out) do
        if rec.status == 200 then
          assert.is_number(rec.v, ("writer %d k=%d: a 200 without a version"):format(wr.w, rec.k))
          local o = op_of(wr.w, rec.k)
          o.w, o.k, o.v = wr.w, rec.k, rec.v
          assert.is_nil(by_version[rec.v], ("version %d given to writer %d k=%d and writer %s k=%s")
            :format(rec.v, wr.w, rec.k, tostring(by_version[rec.v] and by_version[rec.v].w),
              tostring(by_version[rec.v] and by_version[rec.v].k)))
          by_version[rec.v] = o
          accepted[#accepted + 1] = o
        end
      end
    end

    -- the final version: the workers', a fresh process's
    local sf, bf = T.request(inst.ports.api, "GET", "/detail?format=json")
    assert.are.equal(200, sf, bf)
    local final = T.json_decode(bf)
    local fresh = child.run(dir, [[
      local dyups = require "ngx.dyups"
      assert(dyups.init { path = ARGS.path })
      local out = { version = dyups.version(), ups = {} }
      for _, name in ipairs(dyups.list()) do out.ups[#out.ups + 1] = dyups.get(name) end
      return out
    ]], { path = path })
    assert.are.equal(final.version, fresh.version, "the workers and a fresh process disagree on the version")

    -- accepted versions are exactly v0+1 .. final: none lost, none twice,
    -- no refused write committed
    assert.are.equal(final.version - v0, #accepted,
      ("%d writes accepted but the version moved from %d to %d"):format(#accepted, v0, final.version))
    for v = v0 + 1, final.version do
      assert.is_truthy(by_version[v], "no accepted write has version " .. v)
    end

    -- the writers really contended: the Lua writers lost read-decide-write
    -- races to others (412 retries), and in version order the kind of writer
    -- (REST or Lua) changes more than once (one kind's writes all before the
    -- other's would be once). How often it changes depends on the machine's
    -- speed: the writers' queue serves in order of arrival, and a fast kind
    -- can run ahead for a while.
    local kind_at = {}
    for _, o in ipairs(accepted) do kind_at[o.v] = o.w <= REST_WRITERS and "rest" or "lua" end
    local switches, last = 0, nil
    for v = v0 + 1, final.version do
      if last and kind_at[v] ~= last then switches = switches + 1 end
      last = kind_at[v]
    end
    assert.is_true(switches >= 2, ("the writer kind changed only %d times in version order"):format(switches))
    assert.is_true(total_412 > 0, "no Lua writer ever lost a race: the writers did not contend")

    -- replay in version order
    local model_at = { [v0] = model_string(state) }
    for v = v0 + 1, final.version do
      local o = by_version[v]
      local changed = model_apply(state, o)
      assert.is_true(changed, ("version %d: writer %d k=%d %s %s was accepted but changes nothing in the model")
        :format(v, o.w, o.k, o.op, o.name))
      model_at[v] = model_string(state)
    end

    -- the final table = the replay: names in order, every server
    local want = {}
    for _, u in ipairs(state) do
      local servers = {}
      local n = 0
      for line in body_of(u.tag):gmatch("[^\n]+") do
        n = n + 1
        local addr, weight = line:match("^server (%S+) weight=(%d+);$")
        servers[n] = { addr = addr, weight = tonumber(weight), max_fails = 1, fail_timeout = 10,
          backup = false, down = false }
      end
      want[#want + 1] = { name = u.name, servers = servers }
    end
    local got = {}
    for _, u in ipairs(final.upstreams) do
      local servers = {}
      for i, s in ipairs(u.servers) do
        servers[i] = { addr = s.addr, weight = s.weight, max_fails = s.max_fails, fail_timeout = s.fail_timeout,
          backup = s.backup, down = s.down }
      end
      got[#got + 1] = { name = u.name, servers = servers }
    end
    assert.are.same(want, got, "the workers' final table is not the replay of the accepted writes")
    local fresh_got = {}
    for _, u in ipairs(fresh.ups) do
      local servers = {}
      for i, s in ipairs(u.servers) do
        servers[i] = { addr = s.addr, weight = s.weight, max_fails = s.max_fails, fail_timeout = s.fail_timeout,
          backup = s.backup, down = s.down }
      end
      fresh_got[#fresh_got + 1] = { name = u.name, servers = servers }
    end
    assert.are.same(want, fresh_got, "a fresh process's final table is not the replay of the accepted writes")

    -- every table a reader saw whole was consistent and is the model's
    -- table at that version
    local observed, rest_versions = 0, 0
    for r, res in ipairs(reads) do
      assert.are.same({}, res.bad, "reader " .. r .. " saw a torn or inconsistent table")
      assert.is_truthy(res.whole > 100, "reader " .. r .. " read only " .. res.whole .. " whole tables")
      for v, s in pairs(res.seen) do
        observed = observed + 1
        assert.are.equal(model_at[v], s, ("reader %d at version %d"):format(r, v))
      end
    end
    assert.are.same({}, rest_bad, "a worker served a torn or inconsistent table")
    for v, s in pairs(rest_seen) do
      rest_versions = rest_versions + 1
      assert.are.equal(model_at[v], s, ("GET /detail?format=json at version %d"):format(v))
    end
    assert.is_truthy(rest_reads > 20, "the spec read the workers' table only " .. rest_reads .. " times")

    -- nginx is still fine
    assert.are.equal(2, #inst:worker_pids())
    local log = inst:error_log()
    assert.is_falsy(log:find("signal", 1, true) or log:find("[alert]", 1, true), log:sub(-2000))

    print(("\n  concurrency: %d writes accepted (v%d..v%d), %d 412 retries by the Lua writers, "
      .. "%d whole tables checked by readers (%d reads), %d by REST (%d reads), %.1f s, durable=%s")
      :format(#accepted, v0 + 1, final.version, total_412, observed, reads[1].reads + reads[2].reads,
        rest_versions, rest_reads, elapsed, tostring(DURABLE)))
  end)
end)
