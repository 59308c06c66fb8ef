"""Redis storage: one limit shared by every process, and what happens when Redis fails.

Needs ``pip install 'asgi-guard[redis]'`` and a Redis (or Valkey) server; remote storages
run on asyncio only. Nothing connects at import or construction: the middleware connects
(and checks the storage) at lifespan startup, and closes the connections at shutdown.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from asgi_guard import Event, Policy, RateLimiter, RateLimitMiddleware, Rule, StorageEvent
from asgi_guard.fastapi import rate_limit


class StorageHealth:
    """Follows the storage through the limiter's events, for a health check or a metric.

    The limiter itself logs one warning when an outage starts and one when it ends.
    """

    def __init__(self) -> None:
        self.available = True
        self.last_error = ""

    def __call__(self, event: Event) -> None:
        if isinstance(event, StorageEvent):
            self.available = event.kind == "recovered"
            self.last_error = event.error


storage_health = StorageHealth()

# One limiter for the middleware and the dependency: one connection pool, one configuration.
# A call slower than `timeout` seconds (default 0.05) counts as a storage failure.
limiter = RateLimiter(
    "redis://127.0.0.1:6379",
    timeout=0.1,
    on_event=storage_health,
)

# While Redis is unreachable, policies follow on_storage_error: "allow" (the default) lets
# requests through unlimited; "deny" answers 503 problem+json. Never a 500.
browse = Policy("100/minute", name="browse")
login_policy = Policy("5/minute", name="login", on_storage_error="deny")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    await limiter.aclose()


app = FastAPI(lifespan=lifespan)
app.add_middleware(
    RateLimitMiddleware,
    limiter=limiter,
    limit=browse,
    rules=[Rule("/login", limit=login_policy, methods=["POST"])],
    exempt=["/health"],
)


@app.get("/")
async def index() -> dict[str, str]:
    return {"page": "index"}


@app.post("/login")
async def login() -> dict[str, bool]:
    return {"logged_in": True}


@app.get("/health")
async def health() -> dict[str, str]:
    return {"rate_limit_storage": "up" if storage_health.available else "down"}


@app.get("/reports", dependencies=[Depends(rate_limit("10/minute", limiter=limiter))])
async def reports() -> dict[str, str]:
    return {"page": "reports"}


if __name__ == "__main__":
    import uvicorn

    # Start several of these (or several workers): they share the same counters in Redis.
    uvicorn.run("redis_storage:app", host="127.0.0.1", port=8000, workers=2)
