"""asgi_guard.fastapi.bulkhead: a per-route concurrency limit as a dependency."""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import anyio
import httpx
import pytest
from fastapi import Depends, FastAPI, WebSocket
from starlette.types import Message

from asgi_guard import ConfigurationError, LoadSheddingMiddleware, RequestRejected
from asgi_guard.fastapi import bulkhead, rejection_handler

from .asgi_driver import Driven, drive, http_scope, until

pytestmark = pytest.mark.anyio


def make_app(guard: Any, *, shedder: bool = False) -> tuple[FastAPI, dict[str, Any]]:
    state: dict[str, Any] = {"open": anyio.Event(), "inside": 0, "order": []}
    app = FastAPI()
    app.add_exception_handler(RequestRejected, rejection_handler)

    @app.get("/report/{name}", dependencies=[Depends(guard)])
    async def report(name: str) -> dict[str, str]:
        state["order"].append(name)
        state["inside"] += 1
        try:
            await state["open"].wait()
        finally:
            state["inside"] -= 1
        return {"name": name}

    @app.get("/export", dependencies=[Depends(guard)])
    async def export() -> dict[str, str]:
        return {"ok": "yes"}

    @app.get("/free")
    async def free() -> dict[str, str]:
        return {"ok": "yes"}

    if shedder:
        app.add_middleware(
            LoadSheddingMiddleware,
            limit=100,
            priority={"/report/batch": "sheddable", "/report/pay": "critical"},
        )
    return app, state


async def test_past_the_limit_the_route_answers_503_problem_json() -> None:
    """bulkhead(1): while one request runs, another on the same route gets a 503
    temporary-reduced-capacity with Retry-After; routes without it are untouched."""
    app, state = make_app(bulkhead(1))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        results: dict[str, httpx.Response] = {}

        async def get(path: str) -> None:
            results[path] = await client.get(path)

        async with anyio.create_task_group() as group:
            group.start_soon(get, "/report/a")
            await until(lambda: state["inside"] == 1)
            refused = await client.get("/report/b")
            assert (await client.get("/free")).status_code == 200
            state["open"].set()
    assert refused.status_code == 503, refused.text
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.headers["retry-after"] in ("1", "2")
    assert refused.json()["type"].endswith("#temporary-reduced-capacity")
    assert results["/report/a"].status_code == 200


async def test_a_queue_lets_requests_wait_for_a_place() -> None:
    """bulkhead(1, max_queue=2): three at once are all served, one at a time, in order."""
    guard = bulkhead(1, max_queue=2, queue_timeout=2.0)
    app, state = make_app(guard)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        results: dict[str, httpx.Response] = {}

        async def get(path: str) -> None:
            results[path] = await client.get(path)

        async with anyio.create_task_group() as group:
            for name in ("a", "b", "c"):
                group.start_soon(get, f"/report/{name}")
                await until(lambda: state["inside"] + guard.limiter.queued >= len(results) + 1)
                await anyio.sleep(0.005)
            assert state["inside"] == 1
            assert guard.limiter.queued == 2
            state["open"].set()
    assert [results[f"/report/{n}"].status_code for n in "abc"] == [200, 200, 200]
    assert state["order"] == ["a", "b", "c"]
    assert guard.limiter.inflight == 0


async def test_one_bulkhead_object_is_one_limit_across_routes() -> None:
    """The same object on two routes: a request on one takes the place of the other."""
    app, state = make_app(bulkhead(1))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        async with anyio.create_task_group() as group:
            group.start_soon(client.get, "/report/a")
            await until(lambda: state["inside"] == 1)
            assert (await client.get("/export")).status_code == 503
            state["open"].set()
        assert (await client.get("/export")).status_code == 200


async def test_the_classes_of_the_shedding_middleware_order_the_queue() -> None:
    """Behind LoadSheddingMiddleware, a bulkhead's queue serves critical before sheddable."""
    guard = bulkhead(1, max_queue=4, queue_timeout=2.0)
    app, state = make_app(guard, shedder=True)
    transport = httpx.ASGITransport(app=app)
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://t") as client,
        anyio.create_task_group() as group,
    ):
        group.start_soon(client.get, "/report/first")
        await until(lambda: state["inside"] == 1)
        group.start_soon(client.get, "/report/batch")
        await until(lambda: guard.limiter.queued == 1)
        group.start_soon(client.get, "/report/pay")
        await until(lambda: guard.limiter.queued == 2)
        state["open"].set()
    assert state["order"] == ["first", "pay", "batch"]


async def test_retry_after_is_jittered_over_whole_seconds() -> None:
    """Refused clients are told 1 or 2 seconds at random (a fixed value would bring them
    all back at once): over 100 refusals both appear, in roughly equal shares."""
    app, state = make_app(bulkhead(1))
    transport = httpx.ASGITransport(app=app)
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://t") as client,
        anyio.create_task_group() as group,
    ):
        group.start_soon(client.get, "/report/a")
        await until(lambda: state["inside"] == 1)
        told = [(await client.get("/export")).headers["retry-after"] for _ in range(100)]
        state["open"].set()
    assert set(told) == {"1", "2"}, told
    assert 20 <= told.count("1") <= 80, told  # a fair coin falls outside once in 10^9


@pytest.mark.parametrize(
    ("args", "options"),
    [
        ((0,), {}),
        ((-1,), {}),
        ((1.5,), {}),
        ((True,), {}),
        ((2,), {"max_queue": -1}),
        ((2,), {"queue_timeout": 1.0}),
        ((2,), {"max_queue": 2, "queue_timeout": 0}),
    ],
)
def test_nonsense_bulkheads_fail_at_construction(
    args: tuple[Any, ...], options: dict[str, Any]
) -> None:
    """A limit below 1, a negative queue, a queue timeout without a queue: errors."""
    with pytest.raises(ConfigurationError):
        bulkhead(*args, **options)


# -- WebSocket routes -----------------------------------------------------------------------


def ws_app(guard: Any) -> tuple[FastAPI, dict[str, Any]]:
    """A WebSocket route /ws behind ``guard``: it accepts, then stays open until the
    test sets ``state["close"]``."""
    state: dict[str, Any] = {"close": anyio.Event(), "open": 0}
    app = FastAPI()
    app.add_exception_handler(RequestRejected, rejection_handler)

    @app.websocket("/ws", dependencies=[Depends(guard)])
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        state["open"] += 1
        try:
            await state["close"].wait()
        finally:
            state["open"] -= 1
        await websocket.close()

    return app, state


def ws_scope(extensions: dict[str, Any] | None = None) -> dict[str, Any]:
    scope = {**http_scope("/ws"), "type": "websocket", "scheme": "ws", "subprotocols": []}
    scope["extensions"] = extensions or {}
    del scope["method"]
    return scope


CONNECT: list[Message | float] = [{"type": "websocket.connect"}]


async def test_a_refused_websocket_handshake_is_closed_with_1008_without_the_extension() -> None:
    """On a server without the websocket.http.response extension a handshake the bulkhead
    refuses is closed with 1008 (as the middleware and rate_limit do): never a
    websocket.http.response.start the server cannot send."""
    guard = bulkhead(1)
    app, state = ws_app(guard)
    results: dict[str, Driven] = {}
    async with anyio.create_task_group() as group:

        async def first() -> None:
            results["first"] = await drive(app, ws_scope(), CONNECT, then="wait")

        group.start_soon(first)
        await until(lambda: state["open"] == 1)
        refused = await drive(app, ws_scope(), CONNECT, then="wait")
        state["close"].set()
    assert refused.sent == [
        {"type": "websocket.close", "code": 1008, "reason": "Service Unavailable"}
    ], refused.sent
    assert guard.limiter.inflight == 0


async def test_a_refused_websocket_handshake_gets_a_503_denial_response_with_the_extension() -> (
    None
):
    """With the extension the refusal is the bulkhead's 503 problem+json."""
    app, state = ws_app(bulkhead(1))
    ext: dict[str, Any] = {"websocket.http.response": {}}
    async with anyio.create_task_group() as group:
        group.start_soon(partial(drive, app, ws_scope(ext), CONNECT, then="wait"))
        await until(lambda: state["open"] == 1)
        denied = await drive(app, ws_scope(ext), CONNECT, then="wait")
        state["close"].set()
    start = denied.sent[0]
    assert start["type"] == "websocket.http.response.start", denied.sent
    assert start["status"] == 503, start
    assert json.loads(denied.body)["type"].endswith("#temporary-reduced-capacity"), denied.body


async def test_an_accepted_websocket_holds_its_bulkhead_place_for_the_whole_session() -> None:
    """A dependency's place is held until the endpoint returns: an open session keeps it
    (the middleware, by contrast, releases at the handshake)."""
    guard = bulkhead(1)
    app, state = ws_app(guard)
    async with anyio.create_task_group() as group:
        group.start_soon(partial(drive, app, ws_scope(), CONNECT, then="wait"))
        await until(lambda: state["open"] == 1)
        assert guard.limiter.inflight == 1  # accepted, and still held
        refused = await drive(app, ws_scope(), CONNECT, then="wait")
        assert refused.sent[0]["type"] == "websocket.close", refused.sent
        state["close"].set()
    assert guard.limiter.inflight == 0
