"""The load-shedding engine: a concurrency limit with a bounded, managed wait queue.

`ConcurrencyLimiter` admits a request at once while fewer than ``limit`` are in flight (the
limit comes from a `LimitAlgorithm`); otherwise the request waits in a bounded queue, one
queue per priority class, the highest class served first. The queue is managed after
Facebook's CoDel variant: while it has been empty within the last ``interval``, a waiter may
wait up to ``interval`` (in the middleware 80% of it, and half of it within ten intervals of
a standing queue: a burst is absorbed) and is served first in, first out; once a standing
queue has formed (not empty for a whole interval, its first-in-first-out waits above the
target and above half the wait a burst is allowed at the time), a waiter may wait only
``target``, and the queue keeps one waiter: enough to fill the next place that frees, while
newcomers are refused at once, when a refusal is fastest. (So Facebook's adaptive LIFO,
newest first, has nothing to reorder: the one waiter is served, or refused when its wait
ends. The newest-first branch of `_admit_waiters` matters only when a cut class holds more
than one waiter of its own: newcomers that pushed out lower classes' waiters left from
before, a rare and passing case.)
(Pushing its oldest out for a newcomer refused it only when the next request arrived, and
then a loop iteration later: measured, refusals took 6-7 ms at p99 where refusing at arrival
took 4-5 ms.) Those that queued during the burst before it keep the wait they were allowed
and go first. A standing queue that empties stays standing until more than twice the limit
have been admitted without waiting (see `standing`). When lower classes arrive too (within
the last interval), a class above them is spared those cuts: it keeps the whole queue, first
in, first out, and may wait `SPARED_WAIT` intervals, and the lower classes take the cuts,
being served after it and pushed out for it.
A request whose deadline cannot be met is refused at once. Lower classes are shed first: a
full queue makes room for a higher class by pushing out the lowest class's oldest waiter. A
class may be guaranteed a share of the limit: below its share it is admitted even when the
limit is reached (others may borrow the share while the class is idle). While the algorithm
measures its no-load latency for the first time (`Adaptive` and `Vegas` run five requests
alone), its limit is held down for that, not by overload: waiters may wait `LEARNING_WAIT`
and the queue is never standing, so a fresh worker does not refuse what it can serve.

Plain async Python, no ASGI: the middleware and the bulkhead dependency drive it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Literal

import anyio

from ._adaptive import LimitAlgorithm
from ._algorithms import FIRST_PROBE_TIMEOUT
from ._deadline import _check_seconds, settle
from ._errors import ConfigurationError

__all__ = [
    "CLASSES",
    "ConcurrencyLimiter",
    "Permit",
    "Refusal",
    "Waiter",
    "check_queue_options",
    "class_index",
]

#: Criticality classes, highest first (after Google's SRE book).
CLASSES = ("critical-plus", "critical", "sheddable-plus", "sheddable")

#: The default queue is as long as the limit, and at least this long.
MIN_QUEUE = 32

#: The share of the interval a burst's waiter may wait in `LoadSheddingMiddleware` (unless
#: ``queue_timeout`` says otherwise); CoDel's own, the limiter's default, is the whole one.
#: Within `STANDING_MEMORY` intervals of a standing queue, `RECENT_BURST_WAIT` of it. (A
#: worker near its capacity queues for tens of milliseconds by chance: with half the
#: interval, 50 ms, at all times, the guard refused 0.2-4.6% of the requests at 1x capacity
#: in five runs on a real server, in the two traced mostly for a queue longer than that wait
#: serves, where the unguarded app served every one within 100 ms; with 80% the step down to
#: 1x was met in 4 of 5 alternating runs, in none of two with half. Under overload the
#: standing state ends for a moment now and then, and each burst after it would have its
#: waiters wait the long wait: the short one keeps their latency down. Measured in
#: `bench/overload.py` and `bench/shedding_sim.py`.)
BURST_WAIT = 0.8
RECENT_BURST_WAIT = 0.5

#: How long a standing queue is remembered, in intervals (see `BURST_WAIT`).
STANDING_MEMORY = 10

#: How long a waiter of a class spared CoDel's cuts (lower classes arrive too, and take
#: them) may wait without a ``queue_timeout``, in intervals: it is the traffic to keep,
#: and a late answer is better than none to it. (At 4x capacity with a quarter of the
#: requests critical and the rest sheddable, critical requests not answered in
#: `bench/shedding_sim.py`: with half an interval 1-6%, with a whole one 0-3% at loads 0.66
#: to 0.85 (their p99 latency 60-100 ms); with two, at load 0.8 the least answered of 10
#: seeds 98.44% instead of 98.20%, the median 99.9% instead of 99.4%, and at 0.66 every one
#: instead of 99.7-100%. Past about 0.85 of the worker's capacity the critical requests
#: alone fill it, and the queue's length bounds them, not the wait.)
SPARED_WAIT = 2.0

#: The share of a burst's allowed wait (not a standing queue's short one) that the places
#: freeing ahead of a newcomer may take, as measured, in `LoadSheddingMiddleware`: the time
#: a place takes varies with the machine's speed and the loop's pauses, and a waiter refused
#: at the end of its wait is the slowest refusal there is. (With all of it, at 2x capacity
#: 1-2% of refusals came after the whole burst wait, 50 ms, and refusals took 54 ms at p99
#: in `bench/shedding_sim.py`; with 80%, 7 ms, for the same goodput.)
WAIT_MARGIN = 0.8

#: How long a request may wait (without a ``queue_timeout``) while the algorithm measures
#: the no-load latency for the first time (its ``learning`` attribute, as `Adaptive` and
#: `Vegas` have): the limit is held at ``min_limit`` (1) for that, not by overload, and the
#: measurement ends within a second of the first request's end (`FIRST_PROBE_TIMEOUT`).
#: (With a burst's wait, 80 ms, a fresh worker refused 3 of 4 concurrent 100 ms requests,
#: and 9 of the first 30 of a 60 ms I/O-bound route at 6% of its capacity: the measurement
#: takes five requests' time.)
LEARNING_WAIT = FIRST_PROBE_TIMEOUT

#: How long, from the first request that queued while the algorithm learned, the queue
#: is managed as above at most: a first request that never ends (a stream, a long poll)
#: holds the measurement back for as long as it runs, and every newcomer would wait its
#: `LEARNING_WAIT` in vain. Past this the queue's usual rules apply, learning or not.
LEARNING_LIMIT = 2 * FIRST_PROBE_TIMEOUT

_NEVER = -math.inf  # a time that has not come (a constant: read on the hot path)
_UNCALM = math.inf  # no request admitted with room to spare since the last refusal

#: Why a request was refused.
Refusal = Literal["queue_full", "queue_timeout", "pushed_out", "deadline", "trigger"]


def class_index(name: object) -> int:
    """The index in `CLASSES` of a class name (``"critical_plus"`` is accepted too)."""
    if isinstance(name, str):
        try:
            return CLASSES.index(name.strip().lower().replace("_", "-"))
        except ValueError:
            pass
    raise ConfigurationError(f"unknown priority class {name!r}: use one of {', '.join(CLASSES)}")


def check_queue_options(max_queue: object, queue_timeout: object) -> None:
    """Raise `ConfigurationError` unless ``max_queue`` is ``None`` or a whole number >= 0
    and ``queue_timeout`` is ``None`` or a positive number of seconds, with a queue."""
    if max_queue is not None and (
        not isinstance(max_queue, int) or isinstance(max_queue, bool) or max_queue < 0
    ):
        raise ConfigurationError(f"max_queue must be a whole number >= 0, got {max_queue!r}")
    if queue_timeout is not None:
        _check_seconds(queue_timeout, "queue_timeout")
        if max_queue == 0:
            raise ConfigurationError(
                "queue_timeout without a queue: max_queue=0 means requests never wait"
            )


class Waiter:
    """A queued request: `wait` until `wake` (admitted, refused or abandoned) or its time
    is up. `ConcurrencyLimiter.enqueue` makes it, `ConcurrencyLimiter.turn` waits on it.

    On asyncio it waits on a future with a timer handle: anyio's event and cancel scope
    cost a queued request about 50 µs in process, most of it finding the running loop
    again and again (a ``getpid`` system call each, before Python 3.12)."""

    __slots__ = (
        "abandoned",
        "admitted",
        "burst",
        "enqueued",
        "event",
        "future",
        "gone",
        "priority",
        "refusal",
        "seconds",
    )

    def __init__(
        self, priority: int, now: float, burst: bool, loop: asyncio.AbstractEventLoop | None
    ) -> None:
        self.priority = priority
        self.enqueued = now
        #: Queued while the queue absorbed a burst: it was allowed the long wait, and a
        #: standing queue that forms behind it keeps that promise (first in, first out).
        self.burst = burst
        self.future: asyncio.Future[None] | None = None
        self.event: anyio.Event | None = None
        if loop is not None:
            self.future = loop.create_future()
        else:  # trio
            self.event = anyio.Event()
        self.admitted = False
        self.gone = False  # left the queue (admitted, refused, cancelled or abandoned)
        self.abandoned = False  # its client went away (see `ConcurrencyLimiter.abandon`)
        self.refusal: Refusal | None = None
        self.seconds = 0.0  # how long it may wait

    async def wait(self, seconds: float) -> None:
        """Until woken, or for ``seconds`` at most (no error then)."""
        future = self.future
        if future is None:
            assert self.event is not None
            with anyio.move_on_after(seconds):
                await self.event.wait()
            return
        timer = future.get_loop().call_later(seconds, settle, future)
        try:
            await future
        finally:
            timer.cancel()

    def wake(self) -> None:
        if self.future is not None:
            settle(self.future)
        elif self.event is not None:
            self.event.set()


class Permit:
    """A request's place in the application; give it back with `ConcurrencyLimiter.release`."""

    __slots__ = ("admitted", "inflight", "priority", "waited")

    def __init__(self, priority: int, admitted: float, inflight: int, waited: float) -> None:
        self.priority = priority
        self.admitted = admitted
        self.inflight = inflight
        #: Seconds it waited in the queue (0 when admitted at once).
        self.waited = waited


class ConcurrencyLimiter:
    """Admits requests up to a concurrency limit, queues a bounded number, refuses the rest.

    Args:
        algorithm: Where the limit comes from.
        max_queue: The most requests that may wait (0: no queue); ``None`` means as many
            as the current limit, and at least `MIN_QUEUE` (a small limit, as a CPU-bound
            worker has, still absorbs the bursts of random arrivals).
        queue_timeout: The longest a request waits while the queue absorbs a burst
            (default: ``burst_share`` of ``codel_interval``, as scaled, ``recent_share``
            of it within `STANDING_MEMORY` intervals of a standing queue, and
            `SPARED_WAIT` intervals for a class that lower classes spare); once a
            standing queue has formed, no more than ``codel_target`` (or this, if
            shorter). While the algorithm is ``learning`` (its first measurement of the
            no-load latency), this, or `LEARNING_WAIT` by default.
        codel_target: The wait allowed once a standing queue has formed.
        codel_interval: How long the queue must stay non-empty to count as standing; the
            wait allowed before that is a share of it (see ``queue_timeout``). Both scale up
            for slow applications: the target to a quarter, the interval to twice, the
            typical time requests take; at a small limit the target is at least the time
            three places take to free (``3 * rtt / limit``: a CPU-bound worker at limit 3
            frees a place only every few milliseconds); and the interval is never shorter
            than ``queue_timeout``.
        shares: Guaranteed shares of the limit, by class index, as fractions.
        burst_share: The share of the interval a burst's waiter may wait without a
            ``queue_timeout``: 1 (CoDel's) by default, `BURST_WAIT` in the middleware.
        recent_share: The same within `STANDING_MEMORY` intervals of a standing queue:
            ``burst_share`` by default, `RECENT_BURST_WAIT` in the middleware.
        wait_margin: The share of a burst's allowed wait that the places freeing ahead of a
            newcomer may take, or it is refused at arrival: 1 by default, `WAIT_MARGIN` in
            the middleware.
        clock: A monotonic clock (seconds).
    """

    def __init__(
        self,
        algorithm: LimitAlgorithm,
        *,
        max_queue: int | None = None,
        queue_timeout: float | None = None,
        codel_target: float = 0.005,
        codel_interval: float = 0.1,
        shares: Mapping[int, float] | None = None,
        burst_share: float = 1.0,
        recent_share: float | None = None,
        wait_margin: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.algorithm = algorithm
        #: Whether the algorithm is still measuring its no-load latency (see `_learns`).
        self._learning = getattr(algorithm, "learning", False) is True
        self._learning_since = math.nan  # when a request first queued while it learned
        self.burst_share = burst_share
        self.recent_share = burst_share if recent_share is None else recent_share
        self.wait_margin = wait_margin
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.codel_target = codel_target
        self.codel_interval = codel_interval
        self._shares = [0.0] * len(CLASSES)
        for index, share in (shares or {}).items():
            self._shares[index] = share
        self._has_shares = any(self._shares)
        self._clock = clock
        self.inflight = 0
        self.inflight_by_class = [0] * len(CLASSES)
        self._queues: list[deque[Waiter]] = [deque() for _ in CLASSES]
        #: When each class last had to queue (or be refused), for `_spared`.
        self._arrivals = [-math.inf] * len(CLASSES)
        self.queued = 0
        #: When the queue's current busy period began (see `standing`).
        self._empty_since_or_at = clock()
        #: When the queue last became empty, and how many had been admitted then.
        self._emptied_at = -math.inf
        self._admitted_at_empty = -1
        #: When the first request admitted with a place to spare since the last refusal at
        #: arrival (or since a standing queue emptied) was admitted (see `try_acquire`):
        #: `_UNCALM` until then, `_NEVER` before any refusal; and how many had been
        #: admitted then.
        self._calm_since = _NEVER
        self._calm_admitted = 0
        #: When an arrival last found a standing queue (see `_recent`). Set in `wait`
        #: only: a refusal by a trigger (loop lag, memory) never gets there. For
        #: `STANDING_MEMORY` intervals after, a burst's waiters get the shorter wait and
        #: the drain threshold is the lower one (`_drained`): one standing moment near
        #: capacity makes the next likelier for a while.
        self._stood_at = _NEVER
        #: Seconds between two places freeing while requests wait (smoothed), when the
        #: last request ended, and when the queue last began to fill.
        self.place_time = 0.0
        self._done_at = -math.inf
        self._queued_at = -math.inf
        #: Smoothed time requests spend in the application (seconds), for scaling CoDel.
        self.rtt = 0.0
        #: Smoothed wait of admitted requests that queued (seconds).
        self.queue_delay = 0.0
        #: Refusals by reason, and admissions.
        self.counts: dict[str, int] = {
            "admitted": 0,
            "queued": 0,
            "queue_full": 0,
            "queue_timeout": 0,
            "pushed_out": 0,
            "deadline": 0,
            "trigger": 0,
            "cancelled": 0,
            "disconnected": 0,
            "sampled": 0,
        }

    # -- state --------------------------------------------------------------------------------

    @property
    def limit(self) -> int:
        """The algorithm's limit, read as 1 when it is below: a custom algorithm that
        breaks the protocol's "at least 1" must not divide by zero nor refuse everything."""
        limit = self.algorithm.limit
        return limit if limit >= 1 else 1

    def standing(self, now: float) -> bool:
        """Whether a standing queue has formed: not empty for a whole interval. A standing
        queue that empties still stands until more requests than twice the limit have been
        admitted without waiting: under overload, completions come in batches and leave
        the short queue of a standing state empty with places free, which the next
        arrivals fill; only a worker with room to spare admits more than that. (Ending it
        at the first such admission began a new burst period, whose waiters were refused
        after tens of milliseconds, several times a second at 2x capacity: measured.) A
        request admitted at once with a place still free after it ends it too, when a
        request admitted with a place to spare since the last refusal at arrival (and
        since the queue emptied) was admitted more than half the interval (`_calm_time`)
        and at least a limit's worth of admissions before: the worker has room. (Without
        that, at 0.8x capacity and a limit of 3, one waiter at a time kept refilling the
        queue and the standing state held for up to 400 ms, refusing newcomers all along:
        measured.)"""
        if self._learning and self._learns():
            return False  # the algorithm holds the limit down to measure, not overload
        if self.queued > 0:
            return now - self._empty_since_or_at > self._interval()
        return self._still_standing()

    def _still_standing(self) -> bool:
        """The queue is empty, stood when it emptied, and no more than twice the limit were
        admitted since."""
        return (
            self._emptied_at - self._empty_since_or_at > self._interval()
            and self.counts["admitted"] - self._admitted_at_empty <= 2 * self.limit
        )

    def _emptied(self, now: float) -> None:
        if now - self._empty_since_or_at > self._interval():
            # A standing queue emptied: room counts only from now (see `try_acquire`).
            self._calm_since = _UNCALM
        self._emptied_at = now
        self._admitted_at_empty = self.counts["admitted"]

    def _calm_time(self) -> float:
        """How long room to spare must last to end a standing state: the target, and at
        least half the interval. (Random arrivals leave gaps: at 4x capacity, 4-5 arrivals
        in 8-10 ms, with room all along, ended it twice in 7 s, and each end began a
        burst period whose waiters waited up to the whole burst wait: the admitted p99 was
        52 ms, and 27 ms with half the interval (and `_drained`), medians of 10 seeds in
        `bench/shedding_sim.py`.)"""
        return max(self._target(), 0.5 * self._interval())

    def _spared(self, priority: int, now: float) -> bool:
        """Whether a lower class than ``priority`` arrived within the last interval: the
        lower classes then take CoDel's cuts, and this one keeps the ordinary queue."""
        if priority == len(CLASSES) - 1:
            return False  # nothing below the lowest class
        since = now - self._interval()
        return any(arrived > since for arrived in self._arrivals[priority + 1 :])

    def _learns(self) -> bool:
        """Whether the algorithm is still measuring its no-load latency for the first time
        (its ``learning``): its limit is held down for that, not by overload, so a waiter
        may wait `LEARNING_WAIT` (or ``queue_timeout``) and the queue is never standing.
        For `LEARNING_LIMIT` at most, from the first time it is asked (a request queued).
        Once it is over, it stays over (the flag is read no more)."""
        if getattr(self.algorithm, "learning", False) is True:
            now = self._clock()
            if self._learning_since != self._learning_since:  # NaN: first asked
                self._learning_since = now
                return True
            if now - self._learning_since <= LEARNING_LIMIT:
                return True
        self._learning = False
        return False

    def _interval(self) -> float:
        # A queue is not standing before the wait it was allowed is over.
        allowed = self.queue_timeout or 0.0
        return max(self.codel_interval, 2.0 * self.rtt, allowed)

    def _drained(self, now: float) -> float:
        """A waiter served first in, first out within this wait shows a queue that drains: the
        target, and at least half the wait a burst is allowed now (`_burst_wait`: in the
        middleware 40 ms, and 25 ms within `STANDING_MEMORY` intervals of a standing queue;
        in a bulkhead 50 ms; half the ``queue_timeout`` when one is set). (CoDel's standing
        queue is one whose waits stay above the target for an interval. A worker near its
        capacity has such queues by chance: at 1x capacity, on a worker slower than its
        calibration, an interval of waits above the target came several times a second, the
        queue was cut to one waiter, and 1.9% of requests were refused where the unguarded
        app served every one within 100 ms. With 25 ms at all times (and `_calm_time`),
        0.5%; with 40 ms away from standing queues, none, and the step down from 4x to 1x
        met in 9 of 10 seeds instead of 7, at 0.9 of the worker's capacity in 5 instead of
        2, medians of 10 seeds in `bench/shedding_sim.py`. Under overload, standing queues
        come often, the threshold stays at 25 ms and the queue still counts as standing:
        with 40 ms at all times, admitted requests at 2x capacity waited longer, 82-86 ms
        at p99 instead of 58-62.)"""
        return max(self._target(), 0.5 * self._burst_wait(self._recent(now)))

    def _recent(self, now: float) -> bool:
        """Whether an arrival found the queue standing within `STANDING_MEMORY` intervals."""
        return now - self._stood_at <= STANDING_MEMORY * self._interval()

    def _target(self) -> float:
        # A quarter of the time requests take, and at a small limit the time three places
        # take to free (with 3 places, a 12 ms request frees one every 4 ms).
        rtt = self.rtt
        return max(self.codel_target, 0.25 * rtt, 3.0 * rtt / self.limit)

    def queue_capacity(self, now: float, priority: int = len(CLASSES) - 1) -> int:
        """How many may wait now: ``max_queue`` (default: the limit, at least `MIN_QUEUE`);
        once a standing queue has formed, one: a waiter ready for the next place that
        frees keeps the application busy, and the others are better refused at arrival
        than after a wait; a class that is spared (see `_spared`) keeps the whole queue."""
        return self._capacity(self.standing(now) and not self._spared(priority, now))

    def _capacity(self, cut: bool) -> int:
        """`queue_capacity`, given whether CoDel's cuts apply (``cut``)."""
        capacity = max(MIN_QUEUE, self.limit) if self.max_queue is None else self.max_queue
        return 1 if cut and capacity else capacity

    # -- admission ----------------------------------------------------------------------------

    def try_acquire(self, priority: int) -> Permit | None:
        """Admit at once if there is room (nobody of this class or higher waits), or None."""
        inflight = self.inflight
        limit = self.algorithm.limit
        if limit < 1:
            limit = 1  # a custom algorithm's broken limit (see `limit`)
        if inflight < limit:
            if self.queued:
                if any(self._queues[i] for i in range(priority + 1)):
                    return None  # an equal or higher class waits: it goes first
            elif self._emptied_at != _NEVER and inflight + 2 <= limit:
                # Admitted with a place to spare and nobody waiting, as was the first
                # request so admitted since the last refusal at arrival (or since a standing
                # queue emptied), more than half the interval (`_calm_time`) and at least a
                # limit's worth of admissions ago: the worker keeps up, and a standing queue
                # that emptied is over (see `_still_standing`). Under overload places come
                # free for a moment too (completions in one loop iteration, a lull in
                # arrivals, a limit that grows), and arrivals are refused again a few
                # admissions later. Ending it on one such admission while nobody had been
                # refused within the target (after a pause of the loop no arrival had been
                # read) did so twice a second at 4x capacity (measured), each time starting
                # a burst whose waiters were refused after tens of milliseconds.
                now = self._clock()
                if self._calm_since == _UNCALM:
                    self._calm_since = now
                    self._calm_admitted = self.counts["admitted"]
                elif (
                    now - self._calm_since > self._calm_time()
                    and self.counts["admitted"] - self._calm_admitted >= limit
                ):
                    self._emptied_at = _NEVER
        elif not (
            self._has_shares and self.inflight_by_class[priority] < self._shares[priority] * limit
        ):
            return None
        self.inflight = inflight + 1
        self.inflight_by_class[priority] += 1
        self.counts["admitted"] += 1
        return Permit(priority, self._clock(), inflight + 1, 0.0)

    async def acquire(self, priority: int, deadline: float | None = None) -> Permit | Refusal:
        """Admit, or queue and wait, or refuse (with why). ``deadline`` is the request's
        own (monotonic seconds): a request that cannot start in time is refused at once."""
        permit = self.try_acquire(priority)
        if permit is not None:
            return permit
        return await self.wait(priority, deadline)

    async def wait(self, priority: int, deadline: float | None = None) -> Permit | Refusal:
        """`acquire` once `try_acquire` has found no room: queue and wait, or refuse."""
        outcome = self.enqueue(priority, deadline)
        if isinstance(outcome, Waiter):
            return await self.turn(outcome) or "queue_timeout"  # never abandoned here
        return outcome

    def enqueue(self, priority: int, deadline: float | None = None) -> Permit | Refusal | Waiter:
        """`wait`'s decision, without the wait: admit (the limit has grown), refuse, or
        queue (a waiter to pass to `turn`). A refusal is decided with as little work as it
        takes (an overloaded worker refuses most requests, and every refusal spends CPU
        the admitted need)."""
        limit = self.algorithm.limit
        if limit < 1:
            limit = 1  # a custom algorithm's broken limit (see `limit`)
        if self.queued and self.inflight < limit:
            self._admit_waiters()  # the limit has grown since they queued
            permit = self.try_acquire(priority)
            if permit is not None:
                return permit
        now = self._clock()
        self._arrivals[priority] = now
        if self.max_queue == 0:  # no queue
            self.counts["queue_full"] += 1
            self._calm_since = _UNCALM
            return "queue_full"
        learning = self._learning and self._learns()
        standing = self.standing(now)  # never while learning
        if standing:
            self._stood_at = now
        # CoDel's cuts (one waiter, the short wait), unless a lower class takes them.
        cut = standing and not self._spared(priority, now)
        full = self.queued >= self._capacity(cut)
        if full and not any(self._queues[priority + 1 :]):
            self.counts["queue_full"] += 1
            self._calm_since = _UNCALM
            return "queue_full"  # nobody of a lower class to push out
        if learning:
            wait = LEARNING_WAIT if self.queue_timeout is None else self.queue_timeout
        elif not cut and self.queue_timeout is None and (standing or self._spared(priority, now)):
            # Lower classes take the cuts, and this class is the one to keep: it may wait
            # `SPARED_WAIT` intervals, not a burst's wait.
            wait = SPARED_WAIT * self._interval()
        else:
            wait = self._max_wait(cut, now)
        why: Refusal = "queue_full"
        if deadline is not None:
            # It must start early enough to finish: leave it the typical time requests take.
            left = deadline - now - self.rtt
            if left < wait:
                wait = left
                why = "deadline"
        # The places that free within its wait (a burst's: with a margin, `wait_margin`)
        # must reach it: else it would wait, and be refused late. (Refused now, it is
        # refused at once: a queue as long as the worker serves in an interval, not
        # longer.) A place frees every `place_time` as measured while requests waited, and
        # every rtt / limit at least.
        ahead = sum(map(len, self._queues[: priority + 1]))  # those served before it
        per_place = self.rtt / limit
        if self.place_time > per_place:
            per_place = self.place_time
        if wait <= 0.0 or (ahead + 1) * per_place > (wait if cut else wait * self.wait_margin):
            self.counts[why] += 1
            self._calm_since = _UNCALM
            return why
        # A push-out below swaps waiters: the queue stays non-empty. An empty queue that
        # still stands goes on with its busy period.
        empty = self.queued == 0 and not self._still_standing()
        if full:
            self._make_room(priority)
        # Promised the long wait (a burst's, or a spared class's): kept if the queue turns
        # standing, or the class stops being spared, while it waits.
        waiter = Waiter(priority, now, not cut, asyncio._get_running_loop())
        if empty:
            self._empty_since_or_at = now
        if not self.queued:
            self._queued_at = now
        self._queues[priority].append(waiter)
        self.queued += 1
        self.counts["queued"] += 1
        waiter.seconds = wait
        return waiter

    async def turn(self, waiter: Waiter) -> Permit | Refusal | None:
        """Wait in the queue (after `enqueue`) until admitted or refused; None when its
        client went away meanwhile (see `abandon`)."""
        priority = waiter.priority
        try:
            await waiter.wait(waiter.seconds)
        except BaseException:
            if waiter.admitted:  # handed a place just as it was cancelled: give it back
                self._free(priority)
            elif not waiter.gone:
                self._leave(waiter)
                self.counts["cancelled"] += 1
            raise
        if not waiter.gone:  # waited as long as it may
            self._leave(waiter)
            waiter.refusal = "queue_timeout"
            self.counts["queue_timeout"] += 1
        elif waiter.abandoned:
            return None
        if waiter.admitted:
            now = self._clock()
            waited = now - waiter.enqueued
            self.queue_delay += (waited - self.queue_delay) * 0.1
            return Permit(priority, now, self.inflight, waited)
        return waiter.refusal or "queue_timeout"

    def abandon(self, waiter: Waiter) -> None:
        """Its client went away: it leaves the queue now (unless it has left already) and
        its `turn` ends, with None."""
        if waiter.gone:
            return
        waiter.abandoned = True
        self._leave(waiter)
        self.counts["disconnected"] += 1
        waiter.wake()

    def started(self, permit: Permit) -> None:
        """The request reaches the application now (after a wait of its own since it was
        admitted): its time in the application counts from here."""
        permit.admitted = self._clock()

    def release(self, permit: Permit, *, dropped: bool = False, learn: bool = True) -> None:
        """The request has left the application: learn from it (unless ``learn`` is false:
        it never reached the application) and admit the next."""
        if not learn:
            self._free(permit.priority)
            return
        now = self._clock()
        rtt = now - permit.admitted
        # Quick to follow slower requests (CoDel's waits scale with them), slow to forget.
        smoothed = self.rtt
        if not self.counts["sampled"]:
            self.rtt = rtt
        else:
            self.rtt = smoothed + (rtt - smoothed) * (0.25 if rtt > smoothed else 0.05)
        self.counts["sampled"] += 1
        try:
            self.algorithm.on_sample(now, rtt, permit.inflight, dropped)
        finally:  # a custom algorithm that raises must not keep the place
            # `_free`, inlined: this runs once a request.
            self.inflight -= 1
            self.inflight_by_class[permit.priority] -= 1
            if self.queued:
                # Requests wait: places free as fast as the worker serves. The time between
                # two such frees, smoothed, is what a place in the queue costs a newcomer
                # (at most the time a request takes: a longer gap is a stall of the loop).
                # Not while the algorithm learns: the places of its first measurement free
                # one at a time, at the pace of its limit, not the worker's.
                if not self._learning:
                    since = self._done_at if self._done_at > self._queued_at else self._queued_at
                    gap = now - since
                    if gap > self.rtt:
                        gap = self.rtt
                    if self.place_time:
                        self.place_time += (gap - self.place_time) * 0.1
                    else:
                        self.place_time = gap
                self._admit_waiters()
            self._done_at = now

    def _free(self, priority: int) -> None:
        self.inflight -= 1
        self.inflight_by_class[priority] -= 1
        if self.queued:
            self._admit_waiters()

    def _admit_waiters(self) -> None:
        limit = self.algorithm.limit
        if limit < 1:
            limit = 1  # a custom algorithm's broken limit (see `limit`)
        now = self._clock()
        lifo = self.standing(now)
        # While the algorithm learns, the queue drains as fast as its measurement lets it,
        # first in, first out: its busy period starts again with each waiter served.
        drained = math.inf if self._learning else 0.0 if lifo else self._drained(now)
        for index, queue in enumerate(self._queues):
            share = self._shares[index] * limit  # below it, a class is admitted at the limit
            newest_first = lifo and not self._spared(index, now)
            while queue and (self.inflight < limit or self.inflight_by_class[index] < share):
                if newest_first and not queue[0].burst:
                    self._hand_over(queue.pop())
                    continue
                waiter = queue.popleft()
                self._hand_over(waiter)
                if not lifo and now - waiter.enqueued < drained:
                    # Served first in, first out soon enough: the queue drains as it
                    # should, it is not standing (see `_drained`).
                    self._empty_since_or_at = now
            if self.inflight >= limit and not self._has_shares:
                break
        if lifo:
            # A standing queue: the newest went first; those left that were kept past the
            # target are refused now rather than served late. (Cut after the places are
            # filled: cutting first could leave a place empty, and the next arrival,
            # admitted at once, would end the standing state.)
            # Those queued during the burst that preceded it keep the wait they were
            # allowed, and go first (refusing them now, after tens of milliseconds, is the
            # slowest refusal there is; newcomers are refused at arrival meanwhile).
            oldest = now - self._target()
            for index, queue in enumerate(self._queues):
                if self._spared(index, now) or not queue:
                    continue
                for waiter in [w for w in queue if not w.burst and w.enqueued < oldest]:
                    queue.remove(waiter)
                    self._refuse(waiter, "queue_timeout")
        if self.queued == 0:
            self._emptied(now)

    def _hand_over(self, waiter: Waiter) -> None:
        self.queued -= 1
        waiter.gone = True
        waiter.admitted = True
        self.inflight += 1
        self.inflight_by_class[waiter.priority] += 1
        self.counts["admitted"] += 1
        waiter.wake()

    def _refuse(self, waiter: Waiter, why: Refusal) -> None:
        self.queued -= 1
        waiter.gone = True
        waiter.refusal = why
        self.counts[why] += 1
        waiter.wake()

    def _leave(self, waiter: Waiter) -> None:
        waiter.gone = True
        try:
            self._queues[waiter.priority].remove(waiter)
        except ValueError:  # pragma: no cover - already taken out
            return
        self.queued -= 1
        if self.queued == 0:
            self._emptied(self._clock())

    def _make_room(self, priority: int) -> bool:
        """Push out a waiter for a newcomer of ``priority``: the oldest of the lowest class
        below it. (Never one of its own class: the newcomer is refused instead, at once.)"""
        for index in range(len(CLASSES) - 1, priority, -1):
            if self._queues[index]:
                self._refuse(self._queues[index].popleft(), "pushed_out")
                return True
        return False

    def _max_wait(self, cut: bool, now: float) -> float:
        """How long a newcomer may wait now: the target when CoDel's cuts apply to it
        (``cut``), else a burst's wait (`_burst_wait`), the shorter one within
        `STANDING_MEMORY` intervals of a standing queue."""
        if cut:
            wait = self._target()
            timeout = self.queue_timeout
            if timeout is not None and timeout < wait:
                wait = timeout
            return wait
        return self._burst_wait(self._recent(now))

    def _burst_wait(self, recent: bool) -> float:
        """A burst's waiter's wait: ``queue_timeout``, else ``burst_share`` of the interval,
        or ``recent_share`` of it (``recent``: a standing queue was seen lately). (In the
        middleware, a whole interval at all times, CoDel's own burst wait, put admitted
        requests at 4x capacity at 123-135 ms p99 in our benchmark, past a 100 ms
        objective, when the standing state still ended several times a second; half gave
        72-87 ms.)"""
        timeout = self.queue_timeout
        if timeout is not None:
            return timeout
        return (self.recent_share if recent else self.burst_share) * self._interval()

    def refuse_trigger(self) -> Refusal:
        """Count a refusal made by a trigger (loop lag, memory)."""
        self.counts["trigger"] += 1
        return "trigger"
