#!/usr/bin/env python3
"""Soak (`make soak`, 10 minutes; SOAK_MINUTES overrides): three
ugc-subgraph instances of one deployment (release build) on a private
Postgres and Redis, the offers subgraph and the Apollo gateway in front of
all three, and k6 sending reads and 1 % writes through the gateway with
every acknowledged write read back at once (k6/write_mix.js). The
stale-read detector samples 5 % of cache hits. Every minute each instance's
/metrics is read: resident memory, open file descriptors, live Tokio tasks,
Postgres pool connections are not exported, so fds stand for them.

Passes when: k6's thresholds hold (no failed request, no read-your-write
violation), no stale read is detected, each instance's RSS at the end is
within 10 % of minute 2, and fds and tasks do not grow.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import drills  # noqa: E402 - the private servers and instances

ROOT = drills.ROOT
MINUTES = int(os.environ.get("SOAK_MINUTES", "10"))
K6 = os.path.join(ROOT, ".venv", "bin", "k6")


def node(script, **env):
    return subprocess.Popen(["node", os.path.join(ROOT, "gateway", script)], env=dict(os.environ, **env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def sample(instances):
    return {i.name: {"rss_mb": i.metric("ugc_process_resident_memory_bytes") / 1e6,
                     "fds": i.metric("ugc_process_open_fds"),
                     "tasks": i.metric("ugc_tokio_alive_tasks"),
                     "stale": i.metric("ugc_stale_reads_detected_total"),
                     "checked": i.metric("ugc_stale_read_checks_total"),
                     "requests": i.metric("ugc_http_responses_total")} for i in instances}


def main():
    pg, redis = drills.Postgres(), drills.Redis()
    procs, instances = [], []
    summary = os.path.join(tempfile.gettempdir(), f"ugc-soak-{os.getpid()}.json")
    try:
        env = dict(os.environ, DATABASE_URL=pg.url(), RUST_LOG="error")
        subprocess.run([drills.BIN, "migrate"], env=env, check=True)
        subprocess.run([drills.BIN, "seed", "--offers", "1000", "--users", "5000", "--reviews", "50000", "--seed", "42"],
                       env=env, check=True, capture_output=True)
        instances = [drills.Instance(n, pg.url(), redis.port, UGC_STALE_CHECK_RATE="0.05", UGC_TRUSTED_PROXIES="127.0.0.1",
                                     UGC_RATE_LIMIT="on") for n in ("A", "B", "C")]
        offers_port, gateway_port = drills.free_port(), drills.free_port()
        procs.append(node("offers.mjs", OFFERS_PORT=str(offers_port)))
        drills.wait_port(offers_port, 60)
        procs.append(node("gateway.mjs", GATEWAY_PORT=str(gateway_port), OFFERS_URL=f"http://127.0.0.1:{offers_port}/graphql",
                          UGC_URL=",".join(f"http://127.0.0.1:{i.port}/graphql" for i in instances)))
        drills.wait_port(gateway_port, 60)
        k6 = subprocess.Popen([K6, "run", "--quiet", f"--summary-export={summary}", "-e", f"URL=http://127.0.0.1:{gateway_port}/",
                               "-e", f"SECRET={drills.SECRET}", "-e", "WRITE_RATIO=0.01", "-e", "VUS=8",
                               "-e", f"DURATION={MINUTES}m", os.path.join(ROOT, "k6", "write_mix.js")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        samples = []
        started = time.time()
        for minute in range(1, MINUTES + 1):
            time.sleep(max(0.0, started + minute * 60 - time.time()))
            samples.append(sample(instances))
            s = samples[-1]
            print(f"minute {minute:2d}: " + "  ".join(
                f"{n} rss {v['rss_mb']:.1f} MB fds {v['fds']:.0f} tasks {v['tasks']:.0f} stale {v['stale']:.0f}/{v['checked']:.0f}"
                for n, v in s.items()), flush=True)
        out = k6.communicate(timeout=180)[0]
        with open(summary) as f:
            m = json.load(f)["metrics"]
        reqs, failed = m["http_reqs"]["count"], m["http_req_failed"].get("passes", 0)
        ryw, violations = m["read_your_write_checks"]["count"], m["read_your_write_violations"]["count"]
        dur = m["http_req_duration"]
        print(f"\nk6: {reqs:,} requests through the gateway ({reqs / (MINUTES * 60):.0f}/s), {failed} failed, "
              f"p50 {dur['p(50)']:.1f} / p95 {dur['p(95)']:.1f} / p99 {dur['p(99)']:.1f} ms; {ryw} read-your-write checks, "
              f"{violations} violations; thresholds {'held' if k6.returncode == 0 else 'FAILED'}")
        first, last = samples[min(1, len(samples) - 1)], samples[-1]
        ok = k6.returncode == 0 and violations == 0
        for n in last:
            growth = last[n]["rss_mb"] / first[n]["rss_mb"] - 1
            stale = last[n]["stale"]
            ok &= abs(growth) <= 0.10 and stale == 0 and last[n]["fds"] <= first[n]["fds"] + 5 \
                and last[n]["tasks"] <= first[n]["tasks"] + 20
            print(f"{n}: RSS minute 2 → {MINUTES}: {first[n]['rss_mb']:.1f} → {last[n]['rss_mb']:.1f} MB ({growth:+.1%}); "
                  f"fds {first[n]['fds']:.0f} → {last[n]['fds']:.0f}; tasks {first[n]['tasks']:.0f} → {last[n]['tasks']:.0f}; "
                  f"stale reads {stale:.0f} of {last[n]['checked']:.0f} hits checked; {last[n]['requests']:,.0f} responses")
        if k6.returncode != 0:
            print(out[-2000:])
        print(f"\nsoak: {'passed' if ok else 'FAILED'}")
        return 0 if ok else 1
    finally:
        for p in procs:
            p.terminate()
        for i in instances:
            i.stop()
        redis.close()
        pg.close()
        if os.path.exists(summary):
            os.remove(summary)


if __name__ == "__main__":
    sys.exit(main())
