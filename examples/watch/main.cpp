// dynup-watch: prints every published version of a source as one JSON line.
//
//   dynup-watch file:///etc/dynup/api.json
//   dynup-watch --snapshot /var/lib/dynup/api.snap consul://127.0.0.1:8500/health/api
//   {"version":1,"index":1,"peers":[{"id":"10.0.0.1:8080",…}]}
//
// Errors go to stderr, one line each, and never stop the watch: the last good set stays.
// Sources are started through dynup::Watcher, so every scheme behaves the same here.
#include <dynup/dynup.hpp>

#include <pthread.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>

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
    "exit status: 0 after SIGINT/SIGTERM/SIGHUP or a successful --once; 1 when --once\n"
    "published nothing or --strong's first fetch failed; 2 for a bad command line or SPEC.\n";

struct Options {
  std::string spec;
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

} // namespace

int main(int argc, char** argv) {
  Options opts = parse_args(argc, argv);
  check_scheme_options(opts);
  dynup::AnyWatchOptions options = watch_options(opts);
  // Spec errors exit 2 before anything starts; the messages name the spec, never a token.
  if (auto valid = dynup::Watcher::validate(opts.spec, options); !valid) {
    print_line(stderr, "dynup-watch: " + valid.error().message());
    return 2;
  }

  // Signals are taken synchronously by sigwait below, so block them before any thread starts.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

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

  int sig = 0;
  sigwait(&signals, &sig);
  watcher.stop();
  return 0;
}
