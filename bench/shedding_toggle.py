"""What LoadSheddingMiddleware costs an admitted request at half load, in one server process.

``overload.py --scenarios overhead`` compares server processes, and two processes of the
same code differ here by more than the 30 µs being measured: a pass-through middleware
came out at +5.8 µs in one run and +30.1 µs in another. Here one uvicorn worker serves
every mode (``bench/_overload_apps.py:shed_toggled``, ``_toggle.Switched``): the
overload benchmark's FastAPI app unguarded (``none``), behind a pass-through middleware
(``pass``), behind ``LoadSheddingMiddleware(limit=8)`` (``fixed``) or behind the default
``LoadSheddingMiddleware()`` (``default``: the adaptive algorithm, paced starts, its
ticker). A guarded mode's ticker runs in that mode's windows only: the switch starts it
on entering the mode and stops it on leaving, outside the windows (its algorithm keeps
what it learned). At this load the ticker naps a second at a time, so it never wakes
within a quarter-second window: its one wake-up a second, at most about 0.25 ms of CPU on
this machine (waking an idle loop), would add at most about 1.7 µs per request at 150
requests/s, and is left out of the figure.

The load is ``GET /light`` (the 1 ms sleep and the JSON, without ``/work``'s CPU loop:
what a guard adds stands out) at about ``--rate`` requests a second: one wrk, ``-c``
connections, each waiting an exponential time between a response and its next request
(about Poisson arrivals: the gaps the ticker and the loop see at half load). The script
switches the mode every ``--window`` seconds (480 pairs of 0.25 s by default: 120 of 1 s
gave an interval twice as wide) in pairs of windows (A then B, B then A, alternating: the
machine's drift cancels) and reads, at each switch, the requests served and the process's
CPU time (all threads). A window runs from just after one switch to just before the next.

For each pair: the CPU per request of B minus A (µs) and their ratio. The target
(``none`` vs ``default``: at most 30 µs a request at 0.5x) is checked on the median of the
pairs' differences, with a 95% bootstrap interval. ``--versus none none`` shows the
method's own spread. The guards must refuse nothing at this load (checked).

    python bench/shedding_toggle.py                      # none vs default (~4 min)
    python bench/shedding_toggle.py --versus none none   # the method's spread
    python bench/shedding_toggle.py --versus pass default
    python bench/shedding_toggle.py --versus none fixed
    python bench/shedding_toggle.py --rate 100 --loop uvloop
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _machine import Watch
from _toggle import (
    WRK_DONE,
    Window,
    add_arguments,
    bootstrap,
    checked,
    loaded,
    shower,
    summarise,
    windows,
)
from _wrk import Served

MODES = ("none", "pass", "fixed", "default")
OVERHEAD_US = 30.0  # default - none, server CPU per request at 0.5x C
#: Each connection waits an exponential time (mean MEAN ms) between a response and its
#: next request.
_POISSON_LUA = """
wrk.path = "/light"
function delay()
  return -MEAN * math.log(1 - math.random())
end
"""


class Server(Served):
    label = "toggled"


def differences(measured: list[tuple[Window, Window]]) -> list[float]:
    """Each pair's CPU per request, B - A (µs)."""
    return [b.cpu_us - a.cpu_us for a, b in measured]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser, modes=MODES, versus=("none", "default"), connections=16, pairs=480)
    parser.add_argument(
        "--rate", type=float, default=150.0,
        help="requests/s to aim at, about half a worker's capacity C (default 150)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    seconds = checked(parser, args)
    if not 10 <= args.rate <= 5000:
        parser.error("--rate: 10..5000 requests/s")
    # A request takes about 1.5 ms here; each connection waits the rest of its cycle.
    mean_ms = max(1.0, 1000.0 * args.connections / args.rate - 1.5)
    a, b = args.versus
    print(
        f"python {platform.python_version()}, nproc {os.cpu_count()}, "
        f"load {os.getloadavg()[0]:.2f}, loop {args.loop}; one server, {a} vs {b}, "
        f"{args.pairs} pairs of {args.window:g} s windows; GET /light at about "
        f"{args.rate:g}/s (wrk -t1 -c{args.connections}, exponential waits of {mean_ms:.1f} "
        "ms on average)"
    )
    watch = Watch.start()
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp, "poisson.lua")
        script.write_text(_POISSON_LUA.replace("MEAN", f"{mean_ms:.3f}") + WRK_DONE)
        server = Server()
        server.start("bench._overload_apps:shed_toggled", args.loop, "auto", None,
                     ("--lifespan", "on"))  # fmt: skip
        with loaded(server, "none", seconds, args.connections, str(script)) as (control, load):
            for mode in dict.fromkeys((a, b)):  # each app's stack built, its guard warm
                control.switch(mode)
                time.sleep(args.warmup / 2)
            first = control.switch(a)

            show = shower((a, b), "cpu_us", "µs/req", "7.1f")
            measured = windows(control, (a, b), args.pairs, args.window, show)
            last = control.switch("none")
    summarise(
        measured,
        (a, b),
        [
            ("requests/s", "rps", ".1f"),
            ("CPU µs/req (all threads)", "cpu_us", ".2f"),
            ("  of which the loop thread", "loop_us", ".2f"),
        ],
        watch.summary(),
    )
    diffs = differences(measured)
    low, high = bootstrap(diffs)
    median = statistics.median(diffs)
    print(
        f"CPU per request, {b} - {a}: {median:+.2f} µs (median of {len(diffs)} pairs; 95% CI "
        f"{low:+.2f}..{high:+.2f}; mean {statistics.fmean(diffs):+.2f})"
    )
    refused = last["refused"] - first["refused"]
    admitted = last["admitted"] - first["admitted"]
    # Back in mode none every guard's ticker has been stopped.
    print(
        f"wrk: {load.counts}; the guards admitted {admitted} and refused {refused} while "
        f"measuring; tickers running after the last switch: {last['tickers']}"
    )
    if load.invalid():
        return 1
    if refused or last["tickers"]:
        print("FAIL  the guards refused requests at this load, or a ticker was left running")
        return 1
    if (a, b) != ("none", "default"):
        return 0
    ok = median <= OVERHEAD_US
    print(
        f"{'PASS' if ok else 'FAIL'}  overhead at 0.5x <= {OVERHEAD_US:g} µs/request (server "
        f"CPU, default - none): {median:+.2f} (95% CI {low:+.2f}..{high:+.2f})"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
