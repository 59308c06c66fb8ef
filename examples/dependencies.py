"""The ``rate_limit`` dependency: per route, per router and per app, after routing."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, FastAPI, Request, Response

from asgi_guard import Policy, RateLimitExceeded, RequestRejected, header_key
from asgi_guard.fastapi import rate_limit, rejection_handler

logger = logging.getLogger("example")

# Per app: every route gets 100 per minute per client, each route counted apart.
app = FastAPI(dependencies=[Depends(rate_limit("100/minute"))])
# Without this handler FastAPI answers {"detail": "Too Many Requests"}, same status and headers.
app.add_exception_handler(RequestRejected, rejection_handler)


# A handler of your own for 429s only: RateLimitExceeded says which policies refused.
async def log_and_reject(request: Request, exc: Exception) -> Response:
    if isinstance(exc, RateLimitExceeded):
        logger.info("429 on %s by %s", request.url.path, ", ".join(exc.violated_policies))
    return await rejection_handler(request, exc)


app.add_exception_handler(RateLimitExceeded, log_and_reject)

# Per router: a named policy in one dependency is one quota for all the router's routes.
reports = APIRouter(
    prefix="/reports",
    dependencies=[Depends(rate_limit(Policy("10/minute", name="reports")))],
)


@reports.get("/daily")
async def daily() -> dict[str, str]:
    return {"report": "daily"}


@reports.get("/monthly")
async def monthly() -> dict[str, str]:
    return {"report": "monthly"}


app.include_router(reports)


# Per route, counted per API key; the handler keeps its own signature.
@app.get("/search", dependencies=[Depends(rate_limit("5/minute", key=header_key("x-api-key")))])
async def search(q: str = "") -> dict[str, str]:
    return {"q": q}
