"""What BlockingDetectorMiddleware costs a real server: uvicorn, detector off and on.

One uvicorn worker (127.0.0.1, a free port, ``--lifespan on``, no access log) serves a small
FastAPI app (``bench/_blocking_apps.py``: ``GET /`` awaits 1 ms and answers a small JSON)
without the detector ("off") and with ``BlockingDetectorMiddleware(threshold=0.1)`` ("on":
the default poll interval, 20 ms: on Linux the heartbeat task beats every 10 ms and the
watchdog thread sleeps until a beat is late; elsewhere it wakes 50 times a second and the
heartbeat beats every 25 ms). Only one server runs at a time, a fresh process for
every run, so that neither an idle neighbour nor one process's memory layout tilts the comparison.

A pair is one run of each, off then on or on then off (alternating pair after pair). Each
run: start the server; check it (on: a 150 ms ``time.sleep`` on the loop is reported once
and the watchdog thread is alive; off: no watchdog thread); 1 s of wrk to warm up; then

* fixed rate: wrk, 1 thread, 8 connections, each waiting a random 0-5 ms between a response
  and its next request (a steady ~1,900 req/s here, about a quarter of what the server can
  take), measuring the server's CPU time per request and p50 / p99 / p99.9 latency;
* saturation: wrk -t1 -c32, measuring requests/s and CPU time per request;

and after them, that the detector reported nothing while serving (the handler never holds
the loop for 100 ms). CPU time is the server's, all its threads, from
``/proc/<pid>/task/*/schedstat`` (nanoseconds; the loop thread apart from the watchdog's
threads); latencies are wrk's, exact percentiles from its Lua ``done`` hook. Idle cost: both
servers started side by side and left idle for 10 s, their CPU time counted over that window.

Other processes' CPU use is watched over every pair (``_machine.Watch``); a pair during
which they used more than ``--noisy`` % of a core is not clean: the script waits, runs
another pair (at most ``--retries`` extra), and takes the medians over the clean pairs (all
pairs, if fewer than two are clean); the idle measurement is repeated the same way. The
table shows medians per side, the ratio of the medians, and the median and range of the
per-pair ratios on/off (what PASS/FAIL use): the target is at most 1% more CPU per request
(fixed rate), 1% fewer requests/s at saturation, and 2% higher p99 latency (fixed rate).
On a small shared VM one run differs from the next by several percent (an off/off pair
does too): a 1% difference needs many pairs to resolve; the range column shows the spread.

    python bench/blocking_overhead.py                 # 6 pairs, ~3.5 min (~5 with repeats)
    python bench/blocking_overhead.py --loop uvloop   # uvloop instead of asyncio
    python bench/blocking_overhead.py --app starlette # Starlette instead of FastAPI
    python bench/blocking_overhead.py --quick         # ~40 s smoke run (2 short pairs)
    python bench/blocking_overhead.py --breakdown     # where the cost comes from (~5 min)

``--breakdown`` measures only the fixed-rate CPU per request and p99, over ``--rounds``
rounds (default 5, alternating order) of seven servers: no detector; the detector's
per-request work alone (no heartbeat, no thread); plus its heartbeat task; plus, instead of
the watchdog, a Python thread that never wakes, or one that wakes every poll interval and
does nothing else; the same wake-ups from a child process (no shared GIL); and the whole
detector.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from _machine import Watch
from _wrk import Served, print_table

APPS = {
    "fastapi": ("bench._blocking_apps:fastapi_off", "bench._blocking_apps:fastapi_on"),
    "starlette": ("bench._blocking_apps:starlette_off", "bench._blocking_apps:starlette_on"),
}
MODES = ("off", "on")
#: The servers (``MODES`` and ``--breakdown`` variants) that run a watchdog thread.
WATCHING = ("on", "notap", "polling", "quiet")
CPU_TARGET = 1.01  # on/off, server CPU per request at the fixed rate
RPS_TARGET = 0.99  # on/off, requests/s at saturation
P99_TARGET = 1.02  # on/off, p99 latency at the fixed rate

#: wrk's Lua hooks: exact figures at the end of a run (latencies in µs), and, for the
#: fixed-rate runs, a random pause of 0..THINK ms before each request on a connection.
_DONE = """
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d p50=%.0f p99=%.0f p999=%.0f mean=%.1f max=%.0f "
    .. "connect=%d read=%d write=%d status=%d timeout=%d\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency:percentile(99.9), latency.mean, latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""
_THINK = """
function delay()
  return math.random(0, THINK)
end
"""


# -- measuring -------------------------------------------------------------------------------


def thread_cpu(pid: int) -> tuple[float, float]:
    """(loop thread, other threads) CPU seconds of the process, from schedstat (ns).

    Threads that have exited are not counted; the servers here start none that exit.
    """
    loop = others = 0.0
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return float("nan"), float("nan")
    for tid in tids:
        try:
            ns = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if tid == pid:
            loop += ns / 1e9
        else:
            others += ns / 1e9
    return loop, others


@dataclass
class Run:
    """One measured wrk run against one server."""

    rps: float
    requests: int
    p50: float  # ms
    p99: float
    p999: float
    cpu_us: float  # server CPU per request, all threads
    loop_us: float  # of which the loop thread
    threads_us: float  # of which the other threads (the watchdog's)
    busy: float  # server CPU, % of one core
    errors: str


def wrk(
    port: int, script: str, threads: int, connections: int, duration: int, cpu: int | None = None
) -> dict[str, int]:
    """One wrk run (on CPU ``cpu`` only, if given: through ``taskset``, as runs are started
    from several threads at once, where ``preexec_fn`` is not safe)."""
    cmd = [
        *([] if cpu is None else ["taskset", "-c", str(cpu)]),
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "-s", script,
        f"http://127.0.0.1:{port}/",
    ]  # fmt: skip
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=duration + 30, check=False
    ).stdout
    match = re.search(r"^RESULT (.*)$", out, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"wrk printed no RESULT line:\n{out}")
    result = {k: round(float(v)) for k, v in (kv.split("=") for kv in match.group(1).split())}
    if result["status"]:
        raise RuntimeError(f"{result['status']} non-2xx responses\n{out}")
    return result


@dataclass(kw_only=True)
class Server(Served):
    mode: str  # "off" or "on"
    target: str

    @property
    def label(self) -> str:
        return f"detector {self.mode}"

    def start(
        self,
        target: str,
        loop: str,
        http: str,
        env: dict[str, str] | None = None,
        extra: tuple[str, ...] = (),
    ) -> None:
        """``Served.start`` with ``--lifespan on`` (the detector starts its watchdog there)."""
        super().start(target, loop, http, env, ("--lifespan", "on", *extra))

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label}: uvicorn exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.label}: port {self.port} did not accept within {timeout} s")

    def get(self, path: str) -> dict[str, object]:
        url = f"http://127.0.0.1:{self.port}{path}"
        with urllib.request.urlopen(url, timeout=5) as response:
            if response.status != 200:
                raise RuntimeError(f"{self.label}: GET {path} answered {response.status}")
            body: dict[str, object] = json.loads(response.read())
            return body

    def check(self, block: bool) -> None:
        """The app answers; the watchdog thread runs exactly when the detector is on; with
        ``block``, a 150 ms stall is reported once (on) or not at all (off)."""
        self.get("/")
        stats = self.get("/_stats")
        if stats["watchdog"] != (self.mode in WATCHING):
            raise RuntimeError(f"{self.label}: watchdog thread alive: {stats['watchdog']}")
        if not block:
            return
        self.get("/_block")
        want = 1 if self.mode == "on" else 0
        deadline = time.monotonic() + 2.0
        while (blocks := self.get("/_stats")["blocks"]) != want and time.monotonic() < deadline:
            time.sleep(0.05)
        if blocks != want:
            raise RuntimeError(f"{self.label}: a 150 ms stall reported {blocks} times")

    def reported(self) -> int:
        blocks = self.get("/_stats")["blocks"]
        assert isinstance(blocks, int)
        return blocks

    def pin(self, cpu: int) -> None:
        """Run the server on CPU ``cpu`` only (its threads inherit it)."""
        assert self.proc is not None
        os.sched_setaffinity(self.proc.pid, {cpu})

    def measure_run(
        self, script: str, threads: int, connections: int, duration: int, cpu: int | None = None
    ) -> Run:
        """One wrk run with a Lua ``script`` (wrk on CPU ``cpu`` only, if given), with the
        server's CPU time around it."""
        assert self.proc is not None
        pid = self.proc.pid
        loop0, others0 = thread_cpu(pid)
        r = wrk(self.port, script, threads, connections, duration, cpu)
        loop1, others1 = thread_cpu(pid)
        n = r["requests"]
        seconds = r["duration_us"] / 1e6
        loop_s, threads_s = loop1 - loop0, others1 - others0
        errors = ", ".join(f"{k} {r[k]}" for k in ("connect", "read", "write", "timeout") if r[k])
        return Run(
            rps=n / seconds,
            requests=n,
            p50=r["p50"] / 1e3,
            p99=r["p99"] / 1e3,
            p999=r["p999"] / 1e3,
            cpu_us=(loop_s + threads_s) / n * 1e6,
            loop_us=loop_s / n * 1e6,
            threads_us=threads_s / n * 1e6,
            busy=(loop_s + threads_s) / seconds * 100,
            errors=f"socket errors: {errors}" if errors else "",
        )


@dataclass
class Pair:
    index: int
    order: tuple[str, ...]
    fixed: dict[str, Run] = field(default_factory=dict)
    sat: dict[str, Run] = field(default_factory=dict)
    false_reports: dict[str, int] = field(default_factory=dict)
    other: float = 0.0  # other processes' CPU, % of one core
    watch: str = ""
    clean: bool = True


@dataclass
class Settings:
    targets: dict[str, str]
    loop: str
    http: str
    warmup: int
    fixed_script: str
    fixed_connections: int
    fixed_duration: int
    sat_script: str
    threads: int
    connections: int
    duration: int


def one_run(mode: str, s: Settings) -> tuple[Run, Run, int]:
    """A fresh server: checked, warmed up, measured at the fixed rate and at saturation."""
    server = Server(mode=mode, target=s.targets[mode])
    try:
        server.start(server.target, s.loop, s.http)
        try:
            server.wait_ready()
            server.check(block=True)
        except Exception:
            print(server.log_tail(2000), file=sys.stderr)
            raise
        before = server.reported()
        if s.warmup:
            wrk(server.port, s.sat_script, s.threads, s.connections, s.warmup)
        fixed = server.measure_run(s.fixed_script, 1, s.fixed_connections, s.fixed_duration)
        sat = server.measure_run(s.sat_script, s.threads, s.connections, s.duration)
        false_reports = server.reported() - before
    finally:
        server.stop(timeout=5)
    return fixed, sat, false_reports


def run_pair(index: int, s: Settings, noisy: float) -> Pair:
    pair = Pair(index, MODES if index % 2 == 0 else MODES[::-1])
    watch = Watch.start()
    for mode in pair.order:
        pair.fixed[mode], pair.sat[mode], pair.false_reports[mode] = one_run(mode, s)
    pair.other = watch.percent()
    pair.watch = watch.summary()
    pair.clean = pair.other <= noisy
    for mode in pair.order:
        f, t = pair.fixed[mode], pair.sat[mode]
        print(
            f"  pair {index + 1} {mode:3}: fixed {f.rps:6,.0f} req/s  p50 {f.p50:.3f} "
            f"p99 {f.p99:.3f} p99.9 {f.p999:.3f} ms  CPU {f.cpu_us:.1f} µs/req "
            f"({f.threads_us:.2f} other threads), {f.busy:.0f}% busy | saturation "
            f"{t.rps:6,.0f} req/s  CPU {t.cpu_us:.1f} µs/req  p99 {t.p99:.2f} ms"
            f"{'  ' + f.errors if f.errors else ''}{'  ' + t.errors if t.errors else ''}"
        )
    print(f"    {'clean' if pair.clean else 'NOT CLEAN'}: {pair.watch}")
    return pair


def idle_cost(s: Settings, seconds: float) -> tuple[dict[str, tuple[float, float]], float, str]:
    """Both servers side by side, idle: (loop thread, other threads) CPU s over ``seconds``,
    and other processes' CPU use meanwhile (% of one core, and Watch's summary)."""
    servers = {mode: Server(mode=mode, target=s.targets[mode]) for mode in MODES}
    try:
        for server in servers.values():
            server.start(server.target, s.loop, s.http)
        for server in servers.values():
            server.wait_ready()
            server.check(block=False)
        time.sleep(1.0)  # let the first requests' connections close
        pids = {m: srv.proc.pid for m, srv in servers.items() if srv.proc is not None}
        watch = Watch.start()
        before = {m: thread_cpu(pid) for m, pid in pids.items()}
        time.sleep(seconds)
        after = {m: thread_cpu(pid) for m, pid in pids.items()}
        other, summary = watch.percent(), watch.summary()
    finally:
        for server in servers.values():
            server.stop(timeout=5)
    used = {m: (after[m][0] - before[m][0], after[m][1] - before[m][1]) for m in MODES}
    return used, other, summary


# -- reporting -------------------------------------------------------------------------------


BREAKDOWN = (
    ("off", "no detector"),
    ("pass", "a pass-through middleware"),
    ("requests", "the per-request work alone"),
    ("heartbeat", "+ the heartbeat task"),
    ("sleeper", "+ a thread that never wakes"),
    ("thread", "+ a thread waking every 20 ms, doing nothing"),
    ("process", "+ a child process waking every 20 ms instead"),
    ("notap", "the detector without its tap"),
    ("polling", "the detector, its watchdog looking every poll interval"),
    ("quiet", "the detector, its beats moving no timer and reading no clock"),
    ("on", "the detector"),
)


def breakdown(s: Settings, rounds: int) -> None:
    """Fixed-rate CPU per request and p99 of each ``BREAKDOWN`` variant, medians."""
    runs: dict[str, list[Run]] = {name: [] for name, _ in BREAKDOWN}
    watch = Watch.start()
    for r in range(rounds):
        for name, _ in BREAKDOWN if r % 2 == 0 else BREAKDOWN[::-1]:
            server = Server(mode=name, target=f"bench._blocking_apps:breakdown_{name}")
            try:
                server.start(server.target, s.loop, s.http)
                server.wait_ready()
                server.get("/")
                if s.warmup:
                    wrk(server.port, s.sat_script, s.threads, s.connections, s.warmup)
                run = server.measure_run(s.fixed_script, 1, s.fixed_connections, s.fixed_duration)
            finally:
                server.stop(timeout=5)
            runs[name].append(run)
            print(
                f"  round {r + 1} {name:9}: CPU {run.cpu_us:6.1f} µs/req (loop thread "
                f"{run.loop_us:.1f}, other threads {run.threads_us:.2f}), p99 {run.p99:.3f} ms, "
                f"{run.rps:,.0f} req/s {run.errors}"
            )
    base_cpu = _med([r.cpu_us for r in runs["off"]])
    base_p99 = _med([r.p99 for r in runs["off"]])
    rows = [["variant", "", "CPU µs/req", "vs off", "loop thread", "other threads", "p99 ms",
             "p99 vs off", "runs"]]  # fmt: skip
    for name, what in BREAKDOWN:
        cpu = _med([r.cpu_us for r in runs[name]])
        p99 = _med([r.p99 for r in runs[name]])
        rows.append([
            name, what, f"{cpu:.1f}", f"{cpu / base_cpu:.3f}",
            f"{_med([r.loop_us for r in runs[name]]):.1f}",
            f"{_med([r.threads_us for r in runs[name]]):.2f}",
            f"{p99:.3f}", f"{p99 / base_p99:.3f}",
            " ".join(f"{r.cpu_us:.0f}" for r in runs[name]),
        ])  # fmt: skip
    print(f"\nmedians over {rounds} rounds (fixed rate; CPU per request of all threads):")
    print_table(rows, left=2)
    print(watch.summary())


def side_by_side(
    s: Settings, rounds: int, versus: tuple[str, str], pin_cpus: tuple[int, int] | None = None
) -> dict[str, float]:
    """Two servers at once, each under its own fixed-rate wrk, over the same seconds.

    The machine's speed drifts by tens of percent within seconds on a shared VM; two servers
    measured at the same time see the same drift, so their ratio keeps only what differs
    between them. Each round starts both servers afresh. ``versus``: ``off`` and ``on``,
    or two of the ``--breakdown`` variants (``off`` twice shows the method's own spread).
    With ``pin_cpus``, each server and its wrk run on one of those two CPUs (alternating
    between rounds), so neither pair's work lands between the other's requests. Returns
    the median paired ratios, the second server over the first.
    """
    modes = versus
    names = (versus[0], versus[1] + "'") if versus[0] == versus[1] else versus
    ratios: dict[str, list[float]] = {"cpu": [], "loop": [], "p50": [], "p99": [], "p999": []}
    runs: dict[str, list[Run]] = {name: [] for name in names}
    watch = Watch.start()
    for r in range(rounds):
        servers = [
            Server(
                mode=mode,
                target=s.targets.get(mode, f"bench._blocking_apps:breakdown_{mode}"),
            )
            for mode in modes
        ]
        if r % 2:
            servers.reverse()  # which one starts first, and takes which port, alternates
        # With pin: the CPU of each server in `servers` order; as `servers` is reversed in
        # odd rounds, each server alternates between the two CPUs.
        cpus: list[int | None] = [*pin_cpus] if pin_cpus else [None, None]
        try:
            for server, cpu in zip(servers, cpus, strict=True):
                server.start(server.target, s.loop, s.http)
                if cpu is not None:
                    server.pin(cpu)
            for server in servers:
                server.wait_ready()
                server.check(block=False)
            if s.warmup:
                for server, cpu in zip(servers, cpus, strict=True):
                    wrk(server.port, s.sat_script, s.threads, s.connections, s.warmup, cpu)
            with ThreadPoolExecutor(2) as pool:
                measured = list(
                    pool.map(
                        lambda server, cpu: server.measure_run(
                            s.fixed_script, 1, s.fixed_connections, s.fixed_duration, cpu
                        ),
                        servers,
                        cpus,
                    )
                )
        finally:
            for server in servers:
                server.stop(timeout=5)
        first, second = (measured[i] for i in (range(2) if r % 2 == 0 else (1, 0)))
        runs[names[0]].append(first)
        runs[names[1]].append(second)
        ratios["cpu"].append(second.cpu_us / first.cpu_us)
        ratios["loop"].append(second.loop_us / first.loop_us)
        ratios["p50"].append(second.p50 / first.p50)
        ratios["p99"].append(second.p99 / first.p99)
        ratios["p999"].append(second.p999 / first.p999)
        print(
            f"  round {r + 1:2}: {names[0]} {first.cpu_us:6.1f} µs/req p99 {first.p99:.3f} ms "
            f"{first.rps:5,.0f} req/s | {names[1]} {second.cpu_us:6.1f} µs/req p99 "
            f"{second.p99:.3f} ms {second.rps:5,.0f} req/s | CPU ratio "
            f"{ratios['cpu'][-1]:.3f}, p99 ratio {ratios['p99'][-1]:.3f} "
            f"{first.errors} {second.errors}".rstrip()
        )
    rows = [["measure", names[0], names[1], "paired ratio (median)", "rounds min..max"]]
    for key, attr, label, fmt in (
        ("cpu", "cpu_us", "CPU µs/req (all threads)", ".2f"),
        ("loop", "loop_us", "  of which the loop thread", ".2f"),
        ("p50", "p50", "p50 ms", ".3f"),
        ("p99", "p99", "p99 ms", ".3f"),
        ("p999", "p999", "p99.9 ms", ".3f"),
    ):
        a = _med([getattr(run, attr) for run in runs[names[0]]])
        b = _med([getattr(run, attr) for run in runs[names[1]]])
        values = ratios[key]
        rows.append(
            [label, format(a, fmt), format(b, fmt), f"{_med(values):.4f}",
             f"{min(values):.3f}..{max(values):.3f}"]
        )  # fmt: skip
    pinned = ", each with its wrk on a CPU of its own" if pin_cpus else ""
    print(f"\nmedians over {rounds} rounds, both servers measured at once{pinned}:")
    print_table(rows, left=1)
    print(f"machine: {watch.summary()}")
    return {key: _med(values) for key, values in ratios.items()}


def _med(values: list[float]) -> float:
    return statistics.median(values)


def _ratio(pair: Pair, runs: str, attr: str) -> float:
    """on/off of one figure (``attr`` of a Run) of one pair's fixed-rate or saturation runs."""
    measured: dict[str, Run] = getattr(pair, runs)
    return float(getattr(measured["on"], attr)) / float(getattr(measured["off"], attr))


def report(
    pairs: list[Pair], idle: dict[str, tuple[float, float]], idle_s: float
) -> dict[str, float]:
    """Print the table; return the paired on/off medians PASS/FAIL look at."""
    rows = [["measure", "off", "on", "on - off", "on/off", "paired on/off", "pairs min..max"]]
    paired: dict[str, float] = {}

    def row(name: str, key: str, runs: str, attr: str, fmt: str, ratio: bool = True) -> None:
        off = [getattr(getattr(p, runs)["off"], attr) for p in pairs]
        on = [getattr(getattr(p, runs)["on"], attr) for p in pairs]
        m_off, m_on = _med(off), _med(on)
        cells = [name, format(m_off, fmt), format(m_on, fmt), format(m_on - m_off, "+" + fmt)]
        if ratio and m_off > 0:
            ratios = [b / a for a, b in zip(off, on, strict=True)]
            paired[key] = _med(ratios)
            cells += [
                f"{m_on / m_off:.4f}",
                f"{paired[key]:.4f}",
                f"{min(ratios):.3f}..{max(ratios):.3f}",
            ]
        else:
            cells += ["", "", ""]
        rows.append(cells)

    row("fixed rate: req/s", "fixed_rps", "fixed", "rps", ",.0f")
    row("fixed rate: server CPU µs/req", "fixed_cpu", "fixed", "cpu_us", ".2f")
    row("  of which loop thread", "fixed_loop", "fixed", "loop_us", ".2f")
    row("  of which other threads", "fixed_threads", "fixed", "threads_us", ".2f", ratio=False)
    row("fixed rate: server busy %", "fixed_busy", "fixed", "busy", ".1f")
    row("fixed rate: p50 ms", "fixed_p50", "fixed", "p50", ".3f")
    row("fixed rate: p99 ms", "fixed_p99", "fixed", "p99", ".3f")
    row("fixed rate: p99.9 ms", "fixed_p999", "fixed", "p999", ".3f")
    row("saturation: req/s", "sat_rps", "sat", "rps", ",.0f")
    row("saturation: server CPU µs/req", "sat_cpu", "sat", "cpu_us", ".2f")
    row("  of which other threads", "sat_threads", "sat", "threads_us", ".2f", ratio=False)
    row("saturation: p50 ms", "sat_p50", "sat", "p50", ".3f")
    row("saturation: p99 ms", "sat_p99", "sat", "p99", ".3f")
    off_ms, on_ms = (sum(idle[m]) * 1e3 for m in MODES)
    rows.append(
        [f"idle {idle_s:.0f} s: server CPU ms", f"{off_ms:.1f}", f"{on_ms:.1f}",
         f"{on_ms - off_ms:+.1f}", "", "", ""]
    )  # fmt: skip
    rows.append(
        ["  of which other threads", f"{idle['off'][1] * 1e3:.1f}",
         f"{idle['on'][1] * 1e3:.1f}", f"{(idle['on'][1] - idle['off'][1]) * 1e3:+.1f}",
         "", "", ""]
    )  # fmt: skip
    print_table(rows)
    return paired


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--app", choices=sorted(APPS), default="fastapi")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--http", choices=["auto", "h11", "httptools"], default="auto")
    parser.add_argument("--pairs", type=int, default=6, help="off/on pairs (default 6)")
    parser.add_argument("--fixed-duration", type=int, default=8, help="s per fixed-rate run")
    parser.add_argument("--fixed-connections", type=int, default=8)
    parser.add_argument("--think", type=int, default=5, help="max ms between requests (fixed)")
    parser.add_argument("-d", "--duration", type=int, default=5, help="s per saturation run")
    parser.add_argument("-t", "--threads", type=int, default=1, help="wrk threads (saturation)")
    parser.add_argument("-c", "--connections", type=int, default=32, help="(saturation)")
    parser.add_argument("--warmup", type=int, default=1, help="s of wrk before measuring")
    parser.add_argument("--idle", type=float, default=10.0, help="s of the idle measurement")
    parser.add_argument(
        "--noisy", type=float, default=5.0, help="a pair is not clean when other processes "
        "used more than this %% of one core (default 5)"
    )  # fmt: skip
    parser.add_argument("--retries", type=int, default=2, help="extra pairs for unclean ones")
    parser.add_argument("--wait", type=float, default=5.0, help="s to wait after an unclean pair")
    parser.add_argument("--quick", action="store_true", help="~40 s smoke run (2 short pairs)")
    parser.add_argument(
        "--breakdown", action="store_true", help="where the cost comes from (fixed rate only)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds of --breakdown")
    parser.add_argument(
        "--side-by-side", action="store_true", help="off and on measured at the same time, "
        "each under its own wrk, over --pairs rounds (fixed rate only)"
    )  # fmt: skip
    parser.add_argument(
        "--pin", action="store_true", help="with --side-by-side: each server and its wrk "
        "on one CPU of their own (alternating between rounds)"
    )  # fmt: skip
    parser.add_argument(
        "--versus", nargs=2, default=list(MODES), metavar=("A", "B"), help="with "
        "--side-by-side: the two servers (default: off on); any of on and the --breakdown "
        "variants: " + ", ".join(name for name, _ in BREAKDOWN) + " (off off: the method's "
        "own spread)"
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.pairs, args.fixed_duration, args.duration, args.idle = 2, 3, 2, 3.0
        args.retries, args.wait = 1, 3.0
    if args.pairs < 1 or not 1 <= args.fixed_duration <= 60 or not 1 <= args.duration <= 60:
        parser.error("--pairs must be >= 1 and the durations between 1 and 60 seconds")
    if not 0 < args.idle <= 60 or not 0 <= args.retries <= 10 or not 0 <= args.wait <= 120:
        parser.error("--idle: (0, 60] s; --retries: 0..10; --wait: 0..120 s")
    if shutil.which("wrk") is None:
        parser.error("wrk is not on PATH")
    if args.pin and not args.side_by_side:
        parser.error("--pin applies to --side-by-side only")

    with tempfile.TemporaryDirectory() as tmp:
        fixed_script = Path(tmp, "fixed.lua")
        fixed_script.write_text(_THINK.replace("THINK", str(args.think)) + _DONE)
        sat_script = Path(tmp, "saturation.lua")
        sat_script.write_text(_DONE)
        settings = Settings(
            targets=dict(zip(MODES, APPS[args.app], strict=True)),
            loop=args.loop,
            http=args.http,
            warmup=args.warmup,
            fixed_script=str(fixed_script),
            fixed_connections=args.fixed_connections,
            fixed_duration=args.fixed_duration,
            sat_script=str(sat_script),
            threads=args.threads,
            connections=args.connections,
            duration=args.duration,
        )
        print(
            f"python {platform.python_version()}, nproc {os.cpu_count()}, "
            f"load {os.getloadavg()[0]:.2f}, app {args.app}, loop {args.loop}, http {args.http}; "
            f"detector threshold 0.1 s, default poll (0.02 s); "
            + (f"breakdown, {args.rounds} rounds" if args.breakdown else f"{args.pairs} pairs")
            + ", fresh server per run; "
            f"fixed rate: wrk -t1 -c{args.fixed_connections} -d{args.fixed_duration}s, "
            f"0-{args.think} ms between requests; saturation: wrk -t{args.threads} "
            f"-c{args.connections} -d{args.duration}s"
        )
        if args.side_by_side:
            versus = (args.versus[0], args.versus[1])
            if not set(versus) <= {name for name, _ in BREAKDOWN}:
                parser.error("--versus takes two of: " + ", ".join(n for n, _ in BREAKDOWN))
            pin_cpus = None
            if args.pin:
                allowed = sorted(os.sched_getaffinity(0))
                if len(allowed) < 2 or shutil.which("taskset") is None:
                    parser.error("--pin needs two CPUs and taskset (util-linux)")
                pin_cpus = (allowed[0], allowed[1])
            paired = side_by_side(settings, args.pairs, versus, pin_cpus)
            if versus != MODES:
                return 0
            ok_cpu, ok_p99 = paired["cpu"] <= CPU_TARGET, paired["p99"] <= P99_TARGET
            print(
                f"{'PASS' if ok_cpu else 'FAIL'}  server CPU per request at the fixed rate, "
                f"on/off <= {CPU_TARGET}: {paired['cpu']:.4f}\n"
                f"{'PASS' if ok_p99 else 'FAIL'}  p99 latency at the fixed rate, on/off <= "
                f"{P99_TARGET}: {paired['p99']:.4f}"
            )
            return 0 if ok_cpu and ok_p99 else 1
        if args.breakdown:
            if not 1 <= args.rounds <= 50:
                parser.error("--rounds: 1..50")
            breakdown(settings, args.rounds)
            return 0
        started = time.monotonic()
        machine = Watch.start()
        pairs: list[Pair] = []
        try:
            for attempt in range(args.retries + 1):
                idle, other, idle_watch = idle_cost(settings, args.idle)
                print(
                    f"  idle {args.idle:.0f} s, both servers side by side: off "
                    f"{sum(idle['off']) * 1e3:.1f} ms CPU, on {sum(idle['on']) * 1e3:.1f} ms "
                    f"CPU ({idle['on'][1] * 1e3:.1f} ms in its other threads)\n    "
                    f"{'clean' if other <= args.noisy else 'NOT CLEAN'}: {idle_watch}"
                )
                if other <= args.noisy or attempt == args.retries:
                    break
                print(f"    waiting {args.wait:.0f} s")
                time.sleep(args.wait)
            extra = 0
            index = 0
            while index < args.pairs or (
                sum(p.clean for p in pairs) < args.pairs and extra < args.retries
            ):
                if index >= args.pairs:
                    extra += 1
                pair = run_pair(index, settings, args.noisy)
                pairs.append(pair)
                index += 1
                if not pair.clean and args.wait:
                    print(f"    waiting {args.wait:.0f} s")
                    time.sleep(args.wait)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    clean = [p for p in pairs if p.clean]
    used = clean if len(clean) >= 2 else pairs
    print(
        f"\n{len(pairs)} pairs in {time.monotonic() - started:.0f} s; clean (other processes "
        f"<= {args.noisy:g}% of a core): "
        f"{', '.join(str(p.index + 1) for p in clean) or 'none'}; "
        f"medians over {'the clean pairs' if used is clean else 'all pairs (too few clean)'} "
        f"({len(used)}); other processes per pair: "
        f"{', '.join(f'{p.other:.1f}%' for p in pairs)}\n"
    )
    paired = report(used, idle, args.idle)
    if used is not pairs:
        every = {
            name: _med([_ratio(p, runs, attr) for p in pairs])
            for name, runs, attr in (
                ("CPU/req fixed", "fixed", "cpu_us"),
                ("req/s saturation", "sat", "rps"),
                ("p99 fixed", "fixed", "p99"),
            )
        }  # fmt: skip
        print(
            f"\nall {len(pairs)} pairs, clean or not: paired on/off "
            + ", ".join(f"{name} {value:.3f}" for name, value in every.items())
        )
    idle_on = sum(idle["on"]) - sum(idle["off"])
    print(
        f"\nidle: the detector adds {idle_on * 1e3 / args.idle:.2f} ms of CPU per second "
        f"({idle_on / args.idle * 100:.2f}% of a core)"
    )
    false = sum(p.false_reports["on"] for p in pairs)
    print(f"stalls reported while serving the benchmark (detector on, all pairs): {false}")
    print(f"machine: {machine.summary()}")
    checks = [
        (
            f"server CPU per request at the fixed rate, on/off <= {CPU_TARGET}",
            paired["fixed_cpu"],
            paired["fixed_cpu"] <= CPU_TARGET,
        ),
        (
            f"requests/s at saturation, on/off >= {RPS_TARGET}",
            paired["sat_rps"],
            paired["sat_rps"] >= RPS_TARGET,
        ),
        (
            f"p99 latency at the fixed rate, on/off <= {P99_TARGET}",
            paired["fixed_p99"],
            paired["fixed_p99"] <= P99_TARGET,
        ),
        ("no stall reported while serving the benchmark", float(false), false == 0),
    ]
    for text, value, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {text}: {value:.4g}")
    return 0 if all(ok for _, _, ok in checks) else 1


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
