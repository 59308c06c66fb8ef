"""Bytes per key of the token-bucket memory store across a generation turn.

Fills a table with N fresh client-IP keys, lets a generation end, brings every key but one
back (as fresh strings, as a server's requests would), and prints the bytes per key that
``tracemalloc`` counts before and after the turn, and the peak during it:

    python bench/ratelimit_memory_turn.py                 # 1,000,000 and 699,052 keys
    python bench/ratelimit_memory_turn.py --sizes 100000  # quicker
"""

from __future__ import annotations

import argparse
import gc
import tracemalloc

from asgi_guard._memory import TokenBucketTable

TARGET = 150.0


def ip(i: int) -> str:
    return f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"


def measure(n: int) -> tuple[float, float, float]:
    gc.collect()
    tracemalloc.start()
    table = TokenBucketTable(100, 60.0, 100, None)
    for i in range(n):
        table.hit(ip(i), 1, 0.0)
    fill = tracemalloc.get_traced_memory()[0] / n
    for i in range(1, n):  # the turn happens at the first of these hits
        table.hit(ip(i), 1, 61.0)
    gc.collect()
    after, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return fill, after / len(table), peak / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,699052", help="keys, comma-separated")
    args = parser.parse_args()
    print("| keys | B/key filled | B/key after the turn | B/key peak during the turn |")
    print("|--:|--:|--:|--:|")
    worst = 0.0
    for n in (int(s) for s in args.sizes.split(",")):
        fill, after, peak = measure(n)
        worst = max(worst, fill, after)
        print(f"| {n:,} | {fill:.1f} | {after:.1f} | {peak:.1f} |")
    verdict = "PASS" if worst <= TARGET else "FAIL"
    print(f"{verdict}: steady state at most {worst:.1f} B/key (target {TARGET:.0f})")


if __name__ == "__main__":
    main()
