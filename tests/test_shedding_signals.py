"""Load shedding: options and signals that must reach the decisions.

Each test here pins one thing that could be lost without any other test noticing (the
audit of issue 5 mutated each away and the rest of the shedding tests still passed): the
middleware's ``codel_target``, the quarter-of-a-request term of the CoDel target for slow
routes, ``limit_changed`` events, the loop lag in ``state()``, the class a priority
function returns, and the bulkhead's refusal of a request whose deadline cannot be met.
"""

from __future__ import annotations

import time
from functools import partial

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import Depends, FastAPI
from starlette.responses import PlainTextResponse
from starlette.types import Scope

from asgi_guard import (
    LoadSheddingEvent,
    LoadSheddingMiddleware,
    ManualClock,
    RequestRejected,
    TimeoutMiddleware,
)
from asgi_guard._shedding import ConcurrencyLimiter, Permit
from asgi_guard.fastapi import bulkhead, rejection_handler, timeout
from asgi_guard.shedding import IDLE_TICK

from .asgi_driver import Driven, drive, http_scope, until
from .test_shedding import SETUP, Gate, start
from .test_shedding_standing import Waiters, hold, limiter_at
from .test_shedding_ticker import Counting, Holding

pytestmark = pytest.mark.anyio


def end_after(limiter: ConcurrencyLimiter, permit: Permit, now: float, took: float) -> None:
    """Release ``permit`` as a request that took ``took`` seconds, ending at ``now``."""
    permit.admitted = now - took
    limiter.release(permit)


async def test_the_middlewares_codel_target_is_the_wait_once_a_queue_stands() -> None:
    """LoadSheddingMiddleware(codel_target=0.3): once a standing queue has formed, a
    newcomer waits 0.3 s (not the 5 ms default, nor a burst's 2 s) and is refused
    queue_timeout."""
    clock = ManualClock()
    shedder = LoadSheddingMiddleware(
        PlainTextResponse("ok"), limit=2, codel_target=0.3, codel_interval=4.0, clock=clock
    )
    limiter = shedder.limiter
    permits = hold(limiter, 2)
    waiters = Waiters(limiter, [0.0])  # its fake time is unused: the limiter reads ``clock``
    async with anyio.create_task_group() as group:
        await waiters.queue(group, "burst")
        clock.advance(5.0)  # non-empty longer than the interval: standing
        end_after(limiter, permits.pop(), clock.now(), 0.01)
        await until(lambda: "burst" in waiters.outcomes)
        assert limiter.standing(clock.now())
        started = anyio.current_time()
        refused = await drive(shedder, http_scope("/late"), then="wait")
        waited = anyio.current_time() - started
    assert refused.status == 503, refused.sent
    assert b'"queue_timeout"' in refused.body, refused.body
    assert 0.28 <= waited < 1.5, waited  # the target; a burst may wait 2 s here


@pytest.mark.parametrize(("served_after", "standing"), [(0.09, False), (0.11, True)])
async def test_for_slow_routes_the_target_is_a_quarter_of_a_request(
    served_after: float, standing: bool
) -> None:
    """At limit 16 with requests of 0.4 s the target is a quarter of a request, 0.1 s,
    above codel_target (10 ms) and above the time three places take to free (75 ms): a
    waiter served first in, first out after 90 ms shows a queue that drains; after
    110 ms, the queue counts as standing after an interval."""
    now = [0.0]
    limiter = limiter_at(now, 16, burst_share=1.0, recent_share=0.01)
    permits = hold(limiter, 16)
    limiter.rtt = 0.4
    limiter.counts["sampled"] = 1
    waiters = Waiters(limiter, now)
    async with anyio.create_task_group() as group:
        await waiters.queue(group, "a", "b")
        limiter._stood_at = now[0]  # a standing queue lately: the target decides (`_drained`)
        now[0] = served_after
        end_after(limiter, permits.pop(), now[0], 0.4)  # "a" goes, first in, first out
        await until(lambda: "a" in waiters.outcomes)
        assert isinstance(waiters.outcomes["a"], Permit)
        now[0] = 1.005  # non-empty since 0, longer than the 1 s interval (not since 0.09)
        assert limiter.queued == 1
        assert limiter.standing(now[0]) is standing
        group.cancel_scope.cancel()


async def test_a_change_of_the_adaptive_limit_is_one_limit_changed_event() -> None:
    """When the algorithm's limit changes, the ticker reports it once, as a
    limit_changed event carrying the new limit."""
    algorithm = Counting(limit=4)  # a limit the test sets
    events: list[LoadSheddingEvent] = []
    shedder = LoadSheddingMiddleware(Holding(), limit=algorithm, on_event=events.append)
    async with LifespanManager(shedder):
        await anyio.sleep(0.05)
        algorithm.limit = 7
        with anyio.fail_after(5 * IDLE_TICK + 5):  # reported within a few idle ticks
            while not any(e.kind == "limit_changed" for e in events):  # noqa: ASYNC110
                await anyio.sleep(0.01)
        await anyio.sleep(2 * IDLE_TICK)  # later reports of the same limit say nothing
    changes = [e for e in events if e.kind == "limit_changed"]
    assert len(changes) == 1, events
    assert changes[0].limit == 7, changes


async def test_state_reports_the_event_loops_lag() -> None:
    """A handler that blocks the loop for 0.3 s shows in ``state()["loop_lag"]`` (the
    ticker's next reading, while the worker is busy)."""
    app = Holding()
    shedder = LoadSheddingMiddleware(app, limit=1)
    lags: list[float] = []
    async with LifespanManager(shedder), anyio.create_task_group() as group:
        group.start_soon(drive, shedder, http_scope("/"))
        await app.started.wait()  # busy now: the ticker reads the lag every TICK
        await anyio.sleep(0.1)
        assert shedder.state()["loop_lag"] < 0.25
        time.sleep(0.3)  # noqa: ASYNC251 - the blocking call is the point
        with anyio.move_on_after(1.0):
            while True:
                lags.append(shedder.state()["loop_lag"])
                await anyio.sleep(0.002)
        app.release.set()
    assert max(lags) >= 0.2, max(lags)


async def test_the_class_a_priority_function_returns_orders_the_queue() -> None:
    """A priority function's answer is the request's class: with one place taken, a
    sheddable request queued first is served after a critical-plus one queued later."""

    def classify(scope: Scope) -> str | None:
        return {"/batch": "sheddable", "/pay": "critical-plus"}.get(scope["path"])

    gate = Gate()
    shedder = LoadSheddingMiddleware(
        gate, limit=1, max_queue=4, queue_timeout=SETUP, priority=classify
    )
    results: dict[str, Driven] = {}
    async with anyio.create_task_group() as group:
        await start(group, shedder, "/hold", results)
        await until(lambda: gate.inside == 1)
        await start(group, shedder, "/batch", results)
        await until(lambda: shedder.limiter.queued == 1)
        await start(group, shedder, "/pay", results)
        await until(lambda: shedder.limiter.queued == 2)
        assert [len(q) for q in shedder.limiter._queues] == [1, 0, 0, 1]
        gate.open.set()
    assert gate.entered == ["/hold", "/pay", "/batch"]
    assert all(r.status == 200 for r in results.values()), results


async def test_a_bulkhead_refuses_at_once_a_request_whose_deadline_cannot_be_met() -> None:
    """Behind TimeoutMiddleware(timeout=0.25), a request that finds the bulkhead's place
    taken by requests that take 0.5 s is refused 503 (reason deadline) at arrival, not
    kept waiting until its deadline's 504."""
    app = FastAPI()
    app.add_exception_handler(RequestRejected, rejection_handler)
    guard = bulkhead(1, max_queue=4, queue_timeout=5.0)

    @app.get("/slow", dependencies=[Depends(timeout(2.0)), Depends(guard)])
    async def slow() -> dict[str, str]:
        await anyio.sleep(0.5)
        return {}

    @app.get("/fast", dependencies=[Depends(guard)])
    async def fast() -> dict[str, str]:
        return {}

    guarded = TimeoutMiddleware(app, timeout=0.25, max_timeout=5.0)
    async with (
        LifespanManager(guarded) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://t"
        ) as client,
    ):
        assert (await client.get("/slow")).status_code == 200  # the bulkhead learns 0.5 s
        async with anyio.create_task_group() as group:
            group.start_soon(partial(client.get, "/slow"))
            await until(lambda: guard.limiter.inflight == 1)
            started = anyio.current_time()
            refused = await client.get("/fast")
            took = anyio.current_time() - started
    assert refused.status_code == 503, refused.text
    assert refused.json()["reason"] == "deadline", refused.text
    assert took < 0.2, took  # at arrival, before its 0.25 s deadline
