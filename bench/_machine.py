"""What else the machine did during a benchmark: CPU used by other processes.

The benchmarks run on small shared machines; a result taken while something else was busy
says so next to it. Counted per process from ``/proc`` (Linux; elsewhere nothing is
reported): user-space processes other than the benchmark's own (the script and everything
it started). A small sampler process rereads ``/proc`` twice a second while the run lasts,
so a process that starts and ends inside the run is counted too (up to its last sample);
it runs apart so that its reads never take the GIL from a benchmark's event loop. Kernel
threads are left out, since loopback traffic makes them work for the benchmark itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

#: Seconds between two reads of ``/proc`` by the sampler.
INTERVAL = 0.5


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
    """The sampler's loop: until stdin closes, then print what others used, as JSON."""
    import select

    before = _processes(root)
    latest = dict(before)
    while not select.select([sys.stdin], [], [], INTERVAL)[0]:
        latest.update(_processes(root))
    latest.update(_processes(root))
    used: dict[str, float] = {}
    for pid, (comm, cpu) in latest.items():
        used[comm] = used.get(comm, 0.0) + cpu - before.get(pid, (comm, 0.0))[1]
    with contextlib.suppress(BrokenPipeError):  # the benchmark may end without asking
        print(json.dumps(used), flush=True)


@dataclass
class Watch:
    """Started before a run; :meth:`summary` (or :meth:`percent`) after it."""

    wall: float
    sampler: subprocess.Popen[str] | None = None
    used: dict[str, float] | None = None

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
                    self.used = json.loads(out)
            self.wall = time.monotonic() - self.wall
        return self.used

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
        return (
            f"{wall:.0f} s wall; other processes used {self.percent():.0f}% of one core"
            f"{f' ({top})' if top else ''}; load average now {os.getloadavg()[0]:.2f}; "
            f"nproc {os.cpu_count()}"
        )


if __name__ == "__main__":
    _sample(int(sys.argv[1]))
