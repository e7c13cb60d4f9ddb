-- content_by_lua_file at /ups/check: changes some worker has not applied yet.
require("ngx.dyups").handle_check()
