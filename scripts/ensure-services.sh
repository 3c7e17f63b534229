#!/usr/bin/env bash
# Makes sure Postgres (127.0.0.1:5432, user postgres, trust auth on loopback)
# and Redis (127.0.0.1:6379) answer. Starts a stopped one; installs it from
# Debian packages when absent. Idempotent; prints one line per service.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {
  for _ in $(seq 1 60); do port_open "$1" && return 0; sleep 0.5; done
  echo "ensure-services: nothing answers on 127.0.0.1:$1 after 30 s" >&2; return 1
}
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_install() {
  as_root apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

ensure_postgres() {
  if port_open 5432; then echo "postgres: up"; return; fi
  if ! command -v pg_ctlcluster >/dev/null; then
    echo "postgres: installing from Debian packages"
    apt_install postgresql postgresql-client
  fi
  local ver; ver=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -1)
  if [ -z "$ver" ]; then
    ver=$(ls /usr/lib/postgresql | sort -V | tail -1)
    as_root pg_createcluster "$ver" main >/dev/null
  fi
  local hba="/etc/postgresql/$ver/main/pg_hba.conf"
  # Local development and CI only: trust loopback, as the project assumes.
  if ! grep -q "ugc-subgraph: trust loopback" "$hba"; then
    as_root sed -i "1i # ugc-subgraph: trust loopback\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust" "$hba"
  fi
  as_root sed -i "s/^#\?listen_addresses.*/listen_addresses = 'localhost'/" "/etc/postgresql/$ver/main/postgresql.conf"
  as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
  wait_port 5432
  echo "postgres: started ($ver)"
}

ensure_redis() {
  if port_open 6379; then echo "redis: up"; return; fi
  if ! command -v redis-server >/dev/null; then
    echo "redis: installing from Debian packages"
    apt_install redis-server
  fi
  mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_port 6379
  echo "redis: started"
}

ensure_postgres
[ "${NO_REDIS:-0}" = 1 ] || ensure_redis
