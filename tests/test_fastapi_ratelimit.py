"""The rate_limit FastAPI dependency: per route, router and app, with and without middleware."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import APIRouter, Depends, FastAPI, WebSocket

from asgi_guard import (
    QUOTA_EXCEEDED,
    ConfigurationError,
    Event,
    ManualClock,
    Policy,
    RateLimiter,
    RateLimitEvent,
    RateLimitMiddleware,
    RequestRejected,
    header_key,
)
from asgi_guard.fastapi import RateLimitDependency, rate_limit, rejection_handler

from .asgi_driver import drive, http_scope

pytestmark = pytest.mark.anyio


def limiter() -> RateLimiter:
    return RateLimiter(clock=ManualClock(1000.0))


def client_for(app: FastAPI, ip: str = "10.0.0.1") -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, client=(ip, 1)), base_url="http://t"
    )


async def codes(client: httpx.AsyncClient, *paths: str) -> list[int]:
    return [(await client.get(p)).status_code for p in paths]


def behind_middleware(route_limit: str, **middleware: Any) -> FastAPI:
    """An app whose GET /x has a named ``route`` policy, behind a RateLimitMiddleware; both
    share one limiter."""
    shared = limiter()
    app = FastAPI()
    app.add_exception_handler(RequestRejected, rejection_handler)
    dep = rate_limit(Policy(route_limit, name="route"), limiter=shared)

    @app.get("/x", dependencies=[Depends(dep)])
    async def x() -> str:
        return "x"

    app.add_middleware(RateLimitMiddleware, limiter=shared, **middleware)
    return app


async def test_per_route_limit_counts_the_template_not_the_path() -> None:
    """Unnamed limits count per route: /users/1 and /users/2 share the /users/{id} quota."""
    app = FastAPI()
    dep = rate_limit("2/minute", limiter=limiter())

    @app.get("/users/{user_id}", dependencies=[Depends(dep)])
    async def user(user_id: int) -> dict[str, int]:
        return {"id": user_id}

    @app.get("/teams/{team_id}", dependencies=[Depends(dep)])
    async def team(team_id: int) -> dict[str, int]:
        return {"id": team_id}

    async with client_for(app) as client:
        assert await codes(client, "/users/1", "/users/2", "/users/3") == [200, 200, 429]
        assert await codes(client, "/teams/1", "/teams/2", "/teams/3") == [200, 200, 429]
        r = await client.get("/users/9")
    assert r.status_code == 429
    assert "retry-after" in r.headers
    assert r.headers["ratelimit"].endswith("r=0;t=20"), r.headers


async def test_named_policy_is_shared_by_routes_and_router_and_app_dependencies() -> None:
    """A named policy in a router dependency is one quota for every route of the router."""
    shared = rate_limit(Policy("3/minute", name="api"), limiter=limiter())
    router = APIRouter(dependencies=[Depends(shared)])

    @router.get("/a")
    async def a() -> str:
        return "a"

    @router.get("/b")
    async def b() -> str:
        return "b"

    app = FastAPI(dependencies=[Depends(rate_limit("100/minute", limiter=limiter()))])
    app.include_router(router)
    async with client_for(app) as client:
        assert await codes(client, "/a", "/b", "/a", "/b") == [200, 200, 200, 429]


async def test_headers_without_middleware_are_set_on_the_response() -> None:
    """Alone, the dependency sets RateLimit headers on the response FastAPI builds."""
    app = FastAPI()

    @app.get(
        "/x",
        dependencies=[
            Depends(rate_limit(Policy("5/minute", name="x"), limiter=limiter(), headers="both"))
        ],
    )
    async def x() -> dict[str, str]:
        return {"ok": "yes"}

    async with client_for(app) as client:
        r = await client.get("/x")
    assert r.status_code == 200, r.text
    assert r.headers["ratelimit-policy"] == '"x";q=5;w=60'
    assert r.headers["ratelimit"] == '"x";r=4;t=20'
    assert r.headers["x-ratelimit-remaining"] == "4"


async def test_headers_merge_with_the_middleware_and_limiter_is_shared() -> None:
    """Behind the middleware, one RateLimit header lists the app's and the route's quotas."""
    app = behind_middleware("2/minute", limit=Policy("10/minute", name="app"))
    async with client_for(app) as client:
        r = await client.get("/x")
        assert r.headers["ratelimit-policy"] == '"app";q=10;w=60, "route";q=2;w=60', r.headers
        assert r.headers["ratelimit"] == '"app";r=9;t=20, "route";r=1;t=20', r.headers
        assert await codes(client, "/x", "/x") == [200, 429]


async def test_exceeded_is_an_http_exception_and_the_handler_renders_problem_json() -> None:
    """Without a handler FastAPI answers 429 {detail}; with it, problem+json naming the policy."""
    for install in (False, True):
        app = FastAPI()
        if install:
            app.add_exception_handler(RequestRejected, rejection_handler)

        @app.post(
            "/login",
            dependencies=[Depends(rate_limit(Policy("1/minute", name="login"), limiter=limiter()))],
        )
        async def login() -> dict[str, bool]:
            return {"ok": True}

        async with LifespanManager(app), client_for(app, "10.20.30.40") as client:
            assert (await client.post("/login")).status_code == 200
            r = await client.post("/login")
        assert r.status_code == 429, r.text
        assert r.headers["retry-after"] == "20"  # windows are aligned: 1000 s -> 1020 s
        assert "10.20.30.40" not in r.text
        if install:
            assert r.headers["content-type"] == "application/problem+json"
            assert r.json()["type"] == QUOTA_EXCEEDED
            assert r.json()["violated-policies"] == ["login"]
        else:
            assert r.json() == {"detail": "Too Many Requests"}


async def test_custom_key_gets_the_request_mapping() -> None:
    """Scope key functions such as header_key work on the Request the dependency passes."""
    app = FastAPI()

    @app.get(
        "/k",
        dependencies=[
            Depends(rate_limit("1/minute", key=header_key("x-api-key"), limiter=limiter()))
        ],
    )
    async def k() -> str:
        return "k"

    async with client_for(app) as client:
        assert (await client.get("/k", headers={"x-api-key": "A"})).status_code == 200
        assert (await client.get("/k", headers={"x-api-key": "A"})).status_code == 429
        assert (await client.get("/k", headers={"x-api-key": "B"})).status_code == 200


async def test_dependency_exposes_stats() -> None:
    """The dependency counts what it allowed and rejected."""
    dep = rate_limit("1/minute", limiter=limiter())
    assert isinstance(dep, RateLimitDependency)
    app = FastAPI()

    @app.get("/s", dependencies=[Depends(dep)])
    async def s() -> str:
        return "s"

    async with client_for(app) as client:
        await codes(client, "/s", "/s", "/s")
    assert (dep.stats["allowed"], dep.stats["rejected"]) == (1, 2)


async def test_429_behind_the_middleware_has_one_merged_ratelimit_line() -> None:
    """A dependency's 429 behind the middleware carries one RateLimit line with both quotas."""
    app = behind_middleware("1/minute", limit=Policy("10/minute", name="app"))
    async with client_for(app) as client:
        await client.get("/x")
        r = await client.get("/x")
    assert r.status_code == 429, r.text
    assert r.headers.get_list("ratelimit") == ['"app";r=8;t=20, "route";r=0;t=20'], r.headers
    assert r.headers.get_list("ratelimit-policy") == ['"app";q=10;w=60, "route";q=1;w=60']
    assert r.json()["violated-policies"] == ["route"]


async def test_storage_failure_with_deny_is_a_503_problem(anyio_backend: str) -> None:
    """A failing storage with on_storage_error='deny' answers 503 problem+json, never a 500."""
    if anyio_backend == "trio":
        pytest.skip("remote storages run on asyncio only")
    dead = RateLimiter("redis://127.0.0.1:1", timeout=0.2)
    app = FastAPI()
    app.add_exception_handler(RequestRejected, rejection_handler)

    @app.get(
        "/deny",
        dependencies=[
            Depends(rate_limit(Policy("5/minute", on_storage_error="deny"), limiter=dead))
        ],
    )
    async def deny() -> str:
        return "never"

    @app.get("/allow", dependencies=[Depends(rate_limit(Policy("5/minute"), limiter=dead))])
    async def allow() -> str:
        return "open"

    async with client_for(app) as client:
        denied = await client.get("/deny")
        allowed = await client.get("/allow")
    assert denied.status_code == 503, denied.text
    assert denied.headers["content-type"] == "application/problem+json"
    assert denied.json()["type"].endswith("#temporary-reduced-capacity")
    assert denied.headers["retry-after"] == "1"
    assert allowed.status_code == 200, allowed.text


async def test_dependency_fields_survive_a_middleware_without_ietf_headers() -> None:
    """Behind a middleware with headers='none', the dependency sets its own RateLimit fields."""
    app = behind_middleware("2/minute", limit="10/minute", headers="none")
    async with client_for(app) as client:
        r = await client.get("/x")
    assert r.headers.get_list("ratelimit") == ['"route";r=1;t=20'], r.headers
    assert r.headers.get_list("ratelimit-policy") == ['"route";q=2;w=60'], r.headers


class CopyScope:
    """A middleware that hands the app a copy of the scope (as some wrappers do)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(dict(scope), receive, send)


def stacked(inner: dict[str, Any], outer: dict[str, Any], *, copy_between: bool) -> FastAPI:
    """GET /x with a 2/minute ``route`` dependency, behind two RateLimitMiddlewares (and,
    if asked, a scope-copying middleware between them); all share one limiter."""
    shared = limiter()
    app = FastAPI()
    app.add_exception_handler(RequestRejected, rejection_handler)
    dep = rate_limit(Policy("2/minute", name="route"), limiter=shared)

    @app.get("/x", dependencies=[Depends(dep)])
    async def x() -> str:
        return "x"

    app.add_middleware(RateLimitMiddleware, limiter=shared, **inner)
    if copy_between:
        app.add_middleware(CopyScope)
    app.add_middleware(RateLimitMiddleware, limiter=shared, **outer)
    return app


@pytest.mark.parametrize("copy_between", [False, True])
async def test_stacked_middlewares_merge_the_dependency_once_in_the_outer(
    copy_between: bool,
) -> None:
    """Two IETF middlewares: the route's entry joins the outer one's line, once, even when a
    middleware between them copies the scope; the 429 too."""
    app = stacked(
        {"limit": Policy("5/minute", name="inner")},
        {"limit": Policy("10/minute", name="outer")},
        copy_between=copy_between,
    )
    async with client_for(app) as client:
        r = await client.get("/x")
        await client.get("/x")
        refused = await client.get("/x")
    assert r.headers.get_list("ratelimit") == [
        '"inner";r=4;t=20',
        '"outer";r=9;t=20, "route";r=1;t=20',
    ], r.headers
    assert r.headers.get_list("ratelimit-policy") == [
        '"inner";q=5;w=60',
        '"outer";q=10;w=60, "route";q=2;w=60',
    ], r.headers
    assert refused.status_code == 429, refused.text
    assert refused.headers.get_list("ratelimit") == [
        '"inner";r=2;t=20',
        '"outer";r=7;t=20, "route";r=0;t=20',
    ], refused.headers


async def test_an_outer_legacy_middleware_leaves_the_merging_to_the_inner_ietf_one() -> None:
    """Outer legacy headers, inner IETF: the inner one merges the route's entry."""
    app = stacked(
        {"limit": Policy("5/minute", name="inner")},
        {"limit": Policy("10/minute", name="outer"), "headers": "legacy"},
        copy_between=False,
    )
    async with client_for(app) as client:
        r = await client.get("/x")
    assert r.headers.get_list("ratelimit") == ['"inner";r=4;t=20, "route";r=1;t=20'], r.headers
    assert r.headers["x-ratelimit-remaining"] == "9", r.headers


@pytest.mark.parametrize("bad", [None, "", [], "often"])
def test_rate_limit_without_a_valid_limit_fails_at_construction(bad: Any) -> None:
    """rate_limit() with no limit or a malformed one raises ConfigurationError at once."""
    with pytest.raises(ConfigurationError):
        rate_limit(bad)


async def test_dependency_rejections_are_events() -> None:
    """The dependency reports its 429s to on_event, like the middleware."""
    events: list[Any] = []
    app = FastAPI()

    @app.get(
        "/e",
        dependencies=[Depends(rate_limit("1/minute", limiter=limiter(), on_event=events.append))],
    )
    async def e() -> str:
        return "e"

    async with client_for(app) as client:
        await codes(client, "/e", "/e")
    assert [(ev.kind, ev.path, ev.route) for ev in events] == [("rejected", "/e", "/e")], events


async def test_two_dependencies_on_one_route_count_apart_and_mounts_stay_bounded() -> None:
    """Router- and route-level unnamed limits on one route are two quotas; a mount with a
    parameter does not create a plan per concrete prefix."""
    from starlette.routing import Mount

    shared = limiter()
    router = APIRouter(dependencies=[Depends(rate_limit("4/minute", limiter=shared))])
    dep = rate_limit("4/minute", limiter=shared)

    @router.get("/x", dependencies=[Depends(dep)])
    async def x() -> str:
        return "x"

    app = FastAPI()
    app.include_router(router)
    outer = FastAPI(routes=[Mount("/t/{tenant}", app=app)])
    async with client_for(outer) as client:
        got = [(await client.get(f"/t/{i}/x")).status_code for i in range(5)]
    assert got == [200, 200, 200, 200, 429], got
    assert len(dep._plans) == 1, dep._plans


async def test_dependency_request_costing_more_than_the_quota_has_no_retry_after() -> None:
    """The dependency's 429 for a request that can never pass carries no Retry-After."""
    app = FastAPI()
    app.add_exception_handler(RequestRejected, rejection_handler)

    @app.get(
        "/big", dependencies=[Depends(rate_limit(Policy("2/minute", cost=3), limiter=limiter()))]
    )
    async def big() -> str:
        return "big"

    async with client_for(app) as client:
        r = await client.get("/big")
    assert r.status_code == 429, r.text
    assert "retry-after" not in r.headers, r.headers
    assert "cannot be admitted" in r.json()["detail"], r.text


# -- WebSocket routes -------------------------------------------------------------------


def ws_app(dependency: RateLimitDependency) -> FastAPI:
    """A FastAPI app whose app-level dependencies hold ``dependency``, with GET / and a
    WebSocket route /ws."""
    app = FastAPI(dependencies=[Depends(dependency)])
    app.add_exception_handler(RequestRejected, rejection_handler)

    @app.get("/")
    async def index() -> str:
        return "index"

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("hi")
        await websocket.close()

    return app


def ws_scope(extensions: dict[str, Any] | None = None) -> dict[str, Any]:
    scope = {**http_scope("/ws"), "type": "websocket", "scheme": "ws", "subprotocols": []}
    scope["extensions"] = extensions or {}
    del scope["method"]
    return scope


async def test_an_app_wide_dependency_limits_websocket_handshakes_with_close_1008() -> None:
    """On an app with WebSocket routes the dependency counts handshakes (no TypeError) and
    closes a refused one with 1008 when the server has no denial extension."""
    app = ws_app(rate_limit("2/minute", limiter=limiter()))
    connect = [{"type": "websocket.connect"}]
    async with LifespanManager(app):
        first = await drive(app, ws_scope(), connect, then="wait")
        second = await drive(app, ws_scope(), connect, then="wait")
        third = await drive(app, ws_scope(), connect, then="wait")
        async with client_for(app) as client:
            index = await client.get("/")
    assert [m["type"] for m in first.sent] == [
        "websocket.accept",
        "websocket.send",
        "websocket.close",
    ]
    assert second.sent[0]["type"] == "websocket.accept", second.sent
    assert third.sent == [{"type": "websocket.close", "code": 1008, "reason": "Too Many Requests"}]
    assert index.status_code == 200, index.text


async def test_a_refused_handshake_gets_a_429_denial_response_when_supported() -> None:
    """With the websocket.http.response extension a refused handshake is denied with the
    dependency's 429 problem+json and its Retry-After, as the middleware does."""
    app = ws_app(rate_limit(Policy("1/minute", name="ws"), limiter=limiter()))
    connect = [{"type": "websocket.connect"}]
    ext: dict[str, Any] = {"websocket.http.response": {}}
    async with LifespanManager(app):
        await drive(app, ws_scope(ext), connect, then="wait")
        denied = await drive(app, ws_scope(ext), connect, then="wait")
    start = denied.sent[0]
    assert start["type"] == "websocket.http.response.start", denied.sent
    assert start["status"] == 429, start
    assert denied.headers["retry-after"] == "20", denied.headers
    assert json.loads(denied.body)["violated-policies"] == ["ws"], denied.body


# -- a middleware and a dependency on one response ---------------------------------------


async def test_legacy_headers_of_middleware_and_dependency_are_one_set_the_tightest() -> None:
    """headers='legacy' on both: one X-RateLimit-* set, for the tightest of their quotas;
    the dependency's 429 too."""
    shared = limiter()
    app = FastAPI()
    app.add_exception_handler(RequestRejected, rejection_handler)

    @app.get("/x", dependencies=[Depends(rate_limit("2/minute", limiter=shared, headers="legacy"))])
    async def x() -> str:
        return "x"

    app.add_middleware(RateLimitMiddleware, limiter=shared, limit="5/minute", headers="legacy")
    async with client_for(app) as client:
        first = await client.get("/x")
        second = await client.get("/x")
        refused = await client.get("/x")
    for r, remaining in ((first, "1"), (second, "0"), (refused, "0")):
        assert r.headers.get_list("x-ratelimit-limit") == ["2"], r.headers
        assert r.headers.get_list("x-ratelimit-remaining") == [remaining], r.headers
        assert r.headers.get_list("x-ratelimit-reset") == ["20"], r.headers
    assert refused.status_code == 429, refused.text


async def test_legacy_headers_follow_the_middleware_when_its_quota_is_tighter() -> None:
    """With headers='both' on both, the legacy set is the middleware's when it has less left,
    and the IETF lists hold both quotas."""
    shared = limiter()
    app = FastAPI()

    @app.get("/x", dependencies=[Depends(rate_limit("10/minute", limiter=shared, headers="both"))])
    async def x() -> str:
        return "x"

    app.add_middleware(RateLimitMiddleware, limiter=shared, limit="3/minute", headers="both")
    async with client_for(app) as client:
        r = await client.get("/x")
    assert r.headers.get_list("x-ratelimit-limit") == ["3"], r.headers
    assert r.headers.get_list("x-ratelimit-remaining") == ["2"], r.headers
    assert r.headers.get_list("ratelimit") == ['"3-per-60s";r=2;t=20, "10-per-60s";r=9;t=20']


async def test_a_dependency_behind_an_ietf_middleware_sets_its_own_legacy_headers() -> None:
    """A legacy dependency behind an IETF-only middleware: its legacy set, once, and no
    IETF entry of its own."""
    shared = limiter()
    app = FastAPI()

    @app.get("/x", dependencies=[Depends(rate_limit("2/minute", limiter=shared, headers="legacy"))])
    async def x() -> str:
        return "x"

    app.add_middleware(RateLimitMiddleware, limiter=shared, limit="5/minute")
    async with client_for(app) as client:
        r = await client.get("/x")
    assert r.headers.get_list("x-ratelimit-remaining") == ["1"], r.headers
    assert r.headers.get_list("ratelimit") == ['"5-per-60s";r=4;t=20'], r.headers


async def test_a_named_policy_shared_by_middleware_and_dependency_counts_once() -> None:
    """A named policy on the middleware and on a route, one limiter: each request counts
    once and the policy is listed once; another key counts apart."""
    shared = limiter()
    policy = Policy("3/minute", name="shared")
    app = FastAPI()
    app.add_exception_handler(RequestRejected, rejection_handler)

    @app.get("/x", dependencies=[Depends(rate_limit(policy, limiter=shared))])
    async def x() -> str:
        return "x"

    @app.get("/y", dependencies=[Depends(rate_limit([policy, "1/minute"], limiter=shared))])
    async def y() -> str:
        return "y"

    app.add_middleware(RateLimitMiddleware, limiter=shared, limit=policy)
    async with client_for(app) as client:
        first = await client.get("/x")
        second = await client.get("/y")
        assert await codes(client, "/x", "/x") == [200, 429]
    async with client_for(app, "10.0.0.2") as client:
        other = await client.get("/x")
    assert first.headers.get_list("ratelimit") == ['"shared";r=2;t=20'], first.headers
    assert first.headers.get_list("ratelimit-policy") == ['"shared";q=3;w=60'], first.headers
    assert second.headers.get_list("ratelimit") == ['"shared";r=1;t=20, "1-per-60s";r=0;t=20']
    assert second.headers.get_list("ratelimit-policy") == [
        '"shared";q=3;w=60, "1-per-60s";q=1;w=60'
    ], second.headers
    assert other.status_code == 200, other.text


async def test_a_shared_dry_run_policy_is_reported_once_per_request() -> None:
    """A dry-run named policy on the middleware and on a route, one limiter: over its
    limit, a request is reported once (the dependency does not decide it again), and
    nothing is refused."""
    shared = limiter()
    policy = Policy("1/minute", name="trial", dry_run=True)
    events: list[Event] = []
    app = FastAPI()

    @app.get(
        "/x", dependencies=[Depends(rate_limit(policy, limiter=shared, on_event=events.append))]
    )
    async def x() -> str:
        return "x"

    app.add_middleware(RateLimitMiddleware, limiter=shared, limit=policy, on_event=events.append)
    async with client_for(app) as client:
        assert await codes(client, "/x", "/x", "/x") == [200, 200, 200]
    assert [e.kind for e in events] == ["dry_run", "dry_run"], events


async def test_a_named_policy_on_a_router_and_a_route_counts_once_per_request() -> None:
    """Two dependency objects with one named policy and one limiter (router and route):
    a request counts once; a dependency with another key function counts apart."""
    shared = limiter()
    policy = Policy("2/minute", name="api")
    router = APIRouter(dependencies=[Depends(rate_limit(policy, limiter=shared))])

    @router.get("/x", dependencies=[Depends(rate_limit(policy, limiter=shared))])
    async def x() -> str:
        return "x"

    @router.get(
        "/k",
        dependencies=[Depends(rate_limit(policy, limiter=shared, key=header_key("x-api-key")))],
    )
    async def k() -> str:
        return "k"

    app = FastAPI()
    app.include_router(router)
    async with client_for(app) as client:
        assert await codes(client, "/x", "/x", "/x") == [200, 200, 429]
    async with client_for(app, "10.0.0.3") as client:
        keyed = await client.get("/k", headers={"x-api-key": "A"})
    assert keyed.headers["ratelimit"] == '"api";r=1;t=20, "api";r=1;t=20', keyed.headers


async def test_a_dependencys_429_keeps_the_entries_of_dependencies_before_it() -> None:
    """Without a middleware, an app's and a route's dependencies: the route's 429 lists the
    app's quota too, as the 200s before it did (FastAPI drops the response they were on)."""
    app = FastAPI(dependencies=[Depends(rate_limit("100/minute", limiter=limiter()))])
    app.add_exception_handler(RequestRejected, rejection_handler)

    @app.get("/x", dependencies=[Depends(rate_limit("1/minute", limiter=limiter()))])
    async def x() -> str:
        return "x"

    async with client_for(app) as client:
        admitted = await client.get("/x")
        refused = await client.get("/x")
    assert admitted.headers.get_list("ratelimit-policy") == [
        '"100-per-60s";q=100;w=60, "1-per-60s";q=1;w=60'
    ], admitted.headers
    assert refused.status_code == 429, refused.text
    assert refused.headers.get_list("ratelimit-policy") == [
        '"100-per-60s";q=100;w=60, "1-per-60s";q=1;w=60'
    ], refused.headers
    assert refused.headers.get_list("ratelimit") == [
        '"100-per-60s";r=98;t=20, "1-per-60s";r=0;t=20'
    ], refused.headers


async def test_a_router_included_under_two_prefixes_counts_each_apart() -> None:
    """On a router included at /v1 and /v2, each inclusion is a route of its own, named
    with its prefix (FastAPI includes routers lazily: the route in the scope is the
    router's own, whose template has no prefix)."""
    events: list[Event] = []
    router = APIRouter(
        dependencies=[Depends(rate_limit("2/minute", limiter=limiter(), on_event=events.append))]
    )

    @router.get("/items")
    async def items() -> str:
        return "items"

    app = FastAPI()
    app.add_exception_handler(RequestRejected, rejection_handler)
    app.include_router(router, prefix="/v1")
    app.include_router(router, prefix="/v2")
    async with client_for(app) as client:
        assert await codes(client, "/v1/items", "/v1/items", "/v2/items") == [200, 200, 200]
        assert await codes(client, "/v2/items", "/v2/items", "/v1/items") == [200, 429, 429]
    assert [(e.route, e.path) for e in events if isinstance(e, RateLimitEvent)] == [
        ("/v2/items", "/v2/items"),
        ("/v1/items", "/v1/items"),
    ]


async def test_legacy_headers_of_two_dependencies_show_the_tightest() -> None:
    """Without a middleware, two dependencies with legacy headers: the X-RateLimit-* set
    is the quota with the fewest requests left, whichever dependency runs last."""
    shared = limiter()
    app = FastAPI(dependencies=[Depends(rate_limit("3/minute", limiter=shared, headers="both"))])

    @app.get("/x", dependencies=[Depends(rate_limit("100/minute", limiter=shared, headers="both"))])
    async def x() -> str:
        return "x"

    @app.get("/y", dependencies=[Depends(rate_limit("1/minute", limiter=shared, headers="legacy"))])
    async def y() -> str:
        return "y"

    async with client_for(app) as client:
        for left in (2, 1):
            response = await client.get("/x")
            assert response.headers["x-ratelimit-limit"] == "3"
            assert response.headers["x-ratelimit-remaining"] == str(left)
        response = await client.get("/y")  # the route's own quota is the tighter one
        assert response.headers["x-ratelimit-limit"] == "1"
        assert response.headers["x-ratelimit-remaining"] == "0"


async def test_two_routes_named_alike_on_a_remote_limiter_are_warned_about(
    caplog: pytest.LogCaptureFixture, anyio_backend: str
) -> None:
    """Two mounted apps with the same route under unnamed limits of one remote limiter: their
    counters are numbered by first use, which processes may not share; a warning says so."""
    if anyio_backend == "trio":
        pytest.skip("remote storages run on asyncio only")
    shared = RateLimiter(storage="redis://127.0.0.1:1", timeout=0.05)
    app = FastAPI()
    for prefix in ("/v1", "/v2"):
        sub = FastAPI()

        @sub.get("/items", dependencies=[Depends(rate_limit("2/minute", limiter=shared))])
        async def items() -> str:
            return "items"

        app.mount(prefix, sub)
    with caplog.at_level("WARNING", logger="asgi_guard"):
        async with client_for(app) as client:
            # Nothing listens there: the storage fails and the requests are allowed.
            assert await codes(client, "/v1/items", "/v2/items", "/v2/items") == [200] * 3
    warnings = [r.getMessage() for r in caplog.records if "numbered" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "'route:GET /items'" in warnings[0]


async def test_a_dependency_kept_in_a_variable_can_be_overridden_in_tests() -> None:
    """docs/fastapi.md: app.dependency_overrides[dep] = lambda: None lifts the limit."""
    search_limit = rate_limit("1/minute", limiter=limiter())
    app = FastAPI()

    @app.get("/search", dependencies=[Depends(search_limit)])
    async def search() -> str:
        return "found"

    async with client_for(app) as client:
        assert await codes(client, "/search", "/search") == [200, 429]
        app.dependency_overrides[search_limit] = lambda: None
        assert await codes(client, "/search", "/search") == [200, 200]


async def test_a_route_keeps_its_counter_when_its_router_gets_a_new_route() -> None:
    """FastAPI builds its records of included routes anew when the router's routes change;
    the route's plan (and its counter) stays."""
    dep = rate_limit("2/minute", limiter=limiter())
    router = APIRouter(dependencies=[Depends(dep)])

    @router.get("/items")
    async def items() -> str:
        return "items"

    app = FastAPI()
    app.include_router(router, prefix="/v1")
    async with client_for(app) as client:
        assert await codes(client, "/v1/items", "/v1/items") == [200, 200]

        @router.get("/other")
        async def other() -> str:
            return "other"

        assert await codes(client, "/v1/items", "/v1/other") == [429, 200]
    assert len(dep._plans) == 2


async def test_two_dependencies_of_one_route_on_a_remote_limiter_are_not_warned_about(
    caplog: pytest.LogCaptureFixture, anyio_backend: str
) -> None:
    """The app's and the route's unnamed limits on one route: numbered in the order they
    run, which is the same in every process, so no warning."""
    if anyio_backend == "trio":
        pytest.skip("remote storages run on asyncio only")
    shared = RateLimiter(storage="redis://127.0.0.1:1", timeout=0.05)
    app = FastAPI(dependencies=[Depends(rate_limit("10/minute", limiter=shared))])

    @app.get("/x", dependencies=[Depends(rate_limit("5/minute", limiter=shared))])
    async def x() -> str:
        return "x"

    with caplog.at_level("WARNING", logger="asgi_guard"):
        async with client_for(app) as client:
            assert await codes(client, "/x", "/x") == [200, 200]
    assert not [r for r in caplog.records if "numbered" in r.getMessage()]
