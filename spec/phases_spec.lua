-- Writes are refused, with a clear error, in the phases where they must not
-- run (they may wait for the state file lock), and the table stays as it was.
local nginx = require "spec.helpers.nginx"

describe("ngx.dyups writes by phase", function()
  local inst

  lazy_setup(function()
    inst = nginx.new {
      workers = 1,
      conf = [[
http {
    lua_package_path "${lua_package_path}";
    lua_package_cpath "${lua_package_cpath}";

    init_by_lua_block {
        local dyups = require "ngx.dyups"
        assert(dyups.init{ path = "state/dyups.state" })
        local ok, err = pcall(dyups.update, "x", "server 127.0.0.1:1;")
        INIT_RESULT = tostring(ok) .. " " .. tostring(err)
    }
    init_worker_by_lua_block {
        assert(require("ngx.dyups").init_worker())
    }

    server {
        listen 127.0.0.1:${port_http};

        location = /init { content_by_lua_block { ngx.say(INIT_RESULT) } }
        location = /version { content_by_lua_block { ngx.say((require("ngx.dyups").version())) } }
        location = /content {
            content_by_lua_block {
                ngx.say(require("ngx.dyups").update("ok", "server 127.0.0.1:1;"))
            }
        }
        location = /filters {
            content_by_lua_block { ngx.say("body") }
            header_filter_by_lua_block {
                local ok, err = pcall(require("ngx.dyups").update, "x", "server 127.0.0.1:1;")
                ngx.log(ngx.ERR, "HEADER_FILTER ", tostring(ok), " ", err)
            }
            log_by_lua_block {
                local ok, err = pcall(require("ngx.dyups").delete, "ok")
                ngx.log(ngx.ERR, "LOG ", tostring(ok), " ", err)
            }
        }
    }
}
]],
    }
    inst:start()
  end)

  lazy_teardown(function()
    nginx.stop_all()
  end)

  it("refuses a write in init_by_lua (the master) with the reason", function()
    local status, body = nginx.http(inst.ports.http, "GET", "/init")
    assert.equal(200, status)
    assert.matches("^false .*'update' cannot run in the init phase", body)
  end)

  it("allows a write in content_by_lua", function()
    local _, before = nginx.http(inst.ports.http, "GET", "/version")
    local status, body = nginx.http(inst.ports.http, "GET", "/content")
    assert.equal(200, status)
    assert.equal("200success\n", body)
    local _, after = nginx.http(inst.ports.http, "GET", "/version")
    assert.equal(tonumber(before) + 1, tonumber(after))
  end)

  it("refuses writes in header_filter and log phases and changes nothing", function()
    local _, before = nginx.http(inst.ports.http, "GET", "/version")
    local status, body = nginx.http(inst.ports.http, "GET", "/filters")
    assert.equal(200, status)
    assert.equal("body\n", body)
    nginx.wait_until(function()
      return inst:error_log():find("LOG false", 1, true)
    end, 5, "the log phase's line")
    local log = inst:error_log()
    assert.truthy(log:find("HEADER_FILTER false 'update' cannot run in the header_filter phase", 1, true), log)
    assert.truthy(log:find("LOG false 'delete' cannot run in the log phase", 1, true), log)
    local _, after = nginx.http(inst.ports.http, "GET", "/version")
    assert.equal(before, after)
  end)
end)
