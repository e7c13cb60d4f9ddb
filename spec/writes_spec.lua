-- The writing functions' public faces (src/binding/writes.lua) in a phase
-- that may yield, with the Rust side (`raw`) and `ngx` faked: what each
-- answers when its write is on disk and when it is not known to be (an
-- msync that failed, which no spec against a real nginx can cause).
--
--   busted --lua=luajit spec/writes_spec.lua

local WHY = "could not msync the state file: errno 5"

-- writes.lua loaded as the binding loads it, over a `raw` whose writes
-- answer `answers[name]` and whose turn's finish says `finish_says`.
-- Returns the module and the arguments each write was called with.
local function load_writes(answers, finish_says)
  local module, calls, raw = {}, {}, {}
  raw.turn = function()
    return {
      -- Done, with a range left to msync: the flush is this writer's.
      state = function() return false, "addr", 4096 end,
      set_answers = function() end,
      finish = function() return finish_says end,
    }
  end
  raw.thread_pool = function() return nil end
  raw.dns_plan = function() return nil end
  for name, answer in pairs(answers) do
    raw[name] = function(_, ...)
      calls[name] = { n = select("#", ...), ... }
      return unpack(answer, 1, answer.n)
    end
  end
  assert(loadfile("src/binding/writes.lua"))(module, raw)
  return module, calls
end

local function pack(...)
  return { n = select("#", ...), ... }
end

describe("writes.lua's answers (raw faked, content phase)", function()
  local saved_ngx

  before_each(function()
    saved_ngx = _G.ngx
    _G.ngx = { get_phase = function() return "content" end, sleep = function() end }
  end)

  after_each(function()
    _G.ngx = saved_ngx
  end)

  local ANSWERS = {
    update = pack(200, "success"),
    delete = pack(404, "no such upstream"),
    add_server = pack(true),
    remove_server = pack(nil, "no such server", 404),
  }

  it("a write on disk answers what the Rust side said, its arguments passed on", function()
    local dyups, calls = load_writes(ANSWERS, nil)
    assert.same(pack(200, "success"), pack(dyups.update("u", "server 127.0.0.1:1;")))
    assert.same(pack("u", "server 127.0.0.1:1;"), calls.update)
    assert.same(pack(404, "no such upstream"), pack(dyups.delete("u")))
    assert.same(pack("u"), calls.delete)
    assert.same(pack(true), pack(dyups.add_server("u", "127.0.0.1:2", nil)))
    assert.same(pack("u", "127.0.0.1:2", nil), calls.add_server)
    assert.same(pack(nil, "no such server", 404), pack(dyups.remove_server("u", "127.0.0.1:2")))
    assert.same(pack("u", "127.0.0.1:2"), calls.remove_server)
  end)

  it("a write not known to be on disk answers 500 in each function's own shape", function()
    local dyups = load_writes(ANSWERS, WHY)
    -- update and delete: Tengine's status, message.
    assert.same(pack(500, WHY), pack(dyups.update("u", "server 127.0.0.1:1;")))
    assert.same(pack(500, WHY), pack(dyups.delete("u")))
    -- add_server and remove_server: nil, err, status.
    assert.same(pack(nil, WHY, 500), pack(dyups.add_server("u", "127.0.0.1:2")))
    assert.same(pack(nil, WHY, 500), pack(dyups.remove_server("u", "127.0.0.1:2")))
  end)
end)
