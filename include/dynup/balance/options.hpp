// Reading a policy's JSON options with errors that name the option and list valid ones.
#pragma once

#include <dynup/result.hpp>
#include <dynup/version.hpp>

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <optional>
#include <string>
#include <vector>

DYNUP_NAMESPACE_BEGIN
namespace detail {

/// Validates one policy's options object. Construct, check `error()`, then read values;
/// the first problem found is kept and reported. Not thread-safe; build time only.
class OptionReader {
public:
  OptionReader(const char* policy, const nlohmann::json& options, std::initializer_list<const char*> known)
      : policy_(policy), options_(options), known_(known) {
    if (options_.is_null()) return;
    if (!options_.is_object()) {
      fail("options must be a JSON object, got " + std::string(options_.type_name()));
      return;
    }
    for (auto it = options_.begin(); it != options_.end(); ++it) {
      bool ok = false;
      for (const char* k : known_) ok = ok || it.key() == k;
      if (!ok) {
        fail("unknown option \"" + it.key() + "\" (valid: " + valid_list() + ")");
        return;
      }
    }
  }

  bool has(const char* key) const { return options_.is_object() && options_.contains(key); }
  const nlohmann::json* raw(const char* key) const {
    if (!has(key)) return nullptr;
    return &options_.at(key);
  }

  /// An integer option in [lo, hi], or `fallback` when absent.
  std::uint64_t integer(const char* key, std::uint64_t fallback, std::uint64_t lo, std::uint64_t hi) {
    const nlohmann::json* v = raw(key);
    if (!v) return fallback;
    bool non_negative = v->is_number_unsigned() || (v->is_number_integer() && v->get<std::int64_t>() >= 0);
    if (!non_negative || v->get<std::uint64_t>() < lo || v->get<std::uint64_t>() > hi) {
      fail("option \"" + std::string(key) + "\" must be an integer " + std::to_string(lo) + ".." +
           std::to_string(hi) + ", got " + v->dump());
      return fallback;
    }
    return v->get<std::uint64_t>();
  }

  /// A finite number option in [lo, hi], or `fallback` when absent.
  double number(const char* key, double fallback, double lo, double hi) {
    const nlohmann::json* v = raw(key);
    if (!v) return fallback;
    if (!v->is_number() || !std::isfinite(v->get<double>()) || v->get<double>() < lo || v->get<double>() > hi) {
      fail("option \"" + std::string(key) + "\" must be a number in [" + fmt(lo) + ", " + fmt(hi) + "], got " +
           v->dump());
      return fallback;
    }
    return v->get<double>();
  }

  void fail(const std::string& what) {
    if (!error_) error_ = Error(Errc::invalid_argument, std::string("policy ") + policy_ + ": " + what);
  }
  /// The first problem, if any.
  const Error* error() const noexcept { return error_ ? &*error_ : nullptr; }

private:
  static std::string fmt(double v) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%g", v);
    return buf;
  }
  std::string valid_list() const {
    std::string s;
    for (const char* k : known_) s += (s.empty() ? "" : ", ") + std::string(k);
    return s.empty() ? "none" : s;
  }

  const char* policy_;
  const nlohmann::json& options_;
  std::vector<const char*> known_;
  std::optional<Error> error_;
};

} // namespace detail
DYNUP_NAMESPACE_END
