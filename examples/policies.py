"""Policies: several limits, named policies shared by routes, strategies, cost and dry run."""

from __future__ import annotations

from fastapi import Depends, FastAPI
from starlette.types import Scope

from asgi_guard import Policy, RateLimitMiddleware, Rule
from asgi_guard.fastapi import RateLimitDependency, rate_limit

# Two limits in one policy: short bursts and the hourly total. In the headers its quotas are
# named "api-10-per-1s" and "api-1000-per-3600s".
api = Policy("10/second;1000/hour", name="api")

# Shadow mode: a stricter limit we are considering. Requests over it are logged and counted
# (on_event callbacks get a "dry_run" event), never rejected, and it stays out of the headers.
candidate = Policy("3/minute", name="candidate", strategy="moving-window", dry_run=True)

# A token bucket (GCRA): refills one request per second and lets 5 arrive at once.
uploads = Policy("60/minute", name="uploads", strategy="token-bucket", burst=5)


def export_cost(scope: Scope) -> int:
    """A CSV export costs 5 units of the quota, anything else 1 (may also be async)."""
    return 5 if b"format=csv" in scope.get("query_string", b"") else 1


# A sliding window counter smooths the edge between two windows.
exports = Policy("20/minute", name="exports", strategy="sliding-window-counter", cost=export_cost)

# A named policy counts once for every route that uses it: build the dependency once and
# attach it to both routes, so /search and /suggest draw from one quota of 5 per minute.
search = Policy("5/minute", name="search")
search_limit: RateLimitDependency = rate_limit(search)

app = FastAPI()
app.add_middleware(
    RateLimitMiddleware,
    limit=[api, candidate],
    rules=[
        Rule("/uploads", limit=uploads, methods=["POST"]),
        Rule("/exports", limit=exports),
    ],
)


@app.get("/")
async def index() -> dict[str, str]:
    return {"page": "index"}


@app.post("/uploads")
async def upload() -> dict[str, bool]:
    return {"stored": True}


@app.get("/exports")
async def export(format: str = "json") -> dict[str, str]:
    return {"format": format}


@app.get("/search", dependencies=[Depends(search_limit)])
async def search_items(q: str = "") -> dict[str, str]:
    return {"q": q}


@app.get("/suggest", dependencies=[Depends(search_limit)])
async def suggest(q: str = "") -> dict[str, str]:
    return {"q": q}
