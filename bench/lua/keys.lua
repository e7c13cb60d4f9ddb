-- bench/lua/keys.lua: wrk script for section 5 (policies) of `make bench`.
--
--   wrk -s bench/lua/keys.lua http://127.0.0.1:PORT/chash -- k 10000
--   wrk -s bench/lua/keys.lua http://127.0.0.1:PORT/iphash -- ip 10000
--   wrk -s bench/lua/keys.lua http://127.0.0.1:PORT/lc -- none 1 count
--
-- Mode "k" cycles the query string ?k=1 .. ?k=N (for `hash $arg_k ...`);
-- mode "ip" cycles an X-Real-IP header over N client addresses in N
-- different /24 networks (ip_hash keys on the first three octets; the proxy
-- trusts it with `set_real_ip_from 127.0.0.1; real_ip_header X-Real-IP;`);
-- mode "none" sends the bare path (least_conn, random: no key).
-- Every request string is built once in init(), so wrk's own per-request
-- cost is one table index, the same whichever proxy it loads.
--
-- A third argument "count" also counts the answers per backend (the
-- backends answer their port) and prints `backend PORT COUNT` lines at the
-- end. Only then is response() defined: wrk parses bodies and calls into
-- Lua for every response only when the script has one, so the timed runs,
-- which do not count, do not pay for it.
local reqs, n, i = {}, 0, 0

-- luacheck: globals counts
counts = {} -- a global: done() reads it from the thread with thread:get()
local threads = {}

function init(args)
  local mode = args[1] or "k"
  n = tonumber(args[2]) or 10000
  if mode == "none" then
    n = 1
  end
  for j = 1, n do
    if mode == "ip" then
      local ip = ("10.%d.%d.%d"):format(math.floor(j / 256) % 256, j % 256, j % 250 + 1)
      reqs[j] = wrk.format("GET", wrk.path, { ["X-Real-IP"] = ip })
    elseif mode == "none" then
      reqs[j] = wrk.format("GET", wrk.path)
    else
      reqs[j] = wrk.format("GET", wrk.path .. "?k=" .. j)
    end
  end
  if args[3] == "count" then
    response = function(status, _, body)
      local k = status == 200 and body:match("^%d+") or ("status" .. status)
      counts[k] = (counts[k] or 0) + 1
    end
  end
end

function request()
  i = i % n + 1
  return reqs[i]
end

function setup(thread)
  threads[#threads + 1] = thread
end

function done()
  local total = {}
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("counts") or {}) do
      total[k] = (total[k] or 0) + v
    end
  end
  for k, v in pairs(total) do
    io.write("backend ", k, " ", v, "\n")
  end
end
