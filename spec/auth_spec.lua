-- The admin interfaces (/ups, /ups/check, REST) behind a bearer token:
-- missing or wrong → 401 with nothing changed and a log line naming the
-- client; the right token passes.
local nginx = require "spec.helpers.nginx"
local dy = require "spec.helpers.dyups"

local UPSTREAMS = "upstream local { server 127.0.0.1:1; server 127.0.0.1:2; }"

local function version(inst)
  return tonumber(dy.run(inst, [[return (require("ngx.dyups").version())]]))
end

for _, how in ipairs { "admin_token", "admin_token_file" } do
  describe("an admin token given as " .. how, function()
    local inst
    local RIGHT = { Authorization = "Bearer s3cret-" .. how }

    lazy_setup(function()
      if how == "admin_token" then
        inst = dy.proxy { upstreams = UPSTREAMS, init = [[admin_token = "s3cret-admin_token",]] }
      else
        inst = dy.proxy { upstreams = UPSTREAMS, init = [[admin_token_file = "conf/token",]] }
        nginx.write_file(inst.prefix .. "/conf/token", "s3cret-admin_token_file\n")
      end
      inst:start()
    end)

    lazy_teardown(function()
      nginx.stop_all()
    end)

    local refusals = {
      { "no header", nil },
      { "a wrong token", { Authorization = "Bearer s3cret" } },
      { "another scheme", { Authorization = "Basic czNjcmV0" } },
    }

    for _, case in ipairs(refusals) do
      it("refuses /ups with " .. case[1] .. ": 401, E00001, nothing changed", function()
        local before = version(inst)
        local status, body, headers = nginx.http(inst.ports.proxy, "PUT", "/ups?op=del&server=127.0.0.1:1",
                                                 { headers = case[2] })
        assert.equal(401, status)
        assert.matches('"code":"E00001"', body, 1, true)
        assert.equal('Bearer realm="ngx.dyups"', headers["www-authenticate"])
        assert.equal(before, version(inst))
      end)

      it("refuses REST reads and writes with " .. case[1], function()
        local before = version(inst)
        assert.equal(401, (nginx.http(inst.ports.api, "GET", "/list", { headers = case[2] })))
        local status, body = nginx.http(inst.ports.api, "POST", "/upstream/x",
                                        { headers = case[2], body = "server 127.0.0.1:3;" })
        assert.equal(401, status)
        assert.matches("bearer", body:lower())
        assert.equal(before, version(inst))
      end)
    end

    it("refuses /ups/check without the token", function()
      assert.equal(401, (nginx.http(inst.ports.proxy, "GET", "/ups/check")))
      assert.equal(200, (nginx.http(inst.ports.proxy, "GET", "/ups/check", { headers = RIGHT })))
    end)

    it("logs each refusal with the client's address", function()
      nginx.http(inst.ports.api, "GET", "/detail")
      local log = inst:error_log()
      assert.truthy(log:find("refused an admin request from 127.0.0.1: this admin interface needs", 1, true), log)
      assert.truthy(log:find("refused an admin request from 127.0.0.1: the bearer token is wrong", 1, true), log)
    end)

    it("lets the right token through", function()
      local before = version(inst)
      local status, body = nginx.http(inst.ports.proxy, "PUT", "/ups?op=del&server=127.0.0.1:1", { headers = RIGHT })
      assert.equal(200, status, body)
      status = nginx.http(inst.ports.api, "POST", "/upstream/x", { headers = RIGHT, body = "server 127.0.0.1:3;" })
      assert.equal(200, status)
      assert.equal(before + 2, version(inst))
    end)
  end)
end
