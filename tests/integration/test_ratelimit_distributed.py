"""Many processes, one quota: two uvicorn servers counting in the same real Redis."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .servers import UvicornServer, free_port

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.e2e]

LIMIT = 20


@pytest.fixture
def anyio_backend() -> str:
    # The servers run uvicorn (asyncio) whatever the client runs on: one client backend is enough.
    return "asyncio"


@pytest.fixture
def servers(redis_url: str, tmp_path: Path) -> Iterator[list[UvicornServer]]:
    """Two uvicorn processes serving ``tests.apps.distributed_app:app`` with one Redis."""
    env = {"ASGI_GUARD_TEST_REDIS_URL": redis_url, "ASGI_GUARD_TEST_LIMIT": f"{LIMIT}/minute"}
    started: list[UvicornServer] = []
    try:
        for _ in range(2):
            server = UvicornServer("tests.apps.distributed_app:app", free_port(), tmp_path, env)
            server.start()
            started.append(server)
        yield started
    finally:
        for server in started:
            server.stop(graceful=True)
    for server in started:
        assert "Traceback" not in server.log(), server.log()


async def test_two_processes_share_one_quota(servers: list[UvicornServer]) -> None:
    """2N requests alternating between two servers: exactly N pass in all, counted jointly."""
    responses: list[httpx.Response] = []
    async with httpx.AsyncClient(timeout=5.0) as client:
        for i in range(2 * LIMIT):
            responses.append(await client.get(servers[i % 2].url + "/"))
    summary = [(r.url.port, r.status_code, r.headers.get("ratelimit")) for r in responses]
    assert [r.status_code for r in responses] == [200] * LIMIT + [429] * LIMIT, summary
    # Both processes answered, and their RateLimit fields count down one shared quota.
    assert len({r.text for r in responses[:LIMIT]}) == 2, summary
    assert {r.url.port for r in responses if r.status_code == 429} == {s.port for s in servers}
    remaining = [r.headers["ratelimit"].split(";r=")[1].split(";")[0] for r in responses]
    assert remaining == [str(n) for n in range(LIMIT - 1, -1, -1)] + ["0"] * LIMIT, summary
    for r in responses[LIMIT:]:
        assert r.headers["content-type"] == "application/problem+json", r.headers
        assert r.json()["type"].endswith("#quota-exceeded"), r.text
