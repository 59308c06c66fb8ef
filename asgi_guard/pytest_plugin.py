"""The pytest plugin: fail a test whose code blocks the event loop.

Registered through the ``pytest11`` entry point and off unless asked: mark a test with
``@pytest.mark.asgi_guard_blocking`` (optionally ``threshold=``, ``strict=``, ``allow=``),
or pass ``--asgi-guard-blocking`` to check every async test. A checked test runs under a
strict `BlockingDetectorMiddleware`: a known blocking call on the event loop thread raises
`BlockingCallError` at once, and any step that holds the loop longer than the threshold
fails the test with the line that blocked. Async tests run by the anyio plugin (or any
plugin that calls the test function as a coroutine function) are checked; sync tests are
not (they have no event loop to block).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Generator
from typing import Any

import pytest

from ._blocking import BlockingEvent

MARKER = "asgi_guard_blocking"
DEFAULT_THRESHOLD = 0.05


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("asgi_guard")
    group.addoption(
        "--asgi-guard-blocking",
        action="store_true",
        default=False,
        help="fail async tests whose code blocks the event loop (asgi_guard)",
    )
    group.addoption(
        "--asgi-guard-blocking-threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help=f"seconds a step may hold the loop (default {DEFAULT_THRESHOLD})",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(threshold=None, strict=True, allow=()): fail the test if its code blocks "
        "the event loop (asgi_guard)",
    )


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Generator[None, Any, None]:
    marker = pyfuncitem.get_closest_marker(MARKER)
    enabled = marker is not None or pyfuncitem.config.getoption("--asgi-guard-blocking")
    test = pyfuncitem.obj
    if not enabled or not inspect.iscoroutinefunction(test):
        yield
        return
    options = dict(marker.kwargs) if marker is not None else {}
    threshold = options.pop("threshold", None) or pyfuncitem.config.getoption(
        "--asgi-guard-blocking-threshold"
    )
    pyfuncitem.obj = _checked(test, threshold=threshold, **options)
    try:
        yield
    finally:
        pyfuncitem.obj = test


def _checked(test: Any, *, threshold: float, strict: bool = True, allow: Any = ()) -> Any:
    from .blocking import BlockingDetectorMiddleware

    async def _no_app(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover
        raise RuntimeError("the pytest plugin's detector serves no requests")

    @functools.wraps(test)
    async def checked(*args: Any, **kwargs: Any) -> Any:
        events: list[BlockingEvent] = []
        detector = BlockingDetectorMiddleware(
            _no_app,
            threshold=threshold,
            on_block=events.append,
            strict=strict,
            allow=allow,
            log_interval=0,
        )
        async with detector.watching():
            result = await test(*args, **kwargs)
        # stop() has drained the report thread: every detection is in ``events``.
        if events:
            details = "\n\n".join(
                f"{event.describe()}\n{''.join(event.stack.format()).rstrip()}" for event in events
            )
            pytest.fail(f"the test blocked the event loop:\n{details}", pytrace=False)
        unused = detector.unused_allowances()
        if unused:
            pytest.fail(f"allow= lists calls the test never made: {unused}", pytrace=False)
        return result

    return checked
