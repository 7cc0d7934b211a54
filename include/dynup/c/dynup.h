/* dynup's C ABI: one upstream (a source watched, peers balanced, health tracked) behind
 * an opaque handle, for embedders that cannot use C++: the OpenResty LuaJIT FFI binding
 * (examples/lua), nginx modules, other languages' FFIs. libdynup_c.so implements it over
 * dynup::Upstream (docs/UPSTREAM.md: the config schema and the status JSON).
 *
 *   char err[256];
 *   dynup_upstream* up = dynup_upstream_new(
 *       "{\"name\":\"api\",\"source\":\"file:///etc/dynup/api.json\"}", err, sizeof err);
 *   if (!up) die(err);                          names the JSON path of a config error
 *
 *   dynup_selection sel = {0};                  caller memory: stack, a request pool, cdata
 *   if (dynup_pick(up, key, key_len, NULL, 0, &sel, err, sizeof err) != DYNUP_OK)
 *     return respond(503, err);                 "upstream api: all peers unavailable"
 *   forward(sel.host, sel.port);
 *   dynup_report(up, &sel, http_status, latency_us, connect_failed);   ends `sel`
 *   retry: remember sel.id_hash before the report, pass it in the exclude list, pick again
 *
 * Rules that hold for every function:
 *  - Nothing throws: errors are return codes (enum dynup_rc) and, where a function takes
 *    an `err` buffer, a NUL-terminated message, cut to err_len - 1 bytes. `err` may be
 *    NULL or err_len 0 (no message). NULL handles or selections are errors, not crashes.
 *  - The ABI is C89 (this header compiles as C89 and C++), versioned by
 *    DYNUP_C_ABI_VERSION: the library's soname is libdynup_c.so.<DYNUP_C_ABI_VERSION>, and a
 *    binding that declares the types itself (LuaJIT's ffi.cdef) checks
 *    dynup_abi_version() and dynup_selection_size() before use.
 *  - Processes: a handle runs threads (the watcher, a rebuild thread, active probes) and
 *    is valid only in the process that created it. Create it after fork(): in nginx,
 *    in init_worker_by_lua (one handle per worker), never in init_by_lua or the master.
 *    In a forked child a handle inherited from the parent refuses every call with
 *    DYNUP_E_FORKED, and dynup_upstream_free only releases the handle's own memory.
 */
#ifndef DYNUP_C_DYNUP_H
#define DYNUP_C_DYNUP_H

#include <stddef.h>
#include <stdint.h>

/* Bumped on any incompatible change to a declaration below (a layout, a signature). */
#define DYNUP_C_ABI_VERSION 1

#if defined(__GNUC__)
#define DYNUP_C_API __attribute__((visibility("default")))
#else
#define DYNUP_C_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Return codes. 0 is success; every error is negative. */
enum dynup_rc {
  DYNUP_OK = 0,
  DYNUP_E_ARGUMENT = -1,        /* a required pointer is NULL, or pick's `out` is still live */
  DYNUP_E_NO_PEERS = -2,        /* pick: the peer set is empty */
  DYNUP_E_ALL_UNAVAILABLE = -3, /* pick: every peer is down (registry, active or passive health) */
  DYNUP_E_ALL_TRIED = -4,       /* pick: every available peer is in the exclude list */
  DYNUP_E_NOT_LIVE = -5,        /* report: the selection is not live (ended, never picked, other handle) */
  DYNUP_E_FORKED = -6,          /* the handle was created in another process (before a fork) */
  DYNUP_E_INTERNAL = -7         /* dynup failed inside (out of memory); the message says what */
};

/* One upstream. Opaque; create with dynup_upstream_new, destroy with dynup_upstream_free. */
typedef struct dynup_upstream dynup_upstream;

/* A picked peer, in the caller's memory. dynup_pick fills it and makes it *live*: it then
 * holds a lease on the routing table it was picked from (so the peer's accounting stays
 * right whatever the registry publishes meanwhile) and counts as one request in flight
 * to the peer. A live selection must end exactly once, with dynup_report (the request
 * was sent) or dynup_cancel (it was not, or the outcome is unknown). One that never ends
 * keeps its routing table allocated and its peer's in-flight count raised until the
 * handle is freed: a leak, not a crash.
 *
 * The caller owns the memory. Zero it before its first pick (`= {0}`, calloc, LuaJIT's
 * ffi.new); after that it can serve any number of picks, each once the previous one has
 * ended. While live it must stay where it is and must not be copied (a copy ended too
 * would end the request twice). The public fields stay readable after it ends. */
typedef struct dynup_selection {
  uint64_t id_hash;     /* hash of peer_id: what a retry passes to dynup_pick's exclude list */
  uint16_t port;        /* 1..65535 */
  uint16_t host_len;    /* strlen(host) */
  uint16_t peer_id_len; /* strlen(peer_id) */
  uint16_t reserved_;   /* 0 */
  char host[256];       /* NUL-terminated: IPv4 dotted quad, IPv6 without brackets, or a DNS name */
  char peer_id[264];    /* NUL-terminated peer id (at most 256 bytes) */
  uint64_t opaque_[16]; /* dynup's: the live selection; never touch */
} dynup_selection;

/* "major.minor.patch" of dynup. A static string; any thread. */
DYNUP_C_API const char* dynup_version(void);

/* DYNUP_C_ABI_VERSION as the library was built. Any thread. */
DYNUP_C_API int dynup_abi_version(void);

/* sizeof(dynup_selection) as the library was built. Any thread. */
DYNUP_C_API size_t dynup_selection_size(void);

/* A short static description of a return code, e.g. "all peers unavailable". */
DYNUP_C_API const char* dynup_strerror(int rc);

/* Starts an upstream from its JSON config (docs/UPSTREAM.md): validates it, starts the
 * watcher and returns once the first peer set is read (or the last-known-good snapshot
 * served, or, with watch.strong_dependency, the first fetch failed). Allocates; blocks
 * for that first read; any thread.
 * Returns the handle, or NULL with the reason in `err`: an invalid document ("upstream:
 * invalid JSON: …"), a config error naming its JSON path ("upstream.watch.wait_ms:
 * expected an integer 10..600000, got 5"), or a source that cannot start. */
DYNUP_C_API dynup_upstream* dynup_upstream_new(const char* json_config, char* err, size_t err_len);

/* Checks a JSON config exactly as dynup_upstream_new reads it (the same messages), but
 * starts nothing: no thread, no I/O, no file (a token_env variable is read). For a
 * process that must not start threads, such as nginx's master while it reads its
 * configuration (`nginx -t`). Returns DYNUP_OK, or DYNUP_E_ARGUMENT with the reason in
 * `err`. Any thread. */
DYNUP_C_API int dynup_config_check(const char* json_config, char* err, size_t err_len);

/* Stops the upstream's threads (within milliseconds) and frees it. NULL is a no-op.
 * Call once, when no other call on the handle is running or will run. Selections still
 * live become void: never pass them to dynup_report or dynup_cancel afterwards. */
DYNUP_C_API void dynup_upstream_free(dynup_upstream* up);

/* Picks a peer for one request (or one retry of it) by the upstream's policy, skipping
 * unavailable peers and those whose id_hash is among the `n_exclude` values at
 * `exclude_id_hashes` (the peers already tried: nginx's proxy_next_upstream).
 * `key` (`key_len` bytes, any bytes) is the hash key for ring_hash and maglev; other
 * policies ignore it; NULL or key_len 0 means none.
 * On DYNUP_OK, `out` is filled and live. Otherwise `out` is not live (its host is ""):
 * DYNUP_E_NO_PEERS, DYNUP_E_ALL_UNAVAILABLE or DYNUP_E_ALL_TRIED with the message
 * "upstream <name>: <reason>"; DYNUP_E_ARGUMENT when up, out or (with n_exclude > 0)
 * exclude_id_hashes is NULL, or when `out` is still live from an earlier pick (end it
 * first; it is left untouched); DYNUP_E_FORKED.
 * Any thread, concurrently. Lock-free and allocation-free while the routing table is
 * unchanged; a thread's first pick after a new table takes a mutex once, its first pick
 * on a handle allocates its cache of the table, and more than 64 excluded peers
 * allocate. */
DYNUP_C_API int dynup_pick(dynup_upstream* up, const char* key, size_t key_len, const uint64_t* exclude_id_hashes,
                           size_t n_exclude, dynup_selection* out, char* err, size_t err_len);

/* How many peers the upstream's current set holds, available or not (0 on a NULL
 * handle or in a forked child). For a retry budget: nginx gives a request as many tries
 * as its upstream has peers. Any thread; lock-free; allocates nothing but for a
 * thread's first call on a handle. */
DYNUP_C_API size_t dynup_peer_count(dynup_upstream* up);

/* 1 when dynup_report's latency_us is used (the ewma policy), 0 when it is ignored (every
 * other policy: passive health and outlier detection count statuses and connect
 * failures only), so a caller may skip measuring it; 0 on a NULL handle or in a forked
 * child. Fixed for the handle's life. Any thread; lock-free. */
DYNUP_C_API int dynup_uses_latency(dynup_upstream* up);

/* Ends a live selection with the request's outcome: `status` is the HTTP status (0 when
 * no response came: timeout, reset), `latency_us` the time to the response (negative is
 * read as 0), `connect_failure` non-zero when the connection could not be made. Feeds
 * the policy (in-flight count, latency) and passive health (max_fails, outlier).
 * Returns DYNUP_OK, DYNUP_E_NOT_LIVE (nothing done: already ended, never picked, or
 * picked by another handle), DYNUP_E_ARGUMENT (a NULL) or DYNUP_E_FORKED.
 * Any thread (not necessarily the picking one), never two at once on one selection;
 * lock-free unless the outcome changes the peer's health (a per-peer mutex). */
DYNUP_C_API int dynup_report(dynup_upstream* up, dynup_selection* sel, int status, int64_t latency_us,
                             int connect_failure);

/* The upstream's errors (a refused connection, HTTP 429, a file that cannot be read, a
 * set its guards refused, "Too many open files") for the embedder to log from its own
 * thread, since no dynup thread calls into its host. `*seen` is how many the caller has
 * taken so far (start at 0): returns how many came since, 0 when none, and writes the
 * newest message to `buf` (NUL-terminated, cut to `len`) and the new total to `*seen`.
 * Polled once a second, it logs at most one line per upstream per second. 0 on NULLs
 * and in a forked child. Any thread; takes a mutex the error path also takes. */
DYNUP_C_API uint64_t dynup_errors_since(dynup_upstream* up, uint64_t* seen, char* buf, size_t len);

/* For a configuration check (`nginx -t`): whether a file:// source spec names a file this
 * process can open for reading, as nginx requires of an `include`. DYNUP_OK for a
 * readable file and for every other scheme (nothing is fetched); DYNUP_E_ARGUMENT with
 * the reason and the path in `err` otherwise (a malformed spec, a missing file, no
 * permission). Opens and closes the file; starts nothing. */
DYNUP_C_API int dynup_source_file_check(const char* spec, char* err, size_t err_len);

/* dynup_report_try's flags: how the embedder judged the try. Without DYNUP_TRY_FAILED or
 * DYNUP_TRY_SUCCEEDED, passive health judges by the status as dynup_report does. */
#define DYNUP_TRY_CONNECT_FAILED 1u /* the connection could not be made (implies failed) */
#define DYNUP_TRY_FAILED 2u         /* the try failed by the embedder's rule (nginx: NGX_PEER_FAILED) */
#define DYNUP_TRY_SUCCEEDED 4u      /* it did not, whatever the status (nginx: a last try's 502) */

/* dynup_report with the embedder's verdict: nginx counts a try as failed for max_fails
 * when proxy_next_upstream passed it on, not by its status, so the module reports with
 * DYNUP_TRY_FAILED or DYNUP_TRY_SUCCEEDED. Outlier detection still counts statuses.
 * Returns and threading as dynup_report; DYNUP_E_ARGUMENT also for FAILED with SUCCEEDED. */
DYNUP_C_API int dynup_report_try(dynup_upstream* up, dynup_selection* sel, int status, int64_t latency_us,
                                 unsigned flags);

/* Ends a live selection without an outcome: the request was never sent, or its outcome
 * says nothing about the peer (the client went away first). Undoes the in-flight count;
 * no latency sample, no health report. A no-op on a selection that is not live, on
 * NULLs, and in a forked child. Same threading as dynup_report. */
DYNUP_C_API void dynup_cancel(dynup_upstream* up, dynup_selection* sel);

/* The upstream's status as one line of JSON (docs/UPSTREAM.md, "Status"): the set's
 * version and age, the watcher, and each peer's health, reason and in-flight count.
 * Writes at most len - 1 bytes and a NUL when len > 0 (buf may be NULL when len is 0)
 * and returns the JSON's full length: the text is complete when the result is < len.
 * A NULL handle, a forked child or a failure yields {"error":"…"} instead. Allocates;
 * any thread. */
DYNUP_C_API size_t dynup_status(dynup_upstream* up, char* buf, size_t len);

/* The id_hash dynup gives a peer id (`len` bytes): equal to dynup_selection.id_hash of
 * a pick of that peer. For excluding a peer known by id. Any thread. */
DYNUP_C_API uint64_t dynup_peer_id_hash(const char* id, size_t len);

#ifdef __cplusplus
}
#endif

#endif /* DYNUP_C_DYNUP_H */
