"""LoadSheddingMiddleware matches exempt paths and priority rules against the path the app
routes: behind ``uvicorn --root-path /api``, or in a sub-app mounted at ``/api``, a request
for ``/health`` arrives as ``path="/api/health"`` with ``root_path="/api"``. The default
exemptions cover a mounted metrics app (``/metrics/``) too."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Mount, Route
from starlette.types import ASGIApp

from asgi_guard import LoadSheddingMiddleware
from asgi_guard._shedding import CLASSES
from asgi_guard.shedding import DEFAULT_EXEMPT

from .asgi_driver import lifespan_client

pytestmark = pytest.mark.anyio


class Gate:
    """A route whose requests stay in it until the test opens the gate."""

    def __init__(self) -> None:
        self.open = anyio.Event()
        self.inside = 0

    async def endpoint(self, request: Request) -> PlainTextResponse:
        self.inside += 1
        try:
            await self.open.wait()
        finally:
            self.inside -= 1
        return PlainTextResponse("done")


async def priority_of(request: Request) -> JSONResponse:
    """The class the shedder gave the request."""
    return JSONResponse({"priority": CLASSES[request.scope["asgi_guard"].priority]})


def inner_app(gate: Gate) -> Starlette:
    return Starlette(
        routes=[
            Route("/gate", gate.endpoint),
            Route("/health", lambda request: PlainTextResponse("up")),
            Route("/state", lambda request: PlainTextResponse("state")),
            Route("/bulk", priority_of),
            Route("/exports/{name}", priority_of),
            Route("/other", priority_of),
        ]
    )


def shedder(app: ASGIApp) -> LoadSheddingMiddleware:
    """Limit 1, no queue: while one request runs, every counted request is refused."""
    return LoadSheddingMiddleware(
        app,
        limit=1,
        max_queue=0,
        priority={"/bulk": "sheddable", "/exports/{name}": "sheddable-plus"},
        exempt=[*DEFAULT_EXEMPT, "/state"],
    )


async def while_full(
    http: httpx.AsyncClient, gate: Gate, prefix: str, *paths: str
) -> dict[str, httpx.Response]:
    """GET each of ``paths`` (under ``prefix``) while ``prefix/gate`` holds the only place."""
    results: dict[str, httpx.Response] = {}

    async def hold() -> None:
        results["gate"] = await http.get(f"{prefix}/gate")

    async with anyio.create_task_group() as group:
        group.start_soon(hold)
        with anyio.fail_after(2):
            while not gate.inside:  # noqa: ASYNC110 - polling the app's own state
                await anyio.sleep(0.001)
        for path in paths:
            results[path] = await http.get(f"{prefix}{path}", follow_redirects=True)
        gate.open.set()
    assert results["gate"].status_code == 200, results["gate"].text
    return results


async def check(http: httpx.AsyncClient, gate: Gate, prefix: str) -> None:
    results = await while_full(http, gate, prefix, "/health", "/state")
    for path in ("/health", "/state"):
        assert results[path].status_code == 200, (path, results[path].text)
    assert results["/health"].text == "up"
    classes: dict[str, Any] = {}
    for path in ("/bulk", "/exports/daily", "/other"):
        r = await http.get(f"{prefix}{path}")
        assert r.status_code == 200, r.text
        classes[path] = r.json()["priority"]
    assert classes == {
        "/bulk": "sheddable",
        "/exports/daily": "sheddable-plus",
        "/other": "critical",
    }


async def test_behind_a_root_path_exemptions_and_priorities_use_the_routed_path() -> None:
    """uvicorn --root-path /api: /api/health is exempt while the worker is full, and the
    rules for /bulk and /exports/{name} class /api/bulk and /api/exports/daily."""
    gate = Gate()
    async with lifespan_client(shedder(inner_app(gate)), root_path="/api") as http:
        await check(http, gate, "/api")


async def test_in_a_mounted_sub_app_exemptions_and_priorities_use_the_routed_path() -> None:
    """A sub-app mounted at /api with the shedder around it: the same, from Starlette's
    Mount (which keeps the full path and sets root_path)."""
    gate = Gate()
    app = Starlette(routes=[Mount("/api", app=shedder(inner_app(gate)))])
    async with lifespan_client(app) as http:
        await check(http, gate, "/api")


async def test_without_a_root_path_nothing_changes() -> None:
    """The same rules with no root_path at all (and a path that only looks prefixed is
    matched as it is)."""
    gate = Gate()
    async with lifespan_client(shedder(inner_app(gate))) as http:
        await check(http, gate, "")
        r = await http.get("/api/health")
    assert r.status_code == 404, r.text  # counted and routed as /api/health


async def test_the_default_exemptions_cover_a_mounted_metrics_app() -> None:
    """app.mount("/metrics", make_asgi_app()) answers /metrics with a redirect to
    /metrics/: both are exempt by default, as is a mounted health app's /health/."""
    gate = Gate()
    app = Starlette(
        routes=[
            Route("/gate", gate.endpoint),
            Mount("/metrics", app=PlainTextResponse("# metrics\n")),
            Mount("/health", app=PlainTextResponse("up")),
        ]
    )
    app.add_middleware(LoadSheddingMiddleware, limit=1, max_queue=0)
    async with lifespan_client(app) as http:
        results = await while_full(http, gate, "", "/metrics", "/health", "/metrics/")
    for path in ("/metrics", "/metrics/", "/health"):
        assert results[path].status_code == 200, (path, results[path].text)
    assert [r.status_code for r in results["/metrics"].history] == [307]
    assert results["/metrics"].url.path == "/metrics/"
    assert results["/metrics"].text == "# metrics\n"


def test_the_default_exemptions_list_each_path_with_and_without_a_trailing_slash() -> None:
    """Every default exempt path comes in both forms, so a route and a mount both match."""
    bare = {path.rstrip("/") for path in DEFAULT_EXEMPT}
    assert bare == {"/health", "/healthz", "/livez", "/readyz", "/ping", "/metrics"}
    assert set(DEFAULT_EXEMPT) == bare | {path + "/" for path in bare}
