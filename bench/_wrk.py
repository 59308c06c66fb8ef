"""Shared by the benchmarks through a real server: uvicorn child processes, driven by ``wrk``.

``Served`` is the base of the scripts' ``Server`` classes: it starts and stops a uvicorn
server (one worker, 127.0.0.1, a free port, no access log, its output in a temporary file)
and keeps what the wrk runs against it measured, with the server's CPU time per request
read from ``/proc`` around each run (Linux).
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    import argparse

ROOT = Path(__file__).resolve().parent.parent
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The options both server benchmarks take: uvicorn's loop and http, the rounds and wrk's."""
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--http", choices=["auto", "h11", "httptools"], default="auto")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("-d", "--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("-t", "--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("-c", "--connections", type=int, default=32, help="wrk connections")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of wrk before measuring")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds the process has used, from /proc (Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan"), float("nan")
    fields = stat[stat.rindex(")") + 2 :].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def parse_latency(text: str, pct: str) -> float:
    match = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.MULTILINE)
    return float(match.group(1)) * _UNITS[match.group(2)] if match else float("nan")


@dataclass
class WrkRun:
    rps: float
    requests: int
    p50: float
    p99: float
    errors: str


def run_wrk(
    label: str, port: int, threads: int, connections: int, duration: int, script: str = ""
) -> WrkRun:
    """One wrk run against the server on ``port`` (with a Lua ``script`` if given).

    Refuses runs with non-2xx responses.
    """
    cmd = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency",
        *(["-s", script] if script else []), f"http://127.0.0.1:{port}/",
    ]  # fmt: skip
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=duration + 30, check=False
    ).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if rps is None or total is None:
        raise RuntimeError(f"wrk against {label} printed no Requests/sec:\n{out}")
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if bad:
        raise RuntimeError(f"{label}: {bad.group(1)} non-2xx responses (rejected?)\n{out}")
    errors = re.search(r"Socket errors:.*", out)
    return WrkRun(
        float(rps.group(1)),
        int(total.group(1)),
        parse_latency(out, "50"),
        parse_latency(out, "99"),
        errors.group(0) if errors else "",
    )


@dataclass(kw_only=True)
class Served:
    """A uvicorn server in a child process and the wrk runs' figures, one entry per run."""

    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None
    script: str = ""  # a Lua script for wrk, if any
    rps: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    user_us: list[float] = field(default_factory=list)
    sys_us: list[float] = field(default_factory=list)
    busy: list[float] = field(default_factory=list)
    #: wrk's voluntary context switches per request: how often the client went idle and had
    #: to be woken by a response.
    client_wakes: list[float] = field(default_factory=list)
    #: With ``measure(..., profile=True)``: the server's CPU µs per request spent in the
    #: kernel waking the reader of its responses (samples under ``sock_def_readable``).
    waking_us: list[float] = field(default_factory=list)

    if TYPE_CHECKING:
        # A field or a property of the subclass (not declared here: a dataclass would take
        # the base's attribute for the subclass field's default).
        @property
        def label(self) -> str: ...

    def start(
        self,
        target: str,
        loop: str,
        http: str,
        env: dict[str, str] | None = None,
        extra: tuple[str, ...] = (),
    ) -> None:
        """Start uvicorn serving ``target`` on a free port (``env``: the child's environment;
        ``extra``: more command-line options)."""
        self.port = free_port()
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - outlives this call; stop() closes it
        cmd = [
            sys.executable, "-m", "uvicorn", target,
            "--app-dir", str(ROOT),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--no-access-log",
            "--log-level", "warning",
            "--loop", loop,
            "--http", http,
            *extra,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT
        )

    def log_tail(self, chars: int) -> str:
        """The last ``chars`` characters uvicorn printed."""
        if self.log is None:
            return ""
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-chars:]

    def stop(self, timeout: float) -> None:
        """Terminate the server (kill it after ``timeout`` seconds) and close its log."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        if self.log is not None:
            self.log.close()
            self.log = None

    def run_wrk(self, threads: int, connections: int, duration: int) -> WrkRun:
        return run_wrk(self.label, self.port, threads, connections, duration, self.script)

    def measure(
        self,
        threads: int,
        connections: int,
        duration: int,
        *,
        profile: bool = False,
        client_wakes: bool = True,
    ) -> WrkRun:
        """One wrk run, recorded, with the server's CPU time per request from /proc around it
        (and, with ``profile``, a ``perf record`` of the server during the run).

        ``client_wakes=False`` records no wrk wake-ups (NaN): they are read from this process's
        reaped children, which mixes up two wrk runs that overlap."""
        assert self.proc is not None
        recorder = _Recorder(self.proc.pid) if profile else None
        user0, sys0 = cpu_seconds(self.proc.pid)
        wakes0 = resource.getrusage(resource.RUSAGE_CHILDREN).ru_nvcsw
        try:
            run = self.run_wrk(threads, connections, duration)
        finally:
            wakes1 = resource.getrusage(resource.RUSAGE_CHILDREN).ru_nvcsw
            user1, sys1 = cpu_seconds(self.proc.pid)
            share = recorder.finish() if recorder is not None else None
        self.client_wakes.append((wakes1 - wakes0) / run.requests if client_wakes else float("nan"))
        if share is not None:
            self.waking_us.append(share * (user1 - user0 + sys1 - sys0) / run.requests * 1e6)
        self.rps.append(run.rps)
        self.p50.append(run.p50)
        self.p99.append(run.p99)
        self.user_us.append((user1 - user0) / run.requests * 1e6)
        self.sys_us.append((sys1 - sys0) / run.requests * 1e6)
        self.busy.append((user1 - user0 + sys1 - sys0) / duration * 100)
        return run

    def round_line(self, r: int, run: WrkRun, width: int) -> str:
        """The line printed after the measured run ``run`` of round ``r`` (from 0)."""
        return (
            f"  round {r + 1}: {self.label:{width}} {run.rps:>8,.0f} req/s  "
            f"p50 {run.p50:.2f} ms  p99 {run.p99:.2f} ms  server CPU "
            f"{self.user_us[-1]:.1f} user + {self.sys_us[-1]:.1f} sys µs/req, "
            f"{self.busy[-1]:.0f}% busy  {run.errors}".rstrip()
        )


class _Recorder:
    """``perf record`` of one process (call stacks, the software CPU clock), from creation
    to ``finish()``, which returns the share of its samples spent waking the reader of a
    socket it wrote to (``sock_def_readable`` on the stack)."""

    def __init__(self, pid: int) -> None:
        if shutil.which("perf") is None:
            raise RuntimeError("perf is not on PATH (Debian: linux-perf)")
        self.data = tempfile.NamedTemporaryFile(suffix=".perf")  # noqa: SIM115 - closed in finish()
        self.proc = subprocess.Popen(
            ["perf", "record", "-q", "-e", "cpu-clock", "-F", "999", "-g", "-p", str(pid),
             "-o", self.data.name],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip

    def finish(self) -> float:
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=30)
        try:
            script = subprocess.run(
                ["perf", "script", "-i", self.data.name, "-F", "ip,sym"],
                capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
        finally:
            self.data.close()
        samples = waking = 0
        for stack in script.stdout.split("\n\n"):
            if stack.strip():
                samples += 1
                waking += "sock_def_readable" in stack
        if not samples:
            raise RuntimeError(f"perf recorded nothing: {err.decode(errors='replace')[-500:]}")
        return waking / samples


def print_table(rows: list[list[str]], left: int = 1) -> None:
    """Columns padded to their widest cell; the first ``left`` left-aligned; a rule under row 0."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for j, row in enumerate(rows):
        print(
            "  ".join(
                c.ljust(w) if i < left else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if j == 0:
            print("  ".join("-" * w for w in widths))
