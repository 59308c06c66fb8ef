"""Load shedding under overload: goodput, latency and refusals, guarded and not, side by side.

One uvicorn worker (127.0.0.1, a free port, ``--no-access-log --log-level warning``,
``--loop asyncio``; ``--loop uvloop`` for uvloop) serves ``bench/_overload_apps.py``:
``GET /work`` costs about 2 ms of CPU and a 1 ms await. The load is ``loadgen.py``'s open
loop: Poisson arrivals (seeded, the same schedule for every variant) over a pool of at most
64 keep-alive connections, a request given up 2 s after its scheduled time, every latency
counted from the scheduled time. A fresh server process for every run; before a run the
script waits while another benchmark (``wrk``, ``bench/*.py``, a ``bench._*`` uvicorn) runs
or the machine is busy, and after it reports how long the server worked on (up to 5 s: an
overloaded server goes on serving requests whose clients have gone) before stopping it.
The generator runs real-time (``SCHED_FIFO``) where it may, as ``loadgen.py``'s CLI does.

Capacity C. First the most the unguarded app serves in a closed loop: ``wrk -t1 -c8`` on
``GET /work`` for 5 s after 1 s of warm-up, T requests/s. Then Poisson runs (5 s, the first
second left out) at 95%, 90%, 85%... of T, highest first; C is the first rate at which the
unguarded app keeps its 2xx p99 within the SLO (100 ms) and answers at least 95% of the
requests 2xx within the SLO (a share rather than goodput/rate: over a few seconds the
Poisson count itself varies by several percent). At T a Poisson queue never settles: C is
the most the app takes *with its latency target*, and the overload factors below are
multiples of it. ``--capacity C`` skips this.

Every server burns the same rounds in ``GET /work``: those the first server calibrated
(``OVERLOAD_WORK_ROUNDS``), since a calibration differs by a few percent from one process to
the next, more than the overhead being measured.

Variants: ``none`` (no guard); ``uvicorn`` (``--limit-concurrency N``, the N among
``--uvicorn-limits`` with the best goodput at 4x C; uvicorn counts open connections as well
as tasks, and its 503 closes the connection, so each refusal costs the client a new one);
``fixed`` (``LoadSheddingMiddleware(limit=8)``, default
queue); ``default`` (``limit=None``); ``unpaced`` (the default with ``pace=False``);
``aimd``, ``vegas``, ``gradient2`` (those algorithms
with their defaults; ``SHED_ALGORITHM_KWARGS`` in ``--server-env`` sets their options); and,
only when named, ``adaptive`` (the default algorithm, ``Adaptive``, with those options) and
``refuse`` (a middleware in the guard's place that answers every ``/work`` request at once
with the guard's 503, keeping no state: the floor of a refusal's latency on this machine,
with this server and this generator; there is no handler step for a refusal to wait behind).
Scenarios, each variant in turn:

* rates: 0.5x, 0.8x, 1x, 2x, 4x and 8x C for ``--duration`` s (7), the first second left
  out of the figures (warm-up: a fresh process, an adaptive limit that starts cold);
* step: 1x -> 4x -> 1x C, ``--step-seconds`` (5) each. Per second: goodput, 2xx p99 and
  the non-2xx share. Derived, on half-second bins: *up*, the time after the step up until
  the 2xx p99 is within the SLO (and no request timed out) in every later bin of the 4x
  phase; *down*, the time after the step down until under 1% of requests fail (503s,
  timeouts and errors together) in every later bin; *down p99*, until the 2xx p99 is
  within the SLO again (what an unguarded app, which refuses nothing, takes). "never":
  the phase ended bad;
* priority (``shed_priority``, and ``none`` for contrast): 4x C, of which a quarter carry
  ``X-Priority: critical`` (trusted, as from a gateway), the rest none (``sheddable``): two
  load generators on one loop, each its own pool of 64 connections and its own seed;
* overhead: the server's CPU per request at 0.5x C (all its threads, from
  ``/proc/<pid>/task/*/schedstat``), ``none`` against ``default`` and ``fixed``, and
  ``pass`` (a pass-through middleware: the floor): per round,
  a fresh server for each, 1 s of warm-up, then 5 s of ``GET /light`` (``/work`` without
  its CPU loop) and 5 s of ``GET /work`` (``--overhead-rounds`` rounds, order rotated;
  with ``--overhead-side-by-side`` the servers of a round run at once, each under its own
  load, so that the machine's drift is the same for all: far steadier);
  medians, and the overhead = median - median of ``none``. The middleware's ticker counts
  in it (on ``/light`` at this load it naps a second at a time). The target is checked on
  ``/light``:
  on ``/work`` the 2.2 ms a request varies by a few percent from one process to the next
  (more than the 30 µs looked for, even with the same rounds and ``PYTHONHASHSEED=0`` in
  every server). Then, 1 s after the loads, the server's CPU over 4 s with no traffic at
  all (ms per second): what an idle worker pays for the guard. Server processes differ by
  more than the target here; ``shedding_toggle.py`` measures the same inside one process.

Per run: goodput (2xx within the SLO per second) and goodput/C, 2xx p50/p99, rejection (503)
p50/p99 and the share answered within 5 ms, the rejected share, client timeouts by phase
(connecting, waiting for a pool connection, waiting for the response), other errors, new
connections, late sends (dispatched > 1 ms after their time; over 1%: INVALID), the server's
CPU per response and in all (% of a core: 100% is saturation), the guard's limit (polled
from ``GET /state`` twice a second: its range, and where it ended) and its refusals by
reason, the CPU other processes used (a run where they used over 10% of a core is flagged
"busy"), and the machine's speed over the run against the calibration's (a canary loop timed
twice a second, ``bench/_machine.py``; off by more than 25%: "DRIFT", since the capacity C
no longer holds: these VMs have run the same loop at half speed for seconds at a time, with
nothing else running). Targets, PASS/FAIL for ``default`` (a check matrix for every
variant): at 4x C goodput >= 85% of C and 2xx p99 <= SLO; at 2x goodput >= 90% of C;
rejection p99 <= 5 ms (the worst over the runs with at least 20 rejections); rejections at
0.8x < 0.1%; step up: back within the SLO in <= 2 s; step down: failures < 1% within 3 s;
priority: >= 99.5% of critical requests answered 2xx; overhead at 0.5x <= 30 µs/request.

    python bench/overload.py                        # everything, ~13 min
    python bench/overload.py --loop uvloop          # uvicorn on uvloop
    python bench/overload.py --quick                # ~7 min: fewer rates, shorter runs
    python bench/overload.py --variants none,uvicorn --scenarios rates,step
    python bench/overload.py --capacity 380 --variants default --rates 2,4,8
    python bench/overload.py --variants fixed --fixed-limit 4 --server-env SHED_MAX_QUEUE=16
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _machine import DRIFT, Watch, drift
from _wrk import print_table
from loadgen import (
    REJECTIONS,
    TIMEOUT_CONNECT,
    TIMEOUT_POOL,
    TIMEOUT_RESPONSE,
    TIMEOUTS,
    AppServer,
    Latencies,
    LoadResult,
    Record,
    Schedule,
    make_schedule,
    realtime,
    run,
    run_load,
    step_schedule,
    wait_idle,
)

RATES = (0.5, 0.8, 1.0, 2.0, 4.0, 8.0)
VARIANTS = ("none", "uvicorn", "fixed", "default", "unpaced", "aimd", "vegas", "gradient2")
#: Variants run only when named (not in the default list).
EXTRA_VARIANTS = ("adaptive", "refuse")
SCENARIOS = ("rates", "step", "priority", "overhead")
TARGETS = {
    "none": "bench._overload_apps:unguarded",
    "pass": "bench._overload_apps:pass_through",
    "uvicorn": "bench._overload_apps:unguarded",
    "fixed": "bench._overload_apps:shed_fixed",
    "default": "bench._overload_apps:shed_default",
    "unpaced": "bench._overload_apps:shed_unpaced",
    "aimd": "bench._overload_apps:shed_aimd",
    "vegas": "bench._overload_apps:shed_vegas",
    "gradient2": "bench._overload_apps:shed_gradient2",
    "adaptive": "bench._overload_apps:shed_adaptive",
    "priority": "bench._overload_apps:shed_priority",
    "refuse": "bench._overload_apps:refuse_all",
}
GUARDED = frozenset(
    {"fixed", "default", "unpaced", "aimd", "vegas", "gradient2", "adaptive", "priority"}
)

#: The targets (for the default configuration).
GOODPUT_4X = 0.85  # of C
GOODPUT_2X = 0.90
REJECTION_P99_MS = 5.0
FALSE_SHEDS = 0.001  # at 0.8x
STEP_UP_S = 2.0
STEP_DOWN_S = 3.0
CRITICAL_OK = 0.995
OVERHEAD_US = 30.0

BIN = 0.5  # s, the step's bins for the derived figures
NOISY = 10.0  # % of a core used by other processes that flags a run
CALIBRATION_FRACTIONS = (0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6)
#: Seconds a run costs beyond its schedule and the client timeout (start, idle, stop).
RUN_OVERHEAD = 4.5


# -- settings and servers --------------------------------------------------------------------


@dataclass
class Settings:
    loop: str
    http: str
    variants: list[str]
    scenarios: list[str]
    rates: list[float]
    duration: float
    skip: float
    step_seconds: float
    connections: int
    timeout: float
    slo: float
    seed: int
    fixed_limit: int
    uvicorn_limits: list[int]
    uvicorn_limit: int | None
    overhead_rounds: int
    overhead_side_by_side: bool
    capacity: float | None
    server_env: dict[str, str]
    wait_others: float
    capacity_note: str = ""
    #: The canary's median CPU seconds during the calibration (or the first run): what the
    #: machine's speed over each run is compared with (``_machine``).
    canary: float = math.nan


@dataclass(kw_only=True)
class Server(AppServer):
    """One uvicorn process serving one variant."""

    label: str = "server"
    health: dict[str, Any] = field(default_factory=dict)

    def cpu(self) -> float:
        """CPU seconds of all the server's threads, from schedstat (nanoseconds)."""
        assert self.proc is not None
        total = 0.0
        task = Path(f"/proc/{self.proc.pid}/task")
        with contextlib.suppress(OSError):
            for tid in os.listdir(task):
                with contextlib.suppress(OSError, ValueError, IndexError):
                    total += int((task / tid / "schedstat").read_text().split()[0]) / 1e9
        return total

    def state(self, timeout: float = 5.0) -> dict[str, Any] | None:
        """The guard's ``state()`` (``GET /state``), or None if it did not answer."""
        try:
            url = f"http://127.0.0.1:{self.port}/state"
            with urllib.request.urlopen(url, timeout=timeout) as response:
                body: dict[str, Any] = json.loads(response.read())
        except (OSError, ValueError):
            return None
        state: dict[str, Any] | None = body.get("state")
        return state


class StatePoller(threading.Thread):
    """Reads ``GET /state`` every ``interval`` s while a run lasts: the limit over time.

    A thread of the generator's process: a request every half second costs it far less
    than a millisecond of the GIL."""

    def __init__(self, server: Server, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.interval = interval
        self.samples: list[tuple[float, dict[str, Any]]] = []  # (monotonic, state)
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            state = self.server.state(timeout=1.0)
            if state is not None:
                self.samples.append((time.monotonic(), state))

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=5)


def start_server(variant: str, s: Settings, uvicorn_limit: int | None = None) -> Server:
    env = dict(os.environ)
    env.setdefault("PYTHONHASHSEED", "0")  # the same dict layouts in every server
    env.update(s.server_env)
    env["SHED_FIXED_LIMIT"] = str(s.fixed_limit)
    extra: tuple[str, ...] = ()
    if variant == "uvicorn":
        n = uvicorn_limit if uvicorn_limit is not None else s.uvicorn_limit
        assert n is not None
        extra = ("--limit-concurrency", str(n))
    server = Server(label=variant)
    server.start(TARGETS[variant], s.loop, s.http, env=env, extra=extra)
    try:
        server.health = server.wait_ready()
    except Exception:
        print(server.log_tail(3000), file=sys.stderr)
        server.stop(timeout=5)
        raise
    return server


# -- the machine -----------------------------------------------------------------------------


def _our_tree() -> set[int]:
    """This process, its ancestors and its descendants."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{entry.name}/stat").read_text()
                parents[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    ours = {os.getpid()}
    grown = True
    while grown:
        grown = False
        for pid, ppid in parents.items():
            if ppid in ours and pid not in ours:
                ours.add(pid)
                grown = True
    up = os.getppid()
    while up > 1 and up not in ours:  # our ancestors: a shell, `timeout`...
        ours.add(up)
        up = parents.get(up, 0)
    return ours


def other_benchmarks() -> list[str]:
    """Command lines of benchmarks running outside this script: wrk, bench/*.py, loadgen,
    a uvicorn serving a ``bench._*`` app."""
    if not Path("/proc").is_dir():
        return []
    ours = _our_tree()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in ours:
            continue
        try:
            argv = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv if a]
        if not args:
            continue
        if (
            os.path.basename(args[0]) == "wrk"
            or any(a.endswith(".py") and ("bench/" in a or a.startswith("bench")) for a in args)
            or any(a.startswith("bench.") or "loadgen" in a for a in args)
        ):
            found.append(f"{entry.name}: {' '.join(args)[:120]}")
    return found


def _busy_cores(seconds: float = 0.5) -> float:
    """How much CPU the whole machine used over ``seconds``, in % of one core."""

    def read() -> tuple[float, float]:
        values = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = values[3] + values[4]
        return sum(values[:8]) - idle, sum(values[:8])

    try:
        busy0, total0 = read()
        time.sleep(seconds)
        busy1, total1 = read()
    except OSError:
        return 0.0
    return (busy1 - busy0) / max(total1 - total0, 1e-9) * (os.cpu_count() or 1) * 100


def wait_quiet(s: Settings) -> None:
    """Wait while other benchmarks run (at most ``s.wait_others`` s) or the machine is busy
    (at most 20 s): a run should have the machine to itself."""
    start = time.monotonic()
    said = False
    while (others := other_benchmarks()) and time.monotonic() - start < s.wait_others:
        if not said:
            print(f"  (waiting: another benchmark runs: {'; '.join(others)[:300]})")
            said = True
        time.sleep(5)
    if others:
        print(f"  (another benchmark still runs after {s.wait_others:.0f} s: going on)")
    start = time.monotonic()
    while (busy := _busy_cores()) > 20 and time.monotonic() - start < 20:
        if not said:
            print(f"  (waiting: the machine is busy, {busy:.0f}% of a core)")
            said = True


# -- runs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """One load generator of a run: its schedule and extra headers."""

    schedule: Schedule
    headers: tuple[tuple[str, str], ...] = ()
    name: str = ""
    path: str = "/work"


@dataclass
class Run:
    """What one run against one fresh server measured."""

    variant: str
    scenario: str
    results: list[LoadResult]
    server_cpu: float  # s, over the load
    state: dict[str, Any] | None
    others: float  # % of a core other processes used
    watch: str
    worked_on: float  # s the server kept busy after the run (up to 5)
    note: str = ""
    #: (seconds into the run, approximately, state) from ``GET /state`` during the run
    samples: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    #: The machine's speed over the run against the calibration's (1: the same)
    speed: float = math.nan

    @property
    def drifted(self) -> str:
        """A flag if the machine ran this run at another speed than its calibration."""
        return drift(self.speed)

    @property
    def result(self) -> LoadResult:
        return self.results[0]

    @property
    def busy(self) -> bool:
        return self.others > NOISY

    def report(self, line: str) -> None:
        """Print ``line`` with the machine's state over the run, then the loads' warnings."""
        flags = ("  [BUSY]" if self.busy else "") + (f"  [{self.drifted}]" if self.drifted else "")
        print(f"  {line}; {self.watch}; speed x{self.speed:.2f}{flags}")
        for result in self.results:
            for warning in result.warnings:
                print(f"    WARNING: {warning}")

    def limit(self) -> str:
        """The limit at the end, after its range over the run: ``lo-hi>end``."""
        if self.variant == "uvicorn":
            return f"lc={self.note}"
        if self.state is None:
            return "-"
        end = self.state.get("limit")
        seen = self.limits(0.0, math.inf)
        if not seen:
            return f"{end}"
        return f"{min(seen)}-{max(seen)}>{end}"

    def limits(self, start: float, end: float) -> list[int]:
        """The limits polled between ``start`` and ``end`` seconds into the run."""
        return [int(st["limit"]) for t, st in self.samples if start <= t < end and "limit" in st]

    def refusals(self) -> str:
        """The guard's refusals by reason, from its counts at the end (whole run)."""
        if self.state is None:
            return "-"
        counts = self.state.get("counts") or {}
        short = {
            "queue_full": "full",
            "queue_timeout": "qto",
            "pushed_out": "push",
            "deadline": "dl",
            "trigger": "trig",
        }
        parts = [f"{name} {counts[key]}" for key, name in short.items() if counts.get(key)]
        return " ".join(parts) or "0"


async def _gather(port: int, loads: Sequence[Load], s: Settings) -> list[LoadResult]:
    return list(
        await asyncio.gather(
            *(
                run_load(
                    "127.0.0.1",
                    port,
                    load.schedule,
                    path=load.path,
                    headers=load.headers,
                    connections=s.connections,
                    timeout=s.timeout,
                    slo=s.slo,
                )
                for load in loads
            )
        )
    )


def execute(
    variant: str,
    scenario: str,
    loads: Sequence[Load],
    s: Settings,
    *,
    uvicorn_limit: int | None = None,
    warmup: Schedule | None = None,
    poll: bool = True,
) -> Run:
    """Start a fresh server for ``variant``, run ``loads`` at once against it, stop it."""
    wait_quiet(s)
    server = start_server(variant, s, uvicorn_limit)
    assert server.proc is not None
    try:
        if warmup is not None:
            run(_gather(server.port, [Load(warmup)], s))
        poller = StatePoller(server) if variant in GUARDED and poll else None
        watch = Watch.start()
        cpu0 = server.cpu()
        if poller is not None:
            poller.start()
        t0 = time.monotonic() + 0.05  # run_load's time 0, near enough (its lead)
        try:
            results = run(_gather(server.port, loads, s))
        finally:
            if poller is not None:
                poller.stop()
        cpu = server.cpu() - cpu0
        summary = watch.summary()
        others = watch.percent()
        if math.isnan(s.canary):
            s.canary = watch.canary()  # no calibration: the first run is the reference
        speed = watch.speed(s.canary)
        state = server.state() if variant in GUARDED else None
        worked_on = wait_idle(server.proc.pid, limit=5.0)
    finally:
        server.stop(timeout=5)
    samples = [] if poller is None else [(t - t0, st) for t, st in poller.samples]
    n = uvicorn_limit if uvicorn_limit is not None else (s.uvicorn_limit or 0)
    return Run(
        variant,
        scenario,
        results,
        cpu,
        state,
        others,
        summary,
        worked_on,
        note=f"{n}" if variant == "uvicorn" else "",
        samples=samples,
        speed=speed,
    )


# -- figures ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    """The requests scheduled in a window of a run."""

    seconds: float
    requests: int
    ok: int
    ok_in_slo: int
    rejected: int
    timeouts_connect: int
    timeouts_pool: int
    timeouts_response: int
    errors: int  # other than timeouts
    late: int
    ok_latency: Latencies
    rejected_latency: Latencies
    fast_rejections: int  # answered within REJECTION_P99_MS

    @property
    def goodput(self) -> float:
        return self.ok_in_slo / self.seconds if self.seconds > 0 else math.nan

    @property
    def timeouts(self) -> int:
        return self.timeouts_connect + self.timeouts_pool + self.timeouts_response

    def share(self, n: int) -> float:
        return n / self.requests if self.requests else math.nan

    @property
    def failed(self) -> int:
        """Requests not answered 2xx."""
        return self.requests - self.ok


def stats(result: LoadResult, start: float, end: float) -> Stats:
    """Figures over the requests ``result`` scheduled in ``[start, end)`` seconds."""
    records: list[Record] = [r for r in result.records if start <= r.scheduled < end]
    ok = [r.latency for r in records if 200 <= r.status < 300]
    errors = [r.error for r in records if r.error]
    rejected = [r.latency for r in records if r.status in REJECTIONS]
    return Stats(
        seconds=end - start,
        requests=len(records),
        ok=len(ok),
        ok_in_slo=sum(1 for x in ok if x <= result.slo),
        rejected=sum(1 for r in records if r.status in REJECTIONS),
        timeouts_connect=errors.count(TIMEOUT_CONNECT),
        timeouts_pool=errors.count(TIMEOUT_POOL),
        timeouts_response=errors.count(TIMEOUT_RESPONSE),
        errors=sum(1 for e in errors if e not in TIMEOUTS),
        late=sum(1 for r in records if r.dispatched - r.scheduled > result.late_threshold),
        ok_latency=Latencies.of(ok),
        rejected_latency=Latencies.of(rejected),
        fast_rejections=sum(1 for x in rejected if x <= REJECTION_P99_MS / 1e3),
    )


def measured(run_: Run, s: Settings, index: int = 0) -> Stats:
    result = run_.results[index]
    return stats(result, s.skip, result.schedule.duration)


def bins(result: LoadResult, start: float, end: float, width: float) -> list[Stats]:
    count = max(1, round((end - start) / width))
    return [stats(result, start + k * width, start + (k + 1) * width) for k in range(count)]


def recovery(window: Sequence[Stats], good: Callable[[Stats], bool], width: float) -> float:
    """Seconds from the window's start until every later bin is good (inf: the last is not)."""
    bad = [k for k, b in enumerate(window) if not good(b)]
    if not bad:
        return 0.0
    if bad[-1] == len(window) - 1:
        return math.inf
    return (bad[-1] + 1) * width


def step_figures(result: LoadResult, s: Settings) -> tuple[float, float, float]:
    """Seconds to recover: after the step up (2xx p99), after the step down (failures < 1%,
    and 2xx p99)."""
    phases = result.schedule.phases
    up, down = phases[1], phases[2]
    slo_ms = s.slo * 1e3

    def within_slo(b: Stats) -> bool:
        return b.timeouts == 0 and not b.ok_latency.p99 > slo_ms

    def few_failures(b: Stats) -> bool:
        return b.requests == 0 or b.failed / b.requests < 0.01

    up_bins = bins(result, up.start, up.start + up.seconds, BIN)
    down_bins = bins(result, down.start, down.start + down.seconds, BIN)
    return (
        recovery(up_bins, within_slo, BIN),
        recovery(down_bins, few_failures, BIN),
        recovery(down_bins, within_slo, BIN),
    )


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"


def _pct(value: float, digits: int = 1) -> str:
    return "-" if math.isnan(value) else f"{value * 100:.{digits}f}"


def _secs(value: float) -> str:
    return "never" if math.isinf(value) else f"{value:.1f}"


def _rate_label(x: float) -> str:
    return f"{x:g}x"


# -- calibration -----------------------------------------------------------------------------


def closed_loop(port: int, seconds: int, connections: int = 8) -> tuple[float, str]:
    """``wrk`` on ``GET /work``: (requests per second, its latency line)."""
    cmd = [
        "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", f"http://127.0.0.1:{port}/work"
    ]  # fmt: skip
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=seconds + 30, check=False
    ).stdout
    total = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out)
    latency = re.search(r"^\s*Latency\s+(.*)$", out, re.MULTILINE)
    if total is None:
        raise RuntimeError(f"wrk printed no request count:\n{out}")
    elapsed = float(total.group(2)) / (1e3 if total.group(3) == "ms" else 1.0)
    return int(total.group(1)) / elapsed, latency.group(1).strip() if latency else "?"


def calibrate(s: Settings) -> float:
    """C: see the module docstring."""
    print("\n== calibration: capacity C of the unguarded app")
    wait_quiet(s)
    server = start_server("none", s)
    try:
        watch = Watch.start()
        closed_loop(server.port, 1)  # warm-up
        throughput, latency = closed_loop(server.port, 5)
        others = watch.percent()
        s.canary = watch.canary()
    finally:
        server.stop(timeout=5)
    print(
        f"closed loop (wrk -t1 -c8, 5 s): T = {throughput:.0f} requests/s; latency avg/stdev/"
        f"max {latency}; other processes {others:.0f}% of a core; canary "
        f"{s.canary * 1e3:.2f} ms (the reference for every run's speed)"
        + ("  [BUSY]" if others > NOISY else "")
    )
    rows = [["rate/s", "of T", "goodput/s", "in SLO %", "2xx p99", "t/o", "verdict"]]
    chosen = math.nan
    for fraction in CALIBRATION_FRACTIONS:
        rate = round(throughput * fraction)
        r = execute("none", "calibrate", [Load(_poisson(rate, 5, s))], s)
        m = measured(r, s)
        in_slo = m.share(m.ok_in_slo)
        good = m.ok_latency.p99 <= s.slo * 1e3 and in_slo >= 0.95
        rows.append(
            [f"{rate}", f"{fraction:.0%}", f"{m.goodput:.0f}", _pct(in_slo),
             _ms(m.ok_latency.p99), f"{m.timeouts}",
             ("ok" if good else "no") + (f" (busy: others {r.others:.0f}%)" if r.busy else "")
             + (f" ({r.drifted})" if r.drifted else "")]
        )  # fmt: skip
        if good:
            chosen = rate
            break
    print_table(rows, left=0)
    if math.isnan(chosen):
        chosen = round(throughput * CALIBRATION_FRACTIONS[-1])
        print(f"WARNING: no rate passed; C = {CALIBRATION_FRACTIONS[-1]:.0%} of T")
    s.capacity_note = (
        f"C = {chosen:.0f}/s ({chosen / throughput:.0%} of the closed-loop maximum "
        f"T = {throughput:.0f}/s)"
    )
    print(s.capacity_note)
    return float(chosen)


def _poisson(rate: float, seconds: float, s: Settings, seed: int = 0) -> Schedule:
    return make_schedule(rate, seconds, poisson=True, seed=s.seed + seed)


# -- scenarios -------------------------------------------------------------------------------


def pick_uvicorn_limit(c: float, s: Settings) -> int:
    """The ``--limit-concurrency`` with the best goodput at 4x C."""
    print(f"\n== uvicorn --limit-concurrency N at 4x C ({4 * c:.0f}/s), best goodput wins")
    rows = [["N", "goodput/s", "/C", "2xx p99", "rej %", "rej p99", "t/o", "others %"]]
    best: tuple[float, int] = (-1.0, s.uvicorn_limits[0])
    for n in s.uvicorn_limits:
        r = execute("uvicorn", "lc", [Load(_poisson(4 * c, s.duration, s))], s, uvicorn_limit=n)
        m = measured(r, s)
        rows.append(
            [f"{n}", f"{m.goodput:.0f}", f"{m.goodput / c:.2f}", _ms(m.ok_latency.p99),
             _pct(m.share(m.rejected)), _ms(m.rejected_latency.p99), f"{m.timeouts}",
             f"{r.others:.0f}" + (" busy" if r.busy else "")]
        )  # fmt: skip
        if m.goodput > best[0]:
            best = (m.goodput, n)
    print_table(rows, left=0)
    print(f"best: N = {best[1]}")
    return best[1]


def run_rates(c: float, s: Settings) -> dict[tuple[str, float], Run]:
    runs: dict[tuple[str, float], Run] = {}
    for variant in s.variants:
        print(f"\n== rates: {variant}")
        for x in s.rates:
            r = execute(variant, f"{x:g}x", [Load(_poisson(x * c, s.duration, s))], s)
            runs[variant, x] = r
            m = measured(r, s)
            r.report(
                f"{x:g}x ({x * c:.0f}/s): goodput {m.goodput:.0f}/s "
                f"({m.goodput / c:.2f} C), 2xx p99 {_ms(m.ok_latency.p99)} ms, rejected "
                f"{_pct(m.share(m.rejected))}%, timeouts {m.timeouts}, limit {r.limit()}"
            )
    return runs


def run_step(c: float, s: Settings) -> dict[str, Run]:
    runs: dict[str, Run] = {}
    t = s.step_seconds
    schedule = step_schedule([(c, t), (4 * c, t), (c, t)], poisson=True, seed=s.seed)
    for variant in s.variants:
        print(f"\n== step 1x -> 4x -> 1x: {variant}")
        r = execute(variant, "step", [Load(schedule)], s)
        runs[variant] = r
        up, down, down_p99 = step_figures(r.result, s)
        r.report(
            f"up: {_secs(up)} s, down: {_secs(down)} s (p99: {_secs(down_p99)} s), limit "
            f"{r.limit()}"
        )
    return runs


def run_priority(c: float, s: Settings) -> dict[str, Run]:
    runs: dict[str, Run] = {}
    critical = Load(_poisson(c, s.duration, s, seed=101), (("X-Priority", "critical"),), "critical")
    sheddable = Load(_poisson(3 * c, s.duration, s, seed=202), (), "sheddable")
    for variant in ("priority", "none"):
        print(f"\n== priority, 4x C, 25% critical: {variant}")
        r = execute(variant, "priority", [critical, sheddable], s)
        runs[variant] = r
        cpu = r.server_cpu / max(r.result.wall, 1e-9)
        r.report(f"limit {r.limit()}, refusals {r.refusals()}, server CPU {cpu:.0%} of a core")
    return runs


OVERHEAD_PATHS = ("/light", "/work")
#: After the overhead's loads: seconds to settle, then seconds of no traffic at all.
IDLE_SETTLE, IDLE_SECONDS = 1.0, 4.0


def run_overhead(c: float, s: Settings) -> dict[str, dict[str, list[float]]]:
    """Server CPU µs per response at 0.5x C: path -> variant -> one value per round; and
    under ``"idle"``, the server's CPU ms per second with no traffic, after the loads.
    One variant at a time, or (``--overhead-side-by-side``) the three servers at once, each
    under its own load, so that the machine's drift is the same for all three."""
    variants = ["none", "pass", "fixed", "default"]
    per: dict[str, dict[str, list[float]]] = {
        p: {v: [] for v in variants} for p in (*OVERHEAD_PATHS, "idle")
    }
    for k in range(s.overhead_rounds):
        order = variants[k % len(variants) :] + variants[: k % len(variants)]
        together = "at once" if s.overhead_side_by_side else "in turn"
        print(f"\n== overhead at 0.5x C, round {k + 1}: {', '.join(order)} ({together})")
        groups = [order] if s.overhead_side_by_side else [[v] for v in order]
        for group in groups:
            _overhead_round(group, k, c, s, per)
    return per


def _overhead_round(
    group: list[str], k: int, c: float, s: Settings, per: dict[str, dict[str, list[float]]]
) -> None:
    """One round of the overhead's loads on a fresh server per variant of ``group``, all
    driven at once."""
    wait_quiet(s)
    servers: list[Server] = []
    cells: dict[str, list[str]] = {v: [] for v in group}

    async def drive(path: str | None, seconds: float, seed: int) -> list[LoadResult]:
        loads = [
            run_load(
                "127.0.0.1",
                server.port,
                _poisson(0.5 * c, seconds, s, seed=seed),
                path=path or "/work",
                connections=s.connections,
                timeout=s.timeout,
                slo=s.slo,
            )
            for server in servers
        ]
        return list(await asyncio.gather(*loads))

    try:
        for variant in group:
            servers.append(start_server(variant, s))
        run(drive(None, 1, 1000 + k))
        watch = Watch.start()
        for path in OVERHEAD_PATHS:
            cpu0 = [server.cpu() for server in servers]
            results = run(drive(path, 5, k))
            for variant, server, before, result in zip(group, servers, cpu0, results, strict=True):
                cpu = server.cpu() - before
                responses = sum(1 for x in result.records if x.status)
                us = cpu / max(responses, 1) * 1e6
                per[path][variant].append(us)
                cells[variant].append(
                    f"{path} {us:.1f} µs/response ({responses}, {cpu / result.wall:.0%} of a core)"
                )
        time.sleep(IDLE_SETTLE)
        cpu0 = [server.cpu() for server in servers]
        time.sleep(IDLE_SECONDS)
        for variant, server, before in zip(group, servers, cpu0, strict=True):
            idle = (server.cpu() - before) / IDLE_SECONDS * 1e3
            per["idle"][variant].append(idle)
            cells[variant].append(f"idle {idle:.2f} ms/s")
        others = watch.percent()
    finally:
        for server in servers:
            server.stop(timeout=5)
    for variant in group:
        print(
            f"  {variant}: {'; '.join(cells[variant])}; others {others:.0f}%"
            + ("  [BUSY]" if others > NOISY else "")
        )


# -- report ----------------------------------------------------------------------------------


def report_rates(runs: dict[tuple[str, float], Run], c: float, s: Settings) -> None:
    print(f"\n## Rates (C = {c:.0f}/s; figures over seconds {s.skip:g}-{s.duration:g}; ms)")
    rows = [
        ["rate", "variant", "goodput/s", "/C", "2xx p50", "2xx p99", "rej p50", "rej p99",
         "rej %", "rej <=5ms %", "t/o conn", "t/o pool", "t/o resp", "err", "new conn",
         "late %", "valid", "µs/resp", "srv CPU %", "limit lo-hi>end", "refusals (whole run)",
         "others %", "speed"],
    ]  # fmt: skip
    for x in s.rates:
        for variant in s.variants:
            r = runs.get((variant, x))
            if r is None:
                continue
            m = measured(r, s)
            responses = sum(1 for rec in r.result.records if rec.status)
            rows.append(
                [f"{x:g}x {x * c:.0f}/s", variant, f"{m.goodput:.0f}", f"{m.goodput / c:.2f}",
                 _ms(m.ok_latency.p50), _ms(m.ok_latency.p99), _ms(m.rejected_latency.p50),
                 _ms(m.rejected_latency.p99), _pct(m.share(m.rejected), 2),
                 _pct(m.fast_rejections / m.rejected if m.rejected else math.nan, 0),
                 f"{m.timeouts_connect}", f"{m.timeouts_pool}", f"{m.timeouts_response}",
                 f"{m.errors}", f"{r.result.new_connections}", _pct(m.share(m.late), 2),
                 "yes" if r.result.valid else "NO",
                 f"{r.server_cpu / max(responses, 1) * 1e6:.0f}",
                 f"{r.server_cpu / r.result.wall:.0%}", r.limit(),
                 r.refusals(), f"{r.others:.0f}" + (" BUSY" if r.busy else ""),
                 f"{r.speed:.2f}" + (" DRIFT" if r.drifted else "")]
            )  # fmt: skip
    print_table(rows, left=2)
    print(
        "rej <=5ms %: the share of the rejections answered within 5 ms; "
        "µs/resp: the server's CPU over the run per response; srv CPU %: the server's CPU "
        "over the run (its end included), % of a core; limit: the range polled from /state twice a "
        "second > at the end; refusals: full = queue full, qto = queue timeout, push = "
        "pushed out by a higher class, dl = deadline, trig = loop lag/memory trigger; "
        "speed: the machine's speed over the run against the calibration's (a canary loop; "
        f"DRIFT: off by more than {DRIFT:.0%})"
    )
    metrics: list[tuple[str, Callable[[Stats], str]]] = [
        ("goodput / C", lambda m: f"{m.goodput / c:.2f}"),
        ("2xx p99, ms", lambda m: _ms(m.ok_latency.p99)),
        ("rejected (503) %", lambda m: _pct(m.share(m.rejected), 2)),
    ]
    for title, value in metrics:
        print(f"\n{title}")
        matrix = [["variant", *(_rate_label(x) for x in s.rates)]]
        for variant in s.variants:
            cells = []
            for x in s.rates:
                r = runs.get((variant, x))
                cells.append("" if r is None else value(measured(r, s)))
            matrix.append([variant, *cells])
        print_table(matrix)


def report_step(runs: dict[str, Run], c: float, s: Settings) -> None:
    if not runs:
        return
    variants = [v for v in s.variants if v in runs]
    first = runs[variants[0]].result
    seconds = math.ceil(first.schedule.duration)
    t = s.step_seconds
    print(f"\n## Step 1x -> 4x -> 1x C ({c:.0f} -> {4 * c:.0f} -> {c:.0f}/s, {t:g} s each)")
    metrics: list[tuple[str, Callable[[Stats], str]]] = [
        ("goodput/s", lambda m: f"{m.goodput:.0f}"),
        ("2xx p99, ms", lambda m: _ms(m.ok_latency.p99)),
        ("non-2xx % (503s + timeouts + errors)", lambda m: _pct(m.share(m.failed))),
    ]
    for title, value in metrics:
        print(f"\nper second: {title}")
        rows = [["s", "rate", *variants]]
        for k in range(seconds):
            cells = [value(stats(runs[v].result, k, k + 1)) for v in variants]
            rows.append([f"{k}", f"{first.schedule.rate_at(k):.0f}", *cells])
        print_table(rows, left=0)
    guarded = [v for v in variants if runs[v].samples]
    if guarded:
        print("\nper second: the limit (polled from /state twice a second: lo-hi)")
        rows = [["s", "rate", *guarded]]
        for k in range(seconds):
            cells = []
            for v in guarded:
                seen = runs[v].limits(k, k + 1)
                cells.append(
                    "-" if not seen else f"{min(seen)}" if min(seen) == max(seen)
                    else f"{min(seen)}-{max(seen)}"
                )  # fmt: skip
            rows.append([f"{k}", f"{first.schedule.rate_at(k):.0f}", *cells])
        print_table(rows, left=0)
    print(
        f"\nrecovery (on {BIN:g} s bins): up = s after the step up until 2xx p99 <= SLO and no "
        f"timeouts; down = s after the step down until non-2xx < 1% (down p99: until 2xx p99 "
        f"<= SLO)"
    )
    rows = [["variant", "up, s", "down, s", "down p99, s", "goodput 4x phase /C", "limit at end"]]
    for v in variants:
        up, down, down_p99 = step_figures(runs[v].result, s)
        m = stats(runs[v].result, t, 2 * t)
        rows.append(
            [v, _secs(up), _secs(down), _secs(down_p99), f"{m.goodput / c:.2f}", runs[v].limit()]
        )
    print_table(rows)


def priority_figures(r: Run, s: Settings) -> tuple[Stats, Stats]:
    return measured(r, s, 0), measured(r, s, 1)


def report_priority(runs: dict[str, Run], c: float, s: Settings) -> None:
    if not runs:
        return
    print(
        f"\n## Priority: 4x C = {4 * c:.0f}/s, 25% 'X-Priority: critical' "
        f"(others sheddable), seconds {s.skip:g}-{s.duration:g}"
    )
    rows = [["variant", "class", "requests", "2xx %", "in SLO %", "rej %", "t/o", "2xx p99",
             "rej p99", "goodput/s"]]  # fmt: skip
    for variant, r in runs.items():
        for name, m in zip(("critical", "sheddable"), priority_figures(r, s), strict=True):
            rows.append(
                [variant if variant != "priority" else "shed_priority", name, f"{m.requests}",
                 _pct(m.share(m.ok), 2), _pct(m.share(m.ok_in_slo), 2),
                 _pct(m.share(m.rejected), 2), f"{m.timeouts}", _ms(m.ok_latency.p99),
                 _ms(m.rejected_latency.p99), f"{m.goodput:.0f}"]
            )  # fmt: skip
    print_table(rows, left=2)
    for variant, r in runs.items():
        if r.state is not None:
            print(f"{variant}: limit {r.limit()}, refusals {r.refusals()}")


def report_overhead(per: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """Tables per path; path -> variant -> overhead (median - median of none), µs."""
    out: dict[str, dict[str, float]] = {}
    for path, by_variant in per.items():
        if path == "idle":
            print(
                f"\n## Idle: server CPU with no traffic, {IDLE_SECONDS:g} s from "
                f"{IDLE_SETTLE:g} s after the overhead's loads (ms per second, all threads)"
            )
        else:
            print(f"\n## Overhead: server CPU per response at 0.5x C, GET {path} (µs, all threads)")
        digits, each = (2, 2) if path == "idle" else (1, 0)
        base = statistics.median(by_variant["none"])
        rows = [["variant", "rounds", "median", "overhead vs none", "per round vs none", "ratio"]]
        out[path] = {}
        for variant, values in by_variant.items():
            med = statistics.median(values)
            out[path][variant] = med - base
            diffs = [v - n for v, n in zip(values, by_variant["none"], strict=True)]
            rows.append(
                [variant, " ".join(f"{v:.{each}f}" for v in values), f"{med:.{digits}f}",
                 "-" if variant == "none" else f"{med - base:+.{digits}f}",
                 "-" if variant == "none" else " ".join(f"{d:+.{each}f}" for d in diffs),
                 f"{med / base:.3f}"]
            )  # fmt: skip
        print_table(rows)
    return out


@dataclass
class Check:
    name: str
    value: str
    ok: bool | None  # None: not measured


def checks(
    variant: str,
    c: float,
    s: Settings,
    rates: dict[tuple[str, float], Run],
    step: dict[str, Run],
) -> list[Check]:
    slo_ms = s.slo * 1e3
    out: list[Check] = []

    def at(x: float) -> Stats | None:
        r = rates.get((variant, x))
        return None if r is None else measured(r, s)

    m4 = at(4.0)
    if m4 is None:
        out.append(Check(f"4x: goodput >= {GOODPUT_4X:.0%} of C", "-", None))
        out.append(Check("4x: 2xx p99 <= SLO", "-", None))
    else:
        g = m4.goodput / c
        out.append(Check(f"4x: goodput >= {GOODPUT_4X:.0%} of C", f"{g:.2f} C", g >= GOODPUT_4X))
        p99 = m4.ok_latency.p99
        value = f"{p99:.1f} ms" if m4.ok else "no 2xx"
        out.append(Check("4x: 2xx p99 <= SLO", value, m4.ok > 0 and p99 <= slo_ms))
    m2 = at(2.0)
    g2 = math.nan if m2 is None else m2.goodput / c
    out.append(
        Check(
            f"2x: goodput >= {GOODPUT_2X:.0%} of C",
            f"{g2:.2f} C",
            None if m2 is None else g2 >= GOODPUT_2X,
        )
    )
    worst = (-1.0, "")
    for x in s.rates:
        m = at(x)
        if m is not None and m.rejected >= 20 and m.rejected_latency.p99 > worst[0]:
            worst = (m.rejected_latency.p99, f"{x:g}x")
    out.append(
        Check(
            f"rejection p99 <= {REJECTION_P99_MS:g} ms (worst run)",
            "-" if worst[0] < 0 else f"{worst[0]:.1f} ms at {worst[1]}",
            None if worst[0] < 0 else worst[0] <= REJECTION_P99_MS,
        )
    )
    m08 = at(0.8)
    share = math.nan if m08 is None else m08.share(m08.rejected)
    out.append(
        Check(
            f"0.8x: rejected < {FALSE_SHEDS:.1%}",
            f"{_pct(share, 3)}%",
            None if m08 is None else share < FALSE_SHEDS,
        )
    )
    r = step.get(variant)
    up, down, _ = (math.nan, math.nan, math.nan) if r is None else step_figures(r.result, s)
    out.append(
        Check(
            f"step up: within SLO in <= {STEP_UP_S:g} s",
            f"{_secs(up)} s",
            None if r is None else up <= STEP_UP_S,
        )
    )
    out.append(
        Check(
            f"step down: failures < 1% in <= {STEP_DOWN_S:g} s",
            f"{_secs(down)} s",
            None if r is None else down <= STEP_DOWN_S,
        )
    )
    return out


def report_checks(
    c: float,
    s: Settings,
    rates: dict[tuple[str, float], Run],
    step: dict[str, Run],
    priority: dict[str, Run],
    overhead: dict[str, dict[str, float]],
) -> None:
    variants = [v for v in s.variants]
    table = {v: checks(v, c, s, rates, step) for v in variants}
    if variants:
        print("\n## Checks, every variant (value, PASS/FAIL)")
        names = [ch.name for ch in table[variants[0]]]
        rows = [["check", *variants]]
        for i, name in enumerate(names):
            cells = []
            for v in variants:
                ch = table[v][i]
                cells.append("-" if ch.ok is None else f"{ch.value} {'PASS' if ch.ok else 'FAIL'}")
            rows.append([name, *cells])
        print_table(rows)
    print(
        f"\n## Targets, default configuration (limit=None); {s.capacity_note or f'C = {c:.0f}/s'}"
    )
    lines = list(table.get("default", []))
    if "priority" in priority:
        crit, _ = priority_figures(priority["priority"], s)
        share = crit.share(crit.ok)
        lines.append(
            Check(
                f"4x, 25% critical: >= {CRITICAL_OK:.1%} of critical answered 2xx",
                f"{_pct(share, 2)}%",
                share >= CRITICAL_OK,
            )
        )
    else:
        lines.append(Check(f"4x, 25% critical: >= {CRITICAL_OK:.1%} of critical 2xx", "-", None))
    if overhead:
        light, work = overhead.get("/light", {}), overhead.get("/work", {})
        lines.append(
            Check(
                f"overhead at 0.5x <= {OVERHEAD_US:g} µs/request (GET /light)",
                f"{light['default']:+.1f} µs (fixed {light['fixed']:+.1f}; on GET /work: "
                f"default {work['default']:+.1f}, fixed {work['fixed']:+.1f})",
                light["default"] <= OVERHEAD_US,
            )
        )
    else:
        lines.append(Check(f"overhead at 0.5x <= {OVERHEAD_US:g} µs/request", "-", None))
    for ch in lines:
        verdict = "not run" if ch.ok is None else ("PASS" if ch.ok else "FAIL")
        print(f"{verdict:7} {ch.name}: {ch.value}")


# -- main ------------------------------------------------------------------------------------


def estimate(s: Settings) -> float:
    per_run = s.timeout + RUN_OVERHEAD
    total = 0.0 if s.capacity is not None else (6 + 2 + 3 * (5 + per_run))
    if "rates" in s.scenarios:
        total += len(s.variants) * len(s.rates) * (s.duration + per_run)
    if (
        "uvicorn" in s.variants
        and s.uvicorn_limit is None
        and ("rates" in s.scenarios or "step" in s.scenarios)
    ):
        total += len(s.uvicorn_limits) * (s.duration + per_run)
    if "step" in s.scenarios:
        total += len(s.variants) * (3 * s.step_seconds + per_run)
    if "priority" in s.scenarios:
        total += 2 * (s.duration + per_run)
    if "overhead" in s.scenarios:
        total += (
            s.overhead_rounds * 3 * (11 + IDLE_SETTLE + IDLE_SECONDS + 2 * s.timeout + RUN_OVERHEAD)
        )
    return total


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _names(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        for name in names:
            if name not in choices:
                raise argparse.ArgumentTypeError(f"{name!r} is not one of {', '.join(choices)}")
        return names

    return parse


def _env(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"NAME=VALUE, not {text!r}")
    return name, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--http", choices=["auto", "h11", "httptools"], default="auto")
    parser.add_argument(
        "--variants", type=_names((*VARIANTS, *EXTRA_VARIANTS)), default=list(VARIANTS)
    )
    parser.add_argument("--scenarios", type=_names(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--rates", type=_floats, help="multiples of C (default 0.5,...,8)")
    parser.add_argument("--quick", action="store_true", help="0.8x, 2x, 4x, 8x; shorter runs")
    parser.add_argument("--duration", type=float, help="s per rate (default 7; quick 4)")
    parser.add_argument("--skip", type=float, default=1.0, help="warm-up s left out")
    parser.add_argument("--step-seconds", type=float, help="s per step phase (5; quick 3)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=2.0, help="client timeout, s")
    parser.add_argument("--slo", type=float, default=100.0, help="ms")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--capacity", type=float, help="C in requests/s (no calibration)")
    parser.add_argument("--fixed-limit", type=int, default=8, help="the fixed variant's limit")
    parser.add_argument("--uvicorn-limits", type=_floats, help="N to try (8,16,32,64,96)")
    parser.add_argument("--uvicorn-limit", type=int, help="this N, no search")
    parser.add_argument("--overhead-rounds", type=int, help="default 3 (quick 1)")
    parser.add_argument(
        "--overhead-side-by-side",
        action="store_true",
        help="the overhead's three servers at once, each under its own load",
    )
    parser.add_argument(
        "--server-env", type=_env, action="append", default=[], help="NAME=VALUE for the server"
    )
    parser.add_argument(
        "--wait-others", type=float, default=600.0, help="s to wait for other benchmarks"
    )
    parser.add_argument("--no-realtime", action="store_true", help="no SCHED_FIFO")
    args = parser.parse_args(argv)
    quick = args.quick
    s = Settings(
        loop=args.loop,
        http=args.http,
        variants=args.variants,
        scenarios=args.scenarios,
        rates=args.rates or ([0.8, 2.0, 4.0, 8.0] if quick else list(RATES)),
        duration=args.duration or (4.0 if quick else 7.0),
        skip=args.skip,
        step_seconds=args.step_seconds or (3.0 if quick else 5.0),
        connections=args.connections,
        timeout=args.timeout,
        slo=args.slo / 1e3,
        seed=args.seed,
        fixed_limit=args.fixed_limit,
        uvicorn_limits=[
            int(n) for n in (args.uvicorn_limits or ([16, 64] if quick else [8, 16, 32, 64, 96]))
        ],
        uvicorn_limit=args.uvicorn_limit,
        overhead_rounds=args.overhead_rounds or (1 if quick else 3),
        overhead_side_by_side=args.overhead_side_by_side,
        capacity=args.capacity,
        server_env=dict(args.server_env),
        wait_others=args.wait_others,
    )
    if s.skip >= s.duration:
        parser.error("--skip must be shorter than --duration")
    scheduling = "ordinary process" if args.no_realtime else realtime()
    print(
        f"python {platform.python_version()}, nproc {os.cpu_count()}; uvicorn --loop {s.loop} "
        f"--http {s.http}, one worker; generator: uvloop, {scheduling}; Poisson, "
        f"{s.connections} connections, timeout {s.timeout:g} s, SLO {s.slo * 1e3:g} ms"
    )
    print(
        f"variants {', '.join(s.variants)}; scenarios {', '.join(s.scenarios)}; rates "
        f"{', '.join(_rate_label(x) for x in s.rates)} x {s.duration:g} s; estimated "
        f"{estimate(s) / 60:.0f} min"
    )
    started = time.monotonic()
    if "OVERLOAD_WORK_ROUNDS" not in s.server_env:
        probe = start_server("none", s)
        probe.stop(timeout=5)
        s.server_env["OVERLOAD_WORK_ROUNDS"] = str(probe.health["work_rounds"])
        print(
            f"GET /work: {probe.health['work_rounds']} rounds of the loop, "
            f"{probe.health['work_cpu_ms']} ms of CPU in the first server; every server "
            f"burns these rounds (OVERLOAD_WORK_ROUNDS)"
        )
    c = s.capacity if s.capacity is not None else calibrate(s)
    if s.capacity is not None:
        s.capacity_note = f"C = {c:.0f}/s (given)"
    if (
        "uvicorn" in s.variants
        and s.uvicorn_limit is None
        and ("rates" in s.scenarios or "step" in s.scenarios)
    ):
        s.uvicorn_limit = pick_uvicorn_limit(c, s)
    rates = run_rates(c, s) if "rates" in s.scenarios else {}
    step = run_step(c, s) if "step" in s.scenarios else {}
    priority = run_priority(c, s) if "priority" in s.scenarios else {}
    per = run_overhead(c, s) if "overhead" in s.scenarios else {}
    print(f"\n# Results ({(time.monotonic() - started) / 60:.1f} min; {s.capacity_note})")
    if rates:
        report_rates(rates, c, s)
    report_step(step, c, s)
    report_priority(priority, c, s)
    overhead = report_overhead(per)
    report_checks(c, s, rates, step, priority, overhead)
    busy = [
        f"{r.variant} {r.scenario}"
        for r in [*rates.values(), *step.values(), *priority.values()]
        if r.busy
    ]
    if busy:
        print(f"\nruns where other processes used > {NOISY:g}% of a core: {', '.join(busy)}")
    drifted = [
        f"{r.variant} {r.scenario} ({r.drifted})"
        for r in [*rates.values(), *step.values(), *priority.values()]
        if r.drifted
    ]
    if drifted:
        print(
            "\nruns the machine ran at another speed than its calibration (a canary loop, "
            f"timed twice a second; see bench/_machine.py): {', '.join(drifted)}"
        )
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
