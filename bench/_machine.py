"""What else the machine did during a benchmark: CPU used by other processes, and how fast
the machine itself ran.

The benchmarks run on small shared machines; a result taken while something else was busy
says so next to it. Counted per process from ``/proc`` (Linux; elsewhere nothing is
reported): user-space processes other than the benchmark's own (the script and everything
it started). A small sampler process rereads ``/proc`` twice a second while the run lasts,
so a process that starts and ends inside the run is counted too (up to its last sample);
it runs apart so that its reads never take the GIL from a benchmark's event loop. Kernel
threads are left out, since loopback traffic makes them work for the benchmark itself.

The machine's own speed is not constant either: on the shared VMs these benchmarks run on,
the same pure-Python loop has taken 1.1 ms in one second and 2.4 ms a few seconds later with
nothing else running in the guest (the host's other tenants; the guest reports no steal
time). So at every read the sampler also times a *canary*: a fixed pure-Python loop, in its
own thread's CPU time (time the guest ran it, which is where a slower host shows). A
benchmark compares the canary's median over a run with the one over its calibration
(:meth:`Watch.speed`) and flags the runs that the machine ran at another speed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

#: Seconds between two reads of ``/proc`` by the sampler.
INTERVAL = 0.5
#: Rounds of the canary's loop: about 0.3 ms of CPU, so at most 0.1% of a core.
CANARY_ROUNDS = 3000
#: A run whose canary ran this much slower or faster than the reference is flagged. (Load
#: alone moves it by up to ~20%: 0.30-0.33 ms idle, 0.38 ms beside a loaded server.)
DRIFT = 0.25


def canary(rounds: int = CANARY_ROUNDS) -> float:
    """CPU seconds this thread takes for a fixed pure-Python loop: the machine's speed now."""
    t0 = time.thread_time()
    x = 0
    for i in range(rounds):
        x = (x + i * i) & 0xFFFF
    return time.thread_time() - t0


def _stat(pid: int) -> tuple[str, int, float] | None:
    """(name, parent pid, user+system CPU seconds) of a process, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    tick = os.sysconf("SC_CLK_TCK")
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    return comm, int(fields[1]), (int(fields[11]) + int(fields[12])) / tick


def _processes(root: int | None = None) -> dict[int, tuple[str, float]]:
    """pid -> (name, CPU seconds) of the user-space processes outside ``root``'s tree
    (default: this process's)."""
    root = os.getpid() if root is None else root
    try:
        pids = [int(e.name) for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return {}
    stats = {pid: stat for pid in pids if (stat := _stat(pid)) is not None}
    ours = {root}
    grown = True
    while grown:  # the benchmark's own tree: its children, their children...
        grown = False
        for pid, (_, ppid, _) in stats.items():
            if ppid in ours and pid not in ours:
                ours.add(pid)
                grown = True
    return {
        pid: (comm, cpu)
        for pid, (comm, ppid, cpu) in stats.items()
        if pid not in ours and pid != 2 and ppid != 2  # 2: kthreadd, parent of kernel threads
    }


def _sample(root: int) -> None:
    """The sampler's loop: until stdin closes, then print what others used and the canary's
    times, as JSON."""
    import select

    before = _processes(root)
    latest = dict(before)
    canaries = [canary()]
    while not select.select([sys.stdin], [], [], INTERVAL)[0]:
        latest.update(_processes(root))
        canaries.append(canary())
    latest.update(_processes(root))
    used: dict[str, float] = {}
    for pid, (comm, cpu) in latest.items():
        used[comm] = used.get(comm, 0.0) + cpu - before.get(pid, (comm, 0.0))[1]
    with contextlib.suppress(BrokenPipeError):  # the benchmark may end without asking
        print(json.dumps({"used": used, "canary": canaries}), flush=True)


@dataclass
class Watch:
    """Started before a run; :meth:`summary` (or :meth:`percent`) after it."""

    wall: float
    sampler: subprocess.Popen[str] | None = None
    used: dict[str, float] | None = None
    #: The canary's CPU seconds, one per read of the sampler.
    canaries: list[float] | None = None

    @classmethod
    def start(cls) -> Watch:
        sampler = None
        if Path("/proc/self/stat").exists():
            sampler = subprocess.Popen(
                [sys.executable, __file__, str(os.getpid())],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        return cls(time.monotonic(), sampler)

    def _finish(self) -> dict[str, float]:
        if self.used is None:
            self.used = {}
            sampler, self.sampler = self.sampler, None
            if sampler is not None:
                out, _ = sampler.communicate(timeout=10)  # closing stdin ends it
                if out.strip():
                    report = json.loads(out)
                    self.used = report["used"]
                    self.canaries = report["canary"]
            self.wall = time.monotonic() - self.wall
        return self.used

    def canary(self) -> float:
        """The canary's median CPU seconds over the run (NaN where there is no sampler;
        ends the watch)."""
        self._finish()
        return statistics.median(self.canaries) if self.canaries else math.nan

    def speed(self, reference: float) -> float:
        """How fast the machine ran over the run, against a ``reference`` canary time
        (another watch's `canary`): 1 the same, 0.5 half as fast (NaN if unknown)."""
        return reference / self.canary()

    def percent(self) -> float:
        """Percent of one core the other processes used over the run (ends the watch)."""
        used = self._finish()
        return sum(used.values()) / self.wall * 100

    def summary(self) -> str:
        used = self._finish()
        wall = self.wall
        top = ", ".join(
            f"{comm} {cpu / wall * 100:.0f}%"
            for comm, cpu in sorted(used.items(), key=lambda item: -item[1])[:3]
            if cpu / wall > 0.02
        )
        spread = ""
        if self.canaries:
            spread = (
                f"; canary {self.canary() * 1e3:.2f} ms ({min(self.canaries) * 1e3:.2f}-"
                f"{max(self.canaries) * 1e3:.2f})"
            )
        return (
            f"{wall:.0f} s wall; other processes used {self.percent():.0f}% of one core"
            f"{f' ({top})' if top else ''}; load average now {os.getloadavg()[0]:.2f}; "
            f"nproc {os.cpu_count()}{spread}"
        )


def drift(speed: float) -> str:
    """A flag for a run the machine ran at another speed than its reference ("" if not)."""
    if math.isnan(speed) or abs(speed - 1.0) <= DRIFT:
        return ""
    return f"{'SLOW' if speed < 1.0 else 'FAST'} x{speed:.2f}"


if __name__ == "__main__":
    _sample(int(sys.argv[1]))
