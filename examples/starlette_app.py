"""Without FastAPI: a Starlette app, and a bare ASGI callable wrapped by the middleware."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from asgi_guard import RateLimitMiddleware, Rule


async def homepage(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


async def login(request: Request) -> PlainTextResponse:
    return PlainTextResponse("welcome")


# Starlette: in middleware=[...] the first entry is the outermost.
app = Starlette(
    routes=[Route("/", homepage), Route("/login", login, methods=["POST"])],
    middleware=[
        Middleware(
            RateLimitMiddleware,
            limit="10/minute",
            rules=[Rule("/login", limit="3/minute", methods=["POST"])],
        ),
    ],
)


async def plain_asgi(scope: Scope, receive: Receive, send: Send) -> None:
    """Any ASGI callable, no framework at all (lifespan messages pass the middleware)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"plain ASGI"})


# Wrap it directly: RateLimitMiddleware is itself an ASGI app (serve it with
# `uvicorn --app-dir examples starlette_app:asgi_app`). websocket=False leaves WebSockets alone.
asgi_app = RateLimitMiddleware(plain_asgi, limit="10/minute", headers="legacy", websocket=False)
