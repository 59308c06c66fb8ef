"""Per-request cost of TimeoutMiddleware, in process, against a pass-through middleware.

Drives ASGI apps directly (no HTTP, no server). The raw app reads the (empty) request body
and answers a 200 with a two-byte body; nothing times out (a 30 s deadline, 10 s idle and
body limits). Every request runs in a fresh task, as servers run them (asyncio:
``await loop.create_task(app(scope, receive, send))``; trio: a nursery per request), and,
for comparison, also directly in the driver's task. Variants run interleaved, in a
shuffled order, round after round; the table shows the median microseconds per request
across rounds and what each adds over the raw app and over a bare pass-through middleware,
each "added" figure being the median of the per-round paired differences. For context:
a middleware doing only ``with anyio.CancelScope(): await app(...)`` (the floor of any
cancellable deadline), and a Starlette app (a route returning PlainTextResponse) bare,
with a pass-through and with the guard (``add_middleware``).

Before timing, each guarded variant must answer 504 to a handler sleeping past a 50 ms
deadline; after timing its keeper must watch nothing (``live == 0``), its heap must be
bounded and its counters must be zero. After timing, a separate untimed pass counts how
often the guard's keeper task ran per request ("keeper runs/req"; in the same-task mode
the driver never yields, so the keeper cannot run until the end).

    python bench/timeout_overhead.py            # ~35 s
    python bench/timeout_overhead.py --quick    # ~10 s smoke run
    python bench/timeout_overhead.py --trio     # also on trio (~1 minute in all)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

import anyio
import anyio.lowlevel
from _asgi import http_scope
from _machine import Watch
from _wrk import print_table
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from asgi_guard import TimeoutMiddleware
from asgi_guard._deadline import Keeper

TARGET_US = 5.0
GUARD = "TimeoutMiddleware(timeout=30)"
ST_GUARD = "Starlette + TimeoutMiddleware"

# -- the apps under test ------------------------------------------------------------------

START: Message = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")],
}
BODY: Message = {"type": "http.response.body", "body": b"ok"}


async def raw_app(scope: Scope, receive: Receive, send: Send) -> None:
    """A small honest ASGI app: reads the request body, answers 200 with two bytes."""
    await receive()
    await send(START)
    await send(BODY)


class PassThrough:
    """A middleware that does nothing: the floor for any middleware."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


class CancelScopeOnly:
    """Only what any cancellable deadline needs: an anyio cancel scope around the app."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with anyio.CancelScope():
            await self.app(scope, receive, send)


async def _home(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def starlette_app(middleware: Any = None, **options: Any) -> Starlette:
    app = Starlette(routes=[Route("/", _home)])
    if middleware is not None:
        app.add_middleware(middleware, **options)
    return app


def guard(app: ASGIApp, timeout: float = 30.0, **options: Any) -> TimeoutMiddleware:
    return TimeoutMiddleware(app, timeout=timeout, **options)


# -- variants -----------------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    build: Callable[[], ASGIApp]
    baseline: str = "raw app"
    passthrough: str = "pass-through"
    guarded: bool = False
    samples: dict[str, list[float]] = field(default_factory=dict)  # mode -> µs per request
    wakes: dict[str, float] = field(default_factory=dict)  # mode -> keeper runs per request


def variants() -> list[Variant]:
    st, st_pt = "Starlette app", "Starlette + pass-through"
    return [
        Variant("raw app", lambda: raw_app),
        Variant("pass-through", lambda: PassThrough(raw_app)),
        Variant("CancelScope only", lambda: CancelScopeOnly(raw_app)),
        Variant(GUARD, lambda: guard(raw_app), guarded=True),
        Variant(
            "TimeoutMiddleware + idle_timeout=10",
            lambda: guard(raw_app, idle_timeout=10.0),
            guarded=True,
        ),
        Variant(
            "TimeoutMiddleware + body_timeout=10",
            lambda: guard(raw_app, body_timeout=10.0),
            guarded=True,
        ),
        Variant(st, starlette_app, st, st_pt),
        Variant(st_pt, lambda: starlette_app(PassThrough), st, st_pt),
        Variant(
            ST_GUARD,
            lambda: starlette_app(TimeoutMiddleware, timeout=30.0),
            st,
            st_pt,
            guarded=True,
        ),
    ]


def keeper_of(app: ASGIApp) -> TimeoutMiddleware | None:
    """The TimeoutMiddleware in ``app`` (a Starlette app builds its stack on first use)."""
    if isinstance(app, TimeoutMiddleware):
        return app
    node: Any = getattr(app, "middleware_stack", None)
    while node is not None:
        if isinstance(node, TimeoutMiddleware):
            return node
        node = getattr(node, "app", None)
    return None


# -- driving ------------------------------------------------------------------------------

SCOPE = http_scope()
REQUEST: Message = {"type": "http.request", "body": b"", "more_body": False}


async def _receive() -> Message:
    return REQUEST


async def _sink(message: Message) -> None:
    return None


Block = Callable[[ASGIApp, int], Awaitable[float]]


async def asyncio_fresh(app: ASGIApp, n: int) -> float:
    """``n`` requests, each in a new asyncio task; microseconds per request."""
    create_task = asyncio.get_running_loop().create_task
    scope, receive, send = SCOPE, _receive, _sink
    t0 = time.perf_counter_ns()
    for _ in range(n):
        await create_task(app(scope.copy(), receive, send))  # type: ignore[arg-type]
    return (time.perf_counter_ns() - t0) / n / 1000


async def same_task(app: ASGIApp, n: int) -> float:
    """``n`` requests awaited in the driver's own task; microseconds per request."""
    scope, receive, send = SCOPE, _receive, _sink
    t0 = time.perf_counter_ns()
    for _ in range(n):
        await app(scope.copy(), receive, send)
    return (time.perf_counter_ns() - t0) / n / 1000


async def trio_fresh(app: ASGIApp, n: int) -> float:
    """``n`` requests, each in a new trio task (a nursery per request)."""
    import trio

    open_nursery = trio.open_nursery
    scope, receive, send = SCOPE, _receive, _sink
    t0 = time.perf_counter_ns()
    for _ in range(n):
        async with open_nursery() as nursery:
            nursery.start_soon(app, scope.copy(), receive, send)
    return (time.perf_counter_ns() - t0) / n / 1000


async def call(app: ASGIApp) -> tuple[list[Message], float]:
    """One request; the messages the app sent and the seconds it took."""
    sent: list[Message] = []

    async def record(message: Message) -> None:
        sent.append(message)

    t0 = time.monotonic()
    await app(SCOPE.copy(), _receive, record)
    return sent, time.monotonic() - t0


async def sanity(vs: list[Variant]) -> None:
    """Every variant answers 200; the guard, with a 50 ms deadline, 504s a sleeping handler."""
    for v in vs:
        sent, _ = await call(v.build())
        if not sent or sent[0].get("status") != 200:
            raise SystemExit(f"{v.name}: expected 200, got {sent[:1]}")

    async def sleeper(scope: Scope, receive: Receive, send: Send) -> None:
        await anyio.sleep(5)
        await raw_app(scope, receive, send)

    for options in ({}, {"idle_timeout": 10.0}, {"body_timeout": 10.0}):
        sent, took = await call(guard(sleeper, 0.05, **options))
        if not sent or sent[0].get("status") != 504 or took > 1.0:
            raise SystemExit(f"guard {options}: expected a 504 after 50 ms, got {sent[:1]}")


async def measure(
    vs: list[Variant], modes: dict[str, Block], rounds: int, n: int, seed: int
) -> list[str]:
    """Every mode x variant once per round, in a shuffled order; returns problems found."""
    rng = random.Random(seed)
    built = {v.name: v.build() for v in vs}
    for block in modes.values():
        for v in vs:  # warm up
            await block(built[v.name], n)
    pairs = [(mode, v) for mode in modes for v in vs]
    for _ in range(rounds):
        rng.shuffle(pairs)
        for mode, v in pairs:
            gc.collect()
            v.samples.setdefault(mode, []).append(await modes[mode](built[v.name], n))
    await anyio.lowlevel.checkpoint()
    for mode, block in modes.items():
        for v in vs:
            if v.guarded:
                v.wakes[mode] = await keeper_wakes(v, block, n)
    problems = []
    for v in vs:
        if not v.guarded:
            continue
        mw = keeper_of(built[v.name])
        keeper = mw._keeper if mw is not None else None
        if mw is None or keeper is None:
            problems.append(f"{v.name}: no keeper found")
            continue
        heap = len(keeper._heap)
        if keeper.live != 0 or heap > keeper.SLACK + 1 or any(mw.stats.values()):
            problems.append(
                f"{v.name}: after the run keeper.live={keeper.live}, heap={heap}, stats={mw.stats}"
            )
    return problems


async def keeper_wakes(v: Variant, block: Block, n: int) -> float:
    """How often the keeper ran (woke and looked at its heap) per request, after timing."""
    wakes = 0
    fire_due = Keeper._fire_due

    def counting(keeper: Keeper, now: float) -> None:
        nonlocal wakes
        wakes += 1
        fire_due(keeper, now)

    app = v.build()
    await block(app, 100)  # the keeper starts
    await anyio.sleep(0.01)
    Keeper._fire_due = counting  # type: ignore[method-assign,assignment]
    try:
        await block(app, n)
        await anyio.lowlevel.checkpoint()
    finally:
        Keeper._fire_due = fire_due  # type: ignore[method-assign]
    return wakes / n


# -- reporting ----------------------------------------------------------------------------


def paired(v: Variant, base: Variant, mode: str) -> float:
    return statistics.median(
        a - b for a, b in zip(v.samples[mode], base.samples[mode], strict=True)
    )


def table(vs: list[Variant], mode: str) -> dict[str, float]:
    """Print one mode's table; return each variant's µs added over its pass-through."""
    by = {v.name: v for v in vs}
    rows = [
        ["variant", "µs/req", "IQR", "baseline", "added µs", "vs pass-through", "keeper runs/req"]
    ]
    added: dict[str, float] = {}
    for v in vs:
        s = v.samples[mode]
        med = statistics.median(s)
        q = statistics.quantiles(s, n=4) if len(s) > 1 else [med, med, med]
        base, pt = by[v.baseline], by[v.passthrough]
        is_base = v.name == v.baseline
        vs_pt = "-" if v.name in (v.baseline, v.passthrough) else f"{paired(v, pt, mode):+.2f}"
        if vs_pt != "-":
            added[v.name] = paired(v, pt, mode)
        rows.append(
            [
                v.name,
                f"{med:.2f}",
                f"{q[2] - q[0]:.2f}",
                "-" if is_base else v.baseline,
                "-" if is_base else f"{paired(v, base, mode):+.2f}",
                vs_pt,
                f"{v.wakes[mode]:.3f}" if mode in v.wakes else "-",
            ]
        )
    print_table(rows)
    return added


def verdicts(added: dict[str, float], label: str) -> bool:
    ok = True
    for name in added:
        if name.startswith(("TimeoutMiddleware", ST_GUARD)):
            passed = added[name] <= TARGET_US
            ok = ok and passed
            print(
                f"{'PASS' if passed else 'FAIL'}  {label}: {name} adds {added[name]:.2f} µs "
                f"over its pass-through (target <= {TARGET_US:g} µs)"
            )
    return ok


def report(vs: list[Variant], modes: list[str], backend: str, seconds: float) -> bool:
    ok = True
    for mode in modes:
        print(f"\n{backend}, {mode} ({seconds:.0f} s for all modes)")
        added = table(vs, mode)
        if "fresh" in mode:
            ok = verdicts(added, f"{backend}, {mode}") and ok
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    parser.add_argument(
        "-n", "--requests", type=int, default=5000, help="requests per variant per round"
    )
    parser.add_argument("--seed", type=int, default=1, help="shuffle seed")
    parser.add_argument("--quick", action="store_true", help="~10 s smoke run (5 rounds x 2000)")
    parser.add_argument("--trio", action="store_true", help="also run on trio")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.requests = 5, 2000
    if not 1 <= args.rounds <= 200 or not 1 <= args.requests <= 100_000:
        parser.error("--rounds must be in 1..200 and --requests in 1..100000")
    print(
        f"python {platform.python_version()} ({sys.implementation.name}), "
        f"nproc {os.cpu_count()}, load {os.getloadavg()[0]:.2f}, anyio {version('anyio')}, "
        f"{args.rounds} rounds x {args.requests} requests per variant and mode"
    )
    watch = Watch.start()
    vs = variants()
    modes: dict[str, Block] = {"fresh task per request": asyncio_fresh, "same task": same_task}

    async def run_asyncio() -> list[str]:
        await sanity(vs)
        return await measure(vs, modes, args.rounds, args.requests, args.seed)

    started = time.monotonic()
    problems = asyncio.run(run_asyncio())
    ok = report(vs, list(modes), "asyncio", time.monotonic() - started)
    if args.trio:
        import trio

        tv = variants()
        tmodes: dict[str, Block] = {"fresh task per request": trio_fresh, "same task": same_task}

        async def run_trio() -> list[str]:
            await sanity(tv)
            return await measure(tv, tmodes, args.rounds, args.requests, args.seed)

        started = time.monotonic()
        problems += trio.run(run_trio)
        ok = report(tv, list(tmodes), "trio", time.monotonic() - started) and ok
    for problem in problems:
        print(f"FAIL  {problem}")
    print(f"\nmachine: {watch.summary()}")
    return 0 if ok and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
