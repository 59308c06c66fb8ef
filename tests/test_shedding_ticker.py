"""Load shedding: the ticker that measures the event loop's lag runs at ``TICK`` only while
the worker is busy, and at ``IDLE_TICK`` otherwise.

Measured on a one-worker uvicorn server on a 2-vCPU VM: each tick wakes an idle loop, and
50 ticks a second took 11-12 ms of CPU a second of an idle worker (uvicorn's own timers: 2.5).
"""

from __future__ import annotations

from collections.abc import Mapping

import anyio
import pytest
from asgi_lifespan import LifespanManager
from starlette.types import Receive, Scope, Send

from asgi_guard import LoadSheddingMiddleware
from asgi_guard.shedding import IDLE_TICK, TICK

from .asgi_driver import drive, http_scope

pytestmark = pytest.mark.anyio


class Counting:
    """A fixed limit that notes when the ticker feeds it the loop's lag."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.lags: list[float] = []

    def on_sample(self, now: float, rtt: float, inflight: int, dropped: bool) -> None:
        pass

    def on_lag(self, now: float, lag: float) -> None:
        self.lags.append(anyio.current_time())

    def state(self) -> Mapping[str, float]:
        return {"limit": self.limit}


class Holding:
    """An app whose requests stay in flight until ``release`` is set."""

    def __init__(self) -> None:
        self.release = anyio.Event()
        self.started = anyio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        self.started.set()
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def test_an_idle_worker_ticks_at_the_idle_rate() -> None:
    """With nothing in flight the lag is read every IDLE_TICK, not every TICK: each tick
    wakes an idle loop, and the lag says nothing then."""
    algorithm = Counting(limit=4)
    shedder = LoadSheddingMiddleware(Holding(), limit=algorithm)
    async with LifespanManager(shedder):
        await anyio.sleep(IDLE_TICK * 3.5)
    assert 2 <= len(algorithm.lags) <= 4, algorithm.lags


async def test_a_busy_worker_ticks_at_tick() -> None:
    """While half the limit is in flight, the lag is read every TICK (the algorithm may
    grow the limit then, and the lag is what stops it on a saturated loop)."""
    app = Holding()
    algorithm = Counting(limit=2)
    shedder = LoadSheddingMiddleware(app, limit=algorithm)
    async with LifespanManager(shedder), anyio.create_task_group() as group:
        group.start_soon(drive, shedder, http_scope("/"))
        await app.started.wait()
        await anyio.sleep(IDLE_TICK)  # the slow tick in progress ends; then at TICK
        start = len(algorithm.lags)
        await anyio.sleep(TICK * 10)
        ticked = len(algorithm.lags) - start
        app.release.set()
    assert ticked >= 6, algorithm.lags


async def test_a_request_that_finds_the_worker_busy_wakes_the_ticker() -> None:
    """A slow tick is cut short by the request that takes half the limit: the lag is read
    at TICK from then on, not after the rest of IDLE_TICK."""
    app = Holding()
    algorithm = Counting(limit=1)
    shedder = LoadSheddingMiddleware(app, limit=algorithm)
    async with LifespanManager(shedder), anyio.create_task_group() as group:
        await anyio.sleep(IDLE_TICK / 4)  # the ticker sleeps its slow tick now
        group.start_soon(drive, shedder, http_scope("/"))
        await app.started.wait()
        woken = anyio.current_time()
        await anyio.sleep(TICK * 2.5)
        app.release.set()
    soon = [t for t in algorithm.lags if t > woken]
    assert soon, (woken, algorithm.lags)
    assert soon[0] - woken < IDLE_TICK / 2, (woken, algorithm.lags)


async def test_a_lag_trigger_keeps_the_ticker_at_tick() -> None:
    """With max_loop_lag the loop is watched at TICK even when idle: a trigger is only as
    prompt as its readings."""
    algorithm = Counting(limit=4)
    shedder = LoadSheddingMiddleware(Holding(), limit=algorithm, max_loop_lag=0.5)
    async with LifespanManager(shedder):
        await anyio.sleep(TICK * 10)
    assert len(algorithm.lags) >= 6, algorithm.lags
