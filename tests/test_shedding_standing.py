"""Load shedding: when a queue counts as standing, and what the standing state does.

Measured on a one-worker uvicorn server at 2x its capacity: a standing queue whose short
queue emptied for a moment (completions come in batches) was taken for a new burst, whose
waiters were then refused after tens of milliseconds, several times a second. These tests
pin the rules that keep the standing state through such moments and end it when the
worker really has room.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import anyio
import pytest
from starlette.responses import PlainTextResponse

from asgi_guard import LoadSheddingMiddleware
from asgi_guard._algorithms import Fixed
from asgi_guard._shedding import ConcurrencyLimiter, Permit, Refusal

pytestmark = pytest.mark.anyio


async def until(check: Callable[[], bool]) -> None:
    """Wait (at most 2 s) until ``check()`` holds."""
    with anyio.fail_after(2.0):
        while not check():  # noqa: ASYNC110 - polling state the limiter owns
            await anyio.sleep(0.001)


def limiter_at(
    now: list[float],
    limit: int,
    codel_target: float = 0.01,
    burst_share: float = 1.0,
    recent_share: float | None = None,
) -> ConcurrencyLimiter:
    """A limiter on the fake clock ``now``: a 1 s interval, and a burst's waiter may wait
    ``burst_share`` of it (``recent_share`` after a standing queue)."""
    return ConcurrencyLimiter(
        Fixed(limit),
        max_queue=8,
        codel_target=codel_target,
        codel_interval=1.0,
        burst_share=burst_share,
        recent_share=recent_share,
        clock=lambda: now[0],
    )


def hold(limiter: ConcurrencyLimiter, n: int) -> list[Permit]:
    permits = [limiter.try_acquire(1) for _ in range(n)]
    assert all(permits)
    return [p for p in permits if p is not None]


def end(limiter: ConcurrencyLimiter, permit: Permit, now: float) -> None:
    """Release ``permit`` as a request that took 10 ms (CoDel's interval scales with how
    long requests take; the fake clock's jumps must not stretch it)."""
    permit.admitted = now - 0.01
    limiter.release(permit)


class Waiters:
    """Named requests waiting in ``limiter``, their outcomes by name."""

    def __init__(self, limiter: ConcurrencyLimiter, now: list[float]) -> None:
        self.limiter = limiter
        self.now = now
        self.outcomes: dict[str, Permit | Refusal] = {}

    async def _wait(self, name: str) -> None:
        self.outcomes[name] = await self.limiter.acquire(1)

    async def queue(self, group: anyio.abc.TaskGroup, *names: str, step: float = 0.0) -> None:
        """Queue ``names`` in order, ``step`` seconds of the fake clock apart."""
        for name in names:
            group.start_soon(self._wait, name)
            await until(partial(self._queued, self.limiter.queued + 1))
            self.now[0] += step

    def _queued(self, n: int) -> bool:
        return self.limiter.queued == n

    async def stand_and_refuse(self, group: anyio.abc.TaskGroup, permits: list[Permit]) -> None:
        """A queue that stands (one waiter, "burst", for longer than the interval), refuses
        a newcomer at arrival (it keeps one waiter), then empties: the waiter takes the
        place of one of ``permits`` that ends."""
        await self.queue(group, "burst")
        self.now[0] = 2.0
        assert self.limiter.standing(self.now[0])
        assert await self.limiter.acquire(1) == "queue_full"
        end(self.limiter, permits.pop(), self.now[0])
        await until(lambda: "burst" in self.outcomes)

    async def stand_then_empty(self, group: anyio.abc.TaskGroup, permits: list[Permit]) -> None:
        """A queue that stands (one waiter, "burst", for longer than the interval), then
        empties (the waiter takes a place that ends): it still stands."""
        await self.queue(group, "burst")
        self.now[0] = 2.0
        end(self.limiter, permits.pop(), self.now[0])
        await until(lambda: "burst" in self.outcomes)
        assert self.limiter.standing(self.now[0])


async def test_a_standing_queue_that_empties_stands_until_the_worker_has_room() -> None:
    """The queue stood, then its one waiter was admitted: the queue is empty, every place
    is taken, and the next arrival must get the standing state's short wait (codel_target,
    10 ms here), not a burst's (the 1 s interval). Only once more requests than twice the
    limit have been admitted without waiting does the standing state end."""
    now = [0.0]
    limiter = limiter_at(now, 2)
    permits = hold(limiter, 2)
    waiters = Waiters(limiter, now)
    outcomes = waiters.outcomes

    async with anyio.create_task_group() as group:
        await waiters.queue(group, "first")
        now[0] = 2.0  # non-empty for longer than the interval
        assert limiter.standing(now[0])
        end(limiter, permits.pop(), now[0])  # the waiter takes the place: the queue empties
        await until(lambda: "first" in outcomes)
    first = outcomes["first"]
    assert isinstance(first, Permit)
    assert limiter.queued == 0
    assert limiter.standing(now[0]), "an empty moment ended the standing state"

    with anyio.fail_after(0.5):  # a burst's wait would be the whole 1 s interval
        refused = await limiter.acquire(1)
    assert refused == "queue_timeout"
    assert limiter.standing(now[0])

    # Requests are admitted without waiting, each into the last place (the worker keeps
    # up, no more): the standing state ends after more than twice the limit.
    end(limiter, first, now[0])
    for admitted in range(1, 2 * 2 + 2):
        permit = limiter.try_acquire(1)
        assert permit is not None
        assert limiter.inflight == limiter.limit
        end(limiter, permit, now[0])
        assert limiter.standing(now[0]) == (admitted <= 2 * 2), admitted
    assert limiter.queue_capacity(now[0]) == 8


async def test_a_standing_queue_that_empties_ends_when_a_request_leaves_a_place_free() -> None:
    """Measured at 0.8x capacity (a CPU-bound worker at limit 3-4): a moment's backlog
    made the queue stand, and with one waiter at a time refilling it, the standing state
    held for 100-400 ms, refusing newcomers all along. Requests admitted with a place to
    spare and nobody waiting show the worker has room: the standing state ends once that
    room has lasted more than half the interval (and the target) and a limit's worth of
    admissions since the queue emptied."""
    now = [0.0]
    limiter = limiter_at(now, 3)
    permits = hold(limiter, 3)
    waiters = Waiters(limiter, now)
    async with anyio.create_task_group() as group:
        await waiters.stand_then_empty(group, permits)
    first = waiters.outcomes["burst"]
    assert isinstance(first, Permit)
    assert limiter.inflight == 3

    end(limiter, first, now[0])
    permit = limiter.try_acquire(1)  # into the last place: nothing to spare
    assert permit is not None
    assert limiter.standing(now[0])
    end(limiter, permit, now[0])
    end(limiter, permits.pop(), now[0])  # two places free now
    permit = limiter.try_acquire(1)  # leaves one free: the room counts from here
    assert permit is not None
    assert limiter.standing(now[0])
    now[0] += 0.4  # well past the target (10 ms), not half the 1 s interval ...
    for _ in range(3):  # ... with a limit's worth of admissions, each with room to spare
        end(limiter, permit, now[0])
        permit = limiter.try_acquire(1)
        assert permit is not None
        assert limiter.standing(now[0]), "room for less than half an interval ended it"
    now[0] += 0.2  # more than half the interval since the room began
    end(limiter, permit, now[0])
    assert limiter.try_acquire(1) is not None
    assert not limiter.standing(now[0])
    assert limiter.queue_capacity(now[0]) == 8


async def test_a_queue_served_within_the_target_is_not_standing() -> None:
    """A queue can stay non-empty for a whole interval while each waiter is served first
    in, first out within the target: it drains as it should and is not standing (CoDel's
    rule: waits above the target for an interval). A waiter served late starts the clock
    that makes it standing."""
    now = [0.0]
    limiter = limiter_at(now, 1, codel_target=0.5)
    (permit,) = hold(limiter, 1)
    waiters = Waiters(limiter, now)
    outcomes = waiters.outcomes

    async with anyio.create_task_group() as group:
        await waiters.queue(group, "a", "b")
        now[0] = 0.2
        end(limiter, permit, now[0])  # "a" is served after 0.2 s, within the 0.5 s target
        await until(lambda: "a" in outcomes)
        served = outcomes["a"]
        assert isinstance(served, Permit)
        now[0] = 1.1  # non-empty since 0, but served within the target at 0.2
        assert limiter.queued == 1
        assert not limiter.standing(now[0])
        now[0] = 1.3  # "b" has waited above the target for a whole interval since
        assert limiter.standing(now[0])
        group.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("recent", "served_after", "standing"),
    [(False, 0.35, False), (False, 0.45, True), (True, 0.2, False), (True, 0.3, True)],
)
async def test_waits_above_the_target_within_half_a_bursts_wait_are_no_standing_queue(
    recent: bool, served_after: float, standing: bool
) -> None:
    """Near capacity, random arrivals keep a queue whose waits pass CoDel's target (10 ms
    here) for an interval by chance. Cut to one waiter then, the queue refused requests
    the worker would have served in time (at 1x capacity, on a worker slower than its
    calibration: 1.9% of them, in `bench/shedding_sim.py`). A waiter served first in,
    first out within half the wait a burst is allowed at the time shows a queue that
    drains; one served later starts the interval that makes it standing. That wait is
    0.8 s here, and 0.5 s within ten intervals of a standing queue (``recent``: an
    arrival found one standing at 0 s): half is 0.4 s, or 0.25 s."""
    now = [0.0]
    limiter = limiter_at(now, 1, burst_share=0.8, recent_share=0.5)
    if recent:
        limiter._stood_at = 0.0
    (permit,) = hold(limiter, 1)
    waiters = Waiters(limiter, now)
    outcomes = waiters.outcomes
    async with anyio.create_task_group() as group:
        await waiters.queue(group, "a", "b")
        now[0] = served_after
        end(limiter, permit, now[0])  # "a" goes, first in, first out
        await until(lambda: "a" in outcomes)
        assert isinstance(outcomes["a"], Permit)
        now[0] = 1.1  # non-empty since 0, longer than the 1 s interval
        assert limiter.queued == 1
        assert limiter.standing(now[0]) is standing
        group.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("limit", "served_after", "standing"), [(2, 0.012, False), (2, 0.018, True), (8, 0.012, True)]
)
async def test_at_a_small_limit_the_target_is_three_places_freeing(
    limit: int, served_after: float, standing: bool
) -> None:
    """With requests of 10 ms, two places free one every 5 ms: a waiter served after 12 ms
    waited for fewer than three places (15 ms), and the queue drains as it should, although
    12 ms is above codel_target (10 ms here). At 18 ms, or at a limit of 8 (three places free
    in under 4 ms), the same queue counts as standing after an interval. (Measured at 0.8x
    capacity on a CPU-bound worker at limit 3-4, where a 12 ms request frees a place every
    3-4 ms: waiting for two of them already passed the 5 ms default, and the queue stood.)"""
    now = [0.0]
    # These waiters, with no standing queue yet, may wait the whole 1 s. Then an arrival
    # finds a standing queue (the memory of it is set by hand): a burst may wait 10 ms at
    # most now, so the target, not half that wait, is what a waiter must be served within
    # for the queue to drain (see `_drained`).
    limiter = limiter_at(now, limit, burst_share=1.0, recent_share=0.01)
    permits = hold(limiter, limit)
    limiter.rtt = 0.01
    limiter.counts["sampled"] = 1
    waiters = Waiters(limiter, now)
    outcomes = waiters.outcomes

    async with anyio.create_task_group() as group:
        await waiters.queue(group, "a", "b")
        limiter._stood_at = now[0]
        now[0] = served_after
        end(limiter, permits.pop(), now[0])  # "a" is served first in, first out
        await until(lambda: "a" in outcomes)
        assert isinstance(outcomes["a"], Permit)
        now[0] = 1.005  # non-empty since 0, longer than the 1 s interval (but not since 12 ms)
        assert limiter.queued == 1
        assert limiter.standing(now[0]) is standing
        group.cancel_scope.cancel()


async def test_a_standing_queue_fills_a_free_place_before_cutting_a_stale_waiter() -> None:
    """In a standing queue, a waiter kept past the target is refused rather than served
    late, but not before the free places are filled, newest first: cutting first would
    leave a place empty while a request waits."""
    now = [0.0]
    limiter = limiter_at(now, 8, codel_target=0.5)
    permits = hold(limiter, 8)
    waiters = Waiters(limiter, now)
    async with anyio.create_task_group() as group:
        await waiters.stand_then_empty(group, permits)
        assert limiter.queue_capacity(now[0], 1) == 1
        await waiters.queue(group, "late")
        now[0] += 1.0  # past the target
        end(limiter, permits.pop(), now[0])
        await until(lambda: "late" in waiters.outcomes)
    assert isinstance(waiters.outcomes["late"], Permit)
    assert limiter.inflight == 8, "a place was left empty"
    assert limiter.queued == 0


async def test_a_spared_classs_waiters_keep_their_wait_when_the_lower_classes_stop() -> None:
    """Waiters that queued while a lower class spared theirs (the whole queue and the long
    wait) were promised that wait: when no lower class has come for an interval, they are
    not cut nor served newest first, but first in, first out, as a burst's waiters are."""
    now = [0.0]
    limiter = limiter_at(now, 8, codel_target=0.5)
    permits = hold(limiter, 8)
    waiters = Waiters(limiter, now)
    async with anyio.create_task_group() as group:
        await waiters.stand_then_empty(group, permits)
        limiter._arrivals[3] = now[0]  # a sheddable request arrives: class 1 is spared
        assert limiter.queue_capacity(now[0], 1) == 8
        await waiters.queue(group, "oldest", "middle", "newest", step=0.1)
        now[0] = 4.0  # past the target, and no sheddable request for an interval
        assert limiter.queue_capacity(now[0], 1) == 1
        end(limiter, permits.pop(), now[0])
        await until(lambda: "oldest" in waiters.outcomes)
        assert list(waiters.outcomes) == ["burst", "oldest"]
        for name in ("middle", "newest"):
            end(limiter, permits.pop(), now[0])
            await until(lambda name=name: name in waiters.outcomes)  # type: ignore[misc]
    outcomes = waiters.outcomes
    assert all(isinstance(outcomes[n], Permit) for n in ("oldest", "middle", "newest"))
    assert limiter.inflight == 8
    assert limiter.queued == 0


async def test_waiters_of_a_burst_keep_their_wait_when_the_queue_turns_standing() -> None:
    """Requests that queued while the queue absorbed a burst were allowed the long wait:
    when the queue turns standing they are served first in, first out, not cut or pushed
    out after tens of milliseconds (the slowest refusal there is); a newcomer of their
    class finds the short queue full and is refused at once."""
    now = [0.0]
    limiter = limiter_at(now, 2)  # standing: up to 2 wait
    permits = hold(limiter, 2)
    waiters = Waiters(limiter, now)
    outcomes = waiters.outcomes
    async with anyio.create_task_group() as group:
        await waiters.queue(group, "b1", "b2", step=0.1)
        now[0] = 2.0  # standing; both have waited far past the target
        assert limiter.standing(now[0])
        with anyio.fail_after(0.5):
            assert await limiter.acquire(1) == "queue_full"  # at arrival, not after waiting
        end(limiter, permits.pop(), now[0])
        await until(lambda: "b1" in outcomes)
        assert "b2" not in outcomes, "a waiter of the burst was cut"
        end(limiter, permits.pop(), now[0])
        await until(lambda: "b2" in outcomes)
    assert isinstance(outcomes["b1"], Permit)
    assert isinstance(outcomes["b2"], Permit)


async def test_in_a_standing_queue_one_waits_and_newcomers_are_refused_at_arrival() -> None:
    """Once standing, the queue keeps one waiter, ready for the next place that frees; a
    newcomer of its class is refused at once instead of pushing it out (a waiter pushed
    out is refused only when the next request comes, and a loop iteration later)."""
    now = [0.0]
    limiter = limiter_at(now, 2, codel_target=0.5)
    permits = hold(limiter, 2)
    waiters = Waiters(limiter, now)
    async with anyio.create_task_group() as group:
        await waiters.stand_then_empty(group, permits)
        assert limiter.queue_capacity(now[0], 1) == 1
        await waiters.queue(group, "x")
        with anyio.fail_after(0.5):
            assert await limiter.acquire(1) == "queue_full"  # at arrival, not after waiting
        assert limiter.queued == 1
        assert "x" not in waiters.outcomes
        end(limiter, permits.pop(), now[0])
        await until(lambda: "x" in waiters.outcomes)
    assert isinstance(waiters.outcomes["x"], Permit)
    assert limiter.counts["pushed_out"] == 0


async def test_places_to_spare_just_after_a_refusal_do_not_end_the_standing_state() -> None:
    """Under overload, completions that come in one event-loop iteration leave places to
    spare for a moment, while arrivals were being refused: that is no room. A place to
    spare ends the standing state only when nobody was refused within half the interval
    (and the target), nor within the last limit's worth of admissions (a limit that
    grows, or a lull in arrivals, frees places for a few)."""
    now = [0.0]
    limiter = limiter_at(now, 3)
    permits = hold(limiter, 3)
    waiters = Waiters(limiter, now)
    async with anyio.create_task_group() as group:
        await waiters.stand_and_refuse(group, permits)
    for held in permits:
        end(limiter, held, now[0])
    assert limiter.inflight == 1
    permit = limiter.try_acquire(1)  # a place to spare, but a refusal just now
    assert permit is not None
    assert limiter.standing(now[0])
    end(limiter, permit, now[0])
    now[0] += 0.6  # longer than half the 1 s interval without a refusal ...
    for _ in range(2):  # ... but fewer admissions than the limit since the first room
        permit = limiter.try_acquire(1)
        assert permit is not None
        assert limiter.standing(now[0])
        end(limiter, permit, now[0])
    assert limiter.try_acquire(1) is not None  # the limit's worth: the worker keeps up
    assert not limiter.standing(now[0])


async def test_a_pause_of_the_loop_after_refusals_does_not_end_the_standing_state() -> None:
    """Measured at 4x capacity: a pause of the loop longer than the target (handlers'
    steps run back to back) read no arrival, so nobody had been refused "lately", and the
    first arrival after it, finding places to spare, ended the standing state about twice
    a second; each time a burst began whose waiters were refused after tens of
    milliseconds. A place to spare ends the standing state only when the first request
    admitted since the last refusal, more than half the interval before, had one too."""
    now = [0.0]
    limiter = limiter_at(now, 4, codel_target=0.05)
    permits = hold(limiter, 4)
    waiters = Waiters(limiter, now)
    async with anyio.create_task_group() as group:
        await waiters.stand_and_refuse(group, permits)
    permits.append(waiters.outcomes["burst"])  # type: ignore[arg-type]
    for _ in range(2):
        end(limiter, permits.pop(0), now[0])
    assert limiter.inflight == 2

    now[0] += 0.1  # the loop pauses: no arrival read for longer than the target (50 ms)
    permits.append(limiter.try_acquire(1))  # type: ignore[arg-type]
    assert limiter.standing(now[0]), "the first room after a pause ended the standing state"

    # Arrivals are refused again: the calm starts over.
    permits.append(limiter.try_acquire(1))  # type: ignore[arg-type]
    assert limiter.inflight == 4
    async with anyio.create_task_group() as group:
        await waiters.queue(group, "standing")
        assert await limiter.acquire(1) == "queue_full"
        end(limiter, permits.pop(0), now[0])
        await until(lambda: "standing" in waiters.outcomes)
    permits.append(waiters.outcomes["standing"])  # type: ignore[arg-type]
    for _ in range(2):
        end(limiter, permits.pop(0), now[0])
    now[0] += 0.1
    permits.append(limiter.try_acquire(1))  # type: ignore[arg-type]
    assert limiter.standing(now[0]), "room after a refusal, once, ended the standing state"

    # Room again, more than half the interval later, with nobody refused since, and the
    # limit's worth of admissions: it is over.
    now[0] += 0.6
    end(limiter, permits.pop(0), now[0])
    for _ in range(3):
        permit = limiter.try_acquire(1)
        assert permit is not None
        assert limiter.standing(now[0])
        end(limiter, permit, now[0])
    assert limiter.try_acquire(1) is not None
    assert not limiter.standing(now[0])
    assert limiter.queue_capacity(now[0]) == 8


async def test_after_a_standing_queue_a_burst_waits_less_for_ten_intervals() -> None:
    """Under overload the standing state ends for a moment now and then (room for a while,
    by chance), and the burst that follows would let its waiters wait the long wait: for
    ten intervals after an arrival found the queue standing, a burst's waiter may wait only
    ``recent_share`` of the interval, then ``burst_share`` again."""
    now = [0.0]
    limiter = limiter_at(now, 3, burst_share=0.8, recent_share=0.5)
    permits = hold(limiter, 3)
    assert limiter._max_wait(False, now[0]) == pytest.approx(0.8)  # no standing queue yet
    waiters = Waiters(limiter, now)
    async with anyio.create_task_group() as group:
        await waiters.stand_and_refuse(group, permits)  # an arrival finds it standing at 2 s
    assert limiter._max_wait(False, now[0]) == pytest.approx(0.5)
    assert limiter._max_wait(False, now[0] + 10.0) == pytest.approx(0.5)
    assert limiter._max_wait(False, now[0] + 10.01) == pytest.approx(0.8)
    assert limiter._max_wait(True, now[0]) == pytest.approx(0.01)  # the cut: the target


async def test_after_a_standing_queue_a_queue_drains_only_faster_for_ten_intervals() -> None:
    """The drain threshold is half the wait a burst is allowed at the time: 0.4 s here
    before any standing queue, 0.25 s for ten intervals after an arrival found one
    standing, then 0.4 s again."""
    now = [0.0]
    limiter = limiter_at(now, 3, burst_share=0.8, recent_share=0.5)
    permits = hold(limiter, 3)
    assert limiter._drained(now[0]) == pytest.approx(0.4)
    waiters = Waiters(limiter, now)
    async with anyio.create_task_group() as group:
        await waiters.stand_and_refuse(group, permits)  # an arrival finds it standing
    assert limiter._drained(now[0]) == pytest.approx(0.25)
    assert limiter._drained(now[0] + 9.9) == pytest.approx(0.25)
    assert limiter._drained(now[0] + 10.1) == pytest.approx(0.4)


def test_the_drain_threshold_by_configuration() -> None:
    """Half the wait a burst is allowed at the time, or the target if longer: in the
    middleware 40 ms, and 25 ms within ten intervals (1 s) of an arrival that found the
    queue standing; in a bulkhead's limiter 50 ms (a whole interval's burst wait, at all
    times); half of ``queue_timeout`` when one is set."""
    app = PlainTextResponse("ok")
    middleware = LoadSheddingMiddleware(app).limiter
    assert middleware._drained(0.0) == pytest.approx(0.04)
    middleware._stood_at = 0.0  # an arrival found the queue standing then
    assert middleware._drained(0.9) == pytest.approx(0.025)
    assert middleware._drained(1.1) == pytest.approx(0.04)
    bulkhead = ConcurrencyLimiter(Fixed(2))
    assert bulkhead._drained(0.0) == pytest.approx(0.05)
    bulkhead._stood_at = 0.0
    assert bulkhead._drained(0.5) == pytest.approx(0.05)
    timed = ConcurrencyLimiter(Fixed(2), queue_timeout=0.4)
    assert timed._drained(0.0) == pytest.approx(0.2)
    timed._stood_at = 0.0
    assert timed._drained(0.5) == pytest.approx(0.2)
    assert ConcurrencyLimiter(Fixed(2), codel_target=0.08)._drained(0.0) == pytest.approx(0.08)
    limiter = ConcurrencyLimiter(Fixed(20))  # (at limit 2 the target would be 0.3 s)
    limiter.rtt, limiter.counts["sampled"] = 0.2, 1  # slow requests: a 0.4 s interval
    assert limiter._drained(0.0) == pytest.approx(0.2)


def test_room_must_last_half_an_interval_or_the_target() -> None:
    """How long room to spare must last to end a standing state: half the interval, or
    the target when that is longer."""
    assert ConcurrencyLimiter(Fixed(2))._calm_time() == pytest.approx(0.05)
    assert ConcurrencyLimiter(Fixed(2), codel_target=0.08)._calm_time() == pytest.approx(0.08)
