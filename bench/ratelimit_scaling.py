"""How the in-memory store scales with live keys: hits/s at 1k, 100k and 1M keys, bytes per key.

For every size N a fresh store is filled with N keys (client IPs made from integers) through
``RateLimitMiddleware``; then random hits over those N keys are timed, in rounds where the
sizes run back to back in a palindrome (1k, 100k, 1M, 1M, 100k, 1k: a machine that speeds up
or slows down weighs on every size alike), each request carrying a fresh string equal to a
stored key, as a server's would:

* ``middleware + sleep(0)``: a whole request through ``RateLimitMiddleware`` around a raw app,
  with ``await asyncio.sleep(0)`` after each one, so the event loop runs between requests as
  it does in a server (this is the row the 1M/1k target applies to);
* ``store: table.hit``: the memory table alone in a tight loop, the sharpest view of the
  store's own scaling (lookups that miss the CPU caches at 1M keys);
* ``bare app + sleep(0)``: the same loop without the middleware, for reference.

Bytes per key are measured while 1M keys are inserted into a table: ``tracemalloc`` for the
Python objects, plus the size of the arrays the table maps from the OS, cross-checked as the
growth of the resident set of a fresh process doing the same. Last, ``limits``' own async
``MemoryStorage`` + ``FixedWindowRateLimiter`` is compared with ``RateLimiter.hit`` at 1k and
~20k keys with the loop yielding between hits: its expiry task re-scans every key after
nearly every hit (each of its runs is capped in time).

    python bench/ratelimit_scaling.py            # ~1-2 minutes, ~1 GB RAM
    python bench/ratelimit_scaling.py --quick    # ~10 s smoke run (1k/100k keys)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import mmap
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from _asgi import http_scope, raw_app
from _machine import Watch
from limits import parse
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import FixedWindowRateLimiter

from asgi_guard import ManualClock, Policy, RateLimiter, RateLimitMiddleware
from asgi_guard._memory import FlatTable

if TYPE_CHECKING:
    from starlette.types import Message


# A day-long window: a fixed window aligned on the clock must not roll over (and empty the
# store) in the middle of a run; the key count is checked after every round anyway.
HIGH = "1000000000/day"
NAME = "bench"


async def _receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _sink(message: Message) -> None:
    return None


def ip(i: int) -> str:
    """The i-th client address: 10.0.0.0 and up (i < 2**32 - 10 * 2**24)."""
    i += 10 << 24
    return f"{i >> 24}.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"


@dataclass
class Store:
    size: int
    strategy: str
    keys: list[str]
    policy: Policy
    limiter: RateLimiter
    middleware: RateLimitMiddleware
    samples: dict[str, list[float]] = field(default_factory=dict)


async def through(app: Any, keys: list[str], yield_: bool) -> float:
    """Send one request per key through ``app``; return requests per second."""
    template, receive, send, sleep = http_scope(), _receive, _sink, asyncio.sleep
    t0 = time.perf_counter()
    for key in keys:
        scope = template.copy()
        scope["client"] = (key, 1234)
        await app(scope, receive, send)
        if yield_:
            await sleep(0)
    return len(keys) / (time.perf_counter() - t0)


def table_hits(store: Store, keys: list[str]) -> float:
    table = store.limiter._table(f"policy:{NAME}", store.policy.quotas[0], store.strategy)
    if len(table) != store.size:
        raise SystemExit(f"the store holds {len(table)} keys, not {store.size}")
    clock = store.limiter.clock
    hit = table.hit
    t0 = time.perf_counter()
    for key in keys:
        hit(key, 1, clock.now())
    return len(keys) / (time.perf_counter() - t0)


async def build(size: int, strategy: str) -> Store:
    keys = [ip(i) for i in range(size)]
    policy = Policy(HIGH, name=NAME, strategy=strategy)  # type: ignore[arg-type]
    limiter = RateLimiter(max_keys=None)
    mw = RateLimitMiddleware(raw_app, limit=policy, limiter=limiter)
    await through(mw, keys, yield_=False)
    if limiter.keys != size:
        raise SystemExit(f"filling {size} keys left {limiter.keys} in the store")
    return Store(size, strategy, keys, policy, limiter, mw)


ROWS = ("middleware + sleep(0)", "store: table.hit", "bare app + sleep(0)")


def fresh(key: str) -> str:
    """An equal but new string, as a server makes one per connection from the socket address.

    Reusing the stored key objects would make every request touch an old, scattered object
    (a cache miss that grows with N even for the bare app) and skip the key comparison the
    dict does on a real lookup.
    """
    return key.encode().decode()


async def measure(
    stores: list[Store], rounds: int, hits: int, store_hits: int, seed: int, reuse: bool
) -> None:
    """Each round times every (strategy, row) in shuffled order; within one, the sizes run
    back to back in a palindrome (1k, 100k, 1M, 1M, 100k, 1k), so that a machine speeding up
    or slowing down during the run weighs on every size alike. A size's sample for the round
    is its rate over both of its runs."""
    rng = random.Random(seed)
    by_job: dict[tuple[str, str], list[Store]] = {}
    for s in stores:
        for row in ROWS:
            by_job.setdefault((s.strategy, row), []).append(s)
    for _ in range(rounds):
        jobs = list(by_job)
        rng.shuffle(jobs)
        for job in jobs:
            row = job[1]
            ordered = sorted(by_job[job], key=lambda s: s.size)
            count = store_hits if row == "store: table.hit" else hits
            seconds: dict[int, float] = {}
            for s in ordered + ordered[::-1]:
                picked = [s.keys[rng.randrange(s.size)] for _ in range(count)]
                keys = picked if reuse else [fresh(k) for k in picked]
                del picked
                gc.collect()
                if row == "middleware + sleep(0)":
                    rate = await through(s.middleware, keys, yield_=True)
                elif row == "store: table.hit":
                    rate = table_hits(s, keys)
                else:
                    rate = await through(raw_app, keys, yield_=True)
                seconds[s.size] = seconds.get(s.size, 0.0) + count / rate
            for s in ordered:
                s.samples.setdefault(row, []).append(2 * count / seconds[s.size])
        for s in stores:
            if s.limiter.keys != s.size:
                raise SystemExit(f"{s.size} keys: the store now holds {s.limiter.keys} (rollover?)")


def print_table(rows: list[list[str]], left: int = 1) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        cells = (
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        print("  ".join(cells))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def fmt_size(n: int) -> str:
    return (
        f"{n // 1_000_000}M"
        if n >= 1_000_000 and n % 1_000_000 == 0
        else (f"{n // 1000}k" if n % 1000 == 0 else str(n))
    )


def report(stores: list[Store], target_row: str) -> bool:
    sizes = sorted({s.size for s in stores})
    small, large = sizes[0], sizes[-1]
    ok = True
    strategies = sorted({s.strategy for s in stores})
    header = ["strategy", "row", *[f"{fmt_size(n)} keys/s" for n in sizes]]
    header.append(f"{fmt_size(large)}/{fmt_size(small)}")
    header.append("range over rounds")
    rows = [header]
    verdicts = []
    for strategy in strategies:
        by = {s.size: s for s in stores if s.strategy == strategy}
        for row in ROWS:
            if row == "bare app + sleep(0)" and strategy != strategies[0]:
                continue
            med = {n: statistics.median(by[n].samples[row]) for n in sizes}
            paired = [
                a / b for a, b in zip(by[large].samples[row], by[small].samples[row], strict=True)
            ]
            ratio = statistics.median(paired)
            rows.append(
                [
                    strategy if row != "bare app + sleep(0)" else "-",
                    row,
                    *[f"{med[n]:,.0f}" for n in sizes],
                    f"{ratio:.3f}",
                    f"{min(paired):.3f}-{max(paired):.3f}",
                ]
            )
            if row == target_row:
                passed = ratio >= 0.90
                ok = ok and passed
                verdicts.append(
                    f"{'PASS' if passed else 'FAIL'}  {strategy}, {row}: "
                    f"{fmt_size(large)}/{fmt_size(small)} = {ratio:.3f} (target >= 0.90)"
                )
    print_table(rows, left=2)
    print()
    for v in verdicts:
        print(v)
    return ok


def fill(size: int, strategy: str, value: int, turn: bool) -> FlatTable:
    """One table with ``size`` keys; ``turn``: then a generation ends and every key comes back.

    A generation ends when an untouched key would have expired (the token bucket's ``tau``);
    the current array becomes the previous one and each key used again moves to a new array,
    while the old one keeps its memory until the next turn.
    """
    clock = ManualClock(1000.0)
    policy = Policy(HIGH, name=NAME, strategy=strategy)  # type: ignore[arg-type]
    table = RateLimiter(max_keys=None, clock=clock)._table("m", policy.quotas[0], strategy)
    if not isinstance(table, FlatTable):
        raise SystemExit(f"{strategy}: a {type(table).__name__}, not a flat table")
    for i in range(size):
        table.hit(ip(i), value, clock.now())
    if turn:
        clock.advance(table.lifetime + 1)
        for i in range(size):
            table.hit(ip(i), value, clock.now())
    if len(table) != size:
        raise SystemExit(f"{strategy}: {len(table)} keys instead of {size}")
    return table


def arrays(table: FlatTable) -> tuple[int, int]:
    """(bytes of the arrays the table holds, of which mapped from the OS)."""
    views = [table.q, *table.prev] + ([table.src] if table.src is not None else [])
    mapped = sum(v.nbytes for v in views if isinstance(v.obj, mmap.mmap))
    return sum(v.nbytes for v in views), mapped


def bytes_per_key(size: int, strategy: str, value: int, turn: bool) -> tuple[float, float, float]:
    """(total, arrays, other) bytes per key for ``size`` keys in one table.

    ``tracemalloc`` sees the Python objects and the small arrays; the large arrays are
    mapped from the OS, beside Python's allocator, and are counted by their size.
    """
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    table = fill(size, strategy, value, turn)
    traced = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    held, mapped = arrays(table)
    total = traced + mapped
    return total / size, held / size, (total - held) / size


def rss() -> int:
    """Resident set size in bytes (Linux), 0 elsewhere."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def rss_per_key(size: int, strategy: str, value: int, turn: bool) -> float:
    """The same fill in a fresh process without tracemalloc: growth of its resident set.

    A fresh process, because this one's allocator would reuse memory freed by the earlier
    phases and under-count. RSS includes what tracemalloc does not see: the allocator's
    rounding to 16-byte size classes and its arenas.
    """
    out = subprocess.run(
        [sys.executable, __file__, "--rss-child", f"{strategy}:{value}:{size}:{int(turn)}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return float(out.strip().rsplit(maxsplit=1)[-1])


def _rss_child(spec: str) -> None:
    strategy, value, size, turn = spec.split(":")
    gc.collect()
    before = rss()
    table = fill(int(size), strategy, int(value), turn == "1")
    print((rss() - before) / len(table))


def memory(size: int) -> bool:
    rows = [
        [
            "strategy",
            "value",
            "keys",
            "B/key total",
            "arrays",
            "other",
            "RSS growth B/key",
        ]
    ]
    ok = True
    verdicts = []
    for strategy, value, turn, label in (
        ("fixed-window", 1, False, "count"),
        ("token-bucket", 1, False, "float timestamp"),
        ("token-bucket", 1, True, "after a generation turn"),
    ):
        total, held, other = bytes_per_key(size, strategy, value, turn)
        gc.collect()
        resident = rss_per_key(size, strategy, value, turn)
        rows.append(
            [
                strategy,
                label,
                fmt_size(size),
                f"{total:.1f}",
                f"{held:.1f}",
                f"{other:.1f}",
                f"{resident:.1f}",
            ]
        )
        passed = total <= 150
        ok = ok and passed
        verdicts.append(
            f"{'PASS' if passed else 'FAIL'}  {strategy} ({label}): {total:.1f} bytes/key "
            f"at {fmt_size(size)} keys (target <= 150)"
        )
        gc.collect()
    print_table(rows, left=2)
    print()
    for v in verdicts:
        print(v)
    return ok


async def limits_rate(size: int, seconds: float, hits: int, seed: int) -> tuple[float, int]:
    """Hits/s of ``limits``' async MemoryStorage with ``size`` keys, yielding after each hit."""
    storage = MemoryStorage()
    strategy = FixedWindowRateLimiter(storage)
    item = parse(HIGH)
    keys = [ip(i) for i in range(size)]
    for key in keys:  # no yield: its expiry task cannot run yet
        await strategy.hit(item, NAME, key)
    rng = random.Random(seed)
    sample = [keys[rng.randrange(size)] for _ in range(hits)]
    done = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    for key in sample:
        await strategy.hit(item, NAME, key)
        await asyncio.sleep(0)
        done += 1
        if time.perf_counter() > deadline:
            break
    rate = done / (time.perf_counter() - t0)
    if storage.timer is not None:
        storage.timer.cancel()
        await asyncio.sleep(0)
    if len(storage.storage) != size:
        raise SystemExit(f"limits: {len(storage.storage)} keys instead of {size}")
    return rate, done


async def ours_rate(size: int, seconds: float, hits: int, seed: int) -> tuple[float, int]:
    """The same loop over ``RateLimiter.hit`` (the API a dependency uses)."""
    limiter = RateLimiter(max_keys=None)
    policy = Policy(HIGH, name=NAME)
    keys = [ip(i) for i in range(size)]
    for key in keys:
        await limiter.hit(policy, key)
    rng = random.Random(seed)
    sample = [keys[rng.randrange(size)] for _ in range(hits)]
    done = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    for key in sample:
        await limiter.hit(policy, key)
        await asyncio.sleep(0)
        done += 1
        if time.perf_counter() > deadline:
            break
    if limiter.keys != size:
        raise SystemExit(f"asgi_guard: {limiter.keys} keys instead of {size}")
    return (done / (time.perf_counter() - t0)), done


def compare_limits(sizes: list[int], seconds: float, hits: int, seed: int) -> None:
    rows = [
        ["store (fixed window, sleep(0) after each hit)", *[f"{fmt_size(n)} keys/s" for n in sizes]]
    ]
    rows[0].append(f"{fmt_size(sizes[-1])}/{fmt_size(sizes[0])}")
    for label, fn in (
        ("asgi_guard RateLimiter.hit", ours_rate),
        ("limits aio MemoryStorage + FixedWindowRateLimiter", limits_rate),
    ):
        rates = []
        cells = []
        for n in sizes:
            rate, done = asyncio.run(fn(n, seconds, hits, seed))
            rates.append(rate)
            cells.append(f"{rate:,.0f} ({done:,} hits)")
        rows.append([label, *cells, f"{rates[-1] / rates[0]:.3f}"])
    print_table(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1000,100000,1000000", help="live keys per store")
    parser.add_argument(
        "--strategies", default="fixed-window,token-bucket", help="strategies to time"
    )
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds (default 10)")
    parser.add_argument(
        "--hits", type=int, default=10_000, help="requests per size, row and run (default 10,000)"
    )
    parser.add_argument(
        "--store-hits", type=int, default=50_000, help="table.hit per size and run (default 50,000)"
    )
    parser.add_argument("--memory-keys", type=int, default=1_000_000, help="keys for bytes/key")
    parser.add_argument("--limits-sizes", default="1000,20000", help="sizes for the limits run")
    parser.add_argument("--limits-seconds", type=float, default=4.0, help="cap per limits run")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--stored-key-objects",
        action="store_true",
        help="send the stored key objects themselves instead of fresh equal strings",
    )
    parser.add_argument("--quick", action="store_true", help="~10 s smoke run")
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        _rss_child(args.rss_child)
        return 0
    if args.quick:
        args.sizes, args.rounds, args.hits, args.store_hits = "1000,100000", 2, 5000, 20_000
        args.memory_keys, args.limits_sizes, args.limits_seconds = 100_000, "1000,5000", 1.0
    sizes = sorted(int(s) for s in args.sizes.split(","))
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    limits_sizes = sorted(int(s) for s in args.limits_sizes.split(","))
    if len(sizes) < 2 or sizes[0] < 1 or args.rounds < 1 or args.hits < 1:
        parser.error("need at least two positive sizes and positive counts")

    print(
        f"python {platform.python_version()}, nproc {os.cpu_count()}, "
        f"load {os.getloadavg()[0]:.2f}, sizes {', '.join(map(fmt_size, sizes))}, "
        f"{args.rounds} rounds x 2 runs x {args.hits:,} requests "
        f"(table: {args.store_hits:,} hits) per size and row"
    )
    started = time.monotonic()
    watch = Watch.start()

    async def run() -> list[Store]:
        stores = [await build(n, st) for st in strategies for n in sizes]
        filled = time.monotonic()
        print(f"filled {sum(sizes) * len(strategies):,} keys in {filled - started:.0f} s")
        await measure(
            stores, args.rounds, args.hits, args.store_hits, args.seed, args.stored_key_objects
        )
        return stores

    stores = asyncio.run(run())
    print(
        f"\nhits/s, median of {args.rounds} rounds; ratios: median of the rounds' ratios "
        f"({time.monotonic() - started:.0f} s)"
    )
    ok = report(stores, "middleware + sleep(0)")
    del stores
    gc.collect()

    print(f"\nbytes per key (tracemalloc, one table, {fmt_size(args.memory_keys)} keys)")
    ok = memory(args.memory_keys) and ok

    print(f"\nlimits' async memory storage vs ours (each run capped at {args.limits_seconds:g} s)")
    compare_limits(limits_sizes, args.limits_seconds, args.hits, args.seed)
    print(f"\nmachine: {watch.summary()}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
