"""The guards' own tasks (the deadline keeper, the shedder's ticker, the blocking detector's
watch) run for the app's lifespan and stop before the server hears that shutdown is
complete: a server may cancel the lifespan right after that message (Hypercorn does, and
reported a crash of its worker at every graceful shutdown with two guards stacked)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import anyio
import anyio.lowlevel
import pytest
from starlette.applications import Starlette
from starlette.types import ASGIApp, Message

from asgi_guard import BlockingDetectorMiddleware, LoadSheddingMiddleware, TimeoutMiddleware

pytestmark = pytest.mark.anyio


def timeout_guard(app: ASGIApp) -> TimeoutMiddleware:
    return TimeoutMiddleware(app, timeout=1.0)


def shedding_guard(app: ASGIApp) -> LoadSheddingMiddleware:
    return LoadSheddingMiddleware(app, limit=4)


def blocking_guard(app: ASGIApp) -> BlockingDetectorMiddleware:
    return BlockingDetectorMiddleware(app, threshold=0.1)


def running(guard: object) -> bool:
    """Whether the guard's own lifespan task still runs."""
    if isinstance(guard, TimeoutMiddleware):
        return guard._keeper is not None and guard._keeper.alive
    if isinstance(guard, LoadSheddingMiddleware):
        return guard._loop is not None
    assert isinstance(guard, BlockingDetectorMiddleware)
    return guard._watchdog.running


async def lifespan(app: ASGIApp, on_message: Callable[[Message], None]) -> None:
    """A server's lifespan: startup, then shutdown; ``on_message`` sees what the app sends."""
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

    async def receive() -> Message:
        return next(messages)

    async def send(message: Message) -> None:
        on_message(message)

    await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)


@pytest.mark.parametrize("build", [timeout_guard, shedding_guard, blocking_guard])
async def test_a_guards_task_has_stopped_when_the_server_hears_shutdown_is_complete(
    build: Callable[[ASGIApp], object],
) -> None:
    guard = build(Starlette())
    seen: dict[str, bool] = {}

    def on_message(message: Message) -> None:
        seen[message["type"]] = running(guard)

    await lifespan(guard, on_message)  # type: ignore[arg-type]
    assert seen == {"lifespan.startup.complete": True, "lifespan.shutdown.complete": False}


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_stacked_guards_return_before_a_server_cancels_the_lifespan() -> None:
    """As Hypercorn does: the lifespan task is cancelled an iteration after the server
    hears shutdown is complete. Three guards stacked have returned by then."""
    app: ASGIApp = Starlette()
    for build in (blocking_guard, shedding_guard, timeout_guard):
        app = build(app)
    loop = asyncio.get_running_loop()
    task: asyncio.Task[None] | None = None

    def on_message(message: Message) -> None:
        if message["type"] == "lifespan.shutdown.complete":
            assert task is not None
            loop.call_soon(task.cancel)

    task = loop.create_task(lifespan(app, on_message))
    await task  # it returned: no CancelledError
    assert not task.cancelled()
    await anyio.lowlevel.checkpoint()
