// HealthOptions from and to JSON. docs/HEALTH.md documents the schema:
//
//   {"active":     {"type": "http", "path": "/healthz", "host_header": "", "expected_statuses": [200, "300-399"],
//                   "timeout_ms": 1000, "interval_ms": 5000, "healthy_threshold": 2,
//                   "unhealthy_threshold": 3, "max_concurrent": 8},
//    "passive":    {"max_fails": 1, "fail_timeout_ms": 10000, "fail_statuses": [502, 503]},
//    "outlier":    {"enabled": true, "consecutive_5xx": 5, "consecutive_gateway_failure": 5,
//                   "base_ejection_ms": 30000, "max_ejection_ms": 300000, "max_ejection_percent": 10},
//    "panic":      {"threshold_percent": 50, "mode": "all"},
//    "slow_start": {"window_ms": 0, "aggression": 1.0, "min_weight_percent": 10}}
//
// Every key is optional except active.type when "active" is present. Unknown keys are
// errors, and every error names its JSON path.
#pragma once

#include <dynup/health/options.hpp>
#include <dynup/peer_json.hpp>
#include <dynup/result.hpp>
#include <dynup/version.hpp>

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#ifndef DYNUP_HEALTH_MAX_DURATION_MS
// Longest accepted duration option: one day. Keeps time arithmetic far from overflow.
#define DYNUP_HEALTH_MAX_DURATION_MS 86400000
#endif

DYNUP_NAMESPACE_BEGIN
namespace detail {

/// Reads one JSON document into HealthOptions, collecting "path: what" messages.
/// Not thread-safe; config time only.
class HealthJsonReader {
public:
  std::vector<std::string> errors;

  void bad(const std::string& path, const std::string& what) { errors.push_back(path + ": " + what); }

  /// Whether `v` is an object; reports a non-object and every key not in `known`.
  bool object(const nlohmann::json& v, const std::string& path, std::initializer_list<const char*> known) {
    if (!v.is_object()) {
      bad(path, std::string("expected an object, got ") + v.type_name());
      return false;
    }
    for (auto it = v.begin(); it != v.end(); ++it) {
      bool ok = false;
      for (const char* k : known) ok = ok || it.key() == k;
      if (!ok) {
        std::string list;
        for (const char* k : known) list += (list.empty() ? "" : ", ") + std::string(k);
        bad(path + "." + it.key(), "unknown key (expected " + list + ")");
      }
    }
    return true;
  }

  /// An unsigned integer in [lo, hi].
  void integer(const nlohmann::json& obj, const std::string& path, const char* key, std::uint64_t lo,
               std::uint64_t hi, unsigned& dst) {
    auto it = obj.find(key);
    if (it == obj.end()) return;
    if (!in_range(*it, lo, hi))
      return bad(path + "." + key, "expected an integer " + std::to_string(lo) + ".." + std::to_string(hi) +
                                       ", got " + it->dump());
    dst = static_cast<unsigned>(it->get<std::uint64_t>());
  }

  /// Milliseconds, at least `lo` (0 or 1) and at most DYNUP_HEALTH_MAX_DURATION_MS.
  void millis(const nlohmann::json& obj, const std::string& path, const char* key, std::uint64_t lo,
              std::chrono::milliseconds& dst) {
    auto it = obj.find(key);
    if (it == obj.end()) return;
    const char* kind = lo == 0 ? "a non-negative" : "a positive";
    if (!in_range(*it, lo, UINT64_MAX))
      return bad(path + "." + key, std::string("expected ") + kind + " integer of milliseconds, got " + it->dump());
    if (it->get<std::uint64_t>() > DYNUP_HEALTH_MAX_DURATION_MS)
      return bad(path + "." + key, "expected at most " + std::to_string(DYNUP_HEALTH_MAX_DURATION_MS) +
                                       " milliseconds (one day), got " + it->dump());
    dst = std::chrono::milliseconds(it->get<std::int64_t>());
  }

  /// A finite number in [lo, hi], or in (lo, hi] when `open_low`.
  void number(const nlohmann::json& obj, const std::string& path, const char* key, double lo, double hi,
              bool open_low, double& dst) {
    auto it = obj.find(key);
    if (it == obj.end()) return;
    double v = it->is_number() ? it->get<double>() : std::nan("");
    bool ok = std::isfinite(v) && (open_low ? v > lo : v >= lo) && v <= hi;
    if (!ok) {
      std::string range = std::isinf(hi) ? (open_low ? "> " : ">= ") + fmt(lo)
                                         : (open_low ? "in (" : "in [") + fmt(lo) + ", " + fmt(hi) + "]";
      return bad(path + "." + key, "expected a number " + range + ", got " + it->dump());
    }
    dst = v;
  }

  void boolean(const nlohmann::json& obj, const std::string& path, const char* key, bool& dst) {
    auto it = obj.find(key);
    if (it == obj.end()) return;
    if (!it->is_boolean()) return bad(path + "." + key, "expected true or false, got " + it->dump());
    dst = it->get<bool>();
  }

  /// One of `names`; returns its position, or -1 when absent or invalid.
  int choice(const nlohmann::json& obj, const std::string& path, const char* key,
             std::initializer_list<const char*> names) {
    auto it = obj.find(key);
    if (it == obj.end()) return -1;
    int i = 0;
    if (it->is_string())
      for (const char* n : names) {
        if (it->get_ref<const std::string&>() == n) return i;
        ++i;
      }
    std::string list;
    i = 0;
    for (const char* n : names) {
      list += (i == 0 ? "" : (i + 1 == static_cast<int>(names.size()) ? " or " : ", "));
      list += std::string("\"") + n + "\"";
      ++i;
    }
    bad(path + "." + key, "expected " + list + ", got " + it->dump());
    return -1;
  }

  static bool is_status(const nlohmann::json& v) { return in_range(v, 100, 599); }

  static std::string fmt(double v) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%g", v);
    return buf;
  }

private:
  static bool in_range(const nlohmann::json& v, std::uint64_t lo, std::uint64_t hi) {
    if (!v.is_number_integer()) return false;
    if (!v.is_number_unsigned() && v.get<std::int64_t>() < 0) return false;
    std::uint64_t x = v.get<std::uint64_t>();
    return x >= lo && x <= hi;
  }
};

/// "200-399" → {200, 399}; {0, 0} when malformed.
inline std::pair<int, int> parse_status_range(const std::string& s) {
  auto dash = s.find('-');
  if (dash == std::string::npos || dash == 0 || dash + 1 == s.size() || s.size() > 7) return {0, 0};
  auto digits = [](const std::string& t) {
    if (t.size() != 3 || t.find_first_not_of("0123456789") != std::string::npos) return 0;
    return std::stoi(t);
  };
  return {digits(s.substr(0, dash)), digits(s.substr(dash + 1))};
}

} // namespace detail

/// Reads health options from a JSON object (docs/HEALTH.md). Absent keys keep their
/// defaults. Unknown keys, wrong types and out-of-range values are errors naming their
/// JSON path under `path`, e.g. "health.outlier.base_ejection_ms: expected a positive
/// integer of milliseconds, got -5"; all problems are reported at once, joined by "; ",
/// the first DYNUP_MAX_REPORTED_ERRORS of them and then "and N more".
/// Errc::invalid_argument. Allocates; never throws for any JSON value.
inline Result<HealthOptions> health_options_from_json(const nlohmann::json& j, const std::string& path = "health") {
  using nlohmann::json;
  detail::HealthJsonReader r;
  HealthOptions o;
  if (r.object(j, path, {"active", "passive", "outlier", "panic", "slow_start"})) {
    if (auto it = j.find("active"); it != j.end()) {
      const std::string p = path + ".active";
      ActiveCheckOptions& a = o.active;
      if (r.object(*it, p,
                   {"type", "path", "host_header", "expected_statuses", "timeout_ms", "interval_ms",
                    "healthy_threshold", "unhealthy_threshold", "max_concurrent"})) {
        const json& v = *it;
        if (!v.contains("type"))
          r.bad(p + ".type", "is required (\"http\", \"tcp\" or \"none\")");
        else if (int k = r.choice(v, p, "type", {"http", "tcp", "none"}); k >= 0)
          a.kind = k == 0 ? ActiveCheckOptions::Kind::http
                          : k == 1 ? ActiveCheckOptions::Kind::tcp : ActiveCheckOptions::Kind::none;
        if (auto f = v.find("path"); f != v.end()) {
          bool clean = f->is_string();
          if (clean)
            for (unsigned char c : f->get_ref<const std::string&>()) clean = clean && c > 0x20 && c != 0x7f;
          if (!f->is_string() || f->get_ref<const std::string&>().empty() || f->get_ref<const std::string&>()[0] != '/')
            r.bad(p + ".path", "expected a string starting with \"/\", got " + f->dump());
          else if (!clean) // a space, CR or LF would break the request line or inject headers
            r.bad(p + ".path", "contains a space or a control character (percent-encode it)");
          else
            a.path = f->get<std::string>();
        }
        if (auto f = v.find("host_header"); f != v.end()) {
          if (!f->is_string()) {
            r.bad(p + ".host_header", std::string("expected a string, got ") + f->type_name());
          } else {
            bool control = false;
            for (unsigned char c : f->get_ref<const std::string&>()) control = control || c < 0x20 || c == 0x7f;
            if (control) // a CR or LF would let the config inject headers into probes
              r.bad(p + ".host_header", "contains a control character");
            else
              a.host_header = f->get<std::string>();
          }
        }
        if (auto f = v.find("expected_statuses"); f != v.end()) {
          if (!f->is_array() || f->empty()) {
            r.bad(p + ".expected_statuses",
                  "expected a non-empty array of statuses or \"lo-hi\" ranges, got " + f->dump());
          } else {
            std::vector<std::pair<int, int>> ranges;
            for (std::size_t i = 0; i < f->size(); ++i) {
              const json& e = (*f)[i];
              std::pair<int, int> range{0, 0};
              if (detail::HealthJsonReader::is_status(e))
                range = {e.get<int>(), e.get<int>()};
              else if (e.is_string())
                range = detail::parse_status_range(e.get<std::string>());
              if (range.first < 100 || range.second > 599 || range.first > range.second)
                r.bad(p + ".expected_statuses[" + std::to_string(i) + "]",
                      "expected an HTTP status 100..599 or a range \"lo-hi\" within it, got " + e.dump());
              else
                ranges.push_back(range);
            }
            a.expected_statuses = std::move(ranges);
          }
        }
        r.millis(v, p, "timeout_ms", 1, a.timeout);
        r.millis(v, p, "interval_ms", 1, a.interval);
        r.integer(v, p, "healthy_threshold", 1, 10000, a.healthy_threshold);
        r.integer(v, p, "unhealthy_threshold", 1, 10000, a.unhealthy_threshold);
        r.integer(v, p, "max_concurrent", 1, 10000, a.max_concurrent);
      }
    }
    if (auto it = j.find("passive"); it != j.end()) {
      const std::string p = path + ".passive";
      PassiveOptions& s = o.passive;
      if (r.object(*it, p, {"max_fails", "fail_timeout_ms", "fail_statuses"})) {
        r.integer(*it, p, "max_fails", 0, 1000000, s.max_fails);
        r.millis(*it, p, "fail_timeout_ms", 1, s.fail_timeout);
        if (auto f = it->find("fail_statuses"); f != it->end()) {
          if (!f->is_array()) {
            r.bad(p + ".fail_statuses", "expected an array of HTTP statuses, got " + f->dump());
          } else {
            std::vector<int> statuses;
            for (std::size_t i = 0; i < f->size(); ++i) {
              if (!detail::HealthJsonReader::is_status((*f)[i]))
                r.bad(p + ".fail_statuses[" + std::to_string(i) + "]",
                      "expected an HTTP status 100..599, got " + (*f)[i].dump());
              else
                statuses.push_back((*f)[i].get<int>());
            }
            s.fail_statuses = std::move(statuses);
          }
        }
      }
    }
    if (auto it = j.find("outlier"); it != j.end()) {
      const std::string p = path + ".outlier";
      OutlierOptions& s = o.outlier;
      if (r.object(*it, p,
                   {"enabled", "consecutive_5xx", "consecutive_gateway_failure", "base_ejection_ms",
                    "max_ejection_ms", "max_ejection_percent"})) {
        s.enabled = true; // writing an "outlier" section turns ejection on unless it says otherwise
        r.boolean(*it, p, "enabled", s.enabled);
        r.integer(*it, p, "consecutive_5xx", 0, 1000000, s.consecutive_5xx);
        r.integer(*it, p, "consecutive_gateway_failure", 0, 1000000, s.consecutive_gateway_failure);
        std::size_t before = r.errors.size();
        r.millis(*it, p, "base_ejection_ms", 1, s.base_ejection_time);
        r.millis(*it, p, "max_ejection_ms", 1, s.max_ejection_time);
        if (r.errors.size() == before && s.max_ejection_time < s.base_ejection_time) {
          // Name the key the user wrote: the default of the other one may be the surprise.
          if (it->contains("max_ejection_ms"))
            r.bad(p + ".max_ejection_ms", "must be at least base_ejection_ms (" +
                                              std::to_string(s.base_ejection_time.count()) + "), got " +
                                              std::to_string(s.max_ejection_time.count()));
          else
            r.bad(p + ".base_ejection_ms", "must be at most max_ejection_ms (" +
                                               std::to_string(s.max_ejection_time.count()) + ", the default), got " +
                                               std::to_string(s.base_ejection_time.count()));
        }
        r.number(*it, p, "max_ejection_percent", 0, 100, false, s.max_ejection_percent);
      }
    }
    if (auto it = j.find("panic"); it != j.end()) {
      const std::string p = path + ".panic";
      if (r.object(*it, p, {"threshold_percent", "mode"})) {
        r.number(*it, p, "threshold_percent", 0, 100, false, o.panic.threshold_percent);
        if (int k = r.choice(*it, p, "mode", {"all", "fail"}); k >= 0)
          o.panic.mode = k == 0 ? PanicOptions::Mode::all : PanicOptions::Mode::fail;
      }
    }
    if (auto it = j.find("slow_start"); it != j.end()) {
      const std::string p = path + ".slow_start";
      SlowStartOptions& s = o.slow_start;
      if (r.object(*it, p, {"window_ms", "aggression", "min_weight_percent"})) {
        r.millis(*it, p, "window_ms", 0, s.window);
        r.number(*it, p, "aggression", 0, HUGE_VAL, true, s.aggression);
        r.number(*it, p, "min_weight_percent", 0, 100, true, s.min_weight_percent);
      }
    }
  }
  if (r.errors.empty()) return o;
  return detail::joined_error(Errc::invalid_argument, r.errors); // capped like every error list
}

/// The options as JSON in the schema health_options_from_json reads, every key present;
/// reading it back gives the same options. Allocates.
inline nlohmann::ordered_json health_options_to_json(const HealthOptions& o) {
  using nlohmann::ordered_json;
  const ActiveCheckOptions& a = o.active;
  ordered_json statuses = ordered_json::array();
  for (const auto& [lo, hi] : a.expected_statuses) {
    if (lo == hi)
      statuses.push_back(lo);
    else
      statuses.push_back(std::to_string(lo) + "-" + std::to_string(hi));
  }
  const char* kind = a.kind == ActiveCheckOptions::Kind::http  ? "http"
                     : a.kind == ActiveCheckOptions::Kind::tcp ? "tcp"
                                                               : "none";
  return ordered_json{
      {"active",
       {{"type", kind},
        {"path", a.path},
        {"host_header", a.host_header},
        {"expected_statuses", statuses},
        {"timeout_ms", a.timeout.count()},
        {"interval_ms", a.interval.count()},
        {"healthy_threshold", a.healthy_threshold},
        {"unhealthy_threshold", a.unhealthy_threshold},
        {"max_concurrent", a.max_concurrent}}},
      {"passive",
       {{"max_fails", o.passive.max_fails},
        {"fail_timeout_ms", o.passive.fail_timeout.count()},
        {"fail_statuses", o.passive.fail_statuses}}},
      {"outlier",
       {{"enabled", o.outlier.enabled},
        {"consecutive_5xx", o.outlier.consecutive_5xx},
        {"consecutive_gateway_failure", o.outlier.consecutive_gateway_failure},
        {"base_ejection_ms", o.outlier.base_ejection_time.count()},
        {"max_ejection_ms", o.outlier.max_ejection_time.count()},
        {"max_ejection_percent", o.outlier.max_ejection_percent}}},
      {"panic",
       {{"threshold_percent", o.panic.threshold_percent},
        {"mode", o.panic.mode == PanicOptions::Mode::all ? "all" : "fail"}}},
      {"slow_start",
       {{"window_ms", o.slow_start.window.count()},
        {"aggression", o.slow_start.aggression},
        {"min_weight_percent", o.slow_start.min_weight_percent}}}};
}

DYNUP_NAMESPACE_END
