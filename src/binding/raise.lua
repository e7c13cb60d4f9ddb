-- Rethrows the argument errors of the Rust functions of ngx.dyups in Lua's
-- own words, as lua-resty-core's functions raise them: a plain string with
-- the caller's position, not mlua's wrapped error with a Rust traceback.
local module, names = ...

local pcall, error, tostring, type = pcall, error, tostring, type

local function pass(ok, ...)
    if ok then
        return ...
    end
    local e = ...
    if type(e) ~= "string" then
        e = tostring(e)
    end
    e = e:match("^runtime error: (.-)\nstack traceback") or e:match("^runtime error: (.*)$") or e
    return error(e, 3)
end

for _, name in ipairs(names) do
    local f = module[name]
    module[name] = function(...)
        return pass(pcall(f, ...))
    end
end

return module
