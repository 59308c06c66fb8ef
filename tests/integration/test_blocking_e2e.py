"""End to end: BlockingDetectorMiddleware in a real uvicorn (asyncio and uvloop) over HTTP."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from .servers import UvicornServer, free_port

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[UvicornServer]:
    """uvicorn serving ``tests.apps.blocking_app:app``, its log kept for the assertions."""
    if request.param == "uvloop":
        pytest.importorskip("uvloop")
    uvicorn = UvicornServer(
        "tests.apps.blocking_app:app",
        free_port(),
        tmp_path_factory.mktemp("uvicorn"),
        args=["--loop", request.param],
    )
    uvicorn.start()
    yield uvicorn
    uvicorn.stop(graceful=True)


def reports(server: UvicornServer, needle: str, timeout: float = 2.0) -> str:
    """The server log once it mentions ``needle`` (bounded wait)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = server.log()
        if needle in log:
            return log
        time.sleep(0.05)
    return server.log()


async def test_a_blocking_handler_is_logged_with_its_line_and_route(server: UvicornServer) -> None:
    """The server logs the route template and the exact line of a blocking handler."""
    async with httpx.AsyncClient(base_url=server.url) as client:
        fine = await client.get("/fine")
        assert fine.status_code == 200, fine.text
        r = await client.get("/orders/17")
    assert r.status_code == 200, r.text
    log = reports(server, "GET /orders/{order_id}")
    assert "GET /orders/{order_id}: the event loop was blocked" in log, log
    assert "blocking_app.py" in log, log
    assert "time.sleep(0.2)  # E2E BLOCKING LINE" in log, log
    assert "GET /fine" not in log, log
