-- A peer file changed on disk reaches picks without restarting anything.
local t = dofile((arg[0]:match("^(.*)/") or ".") .. "/helpers.lua")
local dynup = require "resty.dynup"

local dir = t.temp_dir()
local path = dir .. "/peers.json"
t.write_file(path, '["10.0.1.1:80", "10.0.1.2:80"]')
local up = assert(dynup.new({name = "api", source = "file://" .. path}, {lib = t.lib}))

local function picked()
  local ctx = {}
  local host, port, err = up:pick(nil, ctx)
  assert(host, err)
  assert(up:report(ctx, 200, 0.001))
  return host .. ":" .. port
end
for _ = 1, 10 do
  local p = picked()
  assert(p == "10.0.1.1:80" or p == "10.0.1.2:80", p)
end

local written = t.now_ms()
t.write_file(path, '{"peers":[{"host":"10.0.1.3","port":81}]}')
assert(t.wait_until(function() return picked() == "10.0.1.3:81" end, 5000), "the new file was not seen in 5 s")
local seen_ms = t.now_ms() - written
for _ = 1, 10 do t.eq(picked(), "10.0.1.3:81", "after the change") end
t.contains(up:status(), '"host":"10.0.1.3","port":81', "status after the change")
print(string.format("file_change_test: ok (new peers picked %.1f ms after the write)", seen_ms))

up:close()
t.remove_dir(dir, {"peers.json"})
