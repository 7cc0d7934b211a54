/* The C ABI as a C program sees it, compiled as C89 (-std=c89 -pedantic -Werror) so the
 * header is checked to be C89 too: every function, NULL arguments, error buffers that
 * are too small, selections ended twice, a file change seen without a restart, and a
 * handle used in a forked child. Exits non-zero on the first failed check's way out. */
#define _POSIX_C_SOURCE 200809L

#include <dynup/c/dynup.h>

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int failures = 0;

/* Counts the mallocs of the main thread (C++'s operator new ends here too; dynup's own
 * threads allocate as they like) to show that pick and report allocate nothing. Not
 * under sanitizers, whose allocator is their own. */
#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
#define DYNUP_TEST_COUNT_MALLOC 1
extern void* __libc_malloc(size_t n);
static pthread_t main_thread;
static int counting = 0;
static unsigned long mallocs = 0;
void* malloc(size_t n) {
  if (counting && pthread_equal(pthread_self(), main_thread)) ++mallocs;
  return __libc_malloc(n);
}
#endif

#define CHECK(cond)                                                                                                    \
  do {                                                                                                                 \
    if (!(cond)) {                                                                                                     \
      fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);                                         \
      ++failures;                                                                                                      \
    }                                                                                                                  \
  } while (0)

#define REQUIRE(cond)                                                                                                  \
  do {                                                                                                                 \
    if (!(cond)) {                                                                                                     \
      fprintf(stderr, "%s:%d: REQUIRE failed: %s\n", __FILE__, __LINE__, #cond);                                       \
      exit(1);                                                                                                         \
    }                                                                                                                  \
  } while (0)

static char dir[64];

static void sleep_ms(long ms) {
  struct timespec ts;
  ts.tv_sec = ms / 1000;
  ts.tv_nsec = (ms % 1000) * 1000000L;
  nanosleep(&ts, NULL);
}

static int contains(const char* haystack, const char* needle) { return strstr(haystack, needle) != NULL; }

static int count(const char* haystack, const char* needle) {
  int n = 0;
  const char* p = haystack;
  while ((p = strstr(p, needle)) != NULL) {
    ++n;
    p += strlen(needle);
  }
  return n;
}

static void path_of(char* out, const char* name) {
  strcpy(out, dir);
  strcat(out, "/");
  strcat(out, name);
}

/* Writes `text` to dir/name through a temporary file and a rename, as tools do. */
static void write_file(const char* name, const char* text) {
  char path[128], tmp[136];
  FILE* f;
  path_of(path, name);
  strcpy(tmp, path);
  strcat(tmp, ".tmp");
  f = fopen(tmp, "w");
  REQUIRE(f != NULL);
  REQUIRE(fputs(text, f) >= 0);
  REQUIRE(fclose(f) == 0);
  REQUIRE(rename(tmp, path) == 0);
}

/* {"name":"api","source":"file://<dir>/<file>"<extra>} */
static void config_for(char* out, const char* file, const char* extra) {
  strcpy(out, "{\"name\":\"api\",\"source\":\"file://");
  strcat(out, dir);
  strcat(out, "/");
  strcat(out, file);
  strcat(out, "\"");
  strcat(out, extra);
  strcat(out, "}");
}

static dynup_upstream* start(const char* file, const char* extra) {
  char config[512], err[256];
  dynup_upstream* up;
  config_for(config, file, extra);
  err[0] = '\0';
  up = dynup_upstream_new(config, err, sizeof err);
  if (up == NULL) fprintf(stderr, "dynup_upstream_new(%s): %s\n", config, err);
  REQUIRE(up != NULL);
  return up;
}

/* The status JSON, whole. Its length can change between two calls (age_ms grows). */
static char* status_of(dynup_upstream* up) {
  size_t n = dynup_status(up, NULL, 0), got;
  char* buf = (char*)malloc(n + 64);
  REQUIRE(buf != NULL);
  got = dynup_status(up, buf, n + 64);
  REQUIRE(got < n + 64);
  REQUIRE(strlen(buf) == got);
  return buf;
}

static void test_library_identity(void) {
  CHECK(strlen(dynup_version()) >= 5);
  CHECK(dynup_abi_version() == DYNUP_C_ABI_VERSION);
  CHECK(dynup_selection_size() == sizeof(dynup_selection));
  CHECK(strcmp(dynup_strerror(DYNUP_OK), "ok") == 0);
  CHECK(strcmp(dynup_strerror(DYNUP_E_ALL_TRIED), "all available peers already tried") == 0);
  CHECK(strcmp(dynup_strerror(DYNUP_E_FORKED), "handle created before a fork") == 0);
  CHECK(strcmp(dynup_strerror(-1000), "unknown error code") == 0);
  CHECK(dynup_peer_id_hash("a", 1) != dynup_peer_id_hash("b", 1));
  CHECK(dynup_peer_id_hash(NULL, 0) == dynup_peer_id_hash("", 0));
}

static void test_config_errors(void) {
  char config[512], err[256], tiny[8];
  strcpy(err, "untouched");
  CHECK(dynup_upstream_new(NULL, err, sizeof err) == NULL);
  CHECK(strcmp(err, "dynup_upstream_new: the config is NULL") == 0);

  CHECK(dynup_upstream_new("{\"name\": ", err, sizeof err) == NULL);
  CHECK(strncmp(err, "upstream: invalid JSON: parse error at line 1, column 10", 56) == 0);

  config_for(config, "peers.json", ",\"watch\":{\"wait_ms\":5}");
  CHECK(dynup_upstream_new(config, err, sizeof err) == NULL);
  CHECK(strcmp(err, "upstream.watch.wait_ms: expected an integer 10..600000, got 5") == 0);

  CHECK(dynup_upstream_new("{\"name\":\"api\"}", err, sizeof err) == NULL);
  CHECK(contains(err, "upstream.source"));

  /* Too small a buffer: cut, still NUL-terminated. No buffer at all: no crash. */
  memset(tiny, 'x', sizeof tiny);
  CHECK(dynup_upstream_new(config, tiny, sizeof tiny) == NULL);
  CHECK(strcmp(tiny, "upstrea") == 0);
  tiny[0] = 'x';
  CHECK(dynup_upstream_new(config, tiny, 1) == NULL);
  CHECK(tiny[0] == '\0');
  tiny[0] = 'x';
  CHECK(dynup_upstream_new(config, tiny, 0) == NULL);
  CHECK(tiny[0] == 'x');
  CHECK(dynup_upstream_new(config, NULL, 100) == NULL);
}

/* dynup_config_check reads a config as dynup_upstream_new does and starts nothing: the
 * same messages, and no watcher (a file that does not exist yet is no error). */
static void test_config_check(void) {
  char config[512], err[256];
  CHECK(dynup_config_check(NULL, err, sizeof err) == DYNUP_E_ARGUMENT);
  CHECK(strcmp(err, "dynup_config_check: the config is NULL") == 0);
  CHECK(dynup_config_check("{\"name\": ", err, sizeof err) == DYNUP_E_ARGUMENT);
  CHECK(strncmp(err, "upstream: invalid JSON: parse error at line 1, column 10", 56) == 0);
  config_for(config, "peers.json", ",\"watch\":{\"wait_ms\":5}");
  CHECK(dynup_config_check(config, err, sizeof err) == DYNUP_E_ARGUMENT);
  CHECK(strcmp(err, "upstream.watch.wait_ms: expected an integer 10..600000, got 5") == 0);
  CHECK(dynup_config_check("{\"name\":\"api\",\"source\":\"ftp://x\"}", err, sizeof err) == DYNUP_E_ARGUMENT);
  CHECK(contains(err, "upstream.source"));
  CHECK(dynup_config_check("{\"name\":\"api\",\"source\":\"file:///x\",\"policy\":\"fastest\"}", err, sizeof err) ==
        DYNUP_E_ARGUMENT);
  CHECK(contains(err, "upstream.policy"));
  config_for(config, "not-written-yet.json", ",\"policy\":\"least_request\",\"shared\":{\"dir\":\"/nonexistent\"}");
  strcpy(err, "untouched");
  CHECK(dynup_config_check(config, err, sizeof err) == DYNUP_OK);
  CHECK(strcmp(err, "untouched") == 0);
  CHECK(dynup_config_check(config, NULL, 0) == DYNUP_OK);
}

static void test_null_arguments(void) {
  dynup_selection sel = {0};
  char err[128], buf[128];
  uint64_t none = 0;
  CHECK(dynup_pick(NULL, NULL, 0, NULL, 0, &sel, err, sizeof err) == DYNUP_E_ARGUMENT);
  CHECK(strcmp(err, "dynup_pick: the handle is NULL") == 0);
  CHECK(dynup_pick(NULL, NULL, 0, &none, 1, NULL, NULL, 0) == DYNUP_E_ARGUMENT);
  CHECK(dynup_report(NULL, &sel, 200, 1000, 0) == DYNUP_E_ARGUMENT);
  CHECK(dynup_report(NULL, NULL, 200, 1000, 0) == DYNUP_E_ARGUMENT);
  dynup_cancel(NULL, NULL);
  dynup_cancel(NULL, &sel);
  dynup_upstream_free(NULL);
  CHECK(dynup_peer_count(NULL) == 0);
  CHECK(dynup_uses_latency(NULL) == 0);
  CHECK(dynup_status(NULL, buf, sizeof buf) == strlen(buf));
  CHECK(strcmp(buf, "{\"error\":\"dynup_status: the handle is NULL\"}") == 0);
}

static void test_pick_and_report(void) {
  dynup_upstream* up;
  dynup_selection sel = {0}, a = {0}, b = {0}, c = {0};
  char err[256], buf[16];
  char* status;
  int i, seen[3] = {0, 0, 0};
  uint64_t tried[3];
  size_t n;

  write_file("peers.json", "{\"peers\":[{\"id\":\"a\",\"host\":\"10.0.0.1\",\"port\":8001},"
                           "{\"id\":\"b\",\"host\":\"10.0.0.2\",\"port\":8002},"
                           "{\"id\":\"c\",\"host\":\"2001:db8::7\",\"port\":8003}]}");
  up = start("peers.json", "");

  /* Round robin over equal weights: each peer once per three picks. */
  for (i = 0; i < 30; ++i) {
    REQUIRE(dynup_pick(up, "k", 1, NULL, 0, &sel, err, sizeof err) == DYNUP_OK);
    CHECK(sel.peer_id_len == 1 && sel.peer_id[1] == '\0');
    CHECK(sel.host_len == strlen(sel.host));
    CHECK(sel.id_hash == dynup_peer_id_hash(sel.peer_id, sel.peer_id_len));
    if (strcmp(sel.peer_id, "a") == 0) {
      CHECK(strcmp(sel.host, "10.0.0.1") == 0 && sel.port == 8001);
      ++seen[0];
    } else if (strcmp(sel.peer_id, "b") == 0) {
      CHECK(strcmp(sel.host, "10.0.0.2") == 0 && sel.port == 8002);
      ++seen[1];
    } else {
      CHECK(strcmp(sel.host, "2001:db8::7") == 0 && sel.port == 8003);
      ++seen[2];
    }
    CHECK(dynup_report(up, &sel, 200, 1500, 0) == DYNUP_OK);
    /* Ended: a second report or a cancel does nothing; the fields stay readable. */
    CHECK(dynup_report(up, &sel, 200, 1500, 0) == DYNUP_E_NOT_LIVE);
    dynup_cancel(up, &sel);
    CHECK(sel.port != 0);
  }
  CHECK(seen[0] == 10 && seen[1] == 10 && seen[2] == 10);

  /* A zeroed selection was never picked. */
  CHECK(dynup_report(up, &a, 200, 0, 0) == DYNUP_E_NOT_LIVE);

  /* Live selections count in flight until they end. */
  REQUIRE(dynup_pick(up, NULL, 0, NULL, 0, &a, err, sizeof err) == DYNUP_OK);
  REQUIRE(dynup_pick(up, NULL, 0, NULL, 0, &b, err, sizeof err) == DYNUP_OK);
  REQUIRE(dynup_pick(up, NULL, 0, NULL, 0, &c, err, sizeof err) == DYNUP_OK);
  status = status_of(up);
  CHECK(count(status, "\"in_flight\":1") == 3);
  free(status);

  /* Picking into a live selection is refused and leaves it live. */
  tried[0] = a.id_hash;
  CHECK(dynup_pick(up, NULL, 0, NULL, 0, &a, err, sizeof err) == DYNUP_E_ARGUMENT);
  CHECK(contains(err, "still live"));
  CHECK(a.id_hash == tried[0]);
  CHECK(dynup_report(up, &a, 503, 20000, 0) == DYNUP_OK);
  dynup_cancel(up, &b);
  CHECK(dynup_report(up, &b, 200, 0, 0) == DYNUP_E_NOT_LIVE);
  CHECK(dynup_report(up, &c, 200, -5, 0) == DYNUP_OK); /* latency < 0 reads as 0 */
  status = status_of(up);
  CHECK(count(status, "\"in_flight\":0") == 3);
  CHECK(contains(status, "{\"name\":\"api\",\"source\":\"file://"));
  CHECK(contains(status, "\"policy\":\"round_robin\""));
  free(status);

  /* Excluding tried peers: two tried leaves the third; all tried says so. */
  tried[0] = dynup_peer_id_hash("a", 1);
  tried[1] = dynup_peer_id_hash("c", 1);
  for (i = 0; i < 5; ++i) {
    REQUIRE(dynup_pick(up, NULL, 0, tried, 2, &sel, err, sizeof err) == DYNUP_OK);
    CHECK(strcmp(sel.peer_id, "b") == 0);
    dynup_cancel(up, &sel);
  }
  tried[2] = dynup_peer_id_hash("b", 1);
  CHECK(dynup_pick(up, NULL, 0, tried, 3, &sel, err, sizeof err) == DYNUP_E_ALL_TRIED);
  CHECK(strcmp(err, "upstream api: all available peers already tried") == 0);
  CHECK(sel.host[0] == '\0' && sel.port == 0);
  CHECK(dynup_report(up, &sel, 200, 0, 0) == DYNUP_E_NOT_LIVE);
  CHECK(dynup_pick(up, NULL, 0, NULL, 2, &sel, err, sizeof err) == DYNUP_E_ARGUMENT);
  CHECK(strcmp(err, "dynup_pick: n_exclude > 0 but exclude_id_hashes is NULL") == 0);
  /* Errors with a small buffer, or none. */
  CHECK(dynup_pick(up, NULL, 0, tried, 3, &sel, buf, 9) == DYNUP_E_ALL_TRIED);
  CHECK(strcmp(buf, "upstream") == 0);
  CHECK(dynup_pick(up, NULL, 0, tried, 3, &sel, NULL, 0) == DYNUP_E_ALL_TRIED);

  /* Status into buffers of every awkward size: cut, NUL-terminated, full length told. */
  n = dynup_status(up, NULL, 0);
  CHECK(n > 100);
  memset(buf, 'x', sizeof buf);
  CHECK(dynup_status(up, buf, sizeof buf) > 100);
  CHECK(strlen(buf) == sizeof buf - 1 && strncmp(buf, "{\"name\":\"api\",\"", 15) == 0);
  buf[0] = 'x';
  CHECK(dynup_status(up, buf, 1) > 100 && buf[0] == '\0');

  dynup_upstream_free(up);
}

/* The request path: pick (with and without excluded peers) and report allocate nothing. */
static void test_no_allocation(void) {
#ifdef DYNUP_TEST_COUNT_MALLOC
  dynup_upstream* up;
  dynup_selection sel = {0};
  char err[256];
  uint64_t tried[3];
  unsigned long before;
  int i;

  write_file("alloc.json", "[\"10.0.5.1:80\",\"10.0.5.2:80\",\"10.0.5.3:80\",\"10.0.5.4:80\"]");
  up = start("alloc.json", "");
  tried[0] = dynup_peer_id_hash("10.0.5.1:80", 11);
  tried[1] = dynup_peer_id_hash("10.0.5.2:80", 11);
  tried[2] = dynup_peer_id_hash("10.0.5.3:80", 11);
  /* This thread's first pick fills its table cache: that one may allocate. */
  REQUIRE(dynup_pick(up, NULL, 0, NULL, 0, &sel, err, sizeof err) == DYNUP_OK);
  dynup_report(up, &sel, 200, 100, 0);
  main_thread = pthread_self();
  counting = 1;
  before = mallocs;
  for (i = 0; i < 1000; ++i) {
    REQUIRE(dynup_pick(up, "key", 3, i % 2 ? tried : NULL, i % 2 ? 3 : 0, &sel, err, sizeof err) == DYNUP_OK);
    if (i % 2) CHECK(strcmp(sel.host, "10.0.5.4") == 0);
    if (i % 3 == 0)
      dynup_cancel(up, &sel);
    else
      CHECK(dynup_report(up, &sel, 200, 250, 0) == DYNUP_OK);
  }
  counting = 0;
  CHECK(mallocs == before);
  if (mallocs != before) fprintf(stderr, "1000 picks and reports allocated %lu times\n", mallocs - before);
  dynup_upstream_free(up);
#endif
}

/* A file change reaches picks without a restart. */
static void test_file_change(void) {
  dynup_upstream* up;
  dynup_selection sel = {0};
  char err[256];
  int i, moved = 0;

  write_file("change.json", "[\"10.0.1.1:80\"]");
  up = start("change.json", "");
  CHECK(dynup_peer_count(up) == 1);
  CHECK(dynup_uses_latency(up) == 0); /* round_robin */
  REQUIRE(dynup_pick(up, NULL, 0, NULL, 0, &sel, err, sizeof err) == DYNUP_OK);
  CHECK(strcmp(sel.host, "10.0.1.1") == 0);
  dynup_cancel(up, &sel);

  write_file("change.json", "[\"10.0.1.2:81\",\"10.0.1.3:82\",\"10.0.1.4:83\"]");
  for (i = 0; i < 500 && !moved; ++i) { /* 5 s at most */
    REQUIRE(dynup_pick(up, NULL, 0, NULL, 0, &sel, err, sizeof err) == DYNUP_OK);
    moved = strcmp(sel.host, "10.0.1.2") == 0 && sel.port == 81;
    dynup_report(up, &sel, 200, 100, 0);
    if (!moved) sleep_ms(10);
  }
  CHECK(moved);
  CHECK(dynup_peer_count(up) == 3);
  dynup_upstream_free(up);

  up = start("change.json", ",\"policy\":\"ewma\"");
  CHECK(dynup_uses_latency(up) == 1);
  dynup_upstream_free(up);
}

static void test_no_peer_errors(void) {
  dynup_upstream* up;
  dynup_selection sel = {0};
  char err[256];

  write_file("empty.json", "{\"peers\":[]}");
  up = start("empty.json", ",\"guards\":{\"allow_empty\":true}");
  CHECK(dynup_pick(up, NULL, 0, NULL, 0, &sel, err, sizeof err) == DYNUP_E_NO_PEERS);
  CHECK(strcmp(err, "upstream api: no peers") == 0);
  dynup_upstream_free(up);

  write_file("critical.json", "{\"peers\":[{\"host\":\"10.0.2.1\",\"port\":80,\"health\":\"critical\"}]}");
  up = start("critical.json", ",\"health\":{\"panic\":{\"threshold_percent\":0}}");
  CHECK(dynup_pick(up, NULL, 0, NULL, 0, &sel, err, sizeof err) == DYNUP_E_ALL_UNAVAILABLE);
  CHECK(strcmp(err, "upstream api: all peers unavailable") == 0);
  dynup_upstream_free(up);
}

/* A connect failure reported through the ABI reaches passive health. */
static void test_report_feeds_health(void) {
  dynup_upstream* up;
  dynup_selection sel = {0};
  char err[256];
  int i, others = 0;

  write_file("health.json", "[\"10.0.3.1:80\",\"10.0.3.2:80\"]");
  up = start("health.json", ",\"health\":{\"passive\":{\"max_fails\":1,\"fail_timeout_ms\":60000}}");
  for (i = 0; i < 2; ++i) {
    REQUIRE(dynup_pick(up, NULL, 0, NULL, 0, &sel, err, sizeof err) == DYNUP_OK);
    if (strcmp(sel.host, "10.0.3.1") == 0) break;
    dynup_cancel(up, &sel);
  }
  REQUIRE(strcmp(sel.host, "10.0.3.1") == 0);
  CHECK(dynup_report(up, &sel, 0, 3000, 1) == DYNUP_OK);
  /* The rebuild thread takes the peer out: soon every pick is the other one. */
  for (i = 0; i < 500 && others < 20; ++i) {
    REQUIRE(dynup_pick(up, NULL, 0, NULL, 0, &sel, err, sizeof err) == DYNUP_OK);
    others = strcmp(sel.host, "10.0.3.2") == 0 ? others + 1 : 0;
    dynup_report(up, &sel, 200, 100, 0);
    if (others == 0) sleep_ms(10);
  }
  CHECK(others >= 20);
  dynup_upstream_free(up);
}

/* The embedder's verdict decides what passive health counts: a 502 it calls a success
 * takes nothing out, one it calls failed does, at once. */
static void test_report_try_verdict(void) {
  dynup_upstream* up;
  dynup_selection sel = {0};
  char err[256];
  int i, to_first = 0;

  write_file("verdict.json", "[\"10.0.5.1:80\",\"10.0.5.2:80\"]");
  up = start("verdict.json", ",\"health\":{\"passive\":{\"max_fails\":1,\"fail_timeout_ms\":60000,"
                             "\"fail_statuses\":[502]}}");
  REQUIRE(dynup_pick(up, NULL, 0, NULL, 0, &sel, err, sizeof err) == DYNUP_OK);
  CHECK(dynup_report_try(up, &sel, 502, 100, DYNUP_TRY_FAILED | DYNUP_TRY_SUCCEEDED) == DYNUP_E_ARGUMENT);
  CHECK(dynup_report_try(up, &sel, 502, 100, DYNUP_TRY_SUCCEEDED) == DYNUP_OK);
  for (i = 0; i < 10; ++i) {
    REQUIRE(dynup_pick(up, NULL, 0, NULL, 0, &sel, err, sizeof err) == DYNUP_OK);
    to_first += strcmp(sel.host, "10.0.5.1") == 0;
    CHECK(dynup_report_try(up, &sel, 502, 100, DYNUP_TRY_SUCCEEDED) == DYNUP_OK);
  }
  CHECK(to_first == 5); /* both still in rotation */
  REQUIRE(dynup_pick(up, NULL, 0, NULL, 0, &sel, err, sizeof err) == DYNUP_OK);
  CHECK(dynup_report_try(up, &sel, 200, 100, DYNUP_TRY_FAILED) == DYNUP_OK); /* a 200 it failed */
  {
    char failed[sizeof sel.host];
    strcpy(failed, sel.host);
    for (i = 0; i < 10; ++i) { /* no rebuild needed: the very next picks skip it */
      REQUIRE(dynup_pick(up, NULL, 0, NULL, 0, &sel, err, sizeof err) == DYNUP_OK);
      CHECK(strcmp(sel.host, failed) != 0);
      dynup_cancel(up, &sel);
    }
  }
  dynup_upstream_free(up);
}

/* Errors of the upstream's threads wait for the embedder's thread, counted. */
static void test_errors_since(void) {
  dynup_upstream* up;
  uint64_t seen = 0, n = 0;
  char path[128], msg[256];
  int i;

  CHECK(dynup_errors_since(NULL, &seen, msg, sizeof msg) == 0);
  write_file("errors.json", "[\"10.0.6.1:80\"]");
  up = start("errors.json", "");
  CHECK(dynup_errors_since(up, &seen, msg, sizeof msg) == 0);
  path_of(path, "errors.json");
  REQUIRE(unlink(path) == 0);
  for (i = 0; i < 1000 && n == 0; ++i) {
    n = dynup_errors_since(up, &seen, msg, sizeof msg);
    if (n == 0) sleep_ms(10);
  }
  CHECK(n >= 1);
  CHECK(seen == n);
  CHECK(contains(msg, "cannot open"));
  CHECK(contains(msg, "No such file or directory"));
  CHECK(dynup_errors_since(up, &seen, msg, sizeof msg) == 0); /* taken */
  CHECK(dynup_peer_count(up) == 1);                            /* the set is kept */
  dynup_upstream_free(up);

  CHECK(dynup_source_file_check("consul://127.0.0.1:1/health/api", msg, sizeof msg) == DYNUP_OK);
  CHECK(dynup_source_file_check("file:///nonexistent/dynup/peers.json", msg, sizeof msg) == DYNUP_E_ARGUMENT);
  CHECK(contains(msg, "cannot read the peer file /nonexistent/dynup/peers.json"));
  CHECK(contains(msg, "No such file or directory"));
}

/* A handle made before fork() is refused in the child, which can still free it. */
static void test_fork(void) {
  dynup_upstream* up;
  dynup_selection sel = {0};
  char err[256];
  pid_t pid;
  int st = 0, fds[2];
  char verdict = 'x';

  write_file("fork.json", "[\"10.0.4.1:80\"]");
  up = start("fork.json", "");
  REQUIRE(dynup_pick(up, NULL, 0, NULL, 0, &sel, err, sizeof err) == DYNUP_OK);
  REQUIRE(pipe(fds) == 0);
  pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    char buf[512];
    int ok = 1;
    dynup_selection fresh = {0};
    ok = ok && dynup_pick(up, NULL, 0, NULL, 0, &fresh, err, sizeof err) == DYNUP_E_FORKED;
    ok = ok && contains(err, "init_worker_by_lua");
    ok = ok && dynup_report(up, &sel, 200, 0, 0) == DYNUP_E_FORKED;
    ok = ok && dynup_peer_count(up) == 0;
    dynup_cancel(up, &sel);
    dynup_status(up, buf, sizeof buf);
    ok = ok && strncmp(buf, "{\"error\":\"dynup: this handle belongs to process", 46) == 0;
    dynup_upstream_free(up); /* must not try to join the parent's threads */
    /* The verdict goes through a pipe: the exit code is valgrind's, which counts the
     * parent's upstream that the child leaves alone on purpose as a leak. */
    verdict = ok ? 'y' : 'n';
    if (write(fds[1], &verdict, 1) != 1) _exit(4);
    _exit(0);
  }
  close(fds[1]);
  REQUIRE(waitpid(pid, &st, 0) == pid);
  CHECK(WIFEXITED(st));
  CHECK(read(fds[0], &verdict, 1) == 1 && verdict == 'y');
  close(fds[0]);
  /* The parent's handle and selection are unaffected. */
  CHECK(dynup_report(up, &sel, 200, 100, 0) == DYNUP_OK);
  dynup_upstream_free(up);
}

static void remove_dir(void) {
  const char* names[] = {"peers.json", "change.json", "empty.json", "critical.json", "health.json", "fork.json", "alloc.json"};
  char path[128];
  size_t i;
  for (i = 0; i < sizeof names / sizeof names[0]; ++i) {
    path_of(path, names[i]);
    unlink(path);
  }
  rmdir(dir);
}

int main(void) {
  strcpy(dir, "/tmp/dynup-c-api-XXXXXX");
  REQUIRE(mkdtemp(dir) != NULL);
  test_library_identity();
  test_config_errors();
  test_config_check();
  test_null_arguments();
  test_pick_and_report();
  test_no_allocation();
  test_file_change();
  test_no_peer_errors();
  test_report_feeds_health();
  test_report_try_verdict();
  test_errors_since();
  test_fork();
  remove_dir();
  if (failures != 0) {
    fprintf(stderr, "c_api_test: %d check(s) failed\n", failures);
    return 1;
  }
  printf("c_api_test: all checks passed (dynup %s, C ABI %d)\n", dynup_version(), dynup_abi_version());
  return 0;
}
