"""Your own rejection response, and a callback that sees every rate-limit decision event."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping

from fastapi import FastAPI
from starlette.responses import JSONResponse, Response
from starlette.types import Scope

from asgi_guard import (
    QUOTA_EXCEEDED,
    TEMPORARY_REDUCED_CAPACITY,
    Event,
    EventHandler,
    RateLimitEvent,
    RateLimitMiddleware,
    Rejection,
)

logger = logging.getLogger("myapp.ratelimit")

HINTS: Mapping[str, str] = {
    QUOTA_EXCEEDED: "Slow down: see https://example.com/docs/rate-limits",
    TEMPORARY_REDUCED_CAPACITY: "We are short of capacity, please retry in a moment.",
}


def rejection_response(scope: Scope, rejection: Rejection) -> Response:
    """Build the rejection: keep the problem+json members and headers, add a hint.

    ``rejection.problem()`` has ``type``, ``title``, ``status``, ``detail`` and the
    extensions (``violated-policies`` for a 429); ``rejection.headers`` has ``Retry-After``
    and the RateLimit fields. It may also be an async function; it returns any ASGI app.
    """
    body = {**rejection.problem(), "hint": HINTS.get(rejection.type, "")}
    return JSONResponse(
        body,
        status_code=rejection.status,
        headers=dict(rejection.headers),
        media_type="application/problem+json",
    )


# --8<-- [start:events]
class RejectionMetrics:
    """An ``on_event`` callback that counts rejections per policy, e.g. for a metrics exporter.

    Callbacks run inline on every reported decision: keep them fast. An exception in one is
    logged once and never affects the request.
    """

    def __init__(self) -> None:
        self.rejected: Counter[str] = Counter()
        self.dry_run: Counter[str] = Counter()

    def __call__(self, event: Event) -> None:
        if isinstance(event, RateLimitEvent):
            counter = self.dry_run if event.kind == "dry_run" else self.rejected
            counter.update(event.policies)
            logger.info("%s %s %s by %s", event.kind, event.method, event.path, event.policies)


metrics = RejectionMetrics()
on_event: EventHandler = metrics
# --8<-- [end:events]

app = FastAPI()
app.add_middleware(
    RateLimitMiddleware,
    limit="3/minute",
    response=rejection_response,
    on_event=on_event,
)


@app.get("/")
async def index() -> dict[str, str]:
    return {"page": "index"}
