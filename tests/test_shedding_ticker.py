"""Load shedding: the ticker that measures the event loop's lag runs at ``TICK`` only while
the worker is busy, and at ``IDLE_TICK`` otherwise.

Measured on a one-worker uvicorn server on a 2-vCPU VM: each tick wakes an idle loop, and
50 ticks a second took 11-12 ms of CPU a second of an idle worker (uvicorn's own timers: 2.5).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping

import anyio
import pytest
from asgi_lifespan import LifespanManager
from starlette.types import Receive, Scope, Send

from asgi_guard import LoadSheddingMiddleware
from asgi_guard._deadline import LoopCheck, current_loop
from asgi_guard.shedding import IDLE_TICK, TICK

from .asgi_driver import drive, http_scope

pytestmark = pytest.mark.anyio


class Counting:
    """A fixed limit that notes when the ticker feeds it the loop's lag: ``lags`` has the
    time of each tick (the readings of one tick come at once), ``readings`` every lag."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.lags: list[float] = []
        self.readings: list[float] = []
        #: The readings of each tick.
        self.per_tick: list[list[float]] = []
        self._last = -1.0  # the ``now`` of the last reading

    def on_sample(self, now: float, rtt: float, inflight: int, dropped: bool) -> None:
        pass

    def on_lag(self, now: float, lag: float) -> None:
        if now != self._last:
            self.lags.append(anyio.current_time())
            self.per_tick.append([])
        self._last = now
        self.readings.append(lag)
        self.per_tick[-1].append(lag)

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
    # Each idle tick reads as many lags as TICKs it lasted (the mean lag is one over time).
    per_tick = round(IDLE_TICK / TICK)
    assert per_tick * len(algorithm.lags) <= len(algorithm.readings), algorithm.readings
    # (A few more when a loaded machine fires the tick's timer late: one per TICK late.)
    assert len(algorithm.readings) <= (per_tick + 10) * len(algorithm.lags), algorithm.readings


async def quick(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await Holding()(scope, receive, send)
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def test_requests_that_come_and_go_do_not_keep_the_ticker_at_tick() -> None:
    """Requests that never take half the limit leave the ticker at IDLE_TICK: a request
    every 10 ms, none in flight when the ticker looks, does not wake the loop every TICK
    (as it did). The time counts as lag-free readings all the same."""
    algorithm = Counting(limit=8)
    shedder = LoadSheddingMiddleware(quick, limit=algorithm)
    async with LifespanManager(shedder):
        await anyio.sleep(IDLE_TICK / 2)
        ticks, readings = len(algorithm.lags), len(algorithm.readings)
        started = anyio.current_time()
        while anyio.current_time() - started < 4 * IDLE_TICK:
            await drive(shedder, http_scope("/"))
            await anyio.sleep(TICK / 2)
    ticked = len(algorithm.lags) - ticks
    assert 3 <= ticked <= 5, algorithm.lags  # 4 IDLE_TICKs, not 50 TICKs
    read = len(algorithm.readings) - readings
    assert read >= 3 * round(IDLE_TICK / TICK), algorithm.readings
    # Lag-free but for the last reading of each tick (how late its timer fired).
    assert not any(any(tick[:-1]) for tick in algorithm.per_tick[ticks:]), algorithm.per_tick


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


def test_each_new_event_loop_is_found_without_a_lookup_per_request() -> None:
    """Requests on the loop the guard is bound to skip the loop lookup (a system call per
    request before Python 3.12); a loop that ended, even closed with its ticker still
    pending, or a loop in another thread, is looked up and bound anew."""
    shedder = LoadSheddingMiddleware(quick, limit=4)
    seen: list[object] = []

    async def serve() -> None:
        for _ in range(3):
            assert (await drive(shedder, http_scope("/"))).status == 200
        assert shedder._loop is asyncio.get_running_loop()
        assert shedder._on_loop.holds()
        seen.append(shedder._loop)

    asyncio.run(serve())  # cancels the ticker at its end: unbound
    assert shedder._loop is None
    assert not shedder._on_loop.holds()
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(serve())
    finally:
        loop.close()  # the ticker is left pending, never cancelled: still bound
    assert shedder._loop is loop
    asyncio.run(serve())  # a stopped loop does not hold: looked up and bound anew
    thread = threading.Thread(target=asyncio.run, args=(serve(),))
    thread.start()
    thread.join()
    assert len({id(loop) for loop in seen}) == 4


async def test_loop_check_holds_only_in_the_binding_thread_while_the_loop_runs(
    anyio_backend_name: str,
) -> None:
    check = LoopCheck()
    assert not check.holds()
    check.bind(current_loop())
    if anyio_backend_name == "trio":
        assert not check.holds()  # nothing to check cheaply on trio: always looked up
        return
    assert check.holds()
    answers: list[bool] = []
    thread = threading.Thread(target=lambda: answers.append(check.holds()))
    thread.start()
    thread.join()
    assert answers == [False]
    check.bind(None)
    assert not check.holds()
