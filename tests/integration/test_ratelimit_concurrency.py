"""Concurrency: 1,000 simultaneous requests on one key with a limit of 100 admit exactly 100."""

from __future__ import annotations

from typing import get_args

import anyio
import anyio.lowlevel
import httpx
import pytest
from starlette.types import Scope

from asgi_guard import ManualClock, Policy, RateLimiter, RateLimitMiddleware
from asgi_guard._policy import Strategy

from ..asgi_driver import ok_app

pytestmark = pytest.mark.anyio

STRATEGIES: tuple[Strategy, ...] = get_args(Strategy)
REQUESTS = 1000
LIMIT = 100


async def burst(app: RateLimitMiddleware, requests: int = REQUESTS) -> list[int]:
    """Send ``requests`` requests at once from one client; return their status codes."""
    transport = httpx.ASGITransport(app=app, client=("192.0.2.7", 1234))
    statuses: list[int] = []
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:

        async def one() -> None:
            statuses.append((await client.get("/")).status_code)

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for _ in range(requests):
                    tg.start_soon(one)
    return statuses


def assert_exactly_the_limit(statuses: list[int], app: RateLimitMiddleware) -> None:
    counts = {code: statuses.count(code) for code in sorted(set(statuses))}
    assert counts == {200: LIMIT, 429: REQUESTS - LIMIT}, (counts, app.stats)
    assert app.stats["storage_errors"] == 0, app.stats


def frozen_time() -> RateLimiter:
    """A memory limiter whose clock stands still: no window can end during the burst."""
    return RateLimiter(clock=ManualClock(1000.0))


async def delayed_key(scope: Scope) -> str:
    await anyio.lowlevel.checkpoint()
    return "client"


async def other_delayed_key(scope: Scope) -> str:
    await anyio.lowlevel.checkpoint()
    return "client"


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_memory_burst_admits_exactly_the_limit(strategy: Strategy) -> None:
    """In memory, every strategy admits exactly 100 of 1,000 simultaneous requests."""
    app = RateLimitMiddleware(
        ok_app, limit=Policy(f"{LIMIT}/minute", strategy=strategy), limiter=frozen_time()
    )
    assert_exactly_the_limit(await burst(app), app)


async def test_memory_burst_with_async_key_admits_exactly_the_limit() -> None:
    """An async key function (the general path, which awaits) keeps the count exact."""
    app = RateLimitMiddleware(
        ok_app, limit=f"{LIMIT}/minute", key=delayed_key, limiter=frozen_time()
    )
    assert_exactly_the_limit(await burst(app), app)


async def test_memory_burst_with_two_policies_admits_exactly_the_limit() -> None:
    """Two policies with async keys: the tighter one still admits exactly 100."""
    app = RateLimitMiddleware(
        ok_app,
        limit=[
            Policy(f"{LIMIT}/minute", name="tight", key=delayed_key),
            Policy(f"{REQUESTS * 10}/minute", name="loose", key=other_delayed_key),
        ],
        limiter=frozen_time(),
    )
    assert_exactly_the_limit(await burst(app), app)


@pytest.mark.redis
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # remote storages run on asyncio only
@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_redis_burst_admits_exactly_the_limit(redis_url: str, strategy: Strategy) -> None:
    """On a real Redis, 1,000 simultaneous requests never get more than 100 through: exactly 100
    with the scripted strategies."""
    # Calls waiting their turn on the event loop are not timed, but a stall of the loop itself
    # (a long GC pause under 1,000 tasks) can exceed the default 50 ms and make the calls in
    # flight fail open, by design. This test is about exactness: a timeout no stall reaches,
    # and a period no burst outlasts (at 100/minute a token bucket refills one every 0.6 s:
    # a burst that slow on a loaded machine rightly admitted 101).
    limiter = RateLimiter(redis_url, timeout=1.0)
    app = RateLimitMiddleware(
        ok_app, limit=Policy(f"{LIMIT}/hour", strategy=strategy), limiter=limiter
    )
    try:
        statuses = await burst(app)
    finally:
        await limiter.aclose()
    if strategy in ("fixed-window", "token-bucket"):  # our own atomic scripts: exact
        assert_exactly_the_limit(statuses, app)
        return
    # limits' moving window and sliding window counter never admit more than the limit;
    # through httpx, about one run in ten the moving window admits 98 or 99 (not seen when
    # the app is driven directly). Recorded as an open finding; the bound is what is promised.
    admitted = statuses.count(200)
    assert LIMIT - 3 <= admitted <= LIMIT, (admitted, app.stats)
    assert statuses.count(429) == REQUESTS - admitted
    assert app.stats["storage_errors"] == 0, app.stats
