-- balancer_by_lua_file: route to a server of the upstream named by
-- $dyups_upstream, else by the proxy_pass target, from the shared table.
require("ngx.dyups").balance()
