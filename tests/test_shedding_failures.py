"""LoadSheddingMiddleware when user code fails: a priority function or trust predicate
that raises is logged once (not a traceback per request, under overload) and the request
falls back as documented; a custom algorithm whose limit falls below 1 is read as 1."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import Scope

from asgi_guard import LoadSheddingMiddleware
from asgi_guard._shedding import CLASSES

from .asgi_driver import lifespan_client

pytestmark = pytest.mark.anyio


async def priority_of(request: Request) -> JSONResponse:
    """The class the shedder gave the request (its record in the scope)."""
    return JSONResponse({"priority": CLASSES[request.scope["asgi_guard"].priority]})


async def slow(request: Request) -> JSONResponse:
    await anyio.sleep(0.01)
    return JSONResponse({"ok": True})


routes = [Route("/bulk", priority_of), Route("/other", priority_of), Route("/slow", slow)]


def records(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


@pytest.mark.parametrize(
    "priority",
    [lambda scope: "nope", lambda scope: 1 / 0],
    ids=["unknown-class", "raises"],
)
async def test_a_failing_priority_function_is_logged_once_and_gives_the_default_class(
    caplog: pytest.LogCaptureFixture, priority: Any
) -> None:
    """A priority function that raises or names no class: every request gets
    default_priority and is served; one log record with its traceback, not one a request."""
    app = LoadSheddingMiddleware(
        Starlette(routes=routes), priority=priority, default_priority="sheddable-plus"
    )
    async with lifespan_client(app) as http:
        responses = [await http.get("/other") for _ in range(9)]
    assert [r.status_code for r in responses] == [200] * 9, [r.text for r in responses]
    assert {r.json()["priority"] for r in responses} == {"sheddable-plus"}
    logged = records(caplog, "the priority function raised")
    assert len(logged) == 1, [r.getMessage() for r in caplog.records]
    assert logged[0].exc_info is not None
    assert logged[0].levelno == logging.ERROR


async def test_a_failing_trust_predicate_is_logged_once_and_the_header_not_trusted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A trust predicate that raises: the header is not believed, the path rules decide,
    and the error is logged once."""

    def trust(scope: Scope) -> bool:
        raise RuntimeError("the gateway list is gone")

    app = LoadSheddingMiddleware(
        Starlette(routes=routes),
        priority={"/bulk": "sheddable"},
        priority_header="X-Priority",
        trust_priority_header=trust,
    )
    async with lifespan_client(app) as http:
        responses = [
            await http.get("/bulk", headers={"X-Priority": "critical-plus"}) for _ in range(5)
        ]
    assert {r.json()["priority"] for r in responses} == {"sheddable"}, [r.text for r in responses]
    logged = records(caplog, "trust_priority_header raised RuntimeError")
    assert len(logged) == 1, [r.getMessage() for r in caplog.records]
    assert logged[0].exc_info is not None


async def test_an_async_trust_predicate_behind_a_plain_function_does_not_trust(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A plain function that returns a coroutine (an async predicate wrapped in a lambda
    passes the construction check) trusts nobody: a coroutine is not a yes."""

    async def is_gateway(scope: Scope) -> bool:
        return False

    app = LoadSheddingMiddleware(
        Starlette(routes=routes),
        priority={"/bulk": "sheddable"},
        priority_header="X-Priority",
        trust_priority_header=lambda scope: is_gateway(scope),  # type: ignore[arg-type,return-value]
    )
    async with lifespan_client(app) as http:
        responses = [
            await http.get("/bulk", headers={"X-Priority": "critical-plus"}) for _ in range(3)
        ]
    assert {r.json()["priority"] for r in responses} == {"sheddable"}, [r.text for r in responses]
    assert len(records(caplog, "trust_priority_header raised TypeError")) == 1


class Collapsing:
    """A custom algorithm that breaks the protocol: after a sample its limit is 0."""

    def __init__(self, after: int) -> None:
        self.limit = 1
        self.to = after

    def on_sample(self, now: float, rtt: float, inflight: int, dropped: bool) -> None:
        self.limit = self.to

    def on_lag(self, now: float, lag: float) -> None:
        pass

    def state(self) -> dict[str, float]:
        return {"limit": self.limit}


@pytest.mark.parametrize("after", [0, -3])
async def test_a_custom_limit_below_one_is_read_as_one(after: int) -> None:
    """The guard reads a limit below 1 as 1: requests are still served one at a time
    (queued behind each other), no ZeroDivisionError, no 500."""
    app = LoadSheddingMiddleware(Starlette(routes=routes), limit=Collapsing(after))
    async with lifespan_client(app) as http:
        assert (await http.get("/slow")).status_code == 200  # the limit falls to `after`
        responses: list[httpx.Response] = []

        async def get() -> None:
            responses.append(await http.get("/slow"))

        async with anyio.create_task_group() as group:
            for _ in range(3):
                group.start_soon(get)
    assert [r.status_code for r in responses] == [200] * 3, [r.text for r in responses]
    state = app.state()
    assert state["limit"] == 1
    assert state["algorithm"]["limit"] == after
    assert state["counts"]["queued"] >= 1  # one at a time: the others waited
    assert state["inflight"] == 0
