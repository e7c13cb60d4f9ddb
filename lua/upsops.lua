-- content_by_lua_file at /ups: ?op=add|del&server=IP:PORT[&upstream=NAME]
require("ngx.dyups").handle_ups()
