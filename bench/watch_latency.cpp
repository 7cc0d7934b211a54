// Propagation latency and stop() time of the watchers (issue 4): from a change made in
// the registry to on_publish seeing it, against the Consul protocol double, a real etcd
// and a peer file. A program of its own, not Google Benchmark: one sample is one registry
// change, made at a pace the program chooses, not an iteration of a tight loop.
//
// Run: build/<dir>/bench/dynup_watch_latency [--changes N] [--spacing-ms MS] [--reps N] [--json]
// Loopback only; etcd runs from tests/support/etcd.hpp ($DYNUP_ETCD overrides the binary)
// and is stopped by its PID. Timings are printed, never checked.
#include <dynup/publisher.hpp>
#include <dynup/source/consul.hpp>
#include <dynup/source/etcd.hpp>
#include <dynup/runtime/runtime.hpp>
#include <dynup/watch/consul_watch.hpp>
#include <dynup/watch/etcd_watch.hpp>
#include <dynup/watch/file_watcher.hpp>
#include <dynup/watch/registry_watcher.hpp>

#include <support/consul_double.hpp>
#include <support/etcd.hpp>
#include <support/temp_dir.hpp>
#include <support/wait.hpp>

#include <httplib.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

// Every set carries the change number in the weight of the peer on this port.
constexpr std::uint16_t marked_port = 8080;
constexpr auto publish_timeout = 10s;

std::int64_t micros(Clock::duration d) { return std::chrono::duration_cast<std::chrono::microseconds>(d).count(); }

struct Summary {
  std::size_t samples = 0;
  std::int64_t p50 = 0, p90 = 0, p99 = 0, max = 0;
};

// Nearest-rank percentiles: p99 of 200 samples is the third largest.
Summary summarize(std::vector<std::int64_t> us) {
  Summary s;
  s.samples = us.size();
  if (us.empty()) return s;
  std::sort(us.begin(), us.end());
  auto rank = [&](double q) {
    auto k = static_cast<std::size_t>(q * static_cast<double>(us.size()) + 0.999999);
    return us[std::clamp<std::size_t>(k, 1, us.size()) - 1];
  };
  s.p50 = rank(0.50);
  s.p90 = rank(0.90);
  s.p99 = rank(0.99);
  s.max = us.back();
  return s;
}

// Records when each change first shows in a published set: t1[i] is the first publish
// whose set reflects change i or a later one (so a change another one overtook still
// gets a time).
class Tracker {
public:
  explicit Tracker(std::size_t changes) : t0_(changes + 1), t1_(changes + 1) {}

  dynup::PublishCallback on_publish() {
    return [this](const dynup::Snapshot& s) { seen(*s); };
  }

  // t0: just before the change is made.
  void begin(std::size_t change) {
    std::lock_guard<std::mutex> lock(mu_);
    t0_[change] = Clock::now();
  }

  bool wait_for(std::size_t change) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, publish_timeout, [&] { return last_ >= change; });
  }

  std::vector<std::int64_t> latencies_us() const {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<std::int64_t> out;
    for (std::size_t i = 1; i <= last_ && i < t0_.size(); ++i) out.push_back(micros(t1_[i] - t0_[i]));
    return out;
  }

  // Publishes that carried a change (the initial set is not counted).
  std::size_t publishes() const {
    std::lock_guard<std::mutex> lock(mu_);
    return publishes_;
  }

private:
  void seen(const dynup::PeerSet& set) {
    auto now = Clock::now();
    std::size_t change = 0;
    for (const auto& p : set.peers())
      if (p.port == marked_port) change = p.weight - 1;
    std::lock_guard<std::mutex> lock(mu_);
    if (change <= last_ || change >= t1_.size()) return;
    ++publishes_;
    for (std::size_t i = last_ + 1; i <= change; ++i) t1_[i] = now;
    last_ = change;
    cv_.notify_all();
  }

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Clock::time_point> t0_, t1_;
  std::size_t last_ = 0;
  std::size_t publishes_ = 0;
};

enum class Pace {
  spaced,       // one change per spacing, each published before the next
  back_to_back, // the next change as soon as the previous one is published
  burst,        // every change at once, not waiting for any
};

const char* pace_name(Pace p) {
  switch (p) {
  case Pace::spaced: return "spaced";
  case Pace::back_to_back: return "back-to-back";
  case Pace::burst: return "burst";
  }
  return "?";
}

struct Options {
  std::size_t changes = 200;
  std::chrono::milliseconds spacing{100};
  std::size_t reps = 20;
  bool json = false;
};

struct Row {
  std::string name;
  std::optional<std::size_t> publishes; // none for rows that are not a run of changes
  Summary s;
};

// Makes changes 1..n with `change(i)`, paced as asked. Throws when one is not published.
void drive(const Options& o, Pace pace, Tracker& t, const std::function<void(std::size_t)>& change) {
  for (std::size_t i = 1; i <= o.changes; ++i) {
    auto start = Clock::now();
    t.begin(i);
    change(i);
    if (pace != Pace::burst && !t.wait_for(i))
      throw std::runtime_error("change " + std::to_string(i) + " was not published within 10 s");
    if (pace == Pace::spaced) std::this_thread::sleep_until(start + o.spacing);
  }
  if (pace == Pace::burst && !t.wait_for(o.changes))
    throw std::runtime_error("the last change of the burst was not published within 10 s");
}

Row row(const std::string& name, const Tracker& t) {
  return {name, t.publishes(), summarize(t.latencies_us())};
}

std::string label(const std::string& source, Pace pace, const Options& o) {
  std::string s = source + ", " + pace_name(pace);
  if (pace == Pace::spaced) s += " " + std::to_string(o.spacing.count()) + " ms";
  return s;
}

// --- Consul ------------------------------------------------------------------------------

std::vector<dynup_test::ConsulInstance> consul_instances(std::size_t change) {
  std::vector<dynup_test::ConsulInstance> out;
  for (std::uint16_t port : {marked_port, std::uint16_t(8081), std::uint16_t(8082)}) {
    dynup_test::ConsulInstance i;
    i.port = port;
    i.address = "10.0.0.1";
    if (port == marked_port) i.weight_passing = static_cast<int>(change + 1);
    out.push_back(std::move(i));
  }
  return out;
}

std::shared_ptr<dynup::rt::Runtime> runtime() {
  auto rt = dynup::rt::Runtime::acquire();
  if (!rt) throw std::runtime_error(rt.error().message());
  return *rt;
}

std::unique_ptr<dynup::RegistryWatcher> start_consul(dynup_test::ConsulDouble& d, dynup::Publisher& pub,
                                                     dynup::PublishCallback on_publish) {
  auto src = dynup::ConsulSource::from_spec(d.spec("/health/api"));
  if (!src) throw std::runtime_error(src.error().message());
  auto rt = runtime();
  auto driver = std::make_unique<dynup::detail::ConsulDriver>(rt, std::move(src).value());
  auto w = dynup::RegistryWatcher::start(rt, pub, std::move(driver), dynup::WatchOptions{}, std::move(on_publish));
  if (!w) throw std::runtime_error(w.error().message());
  return std::move(w).value();
}

// The double does not notice a client that hung up: its handler stays held (and keeps a
// pool thread) until the index moves. Move it, and wait for every hold to end.
void release_held(dynup_test::ConsulDouble& d) {
  d.touch_service("api");
  if (!dynup_test::wait_until([&] { return d.held() == 0; }))
    throw std::runtime_error("the Consul double still holds a request");
}

// Returns once the watcher's blocking query is held by the double.
void wait_held(const dynup_test::ConsulDouble& d) {
  if (!dynup_test::wait_until([&] { return d.held() == 1; }))
    throw std::runtime_error("the watcher's blocking query never reached the double");
}

Row consul_propagation(dynup_test::ConsulDouble& d, const Options& o, Pace pace) {
  d.set_service("api", consul_instances(0));
  Tracker t(o.changes);
  dynup::Publisher pub;
  auto w = start_consul(d, pub, t.on_publish());
  wait_held(d);
  drive(o, pace, t, [&](std::size_t i) { d.set_service("api", consul_instances(i)); });
  w->stop();
  release_held(d);
  return row(label("consul double", pace, o), t);
}

Summary consul_stop(dynup_test::ConsulDouble& d, const Options& o) {
  std::vector<std::int64_t> us;
  for (std::size_t r = 0; r < o.reps; ++r) {
    dynup::Publisher pub;
    auto w = start_consul(d, pub, {});
    wait_held(d);
    std::this_thread::sleep_for(10ms);
    auto t0 = Clock::now();
    w->stop();
    us.push_back(micros(Clock::now() - t0));
    release_held(d);
  }
  return summarize(std::move(us));
}

// --- etcd --------------------------------------------------------------------------------

std::string etcd_value(std::size_t change) {
  return R"({"host":"10.0.0.1","port":8080,"weight":)" + std::to_string(change + 1) + "}";
}

// Puts over one keep-alive connection with Nagle off (as etcdctl, in Go, has it), so a
// put's time is etcd's (raft commit, fsync), not a handshake's or a delayed ACK's.
class EtcdPutter {
public:
  explicit EtcdPutter(std::uint16_t port) : client_("127.0.0.1", port) {
    client_.set_keep_alive(true);
    client_.set_tcp_nodelay(true);
    client_.set_read_timeout(10s);
  }
  void put(const std::string& key, const std::string& value) {
    nlohmann::json body{{"key", dynup::detail::base64_encode(key)}, {"value", dynup::detail::base64_encode(value)}};
    auto res = client_.Post("/v3/kv/put", body.dump(), "application/json");
    if (!res) throw std::runtime_error("etcd put: " + httplib::to_string(res.error()));
    if (res->status != 200) throw std::runtime_error("etcd put: HTTP " + std::to_string(res->status) + ": " + res->body);
  }

private:
  httplib::Client client_;
};

// When the first watch stream of a watcher's etcd was asked for, and how long until etcd
// confirmed it (polled every millisecond: the figure is that coarse).
struct WatchOpening {
  std::atomic<std::int64_t> sent_us{0};
  std::vector<std::int64_t>* open_us = nullptr;
};

// Starts a watcher and returns once its etcd's shared watch stream is open on the server.
// `opening` must outlive the watcher.
std::unique_ptr<dynup::RegistryWatcher> start_etcd(dynup_test::Etcd& etcd, const std::string& prefix,
                                                   dynup::Publisher& pub, dynup::PublishCallback on_publish,
                                                   WatchOpening& opening) {
  auto src = dynup::EtcdSource::from_spec(etcd.spec(prefix));
  if (!src) throw std::runtime_error(src.error().message());
  auto rt = runtime();
  const dynup::rt::HttpEndpoint at{src->host(), src->port(), false};
  auto epoch = Clock::now();
  rt->loop().run_sync([&] {
    rt->service<dynup::EtcdHubs>().at(at).tap([&opening, epoch](const dynup::HttpRequest&) {
      if (opening.sent_us.load() == 0) opening.sent_us.store(std::max<std::int64_t>(1, micros(Clock::now() - epoch)));
    });
  });
  auto driver = std::make_unique<dynup::detail::EtcdDriver>(rt, std::move(src).value());
  auto w = dynup::RegistryWatcher::start(rt, pub, std::move(driver), dynup::WatchOptions{}, std::move(on_publish));
  if (!w) throw std::runtime_error(w.error().message());
  auto streaming = [&] {
    bool open = false;
    rt->loop().run_sync([&] { open = rt->service<dynup::EtcdHubs>().at(at).streaming(); });
    return open;
  };
  if (!dynup_test::wait_until(streaming)) throw std::runtime_error("the etcd watch stream never opened");
  opening.open_us->push_back(micros(Clock::now() - epoch) - opening.sent_us.load());
  return std::move(w).value();
}

std::vector<Row> etcd_propagation(dynup_test::Etcd& etcd, const Options& o, Pace pace,
                                  std::vector<std::int64_t>& open_us) {
  std::string prefix = std::string("/bench/") + pace_name(pace) + "/";
  etcd.put(prefix + "web-1", etcd_value(0));
  etcd.put(prefix + "web-2", "10.0.0.2:8081");
  etcd.put(prefix + "web-3", "10.0.0.3:8082");
  Tracker t(o.changes);
  dynup::Publisher pub;
  WatchOpening opening;
  opening.open_us = &open_us;
  auto w = start_etcd(etcd, prefix, pub, t.on_publish(), opening);
  EtcdPutter putter(etcd.client_port());
  std::vector<std::int64_t> put_us;
  drive(o, pace, t, [&](std::size_t i) {
    auto t0 = Clock::now();
    putter.put(prefix + "web-1", etcd_value(i));
    put_us.push_back(micros(Clock::now() - t0));
  });
  w->stop();
  std::vector<Row> rows{row(label("etcd", pace, o), t)};
  if (pace == Pace::spaced) rows.push_back({"etcd put round trip (spaced run)", std::nullopt, summarize(std::move(put_us))});
  return rows;
}

Summary etcd_stop(dynup_test::Etcd& etcd, const Options& o, std::vector<std::int64_t>& open_us) {
  std::vector<std::int64_t> us;
  for (std::size_t r = 0; r < o.reps; ++r) {
    dynup::Publisher pub;
    WatchOpening opening;
    opening.open_us = &open_us;
    auto w = start_etcd(etcd, "/bench/spaced/", pub, {}, opening);
    std::this_thread::sleep_for(10ms);
    auto t0 = Clock::now();
    w->stop();
    us.push_back(micros(Clock::now() - t0));
  }
  return summarize(std::move(us));
}

std::string etcd_version(std::uint16_t port) {
  httplib::Client c("127.0.0.1", port);
  auto res = c.Get("/version");
  if (!res || res->status != 200) return "?";
  auto doc = nlohmann::json::parse(res->body, nullptr, false);
  return doc.is_object() && doc.contains("etcdserver") ? doc["etcdserver"].get<std::string>() : "?";
}

// --- file ---------------------------------------------------------------------------------

std::string file_content(std::size_t change) {
  return R"({"peers":[{"host":"10.0.0.1","port":8080,"weight":)" + std::to_string(change + 1) +
         R"(},"10.0.0.2:8081","10.0.0.3:8082"]})";
}

Row file_propagation(const Options& o) {
  dynup_test::TempDir dir;
  std::string path = dir.file("peers.json");
  dynup_test::write_by_rename(path, file_content(0));
  Tracker t(o.changes);
  dynup::Publisher pub;
  dynup::FileWatchOptions fo;
  fo.path = path;
  dynup::FileWatcher w(pub, fo, t.on_publish());
  drive(o, Pace::spaced, t, [&](std::size_t i) { dynup_test::write_by_rename(path, file_content(i)); });
  w.stop();
  return row(label("file (rename over)", Pace::spaced, o), t);
}

Summary file_stop(const Options& o) {
  dynup_test::TempDir dir;
  std::string path = dir.file("peers.json");
  dynup_test::write_by_rename(path, file_content(0));
  std::vector<std::int64_t> us;
  for (std::size_t r = 0; r < o.reps; ++r) {
    dynup::Publisher pub;
    dynup::FileWatchOptions fo;
    fo.path = path;
    dynup::FileWatcher w(pub, fo);
    std::this_thread::sleep_for(10ms);
    auto t0 = Clock::now();
    w.stop();
    us.push_back(micros(Clock::now() - t0));
  }
  return summarize(std::move(us));
}

// --- output ---------------------------------------------------------------------------------

void print_text(const Options& o, const std::string& etcd_ver, const std::vector<Row>& prop,
                const std::vector<Row>& stops) {
  std::printf("dynup_watch_latency: %zu changes per run; WatchOptions defaults (wait 5 min, min_interval 50 ms, "
              "burst 2); etcd %s\n",
              o.changes, etcd_ver.c_str());
  std::printf("t0 = just before the change is made (etcd: before the put is sent); t1 = in on_publish, first set "
              "showing it (or a later change)\n\n");
  std::printf("%-36s %9s %9s %9s %9s %9s\n", "propagation, us", "publishes", "p50", "p90", "p99", "max");
  for (const auto& r : prop)
    std::printf("%-36s %9s %9lld %9lld %9lld %9lld\n", r.name.c_str(),
                r.publishes ? std::to_string(*r.publishes).c_str() : "-",
                static_cast<long long>(r.s.p50), static_cast<long long>(r.s.p90), static_cast<long long>(r.s.p99),
                static_cast<long long>(r.s.max));
  std::printf("\n%-36s %9s %9s %9s\n", "stop() with a query in flight, us", "reps", "p50", "max");
  for (const auto& r : stops)
    std::printf("%-36s %9zu %9lld %9lld\n", r.name.c_str(), r.s.samples, static_cast<long long>(r.s.p50),
                static_cast<long long>(r.s.max));
}

void print_json(const Options& o, const std::string& etcd_ver, const std::vector<Row>& prop,
                const std::vector<Row>& stops) {
  nlohmann::ordered_json doc{{"changes", o.changes}, {"spacing_ms", o.spacing.count()}, {"etcd", etcd_ver}};
  auto& p = doc["propagation_us"] = nlohmann::ordered_json::array();
  for (const auto& r : prop)
    p.push_back({{"scenario", r.name}, {"publishes", r.publishes ? nlohmann::ordered_json(*r.publishes) : nlohmann::ordered_json()}, {"samples", r.s.samples}, {"p50", r.s.p50},
                 {"p90", r.s.p90}, {"p99", r.s.p99}, {"max", r.s.max}});
  auto& s = doc["stop_us"] = nlohmann::ordered_json::array();
  for (const auto& r : stops) s.push_back({{"watcher", r.name}, {"reps", r.s.samples}, {"p50", r.s.p50}, {"max", r.s.max}});
  std::cout << doc.dump(2) << "\n";
}

bool parse_args(int argc, char** argv, Options& o) {
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto number = [&](std::size_t lo, std::size_t hi, std::size_t& out) {
      if (i + 1 >= argc) return false;
      char* end = nullptr;
      unsigned long long v = std::strtoull(argv[++i], &end, 10);
      if (*end != '\0' || v < lo || v > hi) return false;
      out = static_cast<std::size_t>(v);
      return true;
    };
    std::size_t spacing = 0;
    if (a == "--json") {
      o.json = true;
    } else if (a == "--changes") {
      if (!number(1, dynup::max_weight - 1, o.changes)) return false;
    } else if (a == "--reps") {
      if (!number(1, 10000, o.reps)) return false;
    } else if (a == "--spacing-ms") {
      if (!number(1, 60000, spacing)) return false;
      o.spacing = std::chrono::milliseconds(spacing);
    } else {
      return false;
    }
  }
  return true;
}

} // namespace

int main(int argc, char** argv) {
  Options o;
  if (!parse_args(argc, argv, o)) {
    std::fprintf(stderr, "usage: %s [--changes 1..%u] [--spacing-ms MS] [--reps N] [--json]\n", argv[0],
                 dynup::max_weight - 1);
    return 2;
  }
  std::vector<Row> prop, stops;
  std::string etcd_ver = "not run";
  int status = 0;
  try {
    {
      dynup_test::ConsulDouble d;
      for (Pace pace : {Pace::spaced, Pace::back_to_back, Pace::burst}) prop.push_back(consul_propagation(d, o, pace));
      stops.push_back({"consul (5 min blocking query)", std::nullopt, consul_stop(d, o)});
    }
    std::string missing = dynup_test::etcd_missing_reason(dynup_test::etcd_binary());
    if (missing.empty()) {
      dynup_test::Etcd etcd;
      etcd_ver = etcd_version(etcd.client_port());
      std::vector<std::int64_t> open_us;
      for (Pace pace : {Pace::spaced, Pace::back_to_back, Pace::burst})
        for (auto& r : etcd_propagation(etcd, o, pace, open_us)) prop.push_back(std::move(r));
      stops.push_back({"etcd (open watch stream)", std::nullopt, etcd_stop(etcd, o, open_us)});
      prop.push_back({"etcd watch request -> created", std::nullopt, summarize(std::move(open_us))});
    } else {
      std::fprintf(stderr, "etcd not measured: %s\n", missing.c_str());
      status = 1;
    }
    prop.push_back(file_propagation(o));
    stops.push_back({"file (idle, inotify + 1 s poll)", std::nullopt, file_stop(o)});
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dynup_watch_latency: %s\n", e.what());
    status = 1;
  }
  if (o.json)
    print_json(o, etcd_ver, prop, stops);
  else
    print_text(o, etcd_ver, prop, stops);
  return status;
}
