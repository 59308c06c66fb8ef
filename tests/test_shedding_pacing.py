"""LoadSheddingMiddleware's paced starts (asyncio): while others are in the application,
admitted requests begin one per loop iteration, every other iteration, after the requests
that arrived meanwhile.

Measured on a one-worker uvicorn app with 2 ms CPU-bound handlers at 4x its capacity: the
waiters that completions handed places to ran back to back, ahead of the new requests'
first steps, which came 2.3 ms (median) after their headers were read; paced, refusals
were answered within 3 ms at p99 (see docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from asgi_lifespan import LifespanManager
from starlette.types import Receive, Scope, Send

from asgi_guard import ConfigurationError, LoadSheddingMiddleware, ManualClock, _pacing
from asgi_guard._pacing import LATE, MAX_HELD, Pacer

from .asgi_driver import Driven, drive, http_scope

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def never_late(monkeypatch: pytest.MonkeyPatch) -> None:
    """A start gives way twice when it runs late (`LATE`, real time): the tests not about
    that must not depend on how long this machine takes between two loop iterations."""
    monkeypatch.setattr(_pacing, "LATE", math.inf)


@pytest.fixture
def anyio_backend() -> str:
    """Pacing follows asyncio's order of callbacks; trio is checked apart (not paced)."""
    return "asyncio"


class Recorder:
    """An app that notes when each request starts, and queues a note for the next loop
    iteration at once: a start noted before the previous start's note ran the same
    iteration as it."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].rsplit(".", 1)[-1]
                await send({"type": f"{message['type']}.complete"})
                if kind == "shutdown":
                    return
        name = scope["path"]
        self.events.append(("start", name))
        asyncio.get_running_loop().call_soon(self.events.append, ("next iteration", name))
        await asyncio.sleep(0.01)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def drive_together(app: Any, *paths: str) -> list[Driven]:
    """Requests whose first steps all run in one loop iteration."""
    return list(await asyncio.gather(*(drive(app, http_scope(path)) for path in paths)))


async def test_a_start_that_takes_the_last_place_is_held_an_iteration() -> None:
    """Limit 2, two requests at once: "/a" starts; "/b" takes the last place and starts
    in a later iteration (unpaced, both would start back to back)."""
    recorder = Recorder()
    shedder = LoadSheddingMiddleware(recorder, limit=2)
    results = await drive_together(shedder, "/a", "/b")
    assert [r.status for r in results] == [200, 200]
    assert recorder.events == [
        ("start", "/a"),
        ("next iteration", "/a"),
        ("start", "/b"),
        ("next iteration", "/b"),
    ]
    assert shedder.state()["paced"] == 1


async def test_below_the_limit_nothing_is_held() -> None:
    recorder = Recorder()
    shedder = LoadSheddingMiddleware(recorder, limit=4)
    await drive_together(shedder, "/a", "/b", "/c")
    assert [e for e, _ in recorder.events[:3]] == ["start"] * 3
    assert shedder.state()["paced"] == 0


async def test_without_pacing_starts_at_the_limit_run_back_to_back() -> None:
    recorder = Recorder()
    shedder = LoadSheddingMiddleware(recorder, limit=2, pace=False)
    await drive_together(shedder, "/a", "/b")
    assert [e for e, _ in recorder.events[:2]] == ["start"] * 2
    assert shedder.state()["paced"] == 0


@pytest.mark.parametrize("lifespan", [True, False], ids=["lifespan", "lazy"])
async def test_a_request_that_arrives_meanwhile_is_refused_before_a_held_start(
    lifespan: bool,
) -> None:
    """Limit 2, no queue: "/a" and "/b" are admitted together, "/b" (the last place) is
    held; "/c", created while "/a" starts, is refused in the next iteration, before "/b"
    starts. (With or without lifespan: both give the middleware its loop.)"""
    events: list[str] = []
    tasks: list[asyncio.Task[Driven]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await Recorder()(scope, receive, send)
            return
        events.append(f"start {scope['path']}")
        if scope["path"] == "/a":
            tasks.append(asyncio.get_running_loop().create_task(refused_c()))
        await asyncio.sleep(0.01)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    shedder = LoadSheddingMiddleware(app, limit=2, max_queue=0)

    async def refused_c() -> Driven:
        driven = await drive(shedder, http_scope("/c"))
        events.append(f"{driven.status} /c")
        return driven

    if lifespan:
        async with LifespanManager(shedder):
            await drive_together(shedder, "/a", "/b")
    else:
        await drive_together(shedder, "/a", "/b")
    (c,) = await asyncio.gather(*tasks)
    assert c.status == 503
    assert events.index("503 /c") < events.index("start /b"), events
    assert shedder.state()["paced"] == 1


async def test_held_starts_go_one_per_iteration_with_an_iteration_between() -> None:
    """Each timer lets one start through, and after it one iteration passes without a
    start: a start runs before the I/O of its iteration, and the requests that arrived
    during it must be scheduled (in the next iteration) ahead of the next start."""
    loop = asyncio.get_running_loop()
    pacer = Pacer(loop)
    events: list[str] = []

    async def held(name: str) -> None:
        await pacer.start()
        events.append(f"start {name}")
        loop.call_soon(events.append, f"1 iteration after {name}")
        loop.call_soon(loop.call_soon, events.append, f"2 iterations after {name}")

    await asyncio.gather(held("a"), held("b"), held("c"))
    assert events.index("1 iteration after a") < events.index("start b")
    assert events.index("2 iterations after a") < events.index("start b")
    assert events.index("2 iterations after b") < events.index("start c")
    assert pacer.paced == 3
    assert pacer.waiting == 0


async def iterations_to_start(pacer: Pacer) -> int:
    """How many loop iterations ``pacer.start()`` takes to return."""
    loop = asyncio.get_running_loop()
    count = [0]
    done = False

    def tick() -> None:
        if not done:
            count[0] += 1
            loop.call_soon(tick)

    loop.call_soon(tick)
    await pacer.start()
    done = True
    return count[0]


async def test_the_pause_after_a_start_does_not_outlive_it() -> None:
    """The iteration left without a start after a start passes even when nothing is held
    then: a start asked for long after it waits no longer than a first one (the pause
    used to stay owed until the next start, one more iteration)."""
    fresh = await iterations_to_start(Pacer(asyncio.get_running_loop()))
    pacer = Pacer(asyncio.get_running_loop())
    await pacer.start()
    for _ in range(20):  # idle iterations
        await asyncio.sleep(0)
    assert await iterations_to_start(pacer) == fresh
    assert pacer.waiting == 0


class Recording:
    """A fixed limit of 2 that records the samples it is given."""

    def __init__(self) -> None:
        self.limit = 2
        self.samples: list[float] = []

    def on_sample(self, now: float, rtt: float, inflight: int, dropped: bool) -> None:
        self.samples.append(rtt)

    def on_lag(self, now: float, lag: float) -> None:
        pass

    def state(self) -> dict[str, float]:
        return {"limit": self.limit}


async def test_a_start_let_through_long_before_it_runs_gives_way_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The loop runs long after letting a start through (a pause, a slow step): requests
    that arrived meanwhile are read in the next iteration only, and the start, let
    through before them, would run first. It gives way to them once."""
    monkeypatch.setattr(_pacing, "LATE", LATE)
    loop = asyncio.get_running_loop()
    now = [0.0]
    order: list[str] = []
    tasks: list[asyncio.Task[None]] = []

    async def arrival() -> None:
        order.append("arrival")

    def read() -> None:
        order.append("read")
        tasks.append(loop.create_task(arrival()))

    class Paused(Pacer):
        def _release(self, waiting: Any, at: float | None = None) -> bool:
            went = super()._release(waiting, at)
            if went and not order:
                now[0] += LATE + 0.005  # the loop runs long after letting it through
                loop.call_soon(read)  # a request arrives meanwhile: read next iteration
            return went

    pacer = Paused(loop, clock=lambda: now[0])

    async def start() -> None:
        await pacer.start()
        order.append("start")

    await asyncio.wait_for(start(), 1.0)
    await asyncio.gather(*tasks)
    assert order == ["read", "arrival", "start"]
    assert pacer.waiting == 0


async def test_a_start_let_through_just_before_it_runs_goes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_pacing, "LATE", LATE)
    loop = asyncio.get_running_loop()
    pacer = Pacer(loop, clock=lambda: 0.0)  # no time passes: never late
    iterations = 0

    def count() -> None:
        nonlocal iterations
        iterations += 1
        loop.call_soon(count)

    loop.call_soon(count)
    await pacer.start()
    assert iterations <= 2  # the timer's iteration and the next one: no second hold


async def test_late_starts_never_make_more_than_the_most_held(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every start runs late (the clock jumps at each release); the second holds still
    keep at most `MAX_HELD` starts held, and the cap's own releases never wait again."""
    monkeypatch.setattr(_pacing, "LATE", LATE)
    loop = asyncio.get_running_loop()
    now = [0.0]
    most = 0

    class Slow(Pacer):
        def _release(self, waiting: Any, at: float | None = None) -> bool:
            nonlocal most
            most = max(most, self.waiting)
            went = super()._release(waiting, at)
            now[0] += 0.01
            return went

    pacer = Slow(loop, clock=lambda: now[0])
    started: list[int] = []

    async def start(n: int) -> None:
        await pacer.start()
        started.append(n)

    await asyncio.wait_for(asyncio.gather(*(start(n) for n in range(MAX_HELD + 3))), 2.0)
    assert sorted(started) == list(range(MAX_HELD + 3))
    assert most <= MAX_HELD
    assert pacer.waiting == 0


async def test_the_hold_is_not_time_in_the_application() -> None:
    """The algorithms learn from time in the application: a held start's clock starts
    when it is let through (the manual clock jumps 1 s while "/b" is held)."""
    clock = ManualClock()
    algorithm = Recording()
    shedder = LoadSheddingMiddleware(Recorder(), limit=algorithm, clock=clock)
    both = asyncio.gather(*(drive(shedder, http_scope(p)) for p in ("/a", "/b")))
    await asyncio.sleep(0)  # both admitted; "/b", at the limit, is held
    assert shedder._pacer is not None
    assert shedder._pacer.waiting == 1
    clock.advance(1.0)
    await both
    assert sorted(algorithm.samples) == [0.0, 1.0]  # "/b": 0 s in the app, "/a": 1 s


async def test_a_request_cancelled_while_held_teaches_nothing_and_frees_its_place() -> None:
    algorithm = Recording()
    shedder = LoadSheddingMiddleware(Recorder(), limit=algorithm)
    first = asyncio.ensure_future(drive(shedder, http_scope("/a")))
    held = asyncio.ensure_future(drive(shedder, http_scope("/b")))
    await asyncio.sleep(0)
    assert shedder._pacer is not None
    assert shedder._pacer.waiting == 1
    held.cancel()
    with pytest.raises(asyncio.CancelledError):
        await held
    await first
    assert len(algorithm.samples) == 1  # "/a" only
    assert shedder.limiter.inflight == 0
    assert shedder._pacer.waiting == 0


async def test_at_most_a_few_starts_are_held_at_once() -> None:
    """Past `MAX_HELD` held starts, the oldest goes at once (an I/O-bound app at a large
    limit frees many places per iteration; holding them all would cut its throughput)."""
    pacer = Pacer(asyncio.get_running_loop())
    order: list[int] = []

    async def held(n: int) -> None:
        await pacer.start()
        order.append(n)

    tasks = [asyncio.ensure_future(held(n)) for n in range(MAX_HELD + 1)]
    await asyncio.sleep(0)  # all have asked
    assert pacer.waiting == MAX_HELD
    await asyncio.gather(*tasks)
    assert order == list(range(MAX_HELD + 1))
    assert pacer.waiting == 0


async def test_a_held_start_that_is_cancelled_leaves_nothing_behind() -> None:
    pacer = Pacer(asyncio.get_running_loop())
    first, second, third = (asyncio.create_task(pacer.start()) for _ in range(3))
    await asyncio.sleep(0)
    assert pacer.waiting == 3
    second.cancel()
    await asyncio.gather(first, third)
    assert second.cancelled()
    assert pacer.waiting == 0
    assert pacer.paced == 3


async def test_a_start_cancelled_as_it_is_let_through_passes_its_turn_on() -> None:
    pacer = Pacer(asyncio.get_running_loop())
    first, second = (asyncio.create_task(pacer.start()) for _ in range(2))
    await asyncio.sleep(0)
    pacer._let_one_through()  # "first" is let through ...
    first.cancel()  # ... and cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 1.0)
    assert pacer.waiting == 0


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_is_not_paced(anyio_backend: str) -> None:
    import trio

    starts: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        starts.append(scope["path"])
        await trio.sleep(0.01)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    shedder = LoadSheddingMiddleware(app, limit=4, max_queue=0)
    results: list[Driven] = []

    async def one(path: str) -> None:
        results.append(await drive(shedder, http_scope(path)))

    async with trio.open_nursery() as nursery:
        for path in ("/a", "/b", "/c"):
            nursery.start_soon(one, path)
    assert sorted(r.status for r in results) == [200, 200, 200]
    assert shedder.state()["paced"] == 0


def test_pace_must_be_a_bool() -> None:
    with pytest.raises(ConfigurationError, match="pace"):
        LoadSheddingMiddleware(Recorder(), pace="yes")  # type: ignore[arg-type]
