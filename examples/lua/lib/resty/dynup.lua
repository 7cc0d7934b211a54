-- resty.dynup: dynup upstreams for OpenResty's balancer_by_lua, over LuaJIT's FFI and
-- libdynup_c (include/dynup/c/dynup.h). Peers come from a registry or a file, watched by
-- dynup's own threads: nothing polls from Lua and nothing is decoded per request.
--
--   init_by_lua_block { dynup = require "resty.dynup" }   -- a global: no require per request
--   init_worker_by_lua_block {   -- one handle per worker: never in init_by_lua (the master)
--       assert(dynup.new({name = "api", source = "file:///etc/dynup/api.json"}))
--   }
--   balancer_by_lua_block { dynup.balance("api", ngx.var.http_x_key, 2) }
--   log_by_lua_block { dynup.report("api") }
--
-- balance() is pick() + ngx.balancer.set_current_peer (+ set_more_tries on the first try,
-- + ngx.exit(NO_LIVE_UPSTREAMS) when no peer is left); pick() alone gives host and port.
--
-- A pick lives from balancer_by_lua to log_by_lua, filed under the request. When nginx retries
-- (proxy_next_upstream), balancer_by_lua runs again: pick() first reports the failed try
-- (ngx.balancer.get_last_failure and the $upstream_* variables), then picks a peer not
-- tried yet. Outside nginx every method takes the request's state as an explicit table.
local ffi = require "ffi"

local C_ABI_VERSION = 1
local ERR_LEN = 512

local ok_cdef, cdef_err = pcall(ffi.cdef, [[
typedef struct dynup_upstream dynup_upstream;
typedef struct dynup_selection {
  uint64_t id_hash;
  uint16_t port;
  uint16_t host_len;
  uint16_t peer_id_len;
  uint16_t reserved_;
  char host[256];
  char peer_id[264];
  uint64_t opaque_[16];
} dynup_selection;
const char* dynup_version(void);
int dynup_abi_version(void);
size_t dynup_selection_size(void);
const char* dynup_strerror(int rc);
dynup_upstream* dynup_upstream_new(const char* json_config, char* err, size_t err_len);
int dynup_config_check(const char* json_config, char* err, size_t err_len);
void dynup_upstream_free(dynup_upstream* up);
int dynup_pick(dynup_upstream* up, const char* key, size_t key_len, const uint64_t* exclude_id_hashes,
               size_t n_exclude, dynup_selection* out, char* err, size_t err_len);
int dynup_report(dynup_upstream* up, dynup_selection* sel, int status, int64_t latency_us, int connect_failure);
int dynup_report_try(dynup_upstream* up, dynup_selection* sel, int status, int64_t latency_us, unsigned flags);
void dynup_cancel(dynup_upstream* up, dynup_selection* sel);
size_t dynup_status(dynup_upstream* up, char* buf, size_t len);
int dynup_uses_latency(dynup_upstream* up);
uint64_t dynup_peer_id_hash(const char* id, size_t len);
]])
if not ok_cdef and not tostring(cdef_err):find("redefine", 1, true) then
  error(cdef_err)
end

local ffi_new, ffi_string, ffi_gc, ffi_copy, ffi_cast = ffi.new, ffi.string, ffi.gc, ffi.copy, ffi.cast
local type, tostring, tonumber, pairs, ipairs, setmetatable = type, tostring, tonumber, pairs, ipairs, setmetatable
local concat, sort, floor, huge, find = table.concat, table.sort, math.floor, math.huge, string.find
local ngx = rawget(_G, "ngx") -- nil in plain LuaJIT

local _M = { _VERSION = "0.1.0" }

-- What balancer_by_lua hands to ngx.exit when pick() finds no peer: NGX_BUSY, which
-- nginx answers like its own "no live upstreams" (502). ngx.exit(502) or ngx.ERROR
-- there would make a 500 on a stock nginx.
_M.NO_LIVE_UPSTREAMS = -3

-- Encodes as [] where an empty table would encode as {} (e.g. fail_statuses).
_M.empty_array = setmetatable({}, { __tostring = function() return "resty.dynup.empty_array" end })

local errbuf = ffi_new("char[?]", ERR_LEN)
-- Finished request states kept per upstream for reuse (see Upstream:report): at most
-- this many.
local POOL_MAX = 256
local status_len = 4096
local status_buf = ffi_new("char[?]", status_len)
local libs = {} -- path -> loaded library
local registry = {} -- name -> the latest upstream made in this Lua VM (one per nginx worker)

local Upstream = {}
Upstream.__index = Upstream

-- The library: opts.lib, else $DYNUP_C_LIB (nginx keeps it only with `env DYNUP_C_LIB;`),
-- else libdynup_c.so through the dynamic loader's search path.
local function load_lib(path)
  path = path or os.getenv("DYNUP_C_LIB") or "dynup_c"
  local lib = libs[path]
  if lib then return lib end
  local ok, loaded = pcall(ffi.load, path)
  if not ok then
    return nil, "resty.dynup: cannot load the dynup C library \"" .. path .. "\": " .. tostring(loaded)
  end
  -- A library without dynup's symbols raises on the first lookup: say so instead.
  local has_abi, abi, size = pcall(function() return loaded.dynup_abi_version(), loaded.dynup_selection_size() end)
  if not has_abi then
    local why = tostring(abi):gsub("^[^:]*:%d+: ", "") -- without the position in this file
    return nil, "resty.dynup: \"" .. path .. "\" is not dynup's C library (libdynup_c.so): " .. why
  end
  if abi ~= C_ABI_VERSION or tonumber(size) ~= ffi.sizeof("dynup_selection") then
    return nil, "resty.dynup: " .. path .. " has C ABI " .. abi .. ", this module speaks " .. C_ABI_VERSION
  end
  libs[path] = loaded
  return loaded
end

-- JSON for a config table: objects with string keys (sorted), arrays 1..n, strings,
-- finite numbers, booleans, and _M.empty_array. Errors name the path, like dynup's own.
local function json_string(s)
  return '"' .. s:gsub('[%c"\\]', function(c)
    if c == '"' then return '\\"' end
    if c == "\\" then return "\\\\" end
    return string.format("\\u%04x", c:byte())
  end) .. '"'
end

-- No dynup setting takes a NUL byte, and the C library's messages, NUL-terminated,
-- would end at one: refused here with the path, before the C library quotes it.
local function nul_error(path, s)
  return path .. ": contains a NUL byte (" .. s:gsub("%z", "\\0") .. "): no dynup setting accepts one"
end

local function encode(v, path, out, depth)
  local t = type(v)
  if t == "string" then
    if find(v, "\0", 1, true) then error(nul_error(path, v), 0) end
    out[#out + 1] = json_string(v)
  elseif t == "number" then
    if v ~= v or v == huge or v == -huge then error(path .. ": not a finite number", 0) end
    if v == floor(v) and v >= -2 ^ 53 and v <= 2 ^ 53 then
      out[#out + 1] = string.format("%d", v)
    else
      out[#out + 1] = string.format("%.17g", v)
    end
  elseif t == "boolean" then
    out[#out + 1] = tostring(v)
  elseif t == "table" then
    if depth > 32 then error(path .. ": nested too deeply", 0) end
    if v == _M.empty_array then
      out[#out + 1] = "[]"
      return
    end
    local n, count = #v, 0
    for _ in pairs(v) do count = count + 1 end
    if n > 0 and count == n then
      out[#out + 1] = "["
      for i = 1, n do
        if i > 1 then out[#out + 1] = "," end
        encode(v[i], path .. "[" .. (i - 1) .. "]", out, depth + 1)
      end
      out[#out + 1] = "]"
      return
    end
    local keys = {}
    for k in pairs(v) do
      if type(k) ~= "string" then error(path .. ": a key is a " .. type(k) .. ", not a string", 0) end
      if find(k, "\0", 1, true) then error(nul_error(path .. "." .. k, k), 0) end
      keys[#keys + 1] = k
    end
    sort(keys)
    out[#out + 1] = "{"
    for i, k in ipairs(keys) do
      if i > 1 then out[#out + 1] = "," end
      out[#out + 1] = json_string(k)
      out[#out + 1] = ":"
      encode(v[k], path .. "." .. k, out, depth + 1)
    end
    out[#out + 1] = "}"
  else
    error(path .. ": cannot encode a " .. t, 0)
  end
end

-- Why a JSON config text cannot go to the C library, or nil: a raw NUL would cut it, a
-- \u0000 escape would cut the message naming it (an odd run of backslashes escapes the u).
local function json_nul(json)
  local at = find(json, "\0", 1, true)
  if at then return "the JSON config holds a NUL byte at byte " .. at end
  for slashes, pos in json:gmatch("(\\+)u0000()") do
    if #slashes % 2 == 1 then
      return "the JSON config holds \\u0000 at byte " .. (pos - 6) .. ": no dynup setting accepts a NUL"
    end
  end
  return nil
end

--- Encodes a config table as dynup's JSON (exposed for tests and for logging it).
function _M.encode_config(cfg)
  local out = {}
  local ok, err = pcall(encode, cfg, "upstream", out, 0)
  if not ok then return nil, err end
  return concat(out)
end

-- A config table with nginx's behaviour where the library's defaults differ and the
-- table says nothing (examples/nginx/README.md, "nginx behaviour"): no panic routing,
-- round_robin in nginx's own sequence, and a start that does not wait on the registry
-- (watch.initial = "background"). A copy: the caller's table is left as it is.
local function with_nginx_defaults(cfg)
  local copy = {}
  for k, v in pairs(cfg) do copy[k] = v end
  local health = type(copy.health) == "table" and copy.health or nil
  if copy.health == nil or (health and (health.panic == nil
      or (type(health.panic) == "table" and health.panic.threshold_percent == nil))) then
    local h = {}
    for k, v in pairs(health or {}) do h[k] = v end
    local panic = {}
    for k, v in pairs(type(h.panic) == "table" and h.panic or {}) do panic[k] = v end
    panic.threshold_percent = 0
    h.panic = panic
    copy.health = h
  end
  -- init_worker_by_lua must not wait on the registry: serve the snapshot (or nothing)
  -- at once and fetch on dynup's thread.
  local watch = type(copy.watch) == "table" and copy.watch or nil
  if copy.watch == nil or (watch and watch.initial == nil and watch.strong_dependency == nil) then
    local w = {}
    for k, v in pairs(watch or {}) do w[k] = v end
    w.initial = "background"
    copy.watch = w
  end
  local policy = copy.policy
  if policy == nil or policy == "round_robin" then
    copy.policy = { name = "round_robin", options = { sequence = "nginx" } }
  elseif type(policy) == "table" and policy.name == "round_robin"
      and (policy.options == nil or (type(policy.options) == "table" and policy.options.sequence == nil)) then
    local options = {}
    for k, v in pairs(policy.options or {}) do options[k] = v end
    options.sequence = "nginx"
    copy.policy = { name = "round_robin", options = options }
  end
  return copy
end
_M.with_nginx_defaults = with_nginx_defaults

-- The JSON text of a config table or string and the library `opts` names, or nil and
-- why (a config's reason prefixed with `fn`).
local function config_and_lib(cfg, opts, fn)
  local json, err
  if type(cfg) == "string" then
    json, err = cfg, json_nul(cfg)
  elseif type(cfg) == "table" then
    json, err = _M.encode_config(with_nginx_defaults(cfg))
  else
    err = "the config must be a table or a JSON string, got a " .. type(cfg)
  end
  if err then return nil, fn .. ": " .. err end
  local lib
  lib, err = load_lib((opts or {}).lib)
  if not lib then return nil, err end
  return json, lib
end

--- Checks a config (a table or a JSON string) as new() reads it, with the same messages,
--- but starts nothing: no thread, no I/O. Returns true, or nil and the reason naming
--- the JSON path. For a check before nginx starts (`nginx -t` runs no init_worker_by_lua):
--- `luajit -e 'assert(require("resty.dynup").check(dofile("/etc/nginx/api.lua")))'`.
function _M.check(cfg, opts)
  local json, lib = config_and_lib(cfg, opts, "resty.dynup.check")
  if not json then return nil, lib end
  local has_fn, rc = pcall(function() return lib.dynup_config_check(json, errbuf, ERR_LEN) end)
  if not has_fn then return nil, "resty.dynup.check: the loaded dynup C library predates dynup_config_check" end
  if rc ~= 0 then return nil, ffi_string(errbuf) end
  return true
end

--- Starts an upstream: `cfg` is a table or a JSON string (docs/UPSTREAM.md), `opts.lib`
--- the path of libdynup_c.so. Returns the upstream, or nil and the reason (a config
--- error names its JSON path). A table config does not wait on the registry (see
--- with_nginx_defaults); a JSON string with watch.initial "wait" blocks until the first
--- fetch ends. In nginx, call
--- it in init_worker_by_lua: each worker needs its own handle. The upstream is also
--- registered under its name for get().
function _M.new(cfg, opts)
  local json, lib = config_and_lib(cfg, opts, "resty.dynup.new")
  if not json then return nil, lib end

  local owner = lib.dynup_upstream_new(json, errbuf, ERR_LEN)
  if owner == nil then return nil, ffi_string(errbuf) end
  -- Finalizers run in any order at lua_close, so no finalizer may touch the handle after
  -- it is freed: picks reach it through `box`, which the handle's finalizer empties first.
  -- `box` holds a non-owning copy of the pointer, so picks do not keep the handle alive.
  local box = { h = ffi_cast("dynup_upstream*", owner) }
  ffi_gc(owner, function(h)
    box.h = nil
    lib.dynup_upstream_free(h)
  end)

  local self = setmetatable({
    lib = lib,
    _owner = owner,
    _box = box,
    _by_request = {}, -- nginx request → its state (see request_state)
    _pool = {}, -- states of finished requests (their selections ended), for reuse
    _pooled = 0,
    -- Ends a pick whose request state was dropped without report() (an internal
    -- redirect, a bug): the in-flight count comes back. A no-op on ended picks.
    _fin = function(sel)
      local h = box.h
      if h ~= nil then lib.dynup_cancel(h, sel) end
    end,
  }, Upstream)
  -- report() reads $upstream_response_time (about 1 k instructions a request) only for
  -- a policy that uses latency; a library older than dynup_uses_latency: always.
  self._report_try = pcall(function() return lib.dynup_report_try end)
  local has_fn, uses = pcall(function() return lib.dynup_uses_latency(owner) end)
  self._latency = not has_fn or uses ~= 0
  self.name = self:status():match('^{"name":"([^"]*)"') or "?"
  self._ctx_key = "resty.dynup." .. self.name
  registry[self.name] = self
  return self
end

--- The upstream new() last made under `name` in this Lua VM (this nginx worker), or nil
--- and why: `dynup.get("api"):balance()` raises on nil, see _M.balance for the safe form.
function _M.get(name)
  local up = registry[name]
  if up then return up end
  return nil, "resty.dynup: no upstream named " .. string.format("%q", tostring(name)):gsub("\\\n", "\\n") ..
              " in this worker: dynup.new() failed (see its error logged in init_worker_by_lua) or never ran"
end

--- The version of the loaded dynup C library, or nil and why it cannot be loaded.
function _M.version(lib_path)
  local lib, err = load_lib(lib_path)
  if not lib then return nil, err end
  return ffi_string(lib.dynup_version())
end

--- The id_hash dynup gives the peer id `id` (what pick() excludes on a retry), or nil
--- and why the library cannot be loaded.
function _M.peer_id_hash(id, lib_path)
  local lib, err = load_lib(lib_path)
  if not lib then return nil, err end
  return lib.dynup_peer_id_hash(id, #id)
end

-- The nginx phase when in a request (not init, init_worker), else nil.
local function request_phase()
  if ngx == nil or ngx.get_phase == nil then return nil end
  local phase = ngx.get_phase()
  if phase == "init" or phase == "init_worker" then return nil end
  return phase
end

-- A request's state: `sel`, the selection, reused by the request's retries. `ended`: the
-- last pick has ended and its id_hash, still in `sel`, is not yet in `tried` (the next
-- pick of the request adds it: a request with no retry writes no `tried` array).
-- `pooled`: the request has finished (report() in log_by_lua) and the state went back to
-- the upstream's pool, from which the next request in this worker takes it, selection
-- and `tried` array included: in nginx a request allocates nothing of its own here.
-- `r`: the nginx request it is filed under in `_by_request`, if any, and `started` that
-- request's start time.
local function new_state()
  return { sel = nil, live = false, ended = false, pooled = false, tries = 0, tried = nil, n = 0, cap = 0, r = nil,
           started = nil }
end

-- A state for a new request: a pooled one (no longer filed under its old request), or a
-- new one.
local function take_state(self)
  local n = self._pooled
  if n == 0 then return new_state() end
  local st = self._pool[n]
  self._pool[n] = nil
  self._pooled = n - 1
  if st.r ~= nil and self._by_request[st.r] == st then self._by_request[st.r] = nil end
  st.live, st.ended, st.pooled, st.tries, st.n, st.r = false, false, false, 0, 0, nil
  return st
end

-- Marks a request whose state lives in ngx.ctx (a pick outside balancer_by_lua).
local IN_CTX = {}
-- resty.core's, loaded with the first request (balance() runs after a pick, so after it).
local get_request, get_last_failure, set_current_peer, set_more_tries

-- The request's state (nil when it has none), the nginx phase when `ctx` is nil, and an
-- error outside a request or for a `ctx` that is no table. `phase`: the caller's
-- ngx.get_phase(), if it has it. `picking`: pick() asks, and may start a state; in
-- balancer_by_lua it also gets get_last_failure()'s state and code (4th and 5th values).
-- In balancer_by_lua the state is filed under the nginx request itself (resty.core's
-- get_request(), a pointer), not in ngx.ctx: creating and releasing an ngx.ctx table
-- per request cost 4 % of a proxied request's user-space instructions. A request's
-- memory is reused by later requests, so what is filed under it may belong to one that
-- ended without log_by_lua (a subrequest), or to this one before an internal redirect:
-- the first try of an upstream attempt (get_last_failure() is nil) never takes it
-- for a retry, and cancels its pick if still live; and a state filed by a request that
-- started at another time (ngx.req.start_time(), to the millisecond) is not this
-- request's, so report() in a later request that never picked does not end it. Picks in
-- other phases keep their state in ngx.ctx, as an explicit `ctx` does.
local function request_state(self, ctx, picking, phase)
  if ctx ~= nil then
    if type(ctx) ~= "table" then
      return nil, nil, "resty.dynup: the request's state must be a table (nil in nginx), got a " .. type(ctx)
    end
    local st = ctx[self._ctx_key]
    if st == nil then
      st = new_state()
      ctx[self._ctx_key] = st
    end
    return st
  end
  phase = phase or request_phase()
  if not phase then return nil, nil, "resty.dynup: outside an nginx request, pass the request's state table" end
  if get_request == nil then
    get_request = require("resty.core.base").get_request
    local balancer = require "ngx.balancer"
    get_last_failure, set_current_peer, set_more_tries =
      balancer.get_last_failure, balancer.set_current_peer, balancer.set_more_tries
  end
  -- get_request() gives a new cdata each call (a void*), which as a table key would
  -- match only itself: file under its address.
  local r = get_request()
  if type(r) == "cdata" then r = tonumber(ffi_cast("uintptr_t", r)) end
  local by = self._by_request
  local st = by[r]
  local started = ngx.req.start_time()
  local failure, code
  if phase == "balancer" and picking then
    failure, code = get_last_failure()
    if failure == nil then -- a first try
      -- Whatever the flags say (a handler that raised midway), the C side's pick of an
      -- unpooled state ends here: a no-op when it has ended, a wedge when it has not.
      if st ~= nil and st ~= IN_CTX and not st.pooled and st.sel ~= nil then
        local h = self._box.h
        if h ~= nil then self.lib.dynup_cancel(h, st.sel) end
        st.live = false
      end
      if st == nil or st == IN_CTX or st.pooled then
        st = take_state(self)
        st.r = r
        by[r] = st
      else
        st.live, st.ended, st.tries, st.n = false, false, 0, 0
      end
      st.started = started
      return st, phase
    end
  end
  if st ~= nil and st ~= IN_CTX then
    if st.started == started then return st, phase, nil, failure, code end
    st = nil -- another request's, which ended without log_by_lua
  end
  if st == nil and not picking then return nil, phase end
  ctx = ngx.ctx
  st = ctx[self._ctx_key]
  if st == nil then
    if not picking then return nil, phase end
    st = take_state(self)
    ctx[self._ctx_key] = st
    by[r] = IN_CTX
  end
  return st, phase, nil, failure, code
end

-- The last entry of an $upstream_* variable ("0.001, 0.002 : 0.003" → "0.003"). A
-- single entry (no retry: no separator) is the value itself; plain finds, unlike
-- string.match, are compiled by LuaJIT.
local function last_entry(value)
  if value == nil then return nil end
  if value ~= "" and not find(value, ",", 1, true) and not find(value, ":", 1, true) and
     not find(value, " ", 1, true) then
    return value
  end
  return value:match("([^%s,:]+)[%s,:]*$")
end

local function seconds_to_us(s)
  local v = tonumber(s)
  if not v or not (v >= 0) then return 0 end -- nil, negative, NaN
  if v > 1e9 then v = 1e9 end -- dynup_report's int64 and its clamp take the rest
  return floor(v * 1e6 + 0.5)
end

-- Remembers the ended pick's peer, for exclusion on the next try of this request.
local function add_tried(st)
  if st.n == st.cap then
    local cap = st.cap == 0 and 4 or st.cap * 2
    local grown = ffi_new("uint64_t[?]", cap)
    if st.n > 0 then ffi_copy(grown, st.tried, st.n * 8) end
    st.tried, st.cap = grown, cap
  end
  st.tried[st.n] = st.sel.id_hash
  st.n = st.n + 1
end

-- Ends the pick in C, then in `st`: marked ended first, a pick whose C call raised
-- would stay live there with nothing left to end it. `status` nil: cancel; else a
-- number, as are `latency_us` (callers check theirs: an FFI conversion raises).
-- `verdict`: nginx's own, "failed" or "ok", which decides what max_fails counts as in
-- nginx (a retried try failed; the last try's 502 did not); nil: by the status.
local function end_pick(self, st, status, latency_us, connect_failure, verdict)
  local h = self._box.h
  local rc = 0
  if h ~= nil then
    if status == nil then
      self.lib.dynup_cancel(h, st.sel)
    elseif verdict and self._report_try then
      local flags = (connect_failure and 1 or 0) + (verdict == "failed" and 2 or 4)
      rc = self.lib.dynup_report_try(h, st.sel, status, latency_us, flags)
    else
      rc = self.lib.dynup_report(h, st.sel, status, latency_us, connect_failure and 1 or 0)
    end
  end
  st.live = false
  st.ended = true
  if h == nil then return nil, "resty.dynup: upstream " .. self.name .. " is closed" end
  if rc ~= 0 then return nil, "resty.dynup: report: " .. ffi_string(self.lib.dynup_strerror(rc)) end
  return true
end

-- nginx is retrying: balancer_by_lua runs again after the previous try failed. Its
-- state is the last entry of each $upstream_* variable: the try being set up now has
-- no peer yet, and nginx 1.22 prints such an entry as a bare " : " ("502 : ").
-- `state` and `code`: what get_last_failure() said.
local function report_failed_try(self, st, state, code)
  local var = ngx.var
  local connect = last_entry(var.upstream_connect_time)
  local header = last_entry(var.upstream_header_time)
  local latency = seconds_to_us(last_entry(var.upstream_response_time))
  local verdict = state == "next" and "ok" or "failed" -- "next": a 403/404 passed on
  if connect == "-" then
    return end_pick(self, st, 0, latency, true, "failed")
  elseif header == "-" or (connect == nil and state == "failed") then
    return end_pick(self, st, 0, latency, false, "failed") -- no reply: timeout, reset, bad header
  end
  return end_pick(self, st, tonumber(code) or 0, latency, false, verdict)
end

-- pick(), and the request's state (nil on an error) for balance().
local function pick(self, key, ctx, phase)
  local h = self._box.h
  if h == nil then return nil, nil, "resty.dynup: upstream " .. self.name .. " is closed" end
  local st, err, failure, code
  st, phase, err, failure, code = request_state(self, ctx, true, phase)
  if not st then return nil, nil, err end
  if st.pooled then return nil, nil, "resty.dynup: this request's pick was already reported in log_by_lua" end
  if st.live then
    if phase == "balancer" then
      report_failed_try(self, st, failure, code)
    else
      end_pick(self, st, 0, 0, true)
    end
  end
  if st.ended then
    add_tried(st)
    st.ended = false
  end
  if st.sel == nil then
    -- Its finalizer cancels the pick if the request's state is dropped while it is live
    -- (an internal redirect clears ngx.ctx, for a pick outside balancer_by_lua); an
    -- ended one it leaves alone.
    st.sel = ffi_gc(ffi_new("dynup_selection"), self._fin)
  end
  if key ~= nil and type(key) ~= "string" then key = tostring(key) end
  local sel = st.sel
  local rc = self.lib.dynup_pick(h, key, key and #key or 0, st.tried, st.n, sel, errbuf, ERR_LEN)
  if rc ~= 0 then return nil, nil, ffi_string(errbuf) end
  st.live = true
  st.tries = st.tries + 1
  local host = ffi_string(sel.host, sel.host_len)
  if host:find(":", 1, true) then host = "[" .. host .. "]" end
  return host, sel.port, nil, st
end

-- "a string \"x\"", "a table": a wrong argument, for an error message.
local function describe(v)
  if type(v) == "string" then return "a string " .. string.format("%q", v):gsub("\\\n", "\\n") end
  if type(v) == "number" then return "the number " .. tostring(v) end
  return "a " .. type(v)
end

-- balance() outside balancer_by_lua: nothing to balance, and an ngx.exit there would
-- leave the client without a response.
local function misplaced(phase)
  local err = "resty.dynup: balance() must be called in balancer_by_lua*, not in " ..
              (phase and "the " .. phase .. " phase" or "plain Lua, outside nginx")
  if ngx ~= nil then ngx.log(ngx.ERR, err) end
  return nil, err
end

--- Picks a peer for this request: `host, port` (an IPv6 host comes in brackets, as
--- ngx.balancer.set_current_peer wants it), or nil, nil and the reason ("upstream api:
--- all peers unavailable"). In balancer_by_lua the request's state is filed under the
--- nginx request (elsewhere in nginx: in ngx.ctx); a second call for one request is a
--- retry: the previous try is reported as failed first, and every peer tried so far is
--- excluded. Outside nginx pass `ctx`, a table kept for the request: a pick while the
--- previous one is live reports that one as a failed connection, as nginx would.
function Upstream:pick(key, ctx)
  local host, port, err = pick(self, key, ctx)
  return host, port, err
end

--- balancer_by_lua in one call: pick() for `key`, ngx.balancer.set_current_peer, and on
--- the request's first try set_more_tries(`more_tries`) when given (nginx counts the
--- upstream block's placeholder server as its only peer: without it a failed try is not
--- retried; a number or its string, 0..65535). Returns true. When no peer is left, or
--- `more_tries` is not such a number, it logs why (at ERR) and ends the balancer with
--- NO_LIVE_UPSTREAMS, nginx's 502; when set_current_peer refuses the address it cancels
--- the pick, logs, and ends it with ngx.ERROR (500). Outside balancer_by_lua it does
--- nothing but log and return nil and why. Cheaper than the same steps written in the
--- balancer_by_lua block, whose calls LuaJIT interprets per request.
function Upstream:balance(key, more_tries)
  local phase = ngx ~= nil and ngx.get_phase()
  if phase ~= "balancer" then return misplaced(phase) end
  if more_tries ~= nil then
    local n = tonumber(more_tries)
    if not (n and n >= 0 and n <= 65535 and n == floor(n)) then
      ngx.log(ngx.ERR, "resty.dynup: balance(): more_tries must be a whole number 0..65535 or its string, got ",
              describe(more_tries))
      return ngx.exit(_M.NO_LIVE_UPSTREAMS)
    end
    more_tries = n
  end
  local host, port, err, st = pick(self, key, nil, phase)
  if not host then
    ngx.log(ngx.ERR, err)
    return ngx.exit(_M.NO_LIVE_UPSTREAMS)
  end
  if more_tries ~= nil and more_tries > 0 and st.tries == 1 then set_more_tries(more_tries) end
  local ok, set_err = set_current_peer(host, port)
  if not ok then
    end_pick(self, st, nil)
    ngx.log(ngx.ERR, "resty.dynup: set_current_peer(", host, ", ", port, "): ", set_err)
    return ngx.exit(ngx.ERROR)
  end
  return true
end

-- In log_by_lua the request is over: its state, selection ended, goes back to the
-- pool for the next request (a selection allocated per request, each with a finalizer,
-- costs the collector's finalizer runs and kept LuaJIT from compiling pick). tries() and
-- peer_id() still read it for the rest of this handler: log_by_lua cannot yield, so no
-- other request takes it before the handler returns. A state whose end failed stays
-- with the request, for its selection's finalizer.
local function pool_state(self, st)
  local n = self._pooled
  if n < POOL_MAX then
    n = n + 1
    self._pool[n] = st
    self._pooled = n
    st.pooled = true
  end
end

-- An explicit report's status: a number, or $upstream_status text (one entry per try,
-- "502, 200": the last counts). "-", no status (the client left first), gives false: a
-- cancel, as report() without a status does. Else nil and why.
local function status_arg(status)
  local v = status
  if type(v) == "string" then
    v = last_entry(v)
    if v == "-" then return false end
    v = tonumber(v)
  end
  if type(v) == "number" and v >= 0 and v <= 999 and v == floor(v) then return v end
  return nil, "resty.dynup: report(): status must be an HTTP status 0..999 (a number or $upstream_status text), " ..
              "got " .. describe(status)
end

--- Ends this request's live pick with its outcome. In log_by_lua, with no arguments,
--- the outcome is the last entry of $upstream_status, $upstream_connect_time,
--- $upstream_header_time and $upstream_response_time (the latency, read only for a
--- policy that uses it: ewma) (no connection: a connect failure;
--- no header: no reply; a client that left before any reply: cancelled, not a failure).
--- Explicitly: `status` (0: no reply; a number, or $upstream_status text, whose last
--- entry counts and whose "-" cancels), `latency` in seconds, `connect_failure`; `ctx`
--- is the request's state table (nil in nginx). Returns true, or nil and why ("no live
--- pick" when there is nothing to end). A bad argument ends the pick without an outcome,
--- is logged at ERR in nginx, and comes back as nil and why: it never raises.
function Upstream:report(ctx, status, latency, connect_failure)
  local bad
  if ctx ~= nil and type(ctx) ~= "table" then
    bad = "resty.dynup: report(ctx, status, latency, connect_failure): ctx must be the request's state table " ..
          "(nil in nginx), got " .. describe(ctx)
    ctx = nil
  end
  local st, phase, err = request_state(self, ctx)
  if err then return nil, bad or err end
  if not st or not st.live then return nil, bad or "resty.dynup: no live pick to report" end
  if status ~= nil or bad then
    local code = false -- false: cancel
    if not bad then code, bad = status_arg(status) end
    if not bad and latency ~= nil and not tonumber(latency) then
      bad = "resty.dynup: report(): latency must be seconds (a number or its string), got " .. describe(latency)
    end
    local ok
    if bad then
      -- The caller's mistake must not leave the pick live (wedging the request's state
      -- and the peer's in-flight count): it ends without an outcome.
      end_pick(self, st, nil)
      if ngx ~= nil then ngx.log(ngx.ERR, bad) end
    else
      ok, err = end_pick(self, st, code or nil, seconds_to_us(latency), connect_failure)
    end
    if (ok or bad) and phase == "log" and ctx == nil then pool_state(self, st) end
    if bad then return nil, bad end
    return ok, err
  end
  if ctx ~= nil and not request_phase() then return nil, "resty.dynup: report outside nginx needs a status" end
  local var = ngx.var
  -- The common case first: one try that got a reply. A single status other than the
  -- 502 and 504 nginx writes for its own errors came from the peer, so the connection
  -- was made and there was a header: two variable reads instead of four (each read
  -- formats its value, a good part of what report() costs).
  local status_text = var.upstream_status
  if status_text ~= nil and #status_text == 3 and status_text ~= "502" and status_text ~= "504" then
    local code = tonumber(status_text)
    if code then
      local latency_us = self._latency and seconds_to_us(last_entry(var.upstream_response_time)) or 0
      local ok, err = end_pick(self, st, code, latency_us, false, "ok")
      if ok and phase == "log" and ctx == nil then pool_state(self, st) end
      return ok, err
    end
  end
  -- A header means the connection was made: $upstream_connect_time is read only when
  -- there is none.
  local header = last_entry(var.upstream_header_time)
  local connect = (header == nil or header == "-") and last_entry(var.upstream_connect_time) or nil
  local latency_us = seconds_to_us(last_entry(var.upstream_response_time))
  local ok, err
  -- The last try: as in nginx, one that got a reply succeeded, whatever its status.
  if connect == "-" then
    ok, err = end_pick(self, st, 0, latency_us, true, "failed")
  elseif header == "-" or header == nil then
    if ngx.status == 499 or var.status == "499" then
      ok, err = end_pick(self, st, nil)
    else
      ok, err = end_pick(self, st, 0, latency_us, false, "failed")
    end
  else
    ok, err = end_pick(self, st, tonumber(last_entry(var.upstream_status)) or 0, latency_us, false, "ok")
  end
  if ok and phase == "log" and ctx == nil then pool_state(self, st) end
  return ok, err
end

--- Ends this request's live pick without an outcome (the request was never sent).
function Upstream:cancel(ctx)
  local st, _, err = request_state(self, ctx)
  if err then return nil, err end
  if not st or not st.live then return nil, "resty.dynup: no live pick to cancel" end
  return end_pick(self, st, nil)
end

--- How many peers this request has been given so far (1 on its first try).
function Upstream:tries(ctx)
  local st = request_state(self, ctx)
  return st and st.tries or 0
end

--- The id of the peer this request was last given, or nil.
function Upstream:peer_id(ctx)
  local st = request_state(self, ctx)
  if not st or st.sel == nil or st.tries == 0 then return nil end
  return ffi_string(st.sel.peer_id, st.sel.peer_id_len)
end

--- The upstream's status as a JSON string (docs/UPSTREAM.md, "Status").
function Upstream:status()
  local h = self._box.h
  if h == nil then return '{"error":"resty.dynup: upstream ' .. tostring(self.name) .. ' is closed"}' end
  for _ = 1, 4 do
    local n = tonumber(self.lib.dynup_status(h, status_buf, status_len))
    if n < status_len then return ffi_string(status_buf, n) end
    status_len = n + 1024
    status_buf = ffi_new("char[?]", status_len)
  end
  return '{"error":"resty.dynup: the status keeps growing"}'
end

--- Stops the upstream's threads and frees it; picks still live become void. Idempotent.
function Upstream:close()
  local owner = self._owner
  if owner == nil then return end
  self._box.h = nil
  self._owner = nil
  if registry[self.name] == self then registry[self.name] = nil end
  ffi_gc(owner, nil)
  self.lib.dynup_upstream_free(owner)
end

--- balancer_by_lua for the upstream named `name`: get(name):balance(key, more_tries),
--- except that an unknown name (its new() failed in init_worker_by_lua) is logged and
--- answered 502 (NO_LIVE_UPSTREAMS) instead of raising, which nginx answers with a 500.
function _M.balance(name, key, more_tries)
  local up = registry[name]
  if up then return up:balance(key, more_tries) end
  local phase = ngx ~= nil and ngx.get_phase()
  if phase ~= "balancer" then return misplaced(phase) end
  local _, err = _M.get(name)
  ngx.log(ngx.ERR, err)
  return ngx.exit(_M.NO_LIVE_UPSTREAMS)
end

--- log_by_lua for the upstream named `name`: get(name):report(...), except that an
--- unknown name is logged and returned as nil and why instead of raising.
function _M.report(name, ctx, status, latency, connect_failure)
  local up, err = _M.get(name)
  if up then return up:report(ctx, status, latency, connect_failure) end
  if ngx ~= nil then ngx.log(ngx.ERR, err) end
  return nil, err
end

return _M
