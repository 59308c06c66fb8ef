"""Decision events: small frozen dataclasses delivered to logging and user callbacks."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

from ._errors import ConfigurationError
from ._keys import _is_async_callable

__all__ = [
    "Event",
    "EventHandler",
    "LoadSheddingEvent",
    "RateLimitEvent",
    "StorageEvent",
    "TimeoutEvent",
    "emit",
    "event_handlers",
]

logger = logging.getLogger("asgi_guard")


@dataclass(frozen=True)
class RateLimitEvent:
    """A rate-limit decision worth reporting: a rejection, or one a dry-run policy would make.

    Attributes:
        kind: ``"rejected"``, ``"dry_run"`` (a dry-run policy would have rejected) or
            ``"storage_denied"`` (the storage failed and the policy denies on failure).
        policies: Names of the policies involved.
        method: The request method (``"GET"``; ``"WEBSOCKET"`` for a handshake).
        path: The request path.
        route: The route template or rule pattern that matched, when known.
        retry_after: Seconds until a retry can pass (0 when unknown).
    """

    kind: Literal["rejected", "dry_run", "storage_denied"]
    policies: tuple[str, ...]
    method: str
    path: str
    route: str | None
    retry_after: float


@dataclass(frozen=True)
class StorageEvent:
    """The rate-limit storage stopped answering, or answers again.

    Attributes:
        kind: ``"unavailable"`` when an outage starts, ``"recovered"`` when it ends.
        storage: The storage URI with any password removed.
        error: The error that started the outage (empty on recovery).
    """

    kind: Literal["unavailable", "recovered"]
    storage: str
    error: str


@dataclass(frozen=True)
class TimeoutEvent:
    """A request ran out of time, or its handler outlived its deadline.

    Attributes:
        kind: ``"deadline"`` (the request's deadline passed), ``"idle"`` (a streaming
            response sent nothing for longer than its idle timeout), ``"body"`` (the client
            sent the request body too slowly; answered 408), ``"disconnect"`` (the client
            went away and the handler was cancelled), or ``"overrun"`` (a handler kept
            running long after its deadline, typically a sync ``def`` endpoint in a thread
            that cannot be cancelled; reported once per route).
        method: The request method.
        path: The request path.
        route: The template of the route the app matched, when it had routed.
        timeout: The request's budget in seconds (from arrival to its deadline).
        elapsed: Seconds from the request's arrival to the event (for ``"overrun"``: until
            the handler finally returned).
        response_started: Whether the response had started: if so it was cut short (the
            connection is closed mid-body) instead of answered with 504 or 408.
    """

    kind: Literal["deadline", "idle", "body", "disconnect", "overrun"]
    method: str
    path: str
    route: str | None
    timeout: float
    elapsed: float
    response_started: bool


@dataclass(frozen=True)
class LoadSheddingEvent:
    """The load-shedding guard changed state (never one event per refused request).

    Attributes:
        kind: ``"shedding_started"`` (the first refusal after a calm spell),
            ``"shedding_stopped"`` (nothing refused for a second), ``"limit_changed"`` (the
            adaptive limit moved; checked every 100 ms, logged at debug level),
            ``"trigger_on"`` / ``"trigger_off"`` (event-loop lag or memory above or back
            under its threshold).
        limit: The concurrency limit then.
        inflight: Requests in the application then.
        queued: Requests waiting then.
        queue_delay: The smoothed wait of queued requests that were admitted (seconds).
        loop_lag: The event loop's last measured lag (seconds).
        refused: Requests refused since shedding started.
        trigger: The active trigger (``"loop_lag"``, ``"memory"``) or ``None``.
    """

    kind: Literal[
        "shedding_started", "shedding_stopped", "limit_changed", "trigger_on", "trigger_off"
    ]
    limit: int
    inflight: int
    queued: int
    queue_delay: float
    loop_lag: float
    refused: int
    trigger: str | None


Event = RateLimitEvent | StorageEvent | TimeoutEvent | LoadSheddingEvent
#: A user callback: receives every event; its exceptions are logged once and never propagate.
EventHandler = Callable[[Event], None]


class _CallbackGuard:
    __slots__ = ("failed",)

    def __init__(self) -> None:
        self.failed = False


_E = TypeVar("_E", RateLimitEvent, StorageEvent, TimeoutEvent, LoadSheddingEvent)
_T = TypeVar("_T")


def event_handlers(
    on_event: Callable[[_T], None] | Iterable[Callable[[_T], None]], name: str = "on_event"
) -> tuple[Callable[[_T], None], ...]:
    """A guard's event callbacks (one or several) as a tuple, or `ConfigurationError`:
    each must be a plain callable, since events are delivered synchronously."""
    if callable(on_event):
        on_event = (on_event,)
    elif isinstance(on_event, (str, bytes)) or not isinstance(on_event, Iterable):
        raise ConfigurationError(f"{name} takes a callback or a list of them, got {on_event!r}")
    handlers = tuple(on_event)
    for handler in handlers:
        if not callable(handler):
            raise ConfigurationError(f"{name} callbacks must be callable, got {handler!r}")
        if _is_async_callable(handler):
            raise ConfigurationError(
                f"{name} callbacks are called synchronously and must be plain functions, "
                f"not async: {handler!r}"
            )
    return handlers


def emit(
    event: _E,
    handlers: Sequence[Callable[[_E], None]],
    guard: _CallbackGuard | None = None,
    level: int = logging.INFO,
    message: str = "",
) -> None:
    """Log ``event`` (when ``message`` is given) and hand it to every handler."""
    if message and logger.isEnabledFor(level):
        logger.log(level, message, extra={"asgi_guard_event": event})
    for handler in handlers:
        try:
            handler(event)
        except Exception:
            if guard is None or not guard.failed:
                if guard is not None:
                    guard.failed = True
                logger.exception("asgi_guard: an on_event callback raised; it is ignored")
