#!/usr/bin/env python3
"""Writes the seed corpora in fuzz/corpus/<target>/ from the Consul fixtures
(tests/fixtures/consul) and the inputs the unit tests use. Each seed starts with the
selector byte its target reads (see the comment at the top of fuzz/fuzz_<target>.cpp).

Run from anywhere: python3 fuzz/make_corpus.py. It rewrites only the seeds it names, so
inputs added by hand (regressions, fuzz-found) stay. Needs only the standard library.
"""
import base64
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "tests", "fixtures", "consul")


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def fixture(name):
    with open(os.path.join(FIXTURES, name), "rb") as f:
        return f.read()


def b64(s):
    return base64.b64encode(s.encode()).decode()


def crc32c(data):
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


# ---- consul: selector = path (bits 0-2) | status (bits 3-5) | token line 0x40 | index line 0x80
HEALTH, CATALOG, KV_UPSTREAMS, HEALTH_RACK, KV_WEB, KV_ZIP, HEALTH_AZ = 0, 1, 2, 3, 4, 5, 6
S200, S404, S400, S403, S503 = 0, 4 << 3, 5 << 3, 6 << 3, 7 << 3


def consul(name, selector, body, index=None, token=None):
    head = bytes([selector | (0x40 if token is not None else 0) | (0x80 if index is not None else 0)])
    if token is not None:
        head += token.encode() + b"\n"
    if index is not None:
        head += index.encode() + b"\n"
    write("consul", name, head + (body if isinstance(body, bytes) else body.encode()))


def health_entry(node, addr, service, checks='[{"CheckID":"serfHealth","Status":"passing"}]'):
    return ('{"Node":{"Node":"%s","Address":"%s","Datacenter":"dc1"},"Service":{%s},"Checks":%s}'
            % (node, addr, service, checks))


def kv_entry(key, value):
    v = "null" if value is None else '"%s"' % b64(value)
    return '{"LockIndex":0,"Key":"%s","Flags":0,"Value":%s,"CreateIndex":5,"ModifyIndex":7}' % (key, v)


consul("health_consul_docs", HEALTH, fixture("health_service_consul_docs.json"), index="42")
consul("health_brpc_rack", HEALTH_RACK, fixture("health_service_brpc_qs_show_leaf.json"), index="7")
consul("health_empty_service_address", HEALTH, fixture("health_service_prometheus_empty_service_address.json"))
consul("catalog_services_map", CATALOG, fixture("catalog_services_prometheus.json"))
consul("kv_single_zip", KV_ZIP, fixture("kv_get_single_consul_docs.json"), index="200")
consul("kv_legacy_web", KV_WEB, fixture("kv_recurse_consul_getting_started_legacy.json"), index="99")
consul("health_tolerant", HEALTH, """[
 {"Node":{"Node":"n1","Address":"10.0.0.1","TaggedAddresses":null,"Meta":null},
  "Service":{"ID":"a","Port":80,"Tags":null,"Meta":null,"Weights":null,"Address":null,
             "TaggedAddresses":{"lan":"10.0.0.1","wan":{"address":"1.2.3.4","port":80}}},"Checks":null},
 {"Node":{"Node":"n2","Address":"10.0.0.2"},"Service":{"ID":"b","Port":81,"Tags":["t",7,null],"Meta":{"k":"v","n":1}}}
]""")
consul("health_checks", HEALTH_AZ, "[" + ",".join([
    health_entry("n1", "10.0.0.1", '"ID":"web-1","Port":80,"Weights":{"Passing":3,"Warning":1}',
                 '[{"CheckID":"serfHealth","Status":"passing"},{"CheckID":"service:web-1","Status":"warning"}]'),
    health_entry("n2", "10.0.0.2", '"ID":"web-2","Port":80', '[{"CheckID":"_node_maintenance","Status":"critical"}]'),
    health_entry("n3", "10.0.0.3", '"ID":"web-3","Port":80,"Meta":{"az":"a1"}',
                 '[{"CheckID":"_service_maintenance:web-3","Status":"passing"}]'),
    health_entry("n4", "", '"ID":"v6","Port":8080,"Address":"2001:DB8:0:0::10","Weights":{"Passing":0}'),
    health_entry("n5", "not a host!", '"ID":"bad","Port":70000', '[{"CheckID":"x","Status":"odd"}]'),
]) + "]", index="17")
consul("catalog_instances", CATALOG, """[
 {"ID":"40e4a748","Node":"foobar","Address":"192.168.10.10","Datacenter":"dc1",
  "TaggedAddresses":{"lan":"192.168.10.10","wan":"10.0.10.10"},"NodeMeta":{"somekey":"somevalue","zone":"z-node"},
  "ServiceID":"32a2a47f7992:nodea:5000","ServiceName":"foobar","ServiceTags":["tacos"],
  "ServiceAddress":"172.17.0.3","ServicePort":5000,"ServiceMeta":{"foobar_meta_value":"baz"},
  "ServiceWeights":{"Passing":4,"Warning":1},"CreateIndex":51,"ModifyIndex":51},
 {"Node":"nodeb","Address":"192.168.10.11","ServiceID":"b","ServiceAddress":"","ServicePort":5001,
  "ServiceTags":null,"ServiceMeta":null},
 {"Node":"nodec","Address":"192.168.10.12","ServiceID":"c","ServicePort":5002,"ServiceWeights":{"Passing":0}},
 {"Node":"noded","Address":"","ServiceID":"d","ServicePort":5003}
]""", index="51")
consul("kv_upsync", KV_UPSTREAMS, "[" + ",".join([
    kv_entry("upstreams/api/", None),
    kv_entry("upstreams/api/10.0.0.1:8080", '{"weight":2,"max_fails":2,"fail_timeout":10,"down":0,"backup":0}'),
    kv_entry("upstreams/api/10.0.0.2:8080", ""),
    kv_entry("upstreams/api/10.0.0.3:8080", None),
    kv_entry("upstreams/api/[::1]:8081", '{"backup":true,"down":1}'),
    kv_entry("upstreams/api/sub/10.0.0.4:80", "{}"),
    kv_entry("upstreams/api/10.0.0.5:80", '{"weight":0}'),
]) + "]", index="12")
consul("kv_404", KV_UPSTREAMS | S404, "", index="12")
consul("health_403_echo", HEALTH | S403, "ACL not found: token SECRET-echo-4d2a is unknown", token="-echo-4d2a")
consul("health_503", HEALTH | S503, "No cluster leader\n")
consul("catalog_400", CATALOG | S400, "Bad request: invalid filter")
consul("health_404", HEALTH | S404, "Unexpected response code: 404")

# ---- etcd: selector % 4 = 0 watch message, 1 range, 2 splitter, 3 watch stream
HEADER = '"header":{"cluster_id":"324952591200643719","member_id":"3319814642761637952","revision":"5","raft_term":"2"}'


def etcd_kv(key, value, rev):
    kv = '{"key":"%s","create_revision":"%d","mod_revision":"%d","version":"1"' % (b64(key), rev, rev)
    return kv + (',"value":"%s"}' % b64(value) if value else "}")


puts = ('{"result":{' + HEADER + ',"events":[{"kv":' + etcd_kv("/u/a/p1", "10.0.0.1:80", 2) + '},{"kv":'
        + etcd_kv("/u/a/p2", '{"host":"10.0.0.2","port":81,"weight":4,"tags":["b","a"]}', 3) + '}]}}')
delete = ('{"result":{' + HEADER + ',"events":[{"type":"DELETE","kv":{"key":"' + b64("/u/a/p1")
          + '","mod_revision":"4"}}]}}')
created = '{"result":{"header":{"cluster_id":"1","member_id":"2","revision":"5","raft_term":"2"},"created":true}}'
compacted = ('{"result":{"header":{"cluster_id":"1","member_id":"2","raft_term":"2"},"canceled":true,'
             '"compact_revision":"4","cancel_reason":"mvcc: required revision has been compacted"}}')
progress = '{"result":{"header":{"cluster_id":"1","member_id":"2","revision":"6","raft_term":"3"}}}'
stream_error = ('{"error":{"grpc_code":14,"http_code":503,"message":"transport is closing",'
                '"http_status":"Service Unavailable"}}')
document_put = ('{"result":{' + HEADER + ',"events":[{"kv":'
                + etcd_kv("/u/api.json", '{"index":99,"peers":[{"host":"10.0.0.1","port":80},"10.0.0.2:80"]}', 5)
                + '}]}}')
for name, msg in [("watch_puts", puts), ("watch_delete", delete), ("watch_created", created),
                  ("watch_compacted", compacted), ("watch_progress", progress), ("watch_error", stream_error),
                  ("watch_document", document_put),
                  ("watch_explicit_id", '{"result":{' + HEADER + ',"events":[{"kv":'
                   + etcd_kv("/u/a/web-4", '{"id":"four","host":"Host.Example.","port":443}', 6) + '}]}}')]:
    write("etcd", name, b"\x00" + msg.encode())

range_keys = ('{' + HEADER.replace('"5"', '"3"', 1) + ',"kvs":[' + etcd_kv("/u/a/p1", '"10.0.0.1:80"', 2) + ","
              + etcd_kv("/u/a/p2", "", 3) + "," + etcd_kv("/u/a/10.0.0.3:80", "[::1]:80", 3) + '],"count":"3"}')
range_document = ('{' + HEADER + ',"kvs":[' + etcd_kv("/u/api.json", '["10.0.0.9:80","10.0.0.8:81"]', 5)
                  + '],"count":"1"}')
write("etcd", "range_keys", b"\x01" + range_keys.encode())
write("etcd", "range_document", b"\x01" + range_document.encode())
write("etcd", "range_empty", b"\x01" + b'{"header":{"cluster_id":"1","member_id":"2","revision":"1","raft_term":"2"}}')
write("etcd", "range_404", bytes([1 | (2 << 2)]) + b"404 page not found\n")
write("etcd", "range_400", bytes([1 | (3 << 2)]) + b'{"error":"invalid character","message":"invalid character","code":3}')

stream = "\n".join([created, puts, delete, progress, compacted]) + "\n"
write("etcd", "split_default_limit", bytes([2 | (7 << 2)]) + stream.encode())
write("etcd", "split_limit_64", bytes([2 | (4 << 2)]) + stream.encode())
write("etcd", "split_tricky_strings", bytes([2 | (7 << 2)])
      + b'{"result":{"created":true,"cancel_reason":"a}\\"{[b"}}{"result":{"canceled":true}}  \r\n{"a":[1,{"b":"]"}]}')
write("etcd", "stream_watch", b"\x03" + (stream + stream_error + "\n").encode())

# ---- peers: selector % 3 = 0 peer set, 1 upstream config, 2 health options
peer_docs = {
    "set_format_doc": '{"version": 7, "index": 42, "peers": [{"id": "api-1", "host": "10.0.0.1", "port": 8080, '
                      '"weight": 5, "backup": false, "zone": "eu-1a", "tags": ["v2"], "meta": {"build": "1.4"}, '
                      '"health": "passing"}, "10.0.0.2:8080"]}',
    "set_bare_array": '["10.0.0.3:80","10.0.0.1:80","[::1]:80","Example.COM:443"]',
    "set_every_field": '{"peers":[{"id":"x","host":"2001:DB8::1","port":65535,"weight":65535,"backup":true,'
                       '"zone":"z","tags":["b","a","b"],"meta":{"owner":"team \\"q\\" \\\\ \\u00fc"},'
                       '"health":"warning"},{"host":"backend.example.com.","port":1,"health":"unknown"}]}',
    "set_errors": '{"peers":["10.0.0.1:80",{"host":"10.0.0.2","port":80},{"host":"10.0.0.3","port":80,"wieght":5}]}',
    "set_duplicates": '["10.0.0.1:80","10.0.0.2:80","10.0.0.1:80"]',
    "set_empty": '{"version":3,"index":18446744073709551615,"peers":[]}',
}
for name, doc in peer_docs.items():
    write("peers", name, b"\x00" + doc.encode())

configs = {
    "config_readme": {"name": "api", "source": "consul://127.0.0.1:8500/health/api?tag=v2",
                      "policy": {"name": "least_request"}, "snapshot_path": "/var/lib/dynup/api.snap",
                      "health": {"passive": {"max_fails": 3, "fail_timeout_ms": 10000},
                                 "outlier": {"consecutive_5xx": 5}}},
    "config_every_section": {"name": "api", "source": "consul://127.0.0.1:8500/health/api?tag=v2",
                             "policy": {"name": "ring_hash", "options": {}},
                             "guards": {"min_peers": 2, "max_removed_share": 0.5, "allow_empty": False},
                             "snapshot_path": "/var/lib/dynup/api.snap",
                             "watch": {"wait_ms": 300000, "strong_dependency": False, "backoff_base_ms": 100,
                                       "backoff_cap_ms": 30000, "min_interval_ms": 0, "burst": 2},
                             "health": {"active": {"type": "tcp"}},
                             "shared": {"dir": "/dev/shm", "capacity_bytes": 1048576, "retry_ms": 250}},
    "config_file": {"name": "files", "source": "file:///etc/dynup/api.json", "policy": "maglev",
                    "watch": {"poll_ms": 1000}},
    "config_etcd": {"name": "e", "source": "etcd://127.0.0.1:2379/upstreams/api/", "policy": "ewma"},
    "config_push": {"name": "p", "source": "push://", "policy": "random"},
    "config_token": {"name": "t", "source": "consul://h:8500/health/api?token=SECRET-cfg-71c3&bogus=1"},
}
for name, doc in configs.items():
    write("peers", name, b"\x01" + json.dumps(doc).encode())

health_docs = {
    "health_every_key": """{
    "active": {"type": "http", "path": "/healthz", "host_header": "api.internal",
               "expected_statuses": [200, "300-399"], "timeout_ms": 500, "interval_ms": 2000,
               "healthy_threshold": 1, "unhealthy_threshold": 4, "max_concurrent": 2},
    "passive": {"max_fails": 3, "fail_timeout_ms": 5000, "fail_statuses": [502, 503]},
    "outlier": {"consecutive_5xx": 7, "consecutive_gateway_failure": 0, "base_ejection_ms": 1000,
                "max_ejection_ms": 60000, "max_ejection_percent": 25.5},
    "panic": {"threshold_percent": 30, "mode": "fail"},
    "slow_start": {"window_ms": 60000, "aggression": 1.5, "min_weight_percent": 5}}""",
    "health_errors": '{"active": {"type": "http", "path": "/x HTTP/1.1\\r\\nX-Evil: 1"}, '
                     '"outlier": {"base_ejection_ms": -5}, "panic": {"mode": "none"}}',
    "health_tcp": '{"active": {"type": "tcp"}}',
}
for name, doc in health_docs.items():
    write("peers", name, b"\x02" + doc.encode())

# ---- snapshot: selector % 2 = 0 the file as is, 1 payload only (the harness adds the header)
payload = json.dumps({
    "version": 3, "index": 42,
    "peers": [{"id": "api-1", "host": "10.0.0.1", "port": 8080, "weight": 5, "backup": True, "zone": "eu-1a",
               "tags": ["canary", "v2"], "meta": {"build": "1.4"}, "health": "warning"},
              {"id": "[2001:db8::1]:443", "host": "2001:db8::1", "port": 443, "weight": 65535, "backup": False,
               "zone": "", "tags": [], "meta": {}, "health": "critical"}],
    "saved_at": "2023-11-14T22:13:20.123Z", "saved_at_ms": 1700000000123}, separators=(",", ":")).encode()


def snapshot_file(p):
    return b"dynup-snapshot 1 %d %08x\n" % (len(p), crc32c(p)) + p


write("snapshot", "file_rich", b"\x00" + snapshot_file(payload))
empty = b'{"version":0,"index":0,"peers":[],"saved_at":"1970-01-01T00:00:00.000Z","saved_at_ms":0}'
write("snapshot", "file_empty_set", b"\x00" + snapshot_file(empty))
write("snapshot", "file_truncated", b"\x00" + snapshot_file(payload)[:-7])
write("snapshot", "file_format_2", b"\x00" + snapshot_file(payload).replace(b"snapshot 1 ", b"snapshot 2 ", 1))
write("snapshot", "payload_rich", b"\x01" + payload)
write("snapshot", "payload_bare_array", b"\x01" + b'["10.0.0.1:80"]')

# ---- spec: the spec text itself
specs = [
    "file:///etc/dynup/api.json", "file://peers/api.json", "file:///srv/my%20peers/a%2Bb.json", "file:///tmp/a?b",
    "consul://127.0.0.1:8501/health/api?dc=dc1&passing=1",
    "consul://host:8500/health/api?tag=a&dc=x&tag=b",
    "consul://h/health/api?tag=v%202&my%5Fkey=a%26b&empty=&flag",
    "consul://h:8500/kv/up%20streams/api", "consul://consul.service/catalog/api",
    "consul://[::1]:8500/health/api", "consul://[::1]:8501/catalog/api?near=_agent&tag=b&stale&tag=a&token=t",
    "consul://h:8500/health/my%20svc?tag=v2&tag=a%26b&dc=dc%2F1&near=_agent&filter=Service.Meta.x%20%3D%3D%20y",
    "consul://h/kv/upstreams/api/?consistent=1",
    "consul://127.0.0.1:8500/health/api?dc=dc1&token=SECRET-s3cr3t-70k3n",
    "consul://h:99999/health/api?token=SECRET-s3cr3t-70k3n",
    "consul://h/health/api?token=SECRET-s3cr3t-70k3n&bogus=1",
    "consul://h/kv/upstreams/api?token_env=DYNUP_FUZZ_TOKEN",
    "consul://h/health/api?passing=0&zone_meta=rack&stale",
    "etcd://etcd.local/upstreams/api/", "etcd://10.0.0.1:2380", "etcd://[2001:db8::1]/p/",
    "etcd://127.0.0.1:2379/upstreams/api.json?layout=document", "etcd://[::1]:/prefix/",
    "push://", "push://somewhere", "zookeeper://h/x?token=SECRET-s3cr3t-70k3n",
]
for i, s in enumerate(specs):
    write("spec", "spec_%02d" % i, s)

# ---- regressions: inputs the targets found, minimized (tests/unit/fuzz_regression_test.cpp)
consul("regression-token-in-parse-error", HEALTH, '{"Error":"ACL not found for token SECRET-70k3n-4d2a',
       token="-70k3n-4d2a")
non_utf8 = ('{"header":{"revision":"3"},"kvs":['
            + ",".join('{"key":"%s","value":"%s","mod_revision":"2"}'
                       % (base64.b64encode(b"/u/a/" + k).decode(), b64(v))
                       for k, v in [(b"\xff", "10.0.0.1:80"), (b"\xfe", "10.0.0.2:80"),
                                    (b"\xfd", '{"id":"explicit","host":"10.0.0.3","port":80}')])
            + "]}")
write("etcd", "regression-non-utf8-key-id", b"\x01" + non_utf8.encode())
write("snapshot", "regression-saved-at-ms-range",
      b"\x01" + b'{"version":1,"index":2,"peers":["10.0.0.1:80"],"saved_at":"x","saved_at_ms":17000000000123}')
write("spec", "regression-host-colon", "consul://x]:1:8500/health/api")
write("spec", "regression-etcd-token-in-parse-error", "etcd://h:99999/u/?token=SECRET-70k3n-4d2a")
write("spec", "regression-scheme-quotes-token", "consul//h/health/api?token=SECRET-70k3n-4d2a&near=a:b")
