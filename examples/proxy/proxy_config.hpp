// dynup-proxy's config file: listeners, routes, limits and the upstreams (each one a
// dynup upstream config, docs/UPSTREAM.md). Every error names its JSON path.
#pragma once

#include <dynup/upstream_config.hpp>

#include <nlohmann/json.hpp>

#include <arpa/inet.h>

#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace dynup_proxy {

using dynup::Errc;
using dynup::Error;
using dynup::Result;

struct Listen {
  std::string host;
  int port = 0;
  std::string text() const { return (host.find(':') != std::string::npos ? "[" + host + "]" : host) + ":" + std::to_string(port); }
};

/// A route: requests whose Host (without its port, case-insensitive) equals `host` (any
/// host when empty) and whose path starts with `prefix` go to `upstream`. The most
/// specific route wins: a route with a host before one without, then the longest prefix.
struct Route {
  std::string host;
  std::string prefix = "/";
  std::string upstream;
};

struct Limits {
  std::size_t max_request_body_bytes = 1 << 20;   ///< larger → 413, before anything is sent upstream
  std::size_t max_response_body_bytes = 64 << 20; ///< larger → 502, the upstream's reply is not relayed
  std::chrono::milliseconds connect_timeout{1000};
  std::chrono::milliseconds read_timeout{30000}; ///< also the write timeout to the peer
  unsigned retries = 2;                           ///< further peers tried after a failed connect
  std::size_t pool_size = 64;                     ///< idle keep-alive connections kept per peer
  std::size_t max_push_peers = 10000;             ///< peers one PUT may carry
  std::size_t max_admin_body_bytes = 4 << 20;
  std::chrono::milliseconds drain_timeout{30000}; ///< SIGTERM: the longest wait for requests in flight
  std::chrono::milliseconds header_timeout{10000};    ///< a client's request head, in total (408 and close)
  std::chrono::milliseconds body_timeout{30000};      ///< a client's request body, in total (408 and close)
  std::chrono::milliseconds keepalive_timeout{60000}; ///< an idle kept-alive client connection
  std::size_t max_connections = 4096;                 ///< client connections on the proxy listener
};

struct AdminConfig {
  bool enabled = true;
  Listen listen{"127.0.0.1", 9901};
  std::string token; ///< from token_env or token_file, never from the config itself; empty: writes are refused
  /// Without a token, PUTs are refused unless this is set (a loopback listener only):
  /// any local process could otherwise redirect the proxy's traffic.
  bool writes_without_token = false;
  std::string token_source; ///< where the token came from ("env DYNUP_ADMIN_TOKEN"), for messages
};

struct ProxyConfig {
  Listen listen{"127.0.0.1", 8080};
  unsigned threads = 64; ///< requests forwarded at once; idle and slow connections hold none
  bool access_log = false;
  AdminConfig admin;
  Limits limits;
  std::vector<dynup::UpstreamConfig> upstreams;
  std::vector<Route> routes;
};

namespace detail {

inline bool is_loopback(const std::string& host) {
  if (host == "localhost") return true;
  in_addr a4{};
  if (::inet_pton(AF_INET, host.c_str(), &a4) == 1) return (ntohl(a4.s_addr) >> 24) == 127;
  return host == "::1";
}

inline Result<Listen> parse_listen(const std::string& text, const std::string& where) {
  auto colon = text.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == text.size())
    return Error(Errc::invalid_argument, where + ": expected HOST:PORT, got \"" + text + "\"");
  Listen l;
  l.host = text.substr(0, colon);
  if (l.host.size() > 2 && l.host.front() == '[' && l.host.back() == ']') l.host = l.host.substr(1, l.host.size() - 2);
  const std::string port = text.substr(colon + 1);
  if (port.size() > 5 || port.find_first_not_of("0123456789") != std::string::npos || std::stoi(port) > 65535)
    return Error(Errc::invalid_argument, where + ": port \"" + port + "\" is not 0..65535");
  l.port = std::stoi(port);
  in_addr a4{};
  in6_addr a6{};
  if (::inet_pton(AF_INET, l.host.c_str(), &a4) != 1 && ::inet_pton(AF_INET6, l.host.c_str(), &a6) != 1 &&
      l.host != "localhost")
    return Error(Errc::invalid_argument, where + ": \"" + l.host + "\" is not an IP address");
  return l;
}

inline Result<std::string> read_token(const dynup::detail::ConfigReader& r, const std::string& env,
                                      const std::string& file, std::string& source) {
  if (!env.empty() && !file.empty())
    return Error(Errc::invalid_argument, r.at("token_env") + ": give token_env or token_file, not both");
  std::string token;
  if (!env.empty()) {
    const char* v = std::getenv(env.c_str());
    if (v == nullptr || *v == '\0')
      return Error(Errc::invalid_argument, r.at("token_env") + ": the environment variable " + env + " is not set");
    token = v;
    source = "env " + env;
  } else if (!file.empty()) {
    std::ifstream in(file);
    if (!in) return Error(Errc::invalid_argument, r.at("token_file") + ": cannot read " + file);
    std::ostringstream ss;
    ss << in.rdbuf();
    token = ss.str();
    while (!token.empty() && (token.back() == '\n' || token.back() == '\r' || token.back() == ' ')) token.pop_back();
    if (token.empty()) return Error(Errc::invalid_argument, r.at("token_file") + ": " + file + " is empty");
    source = "file " + file;
  }
  for (char c : token)
    if (static_cast<unsigned char>(c) <= 0x20 || static_cast<unsigned char>(c) >= 0x7f)
      return Error(Errc::invalid_argument, "admin token (" + source + "): only printable ASCII without spaces");
  if (!token.empty() && token.size() < 16)
    return Error(Errc::invalid_argument, "admin token (" + source + "): at least 16 characters");
  return token;
}

} // namespace detail

/// Reads a config document. Every upstream is checked as Upstream::start would
/// (parse_upstream_config), every route must name one of them, and an admin listener
/// off loopback must have a token.
inline Result<ProxyConfig> parse_proxy_config(const nlohmann::json& doc) {
  using dynup::detail::ConfigReader;
  std::optional<Error> error;
  ProxyConfig c;
  ConfigReader top(doc, "proxy", error, {"listen", "threads", "access_log", "admin", "limits", "upstreams", "routes"});
  if (error) return *error;
  std::string listen = c.listen.text();
  top.text("listen", listen);
  std::uint64_t threads = c.threads;
  top.integer("threads", 2, 4096, threads);
  c.threads = static_cast<unsigned>(threads);
  top.flag("access_log", c.access_log);
  if (error) return *error;
  auto l = detail::parse_listen(listen, top.at("listen"));
  if (!l) return l.error();
  c.listen = *l;

  if (const nlohmann::json* a = top.get("admin")) {
    if (a->is_boolean()) {
      c.admin.enabled = a->get<bool>();
    } else {
      ConfigReader admin(*a, top.at("admin"), error, {"listen", "token_env", "token_file", "writes_without_token"});
      std::string alisten = c.admin.listen.text(), env, file;
      admin.text("listen", alisten);
      admin.text("token_env", env);
      admin.text("token_file", file);
      admin.flag("writes_without_token", c.admin.writes_without_token);
      if (error) return *error;
      auto al = detail::parse_listen(alisten, admin.at("listen"));
      if (!al) return al.error();
      c.admin.listen = *al;
      auto token = detail::read_token(admin, env, file, c.admin.token_source);
      if (!token) return token.error();
      c.admin.token = std::move(token).value();
    }
  }
  if (c.admin.enabled && c.admin.token.empty() && !detail::is_loopback(c.admin.listen.host))
    return Error(Errc::invalid_argument, "proxy.admin.listen: " + c.admin.listen.text() +
                                             " is not loopback, and the admin API can replace peers: set "
                                             "token_env or token_file, or listen on 127.0.0.1");
  if (c.admin.enabled && c.admin.writes_without_token && !c.admin.token.empty())
    return Error(Errc::invalid_argument, "proxy.admin.writes_without_token: a token is set as well; use one or the other");
  if (c.admin.enabled && c.admin.listen.host == c.listen.host && c.admin.listen.port == c.listen.port &&
      c.listen.port != 0)
    return Error(Errc::invalid_argument, "proxy.admin.listen: the same address as proxy.listen");

  if (const nlohmann::json* lim = top.get("limits")) {
    ConfigReader r(*lim, top.at("limits"), error,
                   {"max_request_body_bytes", "max_response_body_bytes", "connect_timeout_ms", "read_timeout_ms",
                    "retries", "pool_size", "max_push_peers", "max_admin_body_bytes", "drain_timeout_ms",
                    "header_timeout_ms", "body_timeout_ms", "keepalive_timeout_ms", "max_connections"});
    auto size = [&](const char* key, std::uint64_t lo, std::uint64_t hi, std::size_t& out) {
      std::uint64_t v = out;
      r.integer(key, lo, hi, v);
      out = static_cast<std::size_t>(v);
    };
    size("max_request_body_bytes", 0, std::uint64_t{1} << 32, c.limits.max_request_body_bytes);
    size("max_response_body_bytes", 1, std::uint64_t{1} << 32, c.limits.max_response_body_bytes);
    r.millis("connect_timeout_ms", 1, 600000, c.limits.connect_timeout);
    r.millis("read_timeout_ms", 1, 3600000, c.limits.read_timeout);
    std::uint64_t retries = c.limits.retries;
    r.integer("retries", 0, 16, retries);
    c.limits.retries = static_cast<unsigned>(retries);
    size("pool_size", 0, 100000, c.limits.pool_size);
    size("max_push_peers", 1, 1000000, c.limits.max_push_peers);
    size("max_admin_body_bytes", 1024, std::uint64_t{1} << 30, c.limits.max_admin_body_bytes);
    r.millis("drain_timeout_ms", 0, 3600000, c.limits.drain_timeout);
    r.millis("header_timeout_ms", 100, 600000, c.limits.header_timeout);
    r.millis("body_timeout_ms", 100, 3600000, c.limits.body_timeout);
    r.millis("keepalive_timeout_ms", 1000, 3600000, c.limits.keepalive_timeout);
    size("max_connections", 16, 1000000, c.limits.max_connections);
    if (error) return *error;
  }

  const nlohmann::json* ups = top.get("upstreams");
  if (!ups || !ups->is_array() || ups->empty())
    return Error(Errc::invalid_argument, top.at("upstreams") + ": expected a non-empty array of upstream configs");
  std::set<std::string> names;
  for (std::size_t i = 0; i < ups->size(); ++i) {
    const std::string where = top.at("upstreams") + "[" + std::to_string(i) + "]";
    auto u = dynup::parse_upstream_config((*ups)[i]);
    if (!u) return Error(Errc::invalid_argument, where + ": " + u.error().message());
    if (u->shared.enabled)
      return Error(Errc::invalid_argument, where + ".shared: dynup-proxy is one process; leave \"shared\" out");
    if (!names.insert(u->name).second)
      return Error(Errc::invalid_argument, where + ".name: \"" + u->name + "\" is used twice");
    c.upstreams.push_back(std::move(u).value());
  }

  const nlohmann::json* routes = top.get("routes");
  if (routes == nullptr) {
    if (c.upstreams.size() != 1)
      return Error(Errc::invalid_argument, top.at("routes") + ": required with more than one upstream");
    c.routes.push_back(Route{"", "/", c.upstreams[0].name});
  } else {
    if (!routes->is_array() || routes->empty())
      return Error(Errc::invalid_argument, top.at("routes") + ": expected a non-empty array of routes");
    std::set<std::pair<std::string, std::string>> seen;
    for (std::size_t i = 0; i < routes->size(); ++i) {
      const std::string where = top.at("routes") + "[" + std::to_string(i) + "]";
      ConfigReader r((*routes)[i], where, error, {"host", "prefix", "upstream"});
      Route route;
      r.text("host", route.host);
      r.text("prefix", route.prefix);
      r.text("upstream", route.upstream);
      if (error) return *error;
      if (route.upstream.empty()) return Error(Errc::invalid_argument, r.at("upstream") + ": required");
      if (!names.count(route.upstream))
        return Error(Errc::invalid_argument, r.at("upstream") + ": no upstream is named \"" + route.upstream + "\"");
      if (route.prefix.front() != '/')
        return Error(Errc::invalid_argument, r.at("prefix") + ": must start with /, got \"" + route.prefix + "\"");
      for (char& ch : route.host) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
      if (route.host.find_first_of(" /:\t") != std::string::npos)
        return Error(Errc::invalid_argument, r.at("host") + ": a host name without port, got \"" + route.host + "\"");
      if (!seen.insert({route.host, route.prefix}).second)
        return Error(Errc::invalid_argument, where + ": host \"" + route.host + "\" and prefix \"" + route.prefix +
                                                 "\" are routed twice");
      c.routes.push_back(std::move(route));
    }
  }
  return c;
}

inline Result<ProxyConfig> load_proxy_config(const std::string& path) {
  std::ifstream in(path);
  if (!in) return Error(Errc::io_error, path + ": cannot open");
  nlohmann::json doc;
  try {
    doc = nlohmann::json::parse(in);
  } catch (const nlohmann::json::parse_error& e) {
    return Error(Errc::invalid_argument, path + ": not valid JSON: " + e.what());
  }
  auto c = parse_proxy_config(doc);
  if (!c) return c.error().with_context(path);
  return c;
}

} // namespace dynup_proxy
