"""One app for many processes: ``RateLimitMiddleware`` counting in a shared Redis.

``ASGI_GUARD_TEST_REDIS_URL`` names the Redis and ``ASGI_GUARD_TEST_LIMIT`` the limit. Every
response says which process answered, so a test can tell the servers apart.
"""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_guard import RateLimiter, RateLimitMiddleware


async def whoami(request: Request) -> PlainTextResponse:
    return PlainTextResponse(str(os.getpid()))


app = RateLimitMiddleware(
    Starlette(routes=[Route("/", whoami)]),
    limit=os.environ["ASGI_GUARD_TEST_LIMIT"],
    # A storage timeout a loaded CI machine cannot reach (the default 50 ms was, once: a
    # request then passed on the fail-open path, without its RateLimit field).
    limiter=RateLimiter(os.environ["ASGI_GUARD_TEST_REDIS_URL"], timeout=2.0),
)
