"""How the memory store scales with live keys through a real server: uvicorn + wrk, 1k vs 1M keys.

The second figure for the target "1M live keys within 10% of 1k keys" (the first is
``ratelimit_scaling.py``, in process). For each variant and each size N it starts a uvicorn
server (one worker, 127.0.0.1, a free port, no access log) serving a tiny Starlette app from
``bench/_scaling_apps.py``:

* ``bare``: the app alone, the control (its ratio should be ~1.0);
* ``fixed-window`` and ``token-bucket``: the app in ``RateLimitMiddleware`` with
  ``Policy("1000000000/hour", name="api")``, ``key=header_key("x-api-key")`` and
  ``RateLimiter(max_keys=None)``, whose store holds N live keys before the port opens (the
  app calls its own middleware with N scopes carrying ``x-api-key: <i>``, i in range(N)).

Then ``wrk`` runs against one server at a time, in alternating order over the rounds, with a
Lua script that sends ``x-api-key: <random integer in 0..N-1>`` on every request (a seeded
``math.random``; the bare servers get the same script). Reported per server: median
Requests/sec, the server's CPU time per request (from ``/proc``) and its resident set after
startup; per variant: the ratio of the largest N to the smallest (target >= 0.90) and the
bytes per key from the resident sets.

Checked before timing: a server of each strategy with a limit of 2/hour and 1k filled keys
answers 429 to the second request with a filled key and to the third with a new one (so
the fill counts under the same keys as wrk's requests, and the guard counts at all); every
guarded server's store holds exactly N keys (read from the exempt ``/_stats``), again after
every wrk run, and its middleware allowed at least as many requests as wrk completed.
Servers are stopped at the end, also on errors and Ctrl-C.

    python bench/ratelimit_scaling_server.py                  # 1k vs 1M keys, ~4 min, ~1 GB
    python bench/ratelimit_scaling_server.py --loop uvloop    # uvloop instead of asyncio
    python bench/ratelimit_scaling_server.py --sizes 1000,100000,1000000
    python bench/ratelimit_scaling_server.py --quick          # ~20 s smoke run (1k vs 100k)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _machine import Watch
from _wrk import Served, add_server_arguments, print_table

APPS = {
    "bare": "bench._scaling_apps:bare",
    "fixed-window": "bench._scaling_apps:fixed_window",
    "token-bucket": "bench._scaling_apps:token_bucket",
}
HIGH = "1000000000/hour"
WINDOW = 3600.0  # the fixed window of HIGH, aligned on the monotonic clock
HEADER = "x-api-key"  # bench._scaling_apps.HEADER
STATS = "/_stats"  # bench._scaling_apps.STATS_PATH
TARGET = 0.90

LUA = """\
-- x-api-key: a random integer in [{lo}, {hi}] on every request: the keys the server filled.
local lo, hi, seed = {lo}, {hi}, {seed}
local headers = {{}}
local threads = 0

function setup(thread)
   threads = threads + 1
   thread:set("thread_index", threads)
end

function init(args)
   math.randomseed(seed + (thread_index or 0))
end

function request()
   headers["{header}"] = tostring(math.random(lo, hi))
   return wrk.format(nil, nil, headers)
end
"""


def fmt_size(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


@dataclass
class Server(Served):
    variant: str
    size: int
    limit: str = HIGH
    rss: int = 0  # bytes, after startup
    fill_seconds: float = 0.0

    @property
    def label(self) -> str:
        extra = f", limit {self.limit}" if self.limit != HIGH else ""
        return f"{self.variant} {fmt_size(self.size)}{extra}"

    @property
    def guarded(self) -> bool:
        return self.variant != "bare"


def start(server: Server, loop: str, http: str) -> None:
    env = {**os.environ, "BENCH_KEYS": str(server.size), "BENCH_LIMIT": server.limit}
    server.start(APPS[server.variant], loop, http, env)


def wait_ready(server: Server, deadline: float) -> None:
    """Wait until the port accepts (uvicorn opens it once the lifespan startup, the fill, ends)."""
    assert server.proc is not None
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"{server.label}: uvicorn exited with {server.proc.returncode}\n"
                f"{server.log_tail(3000)}"
            )
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}{STATS}", timeout=1),
        ):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{server.label}: port {server.port} did not answer in time")


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (Linux), 0 elsewhere."""
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except OSError:
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def get(server: Server, path: str, key: str | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}")
    if key is not None:
        request.add_header(HEADER, key)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def stats(server: Server) -> dict[str, Any]:
    status, _, body = get(server, STATS)
    if status != 200:
        raise RuntimeError(f"{server.label}: {STATS} answered {status}")
    result: dict[str, Any] = json.loads(body)
    return result


def check_store(server: Server, when: str) -> dict[str, Any]:
    """The guarded server's store must hold exactly its N keys (no rollover, no new keys)."""
    found = stats(server)
    if server.guarded and found.get("keys") != server.size:
        raise RuntimeError(
            f"{server.label} {when}: the store holds {found.get('keys')} keys, not "
            f"{server.size} (window rollover, or keys outside the filled range?)"
        )
    return found


def check_counting(server: Server) -> str:
    """A limit of 2/hour: a filled key has one hit left, a new key two."""
    got = {
        "0": [get(server, "/", "0")[0] for _ in range(2)],
        "probe": [get(server, "/", "probe")[0] for _ in range(3)],
    }
    if got != {"0": [200, 429], "probe": [200, 200, 429]}:
        raise RuntimeError(f"{server.label}: the guard does not count as expected: {got}")
    return f"  {server.label}: x-api-key 0 (filled) -> 200, 429; x-api-key probe -> 200, 200, 429"


def check_serving(server: Server) -> None:
    """One timed-path request: 200, with ``RateLimit`` headers exactly when guarded."""
    status, headers, _ = get(server, "/", "0")
    lower = {k.lower(): v for k, v in headers.items()}
    if status != 200 or ("ratelimit" in lower) != server.guarded:
        raise RuntimeError(f"{server.label}: status {status}, headers {lower}")


def measure(server: Server, threads: int, connections: int, duration: int, r: int) -> None:
    """One wrk run, with the server's CPU time from /proc and its store checked around it."""
    before = check_store(server, "before a run")
    run = server.measure(threads, connections, duration)
    after = check_store(server, "after a run")
    if server.guarded and after["allowed"] - before["allowed"] < run.requests:
        raise RuntimeError(
            f"{server.label}: the middleware allowed {after['allowed'] - before['allowed']} "
            f"requests, wrk completed {run.requests}"
        )
    print(server.round_line(r, run, 17), flush=True)


def med(values: list[float]) -> float:
    return statistics.median(values)


def report(servers: list[Server], variants: list[str], sizes: list[int]) -> bool:
    small, large = sizes[0], sizes[-1]
    by = {(s.variant, s.size): s for s in servers}
    rows = [
        ["server", "keys", "median req/s", "min", "max", f"/{fmt_size(small)}", "µs/req",
         "p50 ms", "p99 ms", "CPU user µs/req", "CPU sys µs/req", "busy %", "RSS MB",
         "fill s", "runs"],
    ]  # fmt: skip
    for s in servers:
        base = med(by[s.variant, small].rps)
        rows.append(
            [s.variant, f"{s.size:,}", f"{med(s.rps):,.0f}", f"{min(s.rps):,.0f}",
             f"{max(s.rps):,.0f}", f"{med(s.rps) / base:.3f}", f"{1e6 / med(s.rps):.1f}",
             f"{med(s.p50):.2f}", f"{med(s.p99):.2f}", f"{med(s.user_us):.1f}",
             f"{med(s.sys_us):.1f}", f"{med(s.busy):.0f}", f"{s.rss / 2**20:.1f}",
             f"{s.fill_seconds:.1f}", str(len(s.rps))]
        )  # fmt: skip
    print_table(rows)

    name = f"{fmt_size(large)}/{fmt_size(small)}"
    print(f"\nper variant, {name} (medians; per-round range of the paired ratios)")
    rows = [
        ["variant", f"{fmt_size(small)} req/s", f"{fmt_size(large)} req/s", name,
         "per-round range", "CPU user+sys µs/req", "added µs/req", "RSS B/key"],
    ]  # fmt: skip
    verdicts = []
    ok = True
    for variant in variants:
        a, b = by[variant, small], by[variant, large]
        ratio = med(b.rps) / med(a.rps)
        paired = [y / x for x, y in zip(a.rps, b.rps, strict=True)]
        cpu_a = med([u + s for u, s in zip(a.user_us, a.sys_us, strict=True)])
        cpu_b = med([u + s for u, s in zip(b.user_us, b.sys_us, strict=True)])
        per_key = (b.rss - a.rss) / (large - small)
        rows.append(
            [variant, f"{med(a.rps):,.0f}", f"{med(b.rps):,.0f}", f"{ratio:.3f}",
             f"{min(paired):.3f}-{max(paired):.3f}", f"{cpu_a:.1f} -> {cpu_b:.1f}",
             f"{cpu_b - cpu_a:+.1f}", f"{per_key:.1f}"]
        )  # fmt: skip
        if variant == "bare":
            verdicts.append(
                f"control  bare app, {name} = {ratio:.3f} (expected ~1.0"
                f"{'' if abs(ratio - 1) <= 0.05 else '; off by more than 5%: noisy run?'})"
            )
        else:
            passed = ratio >= TARGET
            ok = ok and passed
            verdicts.append(
                f"{'PASS' if passed else 'FAIL'}  {variant}, through uvicorn + wrk: "
                f"{name} = {ratio:.3f} (target >= {TARGET:.2f})"
            )
    print_table(rows)
    print()
    for line in verdicts:
        print(line)
    return ok


def wait_for_window(fixed: bool, estimate: float) -> None:
    """Wait for the fixed window's boundary if it would fall inside the run (at most ``estimate``).

    ``1000000000/hour`` windows are aligned on the monotonic clock; at a boundary the store
    empties (a faster server with few keys). The stores are checked after every run anyway.
    """
    if not fixed:
        return
    now = time.monotonic()
    left = (now // WINDOW + 1) * WINDOW - now
    if left < estimate:
        print(f"waiting {left + 2:.0f} s for the fixed window's boundary to pass", flush=True)
        time.sleep(left + 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1000,1000000", help="live keys per server")
    parser.add_argument(
        "--variants", default="bare,fixed-window,token-bucket", help="servers per size"
    )
    add_server_arguments(parser)
    parser.add_argument("--seed", type=int, default=1, help="seed of wrk's math.random")
    parser.add_argument(
        "--startup-timeout", type=float, default=60.0, help="seconds for all servers to start"
    )
    parser.add_argument("--quick", action="store_true", help="~20 s smoke run (1k vs 100k keys)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.rounds, args.duration, args.warmup = "1000,100000", 1, 3, 0
    sizes = sorted({int(s) for s in args.sizes.split(",")})
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if len(sizes) < 2 or sizes[0] < 1000 or sizes[-1] > 10_000_000:
        parser.error("--sizes needs at least two sizes between 1000 and 10,000,000")
    if not variants or any(v not in APPS for v in variants):
        parser.error(f"--variants takes some of {', '.join(APPS)}")
    if args.rounds < 1 or args.duration < 1 or args.duration > 60:
        parser.error("--rounds must be >= 1 and --duration between 1 and 60 seconds")
    if shutil.which("wrk") is None:
        parser.error("wrk is not on PATH")

    servers = [Server(v, n) for v in variants for n in sizes]
    probes = [Server(v, 1000, "2/hour") for v in variants if v != "bare"]
    print(
        f"python {platform.python_version()}, nproc {os.cpu_count()}, "
        f"load {os.getloadavg()[0]:.2f}, loop {args.loop}, http {args.http}, "
        f"sizes {', '.join(map(fmt_size, sizes))}, variants {', '.join(variants)}; "
        f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s, "
        f"{args.rounds} alternating rounds",
        flush=True,
    )
    estimate = args.startup_timeout + len(servers) * (
        args.warmup + 1 + args.rounds * (args.duration + 1)
    )
    wait_for_window("fixed-window" in variants, estimate)
    watch = Watch.start()
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            script = Path(tmp, f"keys_{n}.lua")
            script.write_text(LUA.format(lo=0, hi=n - 1, seed=args.seed, header=HEADER))
            for s in servers:
                if s.size == n:
                    s.script = str(script)
        try:
            t0 = time.monotonic()
            for server in [*probes, *servers]:
                start(server, args.loop, args.http)
            deadline = t0 + args.startup_timeout
            for server in probes:
                wait_ready(server, deadline)
                print(check_counting(server))
                server.stop(timeout=10)
            for server in servers:
                wait_ready(server, deadline)
            print(f"all servers up in {time.monotonic() - t0:.0f} s", flush=True)
            for server in servers:
                assert server.proc is not None
                server.rss = rss_bytes(server.proc.pid)
                server.fill_seconds = float(check_store(server, "after startup")["fill_seconds"])
                check_serving(server)
                if args.warmup:
                    server.run_wrk(args.threads, args.connections, args.warmup)
            for r in range(args.rounds):
                for server in servers if r % 2 == 0 else servers[::-1]:
                    measure(server, args.threads, args.connections, args.duration, r)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            for server in [*probes, *servers]:
                server.stop(timeout=10)

    print(f"\nmedians of {args.rounds} rounds; RSS after startup")
    ok = report(servers, variants, sizes)
    print(f"\nmachine: {watch.summary()}")
    return 0 if ok else 1


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
