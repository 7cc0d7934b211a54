-- resty.dynup under plain LuaJIT, against its callers' mistakes: every wrong argument
-- comes back as nil and a message naming it, and none leaves a pick live.
local t = dofile((arg[0]:match("^(.*)/") or ".") .. "/helpers.lua")
local dynup = require "resty.dynup"

local dir = t.temp_dir()
local path = dir .. "/peers.json"
local peers = {}
for i, id in ipairs({"a", "b", "c"}) do
  peers[i] = string.format('{"id":"%s","host":"10.0.0.%d","port":%d}', id, i, 8000 + i)
end
t.write_file(path, '{"peers":[' .. table.concat(peers, ",") .. ']}')

local up = assert(dynup.new({name = "api", source = "file://" .. path,
                             health = {passive = {max_fails = 1, fail_statuses = {502}}}}, {lib = t.lib}))

local function in_flight_total()
  local n = 0
  for v in up:status():gmatch('"in_flight":(%d+)') do n = n + tonumber(v) end
  return n
end

local function peer_reason(id)
  return up:status():match('"id":"' .. id .. '".-"reason":"([^"]*)"')
end

-- $upstream_status text: the last try's status counts.
local ctx = {}
assert(up:pick(nil, ctx))
local first = up:peer_id(ctx)
t.eq(up:report(ctx, "502, 200"), true, "report of \"502, 200\"")
t.eq(peer_reason(first), "healthy", "after \"502, 200\" the peer answered 200")
ctx = {}
assert(up:pick(nil, ctx))
local second = up:peer_id(ctx)
t.eq(up:report(ctx, "200 : 502"), true, "report of \"200 : 502\"")
assert(t.wait_until(function() return peer_reason(second):find("^passive") end),
       "after \"200 : 502\" the peer's 502 counts: " .. up:status())
-- "-": no status (the client left first): the pick ends without an outcome.
ctx = {}
assert(up:pick(nil, ctx))
local third = up:peer_id(ctx)
t.eq(up:report(ctx, "-"), true, "report of \"-\"")
t.eq(peer_reason(third), "healthy", "\"-\" is no failure")
t.eq(in_flight_total(), 0, "in flight after the text statuses")

-- Wrong statuses and latencies: nil and why, and the pick has ended all the same.
local bad_reports = {
  {{"abc"}, "status must be an HTTP status"},
  {{{}}, "got a table"},
  {{200.5}, "got the number 200.5"},
  {{1e10}, "status must be"},
  {{-1}, "status must be"},
  {{""}, "got a string \"\""},
  {{200, "slow"}, "latency must be seconds"},
  {{200, {}}, "latency must be seconds"},
}
for _, case in ipairs(bad_reports) do
  local args, says = case[1], case[2]
  ctx = {}
  assert(up:pick(nil, ctx))
  t.eq(in_flight_total(), 1, "a live pick before the bad report")
  local ok, err = up:report(ctx, args[1], args[2])
  t.eq(ok, nil, "report(" .. tostring(args[1]) .. ", " .. tostring(args[2]) .. ")")
  t.contains(err, says, "its message")
  t.eq(in_flight_total(), 0, "no pick live after report(" .. tostring(args[1]) .. ")")
  t.eq(select(2, up:report(ctx, 200)), "resty.dynup: no live pick to report", "the pick has ended")
  -- The state can pick again: nothing is wedged.
  assert(up:pick(nil, ctx))
  assert(up:report(ctx, 200, "0.004")) -- a latency as text, as $upstream_response_time is
end
t.eq(in_flight_total(), 0, "in flight after the bad reports")

-- A request state that is not a table: a message, never "attempt to index".
local ok, err = up:report(502)
t.eq(ok, nil, "report(502)")
t.contains(err, "ctx must be the request's state table", "report(502)")
local host, port
host, port, err = up:pick("k", 5)
t.eq(host, nil, "pick with a number for ctx")
t.contains(err, "request's state must be a table", "pick with a number for ctx")

-- balance() belongs to balancer_by_lua.
ok, err = up:balance("k", 2)
t.eq(ok, nil, "balance() outside nginx")
t.contains(err, "balance() must be called in balancer_by_lua*", "balance() outside nginx")

-- An unknown name: nil and why, from get() and from the module's balance/report.
local none, why = dynup.get("nope")
t.eq(none, nil, "get of an unknown name")
t.contains(why, 'no upstream named "nope"', "get of an unknown name")
ok, err = dynup.report("nope", {}, 200)
t.eq(ok, nil, "dynup.report of an unknown name")
t.contains(err, 'no upstream named "nope"', "dynup.report of an unknown name")
ok, err = dynup.balance("nope")
t.eq(ok, nil, "dynup.balance outside nginx")
t.contains(err, "must be called in balancer_by_lua*", "dynup.balance outside nginx")
ctx = {}
assert(dynup.get("api"):pick(nil, ctx))
t.eq(dynup.report("api", ctx, "200"), true, "dynup.report of a known name")

-- A library without dynup's symbols: nil and why from every entry point.
local not_dynup = "libm.so.6"
local checks = {
  {"new", function() return dynup.new({name = "x", source = "file://" .. path}, {lib = not_dynup}) end},
  {"check", function() return dynup.check({name = "x", source = "file://" .. path}, {lib = not_dynup}) end},
  {"version", function() return dynup.version(not_dynup) end},
  {"peer_id_hash", function() return dynup.peer_id_hash("a", not_dynup) end},
}
for _, c in ipairs(checks) do
  local called, res, msg = pcall(c[2])
  assert(called, c[1] .. " raised: " .. tostring(res))
  t.eq(res, nil, c[1] .. " with " .. not_dynup)
  t.contains(msg, '"libm.so.6" is not dynup\'s C library', c[1] .. " with " .. not_dynup)
  t.contains(msg, "undefined symbol: dynup_abi_version", c[1] .. " with " .. not_dynup)
end

-- A NUL in a name would cut the C library's message at it: refused whole, with the path.
local made
made, err = dynup.new({name = "a\0b", source = "file://" .. path}, {lib = t.lib})
t.eq(made, nil, "a name with a NUL")
t.eq(err, "resty.dynup.new: upstream.name: contains a NUL byte (a\\0b): no dynup setting accepts one", "its message")
made, err = dynup.new('{"name":"a\\u0000b","source":"file://' .. path .. '"}', {lib = t.lib})
t.eq(made, nil, "JSON with \\u0000")
t.contains(err, "\\u0000 at byte 11", "JSON with \\u0000")
made, err = dynup.new('{"name":"a\0b"}', {lib = t.lib})
t.eq(made, nil, "JSON with a raw NUL")
t.contains(err, "a NUL byte at byte 11", "JSON with a raw NUL")
-- An escaped backslash before u0000 is no NUL: the library reads (and refuses) the name.
made, err = dynup.new('{"name":"a\\\\u0000b","source":"file://' .. path .. '"}', {lib = t.lib})
t.eq(made, nil, "a name with a backslash")
t.contains(err, 'upstream.name: "a\\u0000b" must be', "a name with a backslash")

-- check(): the same messages as new(), and nothing started: a missing file is no error.
t.eq(dynup.check({name = "x", source = "file://" .. dir .. "/absent.json"}, {lib = t.lib}), true, "a good config")
t.eq(dynup.check('{"name":"x","source":"file:///absent.json"}', {lib = t.lib}), true, "a good JSON config")
ok, err = dynup.check({name = "x", source = "file://" .. path, watch = {wait_ms = 5}}, {lib = t.lib})
t.eq(ok, nil, "a bad config")
t.eq(err, "upstream.watch.wait_ms: expected an integer 10..600000, got 5", "a bad config's message")
ok, err = dynup.check({name = "x", source = "file://" .. path, policy = "fastest"}, {lib = t.lib})
t.eq(ok, nil, "an unknown policy")
t.contains(err, "upstream.policy", "an unknown policy")
ok, err = dynup.check('{"name":"x"', {lib = t.lib})
t.eq(ok, nil, "bad JSON")
t.contains(err, "upstream: invalid JSON", "bad JSON")
ok, err = dynup.check(42, {lib = t.lib})
t.eq(ok, nil, "a number for a config")
t.contains(err, "resty.dynup.check: the config must be a table or a JSON string", "a number for a config")

up:close()
t.remove_dir(dir, {"peers.json"})
print("caller_mistakes_test: ok")
