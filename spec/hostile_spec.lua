-- Hostile input against a running proxy (2 workers): every endpoint (/ups,
-- /ups/check, /list, /detail, /upstream/NAME[/servers[/ADDR]]) sent
-- malformed and oversized query strings and bodies, bad methods, invalid
-- UTF-8, NUL bytes, path tricks (dot segments, encoded slashes), thousands of
-- servers in one body, weights, max_fails and timeouts at and past their
-- bounds, names of 255 and 256 bytes.
--
-- Every refused request must get its documented 4xx (or nginx's own 400/414
-- when nginx refuses the request line before our code runs), and afterwards
--   * the table is byte-for-byte what it was: `GET /detail?format=json` (it
--     carries the version) is the same text, and the state file is the same
--     bytes everywhere but its bookkeeping (72..4096: the writers' queue,
--     which every write attempt moves, and the worker table, which workers
--     update as they apply tables);
--   * the workers keep serving (`/local` answers 200 from a real backend),
--     none died (same worker pids) and the error log has no `signal`, crash
--     or alert line.
-- Requests go over raw sockets (spec/helpers/traffic.lua): curl would
-- normalise `..`, `%2F` and bytes that are not URL-safe.
--
-- Requests at the bounds that must be accepted (weight=1 and 1000, a name of
-- 255 bytes, 1000 servers, ...) are in their own describe: they must change
-- exactly the named upstream, raise the version by one, and deleting the
-- upstream again must give back the original table.
local nginx = require "spec.helpers.nginx"
local dy = require "spec.helpers.dyups"
local T = require "spec.helpers.traffic"
local dnsmasq = require "spec.helpers.dnsmasq"

-- bytes [72, 4096) of the state file: the writers' queue, the generation on
-- disk, the worker table
local BOOKKEEPING_FROM, BOOKKEEPING_TO = 72, 4096
-- The peer cells (failures and connections, counted by traffic) fill the
-- file from the end of slot 1: 4096 + 2 * the slot length at bytes 16..24.
local function cells_from(bytes)
  local slot_len = 0
  for i = 24, 17, -1 do slot_len = slot_len * 256 + bytes:byte(i) end
  return 4096 + 2 * slot_len
end

----------------------------------------------------------------------------
-- helpers

-- A raw request (bytes exactly as given, e.g. chunked bodies or a bare NUL
-- in the request line) over a new connection; reads until the server
-- closes. Returns status, body-ish rest of the response, raw head.
local function raw(port, bytes, timeout)
  local c = assert(T.conn(port))
  local deadline = T.now() + (timeout or 5)
  local ok, err = c:_send(bytes, deadline)
  if not ok then
    c:close()
    return nil, err
  end
  while true do
    local r = c:_fill(deadline)
    if not r then break end -- EOF or timeout
  end
  c:close()
  local head, body = c.buf:match("^(.-)\r\n\r\n(.*)$")
  head = head or c.buf
  return tonumber(head:match("^HTTP/%d%.%d (%d%d%d)")), body or "", head
end

-- The bytes only a write may change: all but the bookkeeping and the cells.
local function state_outside_bookkeeping(inst)
  local bytes = assert(nginx.read_file(inst.prefix .. "/state/dyups.state"), "no state file")
  return bytes:sub(1, BOOKKEEPING_FROM) .. bytes:sub(BOOKKEEPING_TO + 1, cells_from(bytes)), #bytes
end

local function first_difference(a, b)
  for i = 1, math.max(#a, #b) do
    if a:byte(i) ~= b:byte(i) then return i end
  end
end

-- The whole table, twice over: the JSON detail (with the version) and the
-- state file's bytes outside the bookkeeping.
local function dump(inst)
  local status, body, h = T.request(inst.ports.api, "GET", "/detail?format=json")
  assert(status == 200, "GET /detail?format=json: " .. tostring(status) .. " " .. tostring(body))
  local state, size = state_outside_bookkeeping(inst)
  -- The table only: each server's state and statistics move with traffic.
  body = body:gsub(',"active":%d+,"shared":%a+,"state":"%a+","stats":%b{}', "")
  local decoded = T.json_decode(body)
  return { json = body, etag = h.etag, state = state, size = size, version = decoded.version, decoded = decoded }
end

local function assert_same_dump(before, after, what)
  assert.are.equal(before.json, after.json, what .. ": GET /detail?format=json changed")
  assert.are.equal(before.etag, after.etag, what .. ": the ETag changed")
  assert.are.equal(before.size, after.size, what .. ": the state file changed size")
  if before.state ~= after.state then
    local at = first_difference(before.state, after.state)
    local off = at <= BOOKKEEPING_FROM and at - 1 or at - 1 + (BOOKKEEPING_TO - BOOKKEEPING_FROM)
    error(what .. ": the state file changed outside its bookkeeping, first at byte offset " .. off, 2)
  end
end

local function short(s, n)
  s = tostring(s)
  n = n or 160
  s = s:gsub("[%z\1-\31\127-\255]", function(c) return ("\\x%02x"):format(c:byte()) end)
  if #s > n then s = s:sub(1, n) .. ("...(%d bytes)"):format(#s) end
  return s
end

local BAD_LOG = { "signal", "[alert]", "[emerg]", "[crit]", "runtime error", "panick" }

-- The workers still serve /local from a real backend, none was replaced,
-- and the error log has no crash or alert.
local function assert_alive(ctx, what)
  for i = 1, 4 do
    local status, port, _, body = T.get(ctx.inst, "/local")
    assert.are.equal(200, status, what .. ": /local request " .. i .. " after it: " .. short(body))
    assert.is_truthy(port == ctx.B[1] or port == ctx.B[2],
      what .. ": /local answered by " .. tostring(port) .. ", not a backend")
  end
  assert.are.same(ctx.pids, ctx.inst:worker_pids(), what .. ": the worker pids changed (a worker died)")
  -- only what was logged since the last check (a failure is reported once)
  local log = ctx.inst:error_log()
  local new = log:sub((ctx.log_seen or 0) + 1)
  ctx.log_seen = #log
  for line in new:gmatch("[^\n]+") do
    for _, bad in ipairs(BAD_LOG) do
      assert.is_falsy(line:find(bad, 1, true), what .. ": error log: " .. line)
    end
  end
end

local function set_of(list)
  local s = {}
  for _, v in ipairs(type(list) == "table" and list or { list }) do s[v] = true end
  return s
end

local function describe_set(s)
  local out = {}
  for k in pairs(s) do out[#out + 1] = tostring(k) end
  table.sort(out)
  return table.concat(out, "|")
end

-- One request: { method=, path=, body=, headers=, port="api"|"proxy", rawreq= }
local function send(ctx, c)
  local port = ctx.inst.ports[c.port or "api"]
  if c.rawreq then return raw(port, c.rawreq) end
  return T.request(port, c.method or "GET", c.path, { body = c.body, headers = c.headers })
end

-- A refused request: status in c.want, body contains c.has (when given),
-- the table byte-for-byte unchanged, the workers alive.
local function check_refused(ctx, c)
  local what = ("%s %s%s"):format(c.method or (c.rawreq and "raw") or "GET",
    short(c.path or c.rawreq, 100), c.body and (" body " .. short(c.body, 60)) or "")
  local before = dump(ctx.inst)
  ctx.log_seen = #ctx.inst:error_log()
  local status, body = send(ctx, c)
  if c.rawreq and not status then status = 0 end -- closed without a status line
  -- the table and the workers first: a wrong status is reported after
  -- them, so a failure says whether anything else went wrong too
  local after = dump(ctx.inst)
  assert_same_dump(before, after, what)
  assert_alive(ctx, what)
  local want = set_of(c.want)
  assert.is_truthy(status and want[status], ("%s: expected %s, got %s %s")
    :format(what, describe_set(want), tostring(status), short(body, 300)))
  if c.has and status and status >= 400 and status < 500 and not c.nginx_may_answer then
    assert.is_truthy(body:find(c.has, 1, true), ("%s: the answer (%d) does not say %q: %s")
      :format(what, status, c.has, short(body, 300)))
  end
  if c.json_code then
    assert.is_truthy(body:find('"code":"E00001"', 1, true), what .. ": /ups failure without E00001: " .. short(body))
  end
end

-- Backends, proxy and the seed table shared by a describe.
local function setup(ctx)
  local _, B = dy.backends(2)
  ctx.B = B
  ctx.seed = ("upstream local {\n  server 127.0.0.1:%d;\n  server 127.0.0.1:%d;\n}\n"
    .. "upstream host1 {\n  server 127.0.0.1:%d weight=3 max_fails=2 fail_timeout=5s;\n"
    .. "  server 127.0.0.1:%d backup;\n}\n"
    .. "upstream host2 {\n  server 127.0.0.1:%d;\n}\n"):format(B[1], B[2], B[1], B[2], B[2])
  -- Host names are asked of a DNS server of the spec's own, on loopback:
  -- it knows no names, so every one is NXDOMAIN.
  ctx.dns = dnsmasq.start { hosts = {} }
  ctx.inst = dy.proxy { upstreams = ctx.seed, init = ('resolver = "127.0.0.1:%d",'):format(ctx.dns.port) }
  ctx.inst:start()
  ctx.pids = ctx.inst:worker_pids()
  -- both workers have applied the seed table (and registered) before the
  -- first dump
  nginx.wait_until(function()
    local s, b = T.request(ctx.inst.ports.proxy, "GET", "/ups/check")
    return s == 200 and b:find('"data":{}', 1, true)
  end, 5, "/ups/check to settle")
end

local function servers_body(n, port0, extra)
  local parts = {}
  for i = 1, n do
    parts[i] = ("server 127.0.%d.%d:%d%s;\n"):format(math.floor(i / 250), i % 250 + 1, port0 + i, extra or "")
  end
  return table.concat(parts)
end

----------------------------------------------------------------------------
-- the cases

local function refused_cases(B)
  local B1, B2 = B[1], B[2]
  local A1 = "127.0.0.1:" .. B1
  local cases = {}
  local function add(c) cases[#cases + 1] = c end
  local n255, n256 = ("n"):rep(255), ("n"):rep(256)
  local big6k = ("1"):rep(6000)
  local big10k = ("x"):rep(10 * 1024)

  ---------------------------------------------------------------- /ups
  local function ups(q, has, want)
    add { port = "proxy", method = "GET", path = "/ups" .. q, want = want or 400, has = has, json_code = true }
  end
  ups("", "missing op")
  ups("?op", "missing op")
  ups("?op=", "missing op")
  ups("?op=x&server=" .. A1, 'unknown op \\"x\\"')
  ups("?op=ADD&server=" .. A1, "unknown op")
  ups("?op=add%00&server=" .. A1, "unknown op")
  ups("?op=\255\254&server=" .. A1, "unknown op")
  ups("?op=add", "missing server")
  ups("?op=del&server=", "missing server")
  ups("?op=del&server", "missing server")
  ups("?op=add&op=del&server=" .. A1, "more than once")
  ups("?op=del&server=" .. A1 .. "&server=" .. A1, "more than once")
  ups("?op=del&server=" .. A1 .. "&upstream=host1&upstream=local", "more than once")
  ups("?op=del&server=127.0.0.1:99999", "bad server")
  ups("?op=del&server=127.0.0.1:0", "bad server")
  ups("?op=del&server=127.0.0.1:-1", "bad server")
  ups("?op=del&server=300.0.0.1:80", "bad server")
  ups("?op=del&server=%00", "bad server")
  ups("?op=del&server=127.0.0.1:" .. B1 .. "%00", "bad server")
  ups("?op=del&server=%FF%FE", "bad server")
  ups("?op=del&server=\255\254", "bad server")
  ups("?op=del&server=" .. big6k, "bad server")
  ups("?op=del&server=localhost:80", "bad server")
  ups("?op=del&server=unix:relative.sock", "bad server")
  ups("?op=del&server=127.0.0.1:9", "in no upstream")
  ups("?op=add&server=127.0.0.1:9", "in no upstream")
  ups("?op=add&server=" .. A1 .. "&upstream=nope", "upstream nope not found")
  ups("?op=del&server=" .. A1 .. "&upstream=", "missing upstream")
  ups("?op=add&server=127.0.0.1:5&upstream=" .. n256, "at most 255")
  ups("?op=add&server=127.0.0.1:5&upstream=" .. n255, "not found")
  ups("?op=add&server=127.0.0.1:5&upstream=..", "only dots")
  ups("?op=add&server=127.0.0.1:5&upstream=a%2Fb", "only letters")
  ups("?op=add&server=127.0.0.1:5&upstream=host1%00", "only letters")
  ups("?op=add&server=127.0.0.1:5&upstream=host1\255", "only letters")
  ups("?op=add&server=127.0.0.1:5%20weight=1001&upstream=host1", "weight must be 1..1000")
  ups("?op=add&server=127.0.0.1:5%20weight=0&upstream=host1", "weight must be 1..1000")
  ups("?op=add&server=127.0.0.1:5%20max_fails=1001&upstream=host1", "max_fails must be 0..1000")
  ups("?op=add&server=127.0.0.1:5%20fail_timeout=86401s&upstream=host1", "fail_timeout must be")
  ups("?op=add&server=127.0.0.1:5%20fail_timeout=25h&upstream=host1", "fail_timeout must be")
  ups("?op=add&server=127.0.0.1:5%20bogus=1&upstream=host1", 'unknown parameter \\"bogus=1\\"')
  ups("?op=add&server=127.0.0.1:5%3Bserver%20127.0.0.1:6&upstream=host1", "")
  ups("?op=del&server=127.0.0.1:" .. B2 .. "&upstream=host2", "last available server")
  -- B2 is in local, host1 (backup) and host2 (alone): refused as a whole
  ups("?op=del&server=127.0.0.1:" .. B2, "last available server")
  -- get_uri_args(100): the op after 200 junk arguments is not seen
  -- Past 100 arguments a request is refused whole, never half-read: a
  -- dropped `upstream=` would change the server in every upstream.
  ups("?" .. ("j=1&"):rep(200) .. "op=del&server=" .. A1 .. "&upstream=host1", "more than 100 query arguments")
  ups("?op=del&server=" .. A1 .. ("&j=1"):rep(99) .. "&upstream=host1", "more than 100 query arguments")
  -- a query over nginx's 8k request-line buffer: nginx's own 414
  add { port = "proxy", method = "GET", path = "/ups?op=del&server=" .. big10k, want = { 414, 400 } }
  -- bad methods on /ups and /ups/check (GET, POST, PUT are allowed)
  for _, p in ipairs { "/ups?op=del&server=" .. A1 .. "&upstream=local", "/ups/check" } do
    for _, m in ipairs { "DELETE", "PATCH", "OPTIONS", "PROPFIND", "FOO" } do
      add { port = "proxy", method = m, path = p, want = 405, has = "is not allowed" }
    end
    add { port = "proxy", method = "TRACE", path = p, want = 405 } -- nginx's own
    add { port = "proxy", method = "get", path = p, want = 400 }   -- nginx: methods are upper case
  end
  -- /ups/check with junk only reads
  for _, q in ipairs { "?%00", "?op=del&server=" .. A1, "?\255\254=\255", "?" .. ("a=b&"):rep(300) } do
    add { port = "proxy", method = "PUT", path = "/ups/check" .. q, want = 200 }
  end
  add { port = "proxy", method = "POST", path = "/ups?op=del&server=" .. A1 .. "&upstream=nope",
    body = ("\0\255"):rep(1000), want = 400, has = "not found" }

  ---------------------------------------------------------------- reads
  for _, p in ipairs { "/list", "/detail" } do
    for _, q in ipairs { "", "?format=json", "?%00", "?format=\255\254", "?format=%FF", "?format=json&format=xml",
      "?" .. ("a=b&"):rep(500), "?" .. big6k } do
      add { method = "GET", path = p .. q, want = 200 }
    end
    add { method = "HEAD", path = p, want = 200 }
    add { method = "GET", path = p .. "?" .. big10k, want = { 414, 400 } }
    for _, m in ipairs { "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "PROPFIND", "FOO" } do
      add { method = m, path = p, body = (m == "POST" or m == "PUT") and "server 127.0.0.1:1;" or nil,
        want = 405, has = "use GET, HEAD" }
    end
    add { method = "TRACE", path = p, want = 405 }
    add { method = "get", path = p, want = 400 }
  end
  add { method = "GET", path = "/upstream/nope", want = 404, has = "not found" }
  add { method = "GET", path = "/upstream/\255\254", want = { 400, 404 } }
  add { method = "GET", path = "/upstream/%FF%FE", want = { 400, 404 } }
  add { method = "GET", path = "/upstream/" .. n256, want = { 400, 404 } }
  add { method = "GET", path = "/upstream/host1/servers/" .. big6k, want = { 400, 404 } }
  add { method = "GET", path = "/upstream/host1/servers/not-an-address", want = 400, has = "bad server" }
  add { method = "GET", path = "/upstream/host1?format=\255", want = 200 }

  ---------------------------------------------------------------- paths
  local P = function(path, want, method, body)
    add { method = method or "POST", path = path, body = body or "server 127.0.0.1:1;", want = want }
  end
  P("/upstream/../x", { 400, 404 })
  P("/upstream/../upstream/..", { 400, 404 })
  P("/upstream/..", { 400, 404 })
  P("/upstream/.", { 400, 404 })
  P("/upstream/%2E%2E", { 400, 404 })
  P("/upstream/...", 400)
  P("/upstream/.../servers", { 400, 404 })
  P("/upstream/", 400)
  P("/upstream", { 400, 404 })
  P("/upstream//", { 400, 404 })
  P("/upstream/a%2Fb", { 400, 404 })
  P("/upstream/a%2fb%2fc", { 400, 404 })
  P("/upstream/a%2F..%2F..%2Fdetail", { 400, 404, 405 })
  P("/upstream/nope%2Fservers", { 400, 404 }, "POST", "127.0.0.1:1")
  P("/upstream/a%00b", { 400, 404 })
  P("/upstream/host1%00", { 400, 404 })
  P("/upstream/host1%00/servers", { 400, 404 }, "POST", "127.0.0.1:1")
  P("/upstream/\255\254", { 400, 404 })
  P("/upstream/%FF%FE", { 400, 404 })
  P("/upstream/host%C3%A9", 400)
  P("/upstream/a%20b", 400)
  P("/upstream/a b", 400) -- nginx: a bare space ends the URI
  P("/upstream/a;b", 400)
  P("/upstream/" .. n256, 400)
  P("/upstream/" .. ("n"):rep(6000), 400)
  P("/upstream/nope/other", 404)
  P("/upstream/host1/servers/", { 400, 404 }, "DELETE")
  -- Routed on the path as sent: a dot segment would make it name something
  -- else than it says (nginx resolves them in $uri).
  P("/upstream/host1/servers/x/../../../nope", 400, "DELETE")
  P("/upstream/host1/servers/x/../../../../../../../nope", { 400, 404 }, "DELETE")
  P("/upstream/host1/../host1/servers/127.0.0.1:1", 400, "DELETE")
  add { method = "DELETE", path = "/upstream/nope%2F..%2F..%2Flist", want = { 400, 405 } }
  add { rawreq = "GET /list\0 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", want = 400 }
  add { rawreq = "POST /upstream/a\0b HTTP/1.1\r\nHost: x\r\nContent-Length: 19\r\nConnection: close\r\n\r\n"
    .. "server 127.0.0.1:1;", want = 400 }
  add { rawreq = "DELETE /upstream/host1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n"
    .. "Connection: close\r\n\r\nhello", want = 400 }
  -- HTTP/0.9 (no version): nginx takes only GET so, answering without a
  -- status line (0 here) or 400
  add { rawreq = "DELETE /upstream/host1\r\n\r\n", want = { 0, 400 } }

  ---------------------------------------------------------------- POST /upstream/NAME bodies
  local function body(name, b, want, has, headers)
    add { method = "POST", path = "/upstream/" .. name, body = b, want = want or 400, has = has, headers = headers }
  end
  body("fresh", "", 400, "no server")
  body("fresh", "   \n\t\r\n  ", 400, "no server")
  body("fresh", "# only a comment\n", 400, "no server")
  body("fresh", ";;;", 400)
  body("fresh", "server;", 400)
  body("fresh", "server 127.0.0.1:1", 400, "missing ';'")
  body("fresh", "upstream x { server 127.0.0.1:1; }", 400)
  body("fresh", "server 127.0.0.1:1; }", 400, "unexpected '}'")
  body("fresh", "sticky cookie srv_id; server 127.0.0.1:1;", 400, "unknown directive")
  body("fresh", "server 127.0.0.1:1;\nserver 127.0.0.1:2\0;\n", 400, "line 2: NUL byte")
  body("fresh", "\0", 400, "NUL byte")
  body("fresh", "server 127.0.0.1:1\7;", 400, "control character")
  body("fresh", "server 127.0.0.1:1;\255\254", 400, "not UTF-8")
  body("fresh", "server \255\254:1;", 400, "not UTF-8")
  body("fresh", "server 127.0.0.1:1; # caf\195", 400, "not UTF-8") -- truncated sequence
  body("fresh", "server 127.0.0.1:1 weight=\192\128;", 400, "not UTF-8") -- overlong NUL
  body("fresh", "server 127.0.0.1:1 weight=0;", 400, "weight must be 1..1000")
  body("fresh", "server 127.0.0.1:1 weight=1001;", 400, "weight must be 1..1000")
  body("fresh", "server 127.0.0.1:1 weight=-1;", 400, "weight must be 1..1000")
  body("fresh", "server 127.0.0.1:1 weight=;", 400, "weight must be 1..1000")
  body("fresh", "server 127.0.0.1:1 weight=99999999999999999999999;", 400, "weight must be 1..1000")
  body("fresh", "server 127.0.0.1:1 weight=1e3;", 400, "weight must be 1..1000")
  body("fresh", "server 127.0.0.1:1 weight=0x10;", 400, "weight must be 1..1000")
  body("fresh", "server 127.0.0.1:1 max_fails=1001;", 400, "max_fails must be 0..1000")
  body("fresh", "server 127.0.0.1:1 max_fails=-1;", 400, "max_fails must be 0..1000")
  body("fresh", "server 127.0.0.1:1 fail_timeout=86401;", 400, "fail_timeout must be 0..86400")
  body("fresh", "server 127.0.0.1:1 fail_timeout=86401s;", 400, "fail_timeout must be 0..86400")
  body("fresh", "server 127.0.0.1:1 fail_timeout=25h;", 400, "fail_timeout must be 0..86400")
  body("fresh", "server 127.0.0.1:1 fail_timeout=1d1s;", 400, "fail_timeout must be 0..86400")
  body("fresh", "server 127.0.0.1:1 fail_timeout=2d;", 400, "fail_timeout must be 0..86400")
  body("fresh", "server 127.0.0.1:1 fail_timeout=1441m;", 400, "fail_timeout must be 0..86400")
  body("fresh", "server 127.0.0.1:1 fail_timeout=1w;", 400, "fail_timeout must be 0..86400")
  body("fresh", "server 127.0.0.1:1 fail_timeout=99999999999999999999d;", 400, "fail_timeout")
  body("fresh", "server 127.0.0.1:1 fail_timeout=-1;", 400, "fail_timeout")
  body("fresh", "server 127.0.0.1:1 fail_timeout=1s1m;", 400, "fail_timeout")
  body("fresh", "server 127.0.0.1:1 drain;", 400, 'unknown parameter "drain"')
  body("fresh", "hash $uri; server 127.0.0.1:1 slow_start=1s;", 400, 'does not support parameter "slow_start"')
  body("fresh", "server 127.0.0.1:1 max_conns=1000001;", 400, "max_conns must be 0..1000000")
  body("fresh", "server 127.0.0.1:1 max_conns=-1;", 400, "max_conns must be 0..1000000")
  body("fresh", "server 127.0.0.1:1 backup=0;", 400, "backup takes no value in nginx")
  body("fresh", "server 127.0.0.1:1 backup;", 400, "only backup servers")
  body("fresh", "server 127.0.0.1:1;\ncheck interval=0;", 400, "line 2")
  body("fresh", "server 127.0.0.1:1;\ncheck rise=0;", 400, "rise must be 1..1000")
  body("fresh", "server 127.0.0.1:1;\ncheck interval=3000 spin=1;", 400, 'unknown check parameter "spin=1"')
  body("fresh", "server 127.0.0.1:1;\ncheck type=ajp;", 400, 'check type "ajp" is not supported')
  body("fresh", "server 127.0.0.1:1;\ncheck_http_send \"GET / HTTP/1.0\\r\\n\\r\\n;", 400, "not closed")
  body("fresh", "server 127.0.0.1:1;\nzone z 4k;", 400, "too small")
  body("fresh", "server 127.0.0.1:1;\nsticky cookie srv;", 400, 'unknown directive "sticky"')
  body("fresh", "server 127.0.0.1:1 colour=red;", 400, "colour")
  body("fresh", "server 127.0.0.1:1 weight=2 weight=3;", 400)
  body("fresh", "server 127.0.0.1:1;server 127.0.0.1:1;", 400, "given twice")
  body("fresh", "server 10.0.0.1;\nserver 10.0.0.1:80 backup;", 400, "given twice")
  body("fresh", "server 127.0.0.1:99999;", 400, "port must be 1..65535")
  body("fresh", "server 127.0.0.1:0;", 400, "port must be 1..65535")
  body("fresh", "server nowhere.dyups.test:80;", 400, "NXDOMAIN")
  body("fresh", "server unix:" .. ("/x"):rep(100) .. ";", 400, "at most 107")
  body("fresh", "server [::1;", 400)
  body("fresh", "server '127.0.0.1:1;", 400)
  body("fresh", ("server 127.0.0.1:1 %s;"):format(("backup "):rep(3000)), 400)
  -- a good line, then a bad one: all or nothing, also when replacing
  body("fresh", "server 127.0.0.1:1;\nserver 127.0.0.1:2 weight=1001;\n", 400, "line 2")
  body("host1", "server 127.0.0.1:7;\nserver 127.0.0.1:8 weight=0;\n", 400, "line 2")
  body("local", "server 127.0.0.1:7;\nserver 127.0.0.1:8;\nbogus;\n", 400, "line 3")
  body("host2", ("server 127.0.0.1:7;\n"):rep(2), 400, "given twice")
  -- names at and past the bound, and not names at all
  body(n256, "server 127.0.0.1:1;", 400, "256 bytes long, at most 255")
  body(("a"):rep(255) .. "%00", "server 127.0.0.1:1;", { 400, 404 })
  body("bad!name", "server 127.0.0.1:1;", 400, "only letters")
  body("caf%C3%A9", "server 127.0.0.1:1;", 400, "only letters")
  body("host1%09", "server 127.0.0.1:1;", 400, "only letters")
  body("a%0Ab", "server 127.0.0.1:1;", { 400 })
  -- thousands of servers: 1001 under 64 KiB is refused by count, 3000 by size
  local s1001 = servers_body(1001, 20000)
  assert(#s1001 < 64 * 1024, "1001-server body should be under 64 KiB: " .. #s1001)
  body("fresh", s1001, 400, "1001 servers, at most 1000")
  body("host1", s1001, 400, "1001 servers, at most 1000")
  local s3000 = servers_body(3000, 20000)
  assert(#s3000 > 64 * 1024, "3000-server body should be over 64 KiB: " .. #s3000)
  body("fresh", s3000, 413, "larger than 65536 bytes")
  body("host1", s3000, 413, "larger than 65536 bytes")
  body("fresh", ("\0"):rep(64 * 1024 + 1), 413, "larger than")
  body("fresh", ("server 127.0.0.1:1;"):rep(10) .. (" "):rep(64 * 1024), 413)
  body("fresh", "server 127.0.0.1:1;" .. ("#"):rep(64 * 1024 - 19) .. "x", 413) -- one byte over
  -- a chunked body over the limit (no Content-Length to refuse it by)
  do
    local chunk = ("server 127.0.0.1:1;\n"):rep(400) -- 8000 bytes
    local chunks = {}
    for i = 1, 9 do chunks[i] = ("%x\r\n%s\r\n"):format(#chunk, chunk) end
    add { rawreq = "POST /upstream/fresh HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
      .. "Connection: close\r\n\r\n" .. table.concat(chunks) .. "0\r\n\r\n", want = 413, has = "larger than" }
    -- a lying Content-Length (larger than what comes): refused before reading
    add { rawreq = "POST /upstream/fresh HTTP/1.1\r\nHost: x\r\nContent-Length: 9999999999\r\n"
      .. "Connection: close\r\n\r\nserver 127.0.0.1:1;", want = 413, nginx_may_answer = true } -- nginx: client_max_body_size
    add { rawreq = "POST /upstream/fresh HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n"
      .. "Connection: close\r\n\r\nserver 127.0.0.1:1;", want = 400 }
  end
  -- If-Match that is not a version this server gave
  body("fresh", "server 127.0.0.1:1;", 412, "If-Match", { ["If-Match"] = "garbage" })
  body("fresh", "server 127.0.0.1:1;", 412, nil, { ["If-Match"] = '"999999"' })
  body("fresh", "server 127.0.0.1:1;", 412, nil, { ["If-Match"] = '"-1"' })
  body("fresh", "server 127.0.0.1:1;", 412, nil, { ["If-Match"] = '"99999999999999999999999"' })
  body("fresh", "server 127.0.0.1:1;", 412, nil, { ["If-Match"] = '"\255"' })

  ---------------------------------------------------------------- DELETE /upstream/NAME
  add { method = "DELETE", path = "/upstream/nope", want = 404, has = "not found" }
  add { method = "DELETE", path = "/upstream/" .. n256, want = 400, has = "at most 255" }
  add { method = "DELETE", path = "/upstream/...", want = 400, has = "only dots" }
  add { method = "DELETE", path = "/upstream/host1%00", want = { 400, 404 } }
  add { method = "DELETE", path = "/upstream/host1", headers = { ["If-Match"] = '"0"' }, want = 412 }
  add { method = "DELETE", path = "/upstream/host1", body = ("\0"):rep(70000), want = 413 }

  ---------------------------------------------------------------- /servers
  local function srv(method, path, b, want, has)
    add { method = method, path = "/upstream/" .. path, body = b, want = want, has = has }
  end
  srv("POST", "host1/servers", "", 400)
  srv("POST", "host1/servers", "   ", 400)
  srv("POST", "host1/servers", A1, 400, "already has server")
  srv("POST", "host1/servers", "server " .. A1 .. ";", 400, "already has server")
  srv("POST", "host1/servers", "127.0.0.1:5 weight=0", 400, "weight must be 1..1000")
  srv("POST", "host1/servers", "127.0.0.1:5 weight=1001", 400, "weight must be 1..1000")
  srv("POST", "host1/servers", "127.0.0.1:5 max_fails=1001", 400, "max_fails must be 0..1000")
  srv("POST", "host1/servers", "127.0.0.1:5 fail_timeout=86401s", 400, "fail_timeout must be 0..86400")
  srv("POST", "host1/servers", "127.0.0.1:5 frobnicate", 400, "unknown parameter")
  srv("POST", "host1/servers", "127.0.0.1:5\0", 400)
  srv("POST", "host1/servers", "127.0.0.1:5 \255", 400, "not UTF-8")
  srv("POST", "host1/servers", "127.0.0.1:5;127.0.0.1:6", 400)
  srv("POST", "host1/servers", "server 127.0.0.1:5; server 127.0.0.1:6;", 400)
  srv("POST", "host1/servers", big6k, 400)
  srv("POST", "nope/servers", "127.0.0.1:5", 404, "not found")
  srv("POST", n256 .. "/servers", "127.0.0.1:5", 400, "at most 255")
  srv("POST", "host1/servers", s3000, 413)
  -- PATCH with junk
  local srvpath = "host1/servers/" .. A1
  srv("PATCH", srvpath, "colour=red", 400, "unknown parameter")
  srv("PATCH", srvpath, "", 400)
  srv("PATCH", srvpath, "   ", 400)
  srv("PATCH", srvpath, "weight=0", 400, "weight must be 1..1000")
  srv("PATCH", srvpath, "weight=1001", 400, "weight must be 1..1000")
  srv("PATCH", srvpath, "max_fails=1001", 400, "max_fails must be 0..1000")
  srv("PATCH", srvpath, "fail_timeout=86401s", 400, "fail_timeout must be 0..86400")
  srv("PATCH", srvpath, "fail_timeout=25h", 400, "fail_timeout must be 0..86400")
  srv("PATCH", srvpath, "weight=5 weight=6", 400)
  srv("PATCH", srvpath, "weight=5 colour=red", 400, "colour")
  srv("PATCH", srvpath, "backup=maybe", 400, "must be on or off")
  srv("PATCH", srvpath, "weight=5\0", 400)
  srv("PATCH", srvpath, "weight=\255", 400, "not UTF-8")
  srv("PATCH", srvpath, "weight=5;", 400)
  srv("PATCH", srvpath, ("weight=5 "):rep(1000), 400)
  srv("PATCH", srvpath, ("x"):rep(70000), 413)
  srv("PATCH", "host2/servers/127.0.0.1:" .. B2, "down", 400, "last available server")
  srv("PATCH", "host2/servers/127.0.0.1:" .. B2, "down=on", 400, "last available server")
  srv("PATCH", "host1/servers/127.0.0.1:1", "weight=5", 404, "has no server")
  srv("PATCH", "host1/servers/junk", "weight=5", 400, "bad server")
  srv("PATCH", "nope/servers/" .. A1, "weight=5", 404, "not found")
  -- DELETE a server with a junk address
  for _, addr in ipairs { "junk", "127.0.0.1:99999", "127.0.0.1:0", "300.1.1.1:80", "%FF%FE", "\255\254",
    "127.0.0.1:" .. B1 .. "%20weight=2", "127.0.0.1%3A" .. B1 .. "x", big6k, "[::1", "unix:rel" } do
    srv("DELETE", "host1/servers/" .. addr, nil, { 400, 404 })
  end
  srv("DELETE", "host1/servers/127.0.0.1:1", nil, 404, "has no server")
  srv("DELETE", "host2/servers/127.0.0.1:" .. B2, nil, 400, "last available server")
  srv("DELETE", "host1/servers/%00", nil, { 400, 404 })
  srv("DELETE", "nope/servers/" .. A1, nil, 404, "not found")
  -- bad methods on every REST endpoint
  for _, p in ipairs { "host1", "host1/servers", srvpath, "nope", "nope/servers", "nope/servers/" .. A1 } do
    for _, m in ipairs { "PUT", "OPTIONS", "PROPFIND", "MKCOL", "FOO" } do
      srv(m, p, m == "PUT" and "server 127.0.0.1:1;" or nil, 405, "is not allowed here")
    end
    srv("TRACE", p, nil, 405)
  end
  srv("PATCH", "host1", "weight=2", 405, "use GET, HEAD, POST, DELETE")
  srv("DELETE", "host1/servers", nil, 405, "use GET, HEAD, POST")
  srv("POST", srvpath, "weight=2", 405, "use GET, HEAD, PATCH, DELETE")
  -- unknown endpoints
  add { method = "GET", path = "/", want = 404, has = "no such endpoint" }
  add { method = "GET", path = "/nothing", want = 404, has = "no such endpoint" }
  add { method = "POST", path = "/list/x", body = "server 127.0.0.1:1;", want = 404 }
  add { method = "POST", path = "/UPSTREAM/fresh", body = "server 127.0.0.1:1;", want = 404 }
  add { method = "POST", path = "/upstream/fresh/servers/", body = "x", want = 404 }
  return cases
end

----------------------------------------------------------------------------

describe("hostile input is refused and changes nothing", function()
  local ctx = {}

  lazy_setup(function()
    setup(ctx)
    ctx.initial = dump(ctx.inst)
  end)

  lazy_teardown(function()
    nginx.stop_all()
    dnsmasq.stop_all()
  end)

  -- the cases need the backend ports: build them with placeholder ports for
  -- the names, and resolve inside each test
  local PH = { 65001, 65002 }
  local templates = refused_cases(PH)
  for i, c in ipairs(templates) do
    local label = ("#%d %s %s %s"):format(i, c.method or (c.rawreq and "raw") or "GET",
      short(c.path or c.rawreq, 70), c.body and ("[" .. short(c.body, 40) .. "]") or "")
    it(label .. " -> " .. describe_set(set_of(c.want)), function()
      -- swap the placeholder ports for the real backends'
      local function fix(s)
        if type(s) ~= "string" then return s end
        return (s:gsub("65001", tostring(ctx.B[1])):gsub("65002", tostring(ctx.B[2])))
      end
      local real = {}
      for k, v in pairs(c) do real[k] = fix(v) end
      if c.headers then real.headers = c.headers end
      check_refused(ctx, real)
    end)
  end

  it("after all of it: the table is the seeded one, version 1, and both workers route by it", function()
    local now = dump(ctx.inst)
    assert_same_dump(ctx.initial, now, "after every hostile case")
    assert.are.equal(1, now.version)
    local names = {}
    for _, u in ipairs(now.decoded.upstreams) do names[#names + 1] = u.name end
    assert.are.same({ "local", "host1", "host2" }, names)
    local seen = {}
    for _ = 1, 40 do
      local status, port, pid = T.get(ctx.inst, "/local")
      assert.are.equal(200, status)
      seen[pid] = true
      assert.is_truthy(port == ctx.B[1] or port == ctx.B[2])
    end
    for _, pid in ipairs(ctx.pids) do assert.is_truthy(seen[pid], "worker " .. pid .. " served nothing") end
    for _, host in ipairs { "host1", "host2" } do
      local status, port = T.get(ctx.inst, "/", { Host = host })
      assert.are.equal(200, status, host)
      assert.are.equal(host == "host1" and ctx.B[1] or ctx.B[2], port, host)
    end
  end)
end)

describe("requests at the bounds are accepted and change only the named upstream", function()
  local ctx = {}

  lazy_setup(function()
    setup(ctx)
  end)

  lazy_teardown(function()
    nginx.stop_all()
    dnsmasq.stop_all()
  end)

  -- without `name`: everything but upstream `name` and the version equal
  local function others(decoded, name)
    local out = {}
    for _, u in ipairs(decoded.upstreams) do
      if u.name ~= name then out[#out + 1] = u end
    end
    return out
  end

  -- POST `body` to /upstream/NAME (NAME new): 200, version + 1, the others
  -- unchanged, NAME's servers as `check` says; DELETE: back to the start.
  local function accepted(name, body, check)
    local before = dump(ctx.inst)
    local status, rbody, h = T.request(ctx.inst.ports.api, "POST", "/upstream/" .. name, { body = body })
    assert.are.equal(200, status, ("POST /upstream/%s [%s]: %s"):format(short(name, 40), short(body, 80), short(rbody)))
    assert.are.equal("success", rbody)
    assert.are.equal(('"%d"'):format(before.version + 1), h.etag)
    local after = dump(ctx.inst)
    assert.are.equal(before.version + 1, after.version)
    assert.are.same(others(before.decoded, name), others(after.decoded, name))
    local mine
    for _, u in ipairs(after.decoded.upstreams) do
      if u.name == name then mine = u end
    end
    assert.is_truthy(mine, "upstream " .. short(name, 40) .. " missing after 200")
    assert.are.equal(name, after.decoded.upstreams[#after.decoded.upstreams].name, "a new upstream goes last")
    check(mine.servers)
    -- GET by name gives it back
    local gs, gbody = T.request(ctx.inst.ports.api, "GET", "/upstream/" .. name .. "?format=json")
    assert.are.equal(200, gs, short(gbody))
    gbody = gbody:gsub(',"active":%d+,"shared":%a+,"state":"%a+","stats":%b{}', "")
    assert.are.same(mine.servers, T.json_decode(gbody).servers)
    assert_alive(ctx, "POST /upstream/" .. short(name, 40))
    status, rbody = T.request(ctx.inst.ports.api, "DELETE", "/upstream/" .. name)
    assert.are.equal(200, status, short(rbody))
    local restored = dump(ctx.inst)
    assert.are.equal(before.version + 2, restored.version)
    assert.are.same(before.decoded.upstreams, restored.decoded.upstreams)
  end

  local function one_server(field, value)
    return function(servers)
      assert.are.equal(1, #servers)
      assert.are.equal(value, servers[1][field], field)
    end
  end

  it("weight=1 and weight=1000", function()
    accepted("w1", "server 127.0.0.1:1 weight=1;", one_server("weight", 1))
    accepted("w1000", "server 127.0.0.1:1 weight=1000;", one_server("weight", 1000))
  end)

  it("max_fails=0 and max_fails=1000", function()
    accepted("mf0", "server 127.0.0.1:1 max_fails=0;", one_server("max_fails", 0))
    accepted("mf1000", "server 127.0.0.1:1 max_fails=1000;", one_server("max_fails", 1000))
  end)

  it("fail_timeout=0, 86400, 86400s, 1440m, 24h, 1d", function()
    accepted("ft0", "server 127.0.0.1:1 fail_timeout=0;", one_server("fail_timeout", 0))
    for _, v in ipairs { "86400", "86400s", "1440m", "24h", "1d", "23h59m60s" } do
      accepted("ft", "server 127.0.0.1:1 fail_timeout=" .. v .. ";", one_server("fail_timeout", 86400))
    end
  end)

  it("a name of 255 bytes (letters, digits, '.', '-', '_')", function()
    local name = ("a.b-c_9"):rep(37):sub(1, 255)
    assert.are.equal(255, #name)
    accepted(name, "server 127.0.0.1:1;", one_server("addr", "127.0.0.1:1"))
    accepted("..a", "server 127.0.0.1:2;", one_server("addr", "127.0.0.1:2"))
  end)

  it("1000 servers in one body (the most an upstream takes)", function()
    local body = servers_body(1000, 20000, " weight=2")
    assert(#body < 64 * 1024)
    accepted("thousand", body, function(servers)
      assert.are.equal(1000, #servers)
      local seen = {}
      for i, s in ipairs(servers) do
        assert.are.equal(2, s.weight)
        assert.are.equal(20000 + i, tonumber(s.addr:match(":(%d+)$")), "server " .. i .. " out of order")
        assert.is_nil(seen[s.addr])
        seen[s.addr] = true
      end
    end)
  end)

  it("a body of exactly 64 KiB is read (not 413)", function()
    local body = "server 127.0.0.1:3;\n"
    body = body .. ("#"):rep(64 * 1024 - #body)
    assert.are.equal(64 * 1024, #body)
    accepted("exact64k", body, one_server("addr", "127.0.0.1:3"))
  end)
end)
