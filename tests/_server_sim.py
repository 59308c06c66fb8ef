"""A discrete-event simulation of one overloaded worker, to test limit algorithms fast.

The worker has ``cores`` (its true concurrency); each request needs ``service`` seconds of CPU,
shared among the requests in their CPU phase (processor sharing: with more of them than
cores, each progresses at ``cores / n``), then waits ``wait`` seconds off the CPU (a database
call). Arrivals are Poisson at a multiple of the worker's capacity (``cores / service`` per
second), phase by phase. The limiter in front admits while in-flight requests are fewer than
``algorithm.limit`` and rejects otherwise (no queue). Each completion feeds ``on_sample``; a
ticker feeds ``on_lag`` every 20 ms with a synthetic loop lag: 0 while the CPU has a free core,
else half a service time plus a service time per core's worth of runnable requests waiting.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass, field

from asgi_guard._adaptive import LimitAlgorithm

__all__ = ["Phase", "PhaseStats", "simulate"]


@dataclass(frozen=True)
class Phase:
    """``duration`` seconds of arrivals at ``load`` times the worker's capacity."""

    duration: float
    load: float


@dataclass
class PhaseStats:
    """What happened during one phase (requests counted at arrival, completions at the end)."""

    start: float
    end: float
    arrivals: int = 0
    rejected: int = 0
    completed: int = 0
    #: (completion time, rtt) of every request that ended in this phase.
    rtts: list[tuple[float, float]] = field(default_factory=list)
    #: (time, limit) at every tick.
    limits: list[tuple[float, int]] = field(default_factory=list)

    def limits_between(self, start: float, end: float) -> list[int]:
        """The limits seen at the ticks in [start, end) seconds into the phase."""
        return [v for t, v in self.limits if self.start + start <= t < self.start + end]

    def throughput(self, start: float = 0.0, end: float | None = None) -> float:
        """Completions per second in [start, end) seconds into the phase."""
        stop = self.end - self.start if end is None else end
        done = sum(1 for t, _ in self.rtts if self.start + start <= t < self.start + stop)
        return done / (stop - start)

    def rtt_quantile(self, q: float, start: float = 0.0) -> float:
        """The ``q`` quantile of the rtts of requests ending ``start`` seconds into the phase."""
        values = sorted(r for t, r in self.rtts if t >= self.start + start)
        return values[min(len(values) - 1, int(q * len(values)))]


def simulate(
    algorithm: LimitAlgorithm,
    phases: list[Phase],
    *,
    cores: int,
    service: float,
    wait: float,
    seed: int = 1,
    tick: float = 0.02,
) -> list[PhaseStats]:
    """Run ``phases`` back to back against one worker guarded by ``algorithm``."""
    rng = random.Random(seed)
    capacity = cores / service
    stats: list[PhaseStats] = []
    t0 = 0.0
    for phase in phases:
        stats.append(PhaseStats(start=t0, end=t0 + phase.duration))
        t0 += phase.duration
    end = t0

    now = 0.0
    virtual = 0.0  # CPU seconds each request in its CPU phase has received so far, summed
    cpu: list[tuple[float, int]] = []  # (virtual time its CPU work is done, request id)
    waiting: list[tuple[float, int]] = []  # (time its wait ends, request id)
    admitted_at: dict[int, float] = {}
    inflight_at: dict[int, int] = {}
    inflight = 0
    next_id = 0
    index = 0
    current = stats[0]

    def next_arrival(after: float) -> float:
        load = phases[index].load
        return after + rng.expovariate(load * capacity) if load > 0 else current.end

    arrival = next_arrival(0.0)
    next_tick = tick

    while True:
        rate = min(1.0, cores / len(cpu)) if cpu else 0.0
        cpu_done = now + (cpu[0][0] - virtual) / rate if cpu else math.inf
        wait_done = waiting[0][0] if waiting else math.inf
        t = min(arrival, cpu_done, wait_done, next_tick, current.end)
        if t >= end:
            break
        virtual += rate * (t - now)
        now = t
        if t == current.end:
            # Poisson arrivals are memoryless: draw the next one at the new phase's rate.
            index += 1
            current = stats[index]
            arrival = next_arrival(now)
            continue
        if t == cpu_done:
            _, rid = heapq.heappop(cpu)
            if wait > 0:
                heapq.heappush(waiting, (now + wait, rid))
                continue
        elif t == wait_done:
            _, rid = heapq.heappop(waiting)
        elif t == arrival:
            current.arrivals += 1
            if inflight < algorithm.limit:
                inflight += 1
                admitted_at[next_id] = now
                inflight_at[next_id] = inflight
                heapq.heappush(cpu, (virtual + service, next_id))
                next_id += 1
            else:
                current.rejected += 1
            arrival = next_arrival(now)
            continue
        else:
            runnable = len(cpu)
            lag = 0.0 if runnable < cores else (0.5 + (runnable - cores) / cores) * service
            algorithm.on_lag(now, lag)
            current.limits.append((now, algorithm.limit))
            next_tick += tick
            continue
        # A request ended.
        inflight -= 1
        rtt = now - admitted_at.pop(rid)
        current.completed += 1
        current.rtts.append((now, rtt))
        algorithm.on_sample(now, rtt, inflight_at.pop(rid), False)
    return stats
