-- log_by_lua_file: the request has ended; give back the connection it
-- counted for least_conn / random two, in every worker's view.
require("ngx.dyups").log()
