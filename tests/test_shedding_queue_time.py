"""Load shedding: the queue is as long as the worker serves within the wait it allows.

A newcomer that the places freeing within its wait (one every ``rtt / limit`` on average),
less a margin (`WAIT_MARGIN`, 80%: the time a place takes varies), cannot reach is refused
at arrival, not after waiting for nothing: on a slow worker, a
burst queue of 32 took more than its 100 ms wait (then the whole interval) to serve, and its
last waiters were refused after 100 ms (measured: rejection p99 108 ms at 2x capacity). A
burst's waiters now wait at most 80% of the interval in the middleware, and half of it
within ten intervals of a standing queue (these tests use the half).

The decisions read a manual clock, but a waiter's wait runs in real time: these tests run
at twenty times the scale they first had (requests of 200 ms instead of 10, a 2 s interval
instead of 100 ms), so that a busy machine's pause while a test sets up its queue does not
time its waiters out. Some boundaries are exact ties (8 places of 0.1 s fill 80% of the 1 s
wait; so do 4 of 0.2 s): a newcomer is refused only when its place is strictly past that,
and these products are exact in binary floating point.
"""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest
from starlette.responses import PlainTextResponse

from asgi_guard import LoadSheddingMiddleware
from asgi_guard._algorithms import Fixed
from asgi_guard._shedding import (
    BURST_WAIT,
    RECENT_BURST_WAIT,
    SPARED_WAIT,
    STANDING_MEMORY,
    WAIT_MARGIN,
    ConcurrencyLimiter,
    Permit,
    Refusal,
)

pytestmark = pytest.mark.anyio


def slow_worker(now: list[float]) -> ConcurrencyLimiter:
    """Limit 2, requests of 200 ms: a place frees every 100 ms, 8 within 80% of a burst's
    1 s wait (half the 2 s interval, as the middleware has it after a standing queue)."""
    limiter = ConcurrencyLimiter(
        Fixed(2),
        max_queue=32,
        codel_interval=2.0,
        codel_target=0.1,
        burst_share=RECENT_BURST_WAIT,
        recent_share=RECENT_BURST_WAIT,
        wait_margin=WAIT_MARGIN,  # as the middleware has it
        clock=lambda: now[0],
    )
    limiter.rtt = 0.2
    limiter.counts["sampled"] = 1
    return limiter


async def queue_up(
    limiter: ConcurrencyLimiter, n: int, priority: int = 1
) -> list[Permit | Refusal]:
    """Start ``n`` requests that queue (every place is taken) and return their outcomes
    as they come; those still waiting are cancelled at the end."""
    outcomes: list[Permit | Refusal] = []

    async def one() -> None:
        outcomes.append(await limiter.acquire(priority))

    async with anyio.create_task_group() as group:
        for _ in range(n):
            before = limiter.queued
            group.start_soon(one)
            with anyio.fail_after(2.0):
                while limiter.queued == before and len(outcomes) < n:
                    await anyio.lowlevel.checkpoint()
                    if outcomes and isinstance(outcomes[-1], str):
                        break
        group.cancel_scope.cancel()
    return outcomes


async def start_waiting(
    group: anyio.abc.TaskGroup,
    limiter: ConcurrencyLimiter,
    n: int,
    priority: int = 1,
    deadline: float | None = None,
) -> None:
    """Start ``n`` requests of ``priority`` in ``group`` and return once they all wait."""
    target = limiter.queued + n
    for _ in range(n):
        group.start_soon(limiter.acquire, priority, deadline)
    with anyio.fail_after(2.0):
        while limiter.queued < target:
            await anyio.lowlevel.checkpoint()


async def test_a_newcomer_beyond_what_a_bursts_wait_serves_is_refused_at_arrival() -> None:
    now = [0.0]
    limiter = slow_worker(now)
    assert limiter.try_acquire(1)
    assert limiter.try_acquire(1)
    assert WAIT_MARGIN == 0.8
    outcomes = await queue_up(limiter, 9)
    assert limiter.queued == 0  # cancelled at the end
    assert outcomes == ["queue_full"], "only the 9th, at once; 8 places free within 0.8 s"
    assert limiter.counts["queued"] == 8
    assert limiter.counts["queue_full"] == 1


async def test_a_class_spared_by_lower_ones_may_wait_two_intervals() -> None:
    """With a lower class arriving too, the lower class takes CoDel's cuts and the higher
    one is the one to keep: its newcomers may wait two 2 s intervals (`SPARED_WAIT`), not
    a burst's 1 s, so 32 places of 0.1 s fill 80% of it. Alone, the same class gets a
    burst's wait (8 places: the test above)."""
    now = [0.0]
    limiter = slow_worker(now)
    limiter.max_queue = 64  # the wait, not the queue's length, is what refuses here
    assert limiter.try_acquire(1)
    assert limiter.try_acquire(1)
    limiter._arrivals[3] = now[0]  # a sheddable request came: class 1 (critical) is spared
    outcomes = await queue_up(limiter, 33)
    assert outcomes == ["queue_full"], "only the 33rd, at once; 32 places free within 3.2 s"
    assert limiter.counts["queued"] == 32
    assert SPARED_WAIT == 2.0


async def test_lower_classes_in_the_queue_do_not_count_against_a_higher_one() -> None:
    """With 25 sheddable requests waiting (more than the interval serves would not queue,
    but they queued while their class was alone, with a longer allowed wait), a critical
    newcomer is served before all of them: it queues."""
    now = [0.0]
    limiter = ConcurrencyLimiter(Fixed(2), max_queue=32, queue_timeout=20.0, clock=lambda: now[0])
    limiter.rtt = 0.2
    limiter.counts["sampled"] = 1
    assert limiter.try_acquire(3)
    assert limiter.try_acquire(3)
    async with anyio.create_task_group() as group:
        await start_waiting(group, limiter, 25, priority=3)
        limiter.queue_timeout = 2.0  # now 20 places free within a newcomer's wait
        await start_waiting(group, limiter, 1)
        assert limiter.counts["queue_full"] == 0
        assert await limiter.acquire(3) == "queue_full"  # a sheddable newcomer is not
        group.cancel_scope.cancel()


async def test_a_deadline_shorter_than_the_expected_wait_is_refused_at_once() -> None:
    """With 4 ahead, the fifth place frees in about 500 ms: a request that must start
    within 400 ms (a 600 ms deadline, less the 200 ms a request takes) is refused now; one
    that may start within 700 ms queues (the place frees within 80% of that)."""
    now = [0.0]
    limiter = slow_worker(now)
    assert limiter.try_acquire(1)
    assert limiter.try_acquire(1)
    async with anyio.create_task_group() as group:
        await start_waiting(group, limiter, 4)
        with anyio.fail_after(2.0):
            assert await limiter.acquire(1, deadline=0.6) == "deadline"
        assert limiter.counts["deadline"] == 1
        await start_waiting(group, limiter, 1, deadline=0.9)
        group.cancel_scope.cancel()
    assert limiter.queued == 0


async def test_the_time_a_place_takes_to_free_is_measured_while_requests_wait() -> None:
    """rtt / limit says a place frees every 100 ms; measured while requests waited, one
    freed every 200 ms (the worker also spends time outside its requests: refusals,
    pacing): the measurement wins, and 4 waiters fill 80% of a burst's 1 s wait."""
    now = [0.0]
    limiter = slow_worker(now)
    held = [limiter.try_acquire(1), limiter.try_acquire(1)]
    async with anyio.create_task_group() as group:
        await start_waiting(group, limiter, 2)
        for permit in held:
            assert permit is not None
            now[0] += 0.2
            limiter.release(permit)
        assert limiter.queued == 0
        assert limiter.place_time == pytest.approx(0.2)
        assert limiter.rtt / limiter.limit < 0.2
        group.cancel_scope.cancel()
    assert limiter.inflight == 2  # the two waiters hold the places now
    assert await queue_up(limiter, 5) == ["queue_full"]
    assert limiter.counts["queued"] == 2 + 4


async def test_a_bursts_waiter_waits_most_of_the_interval_and_half_after_a_standing_queue() -> None:
    """CoDel's burst wait is a whole interval (the limiter's default, which the bulkhead
    keeps). The middleware's is 80% of it (at 1x capacity half of it refused requests
    that a queue of the unguarded app served in time, measured), and half of it within
    ten intervals of a standing queue (the standing state ends for a moment now and then
    under overload, and the burst after it must not keep its waiters long); scaled as the
    interval is, and ``queue_timeout`` still sets it."""
    limiter = LoadSheddingMiddleware(PlainTextResponse("ok"), limit=1, codel_interval=2.0).limiter
    assert (limiter.burst_share, limiter.recent_share) == (BURST_WAIT, RECENT_BURST_WAIT)
    assert (BURST_WAIT, RECENT_BURST_WAIT, STANDING_MEMORY) == (0.8, 0.5, 10)
    held = limiter.try_acquire(1)
    assert held is not None
    started = anyio.current_time()
    assert await limiter.acquire(1) == "queue_timeout"
    waited = anyio.current_time() - started
    # Timers never fire early: a whole interval would be 2 s or more.
    assert 1.58 <= waited < 2.0, f"waited {waited:.3f} s: 80% of the 2 s interval is 1.6 s"

    limiter._stood_at = 10.0  # an arrival found the queue standing then
    assert limiter._max_wait(False, 10.0 + 10 * 2.0) == pytest.approx(1.0)  # 10 intervals
    assert limiter._max_wait(False, 10.0 + 10 * 2.0 + 0.01) == pytest.approx(1.6)
    limiter.rtt, limiter.counts["sampled"] = 2.0, 1  # slow requests: the interval is 4 s
    assert limiter._max_wait(False, 10.0 + 10 * 4.0) == pytest.approx(2.0)  # 10 of them
    assert limiter._max_wait(False, 10.0 + 10 * 4.0 + 0.01) == pytest.approx(3.2)
    assert ConcurrencyLimiter(Fixed(1))._max_wait(False, 0.0) == pytest.approx(0.1)
    assert ConcurrencyLimiter(Fixed(1), queue_timeout=0.3)._max_wait(False, 0.0) == 0.3
