"""A load shedder's algorithm learns how fast the application serves: not from requests
that a guard inside it refused (a rate limiter's 429, a bulkhead's 503), which take no
time and would teach it a no-load latency the application never has."""

from __future__ import annotations

import anyio
import pytest
from fastapi import Depends, FastAPI, WebSocket
from starlette.types import Message

from asgi_guard import (
    Adaptive,
    LoadSheddingMiddleware,
    ManualClock,
    RateLimiter,
    RateLimitMiddleware,
    RequestRejected,
)
from asgi_guard.fastapi import rate_limit, rejection_handler

from .asgi_driver import drive, http_scope, lifespan_client
from .test_shedding import Spy

pytestmark = pytest.mark.anyio


def app_with_login_limit() -> FastAPI:
    app = FastAPI()
    app.add_exception_handler(RequestRejected, rejection_handler)

    # A manual clock: the counts must not meet a window's end mid-test.
    login_limit = rate_limit("2/minute", limiter=RateLimiter(clock=ManualClock(1000.0)))

    @app.post("/login", dependencies=[Depends(login_limit)])
    async def login() -> str:
        await anyio.sleep(0.02)
        return "welcome"

    @app.get("/w")
    async def work() -> str:
        await anyio.sleep(0.02)
        return "done"

    return app


async def test_a_dependencys_429s_teach_the_algorithm_nothing() -> None:
    """28 logins refused by the route's rate limit: the shedder still knows nothing of the
    application's speed (it learned from the two admitted, none from the 429s)."""
    algorithm = Adaptive()
    shedder = LoadSheddingMiddleware(app_with_login_limit(), limit=algorithm)
    async with lifespan_client(shedder) as http:
        codes = [(await http.post("/login")).status_code for _ in range(30)]
        assert codes == [200, 200] + [429] * 28
        assert algorithm.learning  # two samples of the five it needs
        assert shedder.limiter.counts["admitted"] == 30
        for _ in range(3):
            assert (await http.get("/w")).status_code == 200
    assert not algorithm.learning
    assert algorithm.state()["min_rtt"] >= 0.015  # the application's 20 ms, not a 429's


async def test_a_rate_limit_middleware_inside_the_shedder_teaches_it_nothing() -> None:
    """The same with RateLimitMiddleware inside the shedder (added first): its 429s are
    marked refused in the request's record."""
    algorithm = Adaptive()
    inner = RateLimitMiddleware(
        app_with_login_limit(),
        limit="1/minute",
        limiter=RateLimiter(clock=ManualClock(1000.0)),  # no window ends mid-test
    )
    shedder = LoadSheddingMiddleware(inner, limit=algorithm)
    async with lifespan_client(shedder) as http:
        codes = [(await http.get("/w")).status_code for _ in range(20)]
        assert codes == [200] + [429] * 19
        assert algorithm.learning


async def test_a_websocket_handshake_an_inner_guard_refuses_teaches_the_algorithm_nothing() -> None:
    """An inner RateLimitMiddleware closes the second handshake with 1008: the algorithm
    learns from the accepted handshake only, as over HTTP."""
    spy = Spy(10)
    app = FastAPI()

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.close()

    inner = RateLimitMiddleware(
        app, limit="1/minute", limiter=RateLimiter(clock=ManualClock(1000.0))
    )
    shedder = LoadSheddingMiddleware(inner, limit=spy)
    scope = {**http_scope("/ws"), "type": "websocket", "scheme": "ws", "subprotocols": []}
    del scope["method"]
    connect: list[Message | float] = [{"type": "websocket.connect"}]
    accepted = await drive(shedder, dict(scope), connect, then="wait")
    refused = await drive(shedder, dict(scope), connect, then="wait")
    assert accepted.sent[0]["type"] == "websocket.accept", accepted.sent
    assert refused.sent[0]["type"] == "websocket.close", refused.sent
    assert refused.sent[0]["code"] == 1008, refused.sent
    assert len(spy.samples) == 1
