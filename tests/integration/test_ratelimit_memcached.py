"""RateLimitMiddleware counting in a real memcached.

limits' async memcached client runs on asyncio only, so these tests run on asyncio.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

import anyio
import httpx
import pytest
from fastapi import Depends, FastAPI
from starlette.types import ASGIApp

from asgi_guard import (
    ConfigurationError,
    ManualClock,
    Policy,
    RateLimiter,
    RateLimitMiddleware,
    RequestRejected,
    Rule,
    header_key,
)
from asgi_guard._policy import Strategy
from asgi_guard.fastapi import rate_limit, rejection_handler

from ..asgi_driver import ok_app
from .servers import MemcachedServer, ask

pytestmark = [pytest.mark.anyio, pytest.mark.memcached]


@pytest.fixture
def anyio_backend() -> str:
    # The remote storages (limits' async memcached client) run on asyncio only.
    return "asyncio"


def client_for(app: ASGIApp) -> httpx.AsyncClient:
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


#: What the scenarios below check: a scenario's statuses, and the storage errors it met.
Outcome = tuple[list[int], int]
Scenario = Callable[[RateLimiter], Awaitable[Outcome]]


async def in_memory_and_memcached(scenario: Scenario, memcached_url: str) -> list[int]:
    """Run ``scenario`` on a memory limiter and on memcached; both must give the same
    statuses, with no storage error. Returns the statuses."""
    memory = await scenario(RateLimiter(clock=ManualClock(1000.0)))
    limiter = RateLimiter(memcached_url, timeout=2.0)
    try:
        remote = await scenario(limiter)
    finally:
        await limiter.aclose()
    assert remote == memory, (remote, memory)
    assert remote[1] == 0, remote
    return remote[0]


async def test_memcached_counts_a_rule_with_methods(memcached_url: str) -> None:
    """A Rule with methods= (its namespace has a space) counts on memcached as in memory."""

    async def scenario(limiter: RateLimiter) -> Outcome:
        rule = Rule("/login", limit="2/minute", methods=["POST"])
        app = RateLimitMiddleware(ok_app, rules=[rule], limiter=limiter)
        async with client_for(app) as client:
            codes = [(await client.post("/login")).status_code for _ in range(4)]
        return codes, app.stats["storage_errors"]

    assert await in_memory_and_memcached(scenario, memcached_url) == [200, 200, 429, 429]


async def test_memcached_counts_a_dependency_on_a_templated_route(memcached_url: str) -> None:
    """A rate_limit dependency on /items/{i} (namespace 'route:GET /items/{i}') counts on
    memcached as in memory."""

    async def scenario(limiter: RateLimiter) -> Outcome:
        dep = rate_limit("2/minute", limiter=limiter)
        app = FastAPI()
        app.add_exception_handler(RequestRejected, rejection_handler)

        @app.get("/items/{i}", dependencies=[Depends(dep)])
        async def item(i: int) -> int:
            return i

        async with client_for(app) as client:
            codes = [(await client.get(p)).status_code for p in ["/items/1"] * 3 + ["/items/2"]]
        return codes, dep.stats["storage_errors"]

    assert await in_memory_and_memcached(scenario, memcached_url) == [200, 200, 429, 429]


async def test_memcached_counts_per_path(memcached_url: str) -> None:
    """per_path=True (a NUL byte in the key, and a space in one path) counts each path
    apart on memcached as in memory."""

    async def scenario(limiter: RateLimiter) -> Outcome:
        rule = Rule("/reports/{name}", limit="2/minute", per_path=True)
        app = RateLimitMiddleware(ok_app, rules=[rule], limiter=limiter)
        async with client_for(app) as client:
            paths = ["/reports/a"] * 3 + ["/reports/a%20b"] * 3
            codes = [(await client.get(p)).status_code for p in paths]
        return codes, app.stats["storage_errors"]

    expected = [200, 200, 429] * 2
    assert await in_memory_and_memcached(scenario, memcached_url) == expected


async def test_memcached_counts_keys_a_client_chooses(memcached_url: str) -> None:
    """header_key values with a space, non-ASCII characters or 240 characters count on
    memcached as in memory; two long keys that differ in their last character count apart."""
    values = [b"a b", b"\xe9t\xe9", b"k" * 239 + b"1", b"k" * 239 + b"2", b"plain"]

    async def scenario(limiter: RateLimiter) -> Outcome:
        app = RateLimitMiddleware(
            ok_app, limit="2/minute", key=header_key("x-api-key"), limiter=limiter
        )
        codes: list[int] = []
        async with client_for(app) as client:
            for value in values:
                for _ in range(3):
                    r = await client.get("/", headers=[(b"x-api-key", value)])
                    codes.append(r.status_code)
        return codes, app.stats["storage_errors"]

    expected = [200, 200, 429] * len(values)
    assert await in_memory_and_memcached(scenario, memcached_url) == expected


async def test_a_path_cannot_send_memcached_commands(memcached_server: MemcachedServer) -> None:
    """A CR LF in a per_path key is not a line break in memcached's protocol: a path that
    spells 'flush_all' on a line of its own flushes nothing (it flushed everything)."""
    memcached_server.flush()
    assert ask(memcached_server.port, b"set canary 0 0 2\r\nhi\r\n") == b"STORED\r\n"
    rule = Rule("/reports/{name}", limit="2/minute", per_path=True)
    limiter = RateLimiter(memcached_server.url, timeout=2.0)
    app = RateLimitMiddleware(ok_app, rules=[rule], limiter=limiter)
    async with client_for(app) as client:
        path = "/reports/x%0D%0Aflush_all%0D%0Aget"
        codes = [(await client.get(path)).status_code for _ in range(3)]
    await limiter.aclose()
    assert b"VALUE canary" in ask(memcached_server.port, b"get canary\r\n")
    assert codes == [200, 200, 429], app.stats
    assert app.stats["storage_errors"] == 0, app.stats


async def test_namespaces_and_keys_with_slashes_count_apart(memcached_url: str) -> None:
    """Namespace 'a/b' with key 'c' and namespace 'a' with key 'b/c' are two counters
    (limits joins them with '/', so they were one)."""
    limiter = RateLimiter(memcached_url, timeout=2.0)
    policy = Policy("1/minute")
    first = await limiter.hit(policy, "c", namespace="a/b")
    second = await limiter.hit(policy, "b/c", namespace="a")
    await limiter.aclose()
    assert (first.allowed, first.storage_error) == (True, False), first
    assert (second.allowed, second.storage_error) == (True, False), second


@pytest.mark.parametrize("strategy", ["fixed-window", "sliding-window-counter"])
async def test_the_longest_namespace_and_key_kept_fit_in_memcached(
    memcached_url: str, strategy: Strategy
) -> None:
    """A namespace and a key of 100 characters each (the most kept before a digest), under
    a limit with many digits and a one-second window, still make a key memcached accepts."""
    limiter = RateLimiter(memcached_url, timeout=2.0)
    policy = Policy("1000000000/1 second", strategy=strategy)
    decision = await limiter.hit(policy, "k" * 100, namespace="n" * 100)
    await limiter.aclose()
    assert (decision.allowed, decision.storage_error) == (True, False), decision
