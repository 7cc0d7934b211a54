-- Picks whose request state is dropped without a report are cancelled by the garbage
-- collector, and picks outliving their upstream are safe to collect.
local t = dofile((arg[0]:match("^(.*)/") or ".") .. "/helpers.lua")
local dynup = require "resty.dynup"

local dir = t.temp_dir()
local path = dir .. "/peers.json"
t.write_file(path, '["10.0.2.1:80", "10.0.2.2:80"]')
local up = assert(dynup.new({name = "api", source = "file://" .. path}, {lib = t.lib}))

do
  local dropped = {}
  for i = 1, 50 do
    dropped[i] = {}
    assert(up:pick(nil, dropped[i]))
  end
  t.eq(t.count(up:status(), '"in_flight":25'), 2, "50 live picks")
end
collectgarbage()
collectgarbage()
t.eq(t.count(up:status(), '"in_flight":0'), 2, "dropped picks cancelled by the collector")

-- Close with picks live, then collect them: their finalizers must not touch the handle.
local live = {}
for i = 1, 10 do
  live[i] = {}
  assert(up:pick(nil, live[i]))
end
up:close()
local ok, err = up:report(live[1], 200, 0.001)
t.eq(ok, nil, "report after close")
t.eq(err, "resty.dynup: upstream api is closed", "report after close")
live = nil
collectgarbage()
collectgarbage()

-- Exit with an upstream open and picks live: lua_close runs every finalizer in no
-- particular order, the handle's perhaps first; the picks' must then leave it alone.
local other = assert(dynup.new({name = "other", source = "file://" .. path}, {lib = t.lib}))
LIVE_AT_EXIT = {}
for i = 1, 20 do
  LIVE_AT_EXIT[i] = {}
  assert(other:pick(nil, LIVE_AT_EXIT[i]))
end

t.remove_dir(dir, {"peers.json"}) -- the upstream keeps the set it read
print("gc_test: ok")
