"""The timeout FastAPI dependency: per-route deadlines on top of TimeoutMiddleware."""

from __future__ import annotations

import math
import time
from typing import Any

import anyio
import httpx
import pytest
from fastapi import APIRouter, BackgroundTasks, Depends, FastAPI, WebSocket

from asgi_guard import ConfigurationError, TimeoutMiddleware, remaining
from asgi_guard.fastapi import TimeoutDependency, timeout

from ._timeout_backends import anyio_backend  # noqa: F401 (the backends fixture)
from .asgi_driver import drive, http_scope

pytestmark = pytest.mark.anyio


SLACK = 0.4  # how late a timer may fire on a loaded CI machine or a paused VM


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def app_with(route_timeout: float | None, sleep: float, **middleware: Any) -> FastAPI:
    """GET /work sleeps ``sleep`` s and reports remaining(); ``route_timeout`` sets its deadline."""
    app = FastAPI()
    dependencies = [Depends(timeout(route_timeout))] if route_timeout is not None else []

    @app.get("/work", dependencies=dependencies)
    async def work() -> dict[str, float | None]:
        left = remaining()
        await anyio.sleep(sleep)
        return {"remaining": left}

    if middleware:
        app.add_middleware(TimeoutMiddleware, **middleware)
    return app


async def test_a_route_can_tighten_the_deadline() -> None:
    """timeout(0.1) on a route answers 504 at 0.1 s although the app allows 5 s."""
    app = app_with(0.1, 10, timeout=5.0)
    async with client_for(app) as client:
        started = time.monotonic()
        response = await client.get("/work")
    elapsed = time.monotonic() - started
    assert response.status_code == 504, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert "0.1 s" in response.json()["detail"]
    assert 0.1 <= elapsed < 0.1 + SLACK


async def test_remaining_reflects_the_route_deadline() -> None:
    """Inside the handler remaining() counts down from the route's deadline."""
    app = app_with(0.5, 0, timeout=5.0)
    async with client_for(app) as client:
        response = await client.get("/work")
    assert response.status_code == 200, response.text
    assert 0.4 < response.json()["remaining"] <= 0.5


async def test_a_route_can_loosen_the_deadline_up_to_max_timeout() -> None:
    """With max_timeout, a route may take longer than the app default."""
    app = app_with(0.5, 0.2, timeout=0.1, max_timeout=1.0)
    async with client_for(app) as client:
        response = await client.get("/work")
    assert response.status_code == 200, response.text


async def test_other_routes_keep_the_app_default() -> None:
    """A route without the dependency still has the middleware's deadline."""
    app = app_with(None, 10, timeout=0.1, max_timeout=1.0)
    async with client_for(app) as client:
        response = await client.get("/work")
    assert response.status_code == 504, response.text


async def test_looser_than_max_timeout_is_a_configuration_error() -> None:
    """A route asking for more than max_timeout fails at the first request, naming the fix."""
    app = app_with(3.0, 0, timeout=1.0)
    async with client_for(app) as client:
        with pytest.raises(ConfigurationError, match=r"max_timeout=1\b.*raise its max_timeout"):
            await client.get("/work")


async def test_without_the_middleware_it_fails_clearly() -> None:
    """The dependency needs TimeoutMiddleware and says so at the first request."""
    app = app_with(1.0, 0)
    async with client_for(app) as client:
        with pytest.raises(ConfigurationError, match=r"GET /work needs TimeoutMiddleware"):
            await client.get("/work")


async def test_a_router_dependency_times_every_route() -> None:
    """On a router, the dependency sets the deadline of each of its routes."""
    router = APIRouter(dependencies=[Depends(timeout(0.1))])

    @router.get("/a")
    async def a() -> str:
        await anyio.sleep(10)
        return "a"

    @router.get("/b")
    async def b() -> str:
        return "b"

    app = FastAPI()
    app.include_router(router)
    app.add_middleware(TimeoutMiddleware, timeout=5.0)
    async with client_for(app) as client:
        assert (await client.get("/a")).status_code == 504
        assert (await client.get("/b")).status_code == 200


async def test_background_tasks_of_a_timed_route_are_not_cancelled() -> None:
    """FastAPI BackgroundTasks run after the response, past the route's deadline."""
    done: list[float | None] = []
    app = FastAPI()

    async def later() -> None:
        await anyio.sleep(0.2)
        done.append(remaining())

    @app.get("/queue", dependencies=[Depends(timeout(0.1))])
    async def queue(tasks: BackgroundTasks) -> str:
        tasks.add_task(later)
        return "queued"

    app.add_middleware(TimeoutMiddleware, timeout=5.0)
    async with client_for(app) as client:
        response = await client.get("/queue")
    assert response.status_code == 200, response.text
    assert done == [None]


async def test_a_sync_route_is_answered_at_its_deadline() -> None:
    """A def endpoint with a route deadline gets its 504 on time; its thread runs on."""
    finished: list[bool] = []
    app = FastAPI()

    @app.get("/sync", dependencies=[Depends(timeout(0.1))])
    def sync() -> str:
        time.sleep(0.3)
        finished.append(True)
        return "late"

    events: list[Any] = []
    app.add_middleware(TimeoutMiddleware, timeout=5.0, on_event=events.append)
    async with client_for(app) as client:
        started = time.monotonic()
        response = await client.get("/sync")
    assert response.status_code == 504, response.text
    assert finished == [True]  # ASGITransport waits for the app; a server would not
    assert time.monotonic() - started >= 0.3
    assert [e.kind for e in events] == ["deadline", "overrun"]
    assert events[0].route == "/sync"


@pytest.mark.parametrize("bad", [0, -1, math.nan, math.inf, "1", None])
def test_nonsense_timeouts_fail_at_construction(bad: Any) -> None:
    """timeout() takes a positive, finite number of seconds."""
    with pytest.raises(ConfigurationError):
        timeout(bad)


def test_the_dependency_describes_itself() -> None:
    """Its repr is what error messages quote."""
    dependency = timeout(2)
    assert isinstance(dependency, TimeoutDependency)
    assert repr(dependency) == "timeout(2)"
    assert dependency.seconds == 2.0


async def test_a_timed_router_keeps_its_websockets_working() -> None:
    """On a router with WebSocket routes, the dependency leaves the handshakes alone."""
    router = APIRouter(dependencies=[Depends(timeout(0.5))])

    @router.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("hi")
        await websocket.close()

    app = FastAPI()
    app.include_router(router)
    app.add_middleware(TimeoutMiddleware, timeout=5.0)
    scope = {**http_scope("/ws"), "type": "websocket", "subprotocols": []}
    driven = await drive(app, scope, [{"type": "websocket.connect"}], then="wait")
    assert [m["type"] for m in driven.sent] == [
        "websocket.accept",
        "websocket.send",
        "websocket.close",
    ], driven.sent
    assert driven.sent[1]["text"] == "hi"


async def test_an_exempt_path_wins_over_a_route_timeout() -> None:
    """A path the middleware exempts stays untimed even under a timed router."""
    router = APIRouter(dependencies=[Depends(timeout(0.1))])

    @router.get("/events")
    async def events() -> str:
        await anyio.sleep(0.3)
        return "stream"

    app = FastAPI()
    app.include_router(router)
    app.add_middleware(TimeoutMiddleware, timeout=5.0, exempt=["/events"])
    async with client_for(app) as client:
        response = await client.get("/events")
    assert response.status_code == 200, response.text
