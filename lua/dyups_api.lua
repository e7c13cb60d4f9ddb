-- content_by_lua_file for the REST admin interface of ngx_http_dyups_module:
-- /list, /detail, /upstream/NAME[/servers[/ADDR]].
require("ngx.dyups").handle_api()
