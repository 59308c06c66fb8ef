"""Apps for ``timeout_accuracy.py`` and ``timeout_leaks.py``, served by uvicorn or hypercorn.

The servers import them as ``bench._timeout_apps:<name>`` (run from the project root).

``accuracy``: a FastAPI app behind ``TimeoutMiddleware(timeout=5, max_timeout=5)`` whose
routes sleep past 100 ms, 1 s and 5 s deadlines (the tighter two set with the
``asgi_guard.fastapi.timeout`` dependency), one of them a sync ``def``; ``/_stats`` (exempt)
returns the middleware's counters, how late the keeper fired each deadline and how late
each 504 left the app (noted by an outermost middleware).

``recipe_*``: one small Starlette app (a sync ``def`` endpoint, a slow stream, a response
with a slow background task) behind each of the usual timeout recipes, and behind
``TimeoutMiddleware``, all with a 100 ms deadline.

``leaks``: a Starlette app behind ``TimeoutMiddleware(timeout=0.02)`` with a ``/_debug``
(exempt) reporting the server process's tasks, threads, RSS and the keeper's heap.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from pathlib import Path
from typing import Any

import anyio
from fastapi import Depends, FastAPI
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from asgi_guard import TimeoutEvent, TimeoutMiddleware
from asgi_guard.fastapi import timeout

#: The deadline every recipe app enforces.
RECIPE_DEADLINE = 0.1
#: What the slow endpoints of the recipe apps take.
SYNC_SLEEP = 1.0
STREAM_CHUNKS = 10
STREAM_GAP = 0.05
STREAM_CHUNK = b"0123456789abcdef\n"
BACKGROUND_SLEEP = 0.3


# -- accuracy -------------------------------------------------------------------------------


class SendClock:
    """Outermost: notes when each 504 leaves the app, in seconds after the deadline.

    The deadline is the last part of the path (``/async/0.1``: 100 ms), counted from the
    request's arrival here (a few µs before the guard notes it).
    """

    def __init__(self, app: ASGIApp, late: list[list[Any]]) -> None:
        self.app = app
        self.late = late

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        arrival = time.monotonic()
        path = scope["path"]

        async def clocked_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 504:
                deadline = float(path.rsplit("/", 1)[1])
                self.late.append([path, (time.monotonic() - arrival - deadline) * 1e3])
            await send(message)

        await self.app(scope, receive, clocked_send)


def _accuracy() -> ASGIApp:
    events: list[TimeoutEvent] = []
    sent: list[list[Any]] = []
    api = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    guard = TimeoutMiddleware(
        api, timeout=5.0, max_timeout=5.0, exempt=["/_stats"], on_event=events.append
    )

    @api.get("/fast")
    async def fast() -> Response:
        return PlainTextResponse("ok")

    @api.get("/async/0.1", dependencies=[Depends(timeout(0.1))])
    async def async_100ms() -> Response:
        await anyio.sleep(1.0)
        return PlainTextResponse("late")

    @api.get("/async/1", dependencies=[Depends(timeout(1.0))])
    async def async_1s() -> Response:
        await anyio.sleep(3.0)
        return PlainTextResponse("late")

    @api.get("/async/5")  # the middleware's own 5 s
    async def async_5s() -> Response:
        await anyio.sleep(10.0)
        return PlainTextResponse("late")

    @api.get("/sync/0.1", dependencies=[Depends(timeout(0.1))])
    def sync_100ms() -> Response:
        time.sleep(0.3)
        return PlainTextResponse("late")

    @api.get("/_stats")
    async def stats() -> Response:
        """The counters, and the keeper's lateness per deadline event since the last call."""
        late = [[e.path, (e.elapsed - e.timeout) * 1e3] for e in events if e.kind == "deadline"]
        kinds = sorted({e.kind for e in events})
        events.clear()
        body = {"stats": guard.stats, "late_ms": late, "sent_ms": sent[:], "kinds": kinds}
        sent.clear()
        return JSONResponse(body)

    return SendClock(guard, sent)


accuracy = _accuracy()


# -- the usual recipes ----------------------------------------------------------------------


def _recipe_routes() -> Starlette:
    """The three awkward cases, plus ``/_bg``: how many background tasks started/finished."""
    background = {"started": 0, "finished": 0}

    def sync_endpoint(request: Request) -> Response:
        time.sleep(SYNC_SLEEP)
        return PlainTextResponse("late")

    async def stream_endpoint(request: Request) -> Response:
        async def chunks() -> Any:
            for _ in range(STREAM_CHUNKS):
                await anyio.sleep(STREAM_GAP)
                yield STREAM_CHUNK

        return StreamingResponse(chunks(), media_type="text/plain")

    async def slow_task() -> None:
        background["started"] += 1
        await anyio.sleep(BACKGROUND_SLEEP)
        background["finished"] += 1

    async def background_endpoint(request: Request) -> Response:
        return PlainTextResponse("ok", background=BackgroundTask(slow_task))

    async def counts(request: Request) -> Response:
        return JSONResponse(background)

    return Starlette(
        routes=[
            Route("/sync", sync_endpoint),
            Route("/stream", stream_endpoint),
            Route("/bg", background_endpoint),
            Route("/_bg", counts),
        ]
    )


class WaitForMiddleware(BaseHTTPMiddleware):
    """Recipe (a): ``asyncio.wait_for(call_next(request), timeout)`` in a BaseHTTPMiddleware."""

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        try:
            return await asyncio.wait_for(call_next(request), timeout=RECIPE_DEADLINE)
        except asyncio.TimeoutError:
            return JSONResponse({"detail": "timeout"}, status_code=504)


class MoveOnAfterMiddleware:
    """Recipe (b1): a pure ASGI middleware, ``anyio.move_on_after`` around the app, then 504."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with anyio.move_on_after(RECIPE_DEADLINE) as cancel_scope:
            await self.app(scope, receive, send)
        if cancel_scope.cancelled_caught:
            await JSONResponse({"detail": "timeout"}, status_code=504)(scope, receive, send)


class FailAfterMiddleware:
    """Recipe (b2): a pure ASGI middleware, ``anyio.fail_after`` around the app (raises)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with anyio.fail_after(RECIPE_DEADLINE):
            await self.app(scope, receive, send)


def _recipe(kind: str) -> ASGIApp:
    app = _recipe_routes()
    if kind == "wait_for":
        app.add_middleware(WaitForMiddleware)
        return app
    if kind == "move_on_after":
        return MoveOnAfterMiddleware(app)
    if kind == "fail_after":
        return FailAfterMiddleware(app)
    return TimeoutMiddleware(app, timeout=RECIPE_DEADLINE, exempt=["/_bg"])


recipe_wait_for = _recipe("wait_for")
recipe_move_on_after = _recipe("move_on_after")
recipe_fail_after = _recipe("fail_after")
recipe_asgi_guard = _recipe("asgi_guard")


# -- leaks through a real server ------------------------------------------------------------


def _rss_kib() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4
    except OSError:
        return -1


def _leaks() -> ASGIApp:
    holder: dict[str, TimeoutMiddleware] = {}

    async def slow(request: Request) -> Response:
        await anyio.sleep(1.0)
        return PlainTextResponse("late")

    def slow_sync(request: Request) -> Response:
        time.sleep(0.05)
        return PlainTextResponse("late")

    async def debug(request: Request) -> Response:
        gc.collect()
        mw = holder["mw"]
        keeper = mw._keeper
        return JSONResponse(
            {
                "tasks": len(asyncio.all_tasks()),
                "threads": threading.active_count(),
                "rss_kib": _rss_kib(),
                "heap": len(keeper._heap) if keeper is not None else None,
                "live": keeper.live if keeper is not None else None,
                "stats": mw.stats,
            }
        )

    app = Starlette(
        routes=[Route("/slow", slow), Route("/slow_sync", slow_sync), Route("/_debug", debug)]
    )
    holder["mw"] = TimeoutMiddleware(app, timeout=0.02, exempt=["/_debug"])
    return holder["mw"]


leaks = _leaks()
