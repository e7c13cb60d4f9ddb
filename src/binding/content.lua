-- The REST content handler's Lua side. Reading a request body may wait for
-- the client, which means yielding, and a coroutine cannot yield across the
-- Rust (C) function that handles the request: so the body is read here,
-- before it, when the Rust side says the request wants one.
local module = ...

local handle_api, wants_body = module.handle_api, module._api_wants_body
module._api_wants_body = nil

module.handle_api = function()
    if wants_body() then
        ngx.req.read_body()
    end
    return handle_api()
end

return module
