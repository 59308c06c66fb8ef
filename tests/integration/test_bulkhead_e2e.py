"""End to end: the bulkhead dependency's queue on real servers, with clients that go away."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest

from .servers import HypercornServer, UvicornServer, app_server

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

APP = "tests.apps.shedding_app:bulkheaded"

Server = UvicornServer | HypercornServer


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the servers run their own loops; the client runs on asyncio


@pytest.fixture(scope="module", params=["uvicorn", "hypercorn-trio"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """The bulkhead app (one at a time, three may wait) on uvicorn and Hypercorn (trio)."""
    kind = str(request.param)
    started = app_server(APP, kind, tmp_path_factory.mktemp(f"bulkhead-{kind}"))
    yield started
    started.stop(graceful=True)


async def test_queued_clients_that_close_their_sockets_leave_the_bulkheads_queue(
    server: Server,
) -> None:
    """Three queued clients (two GETs, a POST whose body FastAPI read) that close their
    sockets leave the queue at once, so a real client queues instead of being refused
    queue_full, and the handler never runs for them."""
    async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as client:

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
        port = server.port
        holder = socket.create_connection(("127.0.0.1", port))
        holder.sendall(b"GET /hold HTTP/1.1\r\nHost: t\r\n\r\n")
        ghosts: list[socket.socket] = []
        try:
            await until(lambda s: s["inflight"] == 1, 5)
            for n in range(2):
                ghost = socket.create_connection(("127.0.0.1", port))
                ghost.sendall(b"GET /q/ghost%d HTTP/1.1\r\nHost: t\r\n\r\n" % n)
                ghosts.append(ghost)
            body = b'{"name": "g"}'
            ghost = socket.create_connection(("127.0.0.1", port))
            ghost.sendall(
                b"POST /item/ghost2 HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            ghosts.append(ghost)
            await until(lambda s: s["queued"] == 3, 5)
            for ghost in ghosts:
                ghost.close()
            # Long before their five-second wait ends (which would count as queue_timeout).
            gone = await until(lambda s: s["queued"] == 0, 4)
            assert gone["counts"]["disconnected"] == 3, gone
            assert gone["inflight"] == 1, gone
            async with anyio.create_task_group() as group:
                real: list[httpx.Response] = []

                async def get() -> None:
                    real.append(await client.get("/q/real"))

                group.start_soon(get)
                await until(lambda s: s["queued"] == 1, 5)  # it waits: not refused queue_full
                assert (await client.post("/release")).status_code == 200
            assert real[0].status_code == 200, real[0].text
            reply = holder.recv(65536)
            assert reply.startswith(b"HTTP/1.1 200"), reply
        finally:
            holder.close()
            for ghost in ghosts:
                ghost.close()
        after = await until(lambda s: s["inflight"] == 0, 5)
    assert after["ran"] == [*before["ran"], "real"], "the handler never runs for a gone client"
    assert after["queued"] == 0, after
    assert after["counts"]["queue_full"] == before["counts"]["queue_full"], after
