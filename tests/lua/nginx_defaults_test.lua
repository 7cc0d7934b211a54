-- resty.dynup gives a config table nginx's behaviour where the library's defaults differ
-- (no panic, round_robin in nginx's sequence, a start that does not wait on the
-- registry), keeps what the table sets, and leaves the caller's table as it was. Then
-- the effect: with every peer failed, a pick finds none, as nginx's "no live upstreams".
local t = dofile((arg[0]:match("^(.*)/") or ".") .. "/helpers.lua")
local dynup = require "resty.dynup"

local d = dynup.with_nginx_defaults({name = "api", source = "file:///x.json"})
t.eq(d.health.panic.threshold_percent, 0, "panic off")
t.eq(d.policy.name, "round_robin", "round_robin")
t.eq(d.policy.options.sequence, "nginx", "nginx's sequence")
t.eq(d.watch.initial, "background", "no wait on the registry")

local mine = {name = "api", source = "file:///x.json", policy = {name = "round_robin", options = {start = 0}},
              health = {panic = {threshold_percent = 50}, passive = {max_fails = 2}},
              watch = {strong_dependency = true, wait_ms = 1000}}
d = dynup.with_nginx_defaults(mine)
t.eq(d.health.panic.threshold_percent, 50, "panic kept")
t.eq(d.health.passive.max_fails, 2, "passive kept")
t.eq(d.policy.options.start, 0, "start kept")
t.eq(d.policy.options.sequence, "nginx", "sequence added beside start")
t.eq(d.watch.initial, nil, "strong_dependency keeps the wait")
t.eq(d.watch.wait_ms, 1000, "wait_ms kept")
t.eq(mine.policy.options.sequence, nil, "the caller's table is untouched")
t.eq(dynup.with_nginx_defaults({policy = "ewma"}).policy, "ewma", "other policies as they are")

local dir = t.temp_dir()
local path = dir .. "/peers.json"
t.write_file(path, '["10.0.0.1:80", "10.0.0.2:80"]')
local up = assert(dynup.new({name = "nginx-defaults", source = "file://" .. path}, {lib = t.lib}))
for i = 1, 2 do
  local ctx = {}
  assert(up:pick(nil, ctx))
  assert(up:report(ctx, 0, 0.001, true)) -- connect failures: max_fails 1 takes each out
end
local host, _, err = up:pick(nil, {})
t.eq(host, nil, "every peer down: no pick, no panic routing")
t.contains(err, "all peers unavailable", "why")
up:close()
t.remove_dir(dir, {"peers.json"})
print("nginx_defaults_test: ok")
