// A protocol double of the Consul HTTP API for watcher tests: written from Consul's
// documentation (api-docs/features/blocking.mdx, consistency.mdx, filtering.mdx,
// health.mdx, catalog.mdx, kv.mdx, docs/agent/limits, the agent's `limits` config), not
// from its code, and serving only what dynup reads: GET /v1/health/service/<svc>,
// /v1/catalog/service/<svc>, /v1/kv/<prefix>, and the cluster-wide /v1/catalog/services
// and /v1/health/state/<state> (with `filter`).
//
// Blocking is real: `index=N` returns at once when the resource's index is past N, and
// is otherwise held until it moves or `wait` (default 5m, max 10m) plus up to wait/16 of
// jitter passes, then answers the unchanged state with the same index. Every change made
// through the test API takes the next global (Raft-like) index and wakes held requests;
// each resource reports the global index at its own last change: a service's endpoints
// move only with that service (and, for health, its nodes' checks), /v1/catalog/services
// only with registrations, /v1/health/state only with checks.
// Faults are injected per request; each one cites the behaviour it reproduces. An
// optional per-client connection cap answers 429 beyond it, as an agent does.
//
// Threads: one listener thread plus one thread per open connection, started on demand
// (up to set_max_threads()); every public method is safe from any thread. The
// destructor (and down()) drops open connections, wakes held requests and joins
// everything, so it returns within milliseconds.
#pragma once

#include <httplib.h>
#include <nlohmann/json.hpp>

#include <arpa/inet.h>
#include <pthread.h>
#include <dirent.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <functional>
#include <limits>
#include <initializer_list>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

namespace dynup_test {

/// One registered instance of a service, as the double stores it.
struct ConsulInstance {
  std::string id;                        ///< Service.ID; empty: "<service>-<port>"
  std::string node = "node-1";           ///< Node.Node
  std::string node_address = "10.0.0.1"; ///< Node.Address (used when `address` is empty)
  std::string address;                   ///< Service.Address; may be empty (rule 9)
  std::uint16_t port = 0;
  std::vector<std::string> tags;
  std::map<std::string, std::string> meta;
  int weight_passing = 1;
  int weight_warning = 1;
  bool omit_weights = false; ///< answer without a Weights object, as Consul < 1.2.3 did
  /// Statuses of the instance's own checks: "passing", "warning" or "critical".
  std::vector<std::string> checks{"passing"};
  bool node_maintenance = false;    ///< adds the critical _node_maintenance check
  bool service_maintenance = false; ///< adds the critical _service_maintenance:<id> check
};

/// One request as the double received it.
struct RecordedRequest {
  std::string method;
  std::string path;   ///< without the query string
  std::string target; ///< exactly as sent: path and query
  std::vector<std::pair<std::string, std::string>> params;
  std::vector<std::pair<std::string, std::string>> headers;

  /// The first value of query parameter `name`, if present.
  std::optional<std::string> param(const std::string& name) const {
    for (const auto& [k, v] : params)
      if (k == name) return v;
    return std::nullopt;
  }
  /// The first value of header `name` (case-insensitive), if present.
  std::optional<std::string> header(const std::string& name) const {
    for (const auto& [k, v] : headers)
      if (k.size() == name.size() &&
          std::equal(k.begin(), k.end(), name.begin(), [](char a, char b) { return std::tolower(a) == std::tolower(b); }))
        return v;
    return std::nullopt;
  }
  /// The `index` parameter as a number; nullopt when absent.
  std::optional<std::uint64_t> index() const {
    auto v = param("index");
    if (!v) return std::nullopt;
    return std::strtoull(v->c_str(), nullptr, 10);
  }
};

/// Faults the double can inject, each replacing or altering one response.
enum class ConsulFault {
  /// 500 "No cluster leader": a server without a Raft leader cannot answer a default
  /// (leader-consistent) read (api-docs/features/consistency.mdx, "default" mode).
  no_leader,
  /// 429: the server's rate limiter refuses the request (docs/agent/limits, "Request
  /// denials": 429 Resource Exhausted / rate limit exceeded).
  rate_limited,
  /// 403 "Permission denied": the token lacks service:read / key:read (docs/security/acl;
  /// error bodies are plain text, api-docs/index.mdx).
  permission_denied,
  /// The normal body, written a few bytes at a time with `param` between writes (a
  /// congested link; the client's read timeout applies between bytes, not to the whole).
  slow_body,
  /// Content-Length says the whole body, half of it is sent, then the connection closes
  /// (an agent or proxy dying mid-response).
  truncated_body,
  /// 200 with a body that is not JSON (a misconfigured proxy answering for the agent).
  garbage_json,
  /// X-Consul-Index: 0. blocking.mdx ("Sanity check index is greater than zero"): index
  /// 0 never blocks, so clients must continue from 1.
  index_zero,
  /// The header sent as `x-consul-index`: HTTP header names are case-insensitive
  /// (RFC 9110 §5.1), and HTTP/2 front ends lower-case them.
  lowercase_index_header,
  /// No X-Consul-Index at all (an endpoint or proxy that strips it); treated like 0.
  missing_index_header,
  /// The request is held for `param`, then the connection is dropped with no response
  /// (a load balancer whose idle timeout is shorter than the blocking wait). A long
  /// `param` is a hung agent; release_holds() ends the holds early.
  hold_then_drop,
  /// The normal body, one byte every `param` (an agent or proxy so congested that every
  /// recv gets a byte in time: only a deadline for the whole response ends it).
  trickle_body,
};

namespace detail {

/// Connections of one double, counted from accept to close. Guarded by `mu`; shared by
/// the double and the pool of its current listener (it outlives down()/up()).
struct ConnectionTable {
  std::mutex mu;
  std::size_t cap = 0;            ///< limits.http_max_conns_per_client; 0: no cap
  std::size_t max_threads = 2048; ///< pool threads at most (a held query holds one)
  std::size_t open = 0;
  std::size_t peak = 0;
  std::size_t accepted = 0;
  std::size_t refused = 0; ///< 429s answered to connections over the cap
  std::unordered_map<int, int> fd_by_peer_port; ///< a cache of the scans of /proc/self/fd
};

/// What a pool thread knows about the connection it serves. cpp-httplib runs one
/// connection per task and hands handlers no socket, so a thread-local carries the
/// accept-time verdict (and the descriptor, once found) to the handlers.
struct ConnectionContext {
  bool over_cap = false;
  int fd = -1;
};
inline ConnectionContext*& current_connection() {
  static thread_local ConnectionContext* c = nullptr;
  return c;
}

/// The double's cpp-httplib task queue. httplib calls enqueue() on its listener thread
/// right after each accept(), and each task serves one connection until it is closed:
/// counting here is exact, from accept to close. Threads are started on demand up to
/// ConnectionTable::max_threads (a real agent gives each connection a goroutine; a
/// fixed small pool would queue connections behind held blocking queries), and kept
/// until shutdown().
class ConnectionPool final : public httplib::TaskQueue {
public:
  explicit ConnectionPool(std::shared_ptr<ConnectionTable> table) : table_(std::move(table)) {}
  ConnectionPool(const ConnectionPool&) = delete;
  ConnectionPool& operator=(const ConnectionPool&) = delete;
  ~ConnectionPool() override { shutdown(); }

  void enqueue(std::function<void()> fn) override {
    bool over = false;
    std::size_t limit = 0;
    {
      std::lock_guard<std::mutex> lock(table_->mu);
      ++table_->accepted;
      over = table_->cap > 0 && table_->open >= table_->cap;
      table_->peak = std::max(table_->peak, ++table_->open);
      limit = table_->max_threads;
    }
    auto table = table_;
    auto task = [table, over, fn = std::move(fn)] {
      ConnectionContext ctx;
      ctx.over_cap = over;
      current_connection() = &ctx;
      fn(); // serves the connection and closes its socket
      current_connection() = nullptr;
      std::lock_guard<std::mutex> lock(table->mu);
      --table->open;
    };
    std::lock_guard<std::mutex> lock(mu_);
    jobs_.push_back(std::move(task));
    if (jobs_.size() > idle_ && threads_.size() < std::max<std::size_t>(limit, 1))
      threads_.emplace_back([this] { run(); });
    cv_.notify_one();
  }

  // Called by httplib's listener thread once its accept loop ended (and again by the
  // destructor): runs what is queued, then joins every thread.
  void shutdown() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_)
      if (t.joinable()) t.join();
  }

private:
  void run() {
    ::pthread_setname_np(::pthread_self(), "consul-double"); // tests tell their threads apart
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      ++idle_;
      cv_.wait(lock, [&] { return stopping_ || !jobs_.empty(); });
      --idle_;
      if (jobs_.empty()) return;
      auto job = std::move(jobs_.front());
      jobs_.pop_front();
      lock.unlock();
      job();
      lock.lock();
    }
  }

  std::shared_ptr<ConnectionTable> table_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> jobs_;
  std::vector<std::thread> threads_; // grown by the listener thread only
  std::size_t idle_ = 0;
  bool stopping_ = false;
};

/// The part of Consul's filter language (api-docs/features/filtering.mdx) that dynup's
/// watchers send: `Sel == "v"`, `Sel != "v"`, `"v" in Sel`, `"v" not in Sel`,
/// `Sel contains "v"`, `Sel is empty`, `Sel is not empty`, combined with `and`, `or`,
/// `not` and parentheses (`and` binds tighter than `or`). Values are "double-quoted"
/// (with \" and \\ escapes), `backquoted`, or bare words (numbers, true). Anything else is
/// a parse error; the double answers it with 400 and a plain-text message, as Consul
/// answers a filter it cannot compile.
class Filter {
public:
  /// Parses `text`; on failure returns nullopt and sets `error`. With `fields`, a
  /// selector whose first part is not one of them is an error too (Consul checks
  /// selectors against the endpoint's type).
  static std::optional<Filter> parse(const std::string& text, std::string& error,
                                     const std::set<std::string>* fields = nullptr) {
    Filter f;
    Parser p{tokenize(text, error), 0, error, fields};
    if (!error.empty()) return std::nullopt;
    if (p.tokens.empty()) {
      error = "empty filter expression";
      return std::nullopt;
    }
    f.root_ = p.parse_or();
    if (error.empty() && p.pos < p.tokens.size()) error = "unexpected \"" + p.tokens[p.pos].text + "\"";
    if (!error.empty()) return std::nullopt;
    return f;
  }

  /// Whether `value` (a JSON object) passes. A selector missing from it matches
  /// neither `==` nor `in` (so `!=` and `not in` hold).
  bool matches(const nlohmann::json& value) const { return eval(root_, value); }

private:
  enum class Op { any, all, negate, eq, ne, in, not_in, empty, not_empty };
  struct Node {
    Op op = Op::eq;
    std::vector<Node> kids;
    std::vector<std::string> selector;
    std::string value;
  };
  struct Token {
    enum Kind { word, string, open, close, eq, ne } kind;
    std::string text;
  };

  static std::vector<Token> tokenize(const std::string& s, std::string& error) {
    std::vector<Token> out;
    std::size_t i = 0;
    while (i < s.size() && error.empty()) {
      char c = s[i];
      if (std::isspace(static_cast<unsigned char>(c))) {
        ++i;
      } else if (c == '(' || c == ')') {
        out.push_back({c == '(' ? Token::open : Token::close, std::string(1, c)});
        ++i;
      } else if ((c == '=' || c == '!') && i + 1 < s.size() && s[i + 1] == '=') {
        out.push_back({c == '=' ? Token::eq : Token::ne, s.substr(i, 2)});
        i += 2;
      } else if (c == '"' || c == '`') {
        std::string v;
        std::size_t j = i + 1;
        for (; j < s.size() && s[j] != c; ++j) {
          if (c == '"' && s[j] == '\\' && j + 1 < s.size()) ++j;
          v += s[j];
        }
        if (j >= s.size()) error = "unterminated string at offset " + std::to_string(i);
        out.push_back({Token::string, v});
        i = j + 1;
      } else if (std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-' || c == '.') {
        std::size_t j = i;
        while (j < s.size() && (std::isalnum(static_cast<unsigned char>(s[j])) || s[j] == '_' || s[j] == '-' ||
                                s[j] == '.'))
          ++j;
        out.push_back({Token::word, s.substr(i, j - i)});
        i = j;
      } else {
        error = std::string("unexpected character '") + c + "' at offset " + std::to_string(i);
      }
    }
    return out;
  }

  struct Parser {
    std::vector<Token> tokens;
    std::size_t pos;
    std::string& error;
    const std::set<std::string>* fields;

    bool word(const char* w) const {
      return pos < tokens.size() && tokens[pos].kind == Token::word && tokens[pos].text == w;
    }
    bool word_at(std::size_t at, const char* w) const {
      return at < tokens.size() && tokens[at].kind == Token::word && tokens[at].text == w;
    }
    Node fail(const std::string& why) {
      if (error.empty()) error = why;
      pos = tokens.size();
      return Node{};
    }
    Node parse_or() {
      Node first = parse_and();
      if (!word("or")) return first;
      Node n{Op::any, {std::move(first)}, {}, {}};
      while (error.empty() && word("or")) {
        ++pos;
        n.kids.push_back(parse_and());
      }
      return n;
    }
    Node parse_and() {
      Node first = parse_unary();
      if (!word("and")) return first;
      Node n{Op::all, {std::move(first)}, {}, {}};
      while (error.empty() && word("and")) {
        ++pos;
        n.kids.push_back(parse_unary());
      }
      return n;
    }
    Node parse_unary() {
      if (pos >= tokens.size()) return fail("expression ends too early");
      if (word("not")) {
        ++pos;
        return Node{Op::negate, {parse_unary()}, {}, {}};
      }
      if (tokens[pos].kind == Token::open) {
        ++pos;
        Node inner = parse_or();
        if (pos >= tokens.size() || tokens[pos].kind != Token::close) return fail("missing ')'");
        ++pos;
        return inner;
      }
      return parse_match();
    }
    std::optional<std::string> value() {
      if (pos < tokens.size() && (tokens[pos].kind == Token::string || tokens[pos].kind == Token::word))
        return tokens[pos++].text;
      return std::nullopt;
    }
    std::optional<std::vector<std::string>> selector() {
      if (pos >= tokens.size() || tokens[pos].kind != Token::word) return std::nullopt;
      const std::string& t = tokens[pos].text;
      std::vector<std::string> parts;
      std::size_t start = 0;
      for (;;) {
        std::size_t dot = t.find('.', start);
        parts.push_back(t.substr(start, dot == std::string::npos ? std::string::npos : dot - start));
        if (parts.back().empty()) return std::nullopt;
        if (dot == std::string::npos) break;
        start = dot + 1;
      }
      if (fields && !fields->count(parts.front())) {
        error = "Selector \"" + t + "\" is not valid";
        return std::nullopt;
      }
      ++pos;
      return parts;
    }
    Node parse_match() {
      Node n;
      if (tokens[pos].kind == Token::string) { // "v" in Sel, "v" not in Sel
        n.value = tokens[pos++].text;
        if (word("in")) {
          n.op = Op::in;
          ++pos;
        } else if (word("not") && word_at(pos + 1, "in")) {
          n.op = Op::not_in;
          pos += 2;
        } else {
          return fail("expected 'in' or 'not in' after \"" + n.value + "\"");
        }
        auto sel = selector();
        if (!sel) return fail("expected a selector after 'in'");
        n.selector = std::move(*sel);
        return n;
      }
      auto sel = selector();
      if (!sel) return fail(error.empty() ? "expected a selector at \"" + tokens[pos].text + "\"" : error);
      n.selector = std::move(*sel);
      if (pos >= tokens.size()) return fail("expected an operator after the selector");
      if (tokens[pos].kind == Token::eq || tokens[pos].kind == Token::ne) {
        n.op = tokens[pos].kind == Token::eq ? Op::eq : Op::ne;
        ++pos;
      } else if (word("contains")) {
        n.op = Op::in;
        ++pos;
      } else if (word("not") && word_at(pos + 1, "contains")) {
        n.op = Op::not_in;
        pos += 2;
      } else if (word("is") && word_at(pos + 1, "empty")) {
        n.op = Op::empty;
        pos += 2;
        return n;
      } else if (word("is") && word_at(pos + 1, "not") && word_at(pos + 2, "empty")) {
        n.op = Op::not_empty;
        pos += 3;
        return n;
      } else {
        return fail("unsupported operator \"" + tokens[pos].text + "\"");
      }
      auto v = value();
      if (!v) return fail("expected a value");
      n.value = std::move(*v);
      return n;
    }
  };

  static const nlohmann::json* select(const std::vector<std::string>& path, const nlohmann::json& v) {
    const nlohmann::json* j = &v;
    for (const auto& part : path) {
      if (!j->is_object() || !j->contains(part)) return nullptr;
      j = &(*j)[part];
    }
    return j;
  }
  static std::string text_of(const nlohmann::json& j) { return j.is_string() ? j.get<std::string>() : j.dump(); }
  static bool contains(const nlohmann::json& j, const std::string& v) {
    if (j.is_array()) return std::any_of(j.begin(), j.end(), [&](const nlohmann::json& e) { return text_of(e) == v; });
    if (j.is_object()) return j.contains(v);
    if (j.is_string()) return j.get<std::string>().find(v) != std::string::npos;
    return false;
  }
  static bool eval(const Node& n, const nlohmann::json& v) {
    switch (n.op) {
    case Op::any: return std::any_of(n.kids.begin(), n.kids.end(), [&](const Node& k) { return eval(k, v); });
    case Op::all: return std::all_of(n.kids.begin(), n.kids.end(), [&](const Node& k) { return eval(k, v); });
    case Op::negate: return !eval(n.kids.front(), v);
    default: break;
    }
    const nlohmann::json* j = select(n.selector, v);
    switch (n.op) {
    case Op::eq: return j && text_of(*j) == n.value;
    case Op::ne: return !(j && text_of(*j) == n.value);
    case Op::in: return j && contains(*j, n.value);
    case Op::not_in: return !(j && contains(*j, n.value));
    case Op::empty: return !j || j->is_null() || j->empty() || (j->is_string() && j->get<std::string>().empty());
    default: return !(!j || j->is_null() || j->empty() || (j->is_string() && j->get<std::string>().empty()));
    }
  }

  Node root_;
};

} // namespace detail

/// What to add to each blocking hold on top of `wait` (Consul: uniform in [0, wait/16]).
enum class ConsulJitter { random, none, max };

class ConsulDouble {
public:
  /// Applies a fault until clear_faults().
  static constexpr std::size_t forever = std::numeric_limits<std::size_t>::max();
  static constexpr const char* datacenter = "dc1";

  /// Starts listening on 127.0.0.1 on a free port.
  ConsulDouble() : rng_(std::random_device{}()) { start(0); }
  ~ConsulDouble() { shut(); }
  ConsulDouble(const ConsulDouble&) = delete;
  ConsulDouble& operator=(const ConsulDouble&) = delete;

  std::uint16_t port() const noexcept { return port_; }
  /// A dynup source spec for this double, e.g. spec("/health/api").
  std::string spec(const std::string& path) const {
    return "consul://127.0.0.1:" + std::to_string(port_) + path;
  }

  // --- state ----------------------------------------------------------------------

  /// Replaces every instance of `service` (an empty list deregisters them all). One
  /// change: it gets the next global index, and only this service's index moves (plus
  /// /v1/catalog/services' when a registration changed, /v1/health/state's when a check
  /// did). O(instances of the service + services on its nodes when a node appears).
  void set_service(const std::string& service, std::vector<ConsulInstance> instances) {
    change([&] { apply_service(service, std::move(instances)); });
  }

  /// Bumps the service's index without changing what it returns (Consul does this for
  /// writes that do not alter the result, e.g. a check's output: blocking.mdx "a return
  /// is no guarantee of a change").
  void touch_service(const std::string& service) {
    change([&] { apply_touch(service); });
  }

  /// Sets the statuses of one instance's own checks ("passing", "warning", "critical").
  /// Throws std::logic_error when the service has no instance `instance_id`.
  void set_instance_checks(const std::string& service, const std::string& instance_id,
                           std::vector<std::string> statuses) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = services_.find(service);
    if (it == services_.end() || std::none_of(it->second.instances.begin(), it->second.instances.end(),
                                              [&](const ConsulInstance& i) { return i.id == instance_id; }))
      throw std::logic_error("ConsulDouble: no instance " + instance_id + " of " + service);
    ++index_;
    apply_instance_checks(service, instance_id, std::move(statuses));
    cv_.notify_all();
  }

  /// Sets a node-level check (serfHealth by default: the agent's liveness) on `node`.
  /// It shows in the Checks of every instance on that node in /v1/health/service and
  /// once, with ServiceName "", in /v1/health/state; a change moves the health index
  /// of every service with an instance on the node. Every node that hosts an instance
  /// has a passing serfHealth unless set otherwise; a node set here exists even
  /// without instances (a node with no services, as in a real catalog).
  void set_node_check(const std::string& node, const std::string& status,
                      const std::string& check_id = "serfHealth", const std::string& name = "") {
    change([&] { apply_node_check(node, check_id, name, status); });
  }

  /// Removes a node check set by set_node_check(); a removed serfHealth goes back to
  /// the implicit passing one while the node hosts instances.
  void remove_node_check(const std::string& node, const std::string& check_id = "serfHealth") {
    change([&] { apply_remove_node_check(node, check_id); });
  }

  /// Edits many services in one change: every edit made through the Batch gets the
  /// same next global index (like one /v1/txn), held requests are woken once. Use it to
  /// set up or change hundreds of services quickly. The Batch is valid only inside
  /// `edit`, which runs under the double's lock: it must not call the double.
  class Batch {
  public:
    void set_service(const std::string& service, std::vector<ConsulInstance> instances) {
      d_.apply_service(service, std::move(instances));
    }
    void deregister(const std::string& service) { d_.apply_service(service, {}); }
    void touch_service(const std::string& service) { d_.apply_touch(service); }
    void set_instance_checks(const std::string& service, const std::string& instance_id,
                             std::vector<std::string> statuses) {
      d_.apply_instance_checks(service, instance_id, std::move(statuses));
    }
    void set_node_check(const std::string& node, const std::string& status,
                        const std::string& check_id = "serfHealth", const std::string& name = "") {
      d_.apply_node_check(node, check_id, name, status);
    }
    void remove_node_check(const std::string& node, const std::string& check_id = "serfHealth") {
      d_.apply_remove_node_check(node, check_id);
    }

  private:
    friend class ConsulDouble;
    explicit Batch(ConsulDouble& d) : d_(d) {}
    ConsulDouble& d_;
  };

  /// Runs `edit` as one change (see Batch). O(edits x instances per service). If an
  /// edit throws, the edits before it stay applied and the exception propagates.
  void batch(const std::function<void(Batch&)>& edit) {
    change([&] {
      Batch b(*this);
      edit(b);
    });
  }

  /// set_service for each entry, as one batch (one lock, one index, one wake-up).
  void set_services(std::map<std::string, std::vector<ConsulInstance>> services) {
    batch([&](Batch& b) {
      for (auto& [name, instances] : services) b.set_service(name, std::move(instances));
    });
  }

  void put_kv(const std::string& key, const std::string& value, std::uint64_t flags = 0) {
    change([&] {
      auto it = kv_.find(key);
      std::uint64_t created = it == kv_.end() ? index_ : it->second.create_index;
      kv_[key] = Kv{value, flags, created, index_};
      tombstones_.erase(key);
      kv_table_index_ = index_;
    });
  }

  /// Deletes every key under `prefix` (a tombstone keeps the prefix's index moving
  /// forward, as Consul's KV tombstones do).
  void delete_kv_tree(const std::string& prefix) {
    change([&] {
      for (auto it = kv_.begin(); it != kv_.end();) {
        if (it->first.compare(0, prefix.size(), prefix) == 0) {
          tombstones_[it->first] = index_;
          it = kv_.erase(it);
        } else {
          ++it;
        }
      }
      kv_table_index_ = index_;
    });
  }

  /// A snapshot restore from an older state: the global index and every resource index
  /// go back to `index` (blocking.mdx, "Reset the index if it goes backwards"). Held
  /// requests are woken, see an index not past theirs, and keep waiting.
  void restore_snapshot(std::uint64_t index) {
    std::lock_guard<std::mutex> lock(mu_);
    index_ = index;
    for (auto& [name, s] : services_) s.index = std::min(s.index, index);
    for (auto& [key, kv] : kv_) {
      kv.create_index = std::min(kv.create_index, index);
      kv.modify_index = std::min(kv.modify_index, index);
    }
    for (auto& [key, idx] : tombstones_) idx = std::min(idx, index);
    services_table_index_ = std::min(services_table_index_, index);
    kv_table_index_ = std::min(kv_table_index_, index);
    catalog_services_index_ = std::min(catalog_services_index_, index);
    checks_index_ = std::min(checks_index_, index);
    auto clamp = [&](std::map<std::string, CheckState>& checks) {
      for (auto& [id, c] : checks) {
        c.create_index = std::min(c.create_index, index);
        c.modify_index = std::min(c.modify_index, index);
      }
    };
    for (auto& [name, s] : services_) {
      s.node_index = std::min(s.node_index, index);
      clamp(s.checks);
    }
    for (auto& [name, n] : nodes_) clamp(n.checks);
    ++restores_;
    cv_.notify_all();
  }

  /// Requests must carry this token in X-Consul-Token; others get 403 "ACL not found".
  void require_token(std::string token) {
    std::lock_guard<std::mutex> lock(mu_);
    token_ = std::move(token);
  }

  void set_jitter(ConsulJitter j) {
    std::lock_guard<std::mutex> lock(mu_);
    jitter_ = j;
  }

  /// Each request moves every resource's index first, so no blocking request ever waits
  /// (a cluster whose index changes constantly: blocking.mdx, "Rate limit").
  void set_index_churn(bool on) {
    std::lock_guard<std::mutex> lock(mu_);
    churn_ = on;
  }

  /// The global (Raft-like) index: the index of the last change of any kind.
  std::uint64_t index() const {
    std::lock_guard<std::mutex> lock(mu_);
    return index_;
  }
  /// X-Consul-Index of /v1/health/service/<service>: the global index at the last
  /// change of its entries or of a check of one of its nodes.
  std::uint64_t service_index(const std::string& service) const {
    std::lock_guard<std::mutex> lock(mu_);
    return health_index(service);
  }
  /// X-Consul-Index of /v1/catalog/services: moves with registrations only.
  std::uint64_t catalog_services_index() const {
    std::lock_guard<std::mutex> lock(mu_);
    return std::max<std::uint64_t>(catalog_services_index_, 1);
  }
  /// X-Consul-Index of /v1/health/state/<state>: moves when any check changes.
  std::uint64_t checks_index() const {
    std::lock_guard<std::mutex> lock(mu_);
    return std::max<std::uint64_t>(checks_index_, 1);
  }

  // --- connections ------------------------------------------------------------------

  /// Consul's limits.http_max_conns_per_client (docs/agent/config, "limits"; 200 on a
  /// real agent, 0 = off here, the default). A connection accepted while `cap` are open
  /// is answered "429 Too Many Requests" to its first request and closed. The double
  /// listens on 127.0.0.1 only, so every client has the same IP: the cap counts every
  /// connection. Applies to connections accepted from now on.
  void set_max_conns_per_client(std::size_t cap) {
    std::lock_guard<std::mutex> lock(conns_->mu);
    conns_->cap = cap;
  }
  /// Threads serving connections at most (default 2048; each open connection holds
  /// one, as each held blocking query does). Connections past it wait for a thread.
  void set_max_threads(std::size_t n) {
    std::lock_guard<std::mutex> lock(conns_->mu);
    conns_->max_threads = n;
  }

  /// Connection counters, exact: counted when httplib accepts a connection, uncounted
  /// when the double has closed it (a client's close is noticed at once by an idle
  /// connection, within 50 ms by a held query).
  struct Connections {
    std::size_t open = 0;     ///< open right now
    std::size_t peak = 0;     ///< most open at once since start or reset_peak_connections()
    std::size_t accepted = 0; ///< accepted in total, refused ones included
    std::size_t refused = 0;  ///< answered 429 for being over the cap
  };
  Connections connections() const {
    std::lock_guard<std::mutex> lock(conns_->mu);
    return {conns_->open, conns_->peak, conns_->accepted, conns_->refused};
  }
  void reset_peak_connections() {
    std::lock_guard<std::mutex> lock(conns_->mu);
    conns_->peak = conns_->open;
  }

  // --- faults ---------------------------------------------------------------------

  /// Applies `fault` to the next `times` requests (forever: until clear_faults()).
  /// `param` is the delay of slow_body and the hold of hold_then_drop.
  void inject(ConsulFault fault, std::size_t times = forever,
              std::chrono::milliseconds param = std::chrono::milliseconds(200)) {
    std::lock_guard<std::mutex> lock(mu_);
    fault_ = ActiveFault{fault, times, param};
  }

  void clear_faults() {
    std::lock_guard<std::mutex> lock(mu_);
    fault_.reset();
  }

  /// Ends every hold_then_drop hold now (their connections are dropped).
  void release_holds() {
    std::lock_guard<std::mutex> lock(mu_);
    ++releases_;
    cv_.notify_all();
  }

  /// Stops listening: connections are refused and open ones dropped, as when the agent
  /// process dies. Held requests get no answer.
  void down() { shut(); }

  /// Listens again on the same port (a restarted agent keeps its address).
  void up() {
    if (running()) return;
    start(port_);
  }

  bool running() const {
    std::lock_guard<std::mutex> lock(mu_);
    return server_ != nullptr;
  }

  // --- observations ---------------------------------------------------------------

  /// API requests received (every path, faults included).
  std::size_t requests() const {
    std::lock_guard<std::mutex> lock(mu_);
    return log_.size();
  }
  /// API requests received for this path (no query string).
  std::size_t requests(const std::string& path) const {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<std::size_t>(
        std::count_if(log_.begin(), log_.end(), [&](const RecordedRequest& r) { return r.path == path; }));
  }
  std::vector<RecordedRequest> log() const {
    std::lock_guard<std::mutex> lock(mu_);
    return log_;
  }
  /// The most recent request; throws when there was none.
  RecordedRequest last_request() const {
    std::lock_guard<std::mutex> lock(mu_);
    if (log_.empty()) throw std::logic_error("ConsulDouble: no request yet");
    return log_.back();
  }
  /// Requests a fault was applied to.
  std::size_t faulted() const {
    std::lock_guard<std::mutex> lock(mu_);
    return faulted_;
  }
  /// Requests being held right now.
  std::size_t held() const {
    std::lock_guard<std::mutex> lock(mu_);
    return held_;
  }

private:
  /// One check as /v1/health/state lists it; create/modify follow its own changes.
  struct CheckState {
    std::string node;
    std::string id;
    std::string name;
    std::string status;
    std::string service_id; ///< empty for a node check
    std::string service;    ///< ServiceName; empty for a node check
    std::vector<std::string> service_tags;
    std::uint64_t create_index = 0;
    std::uint64_t modify_index = 0;
  };
  struct Service {
    std::vector<ConsulInstance> instances;
    std::uint64_t index = 0;      ///< last change of its entries (health and catalog)
    std::uint64_t node_index = 0; ///< last change of a check of one of its nodes (health)
    std::map<std::string, CheckState> checks; ///< its instances' checks, by node + '\n' + CheckID
  };
  struct NodeState {
    std::size_t instances = 0; ///< instances it hosts: it has an implicit serfHealth while > 0
    std::map<std::string, std::pair<std::string, std::string>> set; ///< CheckID -> (name, status) set by tests
    std::map<std::string, CheckState> checks;                         ///< its node checks now, by CheckID
  };
  struct Kv {
    std::string value;
    std::uint64_t flags = 0;
    std::uint64_t create_index = 0;
    std::uint64_t modify_index = 0;
  };
  struct ActiveFault {
    ConsulFault kind;
    std::size_t left;
    std::chrono::milliseconds param;
  };
  enum class Kind { health, catalog, kv, catalog_services, health_state };
  struct Answer {
    int status = 200;
    std::string body;
    std::uint64_t index = 0;
    bool json = true;
  };

  template <class F> void change(F&& f) {
    std::lock_guard<std::mutex> lock(mu_);
    ++index_;
    f();
    cv_.notify_all();
  }

  // The apply_* functions run under mu_ with index_ already moved to the change's index.

  static bool same_registration(const std::vector<ConsulInstance>& a, const std::vector<ConsulInstance>& b) {
    auto key = [](const ConsulInstance& i) {
      return std::tie(i.id, i.node, i.node_address, i.address, i.port, i.tags, i.meta, i.weight_passing,
                      i.weight_warning, i.omit_weights);
    };
    return std::equal(a.begin(), a.end(), b.begin(), b.end(),
                      [&](const ConsulInstance& x, const ConsulInstance& y) { return key(x) == key(y); });
  }

  void apply_service(const std::string& name, std::vector<ConsulInstance> instances) {
    for (auto& i : instances)
      if (i.id.empty()) i.id = name + "-" + std::to_string(i.port);
    Service& svc = services_[name];
    if (!same_registration(svc.instances, instances)) catalog_services_index_ = index_;
    std::set<std::string> touched;
    for (const auto& i : svc.instances) {
      --nodes_[i.node].instances;
      touched.insert(i.node);
    }
    for (const auto& i : instances) {
      ++nodes_[i.node].instances;
      touched.insert(i.node);
    }
    svc.instances = std::move(instances);
    svc.index = index_;
    services_table_index_ = index_;
    refresh_service_checks(name, svc);
    for (const auto& node : touched) refresh_node(node);
  }

  void apply_touch(const std::string& name) {
    services_[name].index = index_;
    services_table_index_ = index_;
  }

  void apply_instance_checks(const std::string& name, const std::string& id, std::vector<std::string> statuses) {
    auto it = services_.find(name);
    if (it != services_.end()) {
      std::vector<ConsulInstance> instances = it->second.instances;
      for (auto& i : instances) {
        if (i.id != id) continue;
        i.checks = std::move(statuses);
        apply_service(name, std::move(instances));
        return;
      }
    }
    throw std::logic_error("ConsulDouble: no instance " + id + " of " + name);
  }

  void apply_node_check(const std::string& node, const std::string& id, const std::string& name,
                        const std::string& status) {
    nodes_[node].set[id] = {name.empty() ? (id == "serfHealth" ? "Serf Health Status" : id) : name, status};
    refresh_node(node);
  }

  void apply_remove_node_check(const std::string& node, const std::string& id) {
    auto it = nodes_.find(node);
    if (it == nodes_.end()) return;
    it->second.set.erase(id);
    refresh_node(node);
  }

  static std::string check_key(const std::string& node, const std::string& id) { return node + '\n' + id; }

  // Brings `have` to `want`, keeping CreateIndex and moving ModifyIndex of what changed
  // (status or name; ServiceTags follow without counting as a change). True if any did.
  bool merge_checks(std::map<std::string, CheckState>& have, std::map<std::string, CheckState> want) {
    bool changed = false;
    for (auto& [key, c] : want) {
      auto it = have.find(key);
      if (it == have.end()) {
        c.create_index = c.modify_index = index_;
        changed = true;
      } else if (it->second.status != c.status || it->second.name != c.name) {
        c.create_index = it->second.create_index;
        c.modify_index = index_;
        changed = true;
      } else {
        c.create_index = it->second.create_index;
        c.modify_index = it->second.modify_index;
      }
    }
    for (const auto& [key, c] : have)
      if (!want.count(key)) changed = true;
    have = std::move(want);
    if (changed) checks_index_ = index_;
    return changed;
  }

  // The checks an instance list implies (health.mdx): each instance's own checks, its
  // maintenance checks; _node_maintenance is per instance here, as the flag is.
  void refresh_service_checks(const std::string& name, Service& svc) {
    std::map<std::string, CheckState> want;
    for (const ConsulInstance& i : svc.instances) {
      auto add = [&](const std::string& id, const std::string& check_name, const std::string& status, bool of_service) {
        CheckState c{i.node, id, check_name, status, of_service ? i.id : "", of_service ? name : "",
                     of_service ? i.tags : std::vector<std::string>{}, 0, 0};
        want[check_key(i.node, id)] = std::move(c);
      };
      if (i.node_maintenance) add("_node_maintenance", "Node Maintenance Mode", "critical", false);
      for (std::size_t c = 0; c < i.checks.size(); ++c)
        add("service:" + i.id + (c ? ":" + std::to_string(c + 1) : ""), "Service '" + name + "' check", i.checks[c],
            true);
      if (i.service_maintenance) add("_service_maintenance:" + i.id, "Service Maintenance Mode", "critical", true);
    }
    merge_checks(svc.checks, std::move(want));
  }

  // A node's checks: what tests set, plus a passing serfHealth while it hosts instances.
  // A change moves the health index of every service with an instance on the node.
  void refresh_node(const std::string& node) {
    auto it = nodes_.find(node);
    if (it == nodes_.end()) return;
    NodeState& n = it->second;
    std::map<std::string, CheckState> want;
    for (const auto& [id, ns] : n.set) want[id] = CheckState{node, id, ns.first, ns.second, "", "", {}, 0, 0};
    if (n.instances > 0 && !want.count("serfHealth"))
      want["serfHealth"] = CheckState{node, "serfHealth", "Serf Health Status", "passing", "", "", {}, 0, 0};
    if (merge_checks(n.checks, std::move(want)))
      for (auto& [name, svc] : services_)
        if (std::any_of(svc.instances.begin(), svc.instances.end(),
                        [&](const ConsulInstance& i) { return i.node == node; }))
          svc.node_index = index_;
    if (n.instances == 0 && n.set.empty() && n.checks.empty()) nodes_.erase(it);
  }

  std::uint64_t health_index(const std::string& service) const {
    auto it = services_.find(service);
    std::uint64_t i =
        it != services_.end() ? std::max(it->second.index, it->second.node_index) : services_table_index_;
    return std::max<std::uint64_t>(i, 1);
  }

  void start(std::uint16_t port) {
    auto server = std::make_unique<httplib::Server>();
    auto conns = conns_;
    server->new_task_queue = [conns] { return new detail::ConnectionPool(conns); };
    server->set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
      detail::ConnectionContext* c = detail::current_connection();
      if (!c || !c->over_cap) return httplib::Server::HandlerResponse::Unhandled;
      std::size_t cap = 0;
      {
        std::lock_guard<std::mutex> lock(conns_->mu);
        ++conns_->refused;
        cap = conns_->cap;
      }
      res.set_header("Connection", "close");
      plain(res, 429,
            "Too Many Requests: more than " + std::to_string(cap) + " connections from " + req.remote_addr);
      return httplib::Server::HandlerResponse::Handled;
    });
    // Consul's Go server disables Nagle (Go's default for TCP): without this every held
    // answer would sit ~40 ms behind the client's delayed ACK.
    server->set_tcp_nodelay(true);
    auto listener_fd = std::make_shared<std::atomic<int>>(-1); // the callback outlives start()
    server->set_socket_options([listener_fd](int sock) {
      listener_fd->store(sock);
      int yes = 1;
      ::setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
      ::setsockopt(sock, SOL_SOCKET, SO_REUSEPORT, &yes, sizeof yes);
    });
    server->Get(R"(/v1/health/service/([^/?]+))",
                [this](const httplib::Request& q, httplib::Response& r) { serve(Kind::health, q, r); });
    server->Get(R"(/v1/catalog/service/([^/?]+))",
                [this](const httplib::Request& q, httplib::Response& r) { serve(Kind::catalog, q, r); });
    // httplib calls the logger once the answer is written: the connection of a 429 is
    // closed there (its next read sees the shutdown and httplib closes the socket).
    server->set_logger([this](const httplib::Request& req, const httplib::Response&) {
      detail::ConnectionContext* c = detail::current_connection();
      if (!c || !c->over_cap) return;
      int fd = connection_fd(req);
      if (fd >= 0) ::shutdown(fd, SHUT_RDWR);
    });
    server->Get("/v1/catalog/services",
                [this](const httplib::Request& q, httplib::Response& r) { serve(Kind::catalog_services, q, r); });
    server->Get(R"(/v1/health/state/([^/?]+))",
                [this](const httplib::Request& q, httplib::Response& r) { serve(Kind::health_state, q, r); });
    server->Get(R"(/v1/kv/(.*))",
                [this](const httplib::Request& q, httplib::Response& r) { serve(Kind::kv, q, r); });
    int bound = -1;
    if (port == 0) {
      bound = server->bind_to_any_port("127.0.0.1");
    } else {
      // The old listener's connections may linger in TIME_WAIT, or a client may briefly
      // hold the port as its ephemeral one: retry for a while.
      auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
      for (;;) {
        if (server->bind_to_port("127.0.0.1", port)) {
          bound = port;
          break;
        }
        if (std::chrono::steady_clock::now() > deadline) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
    }
    if (bound <= 0) throw std::runtime_error("ConsulDouble: cannot listen on 127.0.0.1:" + std::to_string(port));
    // httplib listens with a backlog of 5; an agent (Go) uses the system's maximum.
    // With 5, a burst of connects overflows the queue and waits out SYN-ACK backoff.
    if (int fd = listener_fd->load(); fd >= 0) ::listen(fd, SOMAXCONN);
    httplib::Server* raw = server.get();
    {
      std::lock_guard<std::mutex> lock(mu_);
      port_ = static_cast<std::uint16_t>(bound);
      closing_ = false;
      server_ = std::move(server);
    }
    listener_ = std::thread([raw] {
      ::pthread_setname_np(::pthread_self(), "consul-double");
      raw->listen_after_bind();
    });
    // stop() before the listener runs would be lost (httplib checks is_running()).
    while (!raw->is_running()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }

  void shut() {
    std::unique_ptr<httplib::Server> server;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!server_) return;
      closing_ = true;
      cv_.notify_all();
      server = std::move(server_);
    }
    server->stop();
    drop_connections(-1);
    listener_.join(); // the pool joins its workers, so every handler has returned
  }

  // Shuts down accepted connections on our port (all, or the one from `peer_port`).
  // cpp-httplib gives handlers no socket, so the descriptors are found by address.
  void drop_connections(int peer_port) const {
    for (int fd : connection_fds(peer_port)) ::shutdown(fd, SHUT_RDWR);
  }

  // True when the client of this request has closed its end (or the socket is gone). A
  // held request notices this, as Consul's HTTP server cancels a blocking query whose
  // client went away, instead of occupying a pool thread until the wait runs out.
  bool client_gone(const httplib::Request& req) const {
    int fd = connection_fd(req);
    if (fd < 0) return true;
    char byte = 0;
    ssize_t n = ::recv(fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
    return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
  }

  // Shuts down the connection of this request (the handler returns, httplib closes it).
  void drop_connection(const httplib::Request& req) const {
    int fd = connection_fd(req);
    if (fd >= 0) ::shutdown(fd, SHUT_RDWR);
  }

  // The descriptor of the connection serving `req`, found once per connection: the
  // connection's task owns it until it returns, so it cannot be reused meanwhile. A
  // shared cache of the last /proc/self/fd scan, checked against the socket's
  // addresses, spares a scan per connection when hundreds connect at once.
  int connection_fd(const httplib::Request& req) const {
    detail::ConnectionContext* c = detail::current_connection();
    if (c && c->fd >= 0) return c->fd;
    int fd = -1;
    {
      std::lock_guard<std::mutex> lock(conns_->mu);
      auto it = conns_->fd_by_peer_port.find(req.remote_port);
      if (it != conns_->fd_by_peer_port.end() && is_connection(it->second, req.remote_port)) fd = it->second;
    }
    if (fd < 0) {
      std::unordered_map<int, int> found;
      for (int f : connection_fds(-1, &found))
        if (found[f] == req.remote_port) fd = f;
      std::lock_guard<std::mutex> lock(conns_->mu);
      conns_->fd_by_peer_port.clear();
      for (const auto& [f, peer] : found) conns_->fd_by_peer_port[peer] = f;
    }
    if (c) c->fd = fd;
    return fd;
  }

  // Whether `fd` is an accepted socket of this double whose peer port is `peer_port`.
  bool is_connection(int fd, int peer_port) const {
    sockaddr_in local{}, peer{};
    socklen_t len = sizeof local;
    if (::getsockname(fd, reinterpret_cast<sockaddr*>(&local), &len) != 0 || local.sin_family != AF_INET ||
        ntohs(local.sin_port) != port_)
      return false;
    len = sizeof peer;
    return ::getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &len) == 0 && ntohs(peer.sin_port) == peer_port;
  }

  // The accepted sockets of this double whose peer is `peer_port` (all when negative).
  std::vector<int> connection_fds(int peer_port, std::unordered_map<int, int>* peer_ports = nullptr) const {
    std::vector<int> fds;
    DIR* dir = ::opendir("/proc/self/fd");
    if (!dir) return fds;
    while (dirent* e = ::readdir(dir)) {
      if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
      int fd = std::atoi(e->d_name);
      sockaddr_in local{}, peer{};
      socklen_t len = sizeof local;
      if (::getsockname(fd, reinterpret_cast<sockaddr*>(&local), &len) != 0 || local.sin_family != AF_INET ||
          ntohs(local.sin_port) != port_)
        continue;
      len = sizeof peer;
      if (::getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &len) != 0) continue; // the listener
      if (peer_port >= 0 && ntohs(peer.sin_port) != peer_port) continue;
      fds.push_back(fd);
      if (peer_ports) (*peer_ports)[fd] = ntohs(peer.sin_port);
    }
    ::closedir(dir);
    return fds;
  }

  static void plain(httplib::Response& res, int status, const std::string& text) {
    res.status = status;
    res.set_content(text, "text/plain; charset=utf-8");
  }

  // Go's time.ParseDuration for what clients send ("1s", "500ms", "1m30s", "2.5s").
  static std::optional<std::chrono::milliseconds> parse_wait(const std::string& s) {
    if (s.empty()) return std::nullopt;
    double total_ms = 0;
    std::size_t i = 0;
    while (i < s.size()) {
      std::size_t start = i;
      while (i < s.size() && (std::isdigit(static_cast<unsigned char>(s[i])) || s[i] == '.')) ++i;
      if (start == i) return std::nullopt;
      double n = std::strtod(s.substr(start, i - start).c_str(), nullptr);
      std::size_t u = i;
      while (i < s.size() && std::isalpha(static_cast<unsigned char>(s[i]))) ++i;
      std::string unit = s.substr(u, i - u);
      static const std::map<std::string, double> units{{"ns", 1e-6}, {"us", 1e-3}, {"ms", 1},
                                                       {"s", 1e3},   {"m", 6e4},   {"h", 3.6e6}};
      auto it = units.find(unit);
      if (it == units.end()) return std::nullopt;
      total_ms += n * it->second;
    }
    return std::chrono::milliseconds(static_cast<std::int64_t>(total_ms));
  }

  // Only `passing` with no value, "1" or "true" filters (Go's strconv.ParseBool).
  static bool flag(const httplib::Request& req, const char* name) {
    if (!req.has_param(name)) return false;
    std::string v = req.get_param_value(name);
    return v.empty() || v == "1" || v == "true" || v == "t" || v == "TRUE" || v == "True";
  }

  void serve(Kind kind, const httplib::Request& req, httplib::Response& res) {
    std::unique_lock<std::mutex> lock(mu_);
    RecordedRequest rec{req.method, req.path, req.target, {}, {}};
    for (const auto& [k, v] : req.params) rec.params.emplace_back(k, v);
    for (const auto& [k, v] : req.headers) rec.headers.emplace_back(k, v);
    log_.push_back(std::move(rec));
    if (churn_) {
      ++index_;
      for (auto& [name, svc] : services_) svc.index = svc.node_index = index_;
      for (auto& [key, kv] : kv_) kv.modify_index = index_;
      services_table_index_ = kv_table_index_ = catalog_services_index_ = checks_index_ = index_;
    }

    std::optional<ActiveFault> fault;
    if (fault_) {
      fault = fault_;
      ++faulted_;
      if (fault_->left != forever && --fault_->left == 0) fault_.reset();
    }
    std::uint64_t now_index = resource_index(kind, req);
    auto header_index = [&](std::uint64_t i) { res.set_header("X-Consul-Index", std::to_string(i)); };
    if (fault) {
      switch (fault->kind) {
      case ConsulFault::no_leader: return plain(res, 500, "No cluster leader");
      case ConsulFault::rate_limited: return plain(res, 429, "rate limit exceeded, try again later");
      case ConsulFault::permission_denied: return plain(res, 403, "Permission denied");
      case ConsulFault::garbage_json:
        header_index(now_index);
        res.set_content("{\"Node\": [<html>502 Bad Gateway", "application/json");
        return;
      default: break;
      }
    }
    if (!token_.empty() && req.get_header_value("X-Consul-Token") != token_)
      return plain(res, 403, "ACL not found");
    if (req.has_param("stale") && req.has_param("consistent"))
      return plain(res, 400, "Cannot specify ?stale with ?consistent, conflicting semantics.");
    if (req.has_param("dc") && req.get_param_value("dc") != datacenter)
      return plain(res, 500, "No path to datacenter");
    if (kind == Kind::health_state) {
      static const std::set<std::string> states{"any", "passing", "warning", "critical"};
      if (!states.count(std::string(req.matches[1]))) return plain(res, 400, "Invalid state");
      // Consul compiles the filter before it blocks: a bad one is a 400 at once.
      std::string error;
      if (!req.get_param_value("filter").empty() &&
          !detail::Filter::parse(req.get_param_value("filter"), error, &check_fields()))
        return plain(res, 400, "Failed to create boolean expression evaluator: " + error);
    }
    if (kind == Kind::catalog_services && !req.get_param_value("filter").empty())
      return plain(res, 400, "the protocol double does not filter /v1/catalog/services");

    std::uint64_t min_index = 0;
    if (req.has_param("index")) {
      const std::string& v = req.get_param_value("index");
      char* end = nullptr;
      min_index = std::strtoull(v.c_str(), &end, 10);
      if (v.empty() || *end != '\0') return plain(res, 400, "Invalid index");
    }
    std::chrono::milliseconds wait = std::chrono::minutes(5);
    if (req.has_param("wait")) {
      auto w = parse_wait(req.get_param_value("wait"));
      if (!w) return plain(res, 400, "Invalid wait time");
      if (w->count() > 0) wait = std::min<std::chrono::milliseconds>(*w, std::chrono::minutes(10));
    }

    if (fault && fault->kind == ConsulFault::hold_then_drop) {
      ++held_;
      const std::uint64_t releases = releases_;
      cv_.wait_for(lock, fault->param, [&] { return closing_ || releases_ != releases; });
      --held_;
      lock.unlock();
      drop_connection(req);
      return;
    }

    // blocking.mdx: hold while the index is not past the client's, up to wait + jitter.
    if (min_index > 0) {
      std::chrono::milliseconds jitter{0};
      if (jitter_ == ConsulJitter::max) jitter = wait / 16;
      if (jitter_ == ConsulJitter::random)
        jitter = std::chrono::milliseconds(std::uniform_int_distribution<std::int64_t>(0, (wait / 16).count())(rng_));
      auto deadline = std::chrono::steady_clock::now() + wait + jitter;
      // A snapshot restore abandons every blocking query (the state store closes its
      // watches), so held requests return at once with the restored, lower index.
      const std::uint64_t restores = restores_;
      auto done = [&] { return closing_ || restores_ != restores || resource_index(kind, req) > min_index; };
      ++held_;
      while (!done() && std::chrono::steady_clock::now() < deadline) {
        cv_.wait_until(lock, std::min(deadline, std::chrono::steady_clock::now() + std::chrono::milliseconds(50)),
                       done);
        if (done()) break;
        lock.unlock();
        bool gone = client_gone(req);
        lock.lock();
        if (gone) {
          --held_;
          return; // nobody to answer
        }
      }
      --held_;
      if (closing_) {
        // A dying agent answers nothing: drop the connection before httplib can write.
        lock.unlock();
        drop_connection(req);
        return;
      }
    }

    Answer a = answer(kind, req);
    if (a.status != 200 && !a.json && a.status != 404) return plain(res, a.status, a.body);
    std::string index_text = std::to_string(a.index);
    if (fault && fault->kind == ConsulFault::index_zero) index_text = "0";
    if (!fault || fault->kind != ConsulFault::missing_index_header)
      res.set_header(fault && fault->kind == ConsulFault::lowercase_index_header ? "x-consul-index" : "X-Consul-Index",
                     index_text);
    res.set_header("X-Consul-KnownLeader", "true");
    res.set_header("X-Consul-LastContact", "0");
    res.status = a.status;
    if (a.status == 404) return; // KV: absent is an empty 404 that still carries the index

    std::chrono::milliseconds param = fault ? fault->param : std::chrono::milliseconds(0);
    if (fault && fault->kind == ConsulFault::slow_body) {
      auto body = std::make_shared<std::string>(std::move(a.body));
      res.set_content_provider(body->size(), "application/json",
                               [this, body, param](std::size_t offset, std::size_t length, httplib::DataSink& sink) {
                                 std::size_t n = std::min<std::size_t>(length, 16);
                                 sink.write(body->data() + offset, n);
                                 std::unique_lock<std::mutex> l(mu_);
                                 cv_.wait_for(l, param, [&] { return closing_; });
                                 return !closing_;
                               });
      return;
    }
    if (fault && fault->kind == ConsulFault::trickle_body) {
      auto body = std::make_shared<std::string>(std::move(a.body));
      res.set_content_provider(body->size(), "application/json",
                               [this, body, param](std::size_t offset, std::size_t, httplib::DataSink& sink) {
                                 {
                                   std::unique_lock<std::mutex> l(mu_);
                                   if (cv_.wait_for(l, param, [&] { return closing_; })) return false;
                                 }
                                 return sink.write(body->data() + offset, 1);
                               });
      return;
    }
    if (fault && fault->kind == ConsulFault::truncated_body) {
      auto body = std::make_shared<std::string>(std::move(a.body));
      res.set_content_provider(body->size(), "application/json",
                               [body](std::size_t offset, std::size_t, httplib::DataSink& sink) {
                                 if (offset > 0) return false; // closes the connection
                                 sink.write(body->data(), body->size() / 2);
                                 return true;
                               });
      return;
    }
    res.set_content(a.body, "application/json");
  }

  std::uint64_t resource_index(Kind kind, const httplib::Request& req) const {
    std::uint64_t i = 0;
    std::string name = req.matches.size() > 1 ? std::string(req.matches[1]) : std::string();
    if (kind == Kind::kv) {
      bool recurse = req.has_param("recurse");
      for (const auto& [key, kv] : kv_)
        if (recurse ? key.compare(0, name.size(), name) == 0 : key == name) i = std::max(i, kv.modify_index);
      for (const auto& [key, idx] : tombstones_)
        if (recurse ? key.compare(0, name.size(), name) == 0 : key == name) i = std::max(i, idx);
      if (i == 0) i = kv_table_index_;
    } else if (kind == Kind::catalog_services) {
      i = catalog_services_index_;
    } else if (kind == Kind::health_state) {
      i = checks_index_;
    } else if (kind == Kind::health) {
      i = health_index(name);
    } else {
      auto it = services_.find(name);
      i = it != services_.end() ? it->second.index : services_table_index_;
    }
    return std::max<std::uint64_t>(i, 1);
  }

  // The fields of a health check object (health.mdx), for filter selectors.
  static const std::set<std::string>& check_fields() {
    static const std::set<std::string> fields{"Node",       "CheckID",     "Name",        "Status",    "Notes",
                                              "Output",     "ServiceID",   "ServiceName", "ServiceTags", "Type",
                                              "Interval",   "Timeout",     "ExposedPort", "Definition", "CreateIndex",
                                              "ModifyIndex", "Namespace",  "Partition"};
    return fields;
  }

  static nlohmann::json check_state_json(const CheckState& c) {
    return {{"Node", c.node},
            {"CheckID", c.id},
            {"Name", c.name},
            {"Status", c.status},
            {"Notes", ""},
            {"Output", ""},
            {"ServiceID", c.service_id},
            {"ServiceName", c.service},
            {"ServiceTags", c.service_tags},
            {"Type", ""},
            {"CreateIndex", c.create_index},
            {"ModifyIndex", c.modify_index}};
  }

  // catalog.mdx: every registered service with the union of its instances' tags.
  Answer catalog_services() const {
    Answer a;
    a.index = std::max<std::uint64_t>(catalog_services_index_, 1);
    nlohmann::json out = nlohmann::json::object();
    for (const auto& [name, svc] : services_) {
      if (svc.instances.empty()) continue;
      std::set<std::string> tags;
      for (const auto& i : svc.instances) tags.insert(i.tags.begin(), i.tags.end());
      out[name] = std::vector<std::string>(tags.begin(), tags.end());
    }
    a.body = out.dump();
    return a;
  }

  // health.mdx, "List Checks in State": every node and service check, sorted by node
  // and CheckID; `any` lists all, another state only checks in it.
  Answer health_state(const httplib::Request& req) const {
    Answer a;
    a.index = std::max<std::uint64_t>(checks_index_, 1);
    std::string state = std::string(req.matches[1]);
    std::optional<detail::Filter> filter;
    std::string error;
    if (!req.get_param_value("filter").empty()) // empty: no filter
      filter = detail::Filter::parse(req.get_param_value("filter"), error, &check_fields());
    std::map<std::string, const CheckState*> all;
    for (const auto& [node, n] : nodes_)
      for (const auto& [id, c] : n.checks) all.emplace(check_key(node, id), &c);
    for (const auto& [name, svc] : services_)
      for (const auto& [key, c] : svc.checks) all.emplace(key, &c);
    nlohmann::json out = nlohmann::json::array();
    for (const auto& [key, c] : all) {
      if (state != "any" && c->status != state) continue;
      nlohmann::json j = check_state_json(*c);
      if (filter && !filter->matches(j)) continue;
      out.push_back(std::move(j));
    }
    a.body = out.dump();
    return a;
  }

  Answer answer(Kind kind, const httplib::Request& req) const {
    if (kind == Kind::catalog_services) return catalog_services();
    if (kind == Kind::health_state) return health_state(req);
    Answer a;
    a.index = resource_index(kind, req);
    std::string name = std::string(req.matches[1]);
    nlohmann::json out = nlohmann::json::array();
    if (kind == Kind::kv) {
      bool recurse = req.has_param("recurse");
      for (const auto& [key, kv] : kv_) {
        if (recurse ? key.compare(0, name.size(), name) != 0 : key != name) continue;
        out.push_back({{"LockIndex", 0},
                       {"Key", key},
                       {"Flags", kv.flags},
                       {"Value", kv.value.empty() ? nlohmann::json(nullptr) : nlohmann::json(base64(kv.value))},
                       {"CreateIndex", kv.create_index},
                       {"ModifyIndex", kv.modify_index}});
      }
      // kv.mdx: a missing key (or an empty prefix) is a 404 with X-Consul-Index.
      if (out.empty()) a.status = 404;
      a.body = out.dump();
      return a;
    }
    auto it = services_.find(name);
    std::vector<std::string> tags;
    for (std::size_t t = 0; t < req.get_param_value_count("tag"); ++t) tags.push_back(req.get_param_value("tag", t));
    bool passing_only = kind == Kind::health && flag(req, "passing");
    std::string filter_text = req.has_param("filter") ? req.get_param_value("filter") : std::string();
    std::optional<detail::Filter> filter;
    if (!filter_text.empty()) {
      std::string error;
      filter = detail::Filter::parse(filter_text, error);
      if (!filter) {
        a.status = 400;
        a.json = false;
        a.body = "Failed to create boolean expression evaluator: " + error;
        return a;
      }
    }
    if (it != services_.end()) {
      for (const ConsulInstance& i : it->second.instances) {
        bool tagged = std::all_of(tags.begin(), tags.end(), [&](const std::string& t) {
          return std::find(i.tags.begin(), i.tags.end(), t) != i.tags.end();
        });
        if (!tagged) continue;
        nlohmann::json entry = kind == Kind::health ? health_entry(name, it->second, i)
                                                    : catalog_entry(name, i, it->second.index);
        if (passing_only) {
          bool all = std::all_of(entry["Checks"].begin(), entry["Checks"].end(),
                                 [](const nlohmann::json& c) { return c["Status"] == "passing"; });
          if (!all) continue;
        }
        if (filter && !filter->matches(entry)) continue;
        out.push_back(std::move(entry));
      }
    }
    a.body = out.dump();
    return a;
  }

  static nlohmann::json node_json(const ConsulInstance& i, std::uint64_t index) {
    return {{"ID", "00000000-0000-4000-8000-" + std::string(12 - std::min<std::size_t>(12, i.node.size()), '0') +
                       i.node.substr(0, 12)},
            {"Node", i.node},
            {"Address", i.node_address},
            {"Datacenter", datacenter},
            {"TaggedAddresses", {{"lan", i.node_address}, {"wan", i.node_address}}},
            {"Meta", nlohmann::json::object()},
            {"CreateIndex", index},
            {"ModifyIndex", index}};
  }

  static nlohmann::json service_json(const std::string& service, const ConsulInstance& i, std::uint64_t index) {
    nlohmann::json s{{"ID", i.id},
                     {"Service", service},
                     {"Tags", i.tags},
                     {"Address", i.address},
                     {"Meta", i.meta},
                     {"Port", i.port},
                     {"EnableTagOverride", false},
                     {"CreateIndex", index},
                     {"ModifyIndex", index}};
    if (!i.omit_weights) s["Weights"] = {{"Passing", i.weight_passing}, {"Warning", i.weight_warning}};
    return s;
  }

  // health.mdx: Node, Service and Checks: the node's checks (serfHealth...), then the
  // instance's; maintenance shows as a critical check.
  nlohmann::json health_entry(const std::string& service, const Service& svc, const ConsulInstance& i) const {
    nlohmann::json checks = nlohmann::json::array();
    if (auto n = nodes_.find(i.node); n != nodes_.end())
      for (const auto& [id, c] : n->second.checks) checks.push_back(check_state_json(c));
    auto own = [&](const std::string& id) {
      auto c = svc.checks.find(check_key(i.node, id));
      if (c == svc.checks.end()) return;
      nlohmann::json j = check_state_json(c->second);
      j["ServiceTags"] = c->second.service.empty() ? nlohmann::json::array() : nlohmann::json(i.tags);
      checks.push_back(std::move(j));
    };
    if (i.node_maintenance) own("_node_maintenance");
    for (std::size_t c = 0; c < i.checks.size(); ++c) own("service:" + i.id + (c ? ":" + std::to_string(c + 1) : ""));
    if (i.service_maintenance) own("_service_maintenance:" + i.id);
    return {{"Node", node_json(i, svc.index)}, {"Service", service_json(service, i, svc.index)}, {"Checks", checks}};
  }

  // catalog.mdx: a flat object per instance.
  static nlohmann::json catalog_entry(const std::string& service, const ConsulInstance& i, std::uint64_t index) {
    nlohmann::json e{{"ID", node_json(i, index)["ID"]},
                     {"Node", i.node},
                     {"Address", i.node_address},
                     {"Datacenter", datacenter},
                     {"TaggedAddresses", {{"lan", i.node_address}, {"wan", i.node_address}}},
                     {"NodeMeta", nlohmann::json::object()},
                     {"ServiceKind", ""},
                     {"ServiceID", i.id},
                     {"ServiceName", service},
                     {"ServiceTags", i.tags},
                     {"ServiceAddress", i.address},
                     {"ServiceMeta", i.meta},
                     {"ServicePort", i.port},
                     {"ServiceEnableTagOverride", false},
                     {"CreateIndex", index},
                     {"ModifyIndex", index}};
    if (!i.omit_weights) e["ServiceWeights"] = {{"Passing", i.weight_passing}, {"Warning", i.weight_warning}};
    return e;
  }

  static std::string base64(const std::string& in) {
    static const char* table = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    std::string out;
    std::size_t i = 0;
    for (; i + 2 < in.size(); i += 3) {
      std::uint32_t n = (std::uint32_t(std::uint8_t(in[i])) << 16) | (std::uint32_t(std::uint8_t(in[i + 1])) << 8) |
                        std::uint8_t(in[i + 2]);
      for (int s = 18; s >= 0; s -= 6) out += table[(n >> s) & 63];
    }
    if (i < in.size()) {
      std::uint32_t n = std::uint32_t(std::uint8_t(in[i])) << 16;
      if (i + 1 < in.size()) n |= std::uint32_t(std::uint8_t(in[i + 1])) << 8;
      out += table[(n >> 18) & 63];
      out += table[(n >> 12) & 63];
      out += i + 1 < in.size() ? table[(n >> 6) & 63] : '=';
      out += '=';
    }
    return out;
  }

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::unique_ptr<httplib::Server> server_;
  std::thread listener_; // started and joined by the thread that calls start()/shut()
  std::uint16_t port_ = 0;
  bool closing_ = false;
  std::mt19937_64 rng_;

  std::uint64_t index_ = 100; // a live cluster's index is never small
  std::uint64_t services_table_index_ = 100;
  std::uint64_t kv_table_index_ = 100;
  std::uint64_t catalog_services_index_ = 100; // last registration change
  std::uint64_t checks_index_ = 100;           // last check change
  std::map<std::string, NodeState> nodes_;
  std::shared_ptr<detail::ConnectionTable> conns_ = std::make_shared<detail::ConnectionTable>();
  std::map<std::string, Service> services_;
  std::map<std::string, Kv> kv_;
  std::map<std::string, std::uint64_t> tombstones_;

  std::string token_;
  ConsulJitter jitter_ = ConsulJitter::random;
  bool churn_ = false;
  std::optional<ActiveFault> fault_;
  std::vector<RecordedRequest> log_;
  std::size_t held_ = 0;
  std::size_t faulted_ = 0;
  std::uint64_t releases_ = 0;
  std::uint64_t restores_ = 0; ///< snapshot restores so far: each abandons held queries
};

/// One instance on `port` of `node`, with its own Service.Address (10.1.0.x).
inline ConsulInstance consul_instance(std::uint16_t port, const std::string& node = "node-1") {
  ConsulInstance i;
  i.port = port;
  i.node = node;
  i.address = "10.1.0." + std::to_string(port % 200 + 1);
  return i;
}

/// consul_instance for each port, on node-1.
inline std::vector<ConsulInstance> consul_instances(std::initializer_list<std::uint16_t> ports) {
  std::vector<ConsulInstance> out;
  for (auto p : ports) out.push_back(consul_instance(p));
  return out;
}

} // namespace dynup_test
