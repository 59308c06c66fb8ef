"""End to end: LoadSheddingMiddleware in front of a FastAPI app on real servers over HTTP."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest

from tests.apps.shedding_app import SLOW

from .servers import HypercornServer, UvicornServer, app_server

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

APP = "tests.apps.shedding_app:guard"
FLOOD_APP = "tests.apps.shedding_app:flood"

Server = UvicornServer | HypercornServer


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the servers run their own loops; the client runs on asyncio


@pytest.fixture(scope="module", params=["uvicorn", "uvicorn-uvloop", "hypercorn-trio"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """The shedding app on uvicorn (asyncio, uvloop) and Hypercorn (trio)."""
    kind = str(request.param)
    started = app_server(APP, kind, tmp_path_factory.mktemp(kind))
    yield started
    started.stop(graceful=True)


async def test_a_burst_is_served_up_to_the_limit_and_queue_and_the_rest_refused(
    server: Server,
) -> None:
    """Six at once with limit 2 and a queue of 1: three served, three refused at once with
    503 problem+json and Retry-After, over connections the server keeps open."""
    limits = httpx.Limits(max_connections=10, max_keepalive_connections=10)
    async with httpx.AsyncClient(base_url=server.url, timeout=5.0, limits=limits) as client:
        responses: list[tuple[float, httpx.Response]] = []

        async def get() -> None:
            started = anyio.current_time()
            response = await client.get("/slow")
            responses.append((anyio.current_time() - started, response))

        async with anyio.create_task_group() as group:
            for _ in range(6):
                group.start_soon(get)
        statuses = sorted(r.status_code for _, r in responses)
        assert statuses == [200, 200, 200, 503, 503, 503], [r.text for _, r in responses]
        for elapsed, response in responses:
            if response.status_code == 503:
                assert response.headers["content-type"] == "application/problem+json"
                assert int(response.headers["retry-after"]) >= 1
                assert response.headers.get("connection", "").lower() != "close"
                assert elapsed < SLOW, "a refusal is immediate"
                assert response.json()["reason"] == "queue_full"
        # The refused connections were kept alive: the next requests reuse them.
        assert (await client.get("/health")).status_code == 200
        state = (await client.get("/state")).json()
    assert state["inflight"] == 0
    assert state["queued"] == 0
    assert state["counts"]["queue_full"] == 3
    assert "shedding_started" in state["events"]


async def test_health_checks_pass_while_the_service_is_full(server: Server) -> None:
    """With every place taken and the queue full, /health still answers 200."""
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=5.0) as client,
        anyio.create_task_group() as group,
    ):
        for n in range(3):
            group.start_soon(client.get, f"/batch/{n}")
        await anyio.sleep(SLOW / 4)
        assert (await client.get("/batch/9")).status_code == 503
        health = await client.get("/health")
    assert health.status_code == 200, health.text


@pytest.fixture(scope="module", params=["uvicorn", "hypercorn-trio"])
def flood_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """The disconnect-flood app (limit 1, a queue of 100) on uvicorn and Hypercorn (trio)."""
    kind = str(request.param)
    started = app_server(FLOOD_APP, kind, tmp_path_factory.mktemp(f"flood-{kind}"))
    yield started
    started.stop(graceful=True)


async def test_clients_that_close_their_sockets_while_queued_leave_nothing_behind(
    flood_server: Server,
) -> None:
    """Fifty queued clients that close their sockets leave the queue at once (long before
    their five-second wait ends), are never run by the app, and leave no task behind.
    The request holding the place stays in until the test releases it, so no bound on
    how fast a loaded machine does each step decides the outcome."""
    async with httpx.AsyncClient(base_url=flood_server.url, timeout=5.0) as client:

        async def state() -> dict[str, Any]:
            response = await client.get("/state")
            assert response.status_code == 200, response.text
            return response.json()  # type: ignore[no-any-return]

        async def until(check: Callable[[dict[str, Any]], bool], seconds: float) -> dict[str, Any]:
            with anyio.fail_after(seconds):
                while not check(now := await state()):  # noqa: ASYNC110 - the server's state
                    await anyio.sleep(0.01)
            return now

        before = await state()
        holder = socket.create_connection(("127.0.0.1", flood_server.port))
        holder.settimeout(10)
        holder.sendall(b"GET /hold HTTP/1.1\r\nHost: t\r\n\r\n")
        socks = []
        try:
            await until(lambda s: s["inflight"] == 1, 10)
            for n in range(50):
                sock = socket.create_connection(("127.0.0.1", flood_server.port))
                sock.sendall(b"GET /q/%d HTTP/1.1\r\nHost: t\r\n\r\n" % n)
                socks.append(sock)
            await until(lambda s: s["queued"] == 50, 10)
            for sock in socks:
                sock.close()
            # Before their 5 s wait ends (they would leave as queue_timeout then), with
            # the place still held: none can have left by being admitted.
            gone = await until(lambda s: s["queued"] == 0, 4)
            assert gone["counts"]["disconnected"] == before["counts"]["disconnected"] + 50, gone
            assert gone["counts"]["queue_timeout"] == before["counts"]["queue_timeout"], gone
            assert gone["inflight"] == 1, gone
            if before["tasks"] is not None:
                # The hold's alone (a cancelled watcher task ends an iteration later).
                await until(lambda s: s["tasks"] == before["tasks"] + 1, 2)
            assert (await client.post("/release")).status_code == 200
            reply = holder.recv(65536)  # the hold ends
            assert reply.startswith(b"HTTP/1.1 200"), reply
        finally:
            holder.close()
            for sock in socks:
                sock.close()
        after = await until(lambda s: s["inflight"] == 0, 5)
        if before["tasks"] is not None:
            after = await until(lambda s: s["tasks"] == before["tasks"], 2)
    assert after["ran"] == [], "the app never runs a request for a gone client"
    assert after["queued"] == 0, after
    assert after["counts"]["admitted"] == before["counts"]["admitted"] + 1, after
