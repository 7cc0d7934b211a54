// dynup — dynamic upstreams without reloads. The umbrella header: includes every
// public header. Include single headers instead to keep compile times down.
#pragma once

#include <dynup/version.hpp>
#include <dynup/result.hpp>
#include <dynup/peer.hpp>
#include <dynup/peer_set.hpp>
#include <dynup/peer_json.hpp>
#include <dynup/publisher.hpp>
#include <dynup/snapshot_file.hpp>
#include <dynup/leader_lock.hpp>
#include <dynup/shared_snapshot.hpp>
#include <dynup/source/spec.hpp>
#include <dynup/source/file.hpp>
#include <dynup/source/consul.hpp>
#include <dynup/source/etcd.hpp>
#include <dynup/source/consul_cluster.hpp>
#include <dynup/watch/status.hpp>
#include <dynup/watch/guard.hpp>
#include <dynup/watch/backoff.hpp>
#include <dynup/runtime/runtime.hpp>
#include <dynup/runtime/http.hpp>
#include <dynup/watch/core.hpp>
#include <dynup/watch/file_watcher.hpp>
#include <dynup/watch/registry_watcher.hpp>
#include <dynup/watch/consul_watch.hpp>
#include <dynup/watch/etcd_watch.hpp>
#include <dynup/watch/any.hpp>
#include <dynup/health/view.hpp>
#include <dynup/balance/policy.hpp>
#include <dynup/health/clock.hpp>
#include <dynup/health/options.hpp>
#include <dynup/health/tracker.hpp>
#include <dynup/health/active.hpp>
#include <dynup/upstream_config.hpp>
#include <dynup/upstream.hpp>
