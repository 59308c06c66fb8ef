"""What BlockingDetectorMiddleware costs a real server, measured inside one server process.

``blocking_overhead.py`` compares two server processes, and two processes of the same code
differ by ±3% per round on a small VM (their memory layouts, where the scheduler puts them):
a 1% difference then takes more rounds than a run can afford. Here one uvicorn worker
serves every mode (``bench/_blocking_apps.py:toggled``, ``_toggle.Switched``): the same
FastAPI app (``GET /`` awaits 1 ms and answers a small JSON) without the detector
(``off``), behind a pass-through middleware (``pass``), or behind
``BlockingDetectorMiddleware(threshold=0.1)`` (``on``, started when switched to and stopped
when switched away from: its heartbeat, watchdog thread and tap run only in its windows).
One wrk runs a steady load for the whole time (1 thread, 8 connections, each waiting a
random 0-5 ms between a response and its next request: a closed loop, about 1,650
requests/s here), while this script switches the
mode every ``--window`` seconds in pairs of windows, A then B or B then A (alternating: the
machine's drift cancels; quarter-second windows follow it more closely than 1 s ones,
which gave a confidence interval twice as wide for the same time), and reads, at each
switch, the requests served and the process's CPU time (all threads, also the detector's
threads that have ended since). A window runs from just after one switch to just before
the next, so the switches themselves are left out.

For each pair, the CPU time per request of B over A; the verdict is on the median of those
ratios (with a 95% bootstrap interval). ``--versus off off`` shows the method's own spread.
At the end: how often the detector beats and its watchdog looks under this load (5 s in mode
B, or ``on`` when B is ``off`` or ``pass``), no stall reported while measuring, and in mode
``on`` a 150 ms ``time.sleep`` on the loop reported once.

    python bench/blocking_toggle.py                      # off vs on, 240 pairs of 0.25 s (~2.5 min)
    python bench/blocking_toggle.py --versus off off     # the method's spread
    python bench/blocking_toggle.py --versus pass on     # against a pass-through middleware
    python bench/blocking_toggle.py --versus pass requests   # the per-request work alone
    python bench/blocking_toggle.py --loop uvloop

Modes besides ``off``, ``pass`` and ``on``: the ``--breakdown`` variants of
``blocking_overhead.py`` (``requests``: the per-request work alone; ``heartbeat``: and its
heartbeat task; ``sleeper``: and a thread that never wakes; ``notap``; ``polling``;
``quiet``: beats that move no timer and read no clock), and ``beats``: the detector with a
poll interval of 4 ms, beating about six times as often (a beat's cost, amplified).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from _machine import Watch
from _toggle import (
    WRK_DONE,
    add_arguments,
    checked,
    loaded,
    shower,
    summarise,
    verdict,
    windows,
)
from _wrk import Served

MODES = (
    "off",
    "pass",
    "on",
    "requests",
    "heartbeat",
    "sleeper",
    "notap",
    "polling",
    "quiet",
    "beats",
)
CPU_TARGET = 1.01  # on/off, server CPU per request
_THINK_LUA = """
function delay()
  return math.random(0, THINK)
end
"""


class Server(Served):
    label = "toggled"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser, modes=MODES, versus=("off", "on"), connections=8)
    parser.add_argument("--think", type=int, default=5, help="ms, most between requests")
    args = parser.parse_args(argv)
    seconds = checked(parser, args)
    a, b = args.versus
    print(
        f"python {platform.python_version()}, nproc {os.cpu_count()}, "
        f"load {os.getloadavg()[0]:.2f}, loop {args.loop}; one server, {a} vs {b}, "
        f"{args.pairs} pairs of {args.window:g} s windows; wrk -t1 -c{args.connections}, "
        f"0-{args.think} ms between requests"
    )
    watch = Watch.start()
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp, "steady.lua")
        script.write_text(_THINK_LUA.replace("THINK", str(args.think)) + WRK_DONE)
        server = Server()
        server.start("bench._blocking_apps:toggled", args.loop, "auto", None,
                     ("--lifespan", "on"))  # fmt: skip
        with loaded(server, "off", seconds, args.connections, str(script)) as (control, load):
            time.sleep(args.warmup)
            first = control.switch("off")
            reports_before, tasks_before = first["blocks"], first["tasks"]

            show = shower((a, b), "cpu_us", "µs/req", "6.1f")
            measured = windows(control, (a, b), args.pairs, args.window, show)
            # How often the detector (mode B, if it is one) beats and its watchdog looks
            # under this load, once started (a start makes a look of its own).
            probe = b if b not in ("off", "pass") else "on"
            control.switch(probe)
            time.sleep(1.0)
            start = control.switch(probe)
            time.sleep(5.0)
            end = control.switch(probe)
            span = end["before"]["t"] - start["after"]["t"]
            beats = (end["beats"] - start["beats"]) / span
            looks = (end["looks"] - start["looks"]) / span
            final = control.switch("off")
            false_reports = final["blocks"] - reports_before
            # Switching leaves no task behind (a heartbeat, say, beating in later windows);
            # requests in flight, one task each, make the count move by up to the connections.
            tasks_left = final["tasks"] - tasks_before
            # The detector still detects after all those switches.
            control.switch("on")
            control.get("/_block")
            deadline = time.monotonic() + 2.0
            while (blocks := control.get("/_stats")["blocks"]) == final["blocks"]:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            detected = blocks - final["blocks"]
            watchdog = control.get("/_stats")["watchdog"]
            control.switch("off")
    summarise(
        measured,
        (a, b),
        [
            ("CPU µs/req (all threads)", "cpu_us", ".2f"),
            ("  of which the loop thread", "loop_us", ".2f"),
        ],
        watch.summary(),
    )
    print(
        f"wrk: {load.counts}; stalls reported while measuring: {false_reports}; tasks left "
        f"by the switches: {tasks_left}; "
        f"a 150 ms stall in mode on reported {detected} time(s), watchdog alive: {watchdog}; "
        f"in mode {probe}, {beats:.0f} beats and {looks:.1f} looks a second"
    )
    quiet = false_reports == 0 and tasks_left <= args.connections
    ok_checks = quiet and detected == 1 and watchdog is True
    if load.invalid():
        return 1
    if not ok_checks:
        print("FAIL  the detector's checks (see the line above)")
        return 1
    return verdict(
        measured,
        (a, b),
        ("off", "on"),
        "cpu_us",
        "server CPU per request, on/off",
        CPU_TARGET,
        at_most=True,
    )


if __name__ == "__main__":
    sys.exit(main())
