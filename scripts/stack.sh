#!/usr/bin/env bash
# The docker-compose topology from native processes on this machine:
# Postgres (the machine's, its own database), a Redis of its own (so that
# an outage drill never touches the machine's), two ugc-subgraph instances
# of one deployment, the offers subgraph, the Apollo gateway in front of
# both instances, and a real Prometheus (Debian's) scraping both.
#
#   scripts/stack.sh up     start everything in the background, print the URLs
#   scripts/stack.sh down   stop everything started by `up`
#   scripts/stack.sh run    up, then wait; Ctrl-C stops it all (make stack)
#   scripts/stack.sh check  up, traffic through the gateway, Prometheus must
#                           have scraped both instances, down (make stack-check)
#   scripts/stack.sh redis-outage SECONDS
#                           stop the stack's Redis a third into SECONDS, start
#                           it again at two thirds (the redis_outage k6 run)
#
# BIN (default target/release/ugc-subgraph) is the binary to run; state and
# logs live in .stack/. Ports: gateway 4000, instances 4001 and 4011, offers
# 4002, Redis 6380 (STACK_REDIS_PORT), Prometheus 9090 (STACK_PROMETHEUS_PORT).
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-target/release/ugc-subgraph}
DIR=.stack
DB_URL=${STACK_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/ugc_stack}
REDIS_PORT=${STACK_REDIS_PORT:-6380}
REDIS=redis://127.0.0.1:$REDIS_PORT
PROM_PORT=${STACK_PROMETHEUS_PORT:-9090}
SECRET=${UGC_JWT_SECRET:-dev-only-secret-change-me-0123456789}
PORTS=(4001 4011)

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_http() { # url, seconds
  for _ in $(seq 1 $(( $2 * 4 ))); do curl -fsS -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.25; done
  echo "stack: $1 did not answer within $2 s (logs in $DIR/)" >&2; return 1
}
start() { # name, command...
  local name=$1; shift
  nohup "$@" >"$DIR/$name.log" 2>&1 &
  echo $! >"$DIR/$name.pid"
}

up() {
  mkdir -p "$DIR"
  for port in 4000 4002 "${PORTS[@]}" "$PROM_PORT" "$REDIS_PORT"; do
    if port_open "$port"; then echo "stack: port $port is taken (scripts/stack.sh down?)" >&2; exit 1; fi
  done
  command -v prometheus >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus; }
  scripts/ensure-services.sh
  redis_start
  local admin=${DB_URL%/*}/postgres name=${DB_URL##*/}
  psql "$admin" -Atc "SELECT 1 FROM pg_database WHERE datname = '$name'" | grep -q 1 || psql "$admin" -qc "CREATE DATABASE \"$name\""
  DATABASE_URL=$DB_URL "$BIN" migrate >/dev/null
  if [ "$(psql "$DB_URL" -Atc 'SELECT count(*) FROM reviews')" = "0" ]; then
    DATABASE_URL=$DB_URL "$BIN" seed --offers 1000 --users 5000 --reviews 50000 --seed 42
  fi
  local i=0
  for port in "${PORTS[@]}"; do
    i=$((i + 1))
    start "ugc-$i" env DATABASE_URL="$DB_URL" REDIS_URL="$REDIS" UGC_CACHE_PREFIX=ugc_stack \
      UGC_LISTEN="127.0.0.1:$port" UGC_JWT_SECRET="$SECRET" UGC_TRUSTED_PROXIES=127.0.0.1 \
      UGC_ROUTER_CACHE_TAGS=on UGC_LOG_FORMAT=json UGC_SHUTDOWN_DRAIN_MS="${UGC_SHUTDOWN_DRAIN_MS:-500}" "$BIN" serve
  done
  for port in "${PORTS[@]}"; do wait_http "http://127.0.0.1:$port/health/ready" 30; done
  start offers env OFFERS_PORT=4002 node gateway/offers.mjs
  wait_http "http://127.0.0.1:4002/.well-known/apollo/server-health" 30 || true
  start gateway env GATEWAY_PORT=4000 OFFERS_URL=http://127.0.0.1:4002/graphql \
    UGC_URL="http://127.0.0.1:4001/graphql,http://127.0.0.1:4011/graphql" node gateway/gateway.mjs
  for _ in $(seq 1 120); do port_open 4000 && break; sleep 0.25; done
  sed -e 's/"ugc-1:4001", "ugc-2:4001"/"127.0.0.1:4001", "127.0.0.1:4011"/' -e 's/scrape_interval: 5s/scrape_interval: 1s/' \
    deploy/prometheus.yml >"$DIR/prometheus.yml"
  cp deploy/alerts.yml "$DIR/alerts.yml"
  start prometheus prometheus --config.file="$DIR/prometheus.yml" --storage.tsdb.path="$DIR/prometheus-data" \
    --web.listen-address="127.0.0.1:$PROM_PORT"
  wait_http "http://127.0.0.1:$PROM_PORT/-/ready" 30
  cat <<INFO
stack up:
  gateway     http://127.0.0.1:4000/
  ugc-1/2     http://127.0.0.1:4001/graphql  http://127.0.0.1:4011/graphql
  offers      http://127.0.0.1:4002/graphql
  redis       redis://127.0.0.1:$REDIS_PORT (the stack's own)
  prometheus  http://127.0.0.1:$PROM_PORT/   (alerts: /alerts)
  logs        $DIR/*.log
INFO
}

redis_start() {
  start redis redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no
  for _ in $(seq 1 40); do port_open "$REDIS_PORT" && return 0; sleep 0.25; done
  echo "stack: redis did not start on $REDIS_PORT" >&2; return 1
}

redis_outage() { # seconds
  local third=$(( $1 / 3 ))
  sleep "$third"
  echo "stack: stopping Redis ($REDIS_PORT) for ${third}s"
  kill "$(cat "$DIR/redis.pid")"
  sleep "$third"
  redis_start
  echo "stack: Redis is back"
}

down() {
  [ -d "$DIR" ] || return 0
  for pidfile in "$DIR"/*.pid; do
    [ -e "$pidfile" ] || continue
    kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  for pidfile in "$DIR"/*.pid; do
    [ -e "$pidfile" ] || continue
    local pid; pid=$(cat "$pidfile")
    # SIGTERM drains (ugc-subgraph waits UGC_SHUTDOWN_DRAIN_MS); then SIGKILL.
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    rm -f "$pidfile"
  done
  echo "stack: stopped"
}

# One federated query through the gateway; prints the offer's review count.
query() {
  curl -fsS http://127.0.0.1:4000/ -H 'content-type: application/json' \
    -d '{"query":"{ offers(first: 5) { id title rating { count average } reviews(first: 3) { edges { node { id rating author { id name } } } } } }"}'
}

check() {
  trap down EXIT
  up
  local body
  for _ in $(seq 1 20); do body=$(query); done
  echo "$body" | python3 -c 'import json,sys; b=json.load(sys.stdin); assert not b.get("errors"), b; o=b["data"]["offers"]; assert len(o)==5 and o[0]["rating"]["count"]>0, b; print("gateway: ok,", o[0]["id"], "has", o[0]["rating"]["count"], "reviews")'
  # Prometheus must have scraped both instances, and seen the traffic the
  # gateway spread over them.
  local ok=""
  for _ in $(seq 1 40); do
    if curl -fsS "http://127.0.0.1:$PROM_PORT/api/v1/query" --data-urlencode \
        'query=sum by (instance) (ugc_http_responses_total{route="/graphql"})' |
      python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; got={x["metric"]["instance"]: float(x["value"][1]) for x in r}; print("prometheus:", got); sys.exit(0 if len(got)==2 and all(v>0 for v in got.values()) else 1)'; then
      ok=1; break
    fi
    sleep 0.5
  done
  [ -n "$ok" ] || { echo "stack: Prometheus did not scrape both instances with traffic" >&2; exit 1; }
  curl -fsS "http://127.0.0.1:$PROM_PORT/api/v1/query" --data-urlencode 'query=up{job="ugc-subgraph"}' |
    python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; assert len(r)==2 and all(x["value"][1]=="1" for x in r), r; print("prometheus: both targets up")'
  echo "stack-check: ok"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  run) trap down EXIT INT TERM; up; echo "Ctrl-C stops the stack"; while true; do sleep 3600; done ;;
  check) check ;;
  redis-outage) redis_outage "${2:-30}" ;;
  *) echo "usage: scripts/stack.sh up|down|run|check" >&2; exit 2 ;;
esac
