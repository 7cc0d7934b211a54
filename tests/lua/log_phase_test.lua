-- resty.dynup as nginx drives it, under plain LuaJIT with a stand-in `ngx`: pick in the
-- balancer phase, report() with no arguments in the log phase (the outcome read from
-- the $upstream_* variables), retries, and the reuse of a finished request's state by
-- the next request (report() in log_by_lua hands it back to the upstream's pool).
local t = dofile((arg[0]:match("^(.*)/") or ".") .. "/helpers.lua")

-- The stand-in: the phase, the current request (`r` for the ngx_http_request_t that
-- resty.core's get_request() returns, its ngx.ctx and its start time), its variables and
-- status, and what get_last_failure() says: nil on a request's first try.
local phase, current, vars, last_failure = "init_worker", nil, {}, nil
local ctx_reads, var_reads, clock, failure_calls = 0, {}, 1000, 0
-- What balance() hands to nginx: set_current_peer's arguments, set_more_tries' count,
-- ngx.exit's code and ngx.log's messages; set_current_peer fails while `refuse_peer`.
local balancer_calls, refuse_peer = {}, false
local function record(entry) balancer_calls[#balancer_calls + 1] = entry end
ngx = setmetatable({
  ERR = 4,
  ERROR = -1,
  log = function(_, ...) record("log " .. table.concat({...})) end,
  exit = function(code) record("exit " .. code) end,
  get_phase = function() return phase end,
  req = { start_time = function() return current.started end },
  var = setmetatable({}, { __index = function(_, k)
    var_reads[k] = (var_reads[k] or 0) + 1
    return vars[k]
  end }),
  status = 200,
}, { __index = function(_, k)
  if k == "ctx" then
    ctx_reads = ctx_reads + 1
    return current.ctx
  end
end })
package.preload["resty.core.base"] = function()
  return { get_request = function() return current.r end }
end
package.preload["ngx.balancer"] = function()
  return {
    get_last_failure = function()
      failure_calls = failure_calls + 1
      if last_failure == nil then return nil end
      return last_failure, 502
    end,
    set_current_peer = function(host, port)
      if refuse_peer then return nil, "no resolver defined to resolve \"" .. host .. "\"" end
      record("peer " .. host .. ":" .. port)
      return true
    end,
    set_more_tries = function(n) record("more_tries " .. n) return true end,
  }
end

local dynup = require "resty.dynup"
local dir = t.temp_dir()
local path = dir .. "/peers.json"
t.write_file(path, [[{"peers":[
  {"id":"a","host":"10.0.0.1","port":8001},
  {"id":"b","host":"10.0.0.2","port":8002}]}]])
-- Passive checks off: the failures reported below would take the peers down.
local up = assert(dynup.new({name = "api", source = "file://" .. path, health = {passive = {max_fails = 0}}},
                            {lib = t.lib}))

local function request()
  clock = clock + 0.001
  current, phase, ngx.status, last_failure = {r = {}, ctx = {}, started = clock}, "balancer", 200, nil
  return current
end
-- nginx tries the next peer: balancer_by_lua runs again after a failed try.
local function retry(v)
  phase, vars, last_failure = "balancer", v, "failed"
end
local function log_phase(v)
  phase, vars = "log", v
end
local ok_vars = {upstream_connect_time = "0.001", upstream_header_time = "0.002",
                 upstream_response_time = "0.003", upstream_status = "200"}

-- One request: pick, then report in log_by_lua. The state stays readable in the handler.
local a = request()
local host = assert(up:pick())
local a_state = up._by_request[a.r]
assert(a_state, "the state is filed under the request")
t.eq(up:tries(), 1, "tries")
local id = up:peer_id()
log_phase(ok_vars)
var_reads = {}
t.eq(up:report(), true, "report in the log phase")
t.eq(var_reads.upstream_status, 1, "$upstream_status read once")
t.eq(var_reads.upstream_response_time, nil, "round_robin uses no latency: $upstream_response_time not read")
t.eq(up:tries(), 1, "tries after report, same handler")
t.eq(up:peer_id(), id, "peer_id after report, same handler")
t.eq(select(2, up:report()), "resty.dynup: no live pick to report", "second report")
local _, _, err = up:pick()
t.eq(err, "resty.dynup: this request's pick was already reported in log_by_lua", "pick after the log phase")
t.contains(host, "10.0.0.", "host")

-- The next request reuses that state, reset: one try, nothing excluded. Its retry
-- reports the first try as a refused connection and goes to the other peer; a third
-- try has no peer left.
local b = request()
assert(up:pick())
t.eq(up._by_request[b.r], a_state, "the finished request's state is reused")
t.eq(up._by_request[a.r], nil, "and no longer filed under the request that finished")
t.eq(up:tries(), 1, "tries of the reused state")
local first = up:peer_id()
retry({upstream_connect_time = "-", upstream_header_time = "-", upstream_response_time = "0.000",
       upstream_status = "502"})
assert(up:pick())
t.eq(up:tries(), 2, "tries after a retry")
assert(up:peer_id() ~= first, "the retry excludes the peer tried")
retry({upstream_connect_time = "-, -", upstream_header_time = "-, -", upstream_response_time = "0.000, 0.000",
       upstream_status = "502, 502"})
_, _, err = up:pick()
t.eq(err, "upstream api: all available peers already tried", "third try")
-- nginx answers 502 from balancer_by_lua: both tries already ended, nothing to report.
log_phase({upstream_connect_time = "-, -", upstream_header_time = "-, -", upstream_response_time = "0.000, 0.000",
           upstream_status = "502, 502"})
t.eq(select(2, up:report()), "resty.dynup: no live pick to report", "report after the last try failed")

-- A retried request whose second try answered.
request()
failure_calls = 0
assert(up:pick())
retry({upstream_connect_time = "-", upstream_header_time = "-", upstream_response_time = "0.000",
       upstream_status = "502"})
assert(up:pick())
t.eq(failure_calls, 2, "get_last_failure() asked once per pick")
log_phase({upstream_connect_time = "-, 0.001", upstream_header_time = "-, 0.002",
           upstream_response_time = "0.000, 0.004", upstream_status = "502, 200"})
t.eq(up:report(), true, "report of a retried request")

-- A connection refused, a reply that never came, a client that left: each ends the pick.
for _, v in ipairs({
  {upstream_connect_time = "-", upstream_header_time = "-", upstream_response_time = "0.000", upstream_status = "502"},
  {upstream_connect_time = "0.001", upstream_header_time = "-", upstream_response_time = "1.000", upstream_status = "504"},
}) do
  request()
  assert(up:pick())
  log_phase(v)
  t.eq(up:report(), true, "report of a failed try")
end
request()
assert(up:pick())
ngx.status = 499
log_phase({upstream_connect_time = "0.001", upstream_header_time = "-", upstream_response_time = "0.500",
           upstream_status = "-"})
t.eq(up:report(), true, "a client that left")
t.eq(t.count(up:status(), '"in_flight":0'), 2, "nothing in flight")

-- 300 requests in flight at once, then all logged: the pool keeps at most 256 states,
-- and every pick ended.
local ctxs = {}
for i = 1, 300 do
  ctxs[i] = request()
  assert(up:pick())
end
t.eq(t.count(up:status(), '"in_flight":150'), 2, "300 picks in flight")
for i = 1, 300 do
  current = ctxs[i]
  log_phase(ok_vars)
  assert(up:report())
end
t.eq(up._pooled, 256, "pool size")
t.eq(t.count(up:status(), '"in_flight":0'), 2, "all 300 ended")

t.eq(ctx_reads, 0, "balancer_by_lua and log_by_lua never touched ngx.ctx")

-- A request that ended without log_by_lua (a subrequest) leaves its live pick filed
-- under its request; the next request nginx puts at that address cancels it on its
-- first try instead of taking it for a retry. An internal redirect that proxies again
-- looks the same (one request, a new first try).
a, b, ctxs, a_state = nil, nil, nil, nil
local r = request()
assert(up:pick())
t.eq(t.count(up:status(), '"in_flight":1'), 1, "one pick in flight")
current, phase, last_failure = r, "balancer", nil
assert(up:pick())
t.eq(up:tries(), 1, "a first try again, not a retry")
t.eq(t.count(up:status(), '"in_flight":1'), 1, "the abandoned pick was cancelled, only the new one is in flight")
log_phase(ok_vars)
assert(up:report())
t.eq(t.count(up:status(), '"in_flight":0'), 2, "nothing in flight")

-- The next request at that address that never picks (no proxy_pass in its location)
-- but reports in log_by_lua does not end the abandoned pick: it started at another time.
r = request()
assert(up:pick())
current = {r = r.r, ctx = {}, started = clock + 1}
log_phase(ok_vars)
t.eq(select(2, up:report()), "resty.dynup: no live pick to report", "no pick of its own to report")
t.eq(up:tries(), 0, "no tries of its own")
t.eq(t.count(up:status(), '"in_flight":1'), 1, "the abandoned pick is left to the next first try")
phase, last_failure = "balancer", nil
assert(up:pick())
t.eq(t.count(up:status(), '"in_flight":1'), 1, "which cancelled it")
log_phase(ok_vars)
assert(up:report())
t.eq(t.count(up:status(), '"in_flight":0'), 2, "nothing in flight")

-- A pick outside balancer_by_lua keeps its state in ngx.ctx; log_by_lua finds it there.
request()
phase = "access"
assert(up:pick())
t.eq(up:tries(), 1, "tries of a pick in the access phase")
log_phase(ok_vars)
t.eq(up:report(), true, "report of a pick made in the access phase")
t.eq(t.count(up:status(), '"in_flight":0'), 2, "nothing in flight")

-- Such a request dropped while its pick is live (an internal redirect clears ngx.ctx):
-- the collector cancels the pick, even on a state that came from the pool.
request()
phase = "access"
assert(up:pick())
current.ctx = {}
collectgarbage()
collectgarbage()
t.eq(t.count(up:status(), '"in_flight":0'), 2, "a dropped pick is cancelled")

-- balance(): pick and set_current_peer in one call; set_more_tries on the first try
-- only; a retry goes to the peer not tried yet; no peer left: logged, NO_LIVE_UPSTREAMS.
request()
balancer_calls = {}
t.eq(up:balance(nil, 2), true, "balance")
local first_peer = balancer_calls[2]
t.eq(balancer_calls[1], "more_tries 2", "set_more_tries on the first try")
t.contains(first_peer, "peer 10.0.0.", "set_current_peer with the pick")
t.eq(#balancer_calls, 2, "nothing else")
retry({upstream_connect_time = "-", upstream_header_time = "-", upstream_response_time = "0.000",
       upstream_status = "502"})
balancer_calls = {}
t.eq(up:balance(nil, 2), true, "balance on a retry")
t.eq(#balancer_calls, 1, "no set_more_tries on a retry")
assert(balancer_calls[1] ~= first_peer and balancer_calls[1]:find("peer 10.0.0.", 1, true), "the other peer")
retry({upstream_connect_time = "-, -", upstream_header_time = "-, -", upstream_response_time = "0.000, 0.000",
       upstream_status = "502, 502"})
balancer_calls = {}
up:balance(nil, 2)
t.eq(balancer_calls[1], "log upstream api: all available peers already tried", "no peer left: logged")
t.eq(balancer_calls[2], "exit " .. dynup.NO_LIVE_UPSTREAMS, "and NO_LIVE_UPSTREAMS")
t.eq(t.count(up:status(), '"in_flight":0'), 2, "every try ended")
-- set_current_peer refusing the address (a name with no resolver): the pick is cancelled.
request()
refuse_peer, balancer_calls = true, {}
up:balance()
refuse_peer = false
t.contains(balancer_calls[1], "log resty.dynup: set_current_peer(10.0.0.", "a refused address is logged")
t.eq(balancer_calls[2], "exit " .. ngx.ERROR, "and the balancer ends with ngx.ERROR")
t.eq(t.count(up:status(), '"in_flight":0'), 2, "its pick was cancelled")

up:close()

-- A policy that uses latency (ewma) gets it from $upstream_response_time.
local lat = assert(dynup.new({name = "lat", source = "file://" .. path, policy = "ewma"}, {lib = t.lib}))
request()
assert(lat:pick())
log_phase(ok_vars)
var_reads = {}
t.eq(lat:report(), true, "report with ewma")
t.eq(var_reads.upstream_response_time, 1, "ewma: $upstream_response_time read")
t.eq(t.count(lat:status(), '"ewma_ms":3.0'), 1, "the 3 ms latency reached the picked peer's EWMA")
lat:close()
t.remove_dir(dir, {"peers.json"})
print("log_phase_test: ok")
