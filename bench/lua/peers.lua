-- content_by_lua_file of section 5's dyups proxy (`make bench`):
-- GET /peers?u=NAME answers dyups.peers(NAME), one server a line,
-- "ADDR CONNS FAILS SHARED", or 404 and the error.
local dyups = require "ngx.dyups"

local list, err = dyups.peers(ngx.var.arg_u or "")
if not list then
    ngx.status = 404
    ngx.say(err)
    return
end
for _, p in ipairs(list) do
    ngx.say(p.server, " ", p.conns, " ", p.fails, " ", tostring(p.shared))
end
