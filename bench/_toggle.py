"""One server process, several apps behind a switch: comparisons without the spread of processes.

Two server processes of the same code differ by several percent on a small VM (their memory
layouts, where the scheduler puts them), which hides a difference of 1%. ``Switched`` is an
ASGI app that serves every request with one of several apps (its modes) and switches
between them on ``GET /_mode?to=<mode>``, answering what it had served and the process's
CPU time just before and just after the switch. ``windows`` drives it: while a load runs,
it switches between two modes in pairs of short windows (A then B, B then A, alternating,
so that the machine's drift cancels) and returns each window's figures. Used by
``blocking_toggle.py``, ``ratelimit_toggle.py`` and ``shedding_toggle.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.types import ASGIApp, Receive, Scope, Send


class Switched:
    """Serves each request with the app of the current mode; ``GET /_mode?to=<mode>``
    switches (``on_leave`` and ``on_enter`` run then, between the two readings), and
    requests for ``counted`` (``GET /`` unless told) are counted. Lifespan is answered
    here and never reaches the apps (a guard's lifespan would start tasks that run in
    every mode's windows)."""

    def __init__(self, modes: Mapping[str, ASGIApp], first: str, *, counted: str = "/") -> None:
        self.modes = dict(modes)
        self.mode = first
        self.counted = counted
        self.served = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            if scope["path"] == "/_mode":
                await self._switch(scope, send)
                return
            if scope["path"] == self.counted:
                self.served += 1
        elif kind == "lifespan":
            await answer_lifespan(receive, send)
            return
        await self.modes[self.mode](scope, receive, send)

    def on_leave(self, app: ASGIApp) -> None:
        """Called when the switch leaves ``app`` (before it enters the next)."""

    async def on_enter(self, app: ASGIApp) -> None:
        """Called when the switch enters ``app``."""

    def extra(self) -> dict[str, Any]:
        """More for the switch's answer."""
        return {}

    def _reading(self) -> dict[str, float]:
        return {
            "served": self.served,
            "t": time.monotonic(),
            "cpu": time.process_time(),
            "loop": time.thread_time(),
        }

    async def _switch(self, scope: Scope, send: Send) -> None:
        before = self._reading()
        to = scope["query_string"].decode().removeprefix("to=")
        if to not in self.modes:
            body, status = json.dumps({"error": f"unknown mode {to!r}"}).encode(), 400
        else:
            if to != self.mode:
                self.on_leave(self.modes[self.mode])
                await self.on_enter(self.modes[to])
            self.mode = to
            extra = self.extra()  # before the reading: its cost is left out of the windows
            after = self._reading()
            body, status = json.dumps({"before": before, "after": after, **extra}).encode(), 200
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


async def answer_lifespan(receive: Receive, send: Send) -> None:
    """Answer the lifespan protocol's startup and shutdown (for apps that have none)."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


class Control:
    """Talks to a ``Switched`` server (a new connection each time: a window may outlast
    uvicorn's keep-alive timeout)."""

    def __init__(self, port: int) -> None:
        self.port = port

    def get(self, path: str) -> dict[str, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        if response.status != 200:
            raise RuntimeError(f"GET {path} answered {response.status}: {body[:200]!r}")
        data: dict[str, Any] = json.loads(body)
        return data

    def switch(self, mode: str) -> dict[str, Any]:
        return self.get(f"/_mode?to={mode}")


@dataclass
class Window:
    """What one mode did over one window."""

    requests: int
    seconds: float
    cpu_us: float  # CPU per request, all threads
    loop_us: float  # of which the loop thread

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def window(start: Mapping[str, float], end: Mapping[str, float]) -> Window:
    n = int(end["served"] - start["served"])
    if n <= 0:
        raise RuntimeError("a window served no requests: is the load running?")
    return Window(
        requests=n,
        seconds=end["t"] - start["t"],
        cpu_us=(end["cpu"] - start["cpu"]) / n * 1e6,
        loop_us=(end["loop"] - start["loop"]) / n * 1e6,
    )


def windows(
    control: Control,
    versus: tuple[str, str],
    pairs: int,
    seconds: float,
    show: Callable[[int, Window, Window], None],
) -> list[tuple[Window, Window]]:
    """``pairs`` pairs of windows of ``seconds``, A then B or B then A (alternating), each
    (A, B); ``show`` is called after each pair."""
    a, b = versus
    result: list[tuple[Window, Window]] = []
    for i in range(pairs):
        order = (a, b) if i % 2 == 0 else (b, a)
        measured = []
        for mode in order:
            start = control.switch(mode)["after"]
            time.sleep(seconds)
            measured.append(window(start, control.switch(mode)["before"]))
        first, second = measured if i % 2 == 0 else measured[::-1]
        result.append((first, second))
        show(i, first, second)
    return result


def bootstrap(values: list[float], rounds: int = 2000) -> tuple[float, float]:
    """A 95% bootstrap interval of the median (a fixed seed: the same data, the same CI)."""
    rng = random.Random(1)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(rounds))
    return medians[int(0.025 * rounds)], medians[int(0.975 * rounds) - 1]


def summary_row(label: str, a: list[float], b: list[float], fmt: str) -> list[str]:
    """A table row: medians of A and B, the median paired ratio B/A, its 95% CI, the mean
    ± standard error and the range of the ratios."""
    ratios = [y / x for x, y in zip(a, b, strict=True)]
    low, high = bootstrap(ratios)
    # The geometric mean (the mean of a ratio of two noisy windows is biased upwards; the
    # mean of the logs is not, and is the same whichever mode is A).
    logs = [math.log(r) for r in ratios]
    se = statistics.stdev(logs) / len(logs) ** 0.5 if len(logs) > 1 else float("nan")
    return [
        label, format(statistics.median(a), fmt), format(statistics.median(b), fmt),
        f"{statistics.median(ratios):.4f}", f"{low:.4f}..{high:.4f}",
        f"{math.exp(statistics.fmean(logs)):.4f} (s.e. {se:.4f} in log)",
        f"{min(ratios):.3f}..{max(ratios):.3f}",
    ]  # fmt: skip


HEADER = [
    "measure", "A", "B", "B/A, paired (median)", "95% CI", "geometric mean (s.e.)", "min..max"
]  # fmt: skip


#: wrk's Lua ``done`` hook: the counts this module's callers check.
WRK_DONE = """
function done(summary, latency, requests)
  io.write(string.format("RESULT requests=%d status=%d connect=%d read=%d timeout=%d\\n",
    summary.requests, summary.errors.status, summary.errors.connect, summary.errors.read,
    summary.errors.timeout))
end
"""


class Wrk:
    """One wrk in the background for a whole measurement of about ``seconds`` (``script``: a
    Lua file, which should include `WRK_DONE`). It is given twice the time, and more, since
    the switches take time of their own (a saturated server answers them after the requests
    ahead); `stop` interrupts it."""

    def __init__(
        self, port: int, seconds: float, connections: int, script: str, threads: int = 1
    ) -> None:
        self.proc = subprocess.Popen(
            ["wrk", f"-t{threads}", f"-c{connections}", f"-d{math.ceil(2 * seconds) + 30}s", "-s",
             script, f"http://127.0.0.1:{port}/"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        #: After `stop`: wrk's counts (None: it printed none), and whether it had ended
        #: before it was stopped (the load did not last the whole measurement).
        self.counts: dict[str, int] | None = None
        self.ended_early = False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # wrk prints its summary on SIGINT
        else:
            self.ended_early = True
        try:
            out = self.proc.communicate(timeout=10)[0]
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            return
        match = re.search(r"^RESULT (.*)$", out, re.MULTILINE)
        if match is not None:
            self.counts = {k: int(v) for k, v in (kv.split("=") for kv in match.group(1).split())}

    def invalid(self) -> bool:
        """Whether the load went wrong (then said on stderr): the run is not valid."""
        problems = self.problems()
        if problems:
            print(f"FAIL  {problems}: the run is not valid", file=sys.stderr)
        return bool(problems)

    def problems(self) -> str:
        """What went wrong with the load, or an empty string."""
        if self.ended_early:
            return "wrk ended before the measurement did"
        if self.counts is None:
            return "wrk printed no summary"
        errors = {k: v for k, v in self.counts.items() if k != "requests" and v}
        return f"wrk reported errors: {errors}" if errors else ""


class _Server(Protocol):
    port: int
    proc: subprocess.Popen[bytes] | None

    def stop(self, timeout: float) -> None: ...
    def log_tail(self, chars: int) -> str: ...


@contextlib.contextmanager
def loaded(
    server: _Server, first: str, seconds: float, connections: int, script: str
) -> Iterator[tuple[Control, Wrk]]:
    """A started server switched to ``first``, under a `Wrk` load: ``(control, load)``. On
    the way out the load and then the server are stopped, whatever happens (the server's
    last output is printed when something failed)."""
    load: Wrk | None = None
    try:
        control = ready(server.port, server.proc, first)
        load = Wrk(server.port, seconds, connections, script)
        yield control, load
    except BaseException:
        print(server.log_tail(2000), file=sys.stderr)
        raise
    finally:
        try:
            if load is not None:
                load.stop()
        finally:
            server.stop(timeout=5)


def ready(
    port: int, proc: subprocess.Popen[bytes] | None, mode: str, timeout: float = 20.0
) -> Control:
    """Wait until the server on ``port`` answers a switch to ``mode``; its `Control`."""
    if proc is None:
        raise RuntimeError("the server was not started")
    deadline = time.monotonic() + timeout
    control = Control(port)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"uvicorn exited with {proc.returncode}")
        try:
            control.switch(mode)
            return control
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not answer within {timeout} s")


def add_arguments(
    parser: argparse.ArgumentParser,
    *,
    modes: tuple[str, ...],
    versus: tuple[str, str],
    connections: int,
    pairs: int = 240,
) -> None:
    """The options both one-process benchmarks take (``--versus``: two of ``modes``)."""
    parser.add_argument(
        "--versus", nargs=2, default=list(versus), choices=modes, metavar=("A", "B"),
        help=f"the two modes (default: {' '.join(versus)})",
    )  # fmt: skip
    parser.add_argument(
        "--pairs", type=int, default=pairs, help=f"pairs of windows (default {pairs})"
    )
    parser.add_argument("--window", type=float, default=0.25, help="seconds per window")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("-c", "--connections", type=int, default=connections,
                        help=f"wrk connections (default {connections})")  # fmt: skip
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")


def checked(parser: argparse.ArgumentParser, args: argparse.Namespace) -> float:
    """Check `add_arguments`' options (and that wrk is there); the measurement's seconds."""
    if not 1 <= args.pairs <= 2000 or not 0.1 <= args.window <= 30:
        parser.error("--pairs: 1..2000; --window: 0.1..30 s")
    if not 1 <= args.connections <= 1000 or not 0 <= args.warmup <= 60:
        parser.error("--connections: 1..1000; --warmup: 0..60 s")
    if shutil.which("wrk") is None:
        parser.error("wrk is not on PATH")
    return float(args.warmup + 2 * args.pairs * args.window)


def shower(
    versus: tuple[str, str], figure: str, unit: str, fmt: str
) -> Callable[[int, Window, Window], None]:
    """A `windows` callback printing each pair's ``figure`` (a `Window` attribute) and ratio."""
    a, b = versus

    def show(i: int, first: Window, second: Window) -> None:
        x, y = getattr(first, figure), getattr(second, figure)
        print(
            f"  pair {i + 1:3}: {a} {x:{fmt}} {unit} ({first.requests} req) | {b} {y:{fmt}} "
            f"{unit} ({second.requests} req) | ratio {y / x:.3f}"
        )

    return show


def summarise(
    measured: list[tuple[Window, Window]],
    versus: tuple[str, str],
    figures: list[tuple[str, str, str]],
    machine: str,
) -> None:
    """Print the table of ``figures`` (label, `Window` attribute, format) over the pairs."""
    from _wrk import print_table  # only the scripts summarise (uvicorn imports this too)

    rows = [[HEADER[0], *versus, *HEADER[3:]]]
    for label, figure, fmt in figures:
        rows.append(
            summary_row(label, [getattr(x, figure) for x, _ in measured],
                        [getattr(y, figure) for _, y in measured], fmt)
        )  # fmt: skip
    requests = sum(x.requests + y.requests for x, y in measured)
    print(f"\n{len(measured)} pairs, {requests:,} requests measured, one server process:")
    print_table(rows, left=1)
    print(f"machine: {machine}")


def verdict(
    measured: list[tuple[Window, Window]],
    versus: tuple[str, str],
    default: tuple[str, str],
    figure: str,
    what: str,
    target: float,
    *,
    at_most: bool,
) -> int:
    """A toggle script's exit status. For the ``default`` pair, print PASS or FAIL for the
    median of the pairs' B/A ``figure`` (a `Window` attribute) against ``target``, with its
    CI (1 on FAIL); any other pair has no verdict (0)."""
    if tuple(versus) != default:
        return 0
    ratios = [getattr(b, figure) / getattr(a, figure) for a, b in measured]
    low, high = bootstrap(ratios)
    median = statistics.median(ratios)
    ok = median <= target if at_most else median >= target
    print(f"{'PASS' if ok else 'FAIL'}  {what} {'<=' if at_most else '>='} {target}: "
          f"{median:.4f} (95% CI {low:.4f}..{high:.4f})")  # fmt: skip
    return 0 if ok else 1
