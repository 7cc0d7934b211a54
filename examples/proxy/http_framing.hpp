// HTTP/1.1 request framing (RFC 9112 sections 2-7): where a request's head ends, how long
// its body is, and which requests are refused because two parties could frame them
// differently (request smuggling). dynup-proxy frames every request itself and hands
// cpp-httplib only a normalized copy (one Content-Length, no Transfer-Encoding), so
// cpp-httplib's own, laxer framing never decides where a message ends.
#pragma once

#include <algorithm>
#include <cctype>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace dynup_proxy::http {

/// A refusal: the status to answer, and why (said to the client). Every refusal closes
/// the connection: after a framing error the next byte's place in the stream is unknown.
struct Refusal {
  int status = 0;
  std::string reason;
};

/// A request head that passed the framing rules.
struct Head {
  std::string method, target, version;                  ///< version: "HTTP/1.1" or "HTTP/1.0"
  std::vector<std::pair<std::string, std::string>> fields; ///< in order, values trimmed
  bool chunked = false;
  std::uint64_t content_length = 0; ///< when not chunked; 0 without Content-Length (RFC 9112 6.3 rule 7)
  bool close = false;               ///< the client asked for the connection to end after this request
  bool expect_continue = false;
};

namespace detail {

inline char lower(char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; }

inline bool iequals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (lower(a[i]) != lower(b[i])) return false;
  return true;
}

// tchar (RFC 9110 5.6.2).
inline bool tchar(unsigned char c) {
  if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) return true;
  for (char t : std::string_view("!#$%&'*+-.^_`|~"))
    if (c == static_cast<unsigned char>(t)) return true;
  return false;
}

inline bool token(std::string_view s) {
  if (s.empty()) return false;
  for (char c : s)
    if (!tchar(static_cast<unsigned char>(c))) return false;
  return true;
}

inline std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

// The members of a comma-separated list field, trimmed, empty members dropped.
inline std::vector<std::string_view> list_members(std::string_view v) {
  std::vector<std::string_view> out;
  while (true) {
    const std::size_t comma = v.find(',');
    std::string_view m = trim(v.substr(0, comma));
    if (!m.empty()) out.push_back(m);
    if (comma == std::string_view::npos) break;
    v.remove_prefix(comma + 1);
  }
  return out;
}

// A Host value: empty, or reg-name / IP-literal / IPv4 with an optional port; the
// characters RFC 3986's authority allows, without userinfo.
inline bool host_value(std::string_view v) {
  for (char c : v) {
    const auto u = static_cast<unsigned char>(c);
    const bool ok = (u >= '0' && u <= '9') || (u >= 'a' && u <= 'z') || (u >= 'A' && u <= 'Z') ||
                    std::string_view("-._~!$&'()*+,;=%:[]").find(c) != std::string_view::npos;
    if (!ok) return false;
  }
  return true;
}

} // namespace detail

/// Where the head ends in `in`: the offset just past its empty line, 0 while it is
/// incomplete. Lines end with CRLF or a bare LF (RFC 9112 2.2 allows a recipient either);
/// empty lines before the request line are skipped (2.2 as well). `scanned` carries the
/// search over from one call to the next, as bytes arrive: a head sent a byte at a time
/// costs O(length), not O(length²).
inline std::size_t head_end(std::string_view in, std::size_t& scanned) {
  std::size_t start = 0;
  while (start < in.size() && (in[start] == '\r' || in[start] == '\n')) ++start;
  for (std::size_t nl = in.find('\n', std::max(start, scanned)); nl != std::string_view::npos;
       nl = in.find('\n', nl + 1)) {
    if (nl + 1 < in.size() && in[nl + 1] == '\n') return nl + 2;
    if (nl + 2 < in.size() && in[nl + 1] == '\r' && in[nl + 2] == '\n') return nl + 3;
  }
  scanned = in.size() > 3 ? in.size() - 3 : 0; // an end split across two reads is found next time
  return 0;
}

/// Parses and checks a complete head (`head_end` bytes of it). A refusal follows RFC 9112:
/// 400 for a malformed line, whitespace before a field's colon (5.1), obs-fold (5.2), a
/// missing or repeated Host (3.2), an invalid or conflicting Content-Length (6.3 rule 5),
/// Content-Length beside Transfer-Encoding (6.1, 6.3 rule 3), a Transfer-Encoding whose
/// final coding is not chunked (6.3 rule 4) or that an HTTP/1.0 request carries (6.1);
/// 501 for a transfer coding other than chunked (6.1); 505 for an HTTP major version other
/// than 1.
inline std::optional<Refusal> parse_head(std::string_view in, Head& out) {
  auto bad = [](std::string why) { return Refusal{400, std::move(why)}; };
  std::vector<std::string_view> lines;
  while (!in.empty() && (in.front() == '\r' || in.front() == '\n')) in.remove_prefix(1);
  while (!in.empty()) {
    const std::size_t nl = in.find('\n');
    std::string_view line = in.substr(0, nl);
    in.remove_prefix(nl == std::string_view::npos ? in.size() : nl + 1);
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.empty()) break;
    lines.push_back(line);
  }
  if (lines.empty()) return bad("no request line");
  for (std::string_view line : lines)
    for (char c : line) {
      const auto u = static_cast<unsigned char>(c);
      if ((u < 0x20 && c != '\t') || u == 0x7f) return bad("a control character (CR, NUL…) inside a line");
    }

  const std::string_view rl = lines[0];
  const std::size_t sp1 = rl.find(' ');
  const std::size_t sp2 = sp1 == std::string_view::npos ? sp1 : rl.find(' ', sp1 + 1);
  if (sp2 == std::string_view::npos || rl.find(' ', sp2 + 1) != std::string_view::npos)
    return bad("the request line is not METHOD SP TARGET SP HTTP-VERSION");
  out.method = std::string(rl.substr(0, sp1));
  out.target = std::string(rl.substr(sp1 + 1, sp2 - sp1 - 1));
  out.version = std::string(rl.substr(sp2 + 1));
  if (!detail::token(out.method)) return bad("the method is not a token");
  if (out.target.empty() || out.target.find('\t') != std::string::npos) return bad("the request target is empty or has a tab");
  const std::string& v = out.version;
  if (v.size() != 8 || v.compare(0, 5, "HTTP/") != 0 || v[6] != '.' || v[5] < '0' || v[5] > '9' || v[7] < '0' ||
      v[7] > '9')
    return bad("the HTTP version is not HTTP/DIGIT.DIGIT");
  if (v[5] != '1') return Refusal{505, "only HTTP/1.x is served here"};
  const bool http10 = v[7] == '0';
  out.version = http10 ? "HTTP/1.0" : "HTTP/1.1";

  std::size_t hosts = 0;
  std::optional<std::uint64_t> length;
  std::vector<std::string> codings;
  bool has_te = false, keep_alive = false;
  for (std::size_t i = 1; i < lines.size(); ++i) {
    const std::string_view line = lines[i];
    if (line.front() == ' ' || line.front() == '\t') return bad("a folded header line (obs-fold)");
    const std::size_t colon = line.find(':');
    if (colon == std::string_view::npos) return bad("a header line without a colon");
    const std::string_view name = line.substr(0, colon);
    if (!name.empty() && (name.back() == ' ' || name.back() == '\t'))
      return bad("whitespace between a header name and its colon");
    if (!detail::token(name)) return bad("a header name that is not a token");
    const std::string_view value = detail::trim(line.substr(colon + 1));
    out.fields.emplace_back(std::string(name), std::string(value));
    if (detail::iequals(name, "Host")) {
      if (++hosts > 1) return bad("more than one Host header");
      if (!detail::host_value(value)) return bad("the Host header is not a host[:port]");
    } else if (detail::iequals(name, "Content-Length")) {
      const auto members = detail::list_members(value);
      if (members.empty()) return bad("an empty Content-Length");
      for (std::string_view m : members) {
        if (m.size() > 18 || m.find_first_not_of("0123456789") != std::string_view::npos)
          return bad("Content-Length \"" + std::string(value) + "\" is not a decimal length");
        const std::uint64_t n = std::stoull(std::string(m));
        if (length && *length != n) return bad("Content-Length given twice with different values");
        length = n;
      }
    } else if (detail::iequals(name, "Transfer-Encoding")) {
      has_te = true;
      for (std::string_view m : detail::list_members(value)) {
        std::string coding(detail::trim(m.substr(0, m.find(';'))));
        for (char& c : coding) c = detail::lower(c);
        codings.push_back(std::move(coding));
      }
    } else if (detail::iequals(name, "Connection")) {
      for (std::string_view m : detail::list_members(value)) {
        if (detail::iequals(m, "close")) out.close = true;
        if (detail::iequals(m, "keep-alive")) keep_alive = true;
      }
    } else if (detail::iequals(name, "Expect")) {
      out.expect_continue = detail::iequals(value, "100-continue");
    }
  }
  if (hosts == 0 && !http10) return bad("an HTTP/1.1 request without a Host header");
  if (http10 && !keep_alive) out.close = true;
  if (has_te) {
    if (length) return bad("both Content-Length and Transfer-Encoding");
    if (http10) return bad("Transfer-Encoding in an HTTP/1.0 request");
    if (codings.empty() || codings.back() != "chunked") return bad("Transfer-Encoding whose final coding is not chunked");
    for (std::size_t i = 0; i + 1 < codings.size(); ++i)
      if (codings[i] == "chunked") return bad("chunked applied more than once");
    if (codings.size() > 1) return Refusal{501, "transfer coding \"" + codings.front() + "\" is not supported (only chunked)"};
    out.chunked = true;
  }
  out.content_length = length.value_or(0);
  return std::nullopt;
}

/// Decodes a chunked body (RFC 9112 7.1) as its bytes arrive. Chunk lines must end in
/// CRLF (a bare LF is one of the ambiguities smuggling uses); extensions are skipped,
/// trailer fields read and dropped.
class ChunkedBody {
public:
  enum class Step { more, done, refused };

  /// Consumes what it can of `in` from `pos` (advancing it); the decoded bytes go to
  /// body(). `max_body` bounds the decoded size (a refusal with 413 past it).
  Step feed(std::string_view in, std::size_t& pos, std::size_t max_body, Refusal& why) {
    constexpr std::size_t max_line = 4096;
    while (true) {
      if (state_ == State::data) {
        const std::size_t n = std::min<std::size_t>(static_cast<std::size_t>(remaining_), in.size() - pos);
        body_.append(in.data() + pos, n);
        pos += n;
        remaining_ -= n;
        if (remaining_ > 0) return Step::more;
        state_ = State::data_end;
      }
      if (state_ == State::data_end) {
        if (in.size() - pos < 2) return Step::more;
        if (in.compare(pos, 2, "\r\n") != 0) return refuse(why, 400, "chunk data not followed by CRLF");
        pos += 2;
        state_ = State::size_line;
      }
      const std::size_t nl = in.find('\n', pos);
      if (nl == std::string_view::npos) {
        if (in.size() - pos > max_line) return refuse(why, 400, "a chunk line longer than 4096 bytes");
        return Step::more;
      }
      if (nl == pos || in[nl - 1] != '\r') return refuse(why, 400, "a chunk line not ended by CRLF");
      const std::string_view line = in.substr(pos, nl - 1 - pos);
      pos = nl + 1;
      if (state_ == State::trailers) {
        if (line.empty()) return Step::done;
        trailer_bytes_ += line.size();
        if (trailer_bytes_ > max_line) return refuse(why, 400, "trailer fields longer than 4096 bytes");
        continue;
      }
      std::size_t digits = 0;
      std::uint64_t size = 0;
      while (digits < line.size() && std::isxdigit(static_cast<unsigned char>(line[digits]))) {
        if (digits == 15) return refuse(why, 400, "a chunk size of more than 15 hex digits");
        const char c = detail::lower(line[digits]);
        size = size * 16 + static_cast<std::uint64_t>(c <= '9' ? c - '0' : c - 'a' + 10);
        ++digits;
      }
      const std::string_view ext = detail::trim(line.substr(digits));
      if (digits == 0 || (!ext.empty() && ext.front() != ';')) return refuse(why, 400, "a malformed chunk size line");
      if (size > max_body - std::min(max_body, body_.size()))
        return refuse(why, 413, "a request body larger than " + std::to_string(max_body) + " bytes");
      if (size == 0) {
        state_ = State::trailers;
      } else {
        remaining_ = size;
        state_ = State::data;
      }
    }
  }

  std::string& body() noexcept { return body_; }

private:
  enum class State { size_line, data, data_end, trailers };
  static Step refuse(Refusal& why, int status, std::string reason) {
    why = Refusal{status, std::move(reason)};
    return Step::refused;
  }
  State state_ = State::size_line;
  std::uint64_t remaining_ = 0;
  std::size_t trailer_bytes_ = 0;
  std::string body_;
};

/// The request as cpp-httplib is given it: the same request line and fields, less those
/// that framed it here (Content-Length, Transfer-Encoding, Expect: answered already), and
/// one Content-Length for the body that follows.
inline std::string normalized(const Head& h, std::string_view body) {
  std::string out;
  out.reserve(256 + body.size());
  out += h.method + " " + h.target + " " + h.version + "\r\n";
  for (const auto& [name, value] : h.fields) {
    if (detail::iequals(name, "Content-Length") || detail::iequals(name, "Transfer-Encoding") ||
        detail::iequals(name, "Expect"))
      continue;
    out += name + ": " + value + "\r\n";
  }
  out += "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n";
  out.append(body.data(), body.size());
  return out;
}

/// The standard reason phrase of the statuses this layer answers itself.
inline const char* reason_phrase(int status) {
  switch (status) {
  case 100: return "Continue";
  case 400: return "Bad Request";
  case 408: return "Request Timeout";
  case 413: return "Content Too Large";
  case 431: return "Request Header Fields Too Large";
  case 501: return "Not Implemented";
  case 503: return "Service Unavailable";
  case 505: return "HTTP Version Not Supported";
  default: return "Error";
  }
}

} // namespace dynup_proxy::http
