// dynup-watch: prints every published version of a source as one JSON line.
//
//   dynup-watch file:///etc/dynup/api.json
//   dynup-watch --snapshot /var/lib/dynup/api.snap consul://127.0.0.1:8500/health/api
//   {"version":1,"index":1,"peers":[{"id":"10.0.0.1:8080",…}]}
//   dynup-watch --check-config /etc/nginx/dynup/api.json   (an upstream's config, checked)
//
// Errors go to stderr, one line each, and never stop the watch: the last good set stays.
// Sources are started through dynup::Watcher, so every scheme behaves the same here.
#include <dynup/dynup.hpp>

#include <nlohmann/json.hpp>
#include <pthread.h>

#include <chrono>
#include <condition_variable>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iostream>
#include <iterator>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>

namespace {

constexpr const char* usage_text =
    "usage: dynup-watch [options] SPEC\n"
    "\n"
    "Watches a peer source and prints each published version as one JSON line:\n"
    "  {\"version\":N,\"index\":I,\"peers\":[...]}\n"
    "Errors are printed to stderr; the last good set is kept.\n"
    "\n"
    "SPEC:\n"
    "  file:///path/peers.json               a JSON peer file (docs/FORMAT.md), re-read on change\n"
    "  consul://HOST[:PORT]/health/SERVICE   instances whose checks all pass (passing=0: every\n"
    "                                        instance, health taken from its checks)\n"
    "  consul://HOST[:PORT]/catalog/SERVICE  every registered instance (no health checks)\n"
    "  consul://HOST[:PORT]/kv/PREFIX        one key per peer, PREFIX/host:port, value\n"
    "                                        {\"weight\":1,\"down\":0,\"backup\":0,...} (nginx-upsync)\n"
    "      ?tag=T (repeatable)  dc=DC  filter=EXPR  near=NODE  zone_meta=KEY  stale=1 | consistent=1\n"
    "      token_env=VAR (or token=T): the ACL token, sent as a header and never printed\n"
    "  etcd://HOST[:PORT]/PREFIX/            one key per peer under PREFIX/ (layout=keys, the\n"
    "                                        default): a peer object, \"host:port\" or host:port\n"
    "  etcd://HOST[:PORT]/KEY?layout=document  one key holding a whole peer-set document\n"
    "  PORT defaults to 8500 for consul and 2379 for etcd (its v3 JSON gateway, etcd 3.4+).\n"
    "  (push:// is not watchable: its sets come from a proxy's write API, not from a source.)\n"
    "\n"
    "dynup-watch --check-config FILE\n"
    "  checks an upstream's JSON config (docs/UPSTREAM.md: what resty.dynup's new() and\n"
    "  dynup_upstream_new take) as they read it, and starts nothing: exit 0 when it is\n"
    "  valid, 1 with the reason, naming the JSON path, when not. FILE - reads stdin.\n"
    "\n"
    "options:\n"
    "  --once            print the first version and exit 0; exit 1 if nothing could be\n"
    "                    published (unreadable, invalid, refused, or unreachable without\n"
    "                    a usable --snapshot)\n"
    "  --allow-empty     publish an empty peer list instead of keeping the last set\n"
    "  --min-peers N     refuse sets with fewer than N peers\n"
    "  --max-removed F   refuse updates removing more than share F (0..1) of the peers\n"
    "  --version         print the dynup version\n"
    "  -h, --help        this text\n"
    "file:// only:\n"
    "  --poll-ms N       fallback re-check period (default 1000)\n"
    "consul:// and etcd:// only:\n"
    "  --wait-ms N       longest blocking query (consul) or quiet watch stream (etcd) before\n"
    "                    asking again, 10..600000 (default 300000)\n"
    "  --snapshot PATH   last-known-good file: every published set is saved there, and it\n"
    "                    is served (stale) when the source cannot be read at start\n"
    "  --strong          exit 1 when the first fetch fails, instead of serving the snapshot\n"
    "                    or waiting for the source\n"
    "\n"
    "exit status: 0 after SIGINT/SIGTERM/SIGHUP (even while the first fetch hangs) or a\n"
    "successful --once or --check-config; 1 when --once published nothing, --strong's first\n"
    "fetch failed or --check-config found the config invalid; 2 for a bad command line or SPEC.\n";

struct Options {
  std::string spec;
  std::string check_config; ///< --check-config FILE: check it and exit
  bool once = false;
  std::optional<long> poll_ms; ///< file:// only
  std::optional<long> wait_ms; ///< consul:// and etcd:// only, like the two below
  std::string snapshot;
  bool strong = false;
  dynup::Guards guards;
};

[[noreturn]] void die_usage(const std::string& why) {
  std::fprintf(stderr, "dynup-watch: %s\n\n%s", why.c_str(), usage_text);
  std::exit(2);
}

bool parse_number(const char* s, double& out) {
  char* end = nullptr;
  out = std::strtod(s, &end);
  return end && *end == '\0' && end != s;
}

Options parse_args(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string_view a = argv[i];
    auto next = [&](const char* name) -> const char* {
      if (i + 1 >= argc) die_usage(std::string(name) + " needs a value");
      return argv[++i];
    };
    double v = 0;
    if (a == "-h" || a == "--help") {
      std::fputs(usage_text, stdout);
      std::exit(0);
    } else if (a == "--version") {
      std::printf("dynup-watch %s\n", dynup::version_string);
      std::exit(0);
    } else if (a == "--once") {
      o.once = true;
    } else if (a == "--allow-empty") {
      o.guards.allow_empty = true;
    } else if (a == "--poll-ms") {
      // Range first, written so NaN fails it, then the cast is defined.
      if (!parse_number(next("--poll-ms"), v) || !(v >= 10 && v <= 3600000) || v != static_cast<long>(v))
        die_usage("--poll-ms must be an integer 10..3600000");
      o.poll_ms = static_cast<long>(v);
    } else if (a == "--wait-ms") {
      if (!parse_number(next("--wait-ms"), v) || !(v >= 10 && v <= 600000) || v != static_cast<long>(v))
        die_usage("--wait-ms must be an integer 10..600000");
      o.wait_ms = static_cast<long>(v);
    } else if (a == "--snapshot") {
      o.snapshot = next("--snapshot");
      if (o.snapshot.empty()) die_usage("--snapshot needs a path");
    } else if (a == "--check-config") {
      o.check_config = next("--check-config");
      if (o.check_config.empty()) die_usage("--check-config needs a file (- for stdin)");
    } else if (a == "--strong") {
      o.strong = true;
    } else if (a == "--min-peers") {
      if (!parse_number(next("--min-peers"), v) || !(v >= 0 && v <= 1e9) || v != static_cast<long>(v))
        die_usage("--min-peers must be a non-negative integer");
      o.guards.min_peers = static_cast<std::size_t>(v);
    } else if (a == "--max-removed") {
      if (!parse_number(next("--max-removed"), v) || !(v > 0 && v <= 1))
        die_usage("--max-removed must be a share in (0, 1]");
      o.guards.max_removed_share = v;
    } else if (!a.empty() && a[0] == '-') {
      die_usage("unknown option " + std::string(a));
    } else if (o.spec.empty()) {
      o.spec = std::string(a);
    } else {
      die_usage("only one SPEC may be given");
    }
  }
  if (!o.check_config.empty()) {
    if (argc != 3) die_usage("--check-config FILE takes no SPEC and no other option");
    return o;
  }
  if (o.spec.empty()) die_usage("missing SPEC");
  return o;
}

std::mutex out_mu;

void print_line(std::FILE* f, const std::string& line) {
  std::lock_guard<std::mutex> lock(out_mu);
  std::fputs(line.c_str(), f);
  std::fputc('\n', f);
  std::fflush(f);
}

// Options that only some schemes take are usage errors elsewhere, not silently ignored.
// An unknown scheme is left to Watcher::validate, which names the supported ones.
void check_scheme_options(const Options& o) {
  std::string_view scheme = std::string_view(o.spec).substr(0, o.spec.find(':'));
  if (scheme == "push") {
    // Watcher::start takes it, and then nothing would ever arrive: nobody pushes here.
    die_usage("push:// cannot be watched: its sets arrive through a proxy's write API (nginx dynup_api, "
              "dynup-proxy's admin API), and dynup-watch has none; watch the source the pusher reads instead");
  }
  if (scheme == "file") {
    const char* registry_only = o.wait_ms             ? "--wait-ms"
                                : !o.snapshot.empty() ? "--snapshot"
                                : o.strong            ? "--strong"
                                                      : nullptr;
    if (registry_only != nullptr)
      die_usage(std::string(registry_only) + " applies to consul:// and etcd:// sources, not file://");
  } else if ((scheme == "consul" || scheme == "etcd") && o.poll_ms) {
    die_usage("--poll-ms applies to file:// sources only, not " + std::string(scheme) + "://");
  }
}

dynup::AnyWatchOptions watch_options(const Options& o) {
  dynup::AnyWatchOptions w;
  w.guards = o.guards;
  if (o.poll_ms) w.poll_interval = std::chrono::milliseconds(*o.poll_ms);
  if (o.wait_ms) w.wait = std::chrono::milliseconds(*o.wait_ms);
  w.snapshot_path = o.snapshot;
  w.strong_dependency = o.strong;
  return w;
}

// --check-config: the upstream config read as dynup_config_check reads it (the same
// parse_upstream_config, the same messages), with nothing started. Exit 0 or 1.
int check_config(const std::string& file) {
  std::string text;
  if (file == "-") {
    text.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
  } else {
    std::ifstream in(file, std::ios::binary);
    if (!in) {
      print_line(stderr, "dynup-watch: " + file + ": cannot read: " + std::strerror(errno));
      return 1;
    }
    text.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  nlohmann::json doc;
  try {
    doc = nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    std::string what = e.what(); // "[json.exception.parse_error.101] parse error at …"
    if (auto close = what.find("] "); close != std::string::npos) what.erase(0, close + 2);
    print_line(stderr, "dynup-watch: " + file + ": upstream: invalid JSON: " + what);
    return 1;
  }
  auto parsed = dynup::parse_upstream_config(doc);
  if (!parsed) {
    print_line(stderr, "dynup-watch: " + file + ": " + parsed.error().message());
    return 1;
  }
  print_line(stdout, "dynup-watch: " + file + ": upstream " + parsed.value().name + " is valid");
  return 0;
}

// What main and the signal thread share. A signal before the watcher exists cannot stop
// it (Watcher::start blocks on the first fetch, for as long as a hung or trickling
// registry keeps it): the process exits then and there, as a SIGTERM after it would.
struct Shutdown {
  std::mutex mu;
  std::condition_variable cv;
  bool watching = false; ///< Watcher::start has returned: the signal goes to main
  bool signalled = false;
};

[[noreturn]] void wait_signals(sigset_t signals, Shutdown& s) {
  for (;;) {
    int sig = 0;
    if (sigwait(&signals, &sig) != 0) continue;
    std::lock_guard<std::mutex> lock(s.mu);
    if (!s.watching) {
      std::lock_guard<std::mutex> whole_lines(out_mu); // no line is cut: print_line flushes each
      std::_Exit(0);
    }
    s.signalled = true;
    s.cv.notify_all();
  }
}

} // namespace

int main(int argc, char** argv) {
  Options opts = parse_args(argc, argv);
  if (!opts.check_config.empty()) return check_config(opts.check_config);
  check_scheme_options(opts);
  dynup::AnyWatchOptions options = watch_options(opts);
  // Spec errors exit 2 before anything starts; the messages name the spec, never a token.
  if (auto valid = dynup::Watcher::validate(opts.spec, options); !valid) {
    print_line(stderr, "dynup-watch: " + valid.error().message());
    return 2;
  }

  // Signals are taken by one thread's sigwait, so block them before any thread starts,
  // then start that thread before the first fetch, which may never end.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  static Shutdown quit; // static: the detached thread may outlive main's frame
  std::thread(wait_signals, signals, std::ref(quit)).detach();

  // With --once only the first set is printed, after the watcher has stopped, so a
  // change arriving meanwhile cannot add a second line.
  std::mutex first_mu;
  dynup::Snapshot first;
  auto on_publish = [&](const dynup::Snapshot& s) {
    if (!opts.once) return print_line(stdout, dynup::to_json(*s));
    std::lock_guard<std::mutex> lock(first_mu);
    if (!first) first = s;
  };
  auto on_error = [](const dynup::Error& e) { print_line(stderr, "dynup-watch: " + e.message()); };

  dynup::Publisher publisher;
  auto started = dynup::Watcher::start(publisher, opts.spec, options, on_publish, on_error);
  if (!started) {
    print_line(stderr, "dynup-watch: " + started.error().message());
    return 1;
  }
  dynup::Watcher watcher = std::move(started).value();
  {
    std::lock_guard<std::mutex> lock(quit.mu);
    quit.watching = true;
  }
  // The JSON line cannot say the set is stale; say it here when the snapshot stood in.
  if (auto st = watcher.status();
      !opts.snapshot.empty() && st.stale && st.consecutive_failures > 0 && publisher.version() != 0)
    print_line(stderr, "dynup-watch: " + st.source + ": unreachable at start; serving the last-known-good snapshot " +
                           opts.snapshot + " (stale) until it answers");

  if (opts.once) {
    watcher.stop();
    std::lock_guard<std::mutex> lock(first_mu);
    if (!first) return 1;
    print_line(stdout, dynup::to_json(*first));
    return 0;
  }

  {
    std::unique_lock<std::mutex> lock(quit.mu);
    quit.cv.wait(lock, [] { return quit.signalled; });
  }
  watcher.stop();
  return 0;
}
