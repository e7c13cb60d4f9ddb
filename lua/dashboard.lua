-- content_by_lua_file for the status page (?format=json: what it draws).
require("ngx.dyups").dashboard()
