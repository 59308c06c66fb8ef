"""What else the machine did during a benchmark: CPU used by other processes.

The benchmarks run on small shared machines; a result taken while something else was busy
says so next to it. Counted per process from ``/proc`` (Linux; elsewhere nothing is
reported): user-space processes other than this one and its children, alive at the end of
the run (one that started and ended inside the run is missed). Kernel threads are left out,
since loopback traffic makes them work for the benchmark itself.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path


def _processes() -> dict[int, tuple[str, float]]:
    """pid -> (name, user+system CPU seconds) of the other user-space processes."""
    me = os.getpid()
    tick = os.sysconf("SC_CLK_TCK")
    found: dict[int, tuple[str, float]] = {}
    try:
        entries = [e.name for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return found
    for name in entries:
        pid = int(name)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        ppid = int(fields[1])
        if pid in (me, 2) or ppid in (me, 2):
            continue
        found[pid] = (comm, (int(fields[11]) + int(fields[12])) / tick)
    return found


@dataclass
class Watch:
    """Started before a run; :meth:`summary` after it."""

    wall: float
    before: dict[int, tuple[str, float]] = field(default_factory=dict)

    @classmethod
    def start(cls) -> Watch:
        return cls(time.monotonic(), _processes())

    def summary(self) -> str:
        wall = time.monotonic() - self.wall
        used: dict[str, float] = {}
        for pid, (comm, cpu) in _processes().items():
            used[comm] = used.get(comm, 0.0) + cpu - self.before.get(pid, (comm, 0.0))[1]
        total = sum(used.values()) / wall * 100
        top = ", ".join(
            f"{comm} {cpu / wall * 100:.0f}%"
            for comm, cpu in sorted(used.items(), key=lambda item: -item[1])[:3]
            if cpu / wall > 0.02
        )
        return (
            f"{wall:.0f} s wall; other processes used {total:.0f}% of one core"
            f"{f' ({top})' if top else ''}; load average now {os.getloadavg()[0]:.2f}; "
            f"nproc {os.cpu_count()}"
        )
