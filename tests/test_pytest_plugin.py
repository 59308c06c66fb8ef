"""The pytest plugin's blocking check: under pytest-asyncio as under anyio, test outcomes as
without it, allow= entries never used as a warning, and its options checked."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

INI = """
[pytest]
asyncio_default_fixture_loop_scope = function
"""

ASYNCIO_TESTS = """
import time

import pytest


@pytest.mark.asyncio
@pytest.mark.asgi_guard_blocking
async def test_sleeps():
    time.sleep(0.001)


@pytest.mark.asyncio
@pytest.mark.asgi_guard_blocking(strict=False)
async def test_computes():
    until = time.monotonic() + 0.2
    while time.monotonic() < until:  # THE BLOCKING LINE
        pass


@pytest.mark.asyncio
@pytest.mark.asgi_guard_blocking
async def test_polite():
    import asyncio

    await asyncio.sleep(0.05)


@pytest.mark.asyncio
async def test_unmarked():
    time.sleep(0.001)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.asgi_guard_blocking
async def test_anyio_still_checked(anyio_backend):
    time.sleep(0.001)
"""


def test_pytest_asyncio_tests_are_checked(pytester: pytest.Pytester) -> None:
    """Tests run by pytest-asyncio are checked like anyio's (pytest-asyncio runs a sync
    wrapper of its own, so they ran unchecked); anyio's tests still are, beside them."""
    pytest.importorskip("pytest_asyncio")
    pytester.makeini(INI)
    pytester.makepyfile(test_asyncio=ASYNCIO_TESTS)
    result = pytester.runpytest_subprocess("-p", "asyncio", "-p", "anyio", "-v")
    result.assert_outcomes(passed=2, failed=4)
    result.stdout.fnmatch_lines(
        [
            "*test_sleeps FAILED*",
            "*test_computes FAILED*",
            "*test_polite PASSED*",
            "*test_unmarked PASSED*",
            "*test_anyio_still_checked?asyncio? FAILED*",
            "*test_anyio_still_checked?trio? FAILED*",
        ]
    )
    result.stdout.fnmatch_lines(["*BlockingCallError: time.sleep() blocks the event loop*"])
    result.stdout.fnmatch_lines(["*the test blocked the event loop*", "*THE BLOCKING LINE*"])
    result.stdout.no_fnmatch_line("*pytest_plugin.py*")  # the stack starts at the test
    flagged = pytester.runpytest_subprocess("-p", "asyncio", "-p", "anyio", "--asgi-guard-blocking")
    flagged.assert_outcomes(passed=1, failed=5)


OUTCOME_TESTS = """
import time

import pytest

from asgi_guard import BlockingCallError

pytestmark = [pytest.mark.anyio, pytest.mark.asgi_guard_blocking]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


@pytest.mark.xfail(raises=KeyError, strict=True)
async def test_xfail_keyerror():
    {}["k"]


@pytest.mark.xfail(raises=BlockingCallError, strict=True)
async def test_xfail_blocking_call():
    time.sleep(0.001)


async def test_skips():
    pytest.skip("not today")


async def test_fails_an_assert():
    x = 1
    assert x == 2
"""


def test_a_checked_test_has_the_outcome_it_has_without_the_plugin(
    pytester: pytest.Pytester,
) -> None:
    """Exceptions of a checked test come out as they are: xfail(raises=...) (of a
    BlockingCallError too), pytest.skip() and assertion reports work as without the plugin
    (they were wrapped in an ExceptionGroup)."""
    pytester.makepyfile(test_outcomes=OUTCOME_TESTS)
    result = pytester.runpytest_subprocess("-p", "anyio")
    result.assert_outcomes(xfailed=4, skipped=2, failed=2)
    result.stdout.fnmatch_lines(["FAILED *test_fails_an_assert?asyncio? - assert 1 == 2"])
    result.stdout.no_fnmatch_line("*ExceptionGroup*")


ALLOW_TESTS = """
import time

import pytest

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.parametrize("slow", [True, False])
@pytest.mark.asgi_guard_blocking(allow=["time.sleep"])
async def test_allowed(slow):
    if slow:
        time.sleep(0.001)


@pytest.mark.asgi_guard_blocking
def test_sync():
    time.sleep(0.001)
"""


def test_allow_entries_never_used_are_a_warning(pytester: pytest.Pytester) -> None:
    """An allow= entry the test never used is a pytest warning, not a failure (it failed
    the test); a marked sync test is warned about, not checked."""
    pytester.makepyfile(test_allow=ALLOW_TESTS)
    result = pytester.runpytest_subprocess("-p", "anyio")
    result.assert_outcomes(passed=3, warnings=2)
    result.stdout.fnmatch_lines(
        [
            "*test_allowed?False?*",
            "*PytestWarning: asgi_guard_blocking: allow= lists calls the test never made:"
            " ?'time.sleep'?",
        ]
    )
    result.stdout.fnmatch_lines(["*test_sync is not a coroutine function*not checked*"])


EARLY_READER_CONFTEST = """
import asyncio

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        item.read_early = item.obj  # a runner that keeps the function it read


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    asyncio.run(pyfuncitem.read_early())
    return True
"""

EARLY_READER_TESTS = """
import time

import pytest


@pytest.mark.asgi_guard_blocking
async def test_blocks():
    time.sleep(0.15)
"""


def test_a_test_its_runner_did_not_run_through_the_checked_function_is_warned_about(
    pytester: pytest.Pytester,
) -> None:
    """A runner that calls the test function it read before the plugin swapped it runs
    the test unchecked: the plugin says so instead of passing it silently."""
    pytester.makeconftest(EARLY_READER_CONFTEST)
    pytester.makepyfile(test_early=EARLY_READER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:anyio")
    result.assert_outcomes(passed=1, warnings=1)
    result.stdout.fnmatch_lines(["*test_blocks was not run through the checked function*"])


THRESHOLD_TESTS = """
import time

import anyio
import pytest

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def compute():
    await anyio.sleep(0)
    until = time.monotonic() + 0.15
    while time.monotonic() < until:
        pass


@pytest.mark.asgi_guard_blocking(0.03, strict=False)
async def test_positional():
    await compute()


@pytest.mark.asgi_guard_blocking(threshold=0, strict=False)
async def test_zero():
    await compute()


@pytest.mark.asgi_guard_blocking(threshold=-1)
async def test_negative():
    pass


@pytest.mark.asgi_guard_blocking(0.03, threshold=0.03)
async def test_both():
    pass


@pytest.mark.asgi_guard_blocking(treshold=0.03)
async def test_misspelt():
    pass


@pytest.mark.asgi_guard_blocking(strict=False)
async def test_default():
    await compute()
"""


def test_the_marker_threshold_is_checked_and_may_be_positional(pytester: pytest.Pytester) -> None:
    """A positional threshold is the threshold (it was ignored); zero or negative, both
    forms or an unknown option fail the test saying so (zero fell back on the default)."""
    pytester.makepyfile(test_threshold=THRESHOLD_TESTS)
    result = pytester.runpytest_subprocess(
        "-p", "anyio", "-v", "--asgi-guard-blocking-threshold", "1"
    )
    result.assert_outcomes(passed=1, failed=5)
    result.stdout.fnmatch_lines(
        [
            "*test_positional FAILED*",
            "*test_zero FAILED*",
            "*test_negative FAILED*",
            "*test_both FAILED*",
            "*test_misspelt FAILED*",
            "*test_default PASSED*",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "@pytest.mark.asgi_guard_blocking(threshold=0, strict=False): threshold must be a"
            " positive, finite number of seconds",
            "@pytest.mark.asgi_guard_blocking(threshold=-1): threshold must be a positive,"
            " finite number of seconds",
            "@pytest.mark.asgi_guard_blocking(0.03, threshold=0.03): the only positional"
            " argument is the threshold",
            "@pytest.mark.asgi_guard_blocking(treshold=0.03): unknown option treshold; it"
            " takes threshold, strict, allow",
        ]
    )


@pytest.mark.parametrize("value", ["0", "-0.1", "inf", "1e12"])
def test_a_command_line_threshold_that_is_not_positive_is_a_usage_error(
    pytester: pytest.Pytester, value: str
) -> None:
    """--asgi-guard-blocking-threshold 0 (or above a day) stops pytest at once with a usage
    error (each checked test failed on its own with a ConfigurationError)."""
    pytester.makepyfile(test_nothing="def test_nothing():\n    pass\n")
    result = pytester.runpytest_subprocess(f"--asgi-guard-blocking-threshold={value}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["ERROR: --asgi-guard-blocking-threshold takes a positive number of seconds, at most*"]
    )


def test_the_plugin_example_runs_as_the_docs_say(pytester: pytest.Pytester) -> None:
    """``examples/test_blocking_plugin.py``: the clean and the allowed tests pass, the two
    that block are caught (xfail); with ``--runxfail`` they fail, with the call and with the
    line that held the loop."""
    example = Path(__file__).resolve().parent.parent / "examples" / "test_blocking_plugin.py"
    pytester.makepyfile(test_blocking_plugin=example.read_text(encoding="utf-8"))
    pytester.makeconftest(
        "import pytest\n\n\n@pytest.fixture\ndef anyio_backend():\n    return 'asyncio'\n"
    )
    result = pytester.runpytest_subprocess("-p", "anyio")
    result.assert_outcomes(passed=2, xfailed=2)
    failing = pytester.runpytest_subprocess("-p", "anyio", "--runxfail")
    failing.assert_outcomes(passed=2, failed=2)
    failing.stdout.fnmatch_lines(["*BlockingCallError: time.sleep() blocks the event loop*"])
    failing.stdout.fnmatch_lines(["*the test blocked the event loop*", "*THE BLOCKING LINE*"])
