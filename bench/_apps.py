"""Tiny apps for ``ratelimit_wrk.py``: the same app bare and behind ``RateLimitMiddleware``.

uvicorn imports them as ``bench._apps:<name>`` (run from the project root). The limit is far
above what a benchmark sends, so every request is counted and none is rejected.
``toggled`` and ``toggled_fastapi`` serve the bare app, the app with a pass-through
middleware and the guarded app in one process, behind a switch (``_toggle.Switched``), for
``ratelimit_toggle.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse as FastAPIPlainText
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from asgi_guard import Policy, RateLimitMiddleware

if TYPE_CHECKING:  # mypy reads bench/ as top-level modules, as the scripts import them
    from _asgi import PassThrough
    from _toggle import Switched, answer_lifespan
else:  # uvicorn imports this module as bench.<name>
    from ._asgi import PassThrough
    from ._toggle import Switched, answer_lifespan

LIMIT = Policy("1000000000/hour", name="default")


async def _home(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def _starlette(guarded: bool, passing: bool = False) -> Starlette:
    """The tiny app, behind the guard (``guarded``) or a pass-through middleware (``passing``)."""
    middleware = [Middleware(RateLimitMiddleware, limit=LIMIT, headers="ietf")] if guarded else []
    if passing and not guarded:
        middleware = [Middleware(PassThrough)]
    return Starlette(routes=[Route("/", _home)], middleware=middleware)


def _fastapi(guarded: bool, passing: bool = False) -> FastAPI:
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/", response_class=FastAPIPlainText)
    async def home() -> str:
        return "ok"

    if guarded:
        app.add_middleware(RateLimitMiddleware, limit=LIMIT, headers="ietf")
    elif passing:
        app.add_middleware(PassThrough)
    return app


async def raw(scope: Scope, receive: Receive, send: Send) -> None:
    """A raw ASGI app: the floor, where a middleware's share of the work is largest."""
    if scope["type"] == "lifespan":
        await answer_lifespan(receive, send)
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")],
        }
    )
    await send({"type": "http.response.body", "body": b"ok"})


async def _raw_static_headers(scope: Scope, receive: Receive, send: Send) -> None:
    """The raw app answering with two fixed headers as long as the guard's."""
    if scope["type"] == "lifespan":
        await raw(scope, receive, send)
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/plain"),
                (b"content-length", b"2"),
                (b"ratelimit-policy", b'"default";q=1000000000;w=3600'),
                (b"ratelimit", b'"default";r=999999999;t=3600'),
            ],
        }
    )
    await send({"type": "http.response.body", "body": b"ok"})


SPIN = 100


def spin(n: int = SPIN) -> int:
    """Plain Python busy work (~1.5 µs for 100 rounds on a 2024 server core, in a hot loop)."""
    total = 0
    for i in range(n):
        total += i
    return total


async def _raw_spin(scope: Scope, receive: Receive, send: Send) -> None:
    """The raw app after a fixed bit of busy work: what any per-request CPU costs end to end."""
    if scope["type"] == "http":
        spin()
    await raw(scope, receive, send)


bare = _starlette(False)
guarded = _starlette(True)
fastapi_bare = _fastapi(False)
fastapi_guarded = _fastapi(True)
raw_bare = raw
raw_guarded = RateLimitMiddleware(raw, limit=LIMIT, headers="ietf")
raw_guarded_no_headers = RateLimitMiddleware(raw, limit=LIMIT, headers="none")
raw_passthrough = PassThrough(raw)
raw_static_headers = _raw_static_headers
raw_spin = _raw_spin


async def _home_with_headers(request: Request) -> PlainTextResponse:
    """``_home`` answering with two fields as long as the guard's (what serialising them
    costs the framework and the server, without the guard)."""
    return PlainTextResponse("ok", headers=_STATIC_FIELDS)


_STATIC_FIELDS = {
    "ratelimit-policy": '"default";q=1000000000;w=3600',
    "ratelimit": '"default";r=999999999;t=3600',
}
toggled = Switched(
    {
        "bare": bare,
        "pass": _starlette(False, True),
        "guarded": guarded,
        # Parts of the guarded mode's cost, for ``ratelimit_toggle.py --versus``:
        "no_headers": Starlette(
            routes=[Route("/", _home)],
            middleware=[Middleware(RateLimitMiddleware, limit=LIMIT, headers="none")],
        ),
        "app_headers": Starlette(routes=[Route("/", _home_with_headers)]),
    },
    "bare",
)
toggled_fastapi = Switched(
    {"bare": fastapi_bare, "pass": _fastapi(False, True), "guarded": fastapi_guarded}, "bare"
)
