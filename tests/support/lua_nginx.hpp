// A real nginx with lua-nginx-module running the Lua binding (examples/lua) as a user
// would: a master and two workers, each worker with its own dynup handle made in
// init_worker_by_lua, balancer_by_lua picking, log_by_lua reporting. The scaffolding
// (backends, dead ports, the peer file, start and stop by PID) is WorkerNginx's
// (tests/support/worker_nginx.hpp); this adds the Lua parts of the config.
#pragma once

#include <support/nginx.hpp>
#include <support/process.hpp>
#include <support/temp_dir.hpp>
#include <support/worker_nginx.hpp>

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#ifndef DYNUP_C_LIB
#error "DYNUP_C_LIB must name libdynup_c.so (tests/CMakeLists.txt defines it)"
#endif
#ifndef DYNUP_LUA_LIB_DIR
#error "DYNUP_LUA_LIB_DIR must name examples/lua/lib (tests/CMakeLists.txt defines it)"
#endif

namespace dynup_test {

/// Where nginx's dynamic modules are: $DYNUP_NGINX_MODULES, else nginx -V's
/// --modules-path, else Debian's /usr/lib/nginx/modules.
inline std::string nginx_modules_dir(const std::string& nginx) {
  if (const char* env = std::getenv("DYNUP_NGINX_MODULES"); env && *env) return env;
  Process p({nginx, "-V"});
  std::string out = p.read_all(Process::Stream::err, std::chrono::milliseconds(5000));
  p.wait_exit(std::chrono::milliseconds(2000));
  const std::string flag = "--modules-path=";
  auto at = out.find(flag);
  if (at == std::string::npos) return "/usr/lib/nginx/modules";
  auto end = out.find_first_of(" \n", at);
  return out.substr(at + flag.size(), end == std::string::npos ? std::string::npos : end - at - flag.size());
}

/// The directory holding lua-resty-core's resty/core.lua (lua-nginx-module refuses to
/// start without it), or empty.
inline std::string resty_core_dir() {
  for (const char* d : {"/usr/share/lua/5.1", "/usr/local/share/lua/5.1", "/usr/local/openresty/lualib"})
    if (exists(std::string(d) + "/resty/core.lua")) return d;
  return {};
}

/// Empty when nginx can run the Lua binding, else why not and what to do about it.
inline std::string lua_nginx_missing_reason(const std::string& nginx) {
  if (std::string why = nginx_missing_reason(nginx); !why.empty()) return why;
  std::string modules = nginx_modules_dir(nginx);
  for (const char* m : {"ndk_http_module.so", "ngx_http_lua_module.so"})
    if (!exists(modules + "/" + m))
      return modules + "/" + m + " is missing: install libnginx-mod-http-lua (scripts/install-deps.sh) or point " +
             "$DYNUP_NGINX_MODULES at the directory holding it";
  if (resty_core_dir().empty()) return "lua-resty-core is missing: install it (scripts/install-deps.sh)";
  if (!exists(DYNUP_C_LIB)) return std::string(DYNUP_C_LIB) + " is missing: build the dynup_c target";
  return {};
}

/// One response through the proxy.
using LuaReply = NginxReply;

/// How balancer_by_lua drives the binding.
enum class LuaBalancer {
  /// `dynup.get("api"):balance(key, 2)`, `dynup` a global made in init_by_lua: what the
  /// binding's README recommends.
  balance,
  /// pick(), tries(), set_more_tries and set_current_peer written out in the block.
  explicit_steps,
};

/// The Lua blocks of a LuaNginx written out, for tests of what callers get wrong: each
/// string is the body of its *_by_lua_block.
struct LuaBlocks {
  /// A pick per try (keyed by X-Key), two retries allowed, the request ended (502) when
  /// no peer is live.
  std::string balancer = R"(dynup.get("api"):balance(ngx.var.http_x_key, 2))";
  std::string log = R"(dynup.get("api"):report())"; ///< in `location /`
  std::string status = R"(ngx.print(dynup.get("api"):status()))"; ///< content of /status
};

/// nginx with lua-nginx-module running the Lua binding: the upstream's JSON config is
/// made into a handle per worker in init_worker_by_lua, balancer_by_lua picks (`style`),
/// log_by_lua reports, /status prints the handle's status.
class LuaNginx : public WorkerNginx {
public:
  /// `backends` answering servers, `dead` ports with nothing listening; the peer file
  /// starts with the backends in `initial` (indices). `upstream_extra` is merged into
  /// the upstream's JSON config (policy, health, shared, or a "source" other than the
  /// peer file).
  LuaNginx(std::size_t backends, std::size_t dead, std::vector<std::size_t> initial,
           nlohmann::json upstream_extra = nlohmann::json::object(), LuaBalancer style = LuaBalancer::balance)
      : LuaNginx(backends, dead, std::move(initial), std::move(upstream_extra),
                 style == LuaBalancer::balance ? LuaBlocks{} : explicit_blocks()) {}

  /// The same with each Lua block given.
  LuaNginx(std::size_t backends, std::size_t dead, std::vector<std::size_t> initial, nlohmann::json upstream_extra,
           LuaBlocks blocks)
      : WorkerNginx("nginx (lua)", shape(backends, dead, std::move(initial)),
                    configure(std::move(upstream_extra), std::move(blocks))) {}

private:
  // LuaBalancer::explicit_steps: LuaBlocks{}'s balance() written out in the block.
  static LuaBlocks explicit_blocks() {
    LuaBlocks b;
    b.balancer = R"(
      local balancer = require "ngx.balancer"
      local dynup = require "resty.dynup"
      local up = dynup.get("api")
      local host, port, err = up:pick(ngx.var.http_x_key)
      if not host then
        ngx.log(ngx.ERR, "dynup: ", err)
        return ngx.exit(dynup.NO_LIVE_UPSTREAMS)
      end
      if up:tries() == 1 then balancer.set_more_tries(2) end
      local ok, set_err = balancer.set_current_peer(host, port)
      if not ok then
        ngx.log(ngx.ERR, "dynup: set_current_peer: ", set_err)
        return ngx.exit(ngx.ERROR)
      end
    )";
    return b;
  }

  static WorkerNginxShape shape(std::size_t backends, std::size_t dead, std::vector<std::size_t> initial) {
    std::string missing = lua_nginx_missing_reason(nginx_binary());
    if (!missing.empty()) throw std::runtime_error(missing);
    WorkerNginxShape s;
    s.backends = backends;
    s.dead = dead;
    s.initial = std::move(initial);
    return s;
  }

  static WorkerNginxConfigure configure(nlohmann::json extra, LuaBlocks blocks) {
    return [extra = std::move(extra), blocks = std::move(blocks)](const WorkerNginx& n) {
      const std::string modules = nginx_modules_dir(nginx_binary());
      nlohmann::json upstream = extra;
      upstream["name"] = "api";
      if (!upstream.contains("source")) upstream["source"] = "file://" + n.peer_file();
      WorkerNginxLayout l;
      l.load_modules = {modules + "/ndk_http_module.so", modules + "/ngx_http_lua_module.so"};
      l.http += "  lua_package_path \"" + std::string(DYNUP_LUA_LIB_DIR) + "/?.lua;" + resty_core_dir() +
                "/?.lua;;\";\n";
      l.http += "  init_by_lua_block { dynup = require \"resty.dynup\" }\n";
      l.http += "  init_worker_by_lua_block {\n";
      l.http += "    local up, err = dynup.new([==[" + upstream.dump() + "]==], {lib = \"" +
                std::string(DYNUP_C_LIB) + "\"})\n";
      l.http += "    if not up then ngx.log(ngx.ERR, \"dynup: \", err) end\n";
      l.http += "  }\n";
      // nginx wants a `server` line in an upstream block: a placeholder.
      l.upstream = "    server 0.0.0.1;\n    balancer_by_lua_block { " + blocks.balancer + " }\n";
      l.proxy += "      log_by_lua_block { " + blocks.log + " }\n";
      l.status += "      content_by_lua_block { " + blocks.status + " }\n";
      return l;
    };
  }
};

} // namespace dynup_test
