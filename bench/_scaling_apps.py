"""Tiny Starlette apps for ``ratelimit_scaling_server.py``, their stores filled before serving.

uvicorn imports them as ``bench._scaling_apps:<name>`` (run from the project root):

* ``bare``: the app alone, the control;
* ``fixed_window`` and ``token_bucket``: the same app in ``RateLimitMiddleware`` with one
  policy (``BENCH_LIMIT``, ``1000000000/hour`` by default, far above what a benchmark sends),
  keyed on ``header_key("x-api-key")``, in a ``RateLimiter(max_keys=None)`` of its own.

At startup (in the app's lifespan, so before uvicorn opens its port) a guarded app calls its
own middleware with ``BENCH_KEYS`` http scopes carrying ``x-api-key: <i>`` for i in
``range(BENCH_KEYS)``: the key function builds from them the same key strings as from the
requests wrk will send. The scopes are built in batches, so that the resident set after
startup holds the store and not a million spent scopes. Startup fails unless every fill
request was allowed and the store then holds exactly ``BENCH_KEYS`` keys.

``GET /_stats`` (exempt from the limit) returns the store's key count, the middleware's
``stats`` and the fill time as JSON.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from asgi_guard import Policy, RateLimiter, RateLimitMiddleware, header_key
from asgi_guard._policy import Strategy

KEYS = int(os.environ.get("BENCH_KEYS", "0"))
LIMIT = os.environ.get("BENCH_LIMIT", "1000000000/hour")
HEADER = "x-api-key"
STATS_PATH = "/_stats"
_BATCH = 10_000


async def _home(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def _ok(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def fill_scope(i: int) -> Scope:
    """The scope uvicorn would build for ``GET /`` with ``x-api-key: <i>`` from wrk."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 40000),
        "scheme": "http",
        "method": "GET",
        "root_path": "",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (HEADER.encode(), str(i).encode()),
        ],
        "state": {},
    }


class _Filler:
    """Sends ``n`` requests through the middleware and checks that each was answered 200."""

    def __init__(self) -> None:
        self.statuses: dict[int, int] = {}

    async def receive(self) -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            status = int(message["status"])
            self.statuses[status] = self.statuses.get(status, 0) + 1

    async def fill(self, app: ASGIApp, n: int) -> None:
        for start in range(0, n, _BATCH):
            scopes = [fill_scope(i) for i in range(start, min(n, start + _BATCH))]
            for scope in scopes:
                await app(scope, self.receive, self.send)
            del scopes


class _BenchApp:
    """The Starlette app, optionally in the middleware, with its fill and its stats."""

    def __init__(self, strategy: Strategy | None) -> None:
        self.fill_seconds = 0.0
        self.guard: RateLimitMiddleware | None = None
        self.starlette = Starlette(
            routes=[Route("/", _home), Route(STATS_PATH, self._stats)],
            lifespan=self._lifespan,
        )
        self.app: ASGIApp = self.starlette
        if strategy is not None:
            self.guard = RateLimitMiddleware(
                self.starlette,
                limit=Policy(LIMIT, name="api", strategy=strategy),
                key=header_key(HEADER),
                limiter=RateLimiter(max_keys=None),
                exempt=[STATS_PATH],
            )
            self.app = self.guard

    async def _stats(self, request: Request) -> JSONResponse:
        body: dict[str, Any] = {"pid": os.getpid(), "fill_seconds": self.fill_seconds}
        if self.guard is not None:
            body["keys"] = self.guard.limiter.keys
            body.update(self.guard.stats)
        return JSONResponse(body)

    @asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        if self.guard is not None and KEYS:
            t0 = time.perf_counter()
            filler = _Filler()
            # The middleware itself fills its store, in front of a raw app for speed (the
            # Starlette app would triple the time and change nothing in the store).
            self.guard.app = _ok
            try:
                await filler.fill(self.guard, KEYS)
            finally:
                self.guard.app = self.starlette
            gc.collect()
            self.fill_seconds = time.perf_counter() - t0
            keys, allowed = self.guard.limiter.keys, self.guard.stats["allowed"]
            if filler.statuses != {200: KEYS} or keys != KEYS or allowed != KEYS:
                raise RuntimeError(
                    f"filling {KEYS} keys: statuses {filler.statuses}, {keys} keys in the "
                    f"store, {allowed} requests allowed"
                )
        yield


bare = _BenchApp(None).app
fixed_window = _BenchApp("fixed-window").app
token_bucket = _BenchApp("token-bucket").app
