-- content_by_lua_file for nginx_upstream_check_module's check_status page:
-- ?format=html|csv|json, ?status=up|down|checking.
require("ngx.dyups").check_status()
