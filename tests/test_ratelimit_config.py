"""Rate-limit configuration of the wrong shape fails at construction with ConfigurationError."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from asgi_guard import (
    ConfigurationError,
    Policy,
    RateLimiter,
    RateLimitMiddleware,
    Rule,
    client_ip,
    header_key,
)
from asgi_guard.fastapi import rate_limit

from .asgi_driver import ok_app

# Construction only: nothing here runs on an event loop.


async def _async(event: object) -> None:  # pragma: no cover - refused, never called
    pass


_async_callback: Any = _async


#: Values of the wrong type, typed Any so that the type checker lets them through.
FIVE: Any = 5
NO: Any = "no"


@pytest.mark.parametrize(
    ("limit", "match"),
    [
        ("10/0 minutes", "period of zero"),
        ("10/0 second", "period of zero"),
        ("10 per 0 day", "period of zero"),
        ("5/second;10/0 minutes", "period of zero"),
        ("2/minute;2/60 seconds", "repeats 2-per-60s"),
        ("10/second;10/second", "repeats 10-per-1s"),
    ],
)
def test_a_zero_period_or_a_repeated_limit_is_refused(limit: str, match: str) -> None:
    """limits reads "10/0 minutes" as 10 a minute and a repeated limit counts twice in one
    policy: both are refused, named or not."""
    with pytest.raises(ConfigurationError, match=match):
        Policy(limit)
    with pytest.raises(ConfigurationError, match=match):
        Policy(limit, name="p")
    with pytest.raises(ConfigurationError, match=match):
        RateLimitMiddleware(ok_app, limit=limit)


@pytest.mark.parametrize("limit", ["10/10 minutes", "2/minute;3/minute", "1/second;60/minute"])
def test_periods_of_several_units_and_distinct_limits_are_accepted(limit: str) -> None:
    """A multiple other than zero, and different limits over one period, stay valid."""
    assert Policy(limit, name="p").quotas


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: Policy("5/minute", name=FIVE), "name must be a str"),
        (lambda: Policy("5/minute", dry_run=NO), "dry_run must be True or False"),
        (lambda: Policy("5/minute", dry_run=FIVE), "dry_run must be True or False"),
        (lambda: RateLimiter(clock=FIVE), "clock must have a now"),
        (lambda: RateLimiter(timeout=True), "timeout"),
        (lambda: RateLimiter(storage_options=FIVE), "storage_options must be a dict"),
        (lambda: RateLimiter(on_event=FIVE), "on_event takes a callback"),
        (lambda: RateLimiter(on_event=[print, FIVE]), "must be callable"),
        (lambda: RateLimiter(on_event=_async_callback), "not async"),
        (lambda: client_ip(trusted_proxies=FIVE), "trusted_proxies must be a list"),
        (lambda: client_ip(headers=FIVE), "headers must be a sequence"),
        (lambda: header_key("x-api-key", fallback=FIVE), "fallback must be a key function"),
    ],
)
def test_wrong_types_of_policies_limiters_and_keys(build: Callable[[], object], match: str) -> None:
    """Wrong types raise ConfigurationError naming the option, never AttributeError or
    TypeError, and never later at request time."""
    with pytest.raises(ConfigurationError, match=match):
        build()


def _middleware(**options: Any) -> RateLimitMiddleware:
    return RateLimitMiddleware(ok_app, **{"limit": "5/minute", **options})


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"rules": [Rule("/a", limit="1/minute", methods=[FIVE])]}, "method names"),
        ({"rules": [Rule("/a", limit="1/minute", methods=[""])]}, "method names"),
        ({"rules": [Rule("/a", limit="1/minute", methods=FIVE)]}, "list of methods"),
        ({"rules": [Rule("/a", limit="1/minute", per_path=NO)]}, "per_path"),
        ({"rules": Rule("/a", limit="1/minute")}, r"rules=\[Rule"),
        ({"rules": 5}, "list of Rule objects"),
        ({"rules": "/a"}, "list of Rule objects"),
        ({"rules": [Rule("/a/{x", limit="1/minute")]}, "outside a parameter"),
        ({"rules": [Rule("/a/x}", limit="1/minute")]}, "outside a parameter"),
        ({"exempt": 5}, "exempt takes a list"),
        ({"exempt": ["/x/{a"]}, "outside a parameter"),
        ({"exempt": "/x/{a:int}}"}, "outside a parameter"),
        ({"on_event": 5}, "on_event takes a callback"),
        ({"on_event": [5]}, "must be callable"),
        ({"on_event": _async_callback}, "not async"),
        ({"limiter": 5}, "limiter must be a RateLimiter"),
        ({"retry_after_jitter": True}, "retry_after_jitter"),
        ({"retry_after_jitter": "1"}, "retry_after_jitter"),
        ({"websocket": "no"}, "websocket must be True or False"),
        ({"websocket": 0}, "websocket must be True or False"),
        ({"problem_type": None}, "problem_type"),
    ],
)
def test_wrong_types_of_middleware_options(options: dict[str, Any], match: str) -> None:
    """Each wrong option raises ConfigurationError with a message naming it."""
    with pytest.raises(ConfigurationError, match=match):
        _middleware(**options)


def test_the_dependency_checks_its_options_as_the_middleware_does() -> None:
    """rate_limit() refuses the same wrong types, at construction."""
    with pytest.raises(ConfigurationError, match="retry_after_jitter"):
        rate_limit("5/minute", retry_after_jitter=True)
    with pytest.raises(ConfigurationError, match="on_event takes a callback"):
        rate_limit("5/minute", on_event=FIVE)
    with pytest.raises(ConfigurationError, match="limiter must be a RateLimiter"):
        rate_limit("5/minute", limiter=NO)


@pytest.mark.parametrize(
    "options",
    [
        {"rules": [Rule("/a/{x}/{rest:path}", limit="1/minute", methods=("GET",))]},
        {"rules": (Rule("/a", limit="1/minute", per_path=True),)},
        {"exempt": ["/static/{rest:path}", "/health", lambda scope: False]},
        {"exempt": (p for p in ["/health"])},
        {"on_event": [print]},
        {"retry_after_jitter": 2},
        {"websocket": False},
    ],
)
def test_well_formed_options_are_accepted(options: dict[str, Any]) -> None:
    """The checks refuse only what is wrong: templates, tuples, generators, callbacks pass."""
    assert _middleware(**options).limiter is not None
