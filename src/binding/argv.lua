-- nginx's command line, for dyups.init in nginx's master: nginx keeps a copy
-- of its arguments in `ngx_argv`. Once it runs, its process title overwrites
-- the originals, which is what /proc/self/cmdline shows a reload's
-- init_by_lua. nil when the nginx binary does not export the symbol.
local ffi = require "ffi"

-- Declared once per Lua VM; a second declaration is an error to ignore.
pcall(ffi.cdef, "extern char **ngx_argv;")

local ok, argv = pcall(function() return ffi.C.ngx_argv end)
if not ok or argv == nil then
    return nil
end
local out, i = {}, 0
while argv[i] ~= nil do
    out[#out + 1] = ffi.string(argv[i])
    i = i + 1
end
return out
