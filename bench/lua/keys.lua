-- bench/lua/keys.lua: wrk script for section 5 (policies) of `make bench`.
--
--   wrk -s bench/lua/keys.lua http://127.0.0.1:PORT/chash -- k 10000
--   wrk -s bench/lua/keys.lua http://127.0.0.1:PORT/iphash -- ip 10000
--
-- Mode "k" cycles the query string ?k=1 .. ?k=N (for `hash $arg_k ...`);
-- mode "ip" cycles an X-Real-IP header over N client addresses in N
-- different /24 networks (ip_hash keys on the first three octets; the proxy
-- trusts it with `set_real_ip_from 127.0.0.1; real_ip_header X-Real-IP;`).
-- Every request string is built once in init(), so wrk's own per-request
-- cost is one table index, the same whichever proxy it loads.
local reqs, n, i = {}, 0, 0

function init(args)
  local mode = args[1] or "k"
  n = tonumber(args[2]) or 10000
  for j = 1, n do
    if mode == "ip" then
      local ip = ("10.%d.%d.%d"):format(math.floor(j / 256) % 256, j % 256, j % 250 + 1)
      reqs[j] = wrk.format("GET", wrk.path, { ["X-Real-IP"] = ip })
    else
      reqs[j] = wrk.format("GET", wrk.path .. "?k=" .. j)
    end
  end
end

function request()
  i = i % n + 1
  return reqs[i]
end
