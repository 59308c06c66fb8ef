"""Throughput through a real server, bare and behind RateLimitMiddleware, in one server process.

``ratelimit_wrk.py`` compares two uvicorn processes, and two processes of the same code
differ by several percent (their memory layouts, where the scheduler puts them): single
rounds there range from 0.80 to 1.07, and the runs' verdicts from 0.885 to 0.955. Here one
uvicorn worker serves every mode (``bench/_apps.py:toggled``, ``_toggle.Switched``): the
tiny Starlette app bare (``bare``), behind a pass-through middleware (``pass``), or behind
``RateLimitMiddleware`` (``guarded``: one policy far above what the run sends, IETF
headers, the memory store). One wrk saturates it for the whole time (``wrk -t1 -c32``),
while this script switches the mode every ``--window`` seconds in pairs of windows (A then
B, B then A, alternating: the machine's drift cancels) and reads, at each switch, the
requests served, the server's clock and its CPU time. A window runs from just after one
switch to just before the next.

For each pair: requests/s of B over A (the target: guarded/bare >= 0.90, checked on the
median of the pairs' ratios, with a 95% bootstrap interval) and CPU per request of B over
A. ``--versus bare bare`` shows the method's own spread. Two more
modes (Starlette only) take the guarded mode's cost apart: ``no_headers``, the guard with
``headers="none"``, and ``app_headers``, no guard but the app answering with two fields as
long as the guard's. Before measuring, the guarded mode
is checked to answer with ``RateLimit`` headers.

    python bench/ratelimit_toggle.py                     # 240 pairs of 0.25 s (~2.5 min)
    python bench/ratelimit_toggle.py --versus bare bare  # the method's spread
    python bench/ratelimit_toggle.py --app fastapi       # the FastAPI app
    python bench/ratelimit_toggle.py --loop uvloop
"""

from __future__ import annotations

import argparse
import http.client
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from _machine import Watch
from _toggle import (
    WRK_DONE,
    Control,
    add_arguments,
    checked,
    loaded,
    shower,
    summarise,
    verdict,
    windows,
)
from _wrk import Served

MODES = ("bare", "pass", "guarded", "no_headers", "app_headers")
APPS = {"starlette": "bench._apps:toggled", "fastapi": "bench._apps:toggled_fastapi"}
APP_MODES = {"starlette": set(MODES), "fastapi": {"bare", "pass", "guarded"}}
RPS_TARGET = 0.90  # guarded/bare, requests/s at saturation


class Server(Served):
    label = "toggled"


def check_guarded(control: Control) -> None:
    """The guarded mode answers ``GET /`` with the ``RateLimit`` fields, the bare one without."""
    for mode, want in (("guarded", True), ("bare", False)):
        control.switch(mode)
        conn = http.client.HTTPConnection("127.0.0.1", control.port, timeout=10)
        try:
            conn.request("GET", "/")
            response = conn.getresponse()
            response.read()
        finally:
            conn.close()
        if response.status != 200 or (response.getheader("ratelimit") is not None) != want:
            raise RuntimeError(f"mode {mode}: {response.status}, {response.getheaders()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--app", choices=sorted(APPS), default="starlette")
    add_arguments(parser, modes=MODES, versus=("bare", "guarded"), connections=32)
    args = parser.parse_args(argv)
    seconds = checked(parser, args)
    a, b = args.versus
    print(
        f"python {platform.python_version()}, nproc {os.cpu_count()}, "
        f"load {os.getloadavg()[0]:.2f}, app {args.app}, loop {args.loop}; one server, {a} "
        f"vs {b}, {args.pairs} pairs of {args.window:g} s windows; wrk -t1 "
        f"-c{args.connections} (saturation)"
    )
    if {a, b} - APP_MODES[args.app]:
        parser.error(f"--app {args.app} has the modes {', '.join(sorted(APP_MODES[args.app]))}")
    watch = Watch.start()
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp, "done.lua")
        script.write_text(WRK_DONE)
        server = Server()
        server.start(APPS[args.app], args.loop, "auto", None, ("--lifespan", "on"))
        with loaded(server, "bare", seconds, args.connections, str(script)) as (control, load):
            check_guarded(control)
            time.sleep(args.warmup)

            show = shower((a, b), "rps", "req/s", "7,.0f")
            measured = windows(control, (a, b), args.pairs, args.window, show)
            control.switch("bare")
    summarise(
        measured,
        (a, b),
        [("requests/s", "rps", ",.0f"), ("CPU µs/req (all threads)", "cpu_us", ".2f")],
        watch.summary(),
    )
    print(f"wrk: {load.counts}")
    if load.invalid():
        return 1
    return verdict(
        measured,
        (a, b),
        ("bare", "guarded"),
        "rps",
        "requests/s, guarded/bare",
        RPS_TARGET,
        at_most=False,
    )


if __name__ == "__main__":
    sys.exit(main())
