-- resty.dynup under plain LuaJIT: picks and reports with an explicit request state,
-- retries that exclude the peers already tried, status JSON, close.
local t = dofile((arg[0]:match("^(.*)/") or ".") .. "/helpers.lua")
local dynup = require "resty.dynup"

local dir = t.temp_dir()
local path = dir .. "/peers.json"
t.write_file(path, [[{"peers":[
  {"id":"a","host":"10.0.0.1","port":8001},
  {"id":"b","host":"10.0.0.2","port":8002},
  {"id":"c","host":"2001:db8::7","port":8003}]}]])

-- Passive checks off: the retries below report failures that would take peers down.
local up = assert(dynup.new({name = "api", source = "file://" .. path,
                             health = {passive = {max_fails = 0}}}, {lib = t.lib}))
t.eq(up.name, "api", "name")
t.eq(dynup.get("api"), up, "registered under its name")
t.contains(dynup.version(t.lib), ".", "version")

-- Round robin over equal weights: each peer once per three picks, reported each time.
local seen = {}
for _ = 1, 30 do
  local ctx = {}
  local host, port, err = up:pick("key", ctx)
  assert(host, err)
  seen[host .. ":" .. port] = (seen[host .. ":" .. port] or 0) + 1
  t.eq(up:tries(ctx), 1, "tries after one pick")
  assert(up:report(ctx, 200, 0.004))
  local ok, again = up:report(ctx, 200, 0.004)
  t.eq(ok, nil, "second report")
  t.contains(again, "no live pick", "second report")
end
t.eq(seen["10.0.0.1:8001"], 10, "picks of a")
t.eq(seen["10.0.0.2:8002"], 10, "picks of b")
t.eq(seen["[2001:db8::7]:8003"], 10, "picks of c (IPv6 in brackets, for set_current_peer)")

-- A retry excludes the peers tried: three tries reach three peers, the fourth fails.
local ctx = {}
local ids = {}
for try = 1, 3 do
  local host, port, err = up:pick(nil, ctx)
  assert(host, err)
  t.eq(up:tries(ctx), try, "tries")
  local id = up:peer_id(ctx)
  assert(not ids[id], "peer " .. id .. " picked twice for one request")
  ids[id] = true
  -- The first try is reported by hand, the second left live: the next pick ends it.
  if try == 1 then assert(up:report(ctx, 502, 0.01)) end
end
local host, port, err = up:pick(nil, ctx)
t.eq(host, nil, "fourth pick")
t.eq(port, nil, "fourth pick port")
t.eq(err, "upstream api: all available peers already tried", "fourth pick error")
t.eq(up:tries(ctx), 3, "a failed pick is not a try")
-- Asking again ended the third try as failed, as a retry in nginx would.
t.eq(select(2, up:report(ctx, 200, 0.02)), "resty.dynup: no live pick to report", "third try ended")

-- A pick never reported is cancelled by hand; nothing stays in flight.
ctx = {}
assert(up:pick(nil, ctx))
assert(up:cancel(ctx))
t.eq(select(2, up:cancel(ctx)), "resty.dynup: no live pick to cancel", "second cancel")
local status = up:status()
t.contains(status, '{"name":"api","source":"file://' .. path .. '"', "status")
t.eq(t.count(status, '"in_flight":0'), 3, "in flight after every pick ended")

-- Live picks show in the status.
local live = { {}, {} }
assert(up:pick(nil, live[1]))
assert(up:pick(nil, live[2]))
t.eq(t.count(up:status(), '"in_flight":1'), 2, "two live picks")
assert(up:report(live[1], 0, 1.5, true))
assert(up:report(live[2], 404, 0.001))
t.eq(t.count(up:status(), '"in_flight":0'), 3, "in flight after the reports")

-- Outside nginx the request state is required.
local h2, p2, e2 = up:pick("k")
t.eq(h2, nil, "pick without ctx outside nginx")
t.contains(e2, "pass the request's state table", "pick without ctx")

-- Keys reach ring_hash: one key, one peer.
local ring = assert(dynup.new({name = "ring", source = "file://" .. path, policy = "ring_hash"}, {lib = t.lib}))
local first
for _ = 1, 20 do
  local c = {}
  local h = assert(ring:pick("user-42", c))
  first = first or h
  t.eq(h, first, "ring_hash with one key")
  assert(ring:report(c, 200, 0.001))
end
ring:close()

-- close(): idempotent; later calls say so instead of crashing.
up:close()
up:close()
t.eq(dynup.get("api"), nil, "unregistered on close")
local h3, _, e3 = up:pick(nil, {})
t.eq(h3, nil, "pick after close")
t.eq(e3, "resty.dynup: upstream api is closed", "pick after close")
t.contains(up:status(), "is closed", "status after close")

t.remove_dir(dir, {"peers.json"})
print("pick_report_test: ok")
