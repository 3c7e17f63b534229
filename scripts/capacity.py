#!/usr/bin/env python3
"""Capacity measurements behind docs/SCALING.md (`make capacity`, ~4 min):
per request, the CPU of the service, of Redis and of Postgres, the Redis
round trips and SQL statements, at each cache state; per write the same;
then 1, 2 and 3 instances under the same total load. Uses `make bench`'s
data (`ugc_bench`: 10,000 offers, 1,000,000 reviews) and its load (wrk, the
gateway's `_entities` fetch for 20 Zipf-drawn offers, 1,000 clients).
Redis and Postgres are the machine's: their CPU is read from /proc for the
processes listening on 6379 and 5432 (and Postgres's backends).
"""
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

SECONDS = int(os.environ.get("CAPACITY_SECONDS", "10"))


def pids(name):
    out = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def cpu(names):
    """CPU seconds so far of every process with one of these names."""
    total = 0.0
    for name in names:
        for pid in pids(name):
            try:
                total += bench.cpu_seconds(pid)
            except (FileNotFoundError, ProcessLookupError):
                pass
    return total


def postgres_cpu():
    # Backends exit and are replaced; the pools keep theirs for the run.
    return cpu(["postgres"])


def redis_cpu():
    return cpu(["redis-server"])


STATES = [
    ("entity fragments (warm)", {}),
    ("L1 data, GraphQL executed", {"UGC_ENTITY_CACHE": "off"}),
    ("L2 (L1 of 1 MiB)", {"UGC_ENTITY_CACHE": "off", "UGC_L1_MAX_BYTES": "1048576"}),
    ("Postgres (UGC_CACHE=off)", {"UGC_CACHE": "off"}),
]


def read_state(label, env, port):
    inst = bench.Instance(port, f"cap-{port}-{int(time.time())}", **bench.PROTECTION["on"], **env)
    try:
        bench.wrk(port, 5)
        before, pg0, rd0 = bench.scrape(port), postgres_cpu(), redis_cpu()
        r = bench.measured(inst, SECONDS)
        after, pg1, rd1 = bench.scrape(port), postgres_cpu(), redis_cpu()
    finally:
        inst.stop()
    n = max(r["requests"], 1)
    return {"label": label, "rps": r["rps"], "p99_ms": r["p99_ms"], "cpu_us": r["cpu_us_per_req"],
            "redis_calls": bench.delta(before, after, "ugc_redis_calls_total") / n,
            "sql": bench.delta(before, after, "ugc_sql_statements_total") / n,
            "pg_us": (pg1 - pg0) * 1e6 / n, "redis_us": (rd1 - rd0) * 1e6 / n}


def writes(port, per_sec=200):
    inst = bench.Instance(port, f"cap-w-{int(time.time())}", **bench.PROTECTION["on"])
    summary = os.path.join(tempfile.gettempdir(), f"ugc-cap-w-{os.getpid()}.json")
    try:
        before, pg0, rd0, c0 = bench.scrape(port), postgres_cpu(), redis_cpu(), bench.cpu_seconds(inst.proc.pid)
        subprocess.run([bench.K6, "run", "--quiet", f"--summary-export={summary}", "-e", f"URL={inst.url}",
                        "-e", f"SECRET={bench.SECRET}", "-e", f"RATE={per_sec}", "-e", f"DURATION={SECONDS}s",
                        "-e", f"RUN=cap-{int(time.time())}", os.path.join(bench.ROOT, "k6", "write_rate.js")],
                       capture_output=True, text=True)
        time.sleep(1)  # the relay's last passes
        after, pg1, rd1, c1 = bench.scrape(port), postgres_cpu(), redis_cpu(), bench.cpu_seconds(inst.proc.pid)
        with open(summary) as f:
            m = json.load(f)["metrics"]
    finally:
        inst.stop()
        if os.path.exists(summary):
            os.remove(summary)
    n = max(m["iterations"]["count"], 1)
    return {"writes": n, "per_sec": n / SECONDS, "p50_ms": m["http_req_duration"]["p(50)"],
            "p99_ms": m["http_req_duration"]["p(99)"], "cpu_us": (c1 - c0) * 1e6 / n,
            "redis_calls": bench.delta(before, after, "ugc_redis_calls_total") / n,
            "sql": bench.delta(before, after, "ugc_sql_statements_total") / n,
            "pg_us": (pg1 - pg0) * 1e6 / n, "redis_us": (rd1 - rd0) * 1e6 / n}


def scale(count):
    """`count` instances of one deployment, the same 16 connections spread
    over them (one wrk each), entity cache on."""
    prefix = f"cap-scale-{count}-{int(time.time())}"
    insts = [bench.Instance(4181 + i, prefix, **bench.PROTECTION["on"]) for i in range(count)]
    try:
        for i in insts:
            bench.wrk(i.port, 3)
        results, cpu0 = [None] * count, [bench.cpu_seconds(i.proc.pid) for i in insts]
        pg0, rd0 = postgres_cpu(), redis_cpu()

        def run(k):
            results[k] = bench.wrk(insts[k].port, SECONDS, connections=16 // count)

        threads = [threading.Thread(target=run, args=(k,)) for k in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        cpu1 = [bench.cpu_seconds(i.proc.pid) for i in insts]
        pg1, rd1 = postgres_cpu(), redis_cpu()
    finally:
        for i in insts:
            i.stop()
    n = sum(r["requests"] for r in results)
    return {"instances": count, "rps": sum(r["rps"] for r in results), "p99_ms": max(r["p99_ms"] for r in results),
            "cpu_us": (sum(cpu1) - sum(cpu0)) * 1e6 / max(n, 1), "pg_us": (pg1 - pg0) * 1e6 / max(n, 1),
            "redis_us": (rd1 - rd0) * 1e6 / max(n, 1)}


def main():
    if not os.path.exists(bench.BIN):
        raise SystemExit("build first: cargo build --release")
    bench.prepare(bench.BIN, "ugc_bench")
    print(f"Reads: wrk -t1 -c16 -d{SECONDS}s, _entities for 20 Zipf-drawn offers, 1,000 clients, one instance\n")
    print("| cache state | req/s | p99 ms | service CPU µs/req | Redis calls/req | Redis CPU µs/req | SQL/req | Postgres CPU µs/req |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for k, (label, env) in enumerate(STATES):
        r = read_state(label, env, 4175 + k)
        print(f"| {r['label']} | {r['rps']:,.0f} | {r['p99_ms']:.2f} | {r['cpu_us']:.1f} | {r['redis_calls']:.3f} | "
              f"{r['redis_us']:.1f} | {r['sql']:.3f} | {r['pg_us']:.1f} |", flush=True)
    w = writes(4179)
    print(f"\nWrites: k6 createReview at 200/s for {SECONDS} s on Zipf-drawn offers, one instance: {w['writes']} writes "
          f"({w['per_sec']:.0f}/s), p50 {w['p50_ms']:.1f} / p99 {w['p99_ms']:.1f} ms; per write: service CPU "
          f"{w['cpu_us']:.0f} µs, {w['redis_calls']:.1f} Redis calls ({w['redis_us']:.0f} µs Redis CPU), "
          f"{w['sql']:.1f} SQL statements ({w['pg_us']:.0f} µs Postgres CPU); includes the relay and visibility work")
    print(f"\nInstances (one deployment, 16 connections spread over them, entity cache on, {SECONDS} s):\n")
    print("| instances | total req/s | worst p99 ms | service CPU µs/req | Redis CPU µs/req | Postgres CPU µs/req |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for count in (1, 2, 3):
        s = scale(count)
        print(f"| {s['instances']} | {s['rps']:,.0f} | {s['p99_ms']:.2f} | {s['cpu_us']:.1f} | {s['redis_us']:.1f} | "
              f"{s['pg_us']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
