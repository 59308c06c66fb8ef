"""How well BlockingDetectorMiddleware finds what blocks the loop: the corpus, N times.

Runs the corpus of ``tests/blocking_corpus.py`` in process (no server: the raw ASGI driver
of the tests) through ``BlockingDetectorMiddleware(threshold=0.1)`` (its default poll
interval), one detector per pass: every blocking case (each holds the loop about 0.2 s,
sized on this machine), every legitimate case and, five times, a step blocking for 0.9
thresholds, one request at a time, in a shuffled order; then
rounds of concurrent mixed load (20 requests at once, 8 blocking and 12 legitimate). On
asyncio, and also on trio with ``--trio``. It reports, per backend:

- recall: blocking requests reported / blocking requests (target >= 95%);
- exact line: requests whose report points at the marked line (a C call holding the GIL:
  that line or the next, where the code went on) / blocking requests (target >= 95%);
- false reports: reports during legitimate requests (target 0), and of the steps shorter
  than the threshold (target 0);
- misattributed routes under the mixed load: reports naming another request than the one
  blocking the loop in the middle of the stall they measured (target 0);
- detection latency, for stalls that release the GIL (the blocking calls): from
  ``lab.begin()`` (the handler's ``time.monotonic()`` right before the blocking line) to
  the watchdog emitting the report (its ``_report``, wrapped to timestamp it; the report
  thread then adds its own delay, shown apart), p50/p99 against threshold + poll interval
  + 5 ms (target); that of Python code computing (which takes the GIL back every 5 ms, so
  each look of the watchdog waits for it) is shown for information;
- C calls holding the GIL: how many were reported (once they returned) and labelled
  ``holds_gil``.

Then a table per family of cases, the cases that were not perfect and why, and the
PASS/FAIL lines.

    python bench/blocking_recall.py            # ~2.5 minutes: 3 passes on asyncio
    python bench/blocking_recall.py --trio     # ~5 minutes: also on trio
    python bench/blocking_recall.py --quick    # ~1 minute: 1 pass, 1 mixed round
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import statistics
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import anyio
from _machine import Watch
from _wrk import ROOT, print_table
from starlette.types import ASGIApp

sys.path.insert(0, str(ROOT))

from asgi_guard import BlockingDetectorMiddleware
from tests.asgi_driver import drive, http_scope
from tests.blocking_corpus import (
    BLOCKING,
    LEGIT,
    MIXED_BLOCKING,
    MIXED_LEGIT,
    THRESHOLD,
    UNDER_THRESHOLD,
    Case,
    Lab,
    Verdict,
    Watched,
    build_app,
    judge,
    misattributed,
)


@dataclass
class Results:
    """What one backend's runs found."""

    backend: str
    poll: float
    verdicts: dict[str, list[Verdict]] = field(default_factory=lambda: defaultdict(list))
    stalls: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    latency: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    dispatch: list[float] = field(default_factory=list)
    false_reports: list[tuple[str, str]] = field(default_factory=list)
    legit_requests: int = 0
    under_requests: int = 0
    under_reports: list[str] = field(default_factory=list)
    mixed_reports: int = 0
    mixed_reported: int = 0
    mixed_blocking: int = 0
    wrong: list[str] = field(default_factory=list)
    undelivered: int = 0
    seconds: float = 0.0


def drain(watched: Watched, results: Results) -> None:
    """Stop the detector; count reports never delivered and how long delivery took."""
    watched.detector.stop()
    results.undelivered += len(watched.emitted) - len(watched.events)
    for at, event in watched.emitted:
        if id(event) in watched.delivered:
            results.dispatch.append(watched.delivered[id(event)] - at)


async def one_pass(app: ASGIApp, lab: Lab, results: Results, seed: int) -> None:
    """Every case once, one request at a time, in a shuffled order, under one detector."""
    cases = [*BLOCKING, *LEGIT, *[UNDER_THRESHOLD] * 5]
    random.Random(seed).shuffle(cases)
    watched = Watched(app)
    try:
        for number, case in enumerate(cases):
            method = "POST" if number % 2 else "GET"
            before = len(watched.emitted)
            driven = await drive(watched.detector, http_scope(case.path(), method=method))
            await watched.settle(before + case.blocking)
            if driven.status != 200:
                raise SystemExit(f"{case.name}: status {driven.status}: {driven.body!r}")
            emitted = watched.emitted[before:]
            stall = lab.stalls[-1]
            if case is UNDER_THRESHOLD:
                results.under_requests += 1
                results.under_reports += [e.describe() for _, e in emitted]
                continue
            if not case.blocking:
                results.legit_requests += 1
                results.false_reports += [(case.name, e.describe()) for _, e in emitted]
                continue
            if stall.began is None or stall.ended is None:
                raise SystemExit(f"{case.name}: the case never called lab.begin()")
            results.stalls[case.name].append(stall.ended - stall.began)
            results.verdicts[case.name].append(judge(case, method, [e for _, e in emitted]))
            if emitted and not case.holds_gil:
                results.latency[case.name].append(emitted[0][0] - stall.began)
    finally:
        drain(watched, results)


async def mixed_round(app: ASGIApp, lab: Lab, results: Results, seed: int) -> None:
    """20 requests at once; every report is checked against the request that was blocking."""
    cases = list(MIXED_BLOCKING + MIXED_LEGIT)
    random.Random(seed).shuffle(cases)
    paths = [case.path(1000 * seed + i) for i, case in enumerate(cases)]
    first = len(lab.stalls)
    watched = Watched(app)
    try:
        async with anyio.create_task_group() as group:
            for path in paths:
                group.start_soon(drive, watched.detector, http_scope(path))
        await watched.settle(len(MIXED_BLOCKING))
    finally:
        drain(watched, results)
    stalls = lab.stalls[first:]
    results.mixed_reports += len(watched.emitted)
    results.mixed_blocking += len(MIXED_BLOCKING)
    blamed = {e.path for _, e in watched.emitted}
    results.mixed_reported += sum(
        path in blamed for path, case in zip(paths, cases, strict=True) if case.blocking
    )
    results.wrong += misattributed(stalls, watched.seen)


async def run_backend(app: ASGIApp, lab: Lab, results: Results, passes: int, rounds: int) -> None:
    started = time.monotonic()
    for number in range(passes):
        await one_pass(app, lab, results, seed=number)
    for number in range(1, rounds + 1):
        await mixed_round(app, lab, results, seed=number)
    results.seconds = time.monotonic() - started


# -- reporting ----------------------------------------------------------------------------


def percent(part: int, whole: int) -> str:
    return f"{part}/{whole} ({100 * part / whole:.0f}%)" if whole else "-"


def quantile(values: list[float], q: float) -> float:
    if len(values) < 2:
        return values[0] if values else math.nan
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def family_table(results: Results) -> None:
    rows = [
        [
            "family",
            "cases",
            "reported",
            "exactly once",
            "exact line",
            "right request",
            "label ok",
            "stall p50 / max",
        ]
    ]
    families: dict[str, list[Case]] = defaultdict(list)
    for case in BLOCKING:
        families[case.family].append(case)
    for family, cases in [*families.items(), ("all blocking cases", list(BLOCKING))]:
        verdicts = [v for c in cases for v in results.verdicts[c.name]]
        stalls = [s for c in cases for s in results.stalls[c.name]]
        n = len(verdicts)
        rows.append(
            [
                family,
                str(len(cases)),
                percent(sum(v.reports > 0 for v in verdicts), n),
                percent(sum(v.reports == 1 for v in verdicts), n),
                percent(sum(v.line for v in verdicts), n),
                percent(sum(v.request for v in verdicts), n),
                percent(sum(v.gil_label and v.kind for v in verdicts), n),
                f"{statistics.median(stalls):.2f} / {max(stalls):.2f} s",
            ]
        )
    print_table(rows)


def imperfect_table(results: Results) -> None:
    rows = [["case", "family", "what went wrong", "reported", "exact line", "right request"]]
    for case in BLOCKING:
        verdicts = results.verdicts[case.name]
        if all(v.perfect for v in verdicts):
            continue
        found = Counter(text for v in verdicts for text in v.found)
        rows.append(
            [
                case.name,
                case.family,
                "; ".join(f"{text} (x{count})" for text, count in found.most_common(2)),
                f"{sum(v.reports > 0 for v in verdicts)}/{len(verdicts)}",
                f"{sum(v.line for v in verdicts)}/{len(verdicts)}",
                f"{sum(v.request for v in verdicts)}/{len(verdicts)}",
            ]
        )
    if len(rows) > 1:
        print(f"\ncases not handled perfectly every time ({results.backend}):")
        print_table(rows, left=3)
    else:
        print(f"\nevery case handled perfectly every time ({results.backend})")


def verdicts(results: Results) -> bool:
    all_verdicts = [v for c in BLOCKING for v in results.verdicts[c.name]]
    n = len(all_verdicts)
    reported = sum(v.reports > 0 for v in all_verdicts)
    exact = sum(v.line for v in all_verdicts)
    gil = [v for c in BLOCKING if c.holds_gil for v in results.verdicts[c.name]]
    gil_reported = [v for v in gil if v.reports]
    labelled = sum(v.gil_label for v in gil_reported)
    gil_lines = sum(v.line for v in gil_reported)
    # Stalls that release the GIL: blocking calls. Python code computing (switching the GIL
    # every 5 ms, so the watchdog waits for it at each look) is shown apart.
    latency = sorted(
        t
        for c in BLOCKING
        if c.kind == "blocking_call" and not c.holds_gil
        for t in results.latency[c.name]
    )
    computing = sorted(
        t for c in BLOCKING if c.kind != "blocking_call" for t in results.latency[c.name]
    )
    p50, p99 = quantile(latency, 0.5), quantile(latency, 0.99)
    worst = max(latency, default=math.nan)
    target = THRESHOLD + results.poll + 0.005
    dispatch = sorted(results.dispatch) or [0.0]
    checks: list[tuple[str, bool | None]] = [
        (f"recall {percent(reported, n)} (target >= 95%)", reported >= 0.95 * n),
        (
            f"exact line {percent(exact, n)} of blocking requests, {percent(exact, reported)} "
            "of those reported (target >= 95%)",
            exact >= 0.95 * n,
        ),
        (
            f"false reports on the legitimate corpus: {len(results.false_reports)} in "
            f"{results.legit_requests} requests (target 0)",
            not results.false_reports,
        ),
        (
            f"steps of 0.9 thresholds reported: {len(results.under_reports)} in "
            f"{results.under_requests} (target 0)",
            not results.under_reports,
        ),
        (
            f"misattributed routes under concurrent mixed load: {len(results.wrong)} of "
            f"{results.mixed_reports} reports (target 0); blocking requests reported "
            f"{percent(results.mixed_reported, results.mixed_blocking)}",
            not results.wrong,
        ),
        (
            f"detection latency of blocking calls (releasing the GIL, {len(latency)} reports): "
            f"p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {worst * 1000:.1f} ms "
            f"(target p99 <= threshold + poll + 5 ms = {target * 1000:.0f} ms); the "
            f"report thread adds p50 {quantile(dispatch, 0.5) * 1000:.2f} ms, p99 "
            f"{quantile(dispatch, 0.99) * 1000:.2f} ms",
            p99 <= target,
        ),
        (
            f"detection latency of Python code computing ({len(computing)} reports, for "
            f"information): p50 {quantile(computing, 0.5) * 1000:.1f} ms, p99 "
            f"{quantile(computing, 0.99) * 1000:.1f} ms",
            None,
        ),
        (
            f"C calls holding the GIL: reported {percent(len(gil_reported), len(gil))}, "
            f"labelled holds_gil {percent(labelled, len(gil_reported))}, at the line or the "
            f"next {percent(gil_lines, len(gil_reported))} (reported once they return)",
            len(gil_reported) == len(gil) == labelled,
        ),
    ]
    print()
    for text, ok in checks:
        print(f"{'INFO' if ok is None else 'PASS' if ok else 'FAIL'}  {results.backend}: {text}")
    if results.undelivered:
        print(f"NOTE  {results.backend}: {results.undelivered} reports never reached on_block")
    for text in results.under_reports[:3]:
        print(f"      under the threshold, yet reported: {text}")
    for name, text in results.false_reports[:5]:
        print(f"      false report during {name}: {text}")
    for text in results.wrong[:5]:
        print(f"      misattributed: {text}")
    return all(ok is not False for _, ok in checks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--passes", type=int, default=3, help="runs of the corpus (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="mixed-load rounds (default 3)")
    parser.add_argument("--quick", action="store_true", help="1 pass, 1 mixed round")
    parser.add_argument("--trio", action="store_true", help="also run everything on trio")
    args = parser.parse_args(argv)
    if args.quick:
        args.passes, args.rounds = 1, 1
    if args.passes < 1 or args.rounds < 0:
        parser.error("--passes must be positive and --rounds non-negative")

    watch = Watch.start()
    started = time.monotonic()
    ok = True
    with Lab() as lab:
        app = build_app(lab)
        poll = BlockingDetectorMiddleware(app, threshold=THRESHOLD).poll_interval
        print(
            f"python {platform.python_version()} ({sys.implementation.name}), "
            f"nproc {os.cpu_count()}, load {os.getloadavg()[0]:.2f}; threshold "
            f"{THRESHOLD * 1000:.0f} ms, poll {poll * 1000:.0f} ms; {len(BLOCKING)} blocking "
            f"and {len(LEGIT)} legitimate cases, {args.passes} passes, {args.rounds} mixed "
            f"rounds of {len(MIXED_BLOCKING) + len(MIXED_LEGIT)} requests; corpus sized in "
            f"{time.monotonic() - started:.0f} s"
        )
        for backend in ("asyncio", "trio") if args.trio else ("asyncio",):
            results = Results(backend, poll)
            anyio.run(run_backend, app, lab, results, args.passes, args.rounds, backend=backend)
            print(f"\n{backend} ({results.seconds:.0f} s)")
            family_table(results)
            imperfect_table(results)
            ok = verdicts(results) and ok
    print(f"\nmachine: {watch.summary()}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
