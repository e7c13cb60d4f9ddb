-- bench/metrics_scrape.lua: what /metrics and /dashboard?format=json cost
-- with 10,000 servers (100 upstreams of 100), on one nginx worker:
--   * each scrape's time as curl sees it, and the body's size;
--   * the time the content handler holds the worker (measured around the
--     call inside the handler: rendering, and handing the body to nginx);
--   * the worker's event-loop stall: a coroutine in the same worker wakes
--     every millisecond (ngx.sleep(0.001)) and records the longest gap
--     between wake-ups, while the scrapes run and, for comparison, idle.
-- Run from the repository root after `make build`:
--   luajit bench/metrics_scrape.lua [SCRAPES]      (default 20)
-- Starts one nginx in a temp prefix on loopback ports and stops it on exit.
package.path = "./?.lua;" .. package.path
local nginx = require "spec.helpers.nginx"

local SCRAPES = tonumber(arg[1]) or 20
local UPSTREAMS, PER = 100, 100

local lines = {}
for u = 1, UPSTREAMS do
  lines[#lines + 1] = ("upstream u%03d {"):format(u)
  for s = 1, PER do
    lines[#lines + 1] = ("    server 10.%d.%d.%d:80 weight=%d;"):format(u, math.floor(s / 250), s % 250 + 1, s % 7 + 1)
  end
  lines[#lines + 1] = "}"
end

local inst = nginx.new {
  workers = 1,
  conf = [[
http {
    lua_package_path "${lua_package_path}";
    lua_package_cpath "${lua_package_cpath}";
    init_by_lua_block {
        assert(require("ngx.dyups").init{
            path = "state/dyups.state", size = "8m", upstreams = "conf/upstream.conf",
        })
    }
    init_worker_by_lua_block { assert(require("ngx.dyups").init_worker()) }
    server {
        listen 127.0.0.1:${port_api};
        location = /metrics {
            content_by_lua_block {
                ngx.update_time()
                local t = ngx.now()
                require("ngx.dyups").metrics()
                ngx.update_time()
                ngx.log(ngx.NOTICE, "handler_ms ", (ngx.now() - t) * 1000)
            }
        }
        location = /dashboard {
            content_by_lua_block {
                ngx.update_time()
                local t = ngx.now()
                require("ngx.dyups").dashboard()
                ngx.update_time()
                ngx.log(ngx.NOTICE, "handler_ms ", (ngx.now() - t) * 1000)
            }
        }
        # The longest gap between 1 ms wake-ups of this worker, over
        # ?s=SECONDS.
        location = /stall {
            content_by_lua_block {
                local stop = ngx.now() + tonumber(ngx.var.arg_s)
                local worst, last = 0, ngx.now()
                while ngx.now() < stop do
                    ngx.sleep(0.001)
                    ngx.update_time()
                    local now = ngx.now()
                    if now - last > worst then worst = now - last end
                    last = now
                end
                ngx.say(worst * 1000)
            }
        }
    }
}
]],
}
nginx.execute("mkdir -p " .. nginx.shell_quote(inst.prefix .. "/state"))
nginx.write_file(inst.prefix .. "/conf/upstream.conf", table.concat(lines, "\n") .. "\n")

local ok, err = pcall(function()
  inst:start()
  local port = inst.ports.api
  local function timed(path)
    local p = io.popen(("curl -s -o /dev/null -w '%%{time_total} %%{size_download}' http://127.0.0.1:%d%s")
      :format(port, path))
    local t, size = p:read("*a"):match("(%S+) (%S+)")
    p:close()
    return tonumber(t) * 1000, tonumber(size)
  end
  local function stall_during(seconds, work)
    local out = os.tmpname()
    nginx.execute(("curl -s -o %s 'http://127.0.0.1:%d/stall?s=%s' &"):format(out, port, seconds))
    nginx.sleep(0.2) -- the stall probe is under way
    if work then work() end
    nginx.wait_until(function()
      local v = nginx.read_file(out)
      return v and v ~= "" and v
    end, seconds + 10, "the stall probe")
    local v = tonumber(nginx.read_file(out))
    os.remove(out)
    return v
  end
  local function pct(list, p)
    table.sort(list)
    return list[math.max(1, math.ceil(#list * p))]
  end
  for _, path in ipairs { "/metrics", "/dashboard?format=json" } do
    timed(path) -- the first read decodes the table once
    local times, size = {}, 0
    local handler_before = select(2, (nginx.read_file(inst.prefix .. "/logs/error.log") or ""):gsub("handler_ms", ""))
    local stall = stall_during(SCRAPES * 0.25 + 2, function()
      for i = 1, SCRAPES do
        times[i], size = timed(path)
        nginx.sleep(0.1)
      end
    end)
    local handler = {}
    local n = 0
    for ms in (nginx.read_file(inst.prefix .. "/logs/error.log") or ""):gmatch("handler_ms ([%d.]+)") do
      n = n + 1
      if n > handler_before then handler[#handler + 1] = tonumber(ms) end
    end
    print(("%-24s %d scrapes of %d servers, %.1f MB: curl median %.1f ms, max %.1f ms; "
      .. "handler median %.1f ms, max %.1f ms; longest event-loop stall %.1f ms")
      :format(path, SCRAPES, UPSTREAMS * PER, size / 1e6, pct(times, 0.5), pct(times, 1.0),
        pct(handler, 0.5), pct(handler, 1.0), stall))
  end
  print(("%-24s longest event-loop stall %.1f ms"):format("idle", stall_during(3)))
end)
inst:stop()
nginx.stop_all()
assert(ok, err)
