// Errors as values: every fallible dynup call returns Result<T>.
#pragma once

#include <dynup/version.hpp>

#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>

DYNUP_NAMESPACE_BEGIN

/// What kind of failure an Error reports. Stable: embedders may switch on it.
enum class Errc {
  invalid_argument, ///< a caller-supplied value is out of range or malformed
  invalid_peer,     ///< a peer or peer set failed validation
  parse_error,      ///< a document is not valid JSON or not in the expected shape
  io_error,         ///< a system call failed (the message carries errno text)
  not_found,        ///< a file, key or service does not exist
  corrupt,          ///< stored data is truncated or its checksum does not match
  unsupported,      ///< a scheme, option or format version this build does not know
  unavailable,      ///< a remote registry could not be reached or answered an error
  rejected,         ///< a guard refused an update (empty set, too much churn)
  too_large,        ///< data exceeds a configured capacity or limit
  canceled,         ///< the operation was stopped on request (stop(), shutdown)
  timeout,          ///< no answer within the configured time
};

/// Short stable name of an error code, e.g. "parse_error".
constexpr const char* to_string(Errc code) noexcept {
  switch (code) {
  case Errc::invalid_argument: return "invalid_argument";
  case Errc::invalid_peer: return "invalid_peer";
  case Errc::parse_error: return "parse_error";
  case Errc::io_error: return "io_error";
  case Errc::not_found: return "not_found";
  case Errc::corrupt: return "corrupt";
  case Errc::unsupported: return "unsupported";
  case Errc::unavailable: return "unavailable";
  case Errc::rejected: return "rejected";
  case Errc::too_large: return "too_large";
  case Errc::canceled: return "canceled";
  case Errc::timeout: return "timeout";
  }
  return "unknown";
}

/// An error code plus a message written for the operator who will read it in a log.
class Error {
public:
  Error(Errc code, std::string message) : code_(code), message_(std::move(message)) {}

  Errc code() const noexcept { return code_; }
  const std::string& message() const noexcept { return message_; }

  /// A copy whose message is prefixed with context, e.g. "peers.json: " + message.
  Error with_context(const std::string& context) const {
    return Error(code_, context + ": " + message_);
  }

  friend bool operator==(const Error& a, const Error& b) {
    return a.code_ == b.code_ && a.message_ == b.message_;
  }

private:
  Errc code_;
  std::string message_;
};

/// Thrown only by Result::value() when the result holds an error: a programming bug,
/// never an expected failure path.
class bad_result_access : public std::logic_error {
public:
  explicit bad_result_access(const Error& e)
      : std::logic_error("dynup::Result::value() on an error: " + e.message()) {}
};

/// Either a T or an Error. Converts to true when it holds a value.
/// Not thread-safe for concurrent mutation (like any value type).
template <class T> class [[nodiscard]] Result {
  static_assert(!std::is_same_v<std::decay_t<T>, Error>, "Result<Error> is ambiguous");

public:
  Result(const T& value) : v_(std::in_place_index<0>, value) {}
  Result(T&& value) : v_(std::in_place_index<0>, std::move(value)) {}
  Result(Error error) : v_(std::in_place_index<1>, std::move(error)) {}

  bool ok() const noexcept { return v_.index() == 0; }
  explicit operator bool() const noexcept { return ok(); }

  T& value() & { check(); return std::get<0>(v_); }
  const T& value() const& { check(); return std::get<0>(v_); }
  T&& value() && { check(); return std::get<0>(std::move(v_)); }

  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

  /// The error; precondition: !ok().
  const Error& error() const& { return std::get<1>(v_); }
  Error&& error() && { return std::get<1>(std::move(v_)); }

  template <class U> T value_or(U&& fallback) const& {
    return ok() ? std::get<0>(v_) : static_cast<T>(std::forward<U>(fallback));
  }

private:
  void check() const {
    if (!ok()) throw bad_result_access(std::get<1>(v_));
  }
  std::variant<T, Error> v_;
};

/// Success without a value, or an Error.
template <> class [[nodiscard]] Result<void> {
public:
  Result() = default;
  Result(Error error) : error_(std::move(error)), ok_(false) {}

  bool ok() const noexcept { return ok_; }
  explicit operator bool() const noexcept { return ok_; }
  void value() const {
    if (!ok_) throw bad_result_access(error_);
  }
  const Error& error() const& { return error_; }

private:
  Error error_{Errc::invalid_argument, ""};
  bool ok_ = true;
};

DYNUP_NAMESPACE_END
