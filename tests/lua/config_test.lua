-- resty.dynup's errors: bad configs name the JSON path, a bad library path says so, and
-- config tables become the JSON dynup expects.
local t = dofile((arg[0]:match("^(.*)/") or ".") .. "/helpers.lua")
local dynup = require "resty.dynup"

local dir = t.temp_dir()
local path = dir .. "/peers.json"
t.write_file(path, '["10.0.0.1:80"]')
local source = "file://" .. path

local up, err = dynup.new({name = "api", source = source, watch = {wait_ms = 5}}, {lib = t.lib})
t.eq(up, nil, "config with wait_ms 5")
t.eq(err, "upstream.watch.wait_ms: expected an integer 10..600000, got 5", "error names the path")

up, err = dynup.new({name = "api", source = source, wieght = 1}, {lib = t.lib})
t.eq(up, nil, "unknown key")
t.contains(err, "upstream.wieght: unknown key", "unknown key")

up, err = dynup.new('{"name": "api", ', {lib = t.lib})
t.eq(up, nil, "truncated JSON")
t.contains(err, "upstream: invalid JSON: parse error at line 1", "truncated JSON")

up, err = dynup.new({name = "api", source = "file://" .. dir .. "/missing.json",
                     watch = {strong_dependency = true}}, {lib = t.lib})
t.eq(up, nil, "missing file")
t.contains(err, "missing.json", "missing file")

up, err = dynup.new(42, {lib = t.lib})
t.eq(up, nil, "a number")
t.contains(err, "must be a table or a JSON string", "a number")

up, err = dynup.new({name = "api", source = source, watch = {poll_ms = 0 / 0}}, {lib = t.lib})
t.eq(up, nil, "NaN")
t.eq(err, "resty.dynup.new: upstream.watch.poll_ms: not a finite number", "NaN")

up, err = dynup.new({name = "api", source = source}, {lib = dir .. "/libnothing.so"})
t.eq(up, nil, "missing library")
t.contains(err, "cannot load the dynup C library \"" .. dir .. "/libnothing.so\"", "missing library")

-- Tables: sorted keys, arrays, escapes, integers without exponents, empty_array.
t.eq(dynup.encode_config({name = "a\"b\\c\n", weights = {1, 2.5, 3e9}, flags = {x = true},
                          statuses = dynup.empty_array}),
     '{"flags":{"x":true},"name":"a\\"b\\\\c\\u000a","statuses":[],"weights":[1,2.5,3000000000]}',
     "encode_config")

-- A config as a JSON string works too, and so does $DYNUP_C_LIB (no opts.lib).
up, err = dynup.new('{"name":"json","source":"' .. source .. '"}')
assert(up, err)
local ctx = {}
t.eq(up:pick(nil, ctx), "10.0.0.1", "pick from a JSON-string config")
assert(up:report(ctx, 200, 0.001))
up:close()

t.remove_dir(dir, {"peers.json"})
print("config_test: ok")
