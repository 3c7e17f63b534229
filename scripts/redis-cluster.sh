#!/usr/bin/env bash
# A private Redis Cluster on loopback for tests and drills: 3 masters and 3
# replicas (`redis-server --cluster-enabled yes`, `redis-cli --cluster
# create`), ports BASE..BASE+5 (cluster bus: +10000), data under DIR.
#
#   scripts/redis-cluster.sh start DIR BASE   prints the seed URLs, comma-separated
#                                             (BASE auto: the first free one from 21000)
#   scripts/redis-cluster.sh stop DIR         stops every node, deletes DIR
#
# Node timeout 1 s (NODE_TIMEOUT_MS) so a killed master fails over within a
# few seconds; `cluster-require-full-coverage no` so the other masters keep
# serving meanwhile.
set -euo pipefail
cmd=${1:?start|stop}
dir=${2:?DIR}

case $cmd in
start)
  base=${3:?BASE}
  if [ "$base" = auto ]; then
    in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
    for base in $(seq 21000 10 29990); do
      free=1
      for i in 0 1 2 3 4 5; do
        if in_use $((base + i)) || in_use $((base + i + 10000)); then free=0; break; fi
      done
      [ "$free" = 1 ] && break
    done
  fi
  mkdir -p "$dir"
  nodes=()
  for i in 0 1 2 3 4 5; do
    port=$((base + i))
    mkdir -p "$dir/$port"
    redis-server --port "$port" --bind 127.0.0.1 --protected-mode no \
      --cluster-enabled yes --cluster-config-file "$dir/$port/nodes.conf" \
      --cluster-node-timeout "${NODE_TIMEOUT_MS:-1000}" --cluster-require-full-coverage no \
      --save '' --appendonly no --dir "$dir/$port" \
      --daemonize yes --pidfile "$dir/$port/redis.pid" --logfile "$dir/$port/redis.log"
    nodes+=("127.0.0.1:$port")
  done
  for node in "${nodes[@]}"; do
    for _ in $(seq 100); do
      redis-cli -p "${node#*:}" PING >/dev/null 2>&1 && break
      sleep 0.05
    done
  done
  redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes >"$dir/create.log" 2>&1 \
    || { cat "$dir/create.log" >&2; exit 1; }
  # Ready: every node agrees the cluster is ok and every master has its
  # replica online (a failover needs one).
  for _ in $(seq 300); do
    ok=1
    for node in "${nodes[@]}"; do
      redis-cli -p "${node#*:}" CLUSTER INFO 2>/dev/null | grep -q 'cluster_state:ok' || ok=0
    done
    online=$(for node in "${nodes[@]}"; do redis-cli -p "${node#*:}" INFO replication 2>/dev/null; done | grep -c 'state=online' || true)
    [ "$ok" = 1 ] && [ "$online" -ge 3 ] && break
    sleep 0.1
  done
  [ "$ok" = 1 ] && [ "$online" -ge 3 ] || { echo "redis cluster in $dir did not become ready" >&2; exit 1; }
  (IFS=,; echo "${nodes[*]/#/redis://}")
  ;;
stop)
  for pidfile in "$dir"/*/redis.pid; do
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  for pidfile in "$dir"/*/redis.pid; do
    for _ in $(seq 50); do [ -f "$pidfile" ] || break; sleep 0.05; done
  done
  rm -rf "$dir"
  ;;
*) echo "usage: $0 start DIR BASE | stop DIR" >&2; exit 2 ;;
esac
