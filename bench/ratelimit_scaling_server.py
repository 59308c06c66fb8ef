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
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from _machine import Watch
from ratelimit_wrk import cpu_seconds, free_port, parse_latency

ROOT = Path(__file__).resolve().parent.parent
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
class Server:
    variant: str
    size: int
    limit: str = HIGH
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None
    script: str = ""
    rss: int = 0  # bytes, after startup
    fill_seconds: float = 0.0
    rps: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    user_us: list[float] = field(default_factory=list)
    sys_us: list[float] = field(default_factory=list)
    busy: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        extra = f", limit {self.limit}" if self.limit != HIGH else ""
        return f"{self.variant} {fmt_size(self.size)}{extra}"

    @property
    def guarded(self) -> bool:
        return self.variant != "bare"


def start(server: Server, loop: str, http: str) -> None:
    server.port = free_port()
    server.log = tempfile.TemporaryFile()  # noqa: SIM115 - outlives this call; stop() closes it
    cmd = [
        sys.executable, "-m", "uvicorn", APPS[server.variant],
        "--app-dir", str(ROOT),
        "--host", "127.0.0.1",
        "--port", str(server.port),
        "--no-access-log",
        "--log-level", "warning",
        "--loop", loop,
        "--http", http,
    ]  # fmt: skip
    env = {**os.environ, "BENCH_KEYS": str(server.size), "BENCH_LIMIT": server.limit}
    server.proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=server.log, stderr=subprocess.STDOUT
    )


def server_log(server: Server) -> str:
    if server.log is None:
        return ""
    server.log.seek(0)
    return server.log.read().decode(errors="replace")[-3000:]


def wait_ready(server: Server, deadline: float) -> None:
    """Wait until the port accepts (uvicorn opens it once the lifespan startup, the fill, ends)."""
    assert server.proc is not None
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"{server.label}: uvicorn exited with {server.proc.returncode}\n"
                f"{server_log(server)}"
            )
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}{STATS}", timeout=1),
        ):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{server.label}: port {server.port} did not answer in time")


def stop(server: Server) -> None:
    proc = server.proc
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    if server.log is not None:
        server.log.close()
        server.log = None


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


@dataclass
class WrkRun:
    rps: float
    requests: int
    p50: float
    p99: float
    errors: str


def run_wrk(server: Server, threads: int, connections: int, duration: int) -> WrkRun:
    """One wrk run against ``server`` with its Lua script; refuses non-2xx responses."""
    cmd = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency",
        "-s", server.script, f"http://127.0.0.1:{server.port}/",
    ]  # fmt: skip
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=duration + 30, check=False
    ).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if rps is None or total is None:
        raise RuntimeError(f"wrk against {server.label} printed no Requests/sec:\n{out}")
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if bad:
        raise RuntimeError(f"{server.label}: {bad.group(1)} non-2xx responses (rejected?)\n{out}")
    errors = re.search(r"Socket errors:.*", out)
    return WrkRun(
        float(rps.group(1)),
        int(total.group(1)),
        parse_latency(out, "50"),
        parse_latency(out, "99"),
        errors.group(0) if errors else "",
    )


def measure(server: Server, threads: int, connections: int, duration: int, r: int) -> None:
    """One wrk run, with the server's CPU time from /proc and its store checked around it."""
    assert server.proc is not None
    before = check_store(server, "before a run")
    user0, sys0 = cpu_seconds(server.proc.pid)
    run = run_wrk(server, threads, connections, duration)
    user1, sys1 = cpu_seconds(server.proc.pid)
    after = check_store(server, "after a run")
    if server.guarded and after["allowed"] - before["allowed"] < run.requests:
        raise RuntimeError(
            f"{server.label}: the middleware allowed {after['allowed'] - before['allowed']} "
            f"requests, wrk completed {run.requests}"
        )
    server.rps.append(run.rps)
    server.p50.append(run.p50)
    server.p99.append(run.p99)
    server.user_us.append((user1 - user0) / run.requests * 1e6)
    server.sys_us.append((sys1 - sys0) / run.requests * 1e6)
    server.busy.append((user1 - user0 + sys1 - sys0) / duration * 100)
    print(
        f"  round {r + 1}: {server.label:17} {run.rps:>8,.0f} req/s  "
        f"p50 {run.p50:.2f} ms  p99 {run.p99:.2f} ms  server CPU "
        f"{server.user_us[-1]:.1f} user + {server.sys_us[-1]:.1f} sys µs/req, "
        f"{server.busy[-1]:.0f}% busy  {run.errors}".rstrip(),
        flush=True,
    )


def print_table(rows: list[list[str]], left: int = 1) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for j, row in enumerate(rows):
        print(
            "  ".join(
                c.ljust(w) if i < left else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if j == 0:
            print("  ".join("-" * w for w in widths))


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
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--http", choices=["auto", "h11", "httptools"], default="auto")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("-d", "--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("-t", "--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("-c", "--connections", type=int, default=32, help="wrk connections")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of wrk before measuring")
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
                stop(server)
            for server in servers:
                wait_ready(server, deadline)
            print(f"all servers up in {time.monotonic() - t0:.0f} s", flush=True)
            for server in servers:
                assert server.proc is not None
                server.rss = rss_bytes(server.proc.pid)
                server.fill_seconds = float(check_store(server, "after startup")["fill_seconds"])
                check_serving(server)
                if args.warmup:
                    run_wrk(server, args.threads, args.connections, args.warmup)
            for r in range(args.rounds):
                for server in servers if r % 2 == 0 else servers[::-1]:
                    measure(server, args.threads, args.connections, args.duration, r)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            for server in [*probes, *servers]:
                stop(server)

    print(f"\nmedians of {args.rounds} rounds; RSS after startup")
    ok = report(servers, variants, sizes)
    print(f"\nmachine: {watch.summary()}")
    return 0 if ok else 1


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
