-- balancer_by_lua_file of the "minimal Lua" proxy (same shape as
-- lua/upstream.lua, which calls require("ngx.dyups").balance()).
require("bench_rr").balance()
