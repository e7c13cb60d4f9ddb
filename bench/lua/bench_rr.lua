-- bench/lua/bench_rr.lua: the floor of any Lua balancer for `make bench`.
-- A fixed round robin over ports on 127.0.0.1 that only calls
-- ngx.balancer.set_current_peer: no table lookup by name, no health state.
local balancer = require "ngx.balancer"
local set_current_peer = balancer.set_current_peer

local M = {}
local ports, n, i = {}, 0, 0

function M.init(list)
  ports, n = list, #list
end

function M.balance()
  i = i % n + 1
  local ok, err = set_current_peer("127.0.0.1", ports[i])
  if not ok then
    ngx.log(ngx.ERR, "bench_rr: ", err)
    return ngx.exit(500)
  end
end

return M
