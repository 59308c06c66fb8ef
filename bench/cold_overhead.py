"""Per-request cost with cold caches: what a middleware costs a server between requests.

In a hot loop (``ratelimit_overhead.py``) a middleware's code and data stay in the CPU's
caches from one request to the next, and it costs a few microseconds. In a server they do
not: uvicorn, the framework and the kernel run between two requests (and, at low load, the
other processes on the machine), so each request finds most of what it touches evicted,
and pays a cache miss (on a VM, often a TLB miss too) for every line of code and data it
reads. Measured through uvicorn, our guards cost several times their hot-loop figure
(``docs/benchmarks.md``).

This script reproduces that in process. It drives each variant directly, as the hot-loop
benchmark does, but before a cold request it reads one byte of every cache line of a buffer
as large as the last-level cache (``--sweep-mb``, default 32; a strided copy), which evicts
what the previous request left, and leaves the evicted lines clean (the timed request pays
no write-backs). It times each request alone (``perf_counter_ns`` around one call), three
ways: *hot* (right after the same request), *cold* (after a sweep), and *between* (after a
sweep and then one request through a bare Starlette app, as a server runs its own code
between two requests: the interpreter's common paths are warm again, what only the guard
uses is not). Variants run interleaved, in a shuffled order each round; "added" is the
median over rounds of the paired difference with the pass-through middleware of the same
round; the cycle collector is off while timing (a collection would land in a random request).

    python bench/cold_overhead.py              # ~30-60 s
    python bench/cold_overhead.py --quick      # ~10 s smoke run
    python bench/cold_overhead.py --rounds 2000 --sweep-mb 64
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
from typing import TYPE_CHECKING, Any

from _asgi import PassThrough, http_scope, raw_app
from _machine import Watch
from _wrk import print_table
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_guard import LoadSheddingMiddleware, RateLimitMiddleware, TimeoutMiddleware

if TYPE_CHECKING:
    from collections.abc import Callable

    from starlette.requests import Request
    from starlette.types import ASGIApp, Message

HIGH = "1000000000/hour"


#: name -> how to build it around the raw app.
VARIANTS: dict[str, Callable[[ASGIApp], ASGIApp]] = {
    "bare app": lambda app: app,
    "pass-through": PassThrough,
    "RateLimitMiddleware, IETF headers": lambda app: RateLimitMiddleware(app, limit=HIGH),
    "RateLimitMiddleware, headers=none": lambda app: RateLimitMiddleware(
        app, limit=HIGH, headers="none"
    ),
    "LoadSheddingMiddleware(limit=8)": lambda app: LoadSheddingMiddleware(app, limit=8),
    "LoadSheddingMiddleware() (adaptive)": lambda app: LoadSheddingMiddleware(app),
    "TimeoutMiddleware(timeout=30)": lambda app: TimeoutMiddleware(app, timeout=30),
}


MODES = ("hot", "cold", "between")


def _starlette_app() -> ASGIApp:
    """A bare Starlette app with one plain-text route: what runs between two requests."""

    async def home(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/", home)])


async def _receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _sink(message: Message) -> None:
    return None


class Sweeper:
    """Reads one byte of every 64-byte line of a buffer of ``mb`` MiB."""

    def __init__(self, mb: int) -> None:
        self.buffer = bytearray(mb << 20)
        self.buffer[::64] = b"\x01" * (len(self.buffer) // 64)  # every page mapped
        self.copy = bytearray()

    def __call__(self) -> None:
        self.copy = self.buffer[::64]  # the copy is the point: it reads every line


async def measure(
    apps: dict[str, ASGIApp], rounds: int, sweep: Sweeper, seed: int
) -> dict[tuple[str, str], list[float]]:
    """(variant, mode) -> µs of each timed request, one per round."""
    scope = http_scope("/", "10.0.0.1")
    other = _starlette_app()
    for app in apps.values():  # warm up: lazy starts, the store's first key
        for _ in range(200):
            await app(scope.copy(), _receive, _sink)
    samples: dict[tuple[str, str], list[float]] = {
        (name, mode): [] for name in apps for mode in MODES
    }
    rng = random.Random(seed)
    order = [(name, mode) for name in apps for mode in MODES]
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            rng.shuffle(order)
            for name, mode in order:
                app = apps[name]
                fresh = scope.copy()
                if mode == "cold":
                    sweep()
                elif mode == "between":
                    sweep()
                    await other(scope.copy(), _receive, _sink)
                else:
                    await app(scope.copy(), _receive, _sink)  # the same request just before
                t0 = time.perf_counter_ns()
                await app(fresh, _receive, _sink)
                samples[name, mode].append((time.perf_counter_ns() - t0) / 1000)
    finally:
        gc.enable()
    return samples


def report(samples: dict[tuple[str, str], list[float]], names: list[str]) -> None:
    base = "pass-through"

    def added(name: str, mode: str) -> float:
        pairs = zip(samples[name, mode], samples[base, mode], strict=True)
        return statistics.median(a - b for a, b in pairs)

    rows = [
        ["variant", "hot µs", "cold µs", "between µs", "hot, added", "cold, added",
         "between, added", "cold/hot, added"]
    ]  # fmt: skip
    for name in names:
        medians = [f"{statistics.median(samples[name, mode]):.2f}" for mode in MODES]
        if name in ("bare app", base):
            rows.append([name, *medians, "-", "-", "-", "-"])
            continue
        a_hot, a_cold, a_between = (added(name, mode) for mode in MODES)
        ratio = f"{a_cold / a_hot:.1f}" if a_hot > 0.05 else "-"
        rows.append([name, *medians, f"{a_hot:+.2f}", f"{a_cold:+.2f}", f"{a_between:+.2f}", ratio])
    print_table(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=1500, help="timed requests per variant")
    parser.add_argument("--sweep-mb", type=int, default=32, help="MiB swept before a cold one")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="~10 s smoke run (200 rounds)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 200
    if args.rounds < 10 or not 1 <= args.sweep_mb <= 1024:
        parser.error("--rounds must be >= 10 and --sweep-mb between 1 and 1024")
    print(
        f"python {platform.python_version()}, nproc {os.cpu_count()}, "
        f"load {os.getloadavg()[0]:.2f}; {args.rounds} rounds, each request timed alone, "
        f"cold = after reading every cache line of {args.sweep_mb} MiB"
    )
    watch = Watch.start()
    apps: dict[str, Any] = {name: build(raw_app) for name, build in VARIANTS.items()}
    samples = asyncio.run(measure(apps, args.rounds, Sweeper(args.sweep_mb), args.seed))
    print()
    report(samples, list(VARIANTS))
    print(f"\nmachine: {watch.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
