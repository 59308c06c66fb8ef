"""RateLimitMiddleware counting in a real memcached.

limits' async memcached client runs on asyncio only, so these tests run on asyncio.
"""

from __future__ import annotations

import re

import anyio
import httpx
import pytest

from asgi_guard import ConfigurationError, Policy, RateLimiter, RateLimitMiddleware
from asgi_guard._policy import Strategy

from ..asgi_driver import ok_app

pytestmark = [pytest.mark.anyio, pytest.mark.memcached]


@pytest.fixture
def anyio_backend() -> str:
    # The remote storages (limits' async memcached client) run on asyncio only.
    return "asyncio"


def client_for(app: RateLimitMiddleware) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=("192.0.2.7", 1234))
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


async def test_memcached_admits_exactly_the_limit(memcached_url: str) -> None:
    """A fixed window on memcached admits exactly 5 of 8 requests, RateLimit counting down."""
    # The fixed window on memcached starts at the first hit (the key's expiry), so no window
    # boundary can fall inside the test; limits' memcached sliding window is clock-aligned.
    policy = Policy("5/minute", name="api")
    # Up to 2 s a call: a call past the 50 ms default would be let through, uncounted.
    limiter = RateLimiter(memcached_url, timeout=2.0)
    app = RateLimitMiddleware(ok_app, limit=policy, limiter=limiter)
    async with client_for(app) as client:
        responses = [await client.get("/") for _ in range(8)]
    summary = [(r.status_code, r.headers.get("ratelimit")) for r in responses]
    assert [r.status_code for r in responses] == [200] * 5 + [429] * 3, summary
    remaining = [int(re.findall(r";r=(\d+)", r.headers["ratelimit"])[0]) for r in responses]
    assert remaining == [4, 3, 2, 1, 0, 0, 0, 0], summary
    for r in responses[5:]:
        assert r.json()["violated-policies"] == ["api"], r.text
        assert int(r.headers["retry-after"]) >= 1, r.headers
    assert app.stats["storage_errors"] == 0, app.stats


async def test_memcached_burst_admits_exactly_the_limit(memcached_url: str) -> None:
    """The fixed window on memcached admits exactly 100 of 1,000 simultaneous requests."""
    limiter = RateLimiter(memcached_url, timeout=1.0)  # exactness, not timeouts (see Redis)
    app = RateLimitMiddleware(ok_app, limit="100/minute", limiter=limiter)
    statuses: list[int] = []
    async with client_for(app) as client:

        async def one() -> None:
            statuses.append((await client.get("/")).status_code)

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for _ in range(1000):
                    tg.start_soon(one)
    await limiter.aclose()
    assert (statuses.count(200), statuses.count(429)) == (100, 900), app.stats


@pytest.mark.parametrize("strategy", ["moving-window", "token-bucket"])
def test_unsupported_strategy_fails_at_construction(strategy: Strategy) -> None:
    """Memcached cannot run a moving window or the token bucket: ConfigurationError up front."""
    # Building the storage does not connect, so this needs no server.
    with pytest.raises(ConfigurationError, match=strategy):
        RateLimitMiddleware(
            ok_app, limit=Policy("5/minute", strategy=strategy), storage="memcached://127.0.0.1:1"
        )
