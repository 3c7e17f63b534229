#!/usr/bin/env python3
"""ugc-subgraph benchmark (`make bench`): real Postgres, real Redis, release build.

1. Seeds `ugc_bench` (10,000 offers, 1,000,000 reviews, Zipf) unless already seeded.
2. Throughput, cache on vs `UGC_CACHE=off`, and protection on vs off, in one
   run: wrk (1 thread, 16 connections; far cheaper than k6 on 2 cores) POSTs
   the gateway's `_entities` query for 20 Zipf-drawn offers straight at one
   instance, as 1,000 clients behind a trusted proxy (X-Forwarded-For).
   "Protection on" is the production stack with per-client read quotas of
   1,000/s shared through Redis; "off" is `UGC_RATE_LIMIT=off` and no
   concurrency limit. Prints requests/s, p50/p95/p99, hit rate per layer,
   SQL statements per request, and the ratios.
   Protection on/off again as 3 alternating pairs of 8 s (the ratio from
   one pair is at the mercy of this shared machine's noise). Then the rate
   limiter's accuracy: one client spread over two instances, far above a
   200/s quota for 10 s; admitted against the single budget.
   Then overload: 16 → 512 → 16 connections against a concurrency limit of
   32, cache on and off: shed requests, admitted latency, recovery.
3. Warm restart: restarts the instance (same Redis key prefix) under the same
   load and reports the seconds until the L1 hit rate is back at 80 %, with
   the hot-key warm-up and, for comparison, without it (fresh prefix).
4. Invalidation lag: 3 instances; k6 writes at a steady rate on A while
   reading on B and C; commit → L1 eviction p50/p99 from B's and C's
   histograms.
5. Tracing cost: the cached read path with OpenTelemetry on (default
   sampling, exporting to an OTLP receiver run by this script) and off, in
   alternating pairs.
6. Reads beside writes: the same cached read load alone, then while k6
   sends 100 createReview/s on Zipf-drawn offers (entity cache on).
7. Fetch shapes: the gateway fetch with a literal and with a variable for
   `reviews(first:)`, both from rendered fragments.
BENCH_ONLY=tracing,mixed (any of baseline, throughput, protection, limiter,
overload, restart, lag, tracing, mixed, shapes, fastpath) runs only those parts.
8. Fast path: a prepared-bytes axum server (the HTTP limit; the
   `prepared_bytes` example) next to fragments on, with a variable, under
   100 writes/s, fragments off and cache off, with CPU per request.
Every loop is bounded; all traffic goes to 127.0.0.1.
"""
import http.server
import json
import os
import threading
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "ugc-subgraph")
PG = os.environ.get("BENCH_PG", "postgres://postgres@127.0.0.1:5432")
DB_URL = f"{PG}/ugc_bench"
# Optional: another build of the service (e.g. the last release) measured in
# the same run, on its own database with the same seeded data.
BASELINE_BIN = os.environ.get("BENCH_BASELINE_BIN")
BASELINE_DB_URL = f"{PG}/ugc_bench_baseline"
REDIS = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
SECRET = "bench-secret-0123456789abcdef"
DURATION = int(os.environ.get("BENCH_SECONDS", "20"))
OFFERS, USERS, REVIEWS = 10_000, 200_000, 1_000_000
K6 = os.path.join(ROOT, ".venv", "bin", "k6")
ONLY = set(filter(None, os.environ.get("BENCH_ONLY", "").split(",")))


def want(part):
    return not ONLY or part in ONLY


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw).stdout


def psql(sql, db="ugc_bench"):
    return sh("psql", f"{PG}/{db}", "-Atc", sql).strip()


def scrape(port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        try:
            out[name] = float(value)
        except ValueError:
            pass
    return out


def total(snapshot, prefix, *labels):
    return sum(v for k, v in snapshot.items() if k.startswith(prefix) and all(l in k for l in labels))


def delta(before, after, prefix, *labels):
    return total(after, prefix, *labels) - total(before, prefix, *labels)


# The load generators are one client on 127.0.0.1: quotas it never reaches,
# unless a measurement sets its own (protection, limiter accuracy).
UNLIMITED = {f"UGC_RATE_LIMIT_{q}_{p}": "10000000" for q in ("READ", "WRITE", "USER_WRITE") for p in ("PER_SEC", "BURST")}


class Instance:
    def __init__(self, port, prefix, binary=None, db_url=None, **env):
        self.port = port
        full = dict(os.environ, DATABASE_URL=db_url or DB_URL, REDIS_URL=REDIS, UGC_LISTEN=f"127.0.0.1:{port}",
                    UGC_JWT_SECRET=SECRET, UGC_CACHE_PREFIX=prefix, RUST_LOG="warn", UGC_STALE_CHECK_RATE="0",
                    **UNLIMITED)
        full.update(env)
        self.proc = subprocess.Popen([binary or BIN, "serve"], env=full, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=1).status == 200:
                    return
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.1)
        raise SystemExit(f"instance on :{port} did not become ready")

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/graphql"

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)


def wrk(port, seconds, connections=16, variable=False):
    out = sh("wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "-s",
             os.path.join(ROOT, "scripts", "bench", "entities.lua"), f"http://127.0.0.1:{port}",
             env=dict(os.environ, BENCH_OFFERS=str(OFFERS), BENCH_CLIENTS=str(CLIENTS),
                      BENCH_VARIABLE="1" if variable else "0"))
    return json.loads([l for l in out.splitlines() if l.startswith("{")][-1])


def cpu_seconds(pid):
    """User + system CPU of a process so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(inst, seconds, variable=False):
    """A wrk run with the server's CPU per request."""
    c0 = cpu_seconds(inst.proc.pid)
    r = wrk(inst.port, seconds, variable=variable)
    r["cpu_us_per_req"] = (cpu_seconds(inst.proc.pid) - c0) * 1e6 / max(r["requests"], 1)
    return r


def rate(hit, miss):
    return hit / (hit + miss) if hit + miss else 0.0


CLIENTS = 1000
PROTECTION = {
    "on": {"UGC_TRUSTED_PROXIES": "127.0.0.1", "UGC_RATE_LIMIT_READ_PER_SEC": "1000", "UGC_RATE_LIMIT_READ_BURST": "2000"},
    "off": {"UGC_RATE_LIMIT": "off", "UGC_MAX_CONCURRENT_REQUESTS": "100000"},
}


def throughput(mode, port, prefix, protection="on", baseline=False):
    """`baseline`: the binary of BENCH_BASELINE_BIN on its own copy of the data."""
    where = {"binary": BASELINE_BIN, "db_url": BASELINE_DB_URL} if baseline else {}
    inst = Instance(port, prefix, UGC_CACHE=mode, **where, **PROTECTION[protection])
    try:
        wrk(port, 5)  # warm-up: JIT of the pools, caches filled (cache on)
        before = scrape(port)
        result = measured(inst, DURATION)
        after = scrape(port)
    finally:
        inst.stop()
    reqs = max(result["requests"], 1)
    ent = [delta(before, after, "ugc_cache_requests_total", 'layer="entity"', f'result="{r}"') for r in ("hit", "miss")]
    l1 = [delta(before, after, "ugc_cache_requests_total", 'layer="l1"', f'result="{r}"') for r in ("hit", "stale", "miss")]
    l2 = [delta(before, after, "ugc_cache_requests_total", 'layer="l2"', f'result="{r}"') for r in ("hit", "stale", "miss")]
    result.update(
        mode=mode,
        protection=protection,
        rate_limited=delta(before, after, "ugc_rate_limited_total"),
        budget_calls=delta(before, after, "ugc_rate_limit_budget_calls_total") / reqs,
        entity_hit=rate(ent[0], ent[1]),
        l1_hit=rate(l1[0] + l1[1], l1[2]),
        l2_hit=rate(l2[0] + l2[1], l2[2]),
        sql_per_req=delta(before, after, "ugc_sql_statements_total") / reqs,
        db_keys_per_req=delta(before, after, "ugc_cache_requests_total", 'layer="db"') / reqs,
    )
    return result


def recovery(port, prefix, label, warm_first):
    """Seconds until the per-0.5 s L1 hit rate reaches 80 % after a start.

    Runs with the entity cache off: with it on, L1 is only consulted for
    entity misses and its hit rate says little. With `warm_first`, an
    instance first serves the load for 12 s (hot keys are recorded in Redis
    every 5 s) and is stopped; the measured instance then starts on the same
    key prefix and preloads them.
    """
    env = {"UGC_ENTITY_CACHE": "off"}
    lua = os.path.join(ROOT, "scripts", "bench", "entities.lua")
    wrk_env = dict(os.environ, BENCH_OFFERS=str(OFFERS))
    if warm_first:
        first = Instance(port, prefix, **env)
        try:
            subprocess.run(["wrk", "-t1", "-c16", "-d12s", "-s", lua, f"http://127.0.0.1:{port}"],
                           stdout=subprocess.DEVNULL, env=wrk_env, check=True)
        finally:
            first.stop()
    inst = Instance(port, prefix, **env)
    load = subprocess.Popen(["wrk", "-t1", "-c16", "-d30s", "-s", lua, f"http://127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, env=wrk_env)
    reached, prev, t0 = None, scrape(port), time.time()
    try:
        while time.time() - t0 < 28 and reached is None:
            time.sleep(0.5)
            cur = scrape(port)
            hit = delta(prev, cur, "ugc_cache_requests_total", 'layer="l1"', 'result="hit"') + \
                delta(prev, cur, "ugc_cache_requests_total", 'layer="l1"', 'result="stale"')
            miss = delta(prev, cur, "ugc_cache_requests_total", 'layer="l1"', 'result="miss"')
            if hit + miss > 0 and rate(hit, miss) >= 0.8:
                reached = time.time() - t0
            prev = cur
        warmed = total(scrape(port), "ugc_cache_warmup_keys_total")
    finally:
        load.terminate()
        load.wait()
        inst.stop()
    return {"label": label, "seconds_to_80pct": reached, "warmed_keys": warmed}


def histogram_quantile(snapshots, q):
    buckets = {}
    for before, after in snapshots:
        for k, v in after.items():
            m = re.match(r'ugc_invalidation_lag_seconds_bucket\{le="([^"]+)"\}', k)
            if m:
                buckets[m.group(1)] = buckets.get(m.group(1), 0) + v - before.get(k, 0)
    ordered = sorted(((float("inf") if le == "+Inf" else float(le)), n) for le, n in buckets.items())
    count = ordered[-1][1] if ordered else 0
    if count == 0:
        return None, 0
    target, prev_le, prev_n = q * count, 0.0, 0
    for le, n in ordered:
        if n >= target:
            if le == float("inf"):
                return prev_le, count
            frac = (target - prev_n) / (n - prev_n) if n > prev_n else 1
            return prev_le + (le - prev_le) * frac, count
        prev_le, prev_n = le, n
    return None, count


def invalidation_lag(visibility_ms):
    """Writes on A while B and C read; `visibility_ms` is UGC_WRITE_VISIBILITY_TIMEOUT_MS
    (0: mutations do not wait for the other instances' acknowledgements)."""
    prefix = f"bench-lag-{visibility_ms}-{int(time.time())}"
    env = {"UGC_WRITE_VISIBILITY_TIMEOUT_MS": str(visibility_ms)}
    a, b, c = Instance(4111, prefix, **env), Instance(4112, prefix, **env), Instance(4113, prefix, **env)
    summary = os.path.join(tempfile.gettempdir(), f"ugc-bench-lag-{os.getpid()}.json")
    try:
        hot = psql("SELECT string_agg(id::text, ',') FROM (SELECT id FROM reviews WHERE offer_id IN "
                   "('offer-000001','offer-000002','offer-000003') AND status = 'PUBLISHED' AND deleted_at IS NULL "
                   "ORDER BY created_at DESC LIMIT 30) r")
        before = [scrape(b.port), scrape(c.port)]
        a_before = scrape(a.port)
        out = subprocess.run([K6, "run", "--quiet", f"--summary-export={summary}", "-e", f"A={a.url}", "-e", f"B={b.url}", "-e", f"C={c.url}",
                              "-e", f"SECRET={SECRET}", "-e", f"REVIEWS={hot}", "-e", "WRITES_PER_SEC=20",
                              "-e", "LAG_OFFERS=offer-000001,offer-000002,offer-000003", "-e", f"DURATION={DURATION}s",
                              os.path.join(ROOT, "k6", "invalidation_lag.js")], capture_output=True, text=True)
        after = [scrape(b.port), scrape(c.port)]
        a_after = scrape(a.port)
        with open(summary) as f:
            write_ms = json.load(f)["metrics"]["write_ms"]
    finally:
        for inst in (a, b, c):
            inst.stop()
        if os.path.exists(summary):
            os.remove(summary)
    pairs = list(zip(before, after))
    p50, n = histogram_quantile(pairs, 0.50)
    p99, _ = histogram_quantile(pairs, 0.99)
    writes = sum(delta(x, y, "ugc_events_applied_total") for x, y in pairs) / 2
    return {"p50_ms": p50 and p50 * 1000, "p99_ms": p99 and p99 * 1000, "evictions": n, "writes": writes,
            "write_p50_ms": write_ms["p(50)"], "write_p99_ms": write_ms["p(99)"],
            "waits": delta(a_before, a_after, "ugc_write_visibility_wait_seconds_count"),
            "timeouts": delta(a_before, a_after, "ugc_write_visibility_timeouts_total"),
            "k6_ok": out.returncode == 0, "k6_tail": out.stdout[-1500:] + out.stderr[-500:]}


def limiter_accuracy(seconds=10, per_sec=200):
    """One client alternating between two instances (one key prefix), far
    above its quota: how close the admitted count is to the one budget."""
    import http.client
    prefix = f"bench-rl-{int(time.time())}"
    env = {"UGC_RATE_LIMIT_READ_PER_SEC": str(per_sec), "UGC_RATE_LIMIT_READ_BURST": str(per_sec)}
    a, b = Instance(4121, prefix, **env), Instance(4122, prefix, **env)
    body = json.dumps({"query": "{ __typename }"})
    conns = [http.client.HTTPConnection("127.0.0.1", p, timeout=5) for p in (a.port, b.port)]
    counts, sent, t0 = {}, 0, time.time()
    try:
        while time.time() - t0 < seconds and sent < 200_000:
            c = conns[sent % 2]
            c.request("POST", "/graphql", body, {"content-type": "application/json"})
            r = c.getresponse()
            r.read()
            counts[r.status] = counts.get(r.status, 0) + 1
            sent += 1
        elapsed = time.time() - t0
    finally:
        for c in conns:
            c.close()
        a.stop()
        b.stop()
    expected = per_sec + per_sec * elapsed
    ok = counts.get(200, 0)
    return {"sent": sent, "ok": ok, "limited": counts.get(429, 0), "other": sent - ok - counts.get(429, 0),
            "expected": expected, "error": (ok - expected) / expected, "seconds": elapsed, "per_sec": per_sec}


def protection_pairs(pairs=3, seconds=8):
    """Protection on and off alternately (fresh instance each, warmed 4 s):
    one pair of 20 s runs is at the mercy of this shared machine's noise."""
    out = {"on": [], "off": []}
    for i in range(pairs):
        for mode in ("off", "on"):
            inst = Instance(4141, f"bench-ab-{mode}-{i}-{int(time.time())}", **PROTECTION[mode])
            try:
                wrk(4141, 4)
                out[mode].append(measured(inst, seconds))
            finally:
                inst.stop()
    return out


def latency_quantiles(before, after, q, *labels):
    """A quantile of ugc_graphql_request_seconds between two scrapes (server side)."""
    buckets = {}
    for k, v in after.items():
        m = re.match(r'ugc_graphql_request_seconds_bucket\{(.*)\}', k)
        le = m and re.search(r'le="([^"]+)"', m.group(1))
        if le and all(l in m.group(1) for l in labels):
            buckets[le.group(1)] = buckets.get(le.group(1), 0) + v - before.get(k, 0)
    ordered = sorted(((float("inf") if le == "+Inf" else float(le)), n) for le, n in buckets.items())
    count = ordered[-1][1] if ordered else 0
    if not count:
        return None
    target, prev_le, prev_n = q * count, 0.0, 0
    for le, n in ordered:
        if n >= target:
            if le == float("inf"):
                return prev_le * 1000
            frac = (target - prev_n) / (n - prev_n) if n > prev_n else 1
            return (prev_le + (le - prev_le) * frac) * 1000
        prev_le, prev_n = le, n
    return None


def overload(port=4131, cache="on"):
    """The bench load at 16 connections, then a burst at 512 connections
    against UGC_MAX_CONCURRENT_REQUESTS=32, then 16 again: what was shed,
    the admitted requests' server-side latency, and recovery."""
    env = dict(PROTECTION["on"], UGC_MAX_CONCURRENT_REQUESTS="32", UGC_CACHE=cache)
    inst = Instance(port, f"bench-overload-{cache}-{int(time.time())}", **env)
    phases = {}
    try:
        wrk(port, 5)
        for name, conns in (("before", 16), ("burst", 512), ("after", 16)):
            s0 = scrape(port)
            r = wrk(port, 8, conns)
            s1 = scrape(port)
            r["shed"] = delta(s0, s1, "ugc_load_shed_total")
            r["server_p50_ms"] = latency_quantiles(s0, s1, 0.5, 'outcome="ok"')
            r["server_p99_ms"] = latency_quantiles(s0, s1, 0.99, 'outcome="ok"')
            phases[name] = r
    finally:
        inst.stop()
    return phases


def prepare(binary, db):
    if psql(f"SELECT 1 FROM pg_database WHERE datname = '{db}'", db="postgres") != "1":
        psql(f"CREATE DATABASE {db}", db="postgres")
    url = f"{PG}/{db}"
    sh(binary, "migrate", env=dict(os.environ, DATABASE_URL=url))
    if psql("SELECT count(*) FROM reviews", db=db) != str(REVIEWS):
        print(sh(binary, "seed", "--offers", str(OFFERS), "--users", str(USERS), "--reviews", str(REVIEWS), "--seed", "42",
                 env=dict(os.environ, DATABASE_URL=url, RUST_LOG="error")).strip())


def baseline_vs_current(run, pairs=2):
    """Cache on, protection on: the baseline build and this one, alternating."""
    prepare(BASELINE_BIN, "ugc_bench_baseline")
    runs = {"baseline": [], "current": []}
    for n in range(pairs):
        runs["baseline"].append(throughput("on", 4141, f"bench-base-{run}-{n}", baseline=True))
        runs["current"].append(throughput("on", 4142, f"bench-cur-{run}-{n}"))
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    b, c = mean(runs["baseline"], "rps"), mean(runs["current"], "rps")
    print(f"\nBaseline ({BASELINE_BIN}) vs this build, cache on, protection on, {pairs} alternating pairs of "
          f"{DURATION} s: {b:,.0f} vs {c:,.0f} req/s ({c / b:.1%}); p99 {mean(runs['baseline'], 'p99_ms'):.2f} vs "
          f"{mean(runs['current'], 'p99_ms'):.2f} ms; runs baseline {[round(r['rps']) for r in runs['baseline']]}, "
          f"current {[round(r['rps']) for r in runs['current']]}")


class OtlpReceiver(http.server.BaseHTTPRequestHandler):
    """Accepts OTLP/HTTP exports and discards them, counting bytes."""
    received = {"requests": 0, "bytes": 0}

    def do_POST(self):  # noqa: N802 - http.server's name
        n = int(self.headers.get("content-length", 0))
        self.rfile.read(n)
        OtlpReceiver.received["requests"] += 1
        OtlpReceiver.received["bytes"] += n
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *_):
        pass


def tracing_cost(pairs=3, seconds=10):
    """Cache on, protection on: traces off, and on with the default sampling
    (parentbased_traceidratio 0.1; wrk sends no traceparent), alternately."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 4151), OtlpReceiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out = {"off": [], "on": []}
    try:
        for i in range(pairs):
            for mode in ("off", "on"):
                env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4151", "OTEL_BSP_SCHEDULE_DELAY": "1000"} \
                    if mode == "on" else {}
                inst = Instance(4152, f"bench-otel-{mode}-{i}-{int(time.time())}", **PROTECTION["on"], **env)
                try:
                    wrk(4152, 4)
                    out[mode].append(measured(inst, seconds))
                finally:
                    inst.stop()
    finally:
        server.shutdown()
    return out, dict(OtlpReceiver.received)


def reads_beside_writes(seconds, writes_per_sec=100):
    """The cached read load alone, then with k6 writing beside it (one instance)."""
    prefix = f"bench-mixed-{int(time.time())}"
    inst = Instance(4161, prefix, **PROTECTION["on"])
    summary = os.path.join(tempfile.gettempdir(), f"ugc-bench-mixed-{os.getpid()}.json")
    try:
        wrk(4161, 5)
        alone = measured(inst, seconds)
        before = scrape(4161)
        writer = subprocess.Popen([K6, "run", "--quiet", f"--summary-export={summary}", "-e", f"URL={inst.url}",
                                   "-e", f"SECRET={SECRET}", "-e", f"RATE={writes_per_sec}", "-e", f"DURATION={seconds + 2}s",
                                   "-e", f"RUN={prefix}", os.path.join(ROOT, "k6", "write_rate.js")],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(1)
        mixed = measured(inst, seconds)
        k6_out = writer.communicate(timeout=seconds + 60)[0]
        after = scrape(4161)
        with open(summary) as f:
            metrics = json.load(f)["metrics"]
    finally:
        inst.stop()
        if os.path.exists(summary):
            os.remove(summary)
    ent = [delta(before, after, "ugc_cache_requests_total", 'layer="entity"', f'result="{r}"') for r in ("hit", "miss")]
    return {"alone": alone, "mixed": mixed, "writes": metrics["iterations"]["count"],
            "write_p50_ms": metrics["http_req_duration"]["p(50)"], "write_p99_ms": metrics["http_req_duration"]["p(99)"],
            "entity_hit": rate(ent[0], ent[1]), "k6_ok": writer.returncode == 0, "k6_tail": k6_out[-1500:]}


def shapes(seconds):
    """The plain gateway fetch and the same with `reviews(first: $n)`, one
    instance each, cache on."""
    out = {}
    for variable in (False, True):
        port = 4171 + variable
        inst = Instance(port, f"bench-shape-{int(variable)}-{int(time.time())}", **PROTECTION["on"])
        try:
            wrk(port, 5, variable=variable)
            before = scrape(port)
            r = measured(inst, seconds, variable=variable)
            after = scrape(port)
        finally:
            inst.stop()
        ent = [delta(before, after, "ugc_cache_requests_total", 'layer="entity"', f'result="{x}"') for x in ("hit", "miss")]
        r["entity_hit"] = rate(ent[0], ent[1])
        out["variable" if variable else "plain"] = r
    return out


def shapes_table():
    s = shapes(DURATION)
    print(f"\nFetch shapes (one instance, cache on, wrk as above for {DURATION} s):\n")
    print("| `_entities` fetch | req/s | p50 ms | p95 ms | p99 ms | server CPU µs/req | entity hit |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, label in (("plain", "`reviews(first: 5)`"), ("variable", "`reviews(first: $n)`, n = 5")):
        r = s[name]
        print(f"| {label} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['p99_ms']:.2f} | "
              f"{r['cpu_us_per_req']:.1f} | {r['entity_hit']:.1%} |")


PREPARED_BIN = os.path.join(ROOT, "target", "release", "examples", "prepared_bytes")
ENTITIES_QUERY = ("query($representations: [_Any!]!) { _entities(representations: $representations) { ... on Offer { id "
                  "rating { average count distribution } reviews(first: 5) { totalCount edges { node { id rating text "
                  "author { id } } } } } } }")


def server_run(port, proc, seconds, variable=False):
    """wrk against any process on `port`, with that process's CPU per request."""
    c0 = cpu_seconds(proc.pid)
    r = wrk(port, seconds, variable=variable)
    r["cpu_us_per_req"] = (cpu_seconds(proc.pid) - c0) * 1e6 / max(r["requests"], 1)
    return r


def fast_path(seconds):
    """The table of issue "fast path": the HTTP limit (prepared bytes) and the
    service's paths on the same load."""
    rows = []
    prefix = f"bench-fast-{int(time.time())}"
    inst = Instance(4191, prefix, **PROTECTION["on"])
    body_file = os.path.join(tempfile.gettempdir(), f"ugc-bench-prepared-{os.getpid()}.json")
    try:
        wrk(4191, 5)
        # A typical answer: 20 offers drawn as wrk draws them.
        import random
        rng = random.Random(42)
        weights = [1 / k for k in range(1, OFFERS + 1)]
        reps = [{"__typename": "Offer", "id": f"offer-{k:06d}"} for k in rng.choices(range(1, OFFERS + 1), weights, k=20)]
        req = urllib.request.Request(inst.url, json.dumps({"query": ENTITIES_QUERY, "variables": {"representations": reps}}).encode(),
                                     {"content-type": "application/json"})
        body = urllib.request.urlopen(req, timeout=10).read()
        with open(body_file, "wb") as f:
            f.write(body)
        rows.append(("fragments on", measured(inst, seconds)))
        writer = subprocess.Popen([K6, "run", "--quiet", "-e", f"URL={inst.url}", "-e", f"SECRET={SECRET}", "-e", "RATE=100",
                                   "-e", f"DURATION={seconds + 2}s", "-e", f"RUN={prefix}", os.path.join(ROOT, "k6", "write_rate.js")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)
        rows.append(("fragments on, 100 writes/s beside", measured(inst, seconds)))
        writer.wait(timeout=seconds + 60)
        # Its own fragments (the variable's value keys them): warmed like the literal shape's.
        wrk(4191, 5, variable=True)
        rows.append(("fragments on, `reviews(first: $n)`", measured(inst, seconds, variable=True)))
    finally:
        inst.stop()
    prepared = subprocess.Popen([PREPARED_BIN], env=dict(os.environ, PREPARED_FILE=body_file, PREPARED_LISTEN="127.0.0.1:4192"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket_ok = urllib.request.urlopen(urllib.request.Request("http://127.0.0.1:4192/graphql", b"{}"), timeout=1)
                socket_ok.read()
                break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.05)
        wrk(4192, 3)
        rows.insert(0, (f"prepared bytes ({len(body):,} B, the HTTP limit)", server_run(4192, prepared, seconds)))
    finally:
        prepared.terminate()
        prepared.wait(timeout=10)
        os.remove(body_file)
    for label, env, port in (("fragments off (data in L1, executed)", {"UGC_ENTITY_CACHE": "off"}, 4193),
                             ("cache off", {"UGC_CACHE": "off"}, 4194)):
        other = Instance(port, f"{prefix}-{port}", **PROTECTION["on"], **env)
        try:
            wrk(port, 5)
            rows.append((label, measured(other, seconds)))
        finally:
            other.stop()
    return rows


def fast_path_table():
    if not os.path.exists(PREPARED_BIN):
        sh("cargo", "build", "--release", "--quiet", "-p", "ugc-subgraph", "--example", "prepared_bytes", cwd=ROOT)
    rows = fast_path(DURATION)
    limit = rows[0][1]
    print(f"\nFast path (wrk -t1 -c16 -d{DURATION}s, _entities for 20 Zipf-drawn offers, one server):\n")
    print("| server | req/s | of the limit | p50 ms | p95 ms | p99 ms | server CPU µs/req |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, r in rows:
        print(f"| {label} | {r['rps']:,.0f} | {r['rps'] / limit['rps']:.0%} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | "
              f"{r['p99_ms']:.2f} | {r['cpu_us_per_req']:.1f} |")
    by = dict(rows)
    on = by["fragments on"]
    print(f"\nunder 100 writes/s: {by['fragments on, 100 writes/s beside']['rps'] / on['rps']:.1%} of read-only throughput, "
          f"p99 {by['fragments on, 100 writes/s beside']['p99_ms'] / on['p99_ms']:.1f}×; variable shape "
          f"{by['fragments on, `reviews(first: $n)`']['rps'] / on['rps']:.1%} of the literal one")


def main():
    if not os.path.exists(BIN):
        raise SystemExit("build first: cargo build --release")
    if psql("SELECT 1 FROM pg_database WHERE datname = 'ugc_bench'", db="postgres") != "1":
        psql("CREATE DATABASE ugc_bench", db="postgres")
    sh(BIN, "migrate", env=dict(os.environ, DATABASE_URL=DB_URL))
    if psql("SELECT count(*) FROM reviews") != str(REVIEWS):
        print(sh(BIN, "seed", "--offers", str(OFFERS), "--users", str(USERS), "--reviews", str(REVIEWS), "--seed", "42",
                 env=dict(os.environ, DATABASE_URL=DB_URL, RUST_LOG="error")).strip())
        # The seed leaves ~1 GB of dirty pages; written back during the first
        # runs they cost those runs about a fifth of their throughput.
        psql("CHECKPOINT")
    run = int(time.time())
    if BASELINE_BIN and want("baseline"):
        baseline_vs_current(run)
    if want("throughput"):
        throughput_table(run)
    if want("protection"):
        protection_table()
    if want("limiter"):
        limiter_table()
    if want("overload"):
        overload_table()
    if want("restart"):
        restart_table(run)
    if want("lag"):
        lag_table()
    if want("tracing"):
        tracing_table()
    if want("mixed"):
        mixed_table()
    if want("shapes"):
        shapes_table()
    if want("fastpath"):
        fast_path_table()
    return 0


def tracing_table():
    runs, received = tracing_cost()
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    on, off = mean(runs["on"], "rps"), mean(runs["off"], "rps")
    print(f"\nTracing (OpenTelemetry, OTLP/HTTP to a local receiver, default sampling: parentbased_traceidratio 0.1), "
          f"cache on, {len(runs['on'])} alternating pairs of 10 s:\n")
    print("| traces | req/s | p50 ms | p95 ms | p99 ms | server CPU µs/req | runs |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for mode in ("off", "on"):
        rs = runs[mode]
        print(f"| {mode} | {mean(rs, 'rps'):,.0f} | {mean(rs, 'p50_ms'):.2f} | {mean(rs, 'p95_ms'):.2f} | "
              f"{mean(rs, 'p99_ms'):.2f} | {mean(rs, 'cpu_us_per_req'):.1f} | {[round(r['rps']) for r in rs]} |")
    print(f"\ntraces on/off throughput: {on / off:.1%}; exported {received['requests']} OTLP requests, "
          f"{received['bytes'] / 1e6:.1f} MB")


def mixed_table():
    m = reads_beside_writes(DURATION)
    a, b = m["alone"], m["mixed"]
    print(f"\nReads beside writes (one instance, cache on; wrk as above for {DURATION} s; k6 createReview on Zipf-drawn "
          f"offers at 100/s beside it):\n")
    print("| load | read req/s | p50 ms | p95 ms | p99 ms | server CPU µs/req |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in (("reads only", a), ("reads + 100 writes/s", b)):
        print(f"| {name} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['p99_ms']:.2f} | {r['cpu_us_per_req']:.1f} |")
    print(f"\nwith writes: {b['rps'] / a['rps']:.1%} of the read-only throughput, p99 {b['p99_ms'] / a['p99_ms']:.1f}×; "
          f"{m['writes']} writes (p50 {m['write_p50_ms']:.1f} ms, p99 {m['write_p99_ms']:.1f} ms), entity hit rate "
          f"{m['entity_hit']:.1%} during the mixed run; k6 {'passed' if m['k6_ok'] else 'FAILED'}")
    if not m["k6_ok"]:
        print(m["k6_tail"])


def throughput_table(run):
    rows = [throughput("on", 4101, f"bench-{run}"), throughput("on", 4105, f"bench-unprot-{run}", protection="off"),
            throughput("off", 4102, f"bench-off-{run}")]
    on, unprotected, off = rows
    print(f"\nThroughput: wrk -t1 -c16 -d{DURATION}s, _entities for 20 Zipf-drawn offers (rating + 5 reviews), "
          f"{OFFERS:,} offers / {REVIEWS:,} reviews, {CLIENTS:,} clients via X-Forwarded-For, one instance, "
          f"2 cores shared with wrk\n")
    print("| cache | protection | req/s | p50 ms | p95 ms | p99 ms | errors | server CPU µs/req | entity hit | L1 hit | L2 hit | SQL stmts/req | limiter Redis calls/req |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['mode']} | {r['protection']} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['p99_ms']:.2f} | "
              f"{r['errors']} | {r['cpu_us_per_req']:.1f} | {r['entity_hit']:.1%} | {r['l1_hit']:.1%} | {r['l2_hit']:.1%} | "
              f"{r['sql_per_req']:.3f} | {r['budget_calls']:.4f} |")
    print("\n(entity hit: rendered `_entities` fragments; L1/L2 hit: per data key looked up, i.e. on entity misses)")
    print(f"\ncache on/off throughput ratio: {on['rps'] / max(off['rps'], 1):.1f}×   "
          f"p99 ratio (off/on): {off['p99_ms'] / max(on['p99_ms'], 1e-9):.1f}×")
    print(f"protection on/off throughput: {on['rps'] / max(unprotected['rps'], 1):.1%} "
          f"({on['rps']:,.0f} vs {unprotected['rps']:,.0f} req/s; p99 {on['p99_ms']:.2f} vs {unprotected['p99_ms']:.2f} ms); "
          f"requests refused: {on['rate_limited']:.0f}")



def protection_table():
    ab = protection_pairs()
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    on_rps, off_rps = mean(ab["on"], "rps"), mean(ab["off"], "rps")
    on_cpu, off_cpu = mean(ab["on"], "cpu_us_per_req"), mean(ab["off"], "cpu_us_per_req")
    print(f"protection on/off, {len(ab['on'])} alternating pairs of 8 s: {on_rps:,.0f} vs {off_rps:,.0f} req/s "
          f"({on_rps / off_rps:.1%}); p99 {mean(ab['on'], 'p99_ms'):.2f} vs {mean(ab['off'], 'p99_ms'):.2f} ms; "
          f"runs on {[round(r['rps']) for r in ab['on']]}, off {[round(r['rps']) for r in ab['off']]}; "
          f"server CPU per request {on_cpu:.1f} vs {off_cpu:.1f} µs ({on_cpu / off_cpu - 1:+.1%}), "
          f"runs on {[round(r['cpu_us_per_req'], 1) for r in ab['on']]}, off {[round(r['cpu_us_per_req'], 1) for r in ab['off']]}")



def limiter_table():
    acc = limiter_accuracy()
    print(f"\nRate limiter across two instances (one client alternating, quota {acc['per_sec']}/s, burst {acc['per_sec']}, "
          f"{acc['seconds']:.1f} s): {acc['ok']:,} admitted of {acc['sent']:,} sent ({acc['limited']:,} refused with 429, "
          f"{acc['other']} other); one budget allows {acc['expected']:,.0f}: error {acc['error']:+.1%}")



def overload_table():
    print("\nOverload: 8 s at 16 connections, 8 s at 512, 8 s at 16 again; UGC_MAX_CONCURRENT_REQUESTS=32 "
          "(server-side latency of admitted requests from ugc_graphql_request_seconds):\n")
    print("| cache | phase | connections | req/s | client p99 ms | shed (503) | admitted server p50 ms | admitted server p99 ms |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for cache, port in (("on", 4131), ("off", 4132)):
        for name, r in overload(port, cache).items():
            conns = 512 if name == "burst" else 16
            fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
            print(f"| {cache} | {name} | {conns} | {r['rps']:,.0f} | {r['p99_ms']:.2f} | {r['shed']:,.0f} | "
                  f"{fmt(r['server_p50_ms'])} | {fmt(r['server_p99_ms'])} |")



def restart_table(run):
    warm = recovery(4103, f"bench-warm-{run}", "restart after 12 s of load, same prefix (hot keys warmed, L2 kept)", True)
    cold = recovery(4104, f"bench-cold-{run}", "first start, fresh prefix (nothing to warm, empty L2)", False)
    print("\nRestart under the same load, entity cache off (L1 hit rate per 0.5 s interval):\n")
    print("| start | keys warmed | seconds to 80 % L1 hits |")
    print("| --- | ---: | ---: |")
    for r in (warm, cold):
        s = "not within 28 s" if r["seconds_to_80pct"] is None else f"{r['seconds_to_80pct']:.1f}"
        print(f"| {r['label']} | {r['warmed_keys']:.0f} | {s} |")



def lag_table():
    print(f"\nWrites and invalidation lag (k6: 20 writes/s on A for {DURATION}s, reads on B and C); lag is commit → "
          "L1 eviction on B and C; write latency as k6 saw it:\n")
    print("| UGC_WRITE_VISIBILITY_TIMEOUT_MS | write p50 ms | write p99 ms | waits | time-outs | lag p50 ms | lag p99 ms | k6 |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for visibility in (100, 0):
        lag = invalidation_lag(visibility)
        print(f"| {visibility} | {lag['write_p50_ms']:.2f} | {lag['write_p99_ms']:.2f} | {lag['waits']:.0f} | "
              f"{lag['timeouts']:.0f} | {lag['p50_ms']:.2f} | {lag['p99_ms']:.2f} | "
              f"{'passed' if lag['k6_ok'] else 'FAILED'} |")
        if not lag["k6_ok"]:
            print(lag["k6_tail"])


if __name__ == "__main__":
    sys.exit(main())
