-- luacheck configuration for ngx.dyups
std = "ngx_lua"
max_line_length = 120
codes = true

exclude_files = {
  "target/",
  "lib/",
  ".prefix*/",
}

-- specs and spec helpers run under busted/LuaJIT, outside nginx
files["spec/"] = {
  std = "+busted",
  globals = { "ngx" },
  -- tables of cases read best one case a line
  max_line_length = false,
}
files["spec/helpers/"] = {
  -- newproxy/unpack are LuaJIT (5.1) globals
  read_globals = { "newproxy", "unpack" },
}

-- wrk scripts (bench/lua/keys.lua): wrk calls the globals they define.
files["bench/lua/keys.lua"] = {
  std = "luajit",
  globals = { "init", "request", "response", "done", "setup", "delay" },
  read_globals = { "wrk" },
}

-- ngx.run_worker_thread (lua-nginx-module 0.10.21+) is newer than
-- luacheck's ngx_lua std.
files["src/binding/writes.lua"] = {
  read_globals = { ngx = { fields = { "run_worker_thread" } } },
}
