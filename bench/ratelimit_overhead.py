"""Per-request cost of rate limiting, in process, against each library's own baseline.

Drives ASGI apps directly (no HTTP, no server): every variant gets the same prebuilt http
scopes (4096 client IPs in rotation, a limit far above what the run sends, so nothing is
rejected) and the variants run interleaved, in a shuffled order, round after round. The
table shows the median microseconds per request across rounds and what each middleware
adds over its baseline (the raw app, or the bare Starlette app for slowapi), each "added"
figure being the median of the per-round paired differences.

Before timing, every variant is checked with a tiny limit (the third request must get 429,
the exempt path must not) and, after timing, the counters in each store must add up to the
requests sent, so a misconfigured variant cannot look fast by not counting.

    python bench/ratelimit_overhead.py            # ~1 minute
    python bench/ratelimit_overhead.py --quick    # ~10 s smoke run
    python bench/ratelimit_overhead.py --trio     # also our variants on trio
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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from _asgi import http_scope
from _machine import Watch
from limits.storage import MemoryStorage as LimitsSyncMemoryStorage
from ratelimit import RateLimitMiddleware as AsgiRateLimitMiddleware
from ratelimit import Rule as AsgiRateLimitRule
from ratelimit.backends.simple import MemoryBackend
from slowapi import Limiter
from slowapi.middleware import SlowAPIASGIMiddleware, SlowAPIMiddleware
from slowapi.util import get_remote_address
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_guard import Policy, RateLimiter, RateLimitMiddleware

if TYPE_CHECKING:
    from collections.abc import Callable

    from starlette.requests import Request
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

HIGH = "1000000000/hour"
BODY = b"ok"
CLIENTS = 4096  # a power of two: the rotation is an ``&``


# -- the apps under test ------------------------------------------------------------------


async def raw_app(scope: Scope, receive: Receive, send: Send) -> None:
    """The smallest honest ASGI app: a 200 with a two-byte body."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")],
        }
    )
    await send({"type": "http.response.body", "body": BODY})


class PassThrough:
    """A middleware that does nothing: the floor for any middleware."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


async def _home(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def starlette_app() -> Starlette:
    return Starlette(routes=[Route("/", _home), Route("/health", _home)])


async def _peer(scope: Scope) -> tuple[str, str]:
    # asgi-ratelimit's own ``client_ip`` refuses loopback addresses; this is as cheap as ours.
    client = scope["client"]
    return str(client[0]), "default"


# -- variants -----------------------------------------------------------------------------


@dataclass
class Built:
    app: ASGIApp
    counted: Callable[[], int]  # hits the store recorded (or requests it let through)


@dataclass
class Variant:
    name: str
    build: Callable[[bool], Built]  # strict=True: a tiny limit, for the sanity check
    path: str = "/"
    baseline: str = "bare app"
    passthrough: str = "pass-through"
    exempt: bool = False  # requests go to an exempt path: nothing may be counted
    limited: bool = True  # False for the baselines: nothing to count
    trio: bool = True
    samples: list[float] = field(default_factory=list)


def _ours(limit: Any, *, exempt: bool = False, headers: str = "ietf") -> Built:
    limiter = RateLimiter(max_keys=None)
    mw = RateLimitMiddleware(
        raw_app,
        limit=limit,
        limiter=limiter,
        exempt=["/health"] if exempt else (),
        headers=headers,  # type: ignore[arg-type]
    )
    return Built(mw, lambda: mw.stats["allowed"])


def ours_one(strict: bool, **kw: Any) -> Built:
    return _ours(Policy("2/hour" if strict else HIGH, name="default"), **kw)


def ours_three(strict: bool) -> Built:
    policies = [
        Policy("1000000/second", name="a"),
        Policy("1000000/minute", name="b"),
        Policy("2/hour" if strict else "1000000/hour", name="c"),
    ]
    return _ours(policies)


def slowapi_variant(strict: bool, *, asgi: bool, headers: bool = False) -> Built:
    app = starlette_app()
    limiter = Limiter(
        key_func=get_remote_address,
        default_limits=["2/hour" if strict else HIGH],
        headers_enabled=headers,
    )
    app.state.limiter = limiter
    app.add_middleware(SlowAPIASGIMiddleware if asgi else SlowAPIMiddleware)
    storage = limiter._storage
    assert isinstance(storage, LimitsSyncMemoryStorage)
    return Built(app, lambda: sum(storage.storage.values()))


def asgi_ratelimit_variant(strict: bool) -> Built:
    backend = MemoryBackend()  # type: ignore[no-untyped-call,unused-ignore]
    rule = AsgiRateLimitRule(hour=2 if strict else 10**9)
    mw = AsgiRateLimitMiddleware(
        raw_app, authenticate=_peer, backend=backend, config={r"^/": [rule]}
    )

    def counted() -> int:
        return sum(
            (rule.hour or 0) - limit.count
            for rules in backend.blocks.values()
            for limit in rules.values()
        )

    return Built(mw, counted)


def _plain(app: ASGIApp) -> Built:
    return Built(app, lambda: 0)


def variants() -> list[Variant]:
    st = "bare Starlette app"
    st_pt = "Starlette + pass-through"

    def on_starlette(name: str, build: Callable[[bool], Built], *, limited: bool = True) -> Variant:
        """A variant measured against the bare Starlette app and its pass-through (no trio)."""
        return Variant(name, build, baseline=st, passthrough=st_pt, limited=limited, trio=False)

    return [
        Variant("bare app", lambda s: _plain(raw_app), limited=False),
        Variant("pass-through", lambda s: _plain(PassThrough(raw_app)), limited=False),
        Variant("asgi_guard, 1 policy", ours_one),
        Variant("asgi_guard, 1 policy, headers=none", lambda s: ours_one(s, headers="none")),
        Variant("asgi_guard, 3 policies", ours_three),
        Variant(
            "asgi_guard, exempt /health", lambda s: ours_one(s, exempt=True), "/health", exempt=True
        ),
        Variant("asgi-ratelimit (MemoryBackend)", asgi_ratelimit_variant, trio=False),
        on_starlette(st, lambda s: _plain(starlette_app()), limited=False),
        on_starlette(st_pt, lambda s: _plain(_starlette_pt()), limited=False),
        on_starlette("slowapi SlowAPIASGIMiddleware", lambda s: slowapi_variant(s, asgi=True)),
        on_starlette(
            "slowapi SlowAPIASGIMiddleware, headers",
            lambda s: slowapi_variant(s, asgi=True, headers=True),
        ),
        on_starlette("slowapi SlowAPIMiddleware", lambda s: slowapi_variant(s, asgi=False)),
    ]


def _starlette_pt() -> Starlette:
    app = starlette_app()
    app.add_middleware(PassThrough)
    return app


# -- driving ------------------------------------------------------------------------------


def client_ips(n: int) -> list[str]:
    return ["127.0.0.1"] + [f"127.0.{i >> 8 & 255}.{i & 255}" for i in range(2, n + 1)]


async def _receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _sink(message: Message) -> None:
    return None


async def _call(app: ASGIApp, scope: Scope) -> tuple[int, dict[bytes, bytes]]:
    seen: list[Message] = []

    async def send(message: Message) -> None:
        seen.append(message)

    await app(dict(scope), _receive, send)
    start = seen[0]
    return int(start["status"]), dict(start.get("headers", []))


async def sanity(vs: list[Variant]) -> None:
    """Each variant answers 200 and, with a tiny limit, counts (or, if exempt, does not)."""
    for v in vs:
        real = v.build(False)
        status, _ = await _call(real.app, http_scope(v.path, "127.0.0.1"))
        if status != 200:
            raise SystemExit(f"{v.name}: expected 200, got {status}")
        strict = v.build(True)
        scope = http_scope(v.path, "127.0.0.9")
        statuses = [(await _call(strict.app, scope))[0] for _ in range(3)]
        want = [200, 200, 429] if v.limited and not v.exempt else [200, 200, 200]
        if statuses != want:
            raise SystemExit(f"{v.name}: with a limit of 2 expected {want}, got {statuses}")


async def run_block(app: ASGIApp, scopes: list[dict[str, Any]], start: int, n: int) -> float:
    """Send ``n`` requests; return microseconds per request."""
    mask = len(scopes) - 1
    receive, send = _receive, _sink
    t0 = time.perf_counter_ns()
    for i in range(start, start + n):
        await app(scopes[i & mask].copy(), receive, send)
    return (time.perf_counter_ns() - t0) / n / 1000


async def measure(vs: list[Variant], rounds: int, n: int, seed: int) -> dict[str, int]:
    """Run every variant once per round, in a shuffled order; return requests sent each."""
    rng = random.Random(seed)
    ips = client_ips(CLIENTS)
    scopes = {p: [http_scope(p, ip) for ip in ips] for p in {v.path for v in vs}}
    built = {v.name: v.build(False) for v in vs}
    sent = dict.fromkeys(built, 0)
    for v in vs:  # warm up: every key is created before the clock runs
        await run_block(built[v.name].app, scopes[v.path], 0, max(n, CLIENTS))
        sent[v.name] += max(n, CLIENTS)
    for _ in range(rounds):
        order = vs[:]
        rng.shuffle(order)
        for v in order:
            gc.collect()
            v.samples.append(await run_block(built[v.name].app, scopes[v.path], sent[v.name], n))
            sent[v.name] += n
    for v in vs:
        counted = built[v.name].counted()
        if v.limited and not v.exempt and counted != sent[v.name]:
            raise SystemExit(f"{v.name}: the store counted {counted} of {sent[v.name]} requests")
    return sent


# -- reporting ----------------------------------------------------------------------------


def paired_added(v: Variant, base: Variant) -> float:
    return statistics.median(a - b for a, b in zip(v.samples, base.samples, strict=True))


def table(vs: list[Variant]) -> dict[str, float]:
    by = {v.name: v for v in vs}
    rows = [["variant", "µs/req", "IQR", "baseline", "added µs", "x baseline", "vs pass-through"]]
    added: dict[str, float] = {}
    for v in vs:
        med = statistics.median(v.samples)
        q = statistics.quantiles(v.samples, n=4) if len(v.samples) > 1 else [med, med, med]
        base = by.get(v.baseline)
        pt = by.get(v.passthrough)
        if base is None:
            continue
        add = paired_added(v, base)
        added[v.name] = add
        is_base = v.name == v.baseline
        rows.append(
            [
                v.name,
                f"{med:.2f}",
                f"{q[2] - q[0]:.2f}",
                "-" if is_base else v.baseline,
                "-" if is_base else f"{add:+.2f}",
                "-" if is_base else f"{med / statistics.median(base.samples):.2f}",
                "-"
                if pt is None or v.name in (v.passthrough, v.baseline)
                else f"{paired_added(v, pt):+.2f}",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        print(
            "  ".join(
                c.ljust(w) if i in (0, 3) else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if j == 0:
            print("  ".join("-" * w for w in widths))
    return added


def verdicts(added: dict[str, float]) -> bool:
    one = added["asgi_guard, 1 policy"]
    slow = added["slowapi SlowAPIASGIMiddleware"]
    exempt = added["asgi_guard, exempt /health"]
    checks = [
        (f"(a) 1 policy adds <= 10 µs/request: {one:.2f} µs", one <= 10.0),
        (
            f"(b) 1 policy adds < 1/3 of SlowAPIASGIMiddleware's: {one:.2f} vs {slow:.2f} µs "
            f"(ratio {one / slow:.3f}, limit 0.333)"
            if slow > 0
            else "(b) slowapi added nothing?",
            slow > 0 and one < slow / 3,
        ),
        (f"(c) exempt path adds <= 1 µs/request: {exempt:.2f} µs", exempt <= 1.0),
    ]
    for text, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    return all(ok for _, ok in checks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    parser.add_argument(
        "-n", "--requests", type=int, default=5000, help="requests per variant per round"
    )
    parser.add_argument("--seed", type=int, default=1, help="shuffle seed")
    parser.add_argument("--quick", action="store_true", help="~10 s smoke run (5 rounds x 2500)")
    parser.add_argument("--trio", action="store_true", help="also run our variants on trio")
    parser.add_argument("--only", default="", help="comma-separated substrings of variant names")
    parser.add_argument(
        "--profile",
        metavar="VARIANT",
        help="instead of the table, cProfile this variant (e.g. 'asgi_guard, 1 policy')",
    )
    args = parser.parse_args(argv)
    if args.profile:
        return profile(args.profile, args.requests * args.rounds)
    if args.quick:
        args.rounds, args.requests = 5, 2500
    if args.rounds < 1 or args.requests < 1:
        parser.error("--rounds and --requests must be positive")

    print(
        f"python {platform.python_version()} ({sys.implementation.name}), "
        f"nproc {os.cpu_count()}, load {os.getloadavg()[0]:.2f}, "
        f"{args.rounds} rounds x {args.requests} requests per variant, {CLIENTS} client IPs"
    )
    vs = variants()
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        keep = {"bare app", "pass-through", "bare Starlette app", "Starlette + pass-through"}
        vs = [v for v in vs if v.name in keep or any(w in v.name for w in wanted)]
    watch = Watch.start()
    asyncio.run(sanity(vs))
    started = time.monotonic()
    asyncio.run(measure(vs, args.rounds, args.requests, args.seed))
    print(f"\nasyncio ({time.monotonic() - started:.0f} s)")
    added = table(vs)
    ok = True
    if {
        "asgi_guard, 1 policy",
        "slowapi SlowAPIASGIMiddleware",
        "asgi_guard, exempt /health",
    } <= added.keys():
        print()
        ok = verdicts(added)
    if args.trio:
        import trio

        tv = [
            Variant(v.name, v.build, v.path, v.baseline, v.passthrough, v.exempt, v.limited)
            for v in vs
            if v.trio
        ]
        started = time.monotonic()
        trio.run(_trio_measure, tv, args.rounds, args.requests, args.seed)
        print(f"\ntrio ({time.monotonic() - started:.0f} s)")
        table(tv)
    print(f"\nmachine: {watch.summary()}")
    return 0 if ok else 1


def profile(name: str, n: int) -> int:
    """cProfile ``n`` requests of one variant; print the functions by own time."""
    import cProfile
    import pstats

    found = [v for v in variants() if v.name == name]
    if not found:
        print(f"no variant {name!r}; choose one of: {', '.join(v.name for v in variants())}")
        return 2
    v = found[0]
    app = v.build(False).app
    scopes = [http_scope(v.path, ip) for ip in client_ips(CLIENTS)]
    asyncio.run(run_block(app, scopes, 0, CLIENTS))
    profiler = cProfile.Profile()
    profiler.enable()
    asyncio.run(run_block(app, scopes, CLIENTS, n))
    profiler.disable()
    print(f"{name}: {n:,} requests under cProfile (times include the profiler's overhead)")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(18)
    return 0


async def _trio_measure(vs: list[Variant], rounds: int, n: int, seed: int) -> None:
    await sanity(vs)
    await measure(vs, rounds, n, seed)


if __name__ == "__main__":
    sys.exit(main())
