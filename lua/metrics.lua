-- content_by_lua_file for Prometheus: the text exposition of every server.
require("ngx.dyups").metrics()
