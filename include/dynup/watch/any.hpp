// Watcher: one handle for any source spec. start() reads the scheme and runs the watcher
// that serves it, so an embedder watches file://, consul:// and etcd:// alike.
//
//   file:///etc/dynup/api.json                 → FileWatcher
//   consul://127.0.0.1:8500/health/api?tag=v2  → RegistryWatcher + ConsulDriver (runtime)
//   etcd://127.0.0.1:2379/upstreams/api/       → RegistryWatcher + EtcdDriver (runtime)
//   push://                                    → PushWatcher (sets come from push())
#pragma once

#include <dynup/publisher.hpp>
#include <dynup/result.hpp>
#include <dynup/source/consul.hpp>
#include <dynup/source/etcd.hpp>
#include <dynup/source/spec.hpp>
#include <dynup/version.hpp>
#include <dynup/runtime/runtime.hpp>
#include <dynup/watch/consul_watch.hpp>
#include <dynup/watch/core.hpp>
#include <dynup/watch/etcd_watch.hpp>
#include <dynup/watch/file_watcher.hpp>
#include <dynup/watch/push_watcher.hpp>
#include <dynup/watch/registry_watcher.hpp>
#include <dynup/watch/status.hpp>

#include <chrono>
#include <memory>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

DYNUP_NAMESPACE_BEGIN

/// What Watcher::start takes: the options every registry watcher takes, plus the ones
/// only file:// has. A setting the chosen source cannot honour is an error, never
/// silently dropped: file:// takes only `guards`, `poll_interval`, `settle` and
/// `initial`; consul:// and etcd:// take everything but `poll_interval` and `settle`.
/// An option counts as set when it differs from its default or is named in
/// `explicitly_set` (so a value written in a config file is checked even when it equals
/// the default). `initial` is accepted everywhere: file:// and push:// never wait on the
/// network, so both values start them at once.
struct AnyWatchOptions : WatchOptions {
  AnyWatchOptions() = default;
  /// Implicit, so a plain WatchOptions is accepted where AnyWatchOptions is expected.
  AnyWatchOptions(WatchOptions common) : WatchOptions(std::move(common)) {}

  /// file:// only: FileWatchOptions::poll_interval; must be positive.
  std::chrono::milliseconds poll_interval = FileWatchOptions{}.poll_interval;
  /// file:// only: FileWatchOptions::settle; must not be negative.
  std::chrono::milliseconds settle = FileWatchOptions{}.settle;
  /// Member names (as spelled here: "wait", "burst", "poll_interval", …) that were set
  /// on purpose, whatever their value; a config reader fills it.
  std::vector<std::string> explicitly_set;

  /// True when `name` is listed in explicitly_set.
  bool marked(std::string_view name) const {
    for (const auto& n : explicitly_set)
      if (n == name) return true;
    return false;
  }
};

namespace detail {

/// The small interface every concrete watcher is held through.
class WatcherHandle {
public:
  virtual ~WatcherHandle() = default;
  virtual WatcherStatus status() const = 0;
  virtual void stop() noexcept = 0;
  virtual PushWatcher* pusher() noexcept { return nullptr; }
};

template <class W> class OwnedWatcher final : public WatcherHandle {
public:
  explicit OwnedWatcher(std::unique_ptr<W> w) : w_(std::move(w)) {}
  WatcherStatus status() const override { return w_->status(); }
  void stop() noexcept override { w_->stop(); }
  PushWatcher* pusher() noexcept override {
    if constexpr (std::is_same_v<W, PushWatcher>) return w_.get();
    return nullptr;
  }

private:
  std::unique_ptr<W> w_; // its destructor stops it
};

/// A spec checked against the options, ready to start.
using PreparedSource = std::variant<FileWatchOptions, ConsulSource, EtcdSource, PushOptions>;

inline std::string join_names(const std::vector<const char*>& names) {
  std::string out;
  for (const char* n : names) out += (out.empty() ? "" : ", ") + std::string(n);
  return out;
}

// The names of the registry fetch options (those only consul:// and etcd:// use) and the
// file polling options that `o` sets away from their defaults.
inline std::vector<const char*> fetch_options_set(const AnyWatchOptions& o) {
  const WatchOptions defaults;
  std::vector<const char*> set;
  auto check = [&](const char* name, bool differs) {
    if (differs || o.marked(name)) set.push_back(name);
  };
  check("strong_dependency", o.strong_dependency);
  check("wait", o.wait != defaults.wait);
  check("backoff_base", o.backoff_base != defaults.backoff_base);
  check("backoff_cap", o.backoff_cap != defaults.backoff_cap);
  check("min_interval", o.min_interval != defaults.min_interval);
  check("burst", o.burst != defaults.burst);
  return set;
}
inline std::vector<const char*> file_options_set(const AnyWatchOptions& o) {
  const FileWatchOptions defaults;
  std::vector<const char*> set;
  if (o.poll_interval != defaults.poll_interval || o.marked("poll_interval")) set.push_back("poll_interval");
  if (o.settle != defaults.settle || o.marked("settle")) set.push_back("settle");
  return set;
}

// Parses `spec` with its scheme's own parser (so errors are the source's, and a Consul
// token is never quoted) and checks that every set option applies to that scheme.
inline Result<PreparedSource> prepare_source(std::string_view spec, const AnyWatchOptions& o) {
  static constexpr const char* supported = "file://, consul://, etcd://, push://";
  auto colon = spec.find(':');
  std::string_view scheme = colon == std::string_view::npos ? std::string_view() : spec.substr(0, colon);

  if (scheme == "consul" || scheme == "etcd") {
    const std::vector<const char*> file_only = file_options_set(o);
    auto reject = [&](const std::string& described) {
      return Error(Errc::invalid_argument, "source \"" + described + "\": " + join_names(file_only) +
                                               " apply to file:// sources only; leave them at their defaults");
    };
    if (scheme == "consul") {
      auto source = ConsulSource::from_spec(spec);
      if (!source) return source.error();
      if (!file_only.empty()) return reject(source->describe());
      return PreparedSource(std::in_place_type<ConsulSource>, std::move(source).value());
    }
    auto source = EtcdSource::from_spec(spec);
    if (!source) return source.error();
    if (!file_only.empty()) return reject(source->describe());
    return PreparedSource(std::in_place_type<EtcdSource>, std::move(source).value());
  }

  if (scheme == "file") {
    auto parsed = parse_source_spec(spec);
    if (!parsed) return parsed.error();
    std::string where = "source \"file://" + parsed->path + "\": ";
    // FileWatcher reads the file itself and keeps no snapshot; these would be dropped.
    std::vector<const char*> registry_only = fetch_options_set(o);
    if (!o.snapshot_path.empty()) registry_only.insert(registry_only.begin(), "snapshot_path");
    if (!registry_only.empty())
      return Error(Errc::invalid_argument, where + "a file watcher cannot honour " + join_names(registry_only) +
                                               " (consul:// and etcd:// only); leave them at their defaults");
    if (o.poll_interval.count() <= 0)
      return Error(Errc::invalid_argument,
                   where + "poll_interval must be positive, got " + std::to_string(o.poll_interval.count()) + " ms");
    if (o.settle.count() < 0)
      return Error(Errc::invalid_argument,
                   where + "settle must not be negative, got " + std::to_string(o.settle.count()) + " ms");
    FileWatchOptions fw;
    fw.path = std::move(parsed->path);
    fw.poll_interval = o.poll_interval;
    fw.settle = o.settle;
    fw.guards = o.guards;
    return PreparedSource(std::in_place_type<FileWatchOptions>, std::move(fw));
  }

  if (scheme == "push") {
    if (spec != "push://")
      return Error(Errc::invalid_argument, "source \"" + redact_spec_text(spec) +
                                               "\": a push source is exactly \"push://\" (its sets come from push())");
    std::vector<const char*> unusable = fetch_options_set(o);
    for (const char* name : file_options_set(o)) unusable.push_back(name);
    if (!unusable.empty())
      return Error(Errc::invalid_argument, "source \"push://\": nothing is fetched, so " + join_names(unusable) +
                                               " do not apply; leave them at their defaults");
    PushOptions po;
    po.guards = o.guards;
    po.snapshot_path = o.snapshot_path;
    return PreparedSource(std::in_place_type<PushOptions>, std::move(po));
  }

  // An unknown scheme may still be a mistyped consul:// spec carrying a token.
  std::string shown = "source \"" + redact_spec_text(spec) + "\": ";
  if (!is_scheme_name(scheme))
    return Error(Errc::invalid_argument, shown + "expected scheme://…, one of " + supported);
  return Error(Errc::unsupported,
               shown + "unknown scheme \"" + std::string(scheme) + "\" (supported: " + supported + ")");
}

// The spec a prepared source describes, never with secrets.
inline std::string prepared_name(const PreparedSource& p) {
  if (auto* f = std::get_if<FileWatchOptions>(&p)) return "file://" + f->path;
  if (auto* c = std::get_if<ConsulSource>(&p)) return c->describe();
  if (auto* e = std::get_if<EtcdSource>(&p)) return e->describe();
  return "push://";
}

} // namespace detail

/// A running watcher of any source, owned: the destructor stops it.
///
/// Move-only. A moved-from Watcher holds nothing: stop() does nothing and status()
/// returns an empty WatcherStatus. status() is safe from any thread while the Watcher
/// is neither moved nor destroyed; stop() is for one thread at a time and never from a
/// callback (it joins the thread that runs them).
class Watcher {
public:
  /// Starts the watcher `spec` names, publishing into `publisher` (which must outlive
  /// it). With `options.initial` = wait (the default) returns once the first read or
  /// fetch is done; with background, a consul:// or etcd:// watcher returns at once
  /// serving the last-known-good snapshot (stale) or nothing, and fetches on the
  /// process runtime's loop. Otherwise the same guarantees as the concrete watcher's start: FileWatcher's constructor, RegistryWatcher::start with a
  /// ConsulDriver or an EtcdDriver on the process runtime. Errors: a bad spec is the
  /// source's own error, naming the spec (a Consul token is never quoted); an unknown
  /// scheme is Errc::unsupported, listing the supported ones; an option the source cannot
  /// honour (or strong_dependency with initial background) is Errc::invalid_argument,
  /// naming it; a failed first fetch with
  /// strong_dependency is that fetch's error; a thread or descriptor the system refuses
  /// is Errc::io_error. Callbacks of file://, consul:// and etcd:// watchers run on the
  /// runtime's loop thread, which every watcher of the process shares: they must not block.
  static Result<Watcher> start(Publisher& publisher, std::string_view spec, AnyWatchOptions options = {},
                               PublishCallback on_publish = {}, ErrorCallback on_error = {}) {
    auto prepared = detail::prepare_source(spec, options);
    if (!prepared) return prepared.error();
    if (auto ok = check_initial(options, detail::prepared_name(*prepared)); !ok) return ok.error();
    return std::visit(
        [&](auto& source) { return launch(publisher, std::move(source), options, on_publish, on_error); },
        *prepared);
  }

  /// Checks `spec` and `options` exactly as start() does, without connecting or starting
  /// anything: for validating configuration before it is used. Reads token_env.
  static Result<void> validate(std::string_view spec, const AnyWatchOptions& options = {}) {
    auto prepared = detail::prepare_source(spec, options);
    if (!prepared) return prepared.error();
    return check_initial(options, detail::prepared_name(*prepared));
  }

  /// Adopts a watcher built by hand (a RegistryWatcher with a driver of one's own,
  /// say): anything with `WatcherStatus status() const` and `void stop() noexcept`.
  template <class W>
  explicit Watcher(std::unique_ptr<W> concrete)
      : impl_(concrete ? std::make_unique<detail::OwnedWatcher<W>>(std::move(concrete)) : nullptr) {}

  /// An empty handle, as a moved-from one: stop() does nothing, status() is empty.
  Watcher() noexcept = default;
  Watcher(Watcher&&) noexcept = default;
  /// Stops the watcher this one held, then takes `other`'s.
  Watcher& operator=(Watcher&& other) noexcept {
    if (this != &other) {
      stop();
      impl_ = std::move(other.impl_);
    }
    return *this;
  }
  ~Watcher() = default;

  /// The watcher's state now (source, index, errors, staleness); see WatcherStatus.
  WatcherStatus status() const { return impl_ ? impl_->status() : WatcherStatus{}; }

  /// The push watcher this handle holds (a push:// source), else nullptr. Valid while
  /// this Watcher is neither moved nor destroyed.
  PushWatcher* pusher() noexcept { return impl_ ? impl_->pusher() : nullptr; }

  /// Stops watching and joins the watcher's thread, aborting a blocking query or watch
  /// stream in flight: returns within milliseconds, or within the transport's connect
  /// timeout while a connection attempt is under way. The published set stays and
  /// status() still answers. Idempotent.
  void stop() noexcept {
    if (impl_) impl_->stop();
  }

private:
  static Result<Watcher> launch(Publisher& publisher, FileWatchOptions fw, const AnyWatchOptions&,
                                PublishCallback& on_publish, ErrorCallback& on_error) {
    std::string path = fw.path;
    try {
      return Watcher(std::make_unique<FileWatcher>(publisher, std::move(fw), std::move(on_publish),
                                                   std::move(on_error)));
    } catch (const std::system_error& e) {
      return Error(Errc::io_error, "file://" + path + ": cannot start the file watcher: " + e.what());
    }
  }

  static Result<Watcher> launch(Publisher& publisher, PushOptions po, const AnyWatchOptions&,
                                PublishCallback& on_publish, ErrorCallback& on_error) {
    return Watcher(std::make_unique<PushWatcher>(publisher, std::move(po), std::move(on_publish),
                                                 std::move(on_error)));
  }

  static Result<Watcher> launch(Publisher& publisher, ConsulSource source, const AnyWatchOptions& options,
                                PublishCallback& on_publish, ErrorCallback& on_error) {
    auto runtime = rt::Runtime::acquire();
    if (!runtime) return runtime.error().with_context(source.describe());
    auto driver = std::make_unique<detail::ConsulDriver>(*runtime, std::move(source));
    return adopt(driver->describe(), [&] {
      return RegistryWatcher::start(*runtime, publisher, std::move(driver), static_cast<const WatchOptions&>(options),
                                    std::move(on_publish), std::move(on_error));
    });
  }

  static Result<Watcher> launch(Publisher& publisher, EtcdSource source, const AnyWatchOptions& options,
                                PublishCallback& on_publish, ErrorCallback& on_error) {
    auto runtime = rt::Runtime::acquire();
    if (!runtime) return runtime.error().with_context(source.describe());
    auto driver = std::make_unique<detail::EtcdDriver>(*runtime, std::move(source));
    return adopt(driver->describe(), [&] {
      return RegistryWatcher::start(*runtime, publisher, std::move(driver), static_cast<const WatchOptions&>(options),
                                    std::move(on_publish), std::move(on_error));
    });
  }

  // Runs a concrete start() and wraps what it returns; a thread the system refuses is
  // an error value, like every other failure here.
  template <class Start> static Result<Watcher> adopt(const std::string& described, Start&& start) {
    try {
      auto started = start();
      if (!started) return started.error();
      return Watcher(std::move(started).value());
    } catch (const std::system_error& e) {
      return Error(Errc::io_error, described + ": cannot start the watcher: " + e.what());
    }
  }

  std::unique_ptr<detail::WatcherHandle> impl_;
};

DYNUP_NAMESPACE_END
