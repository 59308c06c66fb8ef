"""Does TimeoutMiddleware leak when thousands of requests time out? Tasks, threads, memory.

In process (a raw ASGI driver, like a server: every request in a fresh task, ``receive``
gives the empty body then waits for the response to end and reports a disconnect), on
asyncio (and trio with ``--trio``):

1. 10,000 requests (5 batches of 2,000, at most 200 in flight) to an async handler
   sleeping 1 s behind ``TimeoutMiddleware(timeout=0.02)``: every one must get exactly one
   response, a 504, and the app must not raise (a cancellation escaping the middleware
   makes a server log an error and close the connection). After each batch (gc.collect):
   the event loop's tasks, the threads, tracemalloc's traced memory and the RSS. Growth
   per request = (after the last batch - after the first) / the requests in between; the
   first batch is the warm-up (the RSS counts from the second: a tracemalloc snapshot,
   untraced, lives from then on). Within twice the batch-to-batch noise counts as no
   growth (trio's own deadline heap is pruned lazily: a sawtooth in small batches).
2. 500 requests (at most 20 in flight) to a sync ``def`` endpoint (Starlette) that
   ``time.sleep``s 50 ms past the same 20 ms deadline: 504s on time, and the worker
   threads return to the baseline (anyio keeps idle workers for 10 s and prunes them at
   the next thread call, so the script waits 11 s and makes one).

At the end the middleware's keeper must watch nothing (``live == 0``), its heap must be
empty and ``stats["timeouts"]`` must count every request. With a server (default; skip
with ``--no-server``) the same batches go through a real uvicorn
(``bench._timeout_apps:leaks``, asyncio loop) from an httpx client, and the server reports
its own tasks, threads, RSS and keeper from an exempt ``/_debug`` route.

    python bench/timeout_leaks.py            # ~1 minute
    python bench/timeout_leaks.py --quick    # ~30 s smoke run (2,000 + 100 requests)
    python bench/timeout_leaks.py --trio     # also in process on trio
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
import sys
import threading
import time
import tracemalloc
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
from _asgi import http_scope
from _machine import Watch
from _wrk import Served, print_table
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from asgi_guard import TimeoutMiddleware

DEADLINE = 0.02
_EXCEPTION = re.compile(r"^[\w.]+(Error|Exception|Group)\b")
#: Growth per request above which a run counts as leaking. A request that stayed alive
#: (its budget, scope, closures and task) would be well over 1 KB.
TRACED_LIMIT = 64.0
RSS_LIMIT = 512.0


def rss_kib() -> int:
    try:
        return (
            int(Path("/proc/self/statm").read_text().split()[1])
            * os.sysconf("SC_PAGE_SIZE")
            // 1024
        )
    except OSError:
        return -1


def task_count() -> int:
    """Tasks of the running event loop (asyncio) or trio run."""
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:
        import trio

        def count(task: Any) -> int:
            return 1 + sum(
                count(child) for nursery in task.child_nurseries for child in nursery.child_tasks
            )

        return count(trio.lowlevel.current_root_task())


# -- the apps -------------------------------------------------------------------------------


async def slow_async(scope: Scope, receive: Receive, send: Send) -> None:
    await anyio.sleep(1.0)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"late"})


def sync_app(finished: list[int]) -> Starlette:
    def slow_sync(request: Request) -> Response:
        time.sleep(DEADLINE + 0.05)
        finished.append(1)
        return PlainTextResponse("late")

    return Starlette(routes=[Route("/", slow_sync)])


# -- the driver -----------------------------------------------------------------------------


class Outcome:
    """What the requests of a run saw; lateness in a preallocated array, so that keeping
    it allocates nothing per request (tracemalloc would count it)."""

    def __init__(self, capacity: int) -> None:
        self.late = array("d", bytes(8 * capacity))
        self.count = 0
        self.bad: list[str] = []  # the first few wrong answers
        self.wrong_count = 0
        self.escaped = 0  # cancellations that came out of the app

    @property
    def late_ms(self) -> list[float]:
        return list(self.late[: self.count])

    def on_time(self, late_ms: float) -> None:
        self.late[self.count] = late_ms
        self.count += 1

    def wrong(self, text: str) -> None:
        self.wrong_count += 1
        if len(self.bad) < 5:
            self.bad.append(text)

    def summary(self) -> str:
        if not self.wrong_count:
            return ""
        return (
            f"; {self.wrong_count} wrong ({self.escaped} raised a cancellation out of the "
            f"app), e.g. {self.bad[0]}"
        )


async def one(app: ASGIApp, out: Outcome) -> None:
    """One request as a server runs it; checks it got exactly one response, a 504."""
    done = anyio.Event()
    first = True
    starts: list[int] = []
    ended = 0.0

    async def receive() -> Message:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": b"", "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal ended
        if message["type"] == "http.response.start":
            starts.append(message["status"])
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            ended = time.monotonic()
            done.set()

    t0 = time.monotonic()
    try:
        await app(http_scope(), receive, send)
    except anyio.get_cancelled_exc_class() as exc:
        # Nothing here cancels the request task: this came out of the middleware (a server
        # would log "Exception in ASGI application" and close the connection).
        out.escaped += 1
        out.wrong(f"the app raised {exc!r}")
    except Exception as exc:
        out.wrong(f"the app raised {exc!r}")
    done.set()
    if starts != [504] or not ended:
        out.wrong(f"response starts {starts}, body ended: {bool(ended)}")
    else:
        out.on_time((ended - t0 - DEADLINE) * 1e3)


async def batch(app: ASGIApp, n: int, concurrency: int, out: Outcome) -> None:
    limiter = anyio.Semaphore(concurrency)

    async def run() -> None:
        try:
            await one(app, out)
        finally:
            limiter.release()

    async with anyio.create_task_group() as task_group:
        for _ in range(n):
            await limiter.acquire()
            task_group.start_soon(run)


@dataclass
class Sample:
    requests: int
    tasks: int
    threads: int
    traced: int  # bytes
    rss: int  # KiB


def sample(requests: int) -> Sample:
    rss = rss_kib()
    return Sample(
        requests, task_count(), threading.active_count(), tracemalloc.get_traced_memory()[0], rss
    )


async def settle() -> None:
    await anyio.sleep(0.1)
    gc.collect()


def keeper_state(mw: TimeoutMiddleware) -> tuple[int, int]:
    keeper = mw._keeper
    return (len(keeper._heap), keeper.live) if keeper is not None else (-1, -1)


@dataclass
class Report:
    backend: str
    outcome: Outcome
    sync_outcome: Outcome
    samples: list[Sample] = field(default_factory=list)
    heap: int = -1
    live: int = -1
    stats: dict[str, int] = field(default_factory=dict)
    sync_stats: dict[str, int] = field(default_factory=dict)
    threads_base: int = 0
    threads_peak: int = 0
    threads_returned: int = 0
    threads_pruned: int = 0
    sync_done: int = 0
    sync_heap: int = -1
    sync_live: int = -1
    tasks_base: int = 0
    seconds: float = 0.0
    top_growth: list[str] = field(default_factory=list)


async def in_process(backend: str, total: int, batches: int, sync_n: int) -> Report:
    report = Report(backend, Outcome(total), Outcome(sync_n))
    t_start = time.monotonic()
    mw = TimeoutMiddleware(slow_async, timeout=DEADLINE)
    await settle()
    report.tasks_base = task_count()
    report.samples.append(sample(0))
    per = total // batches
    first: tracemalloc.Snapshot | None = None
    for b in range(batches):
        await batch(mw, per, 200, report.outcome)
        await settle()
        report.samples.append(sample((b + 1) * per))
        if first is None:
            # Its memory is not traced but is in the RSS: RSS growth counts from batch 2.
            first = tracemalloc.take_snapshot()
    report.heap, report.live = keeper_state(mw)
    report.stats = dict(mw.stats)
    assert first is not None
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
    diff = (
        tracemalloc.take_snapshot()
        .filter_traces(ignore)
        .compare_to(first.filter_traces(ignore), "lineno")
    )
    del first
    report.top_growth = [f"{d.size_diff / 1024:+.1f} KiB {d.traceback}" for d in diff[:3]]

    # Sync endpoints: the threads they hold must come back.
    finished: list[int] = []
    smw = TimeoutMiddleware(sync_app(finished), timeout=DEADLINE)
    report.threads_base = threading.active_count()
    peak = report.threads_base

    async def watch_threads() -> None:
        nonlocal peak
        while True:
            peak = max(peak, threading.active_count())
            await anyio.sleep(0.005)

    async with anyio.create_task_group() as task_group:
        task_group.start_soon(watch_threads)
        await batch(smw, sync_n, 20, report.sync_outcome)
        task_group.cancel_scope.cancel()
    await settle()
    report.threads_peak = peak
    report.threads_returned = threading.active_count()
    report.sync_done = len(finished)
    report.sync_heap, report.sync_live = keeper_state(smw)
    report.sync_stats = dict(smw.stats)
    await anyio.sleep(11.0)  # anyio prunes workers idle for 10 s at the next thread call
    await anyio.to_thread.run_sync(lambda: None)
    report.threads_pruned = threading.active_count()
    report.seconds = time.monotonic() - t_start
    return report


# -- through uvicorn ------------------------------------------------------------------------


@dataclass
class ServerReport:
    debug: list[dict[str, Any]] = field(default_factory=list)
    requests: list[int] = field(default_factory=list)
    statuses: dict[int | str, int] = field(default_factory=dict)
    sync_statuses: dict[int | str, int] = field(default_factory=dict)
    sync_debug: dict[str, Any] = field(default_factory=dict)
    log: str = ""


@dataclass
class LeakServer(Served):
    label: str = "uvicorn asyncio"


async def through_server(port: int, total: int, batches: int, sync_n: int) -> ServerReport:
    out = ServerReport()
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", timeout=10.0, limits=limits
    ) as client:

        async def get(path: str, statuses: dict[int | str, int], sem: anyio.Semaphore) -> None:
            try:
                status: int | str = (await client.get(path)).status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            finally:
                sem.release()
            statuses[status] = statuses.get(status, 0) + 1

        async def send(path: str, n: int, concurrency: int, statuses: dict[int | str, int]) -> None:
            sem = anyio.Semaphore(concurrency)
            async with anyio.create_task_group() as task_group:
                for _ in range(n):
                    await sem.acquire()
                    task_group.start_soon(get, path, statuses, sem)

        out.debug.append((await client.get("/_debug")).json())
        out.requests.append(0)
        per = total // batches
        for b in range(batches):
            await send("/slow", per, 100, out.statuses)
            await anyio.sleep(0.2)
            out.debug.append((await client.get("/_debug")).json())
            out.requests.append((b + 1) * per)
        await send("/slow_sync", sync_n, 20, out.sync_statuses)
        await anyio.sleep(0.3)
        out.sync_debug = (await client.get("/_debug")).json()
    return out


def run_server(total: int, batches: int, sync_n: int) -> ServerReport:
    server = LeakServer()
    try:
        server.start("bench._timeout_apps:leaks", "asyncio", "auto")
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if (
                    httpx.get(f"http://127.0.0.1:{server.port}/_debug", timeout=1).status_code
                    == 200
                ):
                    break
            if time.monotonic() > deadline or (server.proc and server.proc.poll() is not None):
                raise RuntimeError(f"uvicorn did not come up:\n{server.log_tail(2000)}")
            time.sleep(0.1)
        out = asyncio.run(through_server(server.port, total, batches, sync_n))
        out.log = server.log_tail(10**7)
        return out
    finally:
        server.stop(timeout=10)


# -- reporting ------------------------------------------------------------------------------


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))]


def growth(first: float, last: float, requests: int) -> float:
    return (last - first) / requests if requests else float("nan")


def print_report(r: Report, total: int, sync_n: int) -> bool:
    print(f"\n{r.backend}, in process ({r.seconds:.0f} s)")
    rows = [["after requests", "tasks", "threads", "traced KiB", "RSS KiB"]]
    for s in r.samples:
        rows.append(
            [
                f"{s.requests:,}",
                str(s.tasks),
                str(s.threads),
                f"{s.traced / 1024:,.0f}",
                f"{s.rss:,}",
            ]
        )
    print_table(rows)
    first, last = r.samples[1], r.samples[-1]
    between = last.requests - first.requests
    traced = growth(first.traced, last.traced, between)
    rss_from = r.samples[2] if len(r.samples) > 3 else first  # see in_process
    rss_between = last.requests - rss_from.requests
    rss = growth(rss_from.rss * 1024, last.rss * 1024, rss_between)
    steps = [b.traced - a.traced for a, b in zip(r.samples[1:], r.samples[2:], strict=False)]
    noise = statistics.pstdev(steps) / (between / max(1, len(steps))) if len(steps) > 1 else 0.0
    late = r.outcome.late_ms
    sync_late = r.sync_outcome.late_ms
    checks: list[tuple[str, str, bool]] = [
        (
            "async: every request got one 504",
            f"{len(late):,}/{total:,}" + r.outcome.summary(),
            len(late) == total and not r.outcome.bad,
        ),
        (
            "async: 504 lateness in process p50/p99/max",
            f"{pct(late, 50):.2f}/{pct(late, 99):.2f}/{max(late, default=float('nan')):.2f} ms "
            "(tracemalloc on)",
            True,
        ),
        (
            "stats['timeouts'] counts them",
            f"{r.stats.get('timeouts')} (stats {r.stats})",
            r.stats.get("timeouts") == total,
        ),
        (
            "tasks back to baseline (+1: the keeper)",
            f"{r.samples[0].tasks} before, {last.tasks} after",
            last.tasks <= r.samples[0].tasks + 1,
        ),
        (
            "threads unchanged by async requests",
            f"{r.samples[0].threads} before, {last.threads} after",
            last.threads == r.samples[0].threads,
        ),
        (
            f"traced memory growth <= {TRACED_LIMIT:g} B/request",
            f"{traced:+.1f} B/request over the last {between:,} (batch-to-batch noise "
            f"±{noise:.1f} B/request{'; within noise' if traced > TRACED_LIMIT else ''})",
            traced <= TRACED_LIMIT or traced <= 2 * noise,
        ),
        (
            f"RSS growth <= {RSS_LIMIT:g} B/request",
            f"{rss:+.1f} B/request over the last {rss_between:,} ({rss_from.rss:,} -> "
            f"{last.rss:,} KiB)",
            rss <= RSS_LIMIT,
        ),
        (
            "keeper: heap empty, live == 0",
            f"heap {r.heap}, live {r.live}",
            r.heap == 0 and r.live == 0,
        ),
        (
            f"sync def: every request got one 504 ({sync_n})",
            f"{len(sync_late)}/{sync_n}, lateness p50/p99/max "
            f"{pct(sync_late, 50):.2f}/{pct(sync_late, 99):.2f}/"
            f"{max(sync_late, default=float('nan')):.2f} ms" + r.sync_outcome.summary(),
            len(sync_late) == sync_n and not r.sync_outcome.bad,
        ),
        (
            "sync def: 504s on time (p99 <= 10 ms)",
            f"p99 {pct(sync_late, 99):.2f} ms",
            pct(sync_late, 99) <= 10.0,
        ),
        (
            "sync def: every handler ran to its end",
            f"{r.sync_done}/{sync_n}; stats {r.sync_stats}",
            r.sync_done == sync_n,
        ),
        (
            "sync def: keeper heap empty, live == 0",
            f"heap {r.sync_heap}, live {r.sync_live}",
            r.sync_heap == 0 and r.sync_live == 0,
        ),
        (
            "sync def: threads back to baseline",
            f"{r.threads_base} before, peak {r.threads_peak}, {r.threads_returned} right after "
            f"(idle anyio workers), {r.threads_pruned} after 11 s idle + one thread call",
            r.threads_pruned <= r.threads_base + 1,
        ),
    ]
    ok = verdict_table(checks)
    print("traced memory, largest growth from the first batch to the last, by line:")
    for line in r.top_growth:
        print(f"  {line}")
    return ok


def verdict_table(checks: list[tuple[str, str, bool]]) -> bool:
    rows = [["check", "observed", "verdict"]]
    rows += [[name, seen, "PASS" if ok else "FAIL"] for name, seen, ok in checks]
    print_table(rows, left=2)
    return all(ok for _, _, ok in checks)


def print_server(out: ServerReport, total: int, sync_n: int) -> bool:
    print("\nthrough uvicorn (asyncio loop, httpx client, 100 in flight), as the server reports it")
    rows = [["after requests", "tasks", "threads", "RSS KiB", "keeper heap", "live", "timeouts"]]
    for n, d in zip(out.requests, out.debug, strict=True):
        rows.append(
            [f"{n:,}", str(d["tasks"]), str(d["threads"]), f"{d['rss_kib']:,}", str(d["heap"]),
             str(d["live"]), str(d["stats"]["timeouts"])]
        )  # fmt: skip
    print_table(rows)
    first, last, base = out.debug[1], out.debug[-1], out.debug[0]
    between = out.requests[-1] - out.requests[1]
    rss = growth(first["rss_kib"] * 1024, last["rss_kib"] * 1024, between)
    s = out.sync_debug
    base_timeouts = base["stats"]["timeouts"]
    checks = [
        (
            "async: all 504",
            str(out.statuses),
            out.statuses == {504: total},
        ),
        (
            "server tasks back to baseline",
            f"{first['tasks']} after the first batch, {last['tasks']} after the last",
            last["tasks"] <= first["tasks"],
        ),
        (
            f"server RSS growth <= {RSS_LIMIT:g} B/request",
            f"{rss:+.1f} B/request ({first['rss_kib']:,} -> {last['rss_kib']:,} KiB)",
            rss <= RSS_LIMIT,
        ),
        (
            "keeper heap empty, live == 0",
            f"heap {last['heap']}, live {last['live']}",
            last["heap"] == 0 and last["live"] == 0,
        ),
        (
            "stats['timeouts'] counts them",
            str(last["stats"]["timeouts"] - base_timeouts),
            last["stats"]["timeouts"] - base_timeouts == total,
        ),
        (
            f"sync def: all 504 ({sync_n})",
            str(out.sync_statuses),
            out.sync_statuses == {504: sync_n},
        ),
        (
            "sync def: keeper heap empty, live == 0",
            f"heap {s['heap']}, live {s['live']}; threads {s['threads']} (idle anyio workers)",
            s["heap"] == 0 and s["live"] == 0,
        ),
    ]
    errors = [line for line in out.log.splitlines() if line.startswith("ERROR")]
    raised = sorted(
        {line.strip()[:90] for line in out.log.splitlines() if _EXCEPTION.match(line.strip())}
    )
    checks.append(
        (
            "server log: no errors",
            f"{len(errors)} ERROR lines" + (f", raised: {' | '.join(raised)}" if raised else "")
            if errors
            else "-",
            not errors,
        )
    )
    return verdict_table(checks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="~30 s smoke run")
    parser.add_argument("--trio", action="store_true", help="also in process on trio")
    parser.add_argument("--no-server", action="store_true", help="skip the uvicorn run")
    args = parser.parse_args(argv)
    total, sync_n = (2_000, 100) if args.quick else (10_000, 500)
    batches = 5
    print(
        f"python {platform.python_version()}, nproc {os.cpu_count()}, "
        f"load {os.getloadavg()[0]:.2f}, deadline {DEADLINE * 1e3:g} ms, {total:,} async "
        f"requests in {batches} batches, {sync_n} sync def requests"
    )
    watch = Watch.start()
    tracemalloc.start()
    backends = ["asyncio", "trio"] if args.trio else ["asyncio"]
    reports = [
        anyio.run(in_process, backend, total, batches, sync_n, backend=backend)
        for backend in backends
    ]
    tracemalloc.stop()
    ok = True
    for r in reports:
        ok = print_report(r, total, sync_n) and ok
    if not args.no_server:
        out = run_server(total, batches, sync_n)
        ok = print_server(out, total, sync_n) and ok
    print(f"\nmachine: {watch.summary()}")
    print(f"{'PASS' if ok else 'FAIL'}  no leak found")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
