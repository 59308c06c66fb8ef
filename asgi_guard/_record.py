"""The per-request guard record, kept in ``scope["asgi_guard"]``, and the list of the
rate-limit dependencies' header entries, kept in ``scope["asgi_guard.rate_limit_fields"]``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.types import Scope

if TYPE_CHECKING:
    from ._deadline import Budget

__all__ = ["COUNTED_KEY", "FIELDS_KEY", "LEGACY_KEY", "SCOPE_KEY", "GuardRecord", "get_record"]

SCOPE_KEY = "asgi_guard"

#: ``scope[FIELDS_KEY]``: the list of ``(RateLimit-Policy, RateLimit)`` entries that
#: dependencies add after routing, set by the outermost ``RateLimitMiddleware`` that writes
#: the IETF fields (it merges them into the response it sends). A list of its own rather
#: than a field of the record: the middleware's hot path then builds no record.
FIELDS_KEY = "asgi_guard.rate_limit_fields"

#: ``scope[LEGACY_KEY]``: the limit, remaining and reset of the tightest quota of the outermost
#: ``RateLimitMiddleware`` that sends legacy fields (None without one), then of each
#: dependency behind it that sends them; that middleware sends the tightest of all. (Keys of
#: their own, as `FIELDS_KEY`, for the same reason.)
LEGACY_KEY = "asgi_guard.rate_limit_legacy"

#: ``scope[COUNTED_KEY]``: the counters of named policies a request was counted against (or
#: a dry run decided), as ``(id(limiter), namespace, key)``, so that a dependency on the same
#: limiter does not decide them again. Only when such a dependency exists.
COUNTED_KEY = "asgi_guard.rate_limit_counted"


class GuardRecord:
    """What the guards know about one request, shared by middlewares and dependencies.

    Attributes:
        arrival: When the request reached the outermost guard that noted it
            (`time.monotonic`), or ``None``; deadlines count from it.
        budget: The request's deadline, set by a ``TimeoutMiddleware``.
        timeout_exempt: A ``TimeoutMiddleware`` exempted the request (no deadline).
        priority: The criticality class a ``LoadSheddingMiddleware`` gave the request (an
            index: 0 is ``critical-plus``), or ``None``.
        refused: A guard refused the request (429, or 503 at capacity): its response says
            nothing of how fast the application serves, and an outer load shedder's
            algorithm does not learn from it.
    """

    __slots__ = (
        "arrival",
        "budget",
        "priority",
        "refused",
        "timeout_exempt",
    )

    def __init__(self) -> None:
        self.arrival: float | None = None
        self.budget: Budget | None = None
        self.timeout_exempt = False
        self.priority: int | None = None
        self.refused = False


def get_record(scope: Scope) -> GuardRecord:
    """Return the request's record, creating it on first use."""
    record = scope.get(SCOPE_KEY)
    if record is None:
        record = scope[SCOPE_KEY] = GuardRecord()
    return record  # type: ignore[no-any-return,unused-ignore]
