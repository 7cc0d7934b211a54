// dynup-proxy's admin listener: status, pushed peer sets, Prometheus metrics.
//
//   GET  /upstreams                   every upstream in brief
//   GET  /upstreams/<name>            that upstream's status (docs/UPSTREAM.md)
//   PUT  /upstreams/<name>/peers      replace a push:// upstream's set (the peer JSON format)
//   GET  /metrics                     Prometheus text format 0.0.4
//   GET  /healthz                     200 "ok", 503 while draining
//
// The PUT needs `Authorization: Bearer <token>`; without a configured token it is refused
// (403) unless admin.writes_without_token is set. Reads are open (the listener is loopback
// unless a token is set: proxy_config.hpp).
#pragma once

#include "proxy.hpp"

namespace dynup_proxy {

namespace detail {

inline void json_reply(httplib::Response& res, int status, const nlohmann::ordered_json& body) {
  res.status = status;
  res.set_content(body.dump(2, ' ', false, nlohmann::ordered_json::error_handler_t::replace) + "\n",
                  "application/json");
}

inline void json_error(httplib::Response& res, int status, const std::string& message) {
  json_reply(res, status, nlohmann::ordered_json{{"error", message}});
}

} // namespace detail

inline void Proxy::configure_admin_server() {
  using detail::json_error;
  using detail::json_reply;
  using nlohmann::ordered_json;
  admin_->set_keep_alive_max_count(100000);
  admin_->set_keep_alive_timeout(10);

  admin_->Get("/healthz", [this](const httplib::Request&, httplib::Response& res) {
    if (draining_)
      text(res, 503, "draining");
    else
      text(res, 200, "ok");
  });

  admin_->Get("/upstreams", [this](const httplib::Request&, httplib::Response& res) {
    ordered_json list = ordered_json::array();
    for (const auto& [name, pu] : upstreams_) {
      ordered_json st = pu->up->status();
      std::size_t available = 0;
      for (const auto& p : st["peers"]) available += p["available"].get<bool>() ? 1 : 0;
      list.push_back({{"name", name},
                      {"source", st["source"]},
                      {"policy", st["policy"]},
                      {"version", st["version"]},
                      {"peers", st["peers"].size()},
                      {"available", available},
                      {"stale", st["stale"]}});
    }
    json_reply(res, 200, ordered_json{{"upstreams", std::move(list)}});
  });

  admin_->Get(R"(/upstreams/([^/]+))", [this](const httplib::Request& req, httplib::Response& res) {
    auto it = upstreams_.find(req.matches[1].str());
    if (it == upstreams_.end()) return json_error(res, 404, "no upstream named \"" + req.matches[1].str() + "\"");
    json_reply(res, 200, it->second->up->status());
  });

  // A content-reader handler: cpp-httplib leaves the body to FramedServer, which took it
  // whole within limits.max_admin_body_bytes whatever its Content-Type (curl -d sends a
  // form type, whose body cpp-httplib would refuse past 8 KiB).
  admin_->Put(R"(/upstreams/([^/]+)/peers)", [this](const httplib::Request& req, httplib::Response& res,
                                                     const httplib::ContentReader&) {
    const std::string name = req.matches[1].str();
    if (config_.admin.token.empty() && !config_.admin.writes_without_token) {
      log_("admin: refused PUT /upstreams/" + name + "/peers from " + req.remote_addr + ": writes are off");
      return json_error(res, 403, "writes are off: set admin.token_env or admin.token_file (or, for a loopback-only "
                                  "test setup, admin.writes_without_token)");
    }
    if (!config_.admin.token.empty()) {
      const std::string auth = req.get_header_value("Authorization");
      static constexpr std::string_view scheme = "Bearer ";
      const bool bearer = auth.size() > scheme.size() && auth.compare(0, scheme.size(), scheme) == 0;
      if (!bearer || !detail::same_secret(std::string_view(auth).substr(scheme.size()), config_.admin.token)) {
        res.set_header("WWW-Authenticate", "Bearer realm=\"dynup-proxy admin\"");
        log_("admin: refused PUT /upstreams/" + name + "/peers from " + req.remote_addr +
             (auth.empty() ? ": no token" : ": wrong token"));
        return json_error(res, 401, auth.empty() ? "a token is required: Authorization: Bearer <token>"
                                                 : "the token is not valid");
      }
    }
    auto it = upstreams_.find(name);
    if (it == upstreams_.end()) return json_error(res, 404, "no upstream named \"" + name + "\"");
    ProxyUpstream& pu = *it->second;
    const std::string_view sent = FramedServer::request_body();
    nlohmann::json doc = nlohmann::json::parse(sent.begin(), sent.end(), nullptr, false);
    if (doc.is_discarded()) {
      pu.counters.pushes_refused.fetch_add(1, std::memory_order_relaxed);
      return json_error(res, 400, "the body is not valid JSON (expected {\"peers\": [...]})");
    }
    if (doc.is_object() && doc.contains("peers") && doc["peers"].is_array() &&
        doc["peers"].size() > config_.limits.max_push_peers) {
      pu.counters.pushes_refused.fetch_add(1, std::memory_order_relaxed);
      return json_error(res, 413, std::to_string(doc["peers"].size()) + " peers, more than limits.max_push_peers (" +
                                      std::to_string(config_.limits.max_push_peers) + ")");
    }
    auto set = dynup::peer_set_from_json(doc);
    if (!set) {
      pu.counters.pushes_refused.fetch_add(1, std::memory_order_relaxed);
      return json_error(res, 400, set.error().message());
    }
    auto pushed = pu.up->push(std::move(set).value());
    if (!pushed) {
      pu.counters.pushes_refused.fetch_add(1, std::memory_order_relaxed);
      // Not a push:// upstream, or a guard refused the set: the request conflicts with
      // the upstream's state, and nothing changed.
      return json_error(res, 409, pushed.error().message());
    }
    pu.counters.pushes_accepted.fetch_add(1, std::memory_order_relaxed);
    ordered_json body{{"upstream", name}, {"version", pushed->version}, {"changed", pushed->changed},
                      {"peers", pu.up->peer_count()}};
    if (!pushed->persist_error.empty()) body["persist_error"] = pushed->persist_error;
    log_("admin: upstream " + name + ": pushed set " + (pushed->changed ? "now version " : "unchanged, version ") +
         std::to_string(pushed->version));
    json_reply(res, 200, body);
  });

  admin_->Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(metrics(), "text/plain; version=0.0.4; charset=utf-8");
  });

  // Known paths with a method they do not take: 405 with Allow, not 404. Content-reader
  // handlers, as the PUT: cpp-httplib never reads (nor refuses) a body here.
  auto wrong_method = [](const char* allow) {
    return [allow](const httplib::Request& req, httplib::Response& res, const httplib::ContentReader&) {
      res.set_header("Allow", allow);
      detail::json_error(res, 405, req.method + " is not allowed here (allowed: " + allow + ")");
    };
  };
  auto wrong_get = [wrong_method](const char* allow) {
    return [w = wrong_method(allow)](const httplib::Request& req, httplib::Response& res) {
      w(req, res, httplib::ContentReader(nullptr, nullptr));
    };
  };
  admin_->Post(R"(/upstreams/[^/]+/peers)", wrong_method("PUT"));
  admin_->Patch(R"(/upstreams/[^/]+/peers)", wrong_method("PUT"));
  admin_->Delete(R"(/upstreams/[^/]+/peers)", wrong_method("PUT"));
  admin_->Get(R"(/upstreams/[^/]+/peers)", wrong_get("PUT"));
  for (const char* path : {"/upstreams", R"(/upstreams/[^/]+)", "/metrics", "/healthz"}) {
    admin_->Put(path, wrong_method("GET"));
    admin_->Post(path, wrong_method("GET"));
    admin_->Delete(path, wrong_method("GET"));
  }
  // Any other path with a body-carrying method: 404 without reading the body either.
  auto not_found = [](const httplib::Request&, httplib::Response& res, const httplib::ContentReader&) {
    res.status = 404;
  };
  const char* any = R"([\s\S]*)";
  admin_->Post(any, not_found);
  admin_->Put(any, not_found);
  admin_->Patch(any, not_found);
  admin_->Delete(any, not_found);
  admin_->set_error_handler([](const httplib::Request&, httplib::Response& res) {
    if (!res.body.empty()) return;
    if (res.status == 404)
      detail::json_error(res, 404, "not found (GET /upstreams, GET /upstreams/<name>, PUT /upstreams/<name>/peers, "
                                   "GET /metrics, GET /healthz)");
    else
      detail::json_error(res, res.status, "status " + std::to_string(res.status));
  });
}

inline std::string Proxy::admin_error_body(const std::string& why) {
  return nlohmann::ordered_json{{"error", why}}.dump(2, ' ', false, nlohmann::ordered_json::error_handler_t::replace) +
         "\n";
}

inline std::string Proxy::metrics() const {
  std::string out;
  auto family = [&](const char* name, const char* type, const char* help) {
    out += "# HELP ";
    out += name;
    out += ' ';
    out += help;
    out += "\n# TYPE ";
    out += name;
    out += ' ';
    out += type;
    out += '\n';
  };
  auto sample = [&](const char* name, const std::string& labels, double v) {
    char num[64];
    std::snprintf(num, sizeof num, "%.17g", v);
    out += name;
    if (!labels.empty()) out += "{" + labels + "}";
    out += ' ';
    out += num;
    out += '\n';
  };
  auto ul = [](const std::string& up) { return "upstream=\"" + detail::label(up) + "\""; };
  auto load = [](const std::atomic<std::uint64_t>& a) { return static_cast<double>(a.load(std::memory_order_relaxed)); };

  std::map<std::string, nlohmann::ordered_json> status;
  for (const auto& [name, pu] : upstreams_) {
    prune_pools(*pu); // a scrape after a change tells the truth without waiting for a request
    status[name] = pu->up->status();
  }

  family("dynup_proxy_requests_in_flight", "gauge", "Client requests being served.");
  sample("dynup_proxy_requests_in_flight", "", static_cast<double>(in_flight_.load()));
  family("dynup_proxy_no_route_total", "counter", "Requests no route matched (404).");
  sample("dynup_proxy_no_route_total", "", load(no_route_));
  family("dynup_proxy_refused_requests_total", "counter",
         "Client requests refused before routing: malformed or ambiguous framing (400, 501, 505), too large (413, "
         "431), too slow (408), too many connections (503).");
  sample("dynup_proxy_refused_requests_total", "", static_cast<double>(server_->refused()));
  family("dynup_proxy_idle_connections", "gauge",
         "Idle kept-alive connections pooled for reuse, to peers of the current set only.");
  for (const auto& [name, pu] : upstreams_) {
    std::size_t idle = 0;
    std::shared_lock<std::shared_mutex> lock(pu->pools_mu);
    for (const auto& [key, pool] : pu->pools) idle += pool->idle();
    sample("dynup_proxy_idle_connections", ul(name), static_cast<double>(idle));
  }

  family("dynup_picks_total", "counter", "Peers picked (retries included).");
  for (const auto& [name, pu] : upstreams_) sample("dynup_picks_total", ul(name), load(pu->counters.picks));
  family("dynup_pick_failures_total", "counter", "Requests that found no peer to try (503, or 502 after failures).");
  for (const auto& [name, pu] : upstreams_) sample("dynup_pick_failures_total", ul(name), load(pu->counters.no_peer));
  family("dynup_retries_total", "counter", "Further peers tried after a failed connect.");
  for (const auto& [name, pu] : upstreams_) sample("dynup_retries_total", ul(name), load(pu->counters.retries));
  family("dynup_upstream_failures_total", "counter", "Failed exchanges with a peer, by kind.");
  for (const auto& [name, pu] : upstreams_) {
    sample("dynup_upstream_failures_total", ul(name) + ",kind=\"connect\"", load(pu->counters.connect_failures));
    sample("dynup_upstream_failures_total", ul(name) + ",kind=\"reply\"", load(pu->counters.response_failures));
    sample("dynup_upstream_failures_total", ul(name) + ",kind=\"too_large\"", load(pu->counters.too_large));
  }
  family("dynup_responses_total", "counter", "Peer replies relayed to clients, by status class.");
  for (const auto& [name, pu] : upstreams_) {
    static const char* const classes[] = {"other", "1xx", "2xx", "3xx", "4xx", "5xx"};
    for (std::size_t i = 0; i < 6; ++i)
      sample("dynup_responses_total", ul(name) + ",code=\"" + classes[i] + "\"", load(pu->counters.responses[i]));
  }
  family("dynup_pushes_total", "counter", "PUT /upstreams/<name>/peers, by result.");
  for (const auto& [name, pu] : upstreams_) {
    sample("dynup_pushes_total", ul(name) + ",result=\"accepted\"", load(pu->counters.pushes_accepted));
    sample("dynup_pushes_total", ul(name) + ",result=\"refused\"", load(pu->counters.pushes_refused));
  }
  family("dynup_ejections_total", "counter", "Outlier ejections.");
  for (const auto& [name, pu] : upstreams_) sample("dynup_ejections_total", ul(name), static_cast<double>(pu->up->ejections_total()));

  family("dynup_upstream_version", "gauge", "Version of the peer set served.");
  for (const auto& [name, st] : status) sample("dynup_upstream_version", ul(name), st["version"].get<double>());
  family("dynup_upstream_stale", "gauge", "1 when the set served may be older than the source's.");
  for (const auto& [name, st] : status) sample("dynup_upstream_stale", ul(name), st["stale"].get<bool>() ? 1 : 0);
  family("dynup_upstream_peers", "gauge", "Peers in the set served.");
  for (const auto& [name, st] : status) sample("dynup_upstream_peers", ul(name), static_cast<double>(st["peers"].size()));
  family("dynup_upstream_panic", "gauge", "1 while the panic threshold routes to every peer.");
  for (const auto& [name, st] : status) sample("dynup_upstream_panic", ul(name), st["panic"].get<bool>() ? 1 : 0);

  auto per_peer = [&](const char* metric, const char* type, const char* help, auto value) {
    family(metric, type, help);
    for (const auto& [name, st] : status)
      for (const nlohmann::ordered_json& p : st["peers"]) {
        double v = 0;
        if (!value(name, p, v)) continue;
        sample(metric, ul(name) + ",peer=\"" + detail::label(p["id"].get<std::string>()) + "\"", v);
      }
  };
  per_peer("dynup_peer_available", "gauge", "1 when the peer may be picked.",
           [](const std::string&, const nlohmann::ordered_json& p, double& v) {
             v = p["available"].get<bool>() ? 1 : 0;
             return true;
           });
  per_peer("dynup_peer_weight", "gauge", "The peer's effective weight (slow start and warning weights applied).",
           [](const std::string&, const nlohmann::ordered_json& p, double& v) {
             v = p["effective_weight"].get<double>();
             return true;
           });
  per_peer("dynup_peer_in_flight", "gauge", "Requests at the peer now.",
           [](const std::string&, const nlohmann::ordered_json& p, double& v) {
             if (!p.contains("in_flight")) return false;
             v = p["in_flight"].get<double>();
             return true;
           });
  per_peer("dynup_peer_ewma_seconds", "gauge", "The peer's latency EWMA (policies that keep one).",
           [](const std::string&, const nlohmann::ordered_json& p, double& v) {
             if (!p.contains("ewma_ms") || !p["ewma_ms"].is_number()) return false;
             v = p["ewma_ms"].get<double>() / 1000.0;
             return true;
           });
  per_peer("dynup_peer_failures_total", "counter", "Failed exchanges with the peer (connect, no reply, too large).",
           [this](const std::string& name, const nlohmann::ordered_json& p, double& v) {
             const ProxyUpstream& pu = *upstreams_.at(name);
             std::lock_guard<std::mutex> lock(pu.failures_mu);
             auto it = pu.failures_by_peer.find(p["id"].get<std::string>());
             v = it == pu.failures_by_peer.end() ? 0 : static_cast<double>(it->second);
             return true;
           });
  return out;
}

} // namespace dynup_proxy
