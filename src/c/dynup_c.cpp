// libdynup_c: the C ABI of include/dynup/c/dynup.h over dynup::Upstream. The one
// compiled file of dynup. Every symbol but the dynup_* functions is hidden (visibility
// and dynup_c.map), so the C++ inside never clashes with a host's own copy of it.
//
// A live dynup_selection holds the dynup::UpstreamSelection itself, placement-new'd into
// its opaque_ words: a pick costs no allocation and no shared state, and the selection
// lives exactly as long as the caller's memory says. opaque_[0] holds the tag of the
// handle that made it live (0 once ended), so a report on a zeroed, ended or foreign
// selection is refused instead of reading garbage.
#include <dynup/c/dynup.h>

#include <dynup/upstream.hpp>

#include <nlohmann/json.hpp>
#include <fcntl.h>
#include <pthread.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

// The errors the upstream's threads report, kept for dynup_errors_since: no dynup thread
// calls into its host, so the host's own thread collects them to log.
struct dynup_errors {
  std::mutex mu;
  std::string last;
  std::uint64_t count = 0;
};

struct dynup_upstream {
  std::shared_ptr<dynup_errors> errors = std::make_shared<dynup_errors>();
  std::unique_ptr<dynup::Upstream> up;
  std::uint64_t tag = 0;             ///< marks the selections this handle made live
  std::uint64_t fork_generation = 0; ///< forks seen by this process when it was created
  pid_t pid = 0;                     ///< the creating process, for the DYNUP_E_FORKED message
};

namespace {

using dynup::UpstreamSelection;

constexpr std::size_t held_word = 1; // opaque_[0] is the tag
static_assert(sizeof(UpstreamSelection) <= sizeof(dynup_selection::opaque_) - held_word * sizeof(std::uint64_t),
              "UpstreamSelection outgrew dynup_selection::opaque_: enlarge it and bump DYNUP_C_ABI_VERSION");
static_assert(alignof(UpstreamSelection) <= alignof(std::uint64_t), "opaque_ is only 8-byte aligned");
static_assert(std::is_standard_layout_v<dynup_selection>, "dynup_selection is a C struct");
static_assert(sizeof(dynup_selection) == 664, "dynup_selection's layout is ABI: bump DYNUP_C_ABI_VERSION");

// Bumped in every child of a fork: a handle made before it belongs to the parent, whose
// threads the child does not have and whose mutexes may have been held when it forked.
std::atomic<std::uint64_t> forks{0};
extern "C" void count_fork() { forks.fetch_add(1, std::memory_order_relaxed); }
void watch_forks() {
  static const int registered = ::pthread_atfork(nullptr, nullptr, &count_fork);
  (void)registered;
}

bool forked(const dynup_upstream* h) noexcept {
  return h->fork_generation != forks.load(std::memory_order_relaxed);
}

// Distinct for every handle of this process and unlikely in zeroed or stale memory.
std::uint64_t next_tag() noexcept {
  static std::atomic<std::uint64_t> serial{0};
  std::uint64_t x = serial.fetch_add(1, std::memory_order_relaxed) + 1;
  x ^= static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count()) << 20;
  x ^= static_cast<std::uint64_t>(::getpid()) << 44;
  x += 0x9e3779b97f4a7c15ULL; // splitmix64
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x | 1; // never 0, the "not live" tag
}

UpstreamSelection* held(dynup_selection* s) noexcept {
  return std::launder(reinterpret_cast<UpstreamSelection*>(&s->opaque_[held_word]));
}

bool live(const dynup_upstream* h, const dynup_selection* s) noexcept { return s->opaque_[0] == h->tag; }

// Ends the live selection `s` of `h`: reports `outcome`, or cancels when it is null.
void end(dynup_upstream* h, dynup_selection* s, const dynup::Outcome* outcome) noexcept {
  UpstreamSelection* sel = held(s);
  if (outcome)
    h->up->report(*sel, *outcome);
  else
    sel->cancel();
  sel->~UpstreamSelection();
  s->opaque_[0] = 0;
}

void write_err(char* err, std::size_t len, std::string_view msg) noexcept {
  if (err == nullptr || len == 0) return;
  std::size_t n = std::min(msg.size(), len - 1);
  std::memcpy(err, msg.data(), n);
  err[n] = '\0';
}

int fail(char* err, std::size_t len, int rc, std::string_view msg) noexcept {
  write_err(err, len, msg);
  return rc;
}

void write_forked(const dynup_upstream* h, char* err, std::size_t len) noexcept {
  if (err == nullptr || len == 0) return;
  std::snprintf(err, len,
                "dynup: this handle belongs to process %ld, not to this child of a fork: create handles "
                "after forking (nginx: in init_worker_by_lua, not init_by_lua)",
                static_cast<long>(h->pid));
}

int rc_of(dynup::PickError e) noexcept {
  switch (e) {
  case dynup::PickError::none: return DYNUP_OK;
  case dynup::PickError::no_peers: return DYNUP_E_NO_PEERS;
  case dynup::PickError::all_unavailable: return DYNUP_E_ALL_UNAVAILABLE;
  case dynup::PickError::all_tried: return DYNUP_E_ALL_TRIED;
  }
  return DYNUP_E_INTERNAL;
}

void clear_public(dynup_selection* s) noexcept {
  s->id_hash = 0;
  s->port = 0;
  s->host_len = 0;
  s->peer_id_len = 0;
  s->reserved_ = 0;
  s->host[0] = '\0';
  s->peer_id[0] = '\0';
}

std::uint16_t copy_text(char* dst, std::size_t cap, const std::string& src) noexcept {
  std::size_t n = std::min(src.size(), cap - 1); // peer validation keeps both within cap
  std::memcpy(dst, src.data(), n);
  dst[n] = '\0';
  return static_cast<std::uint16_t>(n);
}

// nlohmann's what() starts with "[json.exception.parse_error.101] ": the rest is the news.
std::string_view without_json_prefix(std::string_view what) noexcept {
  if (!what.empty() && what.front() == '[') {
    auto close = what.find("] ");
    if (close != std::string_view::npos) return what.substr(close + 2);
  }
  return what;
}

std::string error_json(std::string_view message) {
  return nlohmann::json{{"error", message}}.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

// Parses a config document into `doc`; false with "upstream: invalid JSON: …" in err.
// Throws only what allocation throws.
bool parse_config(const char* json_config, nlohmann::json& doc, char* err, std::size_t err_len) {
  try {
    doc = nlohmann::json::parse(json_config);
    return true;
  } catch (const nlohmann::json::exception& e) {
    write_err(err, err_len, "upstream: invalid JSON: " + std::string(without_json_prefix(e.what())));
    return false;
  }
}

constexpr char failed_json[] = R"json({"error":"dynup_status: the status could not be built (out of memory?)"})json";

} // namespace

extern "C" {

DYNUP_C_API const char* dynup_version(void) { return DYNUP_VERSION_STRING; }

DYNUP_C_API int dynup_abi_version(void) { return DYNUP_C_ABI_VERSION; }

DYNUP_C_API size_t dynup_selection_size(void) { return sizeof(dynup_selection); }

DYNUP_C_API const char* dynup_strerror(int rc) {
  switch (rc) {
  case DYNUP_OK: return "ok";
  case DYNUP_E_ARGUMENT: return "invalid argument";
  case DYNUP_E_NO_PEERS: return dynup::to_string(dynup::PickError::no_peers);
  case DYNUP_E_ALL_UNAVAILABLE: return dynup::to_string(dynup::PickError::all_unavailable);
  case DYNUP_E_ALL_TRIED: return dynup::to_string(dynup::PickError::all_tried);
  case DYNUP_E_NOT_LIVE: return "selection not live";
  case DYNUP_E_FORKED: return "handle created before a fork";
  case DYNUP_E_INTERNAL: return "internal error";
  default: return "unknown error code";
  }
}

DYNUP_C_API dynup_upstream* dynup_upstream_new(const char* json_config, char* err, size_t err_len) {
  if (json_config == nullptr) {
    write_err(err, err_len, "dynup_upstream_new: the config is NULL");
    return nullptr;
  }
  try {
    watch_forks();
    nlohmann::json doc;
    if (!parse_config(json_config, doc, err, err_len)) return nullptr;
    auto h = std::make_unique<dynup_upstream>();
    h->fork_generation = forks.load(std::memory_order_relaxed);
    h->pid = ::getpid();
    h->tag = next_tag();
    auto started = dynup::Upstream::start(doc, dynup::steady_clock(), [errors = h->errors](const dynup::Error& e) {
      std::lock_guard<std::mutex> lock(errors->mu);
      errors->last = e.message();
      ++errors->count;
    });
    if (!started) {
      write_err(err, err_len, started.error().message());
      return nullptr;
    }
    h->up = std::move(started).value();
    return h.release();
  } catch (const std::exception& e) {
    if (err != nullptr && err_len > 0) std::snprintf(err, err_len, "dynup_upstream_new: %s", e.what());
  } catch (...) {
    write_err(err, err_len, "dynup_upstream_new: unknown exception");
  }
  return nullptr;
}

DYNUP_C_API int dynup_config_check(const char* json_config, char* err, size_t err_len) {
  if (json_config == nullptr) return fail(err, err_len, DYNUP_E_ARGUMENT, "dynup_config_check: the config is NULL");
  try {
    nlohmann::json doc;
    if (!parse_config(json_config, doc, err, err_len)) return DYNUP_E_ARGUMENT;
    auto parsed = dynup::parse_upstream_config(doc);
    if (!parsed) return fail(err, err_len, DYNUP_E_ARGUMENT, parsed.error().message());
    return DYNUP_OK;
  } catch (const std::exception& e) {
    if (err != nullptr && err_len > 0) std::snprintf(err, err_len, "dynup_config_check: %s", e.what());
  } catch (...) {
    write_err(err, err_len, "dynup_config_check: unknown exception");
  }
  return DYNUP_E_INTERNAL;
}

DYNUP_C_API int dynup_source_file_check(const char* spec, char* err, size_t err_len) {
  if (spec == nullptr) return fail(err, err_len, DYNUP_E_ARGUMENT, "dynup_source_file_check: the spec is NULL");
  if (std::strncmp(spec, "file:", 5) != 0) return DYNUP_OK; // dynup_config_check judges the others
  try {
    auto parsed = dynup::parse_source_spec(spec);
    if (!parsed) return fail(err, err_len, DYNUP_E_ARGUMENT, parsed.error().message());
    const int fd = ::open(parsed->path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      const int e = errno;
      return fail(err, err_len, DYNUP_E_ARGUMENT,
                  "cannot read the peer file " + parsed->path + " of source " + spec + ": " + std::strerror(e));
    }
    struct stat st {};
    const bool dir = ::fstat(fd, &st) == 0 && S_ISDIR(st.st_mode);
    ::close(fd);
    if (dir)
      return fail(err, err_len, DYNUP_E_ARGUMENT,
                  "cannot read the peer file " + parsed->path + " of source " + spec + ": it is a directory");
    return DYNUP_OK;
  } catch (const std::exception& e) {
    if (err != nullptr && err_len > 0) std::snprintf(err, err_len, "dynup_source_file_check: %s", e.what());
  }
  return DYNUP_E_INTERNAL;
}

DYNUP_C_API uint64_t dynup_errors_since(dynup_upstream* up, uint64_t* seen, char* buf, size_t len) {
  if (up == nullptr || seen == nullptr || forked(up)) return 0;
  std::lock_guard<std::mutex> lock(up->errors->mu);
  if (up->errors->count <= *seen) return 0;
  const std::uint64_t n = up->errors->count - *seen;
  *seen = up->errors->count;
  write_err(buf, len, up->errors->last);
  return n;
}

DYNUP_C_API void dynup_upstream_free(dynup_upstream* up) {
  if (up == nullptr) return;
  // In a child, the upstream's threads are the parent's: joining them would never
  // return, and its mutexes may be held for good. Leave it be; free only the handle.
  if (forked(up)) (void)up->up.release();
  delete up;
}

DYNUP_C_API int dynup_pick(dynup_upstream* up, const char* key, size_t key_len, const uint64_t* exclude_id_hashes,
                           size_t n_exclude, dynup_selection* out, char* err, size_t err_len) {
  if (up == nullptr || out == nullptr || (n_exclude > 0 && exclude_id_hashes == nullptr))
    return fail(err, err_len, DYNUP_E_ARGUMENT,
                up == nullptr    ? "dynup_pick: the handle is NULL"
                : out == nullptr ? "dynup_pick: the selection is NULL"
                                 : "dynup_pick: n_exclude > 0 but exclude_id_hashes is NULL");
  if (forked(up)) {
    write_forked(up, err, err_len);
    return DYNUP_E_FORKED;
  }
  if (live(up, out))
    return fail(err, err_len, DYNUP_E_ARGUMENT,
                "dynup_pick: the selection is still live: end it with dynup_report or dynup_cancel first");
  try {
    dynup::PickContext ctx;
    if (key != nullptr && key_len > 0) ctx.key = std::string_view(key, key_len);
    UpstreamSelection sel;
    if (n_exclude == 0) {
      sel = up->up->pick(ctx);
    } else {
      dynup::TriedPeers tried; // inline up to 64 peers; more allocate
      for (std::size_t i = 0; i < n_exclude; ++i) tried.add(exclude_id_hashes[i]);
      ctx.tried = &tried;
      sel = up->up->pick(ctx);
    }
    clear_public(out);
    if (!sel) {
      if (err != nullptr && err_len > 0)
        std::snprintf(err, err_len, "upstream %s: %s", up->up->name().c_str(), dynup::to_string(sel.pick.error));
      return rc_of(sel.pick.error);
    }
    out->id_hash = sel.pick.id_hash;
    out->port = sel.peer->port;
    out->host_len = copy_text(out->host, sizeof out->host, sel.peer->host);
    out->peer_id_len = copy_text(out->peer_id, sizeof out->peer_id, sel.peer->id);
    ::new (static_cast<void*>(&out->opaque_[held_word])) UpstreamSelection(std::move(sel));
    out->opaque_[0] = up->tag;
    return DYNUP_OK;
  } catch (const std::exception& e) {
    return fail(err, err_len, DYNUP_E_INTERNAL, e.what());
  } catch (...) {
    return fail(err, err_len, DYNUP_E_INTERNAL, "dynup_pick: unknown exception");
  }
}

DYNUP_C_API size_t dynup_peer_count(dynup_upstream* up) {
  if (up == nullptr || forked(up)) return 0;
  return up->up->peer_count();
}

DYNUP_C_API int dynup_uses_latency(dynup_upstream* up) {
  if (up == nullptr || forked(up)) return 0;
  return up->up->uses_latency() ? 1 : 0;
}

DYNUP_C_API int dynup_report_try(dynup_upstream* up, dynup_selection* sel, int status, int64_t latency_us,
                                 unsigned flags) {
  if (up == nullptr || sel == nullptr) return DYNUP_E_ARGUMENT;
  if ((flags & DYNUP_TRY_FAILED) && (flags & DYNUP_TRY_SUCCEEDED)) return DYNUP_E_ARGUMENT;
  if (forked(up)) return DYNUP_E_FORKED;
  if (!live(up, sel)) return DYNUP_E_NOT_LIVE;
  constexpr std::int64_t max_us = std::numeric_limits<std::int64_t>::max() / 1000; // fits in nanoseconds
  dynup::Outcome outcome;
  outcome.latency = std::chrono::microseconds(std::clamp<std::int64_t>(latency_us, 0, max_us));
  outcome.status = status < 0 ? 0 : status;
  outcome.connect_failure = (flags & DYNUP_TRY_CONNECT_FAILED) != 0;
  if (flags & (DYNUP_TRY_FAILED | DYNUP_TRY_CONNECT_FAILED))
    outcome.verdict = dynup::TryVerdict::failure;
  else if (flags & DYNUP_TRY_SUCCEEDED)
    outcome.verdict = dynup::TryVerdict::success;
  end(up, sel, &outcome);
  return DYNUP_OK;
}

DYNUP_C_API int dynup_report(dynup_upstream* up, dynup_selection* sel, int status, int64_t latency_us,
                             int connect_failure) {
  return dynup_report_try(up, sel, status, latency_us, connect_failure != 0 ? DYNUP_TRY_CONNECT_FAILED : 0u);
}

DYNUP_C_API void dynup_cancel(dynup_upstream* up, dynup_selection* sel) {
  if (up == nullptr || sel == nullptr || forked(up) || !live(up, sel)) return;
  end(up, sel, nullptr);
}

DYNUP_C_API size_t dynup_status(dynup_upstream* up, char* buf, size_t len) {
  std::string text;
  std::string_view out;
  try {
    if (up == nullptr) {
      text = error_json("dynup_status: the handle is NULL");
    } else if (forked(up)) {
      char msg[256];
      write_forked(up, msg, sizeof msg);
      text = error_json(msg);
    } else {
      text = up->up->status().dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    }
    out = text;
  } catch (...) {
    out = failed_json; // a static text: building any other could fail the same way
  }
  if (buf != nullptr && len > 0) {
    std::size_t n = std::min(out.size(), len - 1);
    std::memcpy(buf, out.data(), n);
    buf[n] = '\0';
  }
  return out.size();
}

DYNUP_C_API uint64_t dynup_peer_id_hash(const char* id, size_t len) {
  return dynup::peer_id_hash(id == nullptr ? std::string_view() : std::string_view(id, len));
}

} // extern "C"
