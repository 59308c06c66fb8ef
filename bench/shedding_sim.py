"""Load shedding in virtual time: the guard's policy without the machine's noise.

`bench/overload.py` measures the real thing, but on a small VM the speed of the machine
drifts by tens of percent within seconds, so two runs of the same code at 1x capacity can
refuse 1% or 25% of requests, and a change to the queue's rules cannot be told from the
drift. This script runs the real `LoadSheddingMiddleware` (its limiter, pacer, ticker and
default algorithm, unchanged) on an asyncio event loop whose clock is virtual: time moves
only when the loop would sleep, and when the simulated application "spends CPU" (the clock
is advanced by that much while the loop is held, as a CPU-bound handler holds it). The same
seed gives the same run, to the request.

The worker modelled is `overload.py`'s: each ``/work`` request costs ``--work`` ms of CPU
in one step, then awaits 1 ms, then its response costs ``--respond`` ms; every request
costs ``--arrive`` ms to read and start (the server's part), and a refusal ``--refuse`` ms
to answer. Arrivals are Poisson (seeded); each is read at the first event-loop iteration
after its time, as a server reads a socket between callbacks, and its task runs in the
iteration after that. Latency is from the arrival's time to the response's end. The
capacity C is ``--load`` (0.66 by default, as `overload.py` measured on the AMD machine)
times the most the worker serves, T = 1 / (arrive + work + respond).

The machine is modelled crudely: its speed drifts (every cost, pauses included, is scaled
by a log-normal factor drawn per 50 ms of virtual time, ``--drift``), and the loop pauses
for 3-8 ms ``--pauses`` times a second (Poisson), as a collection or a stall of the VM
would hold it; pauses count in "CPU %". What it leaves out: the network, the generator's own
delays, the interpreter's cost of the guard itself (a fixed ``--arrive`` stands for all of
it), and client timeouts (none is reached at these rates with the guard on). So its figures
are the policy's, not a server's: use it to compare rules, and `overload.py` for the targets.

    python bench/shedding_sim.py                       # 0.8x .. 8x, a step, priorities: ~15 s
    python bench/shedding_sim.py --rates 1,4 --seeds 5 # more seeds
    python bench/shedding_sim.py --load 0.85           # a worker slower than its calibration
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import random
import selectors
import statistics
import sys
import time
from collections import deque
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from loadgen import _percentile  # the generator's: the same percentiles as overload.py

from asgi_guard import LoadSheddingMiddleware

SLO = 0.100


class _VirtualSelector(selectors.BaseSelector):
    """Never waits: a `select` with a timeout moves the virtual clock past it instead, or
    to the next arrival, which it reports as the ``arrivals`` reader being readable: the
    loop then reads the arrivals in its I/O phase, before its timers, as a server reads
    requests from its sockets."""

    def __init__(self) -> None:
        self._map: dict[Any, selectors.SelectorKey] = {}
        self.now = 0.0
        #: Times of the requests not read yet, in order, and the reader that reads them.
        self.arrivals: deque[float] = deque()
        self.reader: Any = None

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._map[fileobj] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._map.pop(fileobj)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        due = self.arrivals[0] if self.arrivals else math.inf
        if timeout is None:
            timeout = math.inf
        if due <= self.now + timeout:
            self.now = max(self.now, due)
            return [(self._map[self.reader], selectors.EVENT_READ)]
        if timeout == math.inf:
            raise RuntimeError("the simulation has nothing left to wait for")
        self.now += timeout
        return []

    def close(self) -> None:
        self._map.clear()

    def get_map(self) -> Any:
        return self._map

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        self.unregister(fileobj)
        return self.register(fileobj, events, data)


class VirtualLoop(asyncio.SelectorEventLoop):
    """An asyncio loop on virtual time; `spend` holds it for some seconds of "CPU", at
    the machine's speed of the moment (``drift``: a factor per 50 ms, log-normal)."""

    def __init__(self, drift: float = 0.0, seed: int = 0) -> None:
        self._virtual = _VirtualSelector()
        super().__init__(self._virtual)
        self.busy = 0.0
        self._drift = drift
        self._rng = random.Random(seed * 7919 + 1)
        self._factors: list[float] = []

    def time(self) -> float:
        return self._virtual.now

    def _factor(self) -> float:
        if not self._drift:
            return 1.0
        slot = int(self._virtual.now / 0.05)
        while len(self._factors) <= slot:
            self._factors.append(math.exp(self._rng.gauss(0.0, self._drift)))
        return self._factors[slot]

    def spend(self, seconds: float) -> None:
        seconds *= self._factor()
        self._virtual.now += seconds
        self.busy += seconds


class VirtualClock:
    def __init__(self, loop: VirtualLoop) -> None:
        self._loop = loop

    def now(self) -> float:
        return self._loop.time()


@dataclass
class Costs:
    arrive: float
    work: float
    sleep: float
    respond: float
    refuse: float

    @property
    def most(self) -> float:
        """T: the most requests a second the worker serves."""
        return 1.0 / (self.arrive + self.work + self.respond)


@dataclass
class Outcome:
    at: float  # scheduled arrival (virtual s)
    critical: bool = False
    status: int = 0
    latency: float = math.nan
    why: str = ""


@dataclass
class Run:
    outcomes: list[Outcome] = field(default_factory=list)
    busy: float = 0.0
    horizon: float = 0.0
    limits: list[int] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


def poisson(rates: Sequence[tuple[float, float]], seed: int) -> list[float]:
    """Arrival times for phases of (seconds, requests/s)."""
    rng = random.Random(seed)
    times: list[float] = []
    start = 0.0
    for seconds, rate in rates:
        t = start
        while True:
            t += rng.expovariate(rate)
            if t >= start + seconds:
                break
            times.append(t)
        start += seconds
    return times


def simulate(
    phases: Sequence[tuple[float, float]],
    costs: Costs,
    seed: int,
    *,
    drift: float = 0.0,
    pauses: float = 0.0,
    critical: float = 0.0,
) -> Run:
    """One run: Poisson arrivals in ``phases`` of (seconds, requests/s); the machine's
    speed drifting by ``drift`` (see `VirtualLoop`), and ``pauses`` a second on average
    in which the loop is held for 3-8 ms (a collection, a stall of the machine). A share
    ``critical`` of the requests carry ``X-Priority: critical`` (trusted), the rest are
    ``sheddable``, as in `overload.py`'s priority scenario."""
    loop = VirtualLoop(drift, seed)
    run = Run()
    saved = random.getstate()
    random.seed(seed)  # Retry-After's jitter and the algorithm's probe jitter

    async def app(scope: Any, receive: Any, send: Any) -> None:
        loop.spend(costs.work)
        await asyncio.sleep(costs.sleep)
        loop.spend(costs.respond)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    options: dict[str, Any] = {}
    if critical:
        options = {
            "priority_header": "x-priority",
            "trust_priority_header": lambda scope: True,
            "default_priority": "sheddable",
        }
    guard = LoadSheddingMiddleware(app, clock=VirtualClock(loop), **options)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def serve(outcome: Outcome) -> None:
        loop.spend(costs.arrive)

        async def send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                outcome.status = message["status"]
                if outcome.status != 200:
                    loop.spend(costs.refuse)
            elif not message.get("more_body"):
                outcome.latency = loop.time() - outcome.at

        headers = [(b"x-priority", b"critical")] if outcome.critical else []
        scope = {"type": "http", "method": "GET", "path": "/work", "headers": headers}
        await guard(scope, receive, send)

    tasks: set[asyncio.Task[None]] = set()
    unread: deque[Outcome] = deque()
    selector = loop._virtual

    def read() -> None:
        # Every request that has arrived by now, read in the loop's I/O phase; each task
        # runs in the next iteration, as a server's protocol creates a request's task.
        now = loop.time()
        while selector.arrivals and selector.arrivals[0] <= now:
            selector.arrivals.popleft()
            task = loop.create_task(serve(unread.popleft()))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def main() -> None:
        pick = random.Random(seed * 31 + 7)
        for at in poisson(phases, seed):
            outcome = Outcome(at, critical=pick.random() < critical)
            run.outcomes.append(outcome)
            unread.append(outcome)
            selector.arrivals.append(at)
        end = sum(seconds for seconds, _ in phases)
        if pauses:
            rng = random.Random(seed * 104729 + 3)
            for at in poisson([(end, pauses)], seed + 1000):
                loop.call_at(at, loop.spend, rng.uniform(0.003, 0.008))
        while loop.time() < end:
            await asyncio.sleep(0.5)
            run.limits.append(guard.limiter.limit)
        if tasks:
            await asyncio.wait(set(tasks))

    reading, writing = os.pipe()  # a descriptor to stand for the server's sockets
    selector.reader = reading
    loop.add_reader(reading, read)
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(main())
        for task in asyncio.all_tasks(loop):
            task.cancel()
        loop.run_until_complete(asyncio.sleep(0))
    finally:
        random.setstate(saved)
        asyncio.set_event_loop(None)
        loop.remove_reader(reading)
        loop.close()
        os.close(reading)
        os.close(writing)
    run.busy = loop.busy
    run.horizon = sum(seconds for seconds, _ in phases)
    run.counts = dict(guard.limiter.counts)
    return run


@dataclass
class Figures:
    goodput: float  # /s
    p99: float  # admitted, s
    refused: float  # share
    rej_p99: float  # s
    rej_fast: float  # share of refusals within 5 ms
    late: int  # refusals after 5 ms


def figures(run: Run, since: float, until: float) -> Figures:
    window = [o for o in run.outcomes if since <= o.at < until]
    ok = [o.latency for o in window if o.status == 200]
    refused = [o.latency for o in window if o.status == 503]
    good = sum(1 for x in ok if x <= SLO)
    return Figures(
        goodput=good / (until - since),
        p99=_percentile(sorted(ok), 99),
        refused=len(refused) / len(window) if window else 0.0,
        rej_p99=_percentile(sorted(refused), 99),
        rej_fast=sum(1 for x in refused if x <= 0.005) / len(refused) if refused else 1.0,
        late=sum(1 for x in refused if x > 0.005),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rates", default="0.8,1,2,4,8", help="multiples of C")
    parser.add_argument("--seconds", type=float, default=8.0, help="per rate (first 1 s left out)")
    parser.add_argument("--seeds", type=int, default=3, help="runs per rate (seeds 1..N)")
    parser.add_argument("--work", type=float, default=2.0, help="ms of CPU per request")
    parser.add_argument("--arrive", type=float, default=0.07, help="ms to read and start one")
    parser.add_argument("--respond", type=float, default=0.25, help="ms to answer an admitted one")
    parser.add_argument("--refuse", type=float, default=0.04, help="ms to answer a refusal")
    parser.add_argument("--load", type=float, default=0.66, help="C as a share of T")
    parser.add_argument("--no-step", action="store_true", help="skip the 1x -> 4x -> 1x step")
    parser.add_argument(
        "--no-priority", action="store_true", help="skip 4x with 25%% critical requests"
    )
    parser.add_argument(
        "--drift", type=float, default=0.15, help="the machine's speed: sigma of log factor/50 ms"
    )
    parser.add_argument("--pauses", type=float, default=2.0, help="3-8 ms loop pauses a second")
    args = parser.parse_args(argv)
    if args.seconds < 2:
        parser.error("--seconds must be at least 2 (the first second is left out)")
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    logging.getLogger("asgi_guard").setLevel(logging.ERROR)  # "shedding started", per run
    costs = Costs(
        arrive=args.arrive / 1e3,
        work=args.work / 1e3,
        sleep=0.001,
        respond=args.respond / 1e3,
        refuse=args.refuse / 1e3,
    )
    capacity = args.load * costs.most
    rates = [float(r) for r in args.rates.split(",")]
    seeds = range(1, args.seeds + 1)
    started = time.perf_counter()
    print(
        f"virtual time; T = {costs.most:.0f}/s, C = {capacity:.0f}/s ({args.load:.2f} T); "
        f"work {args.work} ms + 1 ms await, arrive {args.arrive} ms, respond {args.respond} ms, "
        f"refuse {args.refuse} ms; drift {args.drift}, pauses {args.pauses}/s; "
        f"{args.seconds:.0f} s per run, seeds 1-{args.seeds}"
    )
    header = (
        f"{'rate':>5} {'seed':>4} {'goodput/C':>9} {'2xx p99 ms':>10} {'refused %':>9} "
        f"{'rej p99 ms':>10} {'rej<=5ms %':>10} {'late':>5} {'CPU %':>6} {'limit lo-hi':>11}"
    )
    print(header)
    print("-" * len(header))
    summary: dict[float, list[Figures]] = {}
    for multiple in rates:
        for seed in seeds:
            run = simulate(
                [(args.seconds, multiple * capacity)],
                costs,
                seed,
                drift=args.drift,
                pauses=args.pauses,
            )
            f = figures(run, 1.0, args.seconds)
            summary.setdefault(multiple, []).append(f)
            print(
                f"{multiple:>4}x {seed:>4} {f.goodput / capacity:>9.2f} {f.p99 * 1e3:>10.1f} "
                f"{f.refused * 100:>9.2f} {f.rej_p99 * 1e3:>10.1f} {f.rej_fast * 100:>10.1f} "
                f"{f.late:>5} {run.busy / run.horizon * 100:>6.0f} "
                f"{min(run.limits[2:]):>5}-{max(run.limits[2:]):<5}"
            )
    print()
    print("medians over the seeds")
    print(f"{'rate':>5} {'goodput/C':>9} {'2xx p99 ms':>10} {'refused %':>9} {'rej p99 ms':>10}")
    for multiple, runs in summary.items():
        print(
            f"{multiple:>4}x {statistics.median(f.goodput for f in runs) / capacity:>9.2f} "
            f"{statistics.median(f.p99 for f in runs) * 1e3:>10.1f} "
            f"{statistics.median(f.refused for f in runs) * 100:>9.2f} "
            f"{statistics.median(f.rej_p99 for f in runs) * 1e3:>10.1f}"
        )
    if not args.no_step:
        print()
        print("step 1x -> 4x -> 1x (5 s each): refused % per second")
        for seed in seeds:
            run = simulate(
                [(5.0, capacity), (5.0, 4 * capacity), (5.0, capacity)],
                costs,
                seed,
                drift=args.drift,
                pauses=args.pauses,
            )
            per_second = []
            for s in range(15):
                window = [o for o in run.outcomes if s <= o.at < s + 1]
                bad = sum(1 for o in window if o.status != 200)
                per_second.append(100.0 * bad / len(window) if window else 0.0)
            print(f"seed {seed}: " + " ".join(f"{x:4.1f}" for x in per_second))
    if not args.no_priority:
        print()
        print("4x, 25% 'X-Priority: critical' (the rest sheddable): answered 2xx %")
        for seed in seeds:
            run = simulate(
                [(args.seconds, 4 * capacity)],
                costs,
                seed,
                drift=args.drift,
                pauses=args.pauses,
                critical=0.25,
            )
            window = [o for o in run.outcomes if o.at >= 1.0]
            crit = [o for o in window if o.critical]
            rest = [o for o in window if not o.critical]
            ok_crit = sum(1 for o in crit if o.status == 200) / len(crit)
            ok_rest = sum(1 for o in rest if o.status == 200) / len(rest)
            print(
                f"seed {seed}: critical {ok_crit * 100:6.2f}%  sheddable {ok_rest * 100:6.2f}%  "
                f"CPU {run.busy / run.horizon * 100:.0f}%"
            )
    print(f"\n{time.perf_counter() - started:.0f} s of real time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
