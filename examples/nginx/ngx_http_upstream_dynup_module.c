/*
 * ngx_http_upstream_dynup_module: an nginx upstream whose peers come from a service
 * registry (Consul, etcd) or a file, changed at run time without a reload.
 *
 *   upstream api {
 *       dynup consul://127.0.0.1:8500/health/api policy=ewma snapshot=/var/lib/nginx/dynup-api.json;
 *       keepalive 32;
 *   }
 *   location = /dynup/status { dynup_status; }
 *
 * It is a thin layer over dynup's C ABI (libdynup_c, include/dynup/c/dynup.h):
 *  - configuration: `dynup SOURCE [name=value ...]` becomes dynup's upstream JSON config
 *    (docs/UPSTREAM.md): `policy=`, `snapshot=` and any dotted config path
 *    (`health.passive.max_fails=3`). The master checks it with dynup_config_check, so
 *    `nginx -t` explains a bad argument, and starts nothing: threads belong to workers.
 *  - each worker makes its own handle in init_process. All handles of one upstream share
 *    a region in /dev/shm (docs/SHARED.md): one worker leads (watches the source, runs
 *    the active checks) and writes the set; the others read it. The region's name hashes
 *    the config and nginx's config file, so the workers of a reload that kept the
 *    upstream's config join the old workers' region and serve its set at once.
 *  - per request: init_peer gives the request as many tries as the set has peers; get
 *    picks (excluding the peers this request already tried); free reports the try's
 *    outcome (a failed connection, no reply, or the status, and the latency).
 *
 * No dynup thread calls into nginx: they only read the source and write the region.
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <dynup/c/dynup.h>

#include <signal.h>

#define NGX_HTTP_DYNUP_ERR_LEN 512

#define ngx_http_upstream_dynup_name_char(c)                                   \
    (((c) >= 'a' && (c) <= 'z') || ((c) >= 'A' && (c) <= 'Z')                  \
     || ((c) >= '0' && (c) <= '9') || (c) == '_')

static u_char  ngx_http_upstream_dynup_placeholder[] = "dynup";


typedef struct {
    ngx_str_t                       path;   /* "health.passive.max_fails" */
    ngx_str_t                       value;  /* its JSON text: 3, true, "text" */
} ngx_http_upstream_dynup_param_t;

/* A peer's address as nginx wants it, parsed once: a pick whose host and port match
 * copies it instead of parsing the host and printing the name again. */
#define NGX_HTTP_DYNUP_ADDR_CACHE   256     /* entries, direct-mapped by id_hash */
#define NGX_HTTP_DYNUP_HOST_MAX     64      /* longer hosts are parsed every time */
#define NGX_HTTP_DYNUP_NAME_MAX     (sizeof("[]:65535") + 256)

typedef struct {
    uint64_t                        id_hash;
    uint16_t                        port;
    uint16_t                        host_len;   /* 0: an empty slot */
    socklen_t                       socklen;
    char                            host[NGX_HTTP_DYNUP_HOST_MAX];
    ngx_sockaddr_t                  sockaddr;
    size_t                          name_len;
    u_char                          name[sizeof("[]:65535") + NGX_HTTP_DYNUP_HOST_MAX];
} ngx_http_upstream_dynup_addr_t;


typedef struct {
    ngx_str_t                       name;    /* the upstream's name */
    ngx_str_t                       json;    /* dynup's config, NUL-terminated */
    ngx_http_complex_value_t       *key;     /* key=: the hash key, or NULL */
    u_char                         *file;    /* where the directive is, for errors */
    ngx_uint_t                      line;
    ngx_uint_t                      balancer_set; /* init_upstream ran: no later method replaced it */
    dynup_upstream                 *handle;  /* this worker's; NULL in the master */
    ngx_http_upstream_dynup_addr_t *addrs;   /* this worker's address cache, or NULL */
    u_char                         *start_error; /* why the handle could not be made */
    uint64_t                        errors_seen; /* dynup_errors_since's count */
} ngx_http_upstream_dynup_srv_conf_t;

typedef struct {
    ngx_array_t                     upstreams; /* ngx_http_upstream_dynup_srv_conf_t * */
    ngx_event_t                     errors_ev; /* this worker's once-a-second error log */
} ngx_http_upstream_dynup_main_conf_t;

#define NGX_HTTP_DYNUP_ERRORS_EVERY  1000   /* ms between two looks at the errors */

typedef struct {
    dynup_selection                 sel;     /* first: 8-byte aligned */
    ngx_http_upstream_dynup_srv_conf_t *conf;
    ngx_http_request_t             *request;
    ngx_str_t                       key;
    uint64_t                       *tried;   /* id_hash of every peer tried so far */
    ngx_uint_t                      ntried;
    ngx_uint_t                      tried_cap;
    ngx_uint_t                      live;    /* sel holds a pick not yet reported */
    ngx_uint_t                      picks;   /* tries given a peer so far */
    ngx_sockaddr_t                  sockaddr;
    socklen_t                       socklen;
    /* The try's name ($upstream_addr): nginx keeps a pointer to each try's, so a
     * retry writes a new one (from the pool) instead of overwriting this. */
    ngx_str_t                      *name;
    u_char                         *name_buf;
    ngx_str_t                       first_name;
    u_char                          first_name_buf[NGX_HTTP_DYNUP_NAME_MAX];
} ngx_http_upstream_dynup_peer_data_t;


static char *ngx_http_upstream_dynup(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static char *ngx_http_upstream_dynup_status(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static void *ngx_http_upstream_dynup_create_main_conf(ngx_conf_t *cf);
static void *ngx_http_upstream_dynup_create_srv_conf(ngx_conf_t *cf);
static ngx_int_t ngx_http_upstream_dynup_postconfiguration(ngx_conf_t *cf);
static ngx_int_t ngx_http_upstream_dynup_init_process(ngx_cycle_t *cycle);
static void ngx_http_upstream_dynup_exit_process(ngx_cycle_t *cycle);
static ngx_int_t ngx_http_upstream_init_dynup(ngx_conf_t *cf, ngx_http_upstream_srv_conf_t *us);
static ngx_int_t ngx_http_upstream_init_dynup_peer(ngx_http_request_t *r, ngx_http_upstream_srv_conf_t *us);
static ngx_int_t ngx_http_upstream_get_dynup_peer(ngx_peer_connection_t *pc, void *data);
static void ngx_http_upstream_free_dynup_peer(ngx_peer_connection_t *pc, void *data, ngx_uint_t state);


static ngx_command_t  ngx_http_upstream_dynup_commands[] = {

    { ngx_string("dynup"),
      NGX_HTTP_UPS_CONF|NGX_CONF_1MORE,
      ngx_http_upstream_dynup,
      NGX_HTTP_SRV_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("dynup_status"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_upstream_dynup_status,
      0,
      0,
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_upstream_dynup_module_ctx = {
    NULL,                                       /* preconfiguration */
    ngx_http_upstream_dynup_postconfiguration,  /* postconfiguration */

    ngx_http_upstream_dynup_create_main_conf,   /* create main configuration */
    NULL,                                       /* init main configuration */

    ngx_http_upstream_dynup_create_srv_conf,    /* create server configuration */
    NULL,                                       /* merge server configuration */

    NULL,                                       /* create location configuration */
    NULL                                        /* merge location configuration */
};


ngx_module_t  ngx_http_upstream_dynup_module = {
    NGX_MODULE_V1,
    &ngx_http_upstream_dynup_module_ctx,        /* module context */
    ngx_http_upstream_dynup_commands,           /* module directives */
    NGX_HTTP_MODULE,                            /* module type */
    NULL,                                       /* init master */
    NULL,                                       /* init module */
    ngx_http_upstream_dynup_init_process,       /* init process */
    NULL,                                       /* init thread */
    NULL,                                       /* exit thread */
    ngx_http_upstream_dynup_exit_process,       /* exit process */
    NULL,                                       /* exit master */
    NGX_MODULE_V1_PADDING
};


/* ---- configuration ------------------------------------------------------------- */

static void *
ngx_http_upstream_dynup_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_upstream_dynup_main_conf_t  *dmcf;

    dmcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_upstream_dynup_main_conf_t));
    if (dmcf == NULL) {
        return NULL;
    }

    if (ngx_array_init(&dmcf->upstreams, cf->pool, 4,
                       sizeof(ngx_http_upstream_dynup_srv_conf_t *))
        != NGX_OK)
    {
        return NULL;
    }

    return dmcf;
}


static void *
ngx_http_upstream_dynup_create_srv_conf(ngx_conf_t *cf)
{
    /* All zero: no dynup in this upstream (or server block) until the directive. */
    return ngx_pcalloc(cf->pool, sizeof(ngx_http_upstream_dynup_srv_conf_t));
}


/* `s` as a JSON string (quotes included), in cf's pool. */
static ngx_int_t
ngx_http_upstream_dynup_json_string(ngx_conf_t *cf, ngx_str_t *s, ngx_str_t *out)
{
    static u_char  hex[] = "0123456789abcdef";
    size_t         len, i;
    u_char         c, *p;

    len = 2;
    for (i = 0; i < s->len; i++) {
        c = s->data[i];
        len += (c == '"' || c == '\\') ? 2 : (c < 0x20 ? 6 : 1);
    }

    p = ngx_pnalloc(cf->pool, len);
    if (p == NULL) {
        return NGX_ERROR;
    }

    out->data = p;
    out->len = len;

    *p++ = '"';
    for (i = 0; i < s->len; i++) {
        c = s->data[i];
        if (c == '"' || c == '\\') {
            *p++ = '\\';
            *p++ = c;

        } else if (c < 0x20) {
            *p++ = '\\'; *p++ = 'u'; *p++ = '0'; *p++ = '0';
            *p++ = hex[c >> 4];
            *p++ = hex[c & 0xf];

        } else {
            *p++ = c;
        }
    }
    *p = '"';

    return NGX_OK;
}


/* A parameter's value as JSON: an integer or a decimal number as it is, true/false
 * (and nginx's on/off) as booleans, an array or object ('[' or '{' first) as the JSON
 * text it is (dynup_config_check parses it), anything else as a string. */
static ngx_int_t
ngx_http_upstream_dynup_json_value(ngx_conf_t *cf, ngx_str_t *v, ngx_str_t *out)
{
    size_t      i, first, digits, dots;
    ngx_str_t   b;

    if (v->len > 0 && (v->data[0] == '[' || v->data[0] == '{')) {
        *out = *v;
        return NGX_OK;
    }

    if ((v->len == 4 && ngx_strncmp(v->data, "true", 4) == 0)
        || (v->len == 2 && ngx_strncmp(v->data, "on", 2) == 0))
    {
        ngx_str_set(&b, "true");
        *out = b;
        return NGX_OK;
    }

    if ((v->len == 5 && ngx_strncmp(v->data, "false", 5) == 0)
        || (v->len == 3 && ngx_strncmp(v->data, "off", 3) == 0))
    {
        ngx_str_set(&b, "false");
        *out = b;
        return NGX_OK;
    }

    first = (v->len > 0 && v->data[0] == '-') ? 1 : 0; /* the first digit */
    digits = 0;
    dots = 0;
    for (i = first; i < v->len; i++) {
        if (v->data[i] >= '0' && v->data[i] <= '9') {
            digits++;

        } else if (v->data[i] == '.' && digits > 0 && dots == 0 && i + 1 < v->len) {
            dots++;

        } else {
            break;
        }
    }

    /* all of it a number, and not an integer with a leading zero ("007" is a string) */
    if (digits > 0 && i == v->len && !(v->data[first] == '0' && digits > 1 && dots == 0)) {
        *out = *v;
        return NGX_OK;
    }

    return ngx_http_upstream_dynup_json_string(cf, v, out);
}


/* The `depth`th dot-separated component of a parameter's path; len 0 past the end. */
static ngx_str_t
ngx_http_upstream_dynup_component(ngx_str_t *path, ngx_uint_t depth)
{
    u_char     *p, *end, *dot;
    ngx_str_t   c;

    p = path->data;
    end = path->data + path->len;

    for ( ;; ) {
        dot = ngx_strlchr(p, end, '.');
        if (depth == 0) {
            c.data = p;
            c.len = (dot ? dot : end) - p;
            return c;
        }
        if (dot == NULL) {
            c.data = end;
            c.len = 0;
            return c;
        }
        p = dot + 1;
        depth--;
    }
}


/* Orders paths so that "a.b" sorts right after "a" and before "a-b": every object's
 * members are contiguous. */
static int ngx_libc_cdecl
ngx_http_upstream_dynup_cmp_params(const void *one, const void *two)
{
    const ngx_http_upstream_dynup_param_t  *a = one, *b = two;
    size_t                                  i, n;
    u_char                                  ca, cb;

    n = ngx_min(a->path.len, b->path.len);
    for (i = 0; i < n; i++) {
        ca = a->path.data[i] == '.' ? 1 : a->path.data[i];
        cb = b->path.data[i] == '.' ? 1 : b->path.data[i];
        if (ca != cb) {
            return ca < cb ? -1 : 1;
        }
    }

    return a->path.len == b->path.len ? 0 : (a->path.len < b->path.len ? -1 : 1);
}


/* Writes params[lo, hi), sorted, as one JSON object whose member names are their paths'
 * component `depth`. Returns the end of what it wrote, or NULL with `conflict` set when
 * a path is both a value and an object ("policy=x" and "policy.name=y"). */
static u_char *
ngx_http_upstream_dynup_write_object(u_char *p, ngx_http_upstream_dynup_param_t *params,
    ngx_uint_t lo, ngx_uint_t hi, ngx_uint_t depth,
    ngx_http_upstream_dynup_param_t **conflict)
{
    ngx_uint_t  i, j;
    ngx_str_t   c, cj;

    *p++ = '{';

    for (i = lo; i < hi; i = j) {
        c = ngx_http_upstream_dynup_component(&params[i].path, depth);

        for (j = i + 1; j < hi; j++) {
            cj = ngx_http_upstream_dynup_component(&params[j].path, depth);
            if (cj.len != c.len || ngx_strncmp(cj.data, c.data, c.len) != 0) {
                break;
            }
        }

        if (i > lo) {
            *p++ = ',';
        }

        *p++ = '"';
        p = ngx_cpymem(p, c.data, c.len);
        *p++ = '"';
        *p++ = ':';

        if (c.data + c.len == params[i].path.data + params[i].path.len) {
            /* params[i] ends here: a value, the only one with this name */
            if (j - i > 1) {
                *conflict = &params[i + 1];
                return NULL;
            }
            p = ngx_cpymem(p, params[i].value.data, params[i].value.len);
            continue;
        }

        p = ngx_http_upstream_dynup_write_object(p, params, i, j, depth + 1, conflict);
        if (p == NULL) {
            return NULL;
        }
    }

    *p++ = '}';

    return p;
}


/* The config JSON of params (sorted here), NUL-terminated, in cf's pool; NULL with an
 * error logged. */
static u_char *
ngx_http_upstream_dynup_build_json(ngx_conf_t *cf, ngx_array_t *params, size_t *len)
{
    ngx_http_upstream_dynup_param_t  *pa, *conflict;
    ngx_uint_t                        i;
    size_t                            size;
    u_char                           *json, *end;

    pa = params->elts;
    ngx_qsort(pa, params->nelts, sizeof(ngx_http_upstream_dynup_param_t),
              ngx_http_upstream_dynup_cmp_params);

    size = 3;
    for (i = 0; i < params->nelts; i++) {
        /* every component quoted and followed by ':' and '{', braces closed, a comma */
        size += 4 * pa[i].path.len + pa[i].value.len + 8;
    }

    json = ngx_pnalloc(cf->pool, size);
    if (json == NULL) {
        return NULL;
    }

    conflict = NULL;
    end = ngx_http_upstream_dynup_write_object(json, pa, 0, params->nelts, 0, &conflict);
    if (end == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "dynup: \"%V\" conflicts with another parameter that sets "
                           "a value where it needs an object, or the same value twice",
                           &conflict->path);
        return NULL;
    }

    *end = '\0';
    *len = end - json;
    return json;
}


/* The config JSON of params, checked by dynup as a worker will read it; NULL with the
 * reason logged. */
static u_char *
ngx_http_upstream_dynup_checked_json(ngx_conf_t *cf, ngx_array_t *params, size_t *len)
{
    u_char  *json;
    char     err[NGX_HTTP_DYNUP_ERR_LEN];

    json = ngx_http_upstream_dynup_build_json(cf, params, len);
    if (json == NULL) {
        return NULL;
    }

    if (dynup_config_check((char *) json, err, sizeof(err)) != DYNUP_OK) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "dynup: %s", err);
        return NULL;
    }

    return json;
}


static ngx_int_t
ngx_http_upstream_dynup_add_param(ngx_conf_t *cf, ngx_array_t *params, char *path,
    ngx_str_t *json_value)
{
    ngx_http_upstream_dynup_param_t  *p;

    p = ngx_array_push(params);
    if (p == NULL) {
        return NGX_ERROR;
    }

    p->path.data = (u_char *) path;
    p->path.len = ngx_strlen(path);
    p->value = *json_value;
    return NGX_OK;
}


/* A file:// source must be readable now, as an `include` must: `nginx -t` says so
 * instead of a worker serving nothing. */
static ngx_int_t
ngx_http_upstream_dynup_check_file(ngx_conf_t *cf, ngx_str_t *source)
{
    u_char  *spec;
    char     err[NGX_HTTP_DYNUP_ERR_LEN];

    spec = ngx_pnalloc(cf->temp_pool, source->len + 1);
    if (spec == NULL) {
        return NGX_ERROR;
    }
    ngx_cpystrn(spec, source->data, source->len + 1);

    if (dynup_source_file_check((char *) spec, err, sizeof(err)) != DYNUP_OK) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "dynup: %s", err);
        return NGX_ERROR;
    }

    return NGX_OK;
}


/* Whether a parameter sets `path` or an object above it ("health" for
 * "health.panic.threshold_percent"). */
static ngx_uint_t
ngx_http_upstream_dynup_sets(ngx_array_t *params, const char *path)
{
    ngx_http_upstream_dynup_param_t  *pa = params->elts;
    ngx_uint_t                        i;
    size_t                            n = ngx_strlen(path);

    for (i = 0; i < params->nelts; i++) {
        if (pa[i].path.len <= n
            && ngx_strncmp(pa[i].path.data, path, pa[i].path.len) == 0
            && (pa[i].path.len == n || path[pa[i].path.len] == '.'))
        {
            return 1;
        }
    }

    return 0;
}


/* What an nginx user expects where dynup's library defaults differ (README, "nginx
 * behaviour"): no panic routing, so every peer down is a 502 with "no live upstreams";
 * round_robin runs nginx's own sequence, retries and failures included; and a worker
 * never waits on the registry to start. */
static ngx_int_t
ngx_http_upstream_dynup_nginx_defaults(ngx_conf_t *cf, ngx_array_t *params)
{
    ngx_http_upstream_dynup_param_t  *pa;
    ngx_str_t                         v, *policy;
    ngx_uint_t                        i;

    if (!ngx_http_upstream_dynup_sets(params, "health.panic.threshold_percent")) {
        ngx_str_set(&v, "0");
        if (ngx_http_upstream_dynup_add_param(cf, params, "health.panic.threshold_percent", &v) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    /* A worker's start must not wait on the network: it serves the snapshot (or
     * nothing) at once and fetches on dynup's thread. */
    if (!ngx_http_upstream_dynup_sets(params, "watch.initial")
        && !ngx_http_upstream_dynup_sets(params, "watch.strong_dependency"))
    {
        ngx_str_set(&v, "\"background\"");
        if (ngx_http_upstream_dynup_add_param(cf, params, "watch.initial", &v) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    if (ngx_http_upstream_dynup_sets(params, "policy.options.sequence")) {
        return NGX_OK; /* chosen, or policy given as one JSON value */
    }

    policy = NULL;
    pa = params->elts;
    for (i = 0; i < params->nelts; i++) {
        if (pa[i].path.len == 11 && ngx_strncmp(pa[i].path.data, "policy.name", 11) == 0) {
            policy = &pa[i].value;
        }
    }

    if (policy == NULL) {
        ngx_str_set(&v, "\"round_robin\"");
        if (ngx_http_upstream_dynup_add_param(cf, params, "policy.name", &v) != NGX_OK) {
            return NGX_ERROR;
        }

    } else if (!(policy->len == 13 && ngx_strncmp(policy->data, "\"round_robin\"", 13) == 0)) {
        return NGX_OK;
    }

    ngx_str_set(&v, "\"nginx\"");
    return ngx_http_upstream_dynup_add_param(cf, params, "policy.options.sequence", &v);
}


/* The shared region's name (docs/SHARED.md: 1..64 of A-Z a-z 0-9 _ . -): "ngx-", a hash
 * of nginx's config file and this upstream's config, "-", and the upstream's name. */
static u_char *
ngx_http_upstream_dynup_region_name(ngx_conf_t *cf, ngx_str_t *name, u_char *json, size_t json_len)
{
    uint64_t   h;
    size_t     i, n;
    u_char    *p, *out, c;
    ngx_str_t *conf_file;

    h = 0xcbf29ce484222325ULL; /* FNV-1a, 64 bits */
    conf_file = &cf->cycle->conf_file;
    for (i = 0; i < conf_file->len; i++) {
        h = (h ^ conf_file->data[i]) * 0x100000001b3ULL;
    }
    h = (h ^ 0xff) * 0x100000001b3ULL;
    for (i = 0; i < json_len; i++) {
        h = (h ^ json[i]) * 0x100000001b3ULL;
    }

    out = ngx_pnalloc(cf->pool, 65);
    if (out == NULL) {
        return NULL;
    }

    p = ngx_sprintf(out, "ngx-%016uxL-", h);
    n = ngx_min(name->len, (size_t) (64 - (p - out)));
    for (i = 0; i < n; i++) {
        c = name->data[i];
        *p++ = (ngx_http_upstream_dynup_name_char(c) || c == '.' || c == '-') ? c : '_';
    }
    *p = '\0';

    return out;
}


static char *
ngx_http_upstream_dynup(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_upstream_dynup_srv_conf_t   *dcf = conf;

    ngx_http_upstream_srv_conf_t         *uscf;
    ngx_http_upstream_dynup_main_conf_t  *dmcf;
    ngx_http_upstream_dynup_srv_conf_t  **slot;
    ngx_http_compile_complex_value_t      ccv;
    ngx_http_upstream_dynup_param_t      *pa;
    ngx_http_upstream_server_t           *server;
    ngx_array_t                           params;
    ngx_str_t                            *value, v, path, json_value, region;
    ngx_uint_t                            i, j, has_shared_name;
    u_char                               *eq, *json, *region_name;
    size_t                                json_len;

    if (dcf->json.data != NULL) {
        return "is duplicate";
    }

    uscf = ngx_http_conf_get_module_srv_conf(cf, ngx_http_upstream_module);

    if (uscf->peer.init_upstream) {
        /* keepalive (or another balancer) came first: it wrapped nginx's round robin,
         * or would be silently replaced */
        return "must come before \"keepalive\" and cannot be combined with another "
               "balancing method (hash, ip_hash, least_conn, random); "
               "choose dynup's with policy=";
    }

    value = cf->args->elts;

    if (ngx_http_upstream_dynup_check_file(cf, &value[1]) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    if (ngx_array_init(&params, cf->temp_pool, 8, sizeof(ngx_http_upstream_dynup_param_t))
        != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    if (ngx_http_upstream_dynup_json_string(cf, &uscf->host, &json_value) != NGX_OK
        || ngx_http_upstream_dynup_add_param(cf, &params, "name", &json_value) != NGX_OK
        || ngx_http_upstream_dynup_json_string(cf, &value[1], &json_value) != NGX_OK
        || ngx_http_upstream_dynup_add_param(cf, &params, "source", &json_value) != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    has_shared_name = 0;

    for (i = 2; i < cf->args->nelts; i++) {
        eq = ngx_strlchr(value[i].data, value[i].data + value[i].len, '=');
        if (eq == NULL || eq == value[i].data) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "dynup: \"%V\" is not a name=value parameter "
                               "(policy=, snapshot=, key=, or a config path such as "
                               "health.passive.max_fails=3)", &value[i]);
            return NGX_CONF_ERROR;
        }

        path.data = value[i].data;
        path.len = eq - value[i].data;
        v.data = eq + 1;
        v.len = value[i].data + value[i].len - v.data;

        if (path.len == 3 && ngx_strncmp(path.data, "key", 3) == 0) {
            if (dcf->key != NULL) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "dynup: \"key\" is duplicate");
                return NGX_CONF_ERROR;
            }

            dcf->key = ngx_palloc(cf->pool, sizeof(ngx_http_complex_value_t));
            if (dcf->key == NULL) {
                return NGX_CONF_ERROR;
            }

            ngx_memzero(&ccv, sizeof(ngx_http_compile_complex_value_t));
            ccv.cf = cf;
            ccv.value = &v;
            ccv.complex_value = dcf->key;

            if (ngx_http_compile_complex_value(&ccv) != NGX_OK) {
                return NGX_CONF_ERROR;
            }
            continue;
        }

        if ((path.len == 4 && ngx_strncmp(path.data, "name", 4) == 0)
            || (path.len == 6 && ngx_strncmp(path.data, "source", 6) == 0))
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "dynup: \"%V\" cannot be set: the name is the upstream's, "
                               "the source is the first argument", &path);
            return NGX_CONF_ERROR;
        }

        if (path.len == 8 && ngx_strncmp(path.data, "snapshot", 8) == 0) {
            ngx_str_set(&path, "snapshot_path");
        }

        for (j = 0; j < path.len; j++) {
            if (!(ngx_http_upstream_dynup_name_char(path.data[j]) || path.data[j] == '.')
                || (path.data[j] == '.' && (j == 0 || j + 1 == path.len || path.data[j - 1] == '.')))
            {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "dynup: invalid parameter name \"%V\": a config path "
                                   "is names of a-z, 0-9 and _ joined by dots", &path);
                return NGX_CONF_ERROR;
            }
        }

        if (path.len == 11 && ngx_strncmp(path.data, "shared.name", 11) == 0) {
            has_shared_name = 1;
        }

        if (ngx_http_upstream_dynup_json_value(cf, &v, &json_value) != NGX_OK) {
            return NGX_CONF_ERROR;
        }

        pa = ngx_array_push(&params);
        if (pa == NULL) {
            return NGX_CONF_ERROR;
        }
        pa->path = path;
        pa->value = json_value;
    }

    /* policy=NAME is the policy object's "name", beside any policy.options.*; a
     * policy given whole as a JSON object stays as it is */
    pa = params.elts;
    j = 0;
    for (i = 0; i < params.nelts; i++) {
        if (pa[i].path.len == 6 && ngx_strncmp(pa[i].path.data, "policy", 6) == 0) {
            if (j++ > 0) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "dynup: \"policy\" conflicts with another parameter: "
                                   "it sets the same value twice");
                return NGX_CONF_ERROR;
            }
            if (pa[i].value.len > 0 && pa[i].value.data[0] == '"') {
                ngx_str_set(&pa[i].path, "policy.name");
            }
        }
    }

    if (ngx_http_upstream_dynup_nginx_defaults(cf, &params) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    /* A hash policy without key= would spread requests, not pin them. */
    pa = params.elts;
    for (i = 0; i < params.nelts; i++) {
        if (((pa[i].path.len == 6 && ngx_strncmp(pa[i].path.data, "policy", 6) == 0)
             || (pa[i].path.len == 11 && ngx_strncmp(pa[i].path.data, "policy.name", 11) == 0))
            && ((pa[i].value.len == 11 && ngx_strncmp(pa[i].value.data, "\"ring_hash\"", 11) == 0)
                || (pa[i].value.len == 8 && ngx_strncmp(pa[i].value.data, "\"maglev\"", 8) == 0))
            && dcf->key == NULL)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "dynup: policy %V hashes a key: add key=, "
                               "e.g. key=$request_uri", &pa[i].value);
            return NGX_CONF_ERROR;
        }
    }

    /* Checked without the region's name first: its errors name what the user wrote. */
    json = ngx_http_upstream_dynup_checked_json(cf, &params, &json_len);
    if (json == NULL) {
        return NGX_CONF_ERROR;
    }

    if (!has_shared_name) {
        region_name = ngx_http_upstream_dynup_region_name(cf, &uscf->host, json, json_len);
        if (region_name == NULL) {
            return NGX_CONF_ERROR;
        }

        region.data = region_name;
        region.len = ngx_strlen(region_name);
        if (ngx_http_upstream_dynup_json_string(cf, &region, &json_value) != NGX_OK
            || ngx_http_upstream_dynup_add_param(cf, &params, "shared.name", &json_value) != NGX_OK)
        {
            return NGX_CONF_ERROR;
        }

        json = ngx_http_upstream_dynup_checked_json(cf, &params, &json_len);
        if (json == NULL) {
            return NGX_CONF_ERROR;
        }
    }

    dcf->json.data = json;
    dcf->json.len = json_len;
    dcf->name = uscf->host;
    dcf->file = cf->conf_file->file.name.data;
    dcf->line = cf->conf_file->line;

    /* nginx refuses an upstream block without servers ("no servers are inside
     * upstream") once the block is read: this entry satisfies that check and is taken
     * out again by init_upstream. It is never a peer: nginx's round robin, which would
     * make it one, never runs for this upstream. */
    server = ngx_array_push(uscf->servers);
    if (server == NULL) {
        return NGX_CONF_ERROR;
    }
    ngx_memzero(server, sizeof(ngx_http_upstream_server_t));
    server->name.data = ngx_http_upstream_dynup_placeholder;
    server->name.len = sizeof(ngx_http_upstream_dynup_placeholder) - 1;
    server->down = 1;

    /* An address (0.0.0.0:0, never used): should a balancer declared after dynup
     * replace it, nginx's round robin starts on this entry instead of failing with
     * "no servers in upstream", and postconfiguration says what happened. */
    server->addrs = ngx_pcalloc(cf->pool, sizeof(ngx_addr_t) + sizeof(struct sockaddr_in));
    if (server->addrs == NULL) {
        return NGX_CONF_ERROR;
    }
    server->addrs->sockaddr = (struct sockaddr *) (server->addrs + 1);
    server->addrs->sockaddr->sa_family = AF_INET;
    server->addrs->socklen = sizeof(struct sockaddr_in);
    server->addrs->name = server->name;
    server->naddrs = 1;

    uscf->peer.init_upstream = ngx_http_upstream_init_dynup;
    uscf->peer.data = dcf;

    dmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_upstream_dynup_module);
    slot = ngx_array_push(&dmcf->upstreams);
    if (slot == NULL) {
        return NGX_CONF_ERROR;
    }
    *slot = dcf;

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_upstream_init_dynup(ngx_conf_t *cf, ngx_http_upstream_srv_conf_t *us)
{
    ngx_http_upstream_dynup_srv_conf_t  *dcf;

    ngx_http_upstream_server_t          *server;
    ngx_uint_t                           i, others;

    dcf = ngx_http_conf_upstream_srv_conf(us, ngx_http_upstream_dynup_module);

    others = 0;
    server = us->servers->elts;
    for (i = 0; i < us->servers->nelts; i++) {
        if (server[i].name.data != ngx_http_upstream_dynup_placeholder) {
            others++;
        }
    }

    if (others > 0) {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "upstream \"%V\" in %s:%ui has \"server\" lines beside \"dynup\": "
                      "dynup takes every peer from its source; list fixed peers in a "
                      "file:// source, or use snapshot= for a fallback",
                      &us->host, us->file_name, us->line);
        return NGX_ERROR;
    }

    if (us->shm_zone) {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "upstream \"%V\" in %s:%ui: \"zone\" cannot be combined with "
                      "\"dynup\": dynup shares its peers between workers itself",
                      &us->host, us->file_name, us->line);
        return NGX_ERROR;
    }

    us->servers->nelts = 0; /* the placeholder the directive added, now unneeded */
    us->peer.init = ngx_http_upstream_init_dynup_peer;
    us->peer.data = dcf;
    dcf->balancer_set = 1;

    return NGX_OK;
}


static ngx_int_t
ngx_http_upstream_dynup_postconfiguration(ngx_conf_t *cf)
{
    ngx_http_upstream_dynup_main_conf_t   *dmcf;
    ngx_http_upstream_dynup_srv_conf_t   **dcfp;
    ngx_uint_t                             i;

    dmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_upstream_dynup_module);
    dcfp = dmcf->upstreams.elts;

    for (i = 0; i < dmcf->upstreams.nelts; i++) {
        if (!dcfp[i]->balancer_set) {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "upstream \"%V\": \"dynup\" in %s:%ui was replaced by a "
                          "balancing method declared after it (hash, ip_hash, "
                          "least_conn, random); choose dynup's with policy=",
                          &dcfp[i]->name, dcfp[i]->file, dcfp[i]->line);
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


/* ---- worker processes ---------------------------------------------------------- */

/* Logs what went wrong in each upstream since the last look: dynup's threads never call
 * into nginx, so this worker's event loop collects their errors (a registry refusing, a
 * file that cannot be read), one line per upstream per second at most. */
static void
ngx_http_upstream_dynup_log_errors(ngx_event_t *ev)
{
    ngx_http_upstream_dynup_main_conf_t   *dmcf = ev->data;
    ngx_http_upstream_dynup_srv_conf_t   **dcfp;
    ngx_uint_t                             i;
    uint64_t                               n;
    char                                   err[NGX_HTTP_DYNUP_ERR_LEN];

    dcfp = dmcf->upstreams.elts;
    for (i = 0; i < dmcf->upstreams.nelts; i++) {
        if (dcfp[i]->handle == NULL) {
            continue;
        }
        n = dynup_errors_since(dcfp[i]->handle, &dcfp[i]->errors_seen, err, sizeof(err));
        if (n == 1) {
            ngx_log_error(NGX_LOG_ERR, ev->log, 0, "dynup: upstream \"%V\": %s",
                          &dcfp[i]->name, err);

        } else if (n > 1) {
            ngx_log_error(NGX_LOG_ERR, ev->log, 0,
                          "dynup: upstream \"%V\": %s (and %uL more errors in the last second)",
                          &dcfp[i]->name, err, n - 1);
        }
    }

    if (!ngx_exiting && !ngx_quit && !ngx_terminate) {
        ngx_add_timer(ev, NGX_HTTP_DYNUP_ERRORS_EVERY);
    }
}

static ngx_int_t
ngx_http_upstream_dynup_init_process(ngx_cycle_t *cycle)
{
    ngx_http_upstream_dynup_main_conf_t   *dmcf;
    ngx_http_upstream_dynup_srv_conf_t   **dcfp;
    ngx_uint_t                             i;
    sigset_t                               all, saved;
    size_t                                 n;
    char                                   err[NGX_HTTP_DYNUP_ERR_LEN];

    if (ngx_process != NGX_PROCESS_WORKER && ngx_process != NGX_PROCESS_SINGLE) {
        return NGX_OK; /* the cache manager and loader balance nothing */
    }

    dmcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_http_upstream_dynup_module);
    if (dmcf == NULL) {
        return NGX_OK;
    }

    /* dynup's threads inherit this mask: nginx's signals reach the worker's own
     * thread, never one of dynup's. */
    sigfillset(&all);
    if (pthread_sigmask(SIG_SETMASK, &all, &saved) != 0) {
        ngx_log_error(NGX_LOG_ALERT, cycle->log, ngx_errno, "dynup: pthread_sigmask() failed");
        return NGX_ERROR;
    }

    dmcf->errors_ev.handler = ngx_http_upstream_dynup_log_errors;
    dmcf->errors_ev.data = dmcf;
    dmcf->errors_ev.log = cycle->log;
    dmcf->errors_ev.cancelable = 1; /* a graceful stop does not wait for it */

    dcfp = dmcf->upstreams.elts;
    for (i = 0; i < dmcf->upstreams.nelts; i++) {
        /* without it (out of memory) every pick parses its peer's address */
        dcfp[i]->addrs = ngx_calloc(NGX_HTTP_DYNUP_ADDR_CACHE * sizeof(ngx_http_upstream_dynup_addr_t),
                                    cycle->log);
        dcfp[i]->handle = dynup_upstream_new((char *) dcfp[i]->json.data, err, sizeof(err));
        if (dcfp[i]->handle == NULL) {
            /* The worker serves its other upstreams; this one answers 502. */
            ngx_log_error(NGX_LOG_ALERT, cycle->log, 0,
                          "dynup: upstream \"%V\" could not start: %s", &dcfp[i]->name, err);
            n = ngx_strlen(err);
            dcfp[i]->start_error = ngx_alloc(n + 1, cycle->log);
            if (dcfp[i]->start_error) {
                ngx_memcpy(dcfp[i]->start_error, err, n + 1);
            }
        }
    }

    (void) pthread_sigmask(SIG_SETMASK, &saved, NULL);

    if (dmcf->upstreams.nelts > 0) {
        ngx_http_upstream_dynup_log_errors(&dmcf->errors_ev); /* start errors, and the timer */
    }

    return NGX_OK;
}


static void
ngx_http_upstream_dynup_exit_process(ngx_cycle_t *cycle)
{
    ngx_http_upstream_dynup_main_conf_t   *dmcf;
    ngx_http_upstream_dynup_srv_conf_t   **dcfp;
    ngx_uint_t                             i;

    dmcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_http_upstream_dynup_module);
    if (dmcf == NULL) {
        return;
    }

    if (dmcf->errors_ev.timer_set) {
        ngx_del_timer(&dmcf->errors_ev);
    }

    /* Stops the threads and drops the lead, so another worker takes it at once. */
    dcfp = dmcf->upstreams.elts;
    for (i = 0; i < dmcf->upstreams.nelts; i++) {
        dynup_upstream_free(dcfp[i]->handle);
        dcfp[i]->handle = NULL;
        ngx_free(dcfp[i]->start_error);
        dcfp[i]->start_error = NULL;
        ngx_free(dcfp[i]->addrs);
        dcfp[i]->addrs = NULL;
    }
}


/* ---- requests ------------------------------------------------------------------ */

static ngx_int_t
ngx_http_upstream_init_dynup_peer(ngx_http_request_t *r, ngx_http_upstream_srv_conf_t *us)
{
    ngx_http_upstream_dynup_srv_conf_t   *dcf = us->peer.data;
    ngx_http_upstream_dynup_peer_data_t  *dp;
    size_t                                peers;

    dp = ngx_palloc(r->pool, sizeof(ngx_http_upstream_dynup_peer_data_t));
    if (dp == NULL) {
        return NGX_ERROR;
    }

    /* dynup_pick refuses a selection that looks live: only its tag word must be zero,
     * the rest it writes. */
    dp->sel.opaque_[0] = 0;
    dp->conf = dcf;
    dp->request = r;
    dp->tried = NULL;
    dp->ntried = 0;
    dp->tried_cap = 0;
    dp->live = 0;
    dp->picks = 0;
    dp->name = &dp->first_name;
    dp->name_buf = dp->first_name_buf;
    ngx_str_null(&dp->key);

    if (dcf->key != NULL && ngx_http_complex_value(r, dcf->key, &dp->key) != NGX_OK) {
        return NGX_ERROR;
    }

    peers = dcf->handle ? dynup_peer_count(dcf->handle) : 0;

    r->upstream->peer.data = dp;
    r->upstream->peer.get = ngx_http_upstream_get_dynup_peer;
    r->upstream->peer.free = ngx_http_upstream_free_dynup_peer;
    r->upstream->peer.tries = peers > 0 ? peers : 1;

    return NGX_OK;
}


/* The selection's host and port as dp's sockaddr and name. The host must be an IP
 * address: nginx's balancer cannot wait for a DNS lookup. */
static ngx_int_t
ngx_http_upstream_dynup_set_address(ngx_http_upstream_dynup_peer_data_t *dp)
{
    dynup_selection                 *sel = &dp->sel;
    ngx_http_upstream_dynup_addr_t  *e;
    in_addr_t                        v4;
    u_char                          *p;

    e = NULL;
    if (dp->conf->addrs != NULL && sel->host_len < NGX_HTTP_DYNUP_HOST_MAX) {
        e = &dp->conf->addrs[sel->id_hash % NGX_HTTP_DYNUP_ADDR_CACHE];
        if (e->host_len == sel->host_len && e->id_hash == sel->id_hash && e->port == sel->port
            && ngx_memcmp(e->host, sel->host, sel->host_len) == 0)
        {
            /* copies: the request keeps its own, whatever the cache holds later */
            ngx_memcpy(&dp->sockaddr, &e->sockaddr, e->socklen);
            dp->socklen = e->socklen;
            ngx_memcpy(dp->name_buf, e->name, e->name_len);
            dp->name->data = dp->name_buf;
            dp->name->len = e->name_len;
            return NGX_OK;
        }
    }

    v4 = ngx_inet_addr((u_char *) sel->host, sel->host_len);

    if (v4 != INADDR_NONE) {
        ngx_memzero(&dp->sockaddr.sockaddr_in, sizeof(struct sockaddr_in));
        dp->sockaddr.sockaddr_in.sin_family = AF_INET;
        dp->sockaddr.sockaddr_in.sin_addr.s_addr = v4;
        dp->sockaddr.sockaddr_in.sin_port = htons(sel->port);
        dp->socklen = sizeof(struct sockaddr_in);
        p = ngx_cpymem(dp->name_buf, sel->host, sel->host_len);

#if (NGX_HAVE_INET6)
    } else if (ngx_inet6_addr((u_char *) sel->host, sel->host_len,
                              dp->sockaddr.sockaddr_in6.sin6_addr.s6_addr) == NGX_OK)
    {
        struct in6_addr  a6 = dp->sockaddr.sockaddr_in6.sin6_addr;

        ngx_memzero(&dp->sockaddr.sockaddr_in6, sizeof(struct sockaddr_in6));
        dp->sockaddr.sockaddr_in6.sin6_family = AF_INET6;
        dp->sockaddr.sockaddr_in6.sin6_addr = a6;
        dp->sockaddr.sockaddr_in6.sin6_port = htons(sel->port);
        dp->socklen = sizeof(struct sockaddr_in6);
        p = dp->name_buf;
        *p++ = '[';
        p = ngx_cpymem(p, sel->host, sel->host_len);
        *p++ = ']';
#endif

    } else {
        return NGX_DECLINED;
    }

    p = ngx_sprintf(p, ":%ui", (ngx_uint_t) sel->port);
    dp->name->data = dp->name_buf;
    dp->name->len = p - dp->name_buf;

    if (e != NULL) {
        e->id_hash = sel->id_hash;
        e->port = sel->port;
        e->host_len = sel->host_len;
        ngx_memcpy(e->host, sel->host, sel->host_len);
        ngx_memcpy(&e->sockaddr, &dp->sockaddr, dp->socklen);
        e->socklen = dp->socklen;
        ngx_memcpy(e->name, dp->name_buf, dp->name->len);
        e->name_len = dp->name->len;
    }

    return NGX_OK;
}


/* Remembers the live selection's peer, so that the request's next try skips it. */
static ngx_int_t
ngx_http_upstream_dynup_add_tried(ngx_http_upstream_dynup_peer_data_t *dp)
{
    uint64_t    *grown;
    ngx_uint_t   cap;

    if (dp->ntried == dp->tried_cap) {
        cap = dp->tried_cap ? 2 * dp->tried_cap : 4;
        grown = ngx_palloc(dp->request->pool, cap * sizeof(uint64_t));
        if (grown == NULL) {
            return NGX_ERROR;
        }
        if (dp->ntried) {
            ngx_memcpy(grown, dp->tried, dp->ntried * sizeof(uint64_t));
        }
        dp->tried = grown;
        dp->tried_cap = cap;
    }

    dp->tried[dp->ntried++] = dp->sel.id_hash;
    return NGX_OK;
}


static ngx_int_t
ngx_http_upstream_get_dynup_peer(ngx_peer_connection_t *pc, void *data)
{
    ngx_http_upstream_dynup_peer_data_t  *dp = data;
    dynup_upstream                       *h = dp->conf->handle;
    int                                   rc;
    char                                  err[NGX_HTTP_DYNUP_ERR_LEN];

    pc->cached = 0;
    pc->connection = NULL;

    if (h == NULL) {
        ngx_log_error(NGX_LOG_ERR, pc->log, 0,
                      "dynup: upstream \"%V\" is not running in this worker: %s",
                      &dp->conf->name,
                      dp->conf->start_error ? dp->conf->start_error : (u_char *) "not started");
        pc->name = &dp->conf->name;
        return NGX_BUSY;
    }

    if (dp->live) {
        dynup_cancel(h, &dp->sel); /* nginx always frees before it gets again */
        dp->live = 0;
    }

    if (dp->picks > 0) {
        /* the earlier tries' names stay where u->state points at them */
        dp->name = ngx_palloc(dp->request->pool, sizeof(ngx_str_t) + NGX_HTTP_DYNUP_NAME_MAX);
        if (dp->name == NULL) {
            return NGX_ERROR;
        }
        dp->name_buf = (u_char *) (dp->name + 1);
    }

    for ( ;; ) {
        rc = dynup_pick(h, (char *) dp->key.data, dp->key.len, dp->tried, dp->ntried,
                        &dp->sel, err, sizeof(err));
        if (rc != DYNUP_OK) {
            if (rc != DYNUP_E_ALL_TRIED) {
                ngx_log_error(NGX_LOG_ERR, pc->log, 0, "dynup: %s", err);
            }
            pc->name = &dp->conf->name;
            return NGX_BUSY;
        }

        if (ngx_http_upstream_dynup_set_address(dp) == NGX_OK) {
            break;
        }

        ngx_log_error(NGX_LOG_ERR, pc->log, 0,
                      "dynup: upstream \"%V\": peer \"%s\" has the host \"%s\", not an IP "
                      "address (nginx's balancer cannot resolve names): skipped",
                      &dp->conf->name, dp->sel.peer_id, dp->sel.host);

        if (ngx_http_upstream_dynup_add_tried(dp) != NGX_OK) {
            dynup_cancel(h, &dp->sel);
            return NGX_ERROR;
        }
        dynup_cancel(h, &dp->sel);
    }

    dp->live = 1;
    dp->picks++;
    pc->sockaddr = &dp->sockaddr.sockaddr;
    pc->socklen = dp->socklen;
    pc->name = dp->name;

    return NGX_OK;
}


/* One try has ended: its outcome goes to dynup (the policy's in-flight count and
 * latency, passive health). `state` is nginx's verdict: NGX_PEER_FAILED when the try
 * failed as proxy_next_upstream counts failures, NGX_PEER_NEXT for a 403/404 passed on,
 * 0 when the request is done with this try. */
static void
ngx_http_upstream_free_dynup_peer(ngx_peer_connection_t *pc, void *data, ngx_uint_t state)
{
    ngx_http_upstream_dynup_peer_data_t  *dp = data;
    dynup_upstream                       *h = dp->conf->handle;
    ngx_http_upstream_t                  *u;
    ngx_msec_t                            elapsed;
    ngx_uint_t                            connected, replied;
    int64_t                               latency_us;
    int                                   status;

    if (pc->tries) {
        pc->tries--;
    }

    if (!dp->live || h == NULL) {
        return;
    }

    dp->live = 0;
    (void) ngx_http_upstream_dynup_add_tried(dp); /* out of memory: a retry may repeat it */

    u = dp->request->upstream;
    elapsed = ngx_current_msec - u->start_time;
    latency_us = (int64_t) elapsed * 1000;
    connected = u->state && u->state->connect_time != (ngx_msec_t) -1;
    replied = u->state && u->state->header_time != (ngx_msec_t) -1;
    status = replied ? (int) u->headers_in.status_n : 0;

    /* What counts as a failure for max_fails is nginx's verdict (proxy_next_upstream),
     * not the status: a 502 passed on to the next peer failed, the last try's 502 did
     * not, as in nginx's round robin. */
    if (state & NGX_PEER_FAILED) {
        if (pc->cached && !replied) {
            /* a kept-alive connection the peer had closed: nothing about the peer */
            dynup_cancel(h, &dp->sel);

        } else {
            dynup_report_try(h, &dp->sel, status, latency_us,
                             DYNUP_TRY_FAILED | (connected ? 0 : DYNUP_TRY_CONNECT_FAILED));
        }
        return;
    }

    if (replied) {
        dynup_report_try(h, &dp->sel, status, latency_us, DYNUP_TRY_SUCCEEDED);
        return;
    }

    /* Done without a reply and not a failure: the client went away first. */
    dynup_cancel(h, &dp->sel);
}


/* ---- dynup_status -------------------------------------------------------------- */

static ngx_int_t
ngx_http_upstream_dynup_status_handler(ngx_http_request_t *r)
{
    ngx_http_upstream_dynup_main_conf_t   *dmcf;
    ngx_http_upstream_dynup_srv_conf_t   **dcfp, *dcf;
    ngx_chain_t                            out, *cl, **last;
    ngx_buf_t                             *b;
    ngx_str_t                              text;
    ngx_uint_t                             i;
    ngx_int_t                              rc;
    size_t                                 len, got;
    u_char                                *p;

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return NGX_HTTP_NOT_ALLOWED;
    }

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    dmcf = ngx_http_get_module_main_conf(r, ngx_http_upstream_dynup_module);
    dcfp = dmcf->upstreams.elts;

    /* {"pid":N,"upstreams":[status, ...]} */
    b = ngx_create_temp_buf(r->pool, sizeof("{\"pid\":,\"upstreams\":[") + NGX_INT64_LEN);
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
    b->last = ngx_sprintf(b->last, "{\"pid\":%P,\"upstreams\":[", ngx_pid);

    out.buf = b;
    out.next = NULL;
    last = &out.next;
    len = b->last - b->pos;

    for (i = 0; i < dmcf->upstreams.nelts; i++) {
        dcf = dcfp[i];

        if (dcf->handle == NULL) {
            text.data = dcf->start_error ? dcf->start_error : (u_char *) "not started";
            text.len = ngx_strlen(text.data);
            /* the name and the reason as JSON strings */
            b = ngx_create_temp_buf(r->pool, 2 * 6 * (dcf->name.len + text.len) + 64);
            if (b == NULL) {
                return NGX_HTTP_INTERNAL_SERVER_ERROR;
            }
            p = b->last;
            if (i > 0) {
                *p++ = ',';
            }
            p = ngx_cpymem(p, "{\"name\":\"", sizeof("{\"name\":\"") - 1);
            p = (u_char *) ngx_escape_json(p, dcf->name.data, dcf->name.len);
            p = ngx_cpymem(p, "\",\"error\":\"", sizeof("\",\"error\":\"") - 1);
            p = (u_char *) ngx_escape_json(p, text.data, text.len);
            *p++ = '"';
            *p++ = '}';
            b->last = p;

        } else {
            got = dynup_status(dcf->handle, NULL, 0);
            for ( ;; ) {
                b = ngx_create_temp_buf(r->pool, got + 2);
                if (b == NULL) {
                    return NGX_HTTP_INTERNAL_SERVER_ERROR;
                }
                if (i > 0) {
                    *b->last++ = ',';
                }
                len = dynup_status(dcf->handle, (char *) b->last, got + 1);
                if (len <= got) {
                    b->last += len;
                    break;
                }
                got = len; /* it grew in between: again, larger */
            }
        }

        cl = ngx_alloc_chain_link(r->pool);
        if (cl == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
        cl->buf = b;
        cl->next = NULL;
        *last = cl;
        last = &cl->next;
    }

    b = ngx_create_temp_buf(r->pool, 3);
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
    *b->last++ = ']';
    *b->last++ = '}';
    *b->last++ = '\n';
    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;

    cl = ngx_alloc_chain_link(r->pool);
    if (cl == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
    cl->buf = b;
    cl->next = NULL;
    *last = cl;

    len = 0;
    for (cl = &out; cl; cl = cl->next) {
        len += cl->buf->last - cl->buf->pos;
    }

    r->headers_out.status = NGX_HTTP_OK;
    r->headers_out.content_length_n = len;
    ngx_str_set(&r->headers_out.content_type, "application/json");
    r->headers_out.content_type_len = r->headers_out.content_type.len;
    r->headers_out.content_type_lowcase = NULL;

    rc = ngx_http_send_header(r);
    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    return ngx_http_output_filter(r, &out);
}


static char *
ngx_http_upstream_dynup_status(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_core_loc_conf_t  *clcf;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
    clcf->handler = ngx_http_upstream_dynup_status_handler;

    return NGX_CONF_OK;
}
