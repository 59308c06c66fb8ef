"""LoadSheddingMiddleware's configuration: what runs on every request must be a plain
function (an async one would be a coroutine, always true), and options of the wrong type
fail at construction with ConfigurationError, not at the first request."""

from __future__ import annotations

import functools
from typing import Any

import pytest
from starlette.responses import PlainTextResponse
from starlette.types import Scope

from asgi_guard import ConfigurationError, LoadSheddingEvent, LoadSheddingMiddleware

ok_app = PlainTextResponse("ok")


async def async_trust(scope: Scope) -> bool:
    return False


async def async_priority(scope: Scope) -> str:
    return "sheddable"


class AsyncCallable:
    async def __call__(self, scope: Scope) -> bool:
        return False


async def async_callback(event: LoadSheddingEvent) -> None:
    pass


@pytest.mark.parametrize(
    "trust",
    [async_trust, functools.partial(async_trust), AsyncCallable()],
    ids=["function", "partial", "callable-object"],
)
def test_an_async_trust_predicate_fails_at_construction(trust: Any) -> None:
    """An async trust_priority_header would return a coroutine, always true: every
    client would choose its own priority. It is refused at construction."""
    with pytest.raises(ConfigurationError, match=r"trust_priority_header .* not async"):
        LoadSheddingMiddleware(ok_app, priority_header="X-Priority", trust_priority_header=trust)


@pytest.mark.parametrize(
    "priority",
    [async_priority, functools.partial(async_priority), AsyncCallable()],
    ids=["function", "partial", "callable-object"],
)
def test_an_async_priority_function_fails_at_construction(priority: Any) -> None:
    """An async priority function runs on every request; its coroutine names no class."""
    with pytest.raises(ConfigurationError, match=r"priority functions .* not async"):
        LoadSheddingMiddleware(ok_app, priority=priority)


def test_a_trust_predicate_without_a_header_fails_at_construction() -> None:
    """trust_priority_header alone would be silently ignored: there is no header to trust."""
    with pytest.raises(ConfigurationError, match="without priority_header"):
        LoadSheddingMiddleware(ok_app, trust_priority_header=lambda scope: True)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"response": 42}, "response must be a callable"),
        ({"on_event": 42}, "on_event takes a callback"),
        ({"on_event": "log"}, "on_event takes a callback"),
        ({"on_event": [print, 1]}, "on_event callbacks must be callable"),
        ({"on_event": async_callback}, r"on_event callbacks .* not async"),
        ({"on_event": [async_callback]}, r"on_event callbacks .* not async"),
        ({"exempt": None}, r"exempt takes a list of paths and predicates \(\(\) for none\)"),
        ({"exempt": 42}, "exempt takes a list of paths and predicates"),
        ({"reserve": [("critical", 0.2)]}, "reserve maps class names to shares"),
    ],
    ids=lambda value: value if isinstance(value, str) else repr(value),
)
def test_options_of_the_wrong_type_fail_at_construction(
    options: dict[str, Any], message: str
) -> None:
    """A response that is not callable (it failed at the first refusal, a 500), event
    callbacks that are not callables or are async (never awaited), exempt=None, a reserve
    that is not a mapping: ConfigurationError, not a TypeError now or later."""
    with pytest.raises(ConfigurationError, match=message):
        LoadSheddingMiddleware(ok_app, **options)


def test_plain_callables_and_empty_options_are_accepted() -> None:
    """The accepted forms next to the refused ones: plain callables, one or a list of
    callbacks, no exemptions, an async response factory."""

    async def response(scope: Scope, rejection: Any) -> Any:
        return PlainTextResponse("busy", status_code=503)

    events: list[LoadSheddingEvent] = []
    LoadSheddingMiddleware(
        ok_app,
        priority=lambda scope: None,
        priority_header="X-Priority",
        trust_priority_header=lambda scope: True,
        exempt=(),
        response=response,
        on_event=[events.append, print],
        reserve={"critical": 0.2},
    )
    LoadSheddingMiddleware(ok_app, on_event=events.append, exempt="/health")
