"""A fresh worker: the default algorithm measures the no-load latency first, with the
limit at 1 for five requests' time. Meanwhile requests that come together wait in the
queue (up to a second, or ``queue_timeout``) instead of being refused after a burst's
80 ms: the limit is held down to measure, not by overload."""

from __future__ import annotations

import importlib.util
import itertools
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_guard import Adaptive, Fixed, LoadSheddingMiddleware, ManualClock, Vegas, _shedding
from asgi_guard._shedding import (
    LEARNING_LIMIT,
    LEARNING_WAIT,
    ConcurrencyLimiter,
    Permit,
    class_index,
)

from .asgi_driver import lifespan_client

pytestmark = pytest.mark.anyio

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
_loads = itertools.count()


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` afresh: a new process's first requests."""
    module_name = f"_asgi_guard_start_{name}_{next(_loads)}"
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


async def concurrently(http: httpx.AsyncClient, *paths: str) -> list[httpx.Response]:
    responses: list[httpx.Response] = []

    async def get(path: str) -> None:
        responses.append(await http.get(path))

    async with anyio.create_task_group() as group:
        for path in paths:
            group.start_soon(get, path)
    return responses


async def test_the_examples_report_serves_a_burst_on_a_fresh_worker() -> None:
    """examples/shedding.py on a fresh import: four concurrent /report (100 ms each) are
    all served, one at a time while the shedder learns (it refused three of them)."""
    shedding = load_example("shedding")
    async with lifespan_client(shedding.guarded) as http:
        responses = await concurrently(http, *["/report"] * 4)
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    state = shedding.shedder.state()
    assert state["counts"]["queued"] == 3  # they waited for the shedder, not the bulkhead
    assert state["algorithm"]["probing"] == 1.0  # four of the five solo requests so far
    assert shedding.report_bulkhead.limiter.counts["admitted"] == 4


async def test_a_fresh_worker_serves_steady_traffic_to_a_slow_route() -> None:
    """A 40 ms I/O-bound route, a request every 20 ms (two in flight on average, a small
    share of what it serves): none is refused while the limit is learned (four were with
    a burst's wait; at 60 ms nine, with little room left below the 0.8 s that the places
    freeing ahead of a newcomer may take), and the limit then grows past 1."""

    async def io(request: Request) -> PlainTextResponse:
        await anyio.sleep(0.04)
        return PlainTextResponse("ok")

    shedder = LoadSheddingMiddleware(Starlette(routes=[Route("/io", io)]))
    responses: list[httpx.Response] = []
    async with lifespan_client(shedder) as http:

        async def get() -> None:
            responses.append(await http.get("/io"))

        async with anyio.create_task_group() as group:
            for _ in range(30):
                group.start_soon(get)
                await anyio.sleep(0.02)
    assert [r.status_code for r in responses] == [200] * 30, [
        r.json()["reason"] for r in responses if r.status_code != 200
    ]
    state = shedder.state()
    assert state["counts"]["queued"] > 0  # some did wait while it learned
    assert not state["algorithm"]["probing"]
    assert state["limit"] > 1


async def test_while_learning_a_configured_queue_timeout_still_bounds_the_wait() -> None:
    """queue_timeout is the longest wait, while learning too: a request behind a 300 ms
    one waits 50 ms and is refused."""

    async def slow(request: Request) -> PlainTextResponse:
        await anyio.sleep(0.3)
        return PlainTextResponse("ok")

    shedder = LoadSheddingMiddleware(Starlette(routes=[Route("/", slow)]), queue_timeout=0.05)
    async with lifespan_client(shedder) as http:
        responses = await concurrently(http, "/", "/")
    assert sorted(r.status_code for r in responses) == [200, 503], [r.text for r in responses]
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.json()["reason"] == "queue_timeout"


@pytest.mark.parametrize("algorithm", [Adaptive, Vegas])
async def test_a_queue_behind_a_learning_algorithm_never_stands(
    algorithm: type[Adaptive | Vegas],
) -> None:
    """While the algorithm learns, a queue that stays non-empty for many intervals is not
    standing (no cut to one waiter, no refusal at arrival); its waiters are served first
    in, first out, one at a time, and the fifth solo request ends the learning: the limit
    grows and the rest are served at once."""
    clock = ManualClock(100.0)
    limiter = ConcurrencyLimiter(algorithm(), clock=clock.now, burst_share=0.8)
    critical = class_index("critical")
    held = limiter.try_acquire(critical)
    assert held is not None
    assert limiter.limit == 1
    outcomes: dict[str, Permit | str] = {}

    async def wait(name: str) -> None:
        outcomes[name] = await limiter.acquire(critical)

    async with anyio.create_task_group() as group:
        for n in range(6):
            group.start_soon(wait, f"w{n}")

            def queued(n: int = n) -> bool:
                return limiter.queued == n + 1

            await until(queued)
            clock.advance(0.2)  # two intervals between arrivals: it would have stood
            assert not limiter.standing(clock.now())
        assert limiter.queue_capacity(clock.now()) == 32
        permit: Permit | str = held
        for n in range(5):  # five solo requests: the held one, then w0 to w3
            assert getattr(limiter.algorithm, "learning", None) is True
            assert isinstance(permit, Permit)
            clock.advance(0.01)
            limiter.release(permit)
            if n < 4:

                def admitted(n: int = n) -> bool:
                    return f"w{n}" in outcomes

                await until(admitted)
                assert len(outcomes) == n + 1, outcomes  # one at a time, in order
                permit = outcomes[f"w{n}"]
        await until(lambda: len(outcomes) == 6)
    assert getattr(limiter.algorithm, "learning", None) is False
    assert limiter.limit > 1
    assert all(isinstance(p, Permit) for p in outcomes.values()), outcomes
    assert limiter.counts["queue_full"] == limiter.counts["queue_timeout"] == 0


def test_learning_is_read_from_the_algorithm_and_only_while_it_lasts() -> None:
    """Adaptive and Vegas say they learn until their first measurement ends; Fixed and
    custom algorithms without the attribute never do; the limiter's waits follow."""
    for algorithm in (Adaptive(), Vegas()):
        assert algorithm.learning
        for i in range(5):
            algorithm.on_sample(now=0.01 * (i + 1), rtt=0.005, inflight=1, dropped=False)
        assert not algorithm.learning
        assert algorithm.limit == 20
    assert not hasattr(Fixed(3), "learning")
    clock = ManualClock(0.0)
    fresh = ConcurrencyLimiter(Adaptive(), clock=clock.now, burst_share=0.8)
    fixed = ConcurrencyLimiter(Fixed(1), clock=clock.now, burst_share=0.8)
    assert fresh._learns()
    assert not fixed._learns()
    assert LEARNING_WAIT == 1.0  # the first measurement's own timeout


def test_learning_manages_the_queue_for_learning_limit_at_most() -> None:
    """A first request that never ends (a stream, a long poll) holds the measurement back;
    the queue is managed for learning for `LEARNING_LIMIT` from the first time it is asked,
    then by its usual rules, though the algorithm still learns."""
    clock = ManualClock(0.0)
    limiter = ConcurrencyLimiter(Adaptive(), clock=clock.now, burst_share=0.8)
    assert limiter.try_acquire(class_index("critical")) is not None  # never released
    clock.advance(5.0)
    assert limiter._learns()  # counted from the first time asked, not from the start
    clock.advance(LEARNING_LIMIT)
    assert limiter._learns()
    clock.advance(0.001)
    assert not limiter._learns()
    assert getattr(limiter.algorithm, "learning", None) is True
    assert not limiter._learns()  # over for good


async def test_newcomers_behind_a_first_request_that_never_ends_are_refused_as_usual(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stream holds the only place of a fresh worker: the first newcomer waits the
    learning wait, and, once `LEARNING_LIMIT` has passed, newcomers are refused as at
    any other time (a burst's wait at most), not after a second each."""
    monkeypatch.setattr(_shedding, "LEARNING_WAIT", 0.4)
    monkeypatch.setattr(_shedding, "LEARNING_LIMIT", 0.2)

    async def stream(request: Request) -> PlainTextResponse:
        await anyio.sleep(1.0)
        return PlainTextResponse("streamed")

    async def quick(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/stream", stream), Route("/x", quick)])
    shedder = LoadSheddingMiddleware(app)
    took: dict[str, tuple[int, float]] = {}
    async with lifespan_client(shedder) as http:

        async def get(name: str, path: str) -> None:
            started = anyio.current_time()
            response = await http.get(path)
            took[name] = (response.status_code, anyio.current_time() - started)

        async with anyio.create_task_group() as group:
            group.start_soon(get, "stream", "/stream")
            await anyio.sleep(0.05)
            group.start_soon(get, "first", "/x")  # learning: waits the learning wait
            await anyio.sleep(0.3)
            group.start_soon(get, "later", "/x")  # past LEARNING_LIMIT: the usual rules
    assert took["stream"][0] == 200
    assert took["first"][0] == 503
    assert took["first"][1] >= 0.35
    assert took["later"][0] == 503
    assert took["later"][1] < 0.2


async def until(check: Callable[[], bool]) -> None:
    with anyio.fail_after(2):
        while not check():  # noqa: ASYNC110 - polling the limiter's state
            await anyio.sleep(0.001)


class Measuring:
    """A custom algorithm that says it learns, as the protocol's docstring allows."""

    def __init__(self) -> None:
        self.limit = 1
        self.learning = True

    def on_sample(self, now: float, rtt: float, inflight: int, dropped: bool) -> None:
        pass

    def on_lag(self, now: float, lag: float) -> None:
        pass

    def state(self) -> dict[str, float]:
        return {"limit": self.limit}


async def test_a_custom_algorithm_may_say_it_learns() -> None:
    """A custom algorithm's ``learning`` is honoured: its queue does not stand while it is
    true, and stands again (after an interval not empty) once it is false."""
    clock = ManualClock(100.0)
    algorithm = Measuring()
    limiter = ConcurrencyLimiter(algorithm, clock=clock.now, burst_share=0.8)
    held = limiter.try_acquire(class_index("critical"))
    assert held is not None
    async with anyio.create_task_group() as group:
        group.start_soon(limiter.acquire, class_index("critical"))
        await until(lambda: limiter.queued == 1)
        clock.advance(0.5)
        assert not limiter.standing(clock.now())
        algorithm.learning = False
        assert limiter.standing(clock.now())
        group.cancel_scope.cancel()
    assert limiter.queued == 0
