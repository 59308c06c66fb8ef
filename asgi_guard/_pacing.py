"""Paced starts: under contention, admitted requests begin one per event-loop iteration,
every other iteration, after the requests that arrived meanwhile.

A request's first step (from the middleware's call to the handler's first real suspension)
runs inside one event-loop callback, and asyncio runs an iteration's callbacks in this
order: the callbacks scheduled during the previous iteration (tasks woken by other tasks),
then those of the I/O this iteration read (where the server reads new requests and
creates their tasks, which run in the next iteration), then the timers that are due. A
waiter handed a place by a completing request is woken by another task, so it runs ahead
of the new arrivals' first steps, and several such waiters run back to back. With
CPU-bound handlers, every request that arrived meanwhile (those to refuse included) first
waits for all of them: measured on a one-worker uvicorn app with 2 ms handlers at 4x its
capacity, a new request's first step came 2.3 ms (median) after its headers were read.

`Pacer.start` holds a start until a zero-delay timer lets it through. Timers run after the
iteration's I/O, so the new arrivals that iteration read are scheduled ahead of the start
it lets through, and each timer lets one through. After each start the pacer also leaves
one iteration without a start: a start runs before the I/O of its own iteration, so the
requests that arrived during it are read and scheduled in the next iteration, and without
the pause the next start would run ahead of them. A refusal then waits for at most one
start. Measured in the same setting: refusals answered within 3 ms at p99 instead of 7-8.
A start that runs long after it was let through (the loop paused, or a step ran long, in
between: `LATE`) gives way once more, to the requests that arrived meanwhile.

The order above is asyncio's; trio's scheduler is not paced. uvloop is paced too, but it
runs a zero-delay timer in its ready queue, in the order it was scheduled, not after the
iteration's I/O: there a held start does not wait for the requests read meanwhile. Measured
on uvloop, paced refusals were still faster than unpaced ones (p50 3.1-3.4 ms against
4.2-7.0), though slower than on asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import Callable

__all__ = ["Pacer"]

#: The most starts held at once; past it the oldest goes at once. Pacing is for a few
#: expensive starts at a time (a CPU-bound worker's limit is small); an I/O-bound app at a
#: large limit frees many places per iteration, and holding them all, one start per two
#: iterations, would cut its throughput several times over (a review measured, in process,
#: limit 64 and 30 µs handlers with 256 clients: 7.5k -> 1.5k requests/s before this cap).
MAX_HELD = 4

#: A start let through this long before it runs (seconds) gives way once more: the loop
#: ran long after letting it through (a pause, a slow step), and the requests that arrived
#: meanwhile are read only in the next iteration's I/O. (In `bench/shedding_sim.py` at 2x-8x
#: capacity with 3-8 ms pauses twice a second, those refusals waited for the pause and then
#: a whole start: refusal p99 5.4-7.4 ms, and 5.2-6.2 ms with this.) Normally a start runs
#: soon after, behind the first steps of a few new arrivals; on a real server at 8x capacity
#: those took over 2 ms for 35% of the starts (measured), over 4 ms for 9%. (Not past
#: `MAX_HELD`: a start that the cap let through never waits again, nor one that would make
#: more than `MAX_HELD` held.)
LATE = 0.004


class Pacer:
    """One per middleware and event loop: `start` holds an admitted request until an
    iteration of its own."""

    __slots__ = ("_clock", "_loop", "_rest", "_scheduled", "_waiting", "paced")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, clock: Callable[[], float] | None = None
    ) -> None:
        self._loop = loop
        self._clock = clock or loop.time  # for `LATE`
        self._scheduled = False
        self._rest = False
        #: Held starts: each future's result is when it was let through.
        self._waiting: deque[asyncio.Future[float]] = deque()
        #: How many starts were held (for metrics and tests).
        self.paced = 0

    @property
    def waiting(self) -> int:
        """Starts held now."""
        return len(self._waiting)

    async def start(self) -> None:
        """Return in a later iteration, after that iteration's new arrivals, and after the
        starts held before this one (one per iteration)."""
        waiting = self._waiting
        if len(waiting) >= MAX_HELD:
            self._release(waiting, at=math.inf)  # the oldest goes now, and never waits again
        self.paced += 1
        let_at = await self._hold(waiting.append)
        if self._clock() - let_at > LATE and len(waiting) < MAX_HELD:
            # Let through long ago: give way to what arrived meanwhile, first in line.
            await self._hold(waiting.appendleft)

    async def _hold(self, line_up: Callable[[asyncio.Future[float]], None]) -> float:
        """Wait in line until let through; when that was."""
        future: asyncio.Future[float] = self._loop.create_future()
        line_up(future)
        if not self._scheduled:
            self._schedule()
        try:
            return await future
        except BaseException:
            if future.done() and not future.cancelled():
                # Let through as it was cancelled: the next one takes its iteration.
                self._let_one_through()
            else:
                self._forget(future)
            raise

    def _forget(self, future: asyncio.Future[float]) -> None:
        with contextlib.suppress(ValueError):  # already let through
            self._waiting.remove(future)

    def _schedule(self) -> None:
        self._scheduled = True
        # A time in the past: due at once, run in the timer phase of the next iteration.
        self._loop.call_at(0.0, self._on_timer)

    def _on_timer(self) -> None:
        self._scheduled = False
        if self._rest and self._waiting:
            # An iteration without a start: the requests that arrived during the last one
            # are read and scheduled ahead of the next.
            self._rest = False
            self._schedule()
            return
        self._let_one_through()

    def _let_one_through(self) -> None:
        waiting = self._waiting
        if self._release(waiting):
            self._rest = True
        else:
            self._rest = False  # the pause has passed: the next start needs none
        if (waiting or self._rest) and not self._scheduled:
            # With nobody held, the timer still marks the end of the pause, so that a
            # start asked for later does not wait out a pause that has long passed.
            self._schedule()

    def _release(self, waiting: deque[asyncio.Future[float]], at: float | None = None) -> bool:
        """Let the oldest held start go (skipping cancelled ones), telling it when (``at``:
        now, by default); whether one went."""
        while waiting:
            future = waiting.popleft()
            if not future.done():
                future.set_result(self._clock() if at is None else at)
                return True
        return False
