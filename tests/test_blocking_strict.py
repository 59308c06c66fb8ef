"""Strict mode and the pytest plugin: known blocking calls raise; blocked tests fail."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from asgi_guard import (
    BlockingCallError,
    BlockingDetectorMiddleware,
    BlockingEvent,
    ConfigurationError,
)

from .asgi_driver import drive, http_scope

pytestmark = pytest.mark.anyio

pytest_plugins = ["pytester"]


def strict_app(**options: object) -> BlockingDetectorMiddleware:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    async def naps(request: Request) -> PlainTextResponse:
        time.sleep(0.001)  # far below any threshold: only strict mode sees it
        return PlainTextResponse("ok")

    async def threads(request: Request) -> PlainTextResponse:
        await anyio.to_thread.run_sync(time.sleep, 0.01)  # fine: in a worker thread
        return PlainTextResponse("ok")

    async def stream(request: Request) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"first"
            time.sleep(0.001)  # Starlette runs the body in a task of its own
            yield b"second"

        return StreamingResponse(body())

    routes = [
        Route("/naps/{n}", naps),
        Route("/threads", threads),
        Route("/stream/{n}", stream),
    ]
    return BlockingDetectorMiddleware(Starlette(routes=routes), strict=True, **options)  # type: ignore[arg-type]


async def test_strict_mode_raises_at_a_short_blocking_call() -> None:
    """A 1 ms time.sleep on the loop raises BlockingCallError naming the call and the route."""
    detector = strict_app()
    try:
        with pytest.raises(BlockingCallError, match=r"time\.sleep\(\) blocks .*GET /naps/\{n\}"):
            await drive(detector, http_scope("/naps/1"))
    finally:
        detector.stop()
    assert time.sleep.__module__ == "time", "time.sleep is restored"


async def test_strict_mode_names_the_request_of_a_task_it_spawned() -> None:
    """A blocking call in a streaming body (a child task) names the request that spawned it."""
    detector = strict_app()
    try:
        with pytest.raises(BlockingCallError, match=r"time\.sleep\(\) blocks .*GET /stream/\{n\}"):
            await drive(detector, http_scope("/stream/1"))
    finally:
        detector.stop()


async def test_strict_mode_lets_threads_and_allowed_calls_through() -> None:
    """Work in worker threads passes; an allowed call passes and counts as used."""
    detector = strict_app(allow=["time.sleep", "os.system"])
    try:
        assert (await drive(detector, http_scope("/threads"))).status == 200
        assert (await drive(detector, http_scope("/naps/2"))).status == 200
        assert detector.unused_allowances() == ["os.system"]
    finally:
        detector.stop()


async def test_the_allowances_never_used_are_a_warning_when_the_detector_stops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """At stop, the allow= entries strict mode never had to let through are logged as a
    warning, by name; a detector whose allowances were all used says nothing."""
    detector = strict_app(allow=["time.sleep", "os.system", "select.select"])
    with caplog.at_level(logging.WARNING, logger="asgi_guard.blocking"):
        assert (await drive(detector, http_scope("/naps/1"))).status == 200
        detector.stop()
        all_used = strict_app(allow=["time.sleep"])
        assert (await drive(all_used, http_scope("/naps/2"))).status == 200
        all_used.stop()
    warnings = [r for r in caplog.records if "allowed calls never made" in r.getMessage()]
    assert [(r.levelno, r.getMessage()) for r in warnings] == [
        (
            logging.WARNING,
            "asgi_guard: strict mode allowed calls never made: ['os.system', 'select.select']",
        )
    ]


async def test_strict_mode_ignores_non_blocking_sockets() -> None:
    """The event loop's own non-blocking sockets are not blocking calls; blocking ones are."""
    detector = strict_app()
    async with detector.watching():
        left, right = socket.socketpair()
        with left, right:
            left.setblocking(False)
            with pytest.raises(BlockingIOError):
                left.recv(1)  # non-blocking: allowed, and nothing to read
            with pytest.raises(BlockingCallError, match=r"socket\.socket\.recv"):
                right.recv(1)


async def test_watching_raises_what_the_block_raises_as_it_is() -> None:
    """An exception raised under watching() comes out as it is (the pytest plugin's
    xfail(raises=...) and assertion reports need it), not in an exception group."""
    detector = strict_app()
    with pytest.raises(BlockingCallError, match=r"time\.sleep"):
        async with detector.watching():
            time.sleep(0.001)
    with pytest.raises(KeyError):
        async with detector.watching():
            raise KeyError("k")
    assert not detector._watchdog.running


async def test_a_second_strict_detector_says_what_to_do_under_the_plugin() -> None:
    """An app with a strict detector of its own, in a test the plugin checks strictly,
    fails to start with how to make both work (the plugin's strict=False), and stops the
    threads it started."""
    plugins, apps = strict_app(), strict_app()
    async with plugins.watching():
        with pytest.raises(ConfigurationError, match=r"asgi_guard_blocking\(strict=False\)"):
            async with apps.watching():
                pass
        assert not apps._watchdog.running  # a failed start leaves no thread behind


async def test_an_allowed_call_that_blocks_is_reported_at_the_apps_line() -> None:
    """An allowed blocking call longer than the threshold is reported at the app's line, not
    at strict mode's wrapper (asgi_guard's own files are library code, even installed
    editable)."""
    events: list[BlockingEvent] = []
    detector = strict_app(allow=["time.sleep"], threshold=0.05, on_block=events.append)
    async with detector.watching():
        time.sleep(0.15)  # THE ALLOWED LINE
    assert events, "the stall went unreported"
    location = events[0].location
    assert location is not None
    assert (location.filename, location.line) == (__file__, "time.sleep(0.15)  # THE ALLOWED LINE")
    assert " in strict " not in events[0].describe()  # the wrapper's name


@pytest.mark.parametrize(
    "filename", ["/srv/trio/app/handlers.py", "/home/me/anyio/views.py", "/opt/sniffio/x.py"]
)
async def test_strict_mode_refuses_calls_from_an_app_directory_named_like_a_library(
    filename: str,
) -> None:
    """Only the async libraries' installed files may wait: an app's directory named
    ``trio``, ``anyio`` or ``sniffio`` does not let a blocking call through."""
    namespace: dict[str, Any] = {"time": time}
    exec(compile("def handler():\n    time.sleep(0.001)\n", filename, "exec"), namespace)
    detector = strict_app()
    async with detector.watching():
        with pytest.raises(BlockingCallError, match=r"time\.sleep"):
            namespace["handler"]()


def test_strict_mode_options_are_checked() -> None:
    """Unknown allow entries, or allow without strict, are configuration errors."""
    with pytest.raises(ConfigurationError, match="unknown"):
        strict_app(allow=["time.nap"])
    with pytest.raises(ConfigurationError, match="strict=True"):
        BlockingDetectorMiddleware(drive, allow=["time.sleep"])  # type: ignore[arg-type]


PLUGIN_TESTS = """
import time

import anyio
import pytest

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.asgi_guard_blocking(threshold=0.05, strict=False)
async def test_blocks():
    from time import sleep as nap
    nap(0.2)  # THE BLOCKING LINE


@pytest.mark.asgi_guard_blocking
async def test_short_sleep():
    time.sleep(0.001)


@pytest.mark.asgi_guard_blocking
async def test_polite():
    await anyio.sleep(0.05)


async def test_unmarked():
    time.sleep(0.1)
"""


def test_the_plugin_fails_marked_tests_that_block(pytester: pytest.Pytester) -> None:
    """Marked tests that block fail with the blocking line; others pass; unmarked ones too."""
    pytester.makepyfile(test_plugin=PLUGIN_TESTS)
    result = pytester.runpytest_subprocess("-p", "anyio", "-v")
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*test_blocks FAILED*",
            "*test_short_sleep FAILED*",
            "*test_polite PASSED*",
            "*test_unmarked PASSED*",
        ]
    )
    result.stdout.fnmatch_lines(["*the test blocked the event loop*", "*THE BLOCKING LINE*"])
    result.stdout.fnmatch_lines(["*BlockingCallError: time.sleep() blocks the event loop*"])


def test_the_command_line_flag_checks_every_async_test(pytester: pytest.Pytester) -> None:
    """--asgi-guard-blocking checks unmarked async tests too."""
    pytester.makepyfile(test_plugin=PLUGIN_TESTS)
    result = pytester.runpytest_subprocess("-p", "anyio", "--asgi-guard-blocking")
    result.assert_outcomes(passed=1, failed=3)


async def test_strict_mode_knows_which_queue_puts_block() -> None:
    """A put on an unbounded queue never blocks; a blocking put on a bounded one raises."""
    import queue

    detector = strict_app()
    async with detector.watching():
        unbounded: queue.Queue[int] = queue.Queue()
        unbounded.put(1)  # unbounded: passes
        bounded: queue.Queue[int] = queue.Queue(maxsize=1)
        bounded.put(1, False)  # not blocking: passes
        with pytest.raises(BlockingCallError, match=r"queue\.Queue\.put"):
            bounded.put(2, True, 0.01)
