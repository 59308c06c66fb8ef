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
from typing import Any

import pytest
from asgi_lifespan import LifespanManager
from starlette.types import Receive, Scope, Send

from asgi_guard import ConfigurationError, LoadSheddingMiddleware
from asgi_guard._pacing import Pacer

from .asgi_driver import Driven, drive, http_scope

pytestmark = pytest.mark.anyio


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


@pytest.mark.parametrize("lifespan", [True, False], ids=["lifespan", "lazy"])
async def test_admitted_requests_start_one_per_iteration_while_others_run(lifespan: bool) -> None:
    recorder = Recorder()
    shedder = LoadSheddingMiddleware(recorder, limit=4, max_queue=0)
    if lifespan:
        async with LifespanManager(shedder):
            results = await drive_together(shedder, "/a", "/b", "/c")
    else:
        results = await drive_together(shedder, "/a", "/b", "/c")
    assert [r.status for r in results] == [200, 200, 200]
    assert recorder.events == [
        ("start", "/a"),
        ("next iteration", "/a"),
        ("start", "/b"),
        ("next iteration", "/b"),
        ("start", "/c"),
        ("next iteration", "/c"),
    ]
    assert shedder.state()["paced"] == 2  # "/a" was alone: not held


async def test_between_two_held_starts_an_iteration_runs_without_one() -> None:
    """After a held start, the next waits an iteration more: a start runs before the I/O
    of its iteration, and the requests that arrived during it must be scheduled (in the
    next iteration) ahead of the next start."""
    events: list[tuple[str, str]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        name = scope["path"]
        events.append(("start", name))
        loop = asyncio.get_running_loop()
        loop.call_soon(loop.call_soon, events.append, ("two iterations later", name))
        await asyncio.sleep(0.01)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    shedder = LoadSheddingMiddleware(app, limit=4, max_queue=0)
    await drive_together(shedder, "/a", "/b", "/c")
    assert events.index(("two iterations later", "/b")) < events.index(("start", "/c")), events


async def test_without_pacing_the_starts_run_back_to_back() -> None:
    recorder = Recorder()
    shedder = LoadSheddingMiddleware(recorder, limit=4, max_queue=0, pace=False)
    await drive_together(shedder, "/a", "/b", "/c")
    assert [e for e, _ in recorder.events[:3]] == ["start"] * 3
    assert shedder.state()["paced"] == 0


async def test_a_request_that_arrives_meanwhile_is_refused_before_a_held_start() -> None:
    """Limit 2, no queue: "/a" and "/b" are admitted together, "/b" is held; "/c",
    created while "/a" starts, is refused in the next iteration, before "/b" starts."""
    events: list[str] = []
    tasks: list[asyncio.Task[Driven]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
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

    await drive_together(shedder, "/a", "/b")
    (c,) = await asyncio.gather(*tasks)
    assert c.status == 503
    assert events.index("503 /c") < events.index("start /b"), events


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
