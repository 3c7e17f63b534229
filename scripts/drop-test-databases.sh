#!/usr/bin/env bash
# Drops per-test databases (ugc_t_*) that earlier, interrupted test runs left
# behind. Only those nobody is connected to: a test run going on at the same
# time on this shared server keeps its databases (tests drop their own).
set -euo pipefail
url=${PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
for db in $(psql "$url" -Atc "SELECT d.datname FROM pg_database d WHERE d.datname LIKE 'ugc\_t\_%'
                              AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.datname = d.datname)"); do
  psql "$url" -qc "DROP DATABASE IF EXISTS \"$db\"" >/dev/null 2>&1 || true
done
