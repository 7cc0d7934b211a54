// dynup-watch: prints every published version of a source as one JSON line.
//
//   dynup-watch file:///etc/dynup/api.json
//   {"version":1,"index":1,"peers":[{"id":"10.0.0.1:8080",…}]}
//
// Errors go to stderr, one line each, and never stop the watch: the last good set stays.
#include <dynup/dynup.hpp>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
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
    "  file:///path/peers.json   a JSON peer file (docs/FORMAT.md), re-read on change\n"
    "\n"
    "options:\n"
    "  --once            print the first version and exit (exit 1 if it cannot be read)\n"
    "  --poll-ms N       fallback re-check period for file sources (default 1000)\n"
    "  --allow-empty     publish an empty peer list instead of keeping the last set\n"
    "  --min-peers N     refuse sets with fewer than N peers\n"
    "  --max-removed F   refuse updates removing more than share F (0..1) of the peers\n"
    "  --version         print the dynup version\n"
    "  -h, --help        this text\n";

struct Options {
  std::string spec;
  bool once = false;
  long poll_ms = 1000;
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

} // namespace

int main(int argc, char** argv) {
  Options opts = parse_args(argc, argv);
  auto spec = dynup::parse_source_spec(opts.spec);
  if (!spec) {
    std::fprintf(stderr, "dynup-watch: %s\n", spec.error().message().c_str());
    return 2;
  }
  if (spec->scheme != "file") {
    std::fprintf(stderr, "dynup-watch: %s:// sources are not in this build yet; file:// is\n",
                 spec->scheme.c_str());
    return 2;
  }

  // Signals are taken synchronously by sigwait below, so block them before any thread starts.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  dynup::Publisher publisher;
  dynup::FileWatchOptions fw;
  fw.path = spec->path;
  fw.poll_interval = std::chrono::milliseconds(opts.poll_ms);
  fw.guards = opts.guards;
  dynup::FileWatcher watcher(
      publisher, fw, [](const dynup::Snapshot& s) { print_line(stdout, dynup::to_json(*s)); },
      [](const dynup::Error& e) { print_line(stderr, "dynup-watch: " + e.message()); });

  if (opts.once) return publisher.version() != 0 ? 0 : 1;

  int sig = 0;
  sigwait(&signals, &sig);
  watcher.stop();
  return 0;
}
