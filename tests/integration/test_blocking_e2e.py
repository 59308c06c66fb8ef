"""End to end: BlockingDetectorMiddleware in a real uvicorn (asyncio and uvloop) over HTTP."""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

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


class DevUvicorn(UvicornServer):
    """uvicorn under ``python -X dev -W error`` (every warning an error, resource warnings
    on), with lifespan off."""

    def argv(self) -> Sequence[str]:
        return [
            sys.executable, "-X", "dev", "-W", "error", "-m", "uvicorn", self.app,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--log-level", "warning",
            "--no-access-log",
            "--lifespan", "off",
            *self.extra_args,
        ]  # fmt: skip


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_without_lifespan_it_starts_at_a_request_and_the_server_exits_cleanly(
    loop: str, tmp_path: Path
) -> None:
    """With ``--lifespan off`` the first request starts the detector, a blocking handler is
    reported, and on Ctrl-C (SIGINT) the process exits with 0 and no warning, under -X dev
    -W error (the detector stops at exit). SIGTERM would end it with -15 whatever the app:
    uvicorn raises the signal again once it has shut down."""
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    server = DevUvicorn("tests.apps.blocking_app:app", free_port(), tmp_path, args=["--loop", loop])
    server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url) as client:
            assert (await client.get("/fine")).status_code == 200
            r = await client.get("/orders/3")
            assert r.status_code == 200, r.text
        log = reports(server, "GET /orders/{order_id}")
        assert "time.sleep(0.2)  # E2E BLOCKING LINE" in log, log
        process = server.process
        assert process is not None
        process.send_signal(signal.SIGINT)
        code = process.wait(10)
    finally:
        server.stop()
    log = server.log()
    assert code == 0, log
    for trouble in ("Warning", "Traceback", "Exception ignored", "was destroyed", "Error"):
        assert trouble not in log, log
