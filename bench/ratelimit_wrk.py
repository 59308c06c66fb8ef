"""Throughput through a real server: uvicorn + a tiny app, bare and behind RateLimitMiddleware.

Starts two uvicorn servers (one worker each, 127.0.0.1, free ports, no access log), one
serving the bare app and one the same app with ``RateLimitMiddleware`` (one policy, far
above what the run sends, IETF headers), checks that the guarded one answers with
``RateLimit`` headers, then runs ``wrk`` against them alternately (bare, guarded, then
guarded, bare, ...) and reports the median Requests/sec and the ratio guarded/bare.
Only one wrk runs at a time; the idle server uses no CPU. Servers are stopped at the end,
also on errors and Ctrl-C.

    python bench/ratelimit_wrk.py                   # 3 rounds x 10 s per app, ~70 s
    python bench/ratelimit_wrk.py --loop uvloop     # uvloop instead of asyncio
    python bench/ratelimit_wrk.py --app fastapi     # FastAPI instead of Starlette
    python bench/ratelimit_wrk.py --breakdown -d 5  # raw app: pass-through, headers, guard
    python bench/ratelimit_wrk.py --quick           # ~10 s smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from _machine import Watch

ROOT = Path(__file__).resolve().parent.parent
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
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


@dataclass
class Server:
    label: str
    target: str
    headers: bool = False  # whether its responses carry RateLimit headers
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None
    rps: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    user_us: list[float] = field(default_factory=list)
    sys_us: list[float] = field(default_factory=list)
    busy: list[float] = field(default_factory=list)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(server: Server, loop: str, http: str) -> None:
    server.port = free_port()
    server.log = tempfile.TemporaryFile()  # noqa: SIM115 - outlives this call; stop() closes it
    cmd = [
        sys.executable, "-m", "uvicorn", server.target,
        "--app-dir", str(ROOT),
        "--host", "127.0.0.1",
        "--port", str(server.port),
        "--no-access-log",
        "--log-level", "warning",
        "--loop", loop,
        "--http", http,
    ]  # fmt: skip
    server.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=server.log, stderr=subprocess.STDOUT)


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


def server_log(server: Server) -> str:
    if server.log is None:
        return ""
    server.log.seek(0)
    return server.log.read().decode(errors="replace")[-2000:]


def stop(server: Server) -> None:
    proc = server.proc
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    if server.log is not None:
        server.log.close()
        server.log = None


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


def parse_latency(text: str, pct: str) -> float:
    match = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.MULTILINE)
    return float(match.group(1)) * _UNITS[match.group(2)] if match else float("nan")


@dataclass
class WrkRun:
    rps: float
    requests: int
    p50: float
    p99: float
    errors: str


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds the process has used, from /proc (Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan"), float("nan")
    fields = stat[stat.rindex(")") + 2 :].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def run_wrk(server: Server, threads: int, connections: int, duration: int) -> WrkRun:
    """One wrk run against ``server``; refuses runs with errors in the responses."""
    cmd = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency",
        f"http://127.0.0.1:{server.port}/",
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--app", choices=sorted(APPS), default="starlette")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--http", choices=["auto", "h11", "httptools"], default="auto")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("-d", "--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("-t", "--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("-c", "--connections", type=int, default=32, help="wrk connections")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of wrk before measuring")
    parser.add_argument("--quick", action="store_true", help="~10 s smoke run (2 x 2 s)")
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="where the guarded server's time goes: five raw-app variants (use -d 5)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup = 2, 2, 1
    if args.rounds < 1 or args.duration < 1 or args.duration > 60:
        parser.error("--rounds must be >= 1 and --duration between 1 and 60 seconds")
    if shutil.which("wrk") is None:
        parser.error("wrk is not on PATH")

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
        f"-d{args.duration}s, {args.rounds} alternating rounds"
    )
    watch = Watch.start()
    try:
        for server in servers:
            start(server, args.loop, args.http)
        for server in servers:
            try:
                wait_ready(server)
            except RuntimeError:
                print(server_log(server), file=sys.stderr)
                raise
            check(server)
            if args.warmup:
                run_wrk(server, args.threads, args.connections, args.warmup)
        for r in range(args.rounds):
            for server in servers if r % 2 == 0 else servers[::-1]:
                measure(server, args.threads, args.connections, args.duration, r)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        for server in servers:
            stop(server)

    print()
    report(servers)
    base, last = servers[0], servers[-1]
    ratio = statistics.median(last.rps) / statistics.median(base.rps)
    added_user = statistics.median(last.user_us) - statistics.median(base.user_us)
    added_sys = statistics.median(last.sys_us) - statistics.median(base.sys_us)
    print(
        f"\n{last.label}/{base.label} = {ratio:.3f}  ({(1 - ratio) * 100:.1f}% fewer requests/s); "
        f"{last.label} spends {added_user:+.1f} µs user and {added_sys:+.1f} µs system "
        f"CPU per request more"
    )
    print(f"machine: {watch.summary()}")
    if args.breakdown:
        return 0
    ok = ratio >= 0.90
    print(f"{'PASS' if ok else 'FAIL'}  guarded/bare >= 0.90: {ratio:.3f}")
    return 0 if ok else 1


def measure(server: Server, threads: int, connections: int, duration: int, r: int) -> None:
    """One wrk run, with the server's CPU time per request read from /proc around it."""
    assert server.proc is not None
    user0, sys0 = cpu_seconds(server.proc.pid)
    run = run_wrk(server, threads, connections, duration)
    user1, sys1 = cpu_seconds(server.proc.pid)
    server.rps.append(run.rps)
    server.p50.append(run.p50)
    server.p99.append(run.p99)
    server.user_us.append((user1 - user0) / run.requests * 1e6)
    server.sys_us.append((sys1 - sys0) / run.requests * 1e6)
    server.busy.append((user1 - user0 + sys1 - sys0) / duration * 100)
    print(
        f"  round {r + 1}: {server.label:24} {run.rps:>8,.0f} req/s  "
        f"p50 {run.p50:.2f} ms  p99 {run.p99:.2f} ms  server CPU "
        f"{server.user_us[-1]:.1f} user + {server.sys_us[-1]:.1f} sys µs/req, "
        f"{server.busy[-1]:.0f}% busy  {run.errors}".rstrip()
    )


def report(servers: list[Server]) -> None:
    base = statistics.median(servers[0].rps)
    base_user = statistics.median(servers[0].user_us)
    rows = [
        ["server", "median req/s", "min", "max", f"/{servers[0].label}", "µs/req", "p50 ms",
         "p99 ms", "CPU user µs/req", f"user vs {servers[0].label}", "CPU sys µs/req",
         "busy %", "runs"],
        *[
            [s.label, f"{statistics.median(s.rps):,.0f}", f"{min(s.rps):,.0f}",
             f"{max(s.rps):,.0f}", f"{statistics.median(s.rps) / base:.3f}",
             f"{1e6 / statistics.median(s.rps):.1f}",
             f"{statistics.median(s.p50):.2f}", f"{statistics.median(s.p99):.2f}",
             f"{statistics.median(s.user_us):.1f}",
             f"{statistics.median(s.user_us) - base_user:+.1f}",
             f"{statistics.median(s.sys_us):.1f}",
             f"{statistics.median(s.busy):.0f}", str(len(s.rps))]
            for s in servers
        ],
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for j, row in enumerate(rows):
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if j == 0:
            print("  ".join("-" * w for w in widths))


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
