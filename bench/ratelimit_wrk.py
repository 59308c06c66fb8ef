"""Throughput through a real server: uvicorn + a tiny app, bare and behind RateLimitMiddleware.

Starts two uvicorn servers (one worker each, 127.0.0.1, free ports, no access log), one
serving the bare app and one the same app with ``RateLimitMiddleware`` (one policy, far
above what the run sends, IETF headers), checks that the guarded one answers with
``RateLimit`` headers, then runs ``wrk`` against them alternately (bare, guarded, then
guarded, bare, ...) and reports the median Requests/sec and the ratio guarded/bare (the
ratio of the medians, which the target is checked on, and the median of each round's
ratio, which the machine's drift between rounds moves less). Only one wrk runs at a time;
the idle server uses no CPU. Servers are stopped at the end, also on errors and Ctrl-C.

``--side-by-side`` runs both servers at once instead, each under its own ``wrk`` over the
same seconds, and takes the median of the rounds' ratios: the machine's speed, which
drifts by tens of percent within seconds on a shared VM, is then the same for both. Two
servers and two wrk share the cores, so each server gets part of a core: the ratio then
compares what a request costs each server, not what one server does alone.

    python bench/ratelimit_wrk.py                   # 3 rounds x 10 s per app, ~70 s
    python bench/ratelimit_wrk.py --loop uvloop     # uvloop instead of asyncio
    python bench/ratelimit_wrk.py --app fastapi     # FastAPI instead of Starlette
    python bench/ratelimit_wrk.py --breakdown -d 5  # raw app: pass-through, headers, guard
    python bench/ratelimit_wrk.py --quick           # ~10 s smoke run
    python bench/ratelimit_wrk.py --wakes           # also: the server's CPU spent waking wrk
    python bench/ratelimit_wrk.py --side-by-side --rounds 10 -d 5   # both servers at once

Every run also reports how often wrk had to be woken per request (its voluntary context
switches). ``--wakes`` records each server with ``perf record`` during its runs and reports
the server's CPU per request spent in the kernel waking wrk: when wrk shares the machine,
a slower server leaves wrk idle more often, and waking an idle CPU costs the writer.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from _machine import Watch
from _wrk import ROOT, Served, add_server_arguments, print_table

APPS = {
    "starlette": ("bench._apps:bare", "bench._apps:guarded"),
    "fastapi": ("bench._apps:fastapi_bare", "bench._apps:fastapi_guarded"),
    "raw": ("bench._apps:raw_bare", "bench._apps:raw_guarded"),
}
BREAKDOWN = (
    ("raw app", "bench._apps:raw_bare", False),
    ("pass-through", "bench._apps:raw_passthrough", False),
    ("busy loop (spin)", "bench._apps:raw_spin", False),
    ("2 static headers (app)", "bench._apps:raw_static_headers", True),
    ("guarded, headers=none", "bench._apps:raw_guarded_no_headers", False),
    ("guarded, ietf headers", "bench._apps:raw_guarded", True),
)


@dataclass
class Server(Served):
    label: str
    target: str
    headers: bool = False  # whether its responses carry RateLimit headers


def wait_ready(server: Server, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    assert server.proc is not None
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.label}: uvicorn exited with {server.proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{server.label}: port {server.port} did not accept within {timeout} s")


def spin_cost() -> float:
    """Microseconds one ``bench._apps.spin()`` takes in a hot loop, for calibration."""
    code = (
        "import timeit; from bench._apps import spin; "
        "print(min(timeit.repeat(spin, number=100000, repeat=5)) / 100000 * 1e6)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return float(out.stdout)


def check(server: Server) -> None:
    """One request: 200, and a RateLimit header exactly when the server should send one."""
    url = f"http://127.0.0.1:{server.port}/"
    with urllib.request.urlopen(url, timeout=5) as response:
        status = response.status
        has = response.headers.get("ratelimit") is not None
        policy = response.headers.get("ratelimit-policy")
    if status != 200 or has != server.headers:
        raise RuntimeError(f"{server.label}: status {status}, RateLimit header present: {has}")
    if has:
        print(f"  {server.label}: RateLimit-Policy: {policy}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--app", choices=sorted(APPS), default="starlette")
    add_server_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="~10 s smoke run (2 x 2 s)")
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="where the guarded server's time goes: five raw-app variants (use -d 5)",
    )
    parser.add_argument(
        "--side-by-side",
        action="store_true",
        help="both servers at once, each under its own wrk; the median of the rounds' ratios",
    )
    parser.add_argument(
        "--wakes",
        action="store_true",
        help="perf record each server: CPU spent waking wrk (needs perf)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup = 2, 2, 1
    if args.rounds < 1 or args.duration < 1 or args.duration > 60:
        parser.error("--rounds must be >= 1 and --duration between 1 and 60 seconds")
    if shutil.which("wrk") is None:
        parser.error("wrk is not on PATH")
    if args.wakes and shutil.which("perf") is None:
        parser.error("--wakes needs perf on PATH")
    if args.side_by_side and (args.breakdown or args.wakes):
        parser.error("--side-by-side compares bare and guarded only (no --breakdown, --wakes)")

    if args.breakdown:
        servers = [Server(label, target, headers) for label, target, headers in BREAKDOWN]
        what = f"breakdown on a raw ASGI app (spin takes {spin_cost():.2f} µs in a hot loop)"
    else:
        bare_target, guarded_target = APPS[args.app]
        servers = [Server("bare", bare_target), Server("guarded", guarded_target, True)]
        what = f"app {args.app}"
    print(
        f"python {platform.python_version()}, nproc {os.cpu_count()}, "
        f"load {os.getloadavg()[0]:.2f}, {what}, "
        f"loop {args.loop}, http {args.http}; wrk -t{args.threads} -c{args.connections} "
        f"-d{args.duration}s, {args.rounds} "
        f"{'rounds, both servers at once' if args.side_by_side else 'alternating rounds'}"
    )
    watch = Watch.start()
    try:
        for server in servers:
            server.start(server.target, args.loop, args.http)
        for server in servers:
            try:
                wait_ready(server)
            except RuntimeError:
                print(server.log_tail(2000), file=sys.stderr)
                raise
            check(server)
            if args.warmup:
                server.run_wrk(args.threads, args.connections, args.warmup)
        for r in range(args.rounds):
            if args.side_by_side:
                with ThreadPoolExecutor(len(servers)) as pool:
                    futures = [
                        pool.submit(
                            s.measure,
                            args.threads,
                            args.connections,
                            args.duration,
                            client_wakes=False,
                        )
                        for s in servers
                    ]
                    runs = [f.result() for f in futures]
                for server, run in zip(servers, runs, strict=True):
                    print(server.round_line(r, run, 24))
                continue
            for server in servers if r % 2 == 0 else servers[::-1]:
                run = server.measure(
                    args.threads, args.connections, args.duration, profile=args.wakes
                )
                print(server.round_line(r, run, 24))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        for server in servers:
            server.stop(timeout=5)

    print()
    report(servers, wakes=args.wakes)
    base, last = servers[0], servers[-1]
    medians = statistics.median(last.rps) / statistics.median(base.rps)
    rounds = [g / b for g, b in zip(last.rps, base.rps, strict=True)]
    paired = statistics.median(rounds)
    # Side by side the rounds' ratios are the measure; alone, the ratio of the medians.
    ratio = paired if args.side_by_side else medians
    added_user = statistics.median(last.user_us) - statistics.median(base.user_us)
    added_sys = statistics.median(last.sys_us) - statistics.median(base.sys_us)
    print(
        f"\n{last.label}/{base.label} = {ratio:.3f}  ({(1 - ratio) * 100:.1f}% fewer requests/s); "
        f"{last.label} spends {added_user:+.1f} µs user and {added_sys:+.1f} µs system "
        f"CPU per request more"
    )
    print(
        f"ratio of the medians {medians:.3f}; the rounds' ratios: median {paired:.3f}, "
        f"{min(rounds):.3f}..{max(rounds):.3f} ({len(rounds)} rounds)"
    )
    print(f"machine: {watch.summary()}")
    if args.breakdown:
        return 0
    ok = ratio >= 0.90
    how = "median of the rounds' ratios, side by side" if args.side_by_side else "alone"
    print(f"{'PASS' if ok else 'FAIL'}  guarded/bare >= 0.90 ({how}): {ratio:.3f}")
    return 0 if ok else 1


def _wakes(values: list[float]) -> str:
    """wrk's wake-ups per request ("-" when not recorded: side by side)."""
    recorded = [v for v in values if v == v]
    return f"{statistics.median(recorded):.3f}" if recorded else "-"


def report(servers: list[Server], *, wakes: bool) -> None:
    base = statistics.median(servers[0].rps)
    base_user = statistics.median(servers[0].user_us)
    rows = [
        ["server", "median req/s", "min", "max", f"/{servers[0].label}", "µs/req", "p50 ms",
         "p99 ms", "CPU user µs/req", f"user vs {servers[0].label}", "CPU sys µs/req",
         "busy %", "wrk wakes/req", *(["waking wrk µs/req"] if wakes else []), "runs"],
        *[
            [s.label, f"{statistics.median(s.rps):,.0f}", f"{min(s.rps):,.0f}",
             f"{max(s.rps):,.0f}", f"{statistics.median(s.rps) / base:.3f}",
             f"{1e6 / statistics.median(s.rps):.1f}",
             f"{statistics.median(s.p50):.2f}", f"{statistics.median(s.p99):.2f}",
             f"{statistics.median(s.user_us):.1f}",
             f"{statistics.median(s.user_us) - base_user:+.1f}",
             f"{statistics.median(s.sys_us):.1f}",
             f"{statistics.median(s.busy):.0f}", _wakes(s.client_wakes),
             *([f"{statistics.median(s.waking_us):.1f}"] if wakes else []), str(len(s.rps))]
            for s in servers
        ],
    ]  # fmt: skip
    print_table(rows)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
