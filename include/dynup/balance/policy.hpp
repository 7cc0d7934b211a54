// make_policy: a balancing policy by name, with its options checked.
#pragma once

#include <dynup/balance/ewma.hpp>
#include <dynup/balance/least_request.hpp>
#include <dynup/balance/maglev.hpp>
#include <dynup/balance/picker.hpp>
#include <dynup/balance/random.hpp>
#include <dynup/balance/ring_hash.hpp>
#include <dynup/balance/round_robin.hpp>
#include <dynup/result.hpp>
#include <dynup/version.hpp>

#include <nlohmann/json.hpp>

#include <memory>
#include <string>
#include <string_view>

DYNUP_NAMESPACE_BEGIN

/// The policies make_policy knows, in documentation order.
inline constexpr const char* policy_names[] = {"round_robin", "random", "least_request", "ewma", "ring_hash", "maglev"};

/// Creates a policy. An unknown name or option is an Errc::invalid_argument error that
/// lists the valid ones. Options are a JSON object (null means defaults).
inline Result<std::unique_ptr<Policy>> make_policy(std::string_view name,
                                                   const nlohmann::json& options = nullptr) {
  if (name == "round_robin") return RoundRobinPolicy::create(options);
  if (name == "random") return RandomPolicy::create(options);
  if (name == "least_request") return LeastRequestPolicy::create(options);
  if (name == "ewma") return EwmaPolicy::create(options);
  if (name == "ring_hash") return RingHashPolicy::create(options);
  if (name == "maglev") return MaglevPolicy::create(options);
  std::string valid;
  for (const char* n : policy_names) valid += (valid.empty() ? "" : ", ") + std::string(n);
  return Error(Errc::invalid_argument, "unknown policy \"" + std::string(name) + "\" (valid: " + valid + ")");
}

DYNUP_NAMESPACE_END
