"""The per-request guard record, kept in ``scope["asgi_guard"]``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.types import Scope

if TYPE_CHECKING:
    from ._deadline import Budget

__all__ = ["SCOPE_KEY", "GuardRecord", "get_record"]

SCOPE_KEY = "asgi_guard"


class GuardRecord:
    """What the guards know about one request, shared by middlewares and dependencies.

    Attributes:
        rate_limit_fields: ``(RateLimit-Policy, RateLimit)`` entries that dependencies add
            after routing, for the rate-limit middleware to merge into the response.
        merges_rate_limit_fields: Whether a ``RateLimitMiddleware`` writes the IETF
            ``RateLimit`` fields of this request (and so merges the dependencies' entries).
        arrival: When the request reached the outermost guard that noted it
            (`time.monotonic`), or ``None``; deadlines count from it.
        budget: The request's deadline, set by a ``TimeoutMiddleware``.
        timeout_exempt: A ``TimeoutMiddleware`` exempted the request (no deadline).
        priority: The criticality class a ``LoadSheddingMiddleware`` gave the request (an
            index: 0 is ``critical-plus``), or ``None``.
    """

    __slots__ = (
        "arrival",
        "budget",
        "merges_rate_limit_fields",
        "priority",
        "rate_limit_fields",
        "timeout_exempt",
    )

    def __init__(self) -> None:
        self.rate_limit_fields: list[tuple[str, str]] | None = None
        self.merges_rate_limit_fields = False
        self.arrival: float | None = None
        self.budget: Budget | None = None
        self.timeout_exempt = False
        self.priority: int | None = None


def get_record(scope: Scope) -> GuardRecord:
    """Return the request's record, creating it on first use."""
    record = scope.get(SCOPE_KEY)
    if record is None:
        record = scope[SCOPE_KEY] = GuardRecord()
    return record  # type: ignore[no-any-return,unused-ignore]
