#!/usr/bin/env python3
"""Failure drills under load (`make drills`): each bounded, loopback only,
on a private Postgres cluster and a private Redis that the drill starts (the
machine's servers are never stopped, slowed or cut).

Two ugc-subgraph instances (release build) of one deployment, A and B, serve
a small seeded dataset. The load: a few threads, each owning one review,
alternately writing it on one instance (a moderator's `updateReview` with a
new text) and reading it back at once on the other (a read-your-write check:
an older text is a stale read), with cached offer reads in between. Each
drill injects one fault mid-run and prints requests, failures, stale reads
and the recovery time (from the end of the fault to the first whole second
without a failure).

  redis          Redis killed (SIGKILL) for 3 s, then started again
  pg-restart     Postgres restarted (fast shutdown, start)
  pg-slow        Postgres behind a proxy adding 200 ms per round trip, 4 s
  listener-cut   the LISTEN connections terminated (pg_terminate_backend)
  kill-writer    A killed with SIGKILL mid-writes; afterwards every
                 acknowledged write must be what B (and a fresh instance)
                 serves, and what Postgres holds

  python3 scripts/drills.py [drill ...]     (all when none is named)
"""
import asyncio
import contextlib
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("BIN", os.path.join(ROOT, "target", "release", "ugc-subgraph"))
SECRET = "drill-secret-0123456789abcdef"
WRITERS = 6
LOAD_SECONDS = 12
FAULT_AT = 4


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_postgres(args):
    """Postgres programs refuse to run as root: run them as `postgres`."""
    bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout.strip()
    cmd = [os.path.join(bindir, args[0]), *args[1:]]
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


class Postgres:
    """A private cluster in a temporary directory."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="ugc-drill-pg-")
        shutil.chown(self.dir, "postgres", "postgres") if os.geteuid() == 0 else None
        self.port = free_port()
        subprocess.run(as_postgres(["initdb", "-D", f"{self.dir}/data", "-U", "postgres", "-A", "trust", "--no-sync",
                                    "-E", "UTF8", "--locale=C"]), check=True, capture_output=True)
        self.start()
        subprocess.run(["psql", "-Xq", self.url("postgres"), "-c", "CREATE DATABASE ugc"], check=True)

    def ctl(self, *args):
        subprocess.run(as_postgres(["pg_ctl", "-D", f"{self.dir}/data", *args]), check=True, capture_output=True)

    def start(self):
        self.ctl("-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                 "-c synchronous_commit=off -c max_connections=100", "-l", f"{self.dir}/log", "-w", "start")

    def stop(self, mode="fast"):
        self.ctl("-m", mode, "-w", "stop")

    def url(self, db="ugc", port=None):
        return f"postgres://postgres@127.0.0.1:{port or self.port}/{db}"

    def psql(self, sql):
        return subprocess.run(["psql", "-XAtq", self.url(), "-c", sql], check=True, capture_output=True,
                              text=True).stdout.strip()

    def close(self):
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


class Redis:
    def __init__(self):
        self.port = free_port()
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def kill(self):
        self.proc.kill()
        self.proc.wait()

    def close(self):
        if self.proc.poll() is None:
            self.kill()


def wait_port(port, seconds=20):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


class SlowProxy:
    """TCP proxy to Postgres whose delay (per direction, per chunk) can be
    switched on: 100 ms each way is 200 ms per round trip."""

    def __init__(self, target_port):
        self.target, self.port, self.delay = target_port, free_port(), 0.0
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self.serve(), self.loop).result()

    async def serve(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", self.port)

    async def pipe(self, reader, writer):
        try:
            while data := await reader.read(65536):
                if self.delay:
                    await asyncio.sleep(self.delay)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def handle(self, client_r, client_w):
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(self.pipe(client_r, server_w), self.pipe(server_r, client_w))


class Instance:
    def __init__(self, name, db_url, redis_port, **env):
        self.name, self.port = name, free_port()
        full = dict(os.environ, DATABASE_URL=db_url, REDIS_URL=f"redis://127.0.0.1:{redis_port}",
                    UGC_LISTEN=f"127.0.0.1:{self.port}", UGC_JWT_SECRET=SECRET, UGC_CACHE_PREFIX="drill",
                    RUST_LOG="error", UGC_RATE_LIMIT="off", UGC_STALE_CHECK_RATE="0.01", UGC_SHUTDOWN_DRAIN_MS="0",
                    UGC_DB_ACQUIRE_TIMEOUT_MS="1000")
        full.update(env)
        self.proc = subprocess.Popen([BIN, "serve"], env=full, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if get(self.port, "/health/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"instance {name} did not become ready")

    def metric(self, name):
        text = get(self.port, "/metrics")[1]
        return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith(name))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)


def get(port, path):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    c.request("GET", path)
    r = c.getresponse()
    return r.status, r.read().decode()


def token(sub, roles):
    import base64
    import hashlib
    import hmac
    enc = lambda o: base64.urlsafe_b64encode(json.dumps(o).encode()).rstrip(b"=").decode()  # noqa: E731
    head = f"{enc({'alg': 'HS256', 'typ': 'JWT'})}.{enc({'sub': sub, 'roles': roles, 'exp': int(time.time()) + 3600})}"
    sig = base64.urlsafe_b64encode(hmac.new(SECRET.encode(), head.encode(), hashlib.sha256).digest()).rstrip(b"=")
    return f"{head}.{sig.decode()}"


MODERATOR = token("drill-moderator", ["moderator"])


def gql(port, query, variables=None, auth=None, timeout=10):
    """(ok, data): ok is False on a transport error, a non-200 or GraphQL errors."""
    headers = {"content-type": "application/json"}
    if auth:
        headers["authorization"] = f"Bearer {auth}"
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        c.request("POST", "/graphql", json.dumps({"query": query, "variables": variables or {}}), headers)
        r = c.getresponse()
        body = json.loads(r.read() or b"{}")
        return r.status == 200 and not body.get("errors"), body.get("data")
    except (OSError, ValueError, http.client.HTTPException):
        return False, None


UPDATE = "mutation($id: ID!, $t: String!) { updateReview(id: $id, input: { text: $t }) { text } }"
READ_REVIEW = "query($id: ID!) { review(id: $id) { text } }"
READ_OFFER = "query($id: ID!) { offer(id: $id) { rating { count average } reviews(first: 5) { edges { node { id text } } } } }"


class Load:
    """The drill's traffic; counts per second, so recovery can be timed."""

    def __init__(self, instances, reviews):
        self.instances, self.reviews = instances, reviews
        self.stop_at = None
        self.lock = threading.Lock()
        self.requests = self.failures = self.stale = self.checks = 0
        self.failures_by_second = {}
        self.acked = {}  # review id -> (sequence, text) of the last acknowledged write
        self.attempted = {}  # review id -> text of the write in flight
        self.started = time.time()

    def record(self, ok):
        with self.lock:
            self.requests += 1
            if not ok:
                self.failures += 1
                s = int(time.time() - self.started)
                self.failures_by_second[s] = self.failures_by_second.get(s, 0) + 1

    def worker(self, n, review):
        seq = 0
        while time.time() < self.stop_at:
            live = [i for i in self.instances if i.proc.poll() is None]
            if not live:
                return
            a = live[seq % len(live)]
            b = live[(seq + 1) % len(live)]
            seq += 1
            text = f"drill {n} write {seq}"
            self.attempted[review] = text
            ok, _ = gql(a.port, UPDATE, {"id": review, "t": text}, MODERATOR)
            self.record(ok)
            if ok:
                self.acked[review] = (seq, text)
                ok, data = gql(b.port, READ_REVIEW, {"id": review})
                self.record(ok)
                if ok:
                    with self.lock:
                        self.checks += 1
                        if (data.get("review") or {}).get("text") != text:
                            self.stale += 1
            for _ in range(4):
                ok, _ = gql(random.choice(live).port, READ_OFFER, {"id": f"offer-{random.randint(1, 50):06d}"})
                self.record(ok)
            time.sleep(0.01)

    def run(self, seconds, fault):
        """Runs the load for `seconds`, calling `fault(load)` after FAULT_AT s
        in this thread; returns when the load is done."""
        self.stop_at = time.time() + seconds
        threads = [threading.Thread(target=self.worker, args=(n, r), daemon=True) for n, r in enumerate(self.reviews)]
        for t in threads:
            t.start()
        time.sleep(FAULT_AT)
        fault_end = fault(self)
        for t in threads:
            t.join(timeout=seconds + 30)
        return fault_end

    def recovery(self, fault_end):
        """Seconds from the end of the fault to the first whole second
        without a failure (0: none after it)."""
        start = int(fault_end - self.started)
        for s in range(start, int(time.time() - self.started) + 1):
            if not self.failures_by_second.get(s):
                return max(0.0, s - (fault_end - self.started))
        return None


@contextlib.contextmanager
def deployment(proxy=False):
    """Private Postgres and Redis, seeded; instances A and B; everything
    stopped and removed when the drill ends, whatever happened."""
    pg, redis, instances = Postgres(), Redis(), []
    try:
        subprocess.run([BIN, "migrate"], env=dict(os.environ, DATABASE_URL=pg.url(), RUST_LOG="error"), check=True)
        subprocess.run([BIN, "seed", "--offers", "100", "--users", "1000", "--reviews", "5000", "--seed", "7"],
                       env=dict(os.environ, DATABASE_URL=pg.url(), RUST_LOG="error"), check=True, capture_output=True)
        slow = SlowProxy(pg.port) if proxy else None
        url = pg.url(port=slow.port) if slow else pg.url()
        instances += [Instance("A", url, redis.port), Instance("B", url, redis.port)]
        reviews = pg.psql(f"SELECT string_agg(id::text, ',') FROM (SELECT id FROM reviews WHERE status = 'PUBLISHED' "
                          f"ORDER BY id LIMIT {WRITERS}) r").split(",")
        yield pg, redis, slow, instances[0], instances[1], reviews
    finally:
        for x in instances:
            x.stop()
        redis.close()
        pg.close()


def report(name, load, fault_end, extra=""):
    rec = load.recovery(fault_end)
    rec_s = "not within the run" if rec is None else f"{rec:.1f} s"
    print(f"| {name} | {load.requests:,} | {load.failures:,} | {load.checks:,} | {load.stale} | {rec_s} | {extra} |",
          flush=True)
    return load.stale == 0


def drill_redis():
    with deployment() as (pg, redis, _, a, b, reviews):
        load = Load([a, b], reviews)

        def fault(_):
            redis.kill()
            time.sleep(3)
            redis.start()
            return time.time()

        end = load.run(LOAD_SECONDS, fault)
        errors = a.metric("ugc_redis_errors_total") + b.metric("ugc_redis_errors_total")
        return report("Redis killed for 3 s, restarted", load, end, f"{errors:.0f} Redis calls failed (served from L1 + Postgres)")


def drill_pg_restart():
    with deployment() as (pg, redis, _, a, b, reviews):
        load = Load([a, b], reviews)

        def fault(_):
            pg.stop("fast")
            time.sleep(1)
            pg.start()
            return time.time()

        end = load.run(LOAD_SECONDS, fault)
        return report("Postgres restarted (down ~1.5 s)", load, end, "writes and cache misses fail while it is down; cached reads do not")


def drill_pg_slow():
    with deployment(proxy=True) as (pg, redis, slow, a, b, reviews):
        load = Load([a, b], reviews)

        def fault(_):
            slow.delay = 0.1
            time.sleep(4)
            slow.delay = 0.0
            return time.time()

        end = load.run(LOAD_SECONDS, fault)
        return report("Postgres +200 ms per round trip for 4 s", load, end, "a proxy delaying each direction 100 ms")


def drill_listener_cut():
    with deployment() as (pg, redis, _, a, b, reviews):
        load = Load([a, b], reviews)

        def fault(_):
            cut = pg.psql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'")
            load.cut = int(cut or 0)
            return time.time()

        load.cut = 0
        end = load.run(LOAD_SECONDS, fault)
        drops = a.metric("ugc_l1_dropped_total") + b.metric("ugc_l1_dropped_total")
        return report("LISTEN connections terminated", load, end, f"{load.cut} listeners cut, {drops:.0f} whole-L1 drops on reconnect")


def drill_kill_writer():
    with deployment() as (pg, redis, _, a, b, reviews):
        load = Load([a, b], reviews)

        def fault(_):
            a.proc.kill()
            a.proc.wait()
            return time.time()

        end = load.run(LOAD_SECONDS, fault)
        # Every acknowledged write (or the write in flight at the kill, which
        # may have committed unacknowledged) is what Postgres holds and what
        # B and a fresh instance serve.
        c = Instance("C", pg.url(), redis.port)
        lost = 0
        for review, (_, text) in load.acked.items():
            row = pg.psql(f"SELECT body FROM reviews WHERE id = {review}")
            allowed = {text, load.attempted.get(review)}
            served = [(gql(x.port, READ_REVIEW, {"id": review})[1] or {}).get("review", {}) for x in (b, c)]
            if row not in allowed or any(s.get("text") != row for s in served):
                lost += 1
        c.stop()
        outbox = pg.psql("SELECT count(*) FROM outbox WHERE processed_at IS NULL AND parked_at IS NULL")
        ok = report("writer A killed (SIGKILL) mid-writes", load, end,
                    f"{len(load.acked)} reviews checked after: {lost} not as acknowledged; {outbox} outbox events left")
        return ok and lost == 0


DRILLS = {"redis": drill_redis, "pg-restart": drill_pg_restart, "pg-slow": drill_pg_slow,
          "listener-cut": drill_listener_cut, "kill-writer": drill_kill_writer}


def main():
    if not os.path.exists(BIN):
        raise SystemExit("build first: cargo build --release")
    names = sys.argv[1:] or list(DRILLS)
    unknown = [n for n in names if n not in DRILLS]
    if unknown:
        raise SystemExit(f"unknown drill {unknown}; known: {', '.join(DRILLS)}")
    print(f"Drills: 2 instances, {WRITERS} writer threads (write on one instance, read back at once on the other) "
          f"plus cached offer reads, {LOAD_SECONDS} s each, fault at {FAULT_AT} s\n")
    print("| drill | requests | failed | read-your-write checks | stale reads | recovery | notes |")
    print("| --- | ---: | ---: | ---: | ---: | --- | --- |")
    ok = all([DRILLS[n]() for n in names])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
