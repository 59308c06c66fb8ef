"""RateLimitMiddleware in process: decisions, headers, rules, failures, pass-through."""

from __future__ import annotations

import contextvars
import enum
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from asgi_guard import (
    QUOTA_EXCEEDED,
    ConfigurationError,
    Event,
    ManualClock,
    Policy,
    RateLimiter,
    RateLimitEvent,
    RateLimitMiddleware,
    Rejection,
    Rule,
    client_ip,
)
from asgi_guard._policy import Strategy

from .asgi_driver import drive, http_scope, ok_app

pytestmark = pytest.mark.anyio


def client_for(app: Any, ip: str = "10.0.0.1") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(ip, 1234))
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


def manual(storage_clock: ManualClock | None = None) -> RateLimiter:
    return RateLimiter(clock=storage_clock or ManualClock(1000.0))


async def statuses(client: httpx.AsyncClient, path: str, n: int, method: str = "GET") -> list[int]:
    return [(await client.request(method, path)).status_code for _ in range(n)]


# -- decisions and headers -------------------------------------------------------------


async def test_admits_the_limit_then_answers_429_problem_json() -> None:
    """The (limit+1)th request gets a 429 problem+json with the draft's type and no client IP."""
    app = RateLimitMiddleware(ok_app, limit="3/minute", limiter=manual())
    async with client_for(app, "10.9.8.7") as client:
        assert await statuses(client, "/", 3) == [200] * 3
        r = await client.get("/")
    assert r.status_code == 429, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["type"] == QUOTA_EXCEEDED
    assert body["status"] == 429
    assert body["violated-policies"] == ["3-per-60s"]
    assert "10.9.8.7" not in r.text
    assert int(r.headers["retry-after"]) >= 1


async def test_ietf_headers_are_structured_field_lists() -> None:
    """RateLimit-Policy and RateLimit follow draft-ietf-httpapi-ratelimit-headers-11."""
    clock = ManualClock(1000.0)
    app = RateLimitMiddleware(ok_app, limit="10/second;100/minute", limiter=manual(clock))
    async with client_for(app) as client:
        r = await client.get("/")
    assert r.status_code == 200, r.text
    assert r.headers["ratelimit-policy"] == '"10-per-1s";q=10;w=1, "100-per-60s";q=100;w=60'
    assert r.headers["ratelimit"] == '"10-per-1s";r=9;t=1, "100-per-60s";r=99;t=20'
    assert r.headers["x-app"] == "1"
    assert "retry-after" not in r.headers
    assert "x-ratelimit-limit" not in r.headers


async def test_several_limits_name_only_the_violated_one() -> None:
    """With two limits, the 429 names the one that was exceeded; a refused request costs nothing."""
    clock = ManualClock(0.0)
    app = RateLimitMiddleware(
        ok_app, limit=Policy("2/second;3/minute", name="api"), limiter=manual(clock)
    )
    async with client_for(app) as client:
        assert await statuses(client, "/", 3) == [200, 200, 429]
        r = await client.get("/")
        assert r.json()["violated-policies"] == ["api-2-per-1s"], r.text
        clock.advance(1.0)
        assert await statuses(client, "/", 2) == [200, 429]
        r = await client.get("/")
        assert r.json()["violated-policies"] == ["api-3-per-60s"], r.text
        assert int(r.headers["retry-after"]) == 59


async def test_legacy_both_and_no_headers() -> None:
    """headers='legacy' sends X-RateLimit-*, 'both' sends both kinds, 'none' sends neither."""
    for mode, present, absent in [
        (
            "legacy",
            ["x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"],
            ["ratelimit"],
        ),
        ("both", ["x-ratelimit-remaining", "ratelimit", "ratelimit-policy"], []),
        ("none", [], ["ratelimit", "x-ratelimit-limit"]),
    ]:
        app = RateLimitMiddleware(ok_app, limit="5/minute", headers=mode, limiter=manual())  # type: ignore[arg-type]
        async with client_for(app) as client:
            r = await client.get("/")
        for name in present:
            assert name in r.headers, (mode, r.headers)
        for name in absent:
            assert name not in r.headers, (mode, r.headers)
        if mode == "legacy":
            assert r.headers["x-ratelimit-limit"] == "5"
            assert r.headers["x-ratelimit-remaining"] == "4"


async def test_retry_after_jitter_stays_within_bounds() -> None:
    """Retry-After with jitter lies between the exact value and exact + jitter."""
    clock = ManualClock(0.0)
    app = RateLimitMiddleware(ok_app, limit="1/minute", retry_after_jitter=5, limiter=manual(clock))
    seen = set()
    async with client_for(app) as client:
        await client.get("/")
        for _ in range(40):
            r = await client.get("/")
            seen.add(int(r.headers["retry-after"]))
    assert seen <= set(range(60, 66)), seen
    assert len(seen) > 1, seen


async def test_clients_are_counted_apart() -> None:
    """Different client addresses have separate quotas."""
    app = RateLimitMiddleware(ok_app, limit="1/minute", limiter=manual())
    async with client_for(app, "10.0.0.1") as a, client_for(app, "10.0.0.2") as b:
        assert (await a.get("/")).status_code == 200
        assert (await b.get("/")).status_code == 200
        assert (await a.get("/")).status_code == 429


@pytest.mark.parametrize(
    "strategy", ["fixed-window", "moving-window", "sliding-window-counter", "token-bucket"]
)
async def test_every_strategy_limits_through_the_middleware(strategy: Strategy) -> None:
    """Each strategy admits exactly the amount at one instant and recovers with time."""
    clock = ManualClock(0.0)
    app = RateLimitMiddleware(
        ok_app, limit=Policy("4/second", strategy=strategy), limiter=manual(clock)
    )
    async with client_for(app) as client:
        assert await statuses(client, "/", 5) == [200] * 4 + [429]
        clock.advance(2.0)
        assert (await client.get("/")).status_code == 200


async def test_token_bucket_burst_is_advertised_and_enforced() -> None:
    """A token bucket with burst admits the burst at once and advertises q=burst."""
    clock = ManualClock(0.0)
    policy = Policy("60/minute", name="b", strategy="token-bucket", burst=3)
    app = RateLimitMiddleware(ok_app, limit=policy, limiter=manual(clock))
    async with client_for(app) as client:
        assert await statuses(client, "/", 4) == [200, 200, 200, 429]
        r = await client.get("/")
        assert r.headers["ratelimit-policy"] == '"b";q=3;w=3', r.headers
        clock.advance(1.0)
        assert await statuses(client, "/", 2) == [200, 429]


# -- rules, exemptions, costs ----------------------------------------------------------


async def test_rules_by_template_share_a_counter_and_per_path_separates() -> None:
    """/users/1 and /users/2 share a rule's limit; per_path=True counts each path apart."""
    app = RateLimitMiddleware(
        ok_app,
        rules=[
            Rule("/users/{user_id}", limit="2/minute"),
            Rule("/items/{item_id:int}", limit="1/minute", per_path=True),
        ],
        limiter=manual(),
    )
    async with client_for(app) as client:
        assert [
            (await client.get(p)).status_code for p in ["/users/1", "/users/2", "/users/3"]
        ] == [200, 200, 429]
        assert [
            (await client.get(p)).status_code for p in ["/items/1", "/items/2", "/items/1"]
        ] == [200, 200, 429]
        assert (await client.get("/elsewhere")).status_code == 200


async def test_rule_methods_and_default_limit() -> None:
    """A rule for POST applies to POST only; other methods get the default limit."""
    app = RateLimitMiddleware(
        ok_app,
        limit="3/minute",
        rules=[Rule("/login", limit="1/minute", methods=["POST"])],
        limiter=manual(),
    )
    async with client_for(app) as client:
        assert await statuses(client, "/login", 2, "POST") == [200, 429]
        assert await statuses(client, "/login", 4, "GET") == [200, 200, 200, 429]


async def test_named_policy_is_shared_across_rules() -> None:
    """A named Policy used by two rules is one quota for both routes."""
    shared = Policy("3/minute", name="expensive")
    app = RateLimitMiddleware(
        ok_app,
        rules=[Rule("/search", limit=shared), Rule("/export", limit=shared)],
        limiter=manual(),
    )
    async with client_for(app) as client:
        codes = [
            (await client.get(p)).status_code for p in ["/search", "/export", "/search", "/export"]
        ]
    assert codes == [200, 200, 200, 429], codes


async def test_exempt_paths_templates_predicates_and_rule_none() -> None:
    """Exact paths, templates, predicates and Rule(limit=None) are never limited."""

    def internal(scope: Scope) -> bool:
        return dict(scope["headers"]).get(b"x-internal") == b"1"

    def broken(scope: Scope) -> bool:
        raise RuntimeError("boom")

    app = RateLimitMiddleware(
        ok_app,
        limit="1/minute",
        exempt=["/health", "/static/{rest:path}", internal, broken],
        rules=[Rule("/metrics", limit=None)],
        limiter=manual(),
    )
    async with client_for(app) as client:
        for path in ["/health", "/static/a/b.css", "/metrics"]:
            assert await statuses(client, path, 3) == [200] * 3, path
        r = [(await client.get("/x", headers={"x-internal": "1"})).status_code for _ in range(3)]
        assert r == [200] * 3
        assert await statuses(client, "/x", 2) == [200, 429]


async def test_cost_int_and_sync_and_async_callables() -> None:
    """Cost may be an int or a (sync or async) function of the scope; a failing one costs 1."""

    def by_header(scope: Scope) -> int:
        return int(dict(scope["headers"]).get(b"x-cost", b"1"))

    async def async_cost(scope: Scope) -> int:
        await anyio.lowlevel.checkpoint()
        return 2

    def broken(scope: Scope) -> int:
        raise ValueError("nope")

    app = RateLimitMiddleware(
        ok_app,
        rules=[
            Rule("/int", limit=Policy("5/minute", cost=5)),
            Rule("/sync", limit=Policy("5/minute", cost=by_header)),
            Rule("/async", limit=Policy("5/minute", cost=async_cost)),
            Rule("/broken", limit=Policy("2/minute", cost=broken)),
        ],
        limiter=manual(),
    )
    async with client_for(app) as client:
        assert await statuses(client, "/int", 2) == [200, 429]
        r = await client.get("/sync", headers={"x-cost": "4"})
        assert r.headers["ratelimit"].endswith("r=1;t=60") or "r=1;" in r.headers["ratelimit"], (
            r.headers
        )
        assert (await client.get("/sync", headers={"x-cost": "2"})).status_code == 429
        assert await statuses(client, "/async", 3) == [200, 200, 429]
        assert await statuses(client, "/broken", 3) == [200, 200, 429]


# -- keys ----------------------------------------------------------------------------


async def test_failing_key_function_falls_back_to_the_peer_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A key function that raises counts the request under its socket peer; one log line."""

    def broken(scope: Scope) -> str:
        raise KeyError("no tenant")

    app = RateLimitMiddleware(ok_app, limit="2/minute", key=broken, limiter=manual())
    with caplog.at_level(logging.ERROR, logger="asgi_guard"):
        async with client_for(app, "10.5.5.5") as a, client_for(app, "10.6.6.6") as b:
            assert await statuses(a, "/", 3) == [200, 200, 429]
            assert (await b.get("/")).status_code == 200
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]


async def test_key_returning_nothing_and_async_keys() -> None:
    """A key returning None falls back to the peer; async key functions are awaited."""

    async def tenant(scope: Scope) -> str:
        await anyio.lowlevel.checkpoint()
        return str(dict(scope["headers"]).get(b"x-tenant", b"anon").decode())

    app = RateLimitMiddleware(
        ok_app,
        rules=[
            Rule("/none", limit=Policy("1/minute", key=lambda scope: None)),  # type: ignore[arg-type,return-value]
            Rule("/tenant", limit=Policy("1/minute", key=tenant)),
        ],
        limiter=manual(),
    )
    async with client_for(app, "10.0.0.1") as a, client_for(app, "10.0.0.2") as b:
        assert await statuses(a, "/none", 2) == [200, 429]
        assert (await b.get("/none")).status_code == 200
        assert (await a.get("/tenant", headers={"x-tenant": "t1"})).status_code == 200
        assert (await b.get("/tenant", headers={"x-tenant": "t1"})).status_code == 429
        assert (await b.get("/tenant", headers={"x-tenant": "t2"})).status_code == 200


async def test_a_str_subclass_key_counts_by_its_value(caplog: pytest.LogCaptureFixture) -> None:
    """A key function returning a str enum counts by the enum's string value, on the fast
    and the general path, with no error logged."""

    class Tenant(str, enum.Enum):
        A = "tenant-a"

    app = RateLimitMiddleware(
        ok_app,
        limit="1/minute",
        rules=[Rule("/slow", limit=["1/minute", "5/hour"])],
        key=lambda scope: Tenant.A,
        limiter=manual(),
    )
    with caplog.at_level(logging.ERROR, logger="asgi_guard"):
        async with client_for(app, "10.0.0.1") as a, client_for(app, "10.0.0.2") as b:
            for path in ("/", "/slow"):
                assert (await a.get(path)).status_code == 200
                assert (await b.get(path)).status_code == 429  # same tenant, another peer
    assert not caplog.records, [r.getMessage() for r in caplog.records]


async def test_an_empty_key_says_it_is_empty(caplog: pytest.LogCaptureFixture) -> None:
    """An empty key falls back to the peer, and the log line says the key was empty."""
    app = RateLimitMiddleware(ok_app, limit="1/minute", key=lambda scope: "", limiter=manual())
    with caplog.at_level(logging.ERROR, logger="asgi_guard"):
        async with client_for(app, "10.0.0.1") as a, client_for(app, "10.0.0.2") as b:
            assert (await a.get("/")).status_code == 200
            assert (await b.get("/")).status_code == 200
    assert [r.getMessage() for r in caplog.records] == [
        "a rate-limit key function returned an empty string; such requests are counted "
        "under their socket peer address"
    ]


async def test_missing_client_in_scope_is_one_shared_bucket() -> None:
    """A scope without `client` is limited under one shared key, never a crash."""
    app = RateLimitMiddleware(ok_app, limit="1/minute", key=client_ip(), limiter=manual())
    first = await drive(app, http_scope(client=None))
    second = await drive(app, http_scope(client=None))
    assert (first.status, second.status) == (200, 429)


# -- the request and response pass untouched --------------------------------------------


async def test_rejection_never_reads_the_body() -> None:
    """A refused request is answered without a single receive() call."""
    app = RateLimitMiddleware(ok_app, limit="1/minute", limiter=manual())
    await drive(app, http_scope())
    driven = await drive(
        app,
        http_scope(method="POST"),
        [{"type": "http.request", "body": b"x" * 10, "more_body": True}],
    )
    assert driven.status == 429
    assert driven.receive_calls == 0


async def test_lifespan_passes_through_untouched() -> None:
    """Lifespan messages reach the app with the original receive and send."""
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "lifespan"
        message = await receive()
        seen.append(message["type"])
        await send({"type": "lifespan.startup.complete"})

    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        sent.append(message)

    await RateLimitMiddleware(app, limit="1/minute")({"type": "lifespan"}, receive, send)
    assert seen == ["lifespan.startup"]
    assert sent == [{"type": "lifespan.startup.complete"}]


async def test_streaming_background_tasks_and_contextvars_are_untouched() -> None:
    """Streaming bodies arrive whole with headers, background tasks run, context vars flow."""
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
    ran: list[str] = []

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(3):
            yield f"chunk{i};".encode()
            await anyio.lowlevel.checkpoint()

    async def stream(request: Request) -> Response:
        return StreamingResponse(chunks(), media_type="text/plain")

    async def background(request: Request) -> Response:
        return PlainTextResponse(
            "done", background=BackgroundTask(lambda: ran.append(request_id.get()))
        )

    inner = Starlette(routes=[Route("/stream", stream), Route("/bg", background)])
    guarded = RateLimitMiddleware(inner, limit="10/minute", limiter=manual())

    async def outer(scope: Scope, receive: Receive, send: Send) -> None:
        request_id.set("req-42")
        await guarded(scope, receive, send)

    async with client_for(outer) as client:
        r = await client.get("/stream")
        assert r.text == "chunk0;chunk1;chunk2;"
        assert "ratelimit" in r.headers
        r = await client.get("/bg")
        assert r.text == "done"
    assert ran == ["req-42"]


async def test_response_headers_of_the_app_are_not_mutated() -> None:
    """The middleware adds its headers to a copy: a shared Response object stays clean."""
    shared = JSONResponse({"ok": True})
    before = list(shared.raw_headers)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await shared(scope, receive, send)

    guarded = RateLimitMiddleware(app, limit="10/minute", limiter=manual())
    async with client_for(guarded) as client:
        r = await client.get("/")
    assert "ratelimit" in r.headers
    assert shared.raw_headers == before


# -- websockets ------------------------------------------------------------------------


def ws_scope(extensions: dict[str, Any] | None = None) -> dict[str, Any]:
    scope = http_scope("/ws")
    scope.update(type="websocket", scheme="ws", extensions=extensions or {})
    del scope["method"]
    return scope


async def ws_app(scope: Scope, receive: Receive, send: Send) -> None:
    await receive()
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.close", "code": 1000})


async def test_websocket_handshakes_are_limited_with_close_1008() -> None:
    """Over the limit, a handshake is closed with 1008 when the server has no denial extension."""
    app = RateLimitMiddleware(ws_app, limit="1/minute", limiter=manual())
    connect = [{"type": "websocket.connect"}]
    first = await drive(app, ws_scope(), connect)
    second = await drive(app, ws_scope(), connect)
    assert first.sent[0]["type"] == "websocket.accept"
    assert second.sent == [{"type": "websocket.close", "code": 1008, "reason": "Too Many Requests"}]


async def test_websocket_denial_response_when_supported() -> None:
    """With the websocket.http.response extension, the handshake is denied with HTTP 429."""
    app = RateLimitMiddleware(ws_app, limit="1/minute", limiter=manual())
    connect = [{"type": "websocket.connect"}]
    ext: dict[str, Any] = {"websocket.http.response": {}}
    await drive(app, ws_scope(ext), connect)
    denied = await drive(app, ws_scope(ext), connect)
    assert denied.sent[0]["type"] == "websocket.http.response.start"
    assert denied.sent[0]["status"] == 429
    assert json.loads(denied.body)["type"] == QUOTA_EXCEEDED


async def test_websocket_passes_through_when_not_guarded() -> None:
    """websocket=False lets every handshake through untouched."""
    app = RateLimitMiddleware(ws_app, limit="1/minute", websocket=False, limiter=manual())
    for _ in range(3):
        driven = await drive(app, ws_scope(), [{"type": "websocket.connect"}])
        assert driven.sent[0]["type"] == "websocket.accept"


# -- dry run, events, custom responses ---------------------------------------------------


async def test_dry_run_rejects_nothing_but_reports(caplog: pytest.LogCaptureFixture) -> None:
    """A dry-run policy never rejects; would-be rejections are logged, counted and emitted."""
    events: list[Event] = []
    app = RateLimitMiddleware(
        ok_app,
        limit=Policy("1/minute", name="shadow", dry_run=True),
        limiter=manual(),
        on_event=events.append,
    )
    with caplog.at_level(logging.INFO, logger="asgi_guard"):
        async with client_for(app) as client:
            codes = await statuses(client, "/", 3)
            r = await client.get("/")
    assert codes == [200] * 3
    assert "ratelimit" not in r.headers
    assert app.stats["dry_run"] == 3
    assert [e.kind for e in events if isinstance(e, RateLimitEvent)] == ["dry_run"] * 3
    assert any("would be rate limited by shadow" in rec.getMessage() for rec in caplog.records)


async def test_dry_run_beside_an_enforced_policy() -> None:
    """An enforced policy still rejects while a dry-run one only reports."""
    app = RateLimitMiddleware(
        ok_app,
        limit=[Policy("3/minute", name="real"), Policy("1/minute", name="trial", dry_run=True)],
        limiter=manual(),
    )
    async with client_for(app) as client:
        assert await statuses(client, "/", 4) == [200, 200, 200, 429]
        r = await client.get("/")
    assert r.json()["violated-policies"] == ["real"]
    assert app.stats["dry_run"] >= 2


async def test_custom_response_and_events() -> None:
    """response= builds the rejection; on_event sees it; a raising callback is harmless."""
    events: list[Event] = []

    given: list[dict[str, str]] = []

    def respond(scope: Scope, rejection: Rejection) -> Response:
        given.append(dict(rejection.headers))
        return PlainTextResponse(
            f"slow down: {','.join(rejection.extensions['violated-policies'])}",
            status_code=rejection.status,
            headers=dict(rejection.headers),
        )

    def explode(event: Event) -> None:
        raise RuntimeError("callback bug")

    app = RateLimitMiddleware(
        ok_app,
        limit=Policy("1/minute", name="p"),
        response=respond,
        on_event=[events.append, explode],
        limiter=manual(),
    )
    async with client_for(app) as client:
        await client.get("/")
        r = await client.get("/x")
    assert r.status_code == 429
    assert r.text == "slow down: p"
    assert "retry-after" in r.headers
    assert "Retry-After" in given[0]  # spelt as every guard's Rejection spells it
    (event,) = events
    assert isinstance(event, RateLimitEvent)
    assert (event.kind, event.policies, event.method, event.path) == (
        "rejected",
        ("p",),
        "GET",
        "/x",
    )


# -- configuration errors --------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"limit": "ten per minute"},
        {"limit": "0/minute"},
        {"limit": ""},
        {"limit": 5},
        {"limit": Policy("1/minute", name="a"), "rules": ["/x"]},
        {"limit": "1/minute", "storage": "nosuch://host"},
        {"limit": "1/minute", "storage": "not a uri"},
        {"limit": "1/minute", "headers": "fancy"},
        {"limit": "1/minute", "retry_after_jitter": -1},
        {"limit": "1/minute", "storage": "redis://x", "limiter": RateLimiter()},
        {"limit": "1/minute", "exempt": ["health"]},
        {"limit": "1/minute", "key": "client"},
        {"rules": [Rule("users", limit="1/minute")]},
        {"rules": [Rule("/users", limit="1/minute", methods="GET")]},
        {"rules": [Rule("/u/{x:nosuch}", limit="1/minute")]},
        {},
        {"limit": ["1/minute", "1/minute"]},
    ],
)
def test_bad_configuration_fails_at_construction(kwargs: dict[str, Any]) -> None:
    """Nonsense options raise ConfigurationError (a ValueError) when the middleware is built."""
    with pytest.raises(ConfigurationError):
        RateLimitMiddleware(ok_app, **kwargs)


@pytest.mark.parametrize(
    "build",
    [
        lambda: Policy("1/minute", strategy="leaky"),  # type: ignore[arg-type]
        lambda: Policy("1/minute", burst=3),
        lambda: Policy("1/minute", strategy="token-bucket", burst=0),
        lambda: Policy("1/minute", cost=0),
        lambda: Policy("1/minute", cost=True),
        lambda: Policy("1/minute", name='bad"name'),
        lambda: Policy("1/minute", name=""),
        lambda: Policy("1/minute", on_storage_error="maybe"),  # type: ignore[arg-type]
        lambda: RateLimiter(max_keys=1),
        lambda: RateLimiter(timeout=0),
        lambda: RateLimiter(timeout=float("nan")),
    ],
)
def test_bad_policies_and_limiters_fail_clearly(build: Callable[[], object]) -> None:
    """Bad policy or limiter options raise ConfigurationError with a message."""
    with pytest.raises(ConfigurationError, match=r"\w"):
        build()


def test_configuration_error_is_a_value_error() -> None:
    """ConfigurationError is a ValueError, so generic validation handlers catch it."""
    assert issubclass(ConfigurationError, ValueError)


async def test_memory_store_admits_exactly_the_limit_under_concurrency() -> None:
    """1,000 concurrent requests on one key with a limit of 100 admit exactly 100."""
    app = RateLimitMiddleware(ok_app, limit="100/minute")
    codes: list[int] = []

    async def one() -> None:
        codes.append((await drive(app, http_scope())).status)

    async with anyio.create_task_group() as tg:
        for _ in range(1000):
            tg.start_soon(one)
    assert codes.count(200) == 100, codes.count(200)
    assert codes.count(429) == 900


async def test_remote_storage_lifespan_startup_checks_the_event_loop(anyio_backend: str) -> None:
    """With a remote storage, startup fails clearly on trio and completes on asyncio."""
    sent: list[Message] = []
    messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await send({"type": "lifespan.shutdown.complete"})

    async def receive() -> Message:
        return messages.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    guarded = RateLimitMiddleware(app, limit="1/minute", storage="redis://127.0.0.1:1")
    await guarded({"type": "lifespan"}, receive, send)
    if anyio_backend == "trio":
        assert sent[0]["type"] == "lifespan.startup.failed"
        assert "needs asyncio" in sent[0]["message"]
    else:
        assert sent[0] == {"type": "lifespan.startup.complete"}
    assert sent[1] == {"type": "lifespan.shutdown.complete"}


async def test_file_and_event_stream_responses_pass_whole(tmp_path: Any) -> None:
    """A FileResponse and a server-sent event stream arrive whole, with the RateLimit fields."""
    from starlette.responses import FileResponse

    target = tmp_path / "report.txt"
    target.write_bytes(b"line\n" * 10_000)

    async def events() -> AsyncIterator[str]:
        for i in range(5):
            yield f"data: tick {i}\n\n"
            await anyio.lowlevel.checkpoint()

    async def file(request: Request) -> Response:
        return FileResponse(target)

    async def sse(request: Request) -> Response:
        return StreamingResponse(events(), media_type="text/event-stream")

    inner = Starlette(routes=[Route("/file", file), Route("/sse", sse)])
    app = RateLimitMiddleware(inner, limit="10/minute", limiter=manual())
    async with client_for(app) as client:
        r = await client.get("/file")
        assert r.content == target.read_bytes()
        assert "ratelimit" in r.headers
        r = await client.get("/sse")
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.text == "".join(f"data: tick {i}\n\n" for i in range(5))
    assert "ratelimit" in r.headers


async def test_a_reused_response_start_message_gets_no_piled_up_headers() -> None:
    """An app that sends one prebuilt start message gets exactly one RateLimit field each time."""
    start: Message = {"type": "http.response.start", "status": 200, "headers": [(b"x", b"1")]}

    async def reusing(scope: Scope, receive: Receive, send: Send) -> None:
        await send(start)
        await send({"type": "http.response.body", "body": b"ok"})

    app = RateLimitMiddleware(reusing, limit="10/minute", limiter=manual())
    async with client_for(app) as client:
        for _ in range(3):
            r = await client.get("/")
            assert len(r.headers.get_list("ratelimit")) == 1, r.headers
    assert start["headers"] == [(b"x", b"1")]


@pytest.mark.parametrize("given", ["absent", "tuple"])
async def test_a_start_message_without_a_headers_list_gets_the_fields(given: str) -> None:
    """A start message with no headers, or a tuple of them, still gets the RateLimit fields."""
    start: Message = {"type": "http.response.start", "status": 200}
    if given == "tuple":
        start["headers"] = ((b"x", b"1"),)

    async def app_(scope: Scope, receive: Receive, send: Send) -> None:
        await send(start)
        await send({"type": "http.response.body", "body": b"ok"})

    app = RateLimitMiddleware(app_, limit="10/minute", limiter=manual())
    async with client_for(app) as client:
        r = await client.get("/")
    assert r.headers.get_list("ratelimit") == ['"10-per-60s";r=9;t=20'], r.headers
    assert r.headers.get("x") == ("1" if given == "tuple" else None), r.headers


async def test_stacked_middlewares_each_write_their_own_fields_once() -> None:
    """Two stacked middlewares write one RateLimit line each, never the same entry twice."""
    inner = RateLimitMiddleware(ok_app, limit=Policy("5/minute", name="inner"), limiter=manual())
    outer = RateLimitMiddleware(inner, limit=Policy("9/minute", name="outer"), limiter=manual())
    async with client_for(outer) as client:
        r = await client.get("/")
    lines = r.headers.get_list("ratelimit")
    assert sorted(lines) == ['"inner";r=4;t=20', '"outer";r=8;t=20'], lines


async def test_async_key_behind_a_plain_callable_is_awaited_on_the_fast_path() -> None:
    """A sync callable that returns an awaitable key (a lambda around an async lookup) works."""

    async def lookup(scope: Scope) -> str:
        return "user-1"

    app = RateLimitMiddleware(ok_app, limit="1/minute", key=lambda s: lookup(s), limiter=manual())
    async with client_for(app, "10.0.0.1") as a, client_for(app, "10.0.0.2") as b:
        assert (await a.get("/")).status_code == 200
        assert (await b.get("/")).status_code == 429  # same user, another address


def test_one_name_for_two_different_policies_is_refused() -> None:
    """Two policies of one name but different limits in one limiter: ConfigurationError."""
    limiter = manual()
    with pytest.raises(ConfigurationError, match="named 'api'"):
        RateLimitMiddleware(
            ok_app,
            rules=[
                Rule("/a", limit=Policy("2/minute", name="api")),
                Rule("/b", limit=Policy("100/minute", name="api")),
            ],
            limiter=limiter,
        )


async def test_unnamed_limits_of_two_middlewares_sharing_a_limiter_count_apart() -> None:
    """Two middlewares with the same unnamed limit on one limiter have a quota each."""
    shared = manual()
    inner = RateLimitMiddleware(ok_app, limit="4/minute", limiter=shared, headers="none")
    outer = RateLimitMiddleware(inner, limit="4/minute", limiter=shared, headers="none")
    async with client_for(outer) as client:
        assert await statuses(client, "/", 5) == [200] * 4 + [429]


async def test_a_429_reports_what_the_quotas_that_admitted_it_have_left() -> None:
    """On a 429, a quota that had room shows what remains (the refused request used none),
    as Redis reports it; the next admitted request proves it."""
    clock = ManualClock(1000.0)
    app = RateLimitMiddleware(ok_app, limit="2/second;5/hour", limiter=manual(clock))
    async with client_for(app) as client:
        got = [await client.get("/") for _ in range(4)]
        clock.advance(1)
        after = await client.get("/")
    assert [r.status_code for r in got] == [200, 200, 429, 429]
    assert [r.headers["ratelimit"].split(", ")[1] for r in got] == [
        '"5-per-3600s";r=4;t=2600',
        '"5-per-3600s";r=3;t=2600',
        '"5-per-3600s";r=3;t=2600',
        '"5-per-3600s";r=3;t=2600',
    ], [r.headers for r in got]
    assert after.headers["ratelimit"].endswith('"5-per-3600s";r=2;t=2599'), after.headers


@pytest.mark.parametrize("strategy", ["fixed-window", "token-bucket", "moving-window"])
async def test_engine_hit_reports_the_remaining_of_quotas_a_refusal_did_not_use(
    strategy: Strategy,
) -> None:
    """RateLimiter.hit refused by one quota reports the others as they are, not spent."""
    limiter = manual()
    policy = Policy("1/second;5/hour", name="p", strategy=strategy)
    assert (await limiter.hit(policy, "k")).allowed
    refused = await limiter.hit(policy, "k")
    assert not refused.allowed
    assert [(q.name, q.remaining) for q in refused.quotas] == [
        ("p-1-per-1s", 0),
        ("p-5-per-3600s", 4),
    ], refused


async def test_engine_hit_shares_a_named_policy_with_the_middleware() -> None:
    """RateLimiter.hit counts a named policy in the same quota the middleware uses."""
    shared = manual()
    policy = Policy("1/minute", name="shared")
    app = RateLimitMiddleware(ok_app, limit=policy, limiter=shared)
    async with client_for(app, "10.7.7.7") as client:
        assert (await client.get("/")).status_code == 200
    assert not (await shared.hit(policy, "10.7.7.7")).allowed


@pytest.mark.parametrize("cost", [1.5, -1, True, "2"])
async def test_engine_hit_refuses_a_cost_that_is_not_a_count(cost: object) -> None:
    """RateLimiter.hit with a cost that is not an int >= 0 raises ConfigurationError."""
    with pytest.raises(ConfigurationError, match="cost"):
        await manual().hit(Policy("5/minute"), "k", cost=cost)  # type: ignore[arg-type]


async def test_custom_response_still_closes_a_websocket_without_the_extension() -> None:
    """With response= and no denial extension, a refused handshake is closed with 1008."""

    def respond(scope: Scope, rejection: Rejection) -> Response:
        return PlainTextResponse("no", status_code=rejection.status)

    app = RateLimitMiddleware(ws_app, limit="1/minute", response=respond, limiter=manual())
    await drive(app, ws_scope(), [{"type": "websocket.connect"}])
    denied = await drive(app, ws_scope(), [{"type": "websocket.connect"}])
    assert denied.sent == [{"type": "websocket.close", "code": 1008, "reason": "Too Many Requests"}]


async def test_a_request_costing_more_than_the_quota_gets_no_retry_after() -> None:
    """A request that can never pass is refused without a Retry-After that would invite retries."""
    app = RateLimitMiddleware(ok_app, limit=Policy("2/minute", cost=5), limiter=manual())
    async with client_for(app) as client:
        r = await client.get("/")
    assert r.status_code == 429, r.text
    assert "retry-after" not in r.headers, r.headers
    assert "cannot be admitted" in r.json()["detail"], r.text


async def test_a_policy_name_with_a_percent_sign_is_written_as_given() -> None:
    """A '%' in a policy name reaches the RateLimit field as it is (the fast path formats it)."""
    app = RateLimitMiddleware(ok_app, limit=Policy("10/minute", name="50%d"), limiter=manual())
    async with client_for(app) as client:
        r = await client.get("/")
    assert r.headers["ratelimit"] == '"50%d";r=9;t=20', r.headers
    assert r.headers["ratelimit-policy"] == '"50%d";q=10;w=60', r.headers


async def test_a_named_policy_is_noted_in_the_scope_only_when_a_dependency_shares_the_limiter() -> (
    None
):
    """The note that lets a `rate_limit` dependency skip what the middleware counted costs
    a set per request: without a dependency on the limiter, nothing is written."""
    from asgi_guard._record import COUNTED_KEY
    from asgi_guard.fastapi import rate_limit

    seen: list[bool] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(COUNTED_KEY in scope)
        await ok_app(scope, receive, send)

    shared = RateLimiter()
    policy = Policy("5/minute", name="api")
    guard = RateLimitMiddleware(app, limiter=shared, limit=policy)
    assert (await drive(guard, http_scope("/x"))).status == 200
    rate_limit(policy, limiter=shared)  # a route's dependency on the same limiter
    assert (await drive(guard, http_scope("/x"))).status == 200
    assert seen == [False, True]


async def test_an_async_key_functions_time_counts_against_the_deadline() -> None:
    """In front of a TimeoutMiddleware, an async key function that takes a while (a
    database lookup) counts against the request's deadline, which runs from arrival at the
    outermost guard, as with a remote storage."""
    from asgi_guard import TimeoutMiddleware, remaining

    seen: list[float | None] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(remaining())
        await ok_app(scope, receive, send)

    async def slow_key(scope: Scope) -> str:
        await anyio.sleep(0.2)
        return "tenant-1"

    guarded = RateLimitMiddleware(
        TimeoutMiddleware(app, timeout=0.5), limit="100/minute", key=slow_key
    )
    assert (await drive(guarded, http_scope("/x"))).status == 200
    assert seen[0] is not None
    assert seen[0] < 0.35  # 0.5 s from arrival, less the key's 0.2 s
