"""The pytest plugin: fail a test whose code blocks the event loop.

Registered through the ``pytest11`` entry point and off unless asked: mark a test with
``@pytest.mark.asgi_guard_blocking`` (optionally ``threshold=``, ``strict=``, ``allow=``),
or pass ``--asgi-guard-blocking`` to check every async test. A checked test runs under a
strict `BlockingDetectorMiddleware`: a known blocking call on the event loop thread raises
`BlockingCallError` at once, and any step that holds the loop longer than the threshold
fails the test with the line that blocked. Async tests run by anyio's plugin or by
pytest-asyncio (any plugin that runs ``item.obj`` as a coroutine function) are checked;
sync tests are not (they have no event loop to block), and a marked one is warned about.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import pytest

from ._blocking import BlockingEvent, check_settings
from ._errors import ConfigurationError

if TYPE_CHECKING:
    from .blocking import BlockingDetectorMiddleware

MARKER = "asgi_guard_blocking"
DEFAULT_THRESHOLD = 0.05
_OPTIONS = ("threshold", "strict", "allow")


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
    threshold = config.getoption("--asgi-guard-blocking-threshold")
    try:
        check_settings(threshold, threshold / 5)
    except ConfigurationError:
        raise pytest.UsageError(
            f"--asgi-guard-blocking-threshold takes a positive number of seconds, at most "
            f"a day (got {threshold})"
        ) from None


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """Swap the test function for a checked one while the test runs: the plugin that runs
    it (anyio's, pytest-asyncio, which wraps ``item.obj`` in ``runtest``) runs that one."""
    marker = item.get_closest_marker(MARKER)
    if not isinstance(item, pytest.Function) or (
        marker is None and not item.config.getoption("--asgi-guard-blocking")
    ):
        return (yield)
    test = item.obj
    if not inspect.iscoroutinefunction(test):
        if marker is not None:
            item.warn(
                pytest.PytestWarning(
                    f"{MARKER}: {item.name} is not a coroutine function (a sync test, or an "
                    "async one wrapped in a sync function, as Hypothesis's @given does), so "
                    "it was not checked"
                )
            )
        return (yield)
    events: list[BlockingEvent] = []
    detector = _detector(item, marker, events)
    ran: list[bool] = []
    item.obj = _checked(test, detector, ran)
    try:
        yield
    finally:
        item.obj = test
    if not ran:
        # Its runner called the test function it had read before this hook, not ours.
        item.warn(
            pytest.PytestWarning(
                f"{MARKER}: {item.name} was not run through the checked function (its "
                "runner called the test function it had read before), so it was not checked"
            )
        )
        return
    # The detector has stopped, which drains its report threads: every detection is here.
    if events:
        details = "\n\n".join(
            f"{event.describe()}\n{''.join(event.stack.format()).rstrip()}" for event in events
        )
        pytest.fail(f"the test blocked the event loop:\n{details}", pytrace=False)
    unused = detector.unused_allowances()
    if unused:
        item.warn(
            pytest.PytestWarning(f"{MARKER}: allow= lists calls the test never made: {unused}")
        )


def _detector(
    item: pytest.Function, marker: pytest.Mark | None, events: list[BlockingEvent]
) -> BlockingDetectorMiddleware:
    """The strict detector a test runs under, from its marker; a marker used wrongly fails
    the test with what is wrong."""
    from .blocking import BlockingDetectorMiddleware

    options: dict[str, Any] = dict(marker.kwargs) if marker is not None else {}
    args = marker.args if marker is not None else ()
    given = ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in options.items())])
    usage = f"@pytest.mark.{MARKER}({given})"
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        pytest.fail(
            f"{usage}: unknown option {', '.join(unknown)}; it takes {', '.join(_OPTIONS)}",
            pytrace=False,
        )
    if len(args) > 1 or (args and "threshold" in options):
        pytest.fail(f"{usage}: the only positional argument is the threshold", pytrace=False)
    threshold = args[0] if args else options.get("threshold")
    if threshold is None:
        threshold = item.config.getoption("--asgi-guard-blocking-threshold")
    try:
        return BlockingDetectorMiddleware(
            _no_app,
            threshold=threshold,
            on_block=events.append,
            strict=options.get("strict", True),
            allow=options.get("allow", ()),
            log_interval=0,
        )
    except ConfigurationError as error:
        problem = str(error)
    pytest.fail(f"{usage}: {problem}", pytrace=False)


async def _no_app(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover
    raise RuntimeError("the pytest plugin's detector serves no requests")


def _checked(test: Any, detector: BlockingDetectorMiddleware, ran: list[bool]) -> Any:
    @functools.wraps(test)
    async def checked(*args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True
        ran.append(True)
        async with detector.watching():
            return await test(*args, **kwargs)

    return checked
