#!/usr/bin/env bash
# Drops the per-test databases (ugc_t_*) that earlier test runs left behind.
set -euo pipefail
url=${PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
for db in $(psql "$url" -Atc "SELECT datname FROM pg_database WHERE datname LIKE 'ugc\_t\_%'"); do
  psql "$url" -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null
done
