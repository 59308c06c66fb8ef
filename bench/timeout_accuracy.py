"""How late the 504 arrives, through real servers, and how the usual timeout recipes behave.

Part 1, accuracy. Starts a server on 127.0.0.1 (a child process, a free port) serving
``bench._timeout_apps:accuracy``: a FastAPI app behind ``TimeoutMiddleware(timeout=5,
max_timeout=5)`` whose handlers sleep past their deadline (100 ms and 1 s set with the
``asgi_guard.fastapi.timeout`` dependency, 5 s the middleware's own; the 100 ms one also
as a sync ``def`` endpoint stuck in ``time.sleep``). Servers, one at a time: uvicorn
``--loop asyncio``, uvicorn ``--loop uvloop`` and hypercorn ``--worker-class trio``. An
httpx client sends each case with some concurrency (the workers staggered over one
deadline, so the deadlines are spread out) and measures the lateness of every 504:

    lateness = (time the 504 arrived) - (time the request was sent + deadline)

It reports p50/p99/max per server and deadline and whether p99 <= 10 ms (the target), next
to the server-side part of it (how late the keeper fired, from ``on_event``, and when the
504 left the app, from an outermost middleware) and the round trip of a fast request
through the same server, back to back and after 1 s idle (the floor of any lateness).

Part 2, the usual recipes, for contrast (uvicorn, asyncio, 100 ms deadline, a few
requests each): (a) a BaseHTTPMiddleware doing ``asyncio.wait_for(call_next(request),
timeout)``, (b1) a pure ASGI middleware with ``anyio.move_on_after`` around the app that
then sends a 504, (b2) the same with ``anyio.fail_after``, and ``TimeoutMiddleware``, each
on a sync ``def`` handler sleeping 1 s, a streaming response slower than the deadline, and
a quick 200 whose BackgroundTask runs 300 ms. It reports what the client saw and when,
whether the background task finished, and what the server logged.

    python bench/timeout_accuracy.py            # ~4 minutes
    python bench/timeout_accuracy.py --quick    # ~1 minute smoke run
    python bench/timeout_accuracy.py --only recipes   # or: accuracy
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import httpx
from _machine import Watch
from _timeout_apps import (
    BACKGROUND_SLEEP,
    RECIPE_DEADLINE,
    STREAM_CHUNK,
    STREAM_CHUNKS,
    STREAM_GAP,
    SYNC_SLEEP,
)
from _wrk import ROOT, Served, free_port, print_table

TARGET_MS = 10.0


@dataclass
class Server(Served):
    """A uvicorn (``loop`` asyncio or uvloop) or hypercorn (``loop`` trio) child process."""

    label: str
    target: str
    loop: str

    def launch(self) -> None:
        if self.loop != "trio":
            self.start(self.target, self.loop, "auto")
            return
        self.port = free_port()
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - stop() closes it
        cmd = [
            sys.executable, "-m", "hypercorn", self.target,
            "--worker-class", "trio",
            "--bind", f"127.0.0.1:{self.port}",
            "--log-level", "warning",
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        if self.log is None:
            return ""
        self.log.seek(0)
        return self.log.read().decode(errors="replace")


def wait_ready(server: Server, path: str, timeout: float = 20.0) -> None:
    """Until ``path`` answers (the app, not just the socket, is up)."""
    deadline = time.monotonic() + timeout
    assert server.proc is not None
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"{server.label}: exited with {server.proc.returncode}\n{server.log_tail(2000)}"
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.url + path, timeout=1.0).status_code < 500:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{server.label}: {path} did not answer within {timeout} s")


# -- part 1: accuracy -----------------------------------------------------------------------


@dataclass
class Case:
    label: str
    path: str
    deadline: float
    requests: int
    concurrency: int


@dataclass
class Result:
    server: str
    case: Case
    late_ms: list[float] = field(default_factory=list)
    statuses: dict[int | str, int] = field(default_factory=dict)
    keeper_ms: list[float] = field(default_factory=list)
    sent_ms: list[float] = field(default_factory=list)
    timeouts_counted: int = 0


def cases(quick: bool) -> list[Case]:
    if quick:
        return [
            Case("async, 100 ms", "/async/0.1", 0.1, 40, 10),
            Case("sync def, 100 ms", "/sync/0.1", 0.1, 20, 10),
            Case("async, 1 s", "/async/1", 1.0, 20, 10),
            Case("async, 5 s", "/async/5", 5.0, 5, 5),
        ]
    return [
        Case("async, 100 ms", "/async/0.1", 0.1, 400, 10),
        Case("sync def, 100 ms", "/sync/0.1", 0.1, 200, 10),
        Case("async, 1 s", "/async/1", 1.0, 200, 20),
        Case("async, 5 s", "/async/5", 5.0, 100, 25),
    ]


async def timed_gets(
    client: httpx.AsyncClient, url: str, total: int, concurrency: int, stagger: float
) -> list[tuple[float, float, int | str]]:
    """``total`` GETs from ``concurrency`` workers, started ``stagger`` apart.

    Returns (sent, arrived, status or error name) per request, ``time.perf_counter`` seconds.
    """
    out: list[tuple[float, float, int | str]] = []
    left = total

    async def worker(i: int) -> None:
        nonlocal left
        await asyncio.sleep(i * stagger)
        while left > 0:
            left -= 1
            sent = time.perf_counter()
            try:
                status: int | str = (await client.get(url)).status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            out.append((sent, time.perf_counter(), status))

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return out


async def measure_server(
    server: Server, cs: list[Case], floor_n: int, idle_n: int
) -> tuple[list[float], list[float], list[Result]]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=server.url, timeout=30.0, limits=limits) as client:
        # Warm up every route (imports, first thread, the keeper's first wake-ups).
        for c in cs:
            await asyncio.gather(*(client.get(c.path) for _ in range(3)))
        for _ in range(50):
            await client.get("/fast")
        await client.get("/_stats")  # drops the warm-up's events
        floor = [(b - a) * 1e3 for a, b, _ in await timed_gets(client, "/fast", floor_n, 1, 0)]
        idle: list[float] = []
        for _ in range(idle_n):
            await asyncio.sleep(1.0)
            idle += [(b - a) * 1e3 for a, b, _ in await timed_gets(client, "/fast", 1, 1, 0)]
        results = []
        for c in cs:
            before = (await client.get("/_stats")).json()["stats"]["timeouts"]
            got = await timed_gets(
                client, c.path, c.requests, c.concurrency, c.deadline / c.concurrency
            )
            r = Result(server.label, c)
            for sent, arrived, status in got:
                r.statuses[status] = r.statuses.get(status, 0) + 1
                if status == 504:
                    r.late_ms.append((arrived - (sent + c.deadline)) * 1e3)
            # Let the sync handlers still sleeping in their threads finish before the next case.
            await asyncio.sleep(0.5 if c.deadline < 1 else 0.1)
            stats = (await client.get("/_stats")).json()
            r.keeper_ms = [late for path, late in stats["late_ms"] if path == c.path]
            r.sent_ms = [late for path, late in stats["sent_ms"] if path == c.path]
            r.timeouts_counted = stats["stats"]["timeouts"] - before
            results.append(r)
            print(
                f"  {server.label:22} {c.label:17} n={len(got):<4} "
                f"p50 {pct(r.late_ms, 50):6.2f} ms  p99 {pct(r.late_ms, 99):6.2f} ms  "
                f"statuses {r.statuses}",
                flush=True,
            )
    return floor, idle, results


def pct(values: list[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank); NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))]


def three(values: list[float]) -> str:
    """p50/p99/max."""
    if not values:
        return "-"
    return f"{pct(values, 50):.2f}/{pct(values, 99):.2f}/{max(values):.2f}"


def accuracy(servers: list[Server], cs: list[Case], floor_n: int, idle_n: int) -> bool:
    floors: dict[str, tuple[list[float], list[float]]] = {}
    results: list[Result] = []
    for server in servers:
        print(f"{server.label}:", flush=True)
        try:
            server.launch()
            wait_ready(server, "/fast")
            floor, idle, rs = asyncio.run(measure_server(server, cs, floor_n, idle_n))
            floors[server.label] = floor, idle
            results += rs
            log = server.log_text()
        finally:
            server.stop(timeout=10)
        errors = [line for line in log.splitlines() if "Traceback" in line or "ERROR" in line]
        if errors:
            print(f"  server log: {len(errors)} error lines, first: {errors[0][:120]}")

    print(
        "\nlateness of the 504 = arrival at the client - (send + deadline), ms; server side: "
        "when the keeper fired and when the 504 left the app, after arrival + deadline"
    )
    rows = [["server", "case", "n", "504s", "other", "p50", "p99", "max",
             f"> {TARGET_MS:g} ms", "keeper fired p50/p99/max", "504 left app p50/p99/max",
             "counted", f"p99 <= {TARGET_MS:g} ms"]]  # fmt: skip
    ok = True
    for r in results:
        n = sum(r.statuses.values())
        n504 = r.statuses.get(504, 0)
        other = {s: k for s, k in r.statuses.items() if s != 504}
        passed = n504 == n and pct(r.late_ms, 99) <= TARGET_MS
        ok = ok and passed
        rows.append(
            [
                r.server, r.case.label, str(n), str(n504),
                ",".join(f"{s}x{k}" for s, k in other.items()) or "-",
                f"{pct(r.late_ms, 50):.2f}", f"{pct(r.late_ms, 99):.2f}",
                f"{max(r.late_ms, default=float('nan')):.2f}",
                str(sum(late > TARGET_MS for late in r.late_ms)),
                three(r.keeper_ms), three(r.sent_ms),
                str(r.timeouts_counted), "PASS" if passed else "FAIL",
            ]
        )  # fmt: skip
    print_table(rows, left=2)
    print(
        "\nfloor: round trip of GET /fast (guarded, nothing times out), ms: back to back, and "
        "after 1 s idle (a timed-out request also wakes an idle client and server)"
    )
    rows = [["server", "n", "p50", "p99", "max", "n idle", "p50 idle", "max idle"]]
    for label, (floor, idle) in floors.items():
        rows.append(
            [label, str(len(floor)), f"{pct(floor, 50):.2f}", f"{pct(floor, 99):.2f}",
             f"{max(floor):.2f}", str(len(idle)), f"{pct(idle, 50):.2f}", f"{max(idle):.2f}"]
        )  # fmt: skip
    print_table(rows)
    return ok


# -- part 2: the usual recipes --------------------------------------------------------------

RECIPES = (
    ("(a) BaseHTTPMiddleware + asyncio.wait_for", "bench._timeout_apps:recipe_wait_for"),
    ("(b1) pure ASGI + anyio.move_on_after", "bench._timeout_apps:recipe_move_on_after"),
    ("(b2) pure ASGI + anyio.fail_after", "bench._timeout_apps:recipe_fail_after"),
    ("asgi_guard TimeoutMiddleware", "bench._timeout_apps:recipe_asgi_guard"),
)
_LOG_LINE = re.compile(r"^(\w*(Error|Exception|Group)\b.*|.*(ERROR|WARNING).*)$")


@dataclass
class Seen:
    """One request's outcome as the client saw it."""

    status: int | str
    headers_at: float  # seconds after sending
    ended_at: float
    body: int  # bytes received
    complete: bool
    note: str = ""


async def observe(client: httpx.AsyncClient, path: str) -> Seen:
    sent = time.perf_counter()
    try:
        async with client.stream("GET", path) as response:
            headers_at = time.perf_counter() - sent
            body = 0
            complete = True
            note = ""
            try:
                async for chunk in response.aiter_raw():
                    body += len(chunk)
            except httpx.HTTPError as exc:
                complete = False
                note = type(exc).__name__
            return Seen(
                response.status_code, headers_at, time.perf_counter() - sent, body, complete, note
            )
    except httpx.HTTPError as exc:
        t = time.perf_counter() - sent
        return Seen(type(exc).__name__, t, t, 0, False, str(exc)[:60])


def log_summary(text: str) -> list[str]:
    """The distinct error lines the server printed (exception lines, ERROR/WARNING)."""
    found: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if _LOG_LINE.match(line) and "Traceback" not in line:
            short = re.sub(r"\s+", " ", line)[:140]
            if short not in found:
                found.append(short)
    return found


async def recipe_case(server: Server, path: str, reps: int) -> tuple[list[Seen], str, list[str]]:
    """``reps`` requests to ``path`` on a fresh client; what they saw, the background
    counters (for ``/bg``) and what the server logged meanwhile."""
    assert server.log is not None
    server.log.seek(0, os.SEEK_END)
    offset = server.log.tell()
    seen: list[Seen] = []
    background = ""
    async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as client:
        before = (await client.get("/_bg")).json()
        for _ in range(reps):
            seen.append(await observe(client, path))
            # Let the handler, thread or background task run out before the next request.
            await asyncio.sleep(max(SYNC_SLEEP, BACKGROUND_SLEEP, STREAM_CHUNKS * STREAM_GAP) + 0.3)
        if path == "/bg":
            after = (await client.get("/_bg")).json()
            background = (
                f"{after['finished'] - before['finished']}/{after['started'] - before['started']}"
            )
    await asyncio.sleep(0.2)
    server.log.seek(offset)
    logged = server.log.read().decode(errors="replace")
    return seen, background, log_summary(logged)


def describe(seen: list[Seen], path: str) -> list[str]:
    statuses = sorted({str(s.status) for s in seen})
    headers = statistics.median(s.headers_at for s in seen)
    ended = statistics.median(s.ended_at for s in seen)
    full = STREAM_CHUNKS * len(STREAM_CHUNK) if path == "/stream" else None
    complete = sum(s.complete for s in seen)
    bodies = sorted({s.body for s in seen})
    body = f"{'/'.join(map(str, bodies))} B" + (f" of {full}" if full else "")
    notes = sorted({s.note for s in seen if s.note})
    return [
        ",".join(statuses),
        f"{headers * 1e3:.0f}",
        f"{ended * 1e3:.0f}",
        body,
        f"{complete}/{len(seen)}" + (f" ({','.join(notes)})" if notes else ""),
    ]


def recipes(reps: int) -> None:
    cases_ = (
        ("/sync", f"sync def, time.sleep({SYNC_SLEEP:g})"),
        ("/stream", f"stream {STREAM_CHUNKS}x{STREAM_GAP * 1e3:g} ms"),
        ("/bg", f"200 + BackgroundTask {BACKGROUND_SLEEP * 1e3:g} ms"),
    )
    rows = [["recipe", "case", "status", "headers ms", "end ms", "body", "body complete",
             "bg done", "server log"]]  # fmt: skip
    notes: list[str] = []
    for label, target in RECIPES:
        server = Server(label=label, target=target, loop="asyncio")
        print(f"{label}:", flush=True)
        try:
            server.launch()
            wait_ready(server, "/_bg")
            for path, what in cases_:
                seen, background, logged = asyncio.run(recipe_case(server, path, reps))
                marks = []
                for line in logged:
                    if line not in notes:
                        notes.append(line)
                    marks.append(f"[{notes.index(line) + 1}]")
                row = [label, what, *describe(seen, path), background or "-", " ".join(marks)]
                print("  " + "  ".join(row[1:-1]), *logged, flush=True)
                rows.append(row)
        finally:
            server.stop(timeout=10)
    print(
        f"\nthe usual recipes vs TimeoutMiddleware: uvicorn asyncio, deadline "
        f"{RECIPE_DEADLINE * 1e3:g} ms, {reps} request(s) per case, median times after "
        "sending; 'bg done' = background tasks finished/started"
    )
    print_table(rows, left=2)
    print("server log:" if notes else "server log: nothing")
    for i, line in enumerate(notes, 1):
        print(f"  [{i}] {line}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="~1 minute smoke run")
    parser.add_argument("--only", choices=["accuracy", "recipes"], help="run one part")
    parser.add_argument(
        "--servers",
        default="asyncio,uvloop,trio",
        help="comma-separated among asyncio, uvloop (uvicorn) and trio (hypercorn)",
    )
    args = parser.parse_args(argv)
    labels = {
        "asyncio": "uvicorn --loop asyncio",
        "uvloop": "uvicorn --loop uvloop",
        "trio": "hypercorn trio",
    }
    chosen = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not chosen or any(s not in labels for s in chosen):
        parser.error(f"--servers: choose among {', '.join(labels)}")
    cs = cases(args.quick)
    print(
        f"python {platform.python_version()}, nproc {os.cpu_count()}, "
        f"load {os.getloadavg()[0]:.2f}, {'quick' if args.quick else 'full'} run; cases: "
        + "; ".join(f"{c.label} {c.requests} req x{c.concurrency}" for c in cs)
    )
    # The client's own garbage collections would add up to ~15 ms to a measured lateness
    # (this process imported the apps): keep what is alive at startup out of them.
    gc.collect()
    gc.freeze()
    watch = Watch.start()
    ok = True
    try:
        if args.only in (None, "accuracy"):
            servers = [
                Server(label=labels[s], target="bench._timeout_apps:accuracy", loop=s)
                for s in chosen
            ]
            ok = accuracy(servers, cs, 50 if args.quick else 200, 3 if args.quick else 10)
        if args.only in (None, "recipes"):
            print()
            recipes(1 if args.quick else 3)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(f"\nmachine: {watch.summary()}")
    if args.only in (None, "accuracy"):
        print(f"{'PASS' if ok else 'FAIL'}  every 504 on time: p99 lateness <= {TARGET_MS:g} ms")
    return 0 if ok else 1


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
