// Splits a byte stream of concatenated JSON objects ({…}{…} or one per line, as the
// etcd v3 gateway streams a watch) into one object's text at a time, whatever the
// chunking: an object split across chunks waits for the rest, a chunk holding several
// objects yields them in order.
#pragma once

#include <dynup/result.hpp>
#include <dynup/version.hpp>

#include <cstddef>
#include <cstdio>
#include <optional>
#include <string>
#include <string_view>

DYNUP_NAMESPACE_BEGIN
namespace detail {

/// Finds object boundaries by counting brackets outside strings; it does not validate
/// what is inside (the caller parses each object). Whitespace between objects is
/// skipped; any other byte there, or an object larger than `max_object_bytes`, is an
/// error after which the splitter stays failed (a stream out of step cannot be resynced).
/// Amortized O(1) per byte; no exceptions. Not thread-safe.
class JsonObjectSplitter {
public:
  explicit JsonObjectSplitter(std::size_t max_object_bytes) : max_(max_object_bytes) {}

  /// Appends bytes. Allocates as the buffer grows; ignored once failed.
  void feed(std::string_view bytes) {
    if (!failed_) buf_.append(bytes.data(), bytes.size());
  }

  /// The next complete object's text; nullopt when more bytes are needed; an Error
  /// (parse_error or too_large, naming the stream offset) when the stream is broken.
  std::optional<Result<std::string>> next() {
    if (failed_) return Result<std::string>(*failed_);
    while (scan_ < buf_.size()) {
      char c = buf_[scan_];
      if (depth_ == 0) {
        if (c == ' ' || c == '\t' || c == '\r' || c == '\n') {
          ++scan_;
          continue;
        }
        if (c != '{') return fail(Errc::parse_error, "expected '{' at stream offset " + offset_text(scan_) +
                                                         ", got " + byte_text(c));
        start_ = scan_;
        depth_ = 1;
        ++scan_;
        continue;
      }
      ++scan_;
      if (in_string_) {
        if (escape_)
          escape_ = false;
        else if (c == '\\')
          escape_ = true;
        else if (c == '"')
          in_string_ = false;
        continue;
      }
      if (c == '"') {
        in_string_ = true;
      } else if (c == '{' || c == '[') {
        ++depth_;
      } else if (c == '}' || c == ']') {
        if (--depth_ == 0) {
          if (scan_ - start_ > max_) return too_large();
          std::string object = buf_.substr(start_, scan_ - start_);
          consume(scan_);
          return Result<std::string>(std::move(object));
        }
      }
    }
    if (depth_ == 0)
      consume(scan_); // only whitespace was left
    else if (scan_ - start_ > max_)
      return too_large();
    return std::nullopt;
  }

  bool failed() const noexcept { return failed_.has_value(); }
  /// Bytes received and not yet returned as an object (a partial object at stream end).
  std::size_t pending() const noexcept { return buf_.size() - (depth_ == 0 ? scan_ : start_); }

private:
  std::optional<Result<std::string>> fail(Errc code, std::string why) {
    failed_ = Error(code, "watch stream: " + std::move(why));
    buf_.clear();
    buf_.shrink_to_fit();
    return Result<std::string>(*failed_);
  }

  std::optional<Result<std::string>> too_large() {
    return fail(Errc::too_large, "a JSON object at stream offset " + offset_text(start_) + " exceeds " +
                                     std::to_string(max_) + " bytes");
  }

  // Marks buf_[0, n) as done. The bytes are dropped only once they are at least half
  // the buffer, so a chunk holding many objects is not shifted once per object.
  void consume(std::size_t n) {
    head_ = n;
    start_ = n;
    if (head_ == buf_.size() || (head_ >= 4096 && head_ * 2 >= buf_.size())) {
      buf_.erase(0, head_);
      consumed_ += head_;
      scan_ -= head_;
      start_ = 0;
      head_ = 0;
    }
  }

  std::string offset_text(std::size_t at) const { return std::to_string(consumed_ + at); }

  static std::string byte_text(char c) {
    auto u = static_cast<unsigned char>(c);
    if (u >= 0x20 && u < 0x7f) return std::string("'") + c + "'";
    char hex[8];
    std::snprintf(hex, sizeof hex, "0x%02x", u);
    return hex;
  }

  std::size_t max_;
  std::string buf_;
  std::size_t scan_ = 0;     // next byte of buf_ to look at
  std::size_t start_ = 0;    // where the object being scanned starts (depth_ > 0)
  std::size_t head_ = 0;     // buf_[0, head_) is done but not yet dropped
  std::size_t consumed_ = 0; // bytes dropped from the front, for error offsets
  std::size_t depth_ = 0;
  bool in_string_ = false;
  bool escape_ = false;
  std::optional<Error> failed_;
};

} // namespace detail
DYNUP_NAMESPACE_END
