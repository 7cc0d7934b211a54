-- Helpers for the Lua binding's tests under plain LuaJIT: a private temporary directory,
-- files written as tools write them, polling with a deadline. Each test starts with
--   local t = dofile(arg[0]:match("^(.*)/") .. "/helpers.lua")
-- which also puts examples/lua/lib on package.path; libdynup_c comes from $DYNUP_C_LIB.
local ffi = require "ffi"

ffi.cdef [[
char* mkdtemp(char* template);
int poll(void* fds, unsigned long nfds, int timeout);
int rmdir(const char* path);
]]

local here = arg[0]:match("^(.*)/") or "."
package.path = here .. "/../../examples/lua/lib/?.lua;" .. package.path

local M = {}

M.lib = os.getenv("DYNUP_C_LIB")
assert(M.lib and M.lib ~= "", "set DYNUP_C_LIB to the path of libdynup_c.so (CTest does)")

function M.sleep_ms(ms)
  ffi.C.poll(nil, 0, ms)
end

ffi.cdef [[
struct dynup_test_timespec { long tv_sec; long tv_nsec; };
int clock_gettime(int clk, struct dynup_test_timespec* ts);
]]
local ts = ffi.new("struct dynup_test_timespec")
function M.now_ms()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

-- A fresh directory under /tmp; remove it with M.remove_dir(dir, names).
function M.temp_dir()
  local templ = ffi.new("char[?]", 32, "/tmp/dynup-lua-XXXXXX")
  assert(ffi.C.mkdtemp(templ) ~= nil, "mkdtemp failed")
  return ffi.string(templ)
end

function M.remove_dir(dir, names)
  for _, n in ipairs(names) do os.remove(dir .. "/" .. n) end
  ffi.C.rmdir(dir)
end

-- Writes through a temporary file and a rename, as tools and editors do.
function M.write_file(path, text)
  local tmp = path .. ".tmp"
  local f = assert(io.open(tmp, "w"))
  assert(f:write(text))
  assert(f:close())
  assert(os.rename(tmp, path))
end

-- Polls `pred` every 10 ms until it holds or `timeout_ms` passes; returns its last result.
function M.wait_until(pred, timeout_ms)
  local deadline = M.now_ms() + (timeout_ms or 5000)
  while true do
    if pred() then return true end
    if M.now_ms() >= deadline then return pred() end
    M.sleep_ms(10)
  end
end

function M.count(haystack, needle)
  local n, from = 0, 1
  while true do
    local i = haystack:find(needle, from, true)
    if not i then return n end
    n, from = n + 1, i + #needle
  end
end

function M.eq(got, want, what)
  if got ~= want then
    error((what or "value") .. ": got " .. tostring(got) .. ", want " .. tostring(want), 2)
  end
end

function M.contains(haystack, needle, what)
  if type(haystack) ~= "string" or not haystack:find(needle, 1, true) then
    error((what or "text") .. ": \"" .. tostring(haystack) .. "\" does not contain \"" .. needle .. "\"", 2)
  end
end

return M
