"""Rules and exempt paths match the path as the app routes it: mounted apps and root_path."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import Depends, FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from asgi_guard import (
    Event,
    ManualClock,
    Policy,
    RateLimiter,
    RateLimitEvent,
    RateLimitMiddleware,
    Rule,
)
from asgi_guard.fastapi import rate_limit

from .asgi_driver import drive, http_scope, ok_app

pytestmark = pytest.mark.anyio


def limiter() -> RateLimiter:
    return RateLimiter(clock=ManualClock(1000.0))


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


def guarded_app(events: list[Event] | None = None) -> Starlette:
    """POST /login (1/minute by rule), GET /health (exempt), GET /items/{id} (per_path),
    anything else 100/minute."""
    app = Starlette(
        routes=[
            Route("/login", hello, methods=["POST"]),
            Route("/health", hello),
            Route("/items/{item_id}", hello),
        ]
    )
    app.add_middleware(
        RateLimitMiddleware,
        limit="100/minute",
        rules=[
            Rule("/login", limit="1/minute", methods=["POST"]),
            Rule("/items/{item_id}", limit="1/minute", per_path=True),
        ],
        exempt=["/health"],
        limiter=limiter(),
        on_event=events.append if events is not None else (),
    )
    return app


def client_for(app: Any, root_path: str = "") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=("10.0.0.1", 1), root_path=root_path)
    return httpx.AsyncClient(transport=transport, base_url="http://t")


async def check_routed_paths(client: httpx.AsyncClient, prefix: str) -> None:
    logins = [(await client.post(f"{prefix}/login")) for _ in range(2)]
    assert [r.status_code for r in logins] == [200, 429], [r.text for r in logins]
    assert logins[1].json()["violated-policies"] == ["1-per-60s"], logins[1].text
    for _ in range(3):
        health = await client.get(f"{prefix}/health")
        assert health.status_code == 200, health.text
        assert "ratelimit" not in health.headers, health.headers
    items = [(await client.get(f"{prefix}/items/{i}")).status_code for i in (1, 2, 1)]
    assert items == [200, 200, 429], items


async def test_rules_and_exemptions_apply_in_a_mounted_app() -> None:
    """A middleware of an app mounted at /v1 matches /login and /health, not /v1/...; its
    events still report the full path."""
    events: list[Event] = []
    outer = Starlette(routes=[Mount("/v1", app=guarded_app(events))])
    async with LifespanManager(outer), client_for(outer) as client:
        await check_routed_paths(client, "/v1")
    rejected = [e for e in events if isinstance(e, RateLimitEvent)][:1]
    assert [(e.path, e.route) for e in rejected] == [("/v1/login", "/login")], events


async def test_rules_and_exemptions_apply_behind_a_root_path() -> None:
    """Served with a root_path (uvicorn --root-path /api), rules see the routed path."""
    app = guarded_app()
    async with LifespanManager(app), client_for(app, root_path="/api") as client:
        await check_routed_paths(client, "/api")


async def test_a_path_outside_the_root_path_is_matched_as_it_is() -> None:
    """A server that already stripped the root_path from the path: the path is used as is."""
    app = RateLimitMiddleware(
        ok_app, rules=[Rule("/login", limit="1/minute")], exempt=["/health"], limiter=limiter()
    )
    scope = {**http_scope("/login"), "root_path": "/api"}
    first, second = await drive(app, dict(scope)), await drive(app, dict(scope))
    assert (first.status, second.status) == (200, 429)
    health = await drive(app, {**http_scope("/health"), "root_path": "/api"})
    assert "ratelimit" not in health.headers, health.headers


async def test_the_root_path_itself_is_the_route_slash() -> None:
    """A request for the root_path alone is routed as "/" and matches a rule for "/"."""
    app = RateLimitMiddleware(ok_app, rules=[Rule("/", limit="1/minute")], limiter=limiter())
    scope = {**http_scope("/api"), "root_path": "/api"}
    first, second = await drive(app, dict(scope)), await drive(app, dict(scope))
    assert (first.status, second.status) == (200, 429)


async def test_dependency_counts_per_route_in_a_mounted_app_behind_a_root_path() -> None:
    """The rate_limit dependency in a mounted FastAPI app served with a root_path counts
    its route, and a named policy shared with the sub-app's middleware counts once."""
    shared = limiter()
    policy = Policy("2/minute", name="shared")
    sub = FastAPI()

    @sub.get("/items/{item_id}", dependencies=[Depends(rate_limit("3/minute", limiter=shared))])
    async def item(item_id: int) -> int:
        return item_id

    @sub.get("/named", dependencies=[Depends(rate_limit(policy, limiter=shared))])
    async def named() -> str:
        return "named"

    sub.add_middleware(RateLimitMiddleware, limiter=shared, rules=[Rule("/named", limit=policy)])
    outer = FastAPI()
    outer.mount("/v1", sub)
    async with LifespanManager(outer), client_for(outer, root_path="/api") as client:
        items = [(await client.get(f"/api/v1/items/{i}")).status_code for i in range(4)]
        named_codes = [(await client.get("/api/v1/named")).status_code for _ in range(3)]
    assert items == [200, 200, 200, 429], items
    assert named_codes == [200, 200, 429], named_codes
